"""v1 route of the whole-photo restore: POST /v1/restore (the image back, or JSON with the faces)."""
from __future__ import annotations

import base64
from typing import Literal

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from app.api.deps import CurrentPrincipal, Principal
from app.limits import pixel_budget, read_upload
from app.schemas import ErrorBody, RestoreJSON
from app.serving import get_cache
from restoration.faces import ImageError, encode_image, load_image, mode_counts
from service.db import session_factory
from service.errors import ServiceError
from service.limits import check_image_format, check_pixels
from service.registry import resolve_model
from service.settings import get_settings

router = APIRouter(tags=["restore"])
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
#: the per-face keys of the JSON answer (FaceOut)
FACE_KEYS = ("native_size", "mode", "fidelity", "planned", "reason", "check")


@router.post("/v1/restore", response_class=Response, responses={
    200: {"model": RestoreJSON, "description": "the restored image (image/png, image/jpeg or image/webp), or JSON with "
          "`Accept: application/json`", "content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}},
    400: {"model": ErrorBody, "description": "not an image"}, 404: {"model": ErrorBody, "description": "unknown model"},
    413: {"model": ErrorBody, "description": "a limit was exceeded"},
    415: {"model": ErrorBody, "description": "an image format outside FACEADAPT_IMAGE_FORMATS"},
    429: {"model": ErrorBody, "description": "busy (restore_pixel_budget) or rate-limited; see Retry-After"},
    503: {"model": ErrorBody, "description": "busy: no result within FACEADAPT_RESTORE_TIMEOUT_S, or shutting down"}})
async def restore(
    request: Request,
    image: UploadFile = File(..., description="the photo (or an aligned face crop with aligned=true)"),
    model: str = Form("default", description="model name or id (GET /v1/models)"),
    aligned: bool = Form(False),
    only_center_face: bool = Form(False),
    format: Literal["png", "jpeg", "webp"] = Form("png"),
    fidelity: float | None = Form(None, ge=0.0, le=1.0, description=(
        "0 = fully restored ... 1 = the faces left as they are; default: auto (faces larger than 2x the model input "
        "keep their own fine detail: detail-preserving paste; and never worse: a face whose result would lose "
        "detail or change falls back to detail-preserving, else is kept, and says why). CodeFormer takes it as its "
        "w.")),
    color: bool = Form(False, description="let a gray photo's faces come out in colour (default: a gray input stays "
                       "gray)"),
    principal: Principal = CurrentPrincipal,
):
    """Restore the faces of a photo: all of them, or the `FACEADAPT_MAX_FACES_PER_IMAGE` largest when there are more
    (the others are left untouched; `faces_found` / `X-FaceAdapt-Faces-Found` counts them all). `Accept:
    application/json` returns the image base64 with the restored faces' boxes."""
    settings = get_settings()
    data = await read_upload(image, settings)
    if not data:
        raise ServiceError(400, "bad_image", "the uploaded image is empty")
    check_image_format(data, settings, image.filename or "image")  # from the signature, before any decoder runs
    pixels = check_pixels(data, settings, image.filename or "image") or settings.max_image_pixels

    def work():
        with session_factory()() as s:  # the model first: an unknown one is a 404 before any decoding
            row = resolve_model(s, principal.tenant_id, model)
        # admission: the decoded pixels of the restores in flight stay within restore_pixel_budget (wait, then 429)
        with pixel_budget().admit(pixels, settings.restore_admission_wait_s):
            try:
                img = load_image(data, max_pixels=settings.max_image_pixels)
            except ImageError as exc:
                raise ServiceError(400, "bad_image", f"cannot read the image: {exc}") from None
            with get_cache().use(row) as loaded:  # the model stays loaded until this request is done with it
                res = loaded.restore(img, aligned, only_center_face, max_faces=settings.max_faces_per_image,
                                     fidelity=fidelity, color=color)
            return encode_image(res.image, format, png_level=settings.response_png_level), res, row

    encoded, res, row = await run_in_threadpool(work)
    faces = res.faces
    modes = mode_counts(faces)
    if "application/json" in request.headers.get("accept", ""):
        body = RestoreJSON(
            image=base64.b64encode(encoded).decode(), format=format, model=row.name, model_id=row.id,
            detector=res.detector, faces_found=res.faces_found, faces_restored=len(faces),
            faces=[{"box": [float(v) for v in f.box], "score": float(f.score),
                    "landmarks": [[float(x), float(y)] for x, y in f.landmarks5],
                    **{k: f.extra[k] for k in FACE_KEYS if k in f.extra}} for f in faces],
            fidelity="auto" if fidelity is None else fidelity, modes=modes, gray=res.gray,
        )
        return JSONResponse(body.model_dump())
    return Response(encoded, media_type=MEDIA[format],
                    headers={"X-FaceAdapt-Model": row.name, "X-FaceAdapt-Faces": str(len(faces)),
                             "X-FaceAdapt-Faces-Found": str(res.faces_found),
                             "X-FaceAdapt-Modes": ",".join(f"{k}={v}" for k, v in modes.items()) or "none",
                             "X-FaceAdapt-Fidelity": "auto" if fidelity is None else f"{fidelity:g}",
                             "X-FaceAdapt-Gray": "kept" if res.gray else "no",
                             "X-FaceAdapt-Fell-Back": fell_back_header(faces)})


def fell_back_header(faces) -> str:
    """The faces that fell back rather than come out worse, and why: 'face N: reason; ...' (ASCII), or 'none'."""
    parts = [f"face {k}: {f.extra['reason']}" for k, f in enumerate(faces, 1) if f.extra.get("reason")]
    return " | ".join(parts).encode("ascii", "replace").decode() if parts else "none"
