"""Dataset ingestion: unpack, check every limit, decode, detect faces, then store blobs and rows in one go."""
from __future__ import annotations

import threading
from pathlib import PurePosixPath

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import session_factory
from app.errors import ApiError
from app.limits import UploadedFile, check_image_count, check_pixels, is_zip, unpack_zip
from app.models import Dataset, ImageRow, Job
from app.schemas import FINAL_STATUSES
from app.storage import get_storage
from restoration.settings import Settings

_helper = None
_helper_lock = threading.Lock()


def face_helper():
    global _helper
    with _helper_lock:
        if _helper is None:
            from restoration.face import FaceHelper

            _helper = FaceHelper(size=512)
        return _helper


def ingest(tenant_id: str, name: str, uploads: list[UploadedFile], settings: Settings) -> dict:
    from restoration.imageio import ImageError, load_image

    if len(uploads) == 1 and is_zip(uploads[0].data):
        uploads = unpack_zip(uploads[0].data, settings)
    check_image_count(len(uploads), settings)
    for u in uploads:  # every limit first: nothing is decoded or stored if one fails
        check_pixels(u.data, settings, u.name)
    accepted, rejected = [], []
    helper = face_helper()
    for u in uploads:
        if is_zip(u.data):
            rejected.append({"file": u.name, "reason": "a zip must be uploaded alone (nested archives are not read)"})
            continue
        try:
            img = load_image(u.data, max_pixels=settings.max_image_pixels)
        except ImageError as exc:
            rejected.append({"file": u.name, "reason": f"not a readable image: {exc}"})
            continue
        faces = helper.detect(img)
        if not faces:
            rejected.append({"file": u.name, "reason": "no face found"})
            continue
        accepted.append((u, img.shape, faces))
    storage = get_storage()
    with session_factory()() as s:
        ds = Dataset(tenant_id=tenant_id, name=name or "", rejected=rejected, image_count=len(accepted),
                     face_count=sum(len(f) for _, _, f in accepted))
        s.add(ds)
        for i, (u, shape, faces) in enumerate(accepted):
            key = storage.put(u.data)
            ds.images.append(ImageRow(
                position=i, filename=PurePosixPath(u.name).name[:512], blob_key=key, width=int(shape[1]),
                height=int(shape[0]), faces=[f.to_dict() for f in faces],
            ))
        s.commit()
        return dataset_out(ds)


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    ds = session.get(Dataset, dataset_id)
    if ds is None or ds.tenant_id != tenant_id:
        raise ApiError(404, "dataset_not_found", f"no dataset {dataset_id!r}")
    return ds


def delete_dataset(session: Session, tenant_id: str, dataset_id: str) -> None:
    ds = get_dataset(session, tenant_id, dataset_id)
    running = session.scalar(select(Job.id).where(Job.dataset_id == ds.id, Job.status.not_in(FINAL_STATUSES)).limit(1))
    if running:
        raise ApiError(409, "dataset_in_use", f"job {running} is still using this dataset; cancel it first")
    keys = {im.blob_key for im in ds.images}
    session.delete(ds)
    session.commit()
    # blobs are content-addressed: drop only those no other image still references
    storage = get_storage()
    for key in keys:
        if session.scalar(select(ImageRow.id).where(ImageRow.blob_key == key).limit(1)) is None:
            storage.delete(key)


def dataset_out(ds: Dataset) -> dict:
    return {"id": ds.id, "name": ds.name, "images_accepted": ds.image_count, "faces_found": ds.face_count,
            "rejected": ds.rejected or [], "created_at": ds.created_at}
