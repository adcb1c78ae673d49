"""v1 routes of datasets: upload (many images or one zip), read, delete."""
from __future__ import annotations

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.api.deps import DB, CurrentPrincipal, Principal
from app.limits import read_upload
from app.schemas import DatasetOut
from restoration.adaptation import ALIGNED_CROP, PHOTO, describe_faces
from service.datasets import delete_dataset, get_dataset, ingest
from service.errors import ServiceError
from service.limits import UploadedFile
from service.rows import DATASET_NAME_MAX, Dataset
from service.settings import get_settings

router = APIRouter(tags=["datasets"])


def dataset_out(ds: Dataset) -> dict:
    images = [{"file": im.filename, **describe_faces(im.faces, (im.height, im.width))}
              for im in sorted(ds.images, key=lambda im: im.position)]
    return {"id": ds.id, "name": ds.name, "images_accepted": ds.image_count, "faces_found": ds.face_count,
            "rejected": ds.rejected or [], "created_at": ds.created_at, "images": images,
            "usage": {u: sum(im["use"] == u for im in images) for u in (ALIGNED_CROP, PHOTO)}}


@router.post("/v1/datasets", status_code=201, response_model=DatasetOut)
async def create_dataset(
    files: list[UploadFile] = File(..., description="face images, or one zip of them"),
    name: str = Form("", max_length=DATASET_NAME_MAX, description=f"free text, at most {DATASET_NAME_MAX} characters"),
    principal: Principal = CurrentPrincipal,
):
    """Upload a customer's images (many files or one zip). Images without a detectable face are rejected with a reason.
    The response says how each accepted image will be used: an aligned face crop (one face filling the frame) as it
    is, a photo's faces detected and aligned; an adaptation decides per image unless its params set `aligned`."""
    settings = get_settings()
    uploads, total = [], 0
    for f in files:
        data = await read_upload(f, settings, already=total)
        total += len(data)
        uploads.append(UploadedFile(f.filename or f"file{len(uploads)}", data))
    if not uploads:
        raise ServiceError(400, "no_files", "send images (or one zip) in the 'files' field")
    ds = await run_in_threadpool(ingest, principal.tenant_id, name, uploads, settings)
    return dataset_out(ds)


@router.get("/v1/datasets/{dataset_id}", response_model=DatasetOut)
def read_dataset(dataset_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    return dataset_out(get_dataset(session, principal.tenant_id, dataset_id))


@router.delete("/v1/datasets/{dataset_id}", status_code=204)
def remove_dataset(dataset_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    delete_dataset(session, principal.tenant_id, dataset_id)
