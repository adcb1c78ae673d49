"""Request and response bodies of the v1 API."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.rows import JOB_STATUSES

JobStatus = Literal[JOB_STATUSES]  # the OpenAPI enum of a job's status


class ErrorBody(BaseModel):
    error: str
    detail: str


class FaceOut(BaseModel):
    box: list[float]
    score: float
    landmarks: list[list[float]] | None = None
    native_size: float | None = Field(default=None, description="side of the face's aligned square in input pixels")
    mode: Literal["restored", "detail_preserving", "kept"] | None = Field(
        default=None, description="restored: the model's output (blended by fidelity); detail_preserving: the face is "
        "larger than 2x the model input, only the band the model represents is replaced and the input's finer detail "
        "is kept; kept: left as it is (fidelity 1)")
    fidelity: float | None = Field(default=None, description="the fidelity used for this face (0 = fully restored)")


class RestoreJSON(BaseModel):
    image: str = Field(description="the restored image, base64")
    format: str
    faces: list[FaceOut] = Field(description="the restored faces, largest first")
    faces_found: int = Field(description="faces detected in the image")
    faces_restored: int = Field(description="faces restored: all found, at most FACEADAPT_MAX_FACES_PER_IMAGE (the "
                                "largest)")
    model: str
    model_id: str
    detector: str | None = None
    fidelity: float | Literal["auto"] = Field(default="auto", description="the fidelity asked for")
    modes: dict[str, int] = Field(default_factory=dict, description="restored faces per mode")


class Rejected(BaseModel):
    file: str
    reason: str


class ImageUse(BaseModel):
    file: str
    use: str = Field(description="'aligned crop': one face filling the frame near an alignment template's landmarks, "
                     "used as it is (as with params.aligned=true); 'photo': its faces are detected and aligned")
    framing: str | None = Field(default=None, description="the alignment template an aligned crop matches ('utk200', "
                                "'ffhq'); a crop framed otherwise than the base model's is aligned like a photo's face")
    faces: int = Field(description="faces found in the image (false detections filtered)")
    label: str = Field(description="e.g. 'aligned crop (utk200 framing)', 'photo, 2 faces'")


class DatasetOut(BaseModel):
    id: str
    name: str
    images_accepted: int
    faces_found: int
    rejected: list[Rejected]
    created_at: datetime
    usage: dict[str, int] = Field(default_factory=dict, description="accepted images per use ('aligned crop', 'photo')")
    images: list[ImageUse] = Field(default_factory=list, description="how each accepted image will be used, in "
                                   "upload order")


class AdaptationIn(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not silently ignored

    dataset_id: str
    base_model: str = "default"
    name: str = Field(description="name the adapted model is registered under (lowercase letters, digits, '.', '_', '-')")
    params: dict[str, Any] = Field(default_factory=dict, description="optional engine parameters (AdaptConfig fields)")
    shards: int | None = Field(default=None, ge=1, le=64, description="parallel pseudo-target shards (default: settings)")


class Progress(BaseModel):
    stage: str | None
    done: int
    total: int
    stage_elapsed_s: float | None = Field(None, description="seconds since the current stage started")
    eta_s: float | None = Field(None, description="estimated seconds left in the current stage (from its rate so far)")


class EventOut(BaseModel):
    ts: datetime
    stage: str | None
    kind: str
    message: str
    data: dict = {}


class AdaptationOut(BaseModel):
    id: str
    status: JobStatus
    dataset_id: str | None
    base_model: str
    name: str
    params: dict
    progress: Progress
    events: list[EventOut] | None = None
    evaluation: dict = {}
    model_id: str | None = None
    error: str | None = None
    cancel_requested: bool = False
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


class ModelOut(BaseModel):
    id: str
    name: str
    kind: str
    arch: str
    public: bool
    builtin: bool
    job_id: str | None = None
    sha256: str
    created_at: datetime


class ModelDetail(ModelOut):
    card: dict
