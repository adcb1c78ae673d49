"""Datasets: ingest an upload (unpack, check every limit, decode, detect faces, then store blobs and rows in one
go), read one of a tenant's, delete one."""
from __future__ import annotations

import tempfile
import threading
from pathlib import Path, PurePosixPath

from sqlalchemy import select
from sqlalchemy.orm import Session

from restoration.adaptation import face_record
from restoration.faces import FaceHelper, ImageError, load_image
from service import blobs
from service.db import session_factory
from service.errors import ServiceError
from service.limits import UploadedFile, check_max_images, check_pixels, is_zip, too_small, unpack_zip
from service.rows import DATASET_NAME_MAX, FINAL_STATUSES, Dataset, ImageRow, Job, new_id, owned
from service.settings import ServiceSettings

_helper = None
_helper_lock = threading.Lock()


def face_helper() -> FaceHelper:
    global _helper
    with _helper_lock:
        if _helper is None:
            _helper = FaceHelper(size=512)
        return _helper


def ingest(tenant_id: str, name: str, uploads: list[UploadedFile], settings: ServiceSettings) -> Dataset:
    """A new dataset of the uploads' images that show a face (the others are listed in `rejected` with a reason).
    A zip's entries are streamed to a temporary folder (service.limits.unpack_zip) and read one at a time."""
    check_dataset_name(name)  # before anything is unpacked, decoded or detected
    with tempfile.TemporaryDirectory(prefix="faceadapt-upload-") as tmp:
        return _ingest(tenant_id, name, uploads, settings, Path(tmp))


def _ingest(tenant_id: str, name: str, uploads: list[UploadedFile], settings: ServiceSettings, tmp: Path) -> Dataset:
    accepted, rejected = [], []
    if len(uploads) == 1 and is_zip(uploads[0].head()):
        # non-image entries are rejected, not unpacked; the images go to files in `tmp`
        uploads = unpack_zip(uploads[0].data, settings, rejected, dest=tmp)
    check_max_images(len(uploads), settings)
    small = {}
    for i, u in enumerate(uploads):  # every limit first (headers only): nothing is decoded or stored if one fails
        data = u.data
        check_pixels(data, settings, u.name)
        small[i] = too_small(data, settings)
    helper = face_helper()
    for i, u in enumerate(uploads):
        if is_zip(u.head()):
            rejected.append({"file": u.name, "reason": "a zip must be uploaded alone (nested archives are not read)"})
            continue
        if small[i]:
            rejected.append({"file": u.name, "reason": small[i]})
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
    if not accepted:  # nothing usable: a 4xx, and no empty dataset
        raise ServiceError(422, "no_images", f"none of the {len(rejected)} uploaded files is an image with a face; "
                           "nothing was stored", rejected=rejected[:100])
    with session_factory()() as s:
        ds = Dataset(id=new_id(), tenant_id=tenant_id, name=name or "", rejected=rejected, image_count=len(accepted),
                     face_count=sum(len(f) for _, _, f in accepted))
        s.add(ds)
        # blobs, their references and the rows: one transaction (service.blobs)
        keys = blobs.store_many(s, [u.data for u, _, _ in accepted], f"dataset:{ds.id}")
        for i, ((u, shape, faces), key) in enumerate(zip(accepted, keys)):
            ds.images.append(ImageRow(
                position=i, filename=PurePosixPath(u.name).name[:512], blob_key=key, width=int(shape[1]),
                height=int(shape[0]), faces=[face_record(f) for f in faces],
            ))
        s.commit()
        return ds


def check_dataset_name(name: str | None) -> None:
    """A dataset name is free text of at most DATASET_NAME_MAX characters (422 `bad_name`)."""
    if name is not None and len(name) > DATASET_NAME_MAX:
        raise ServiceError(422, "bad_name", f"the dataset name has {len(name)} characters, more than "
                           f"{DATASET_NAME_MAX}", limit="dataset_name_length", limit_value=DATASET_NAME_MAX)


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    ds = owned(session, Dataset, dataset_id, tenant_id)
    if ds is None:
        raise ServiceError(404, "dataset_not_found", f"no dataset {dataset_id!r}")
    return ds


def delete_dataset(session: Session, tenant_id: str, dataset_id: str) -> None:
    ds = get_dataset(session, tenant_id, dataset_id)
    running = session.scalar(select(Job.id).where(Job.dataset_id == ds.id, Job.status.not_in(FINAL_STATUSES)).limit(1))
    if running:
        raise ServiceError(409, "dataset_in_use", f"job {running} is still using this dataset; cancel it first")
    keys = {im.blob_key for im in ds.images} | blobs.drop_refs(session, f"dataset:{ds.id}")
    session.delete(ds)
    session.commit()
    # blobs are content-addressed: `collect` deletes only those nothing references (race-free, see service.blobs)
    blobs.collect(keys)
