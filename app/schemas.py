"""Request and response bodies of the v1 API."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.params import FINETUNE, PSEUDO, TOP, allowed_devices
from service.rows import JOB_STATUSES
from service.settings import ServiceSettings
from service.webhooks import EVENT_TYPES, URL_PATTERN

JobStatus = Literal[JOB_STATUSES]  # the OpenAPI enum of a job's status
WebhookEvent = Literal[EVENT_TYPES]


class ErrorBody(BaseModel):
    """Every error answer: a stable code, a sentence for people, and extra fields of some codes (e.g. `limit`)."""
    model_config = ConfigDict(extra="allow")

    error: str = Field(description="stable error code, e.g. job_not_found, limit_exceeded, unauthorized")
    detail: str = Field(description="what went wrong and what to do about it")


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
    planned: Literal["restored", "detail_preserving"] | None = Field(
        default=None, description="the mode the native size chose, when the never-worse check made the face fall back")
    reason: str | None = Field(default=None, description="why the face fell back (never worse), in words")
    check: dict[str, float] | None = Field(
        default=None, description="the never-worse check of the result: detail_kept (share of the input's fine "
        "detail), removed_structure (when detail_kept is under 0.8: how much what was removed follows the face's "
        "edges; at most 0 it was noise, not detail), lowpass_db (low-pass agreement with the input) and, with a "
        "guard prior (FACEADAPT_GUARD_PRIOR), naturalness_db (how much more natural the face prior finds the "
        "result's coarse structure than the input's; under -1 dB the face falls back; at least +0.5 dB, the detail "
        "removed was noise)")


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
    gray: bool = Field(default=False, description="the input was gray and the result was kept gray (color=false)")


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
    # a misspelt field is an error, not silently ignored; webhook_events only with a webhook (as the server checks)
    model_config = ConfigDict(extra="forbid", json_schema_extra={"dependentRequired": {"webhook_events": ["webhook"]}})

    dataset_id: str
    base_model: str = "default"
    name: str = Field(json_schema_extra={"pattern": r"^[a-z0-9][a-z0-9._-]{0,63}$"},  # checked: 422 bad_name
                      description="name the adapted model is registered under: 1-64 lowercase letters, digits, '.', "
                      "'_' or '-', starting with a letter or digit")
    params: dict[str, Any] = Field(default_factory=dict, description="optional engine parameters (AdaptConfig fields)")
    shards: int | None = Field(default=None, ge=1, le=64, description="parallel pseudo-target shards (default: settings)")
    webhook: str = Field(default=None, max_length=2048, pattern=URL_PATTERN, description=(
        "URL called back (POST, JSON, signed: see docs/SERVICE.md) on the job's `webhook_events`; it must be under "
        "one of the server's FACEADAPT_WEBHOOK_ALLOWED_URLS prefixes (none by default: 403 webhook_not_allowed)"))
    webhook_events: list[WebhookEvent] = Field(default=None, min_length=1, description=(
        "which changes call the webhook (default [\"completed\"]): start (the first stage started), stage (a stage "
        "started), logs (every job event), completed (succeeded, failed or cancelled)"))

    @model_validator(mode="after")
    def _events_need_a_webhook(self):
        if self.webhook_events is not None and self.webhook is None:
            raise ValueError("webhook_events needs a webhook URL")
        return self


class Progress(BaseModel):
    stage: str | None
    done: int
    total: int
    stage_elapsed_s: float | None = Field(None, description="seconds since the current stage started")
    eta_s: float | None = Field(None, description="estimated seconds left in the current stage (from its rate so far)")


class EventOut(BaseModel):
    id: int = Field(description="the event's id: increasing within a job, the cursor of `after` and Last-Event-ID")
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


class EventPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventOut] = Field(description="the events after the cursor, oldest first")
    has_more: bool = Field(description="more events follow: ask again with after=last_id")
    last_id: int | None = Field(description="the id of the last event of this page (the next `after`); null when "
                                "the page is empty")


class WebhookSecretOut(BaseModel):
    secret: str = Field(description="the HMAC-SHA256 key of the FaceAdapt-Signature header of this tenant's webhooks")
    created_at: datetime
    previous_valid_until: datetime | None = Field(None, description="after a rotation: until when deliveries also "
                                                  "carry a signature made with the previous secret")


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


def _param_schema(spec: tuple, settings: ServiceSettings) -> dict | None:
    kind = spec[0]
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "choice":
        return {"enum": list(spec[1])}
    if kind == "device":
        allowed = allowed_devices(settings)
        cuda = [{"type": "string", "pattern": "^cuda:[0-9]{1,2}$"}] if "cuda" in allowed else []
        return {"anyOf": [{"type": "string", "enum": allowed}, *cuda]}
    if kind == "hq_set":
        return {"type": "string", "enum": sorted(settings.hq_sets)} if settings.hq_sets else None
    if kind == "respacing":
        return {"anyOf": [{"type": "string", "pattern": "^(ddim)?[0-9]{1,4}(,[0-9]{1,4}){0,15}$"},
                          {"type": "integer", "minimum": 1, "maximum": 1000}],
                "description": "diffusion steps: '250', 'ddim25' or comma-separated counts, 1 to 1000 in all"}
    lo, hi = spec[1], spec[2]
    hi = hi(settings) if callable(hi) else hi
    if kind == "pair":
        return {"type": "array", "items": {"type": "number", "minimum": lo, "maximum": hi}, "minItems": 2,
                "maxItems": 2}
    if kind in ("int", "int_or_none"):
        out = {"type": "integer", "minimum": lo, "maximum": hi}
        return {"anyOf": [out, {"type": "null"}]} if kind == "int_or_none" else out
    if kind == "float_pos":
        return {"type": "number", "exclusiveMinimum": lo, "maximum": hi}
    return {"type": "number", "minimum": lo, "maximum": hi}


def _table_schema(table: dict, settings: ServiceSettings) -> dict:
    props = {k: s for k, s in ((k, _param_schema(spec, settings)) for k, spec in table.items()) if s is not None}
    return {"type": "object", "additionalProperties": False, "properties": props}


def params_schema(settings: ServiceSettings) -> dict:
    """The JSON schema of `AdaptationIn.params` from the server's own bounds (service/params.py, this server's
    settings: devices, HQ sets, the most fine-tuning steps); AdaptConfig's checks across fields stay the server's
    (422 bad_params)."""
    out = _table_schema(TOP, settings)
    out["properties"]["pseudo"] = {**_table_schema(PSEUDO, settings), "description": "pseudo-target generation"}
    out["properties"]["finetune"] = {**_table_schema(FINETUNE, settings), "description": "fine-tuning"}
    out["description"] = ("optional engine parameters (AdaptConfig fields), each typed and bounded; unknown fields, "
                          "values out of range and combinations AdaptConfig refuses are a 422 bad_params")
    return out
