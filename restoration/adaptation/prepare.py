"""Stage 1, prepare: the domain's faces as aligned crops in `prepare/`, with a held-out part for evaluation.

Faces are detected once: a caller that detected them already (the service, at upload) passes each image's
detection records (`face_record`), and `prepare` aligns from their landmarks; without them it detects.

How each image is used (`image_usage`): by default (`AdaptConfig.aligned` None) an image whose one face fills the
frame with its landmarks near the base's alignment template is an aligned crop, used as it is (as with
`aligned=True`); any other image is a photo whose faces are aligned from their landmarks. The manifest says which,
per item and in all (`usage`). The fine-tune is fitted to the number of faces here (`scale_for_faces`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from restoration.adaptation.config import AdaptConfig, held_out_count, scale_for_faces
from restoration.adaptation.files import read_json, write_json
from restoration.adaptation.loaders import zoo_or_default
from restoration.adaptation.workdir import CROPS, GT, JOB, MANIFEST
from restoration.faces.alignment import crop_template, template_for_card
from restoration.faces.detection import Face, filter_faces
from restoration.faces.helper import FaceHelper
from restoration.faces.imageio import load_image, save_image
from restoration.models.io import to_tensor, to_uint8
from restoration.models.zoo import sha256_file
from restoration.runtime import CancelFn, ProgressFn, check_cancel

__all__ = ["prepare", "face_record", "faces_from_records", "image_usage", "usage_label", "describe_faces",
           "EXACT_LANDMARKS",
           "ALIGNED_CROP", "PHOTO"]

#: how an image is used (`image_usage`): as the aligned face crop it is, or as a photo whose faces are aligned
ALIGNED_CROP, PHOTO = "aligned crop", "photo"

#: The key of a detection record (`face_record`) that holds the detector's landmarks exactly (its float32 values as
#: JSON numbers). `Face.to_dict()` rounds them to 0.01 px, which moves 1-3 % of an aligned crop's pixels by one level.
EXACT_LANDMARKS = "landmarks5_exact"


def face_record(face: Face) -> dict:
    """A detected face as JSON, from which `prepare` aligns exactly the crop it would align after detecting again:
    `Face.to_dict()` (box, score, landmarks5) and the landmarks exactly (`EXACT_LANDMARKS`)."""
    return {**face.to_dict(), EXACT_LANDMARKS: [[float(x), float(y)] for x, y in face.landmarks5]}


def faces_from_records(records: Sequence[dict] | None) -> list[Face] | None:
    """The faces of one image from its detection records (`face_record`, largest first, as detected); None when there
    are none or one lacks the exact landmarks (records of `Face.to_dict()` alone): the image is detected again."""
    if not records or any(EXACT_LANDMARKS not in r for r in records):
        return None
    return [Face(box=np.asarray(r["box"], np.float32), score=float(r["score"]),
                 landmarks5=np.asarray(r[EXACT_LANDMARKS], np.float32)) for r in records]


def image_usage(faces: Sequence[Face], shape: tuple[int, ...], face_template: str | None = None,
                aligned: bool | None = None) -> tuple[str, str | None]:
    """How an image of `shape` with the detected `faces` is used: (ALIGNED_CROP, the template it matches) or (PHOTO,
    None). `aligned` True / False forces it; None decides from the detection: one face filling the (square) frame
    with its landmarks nearest to a template's and near it (`restoration.faces.alignment.crop_template`); with
    `face_template` (the base's framing), only a crop of that template is used as it is (a crop framed otherwise is
    a photo whose face is aligned to the base's framing)."""
    if aligned is not None:
        return (ALIGNED_CROP, face_template) if aligned else (PHOTO, None)
    name = crop_template(faces, shape)
    if name is None or (face_template is not None and name != face_template):
        return PHOTO, None
    return ALIGNED_CROP, name


def usage_label(usage: str, faces: int, framing: str | None = None) -> str:
    """What the dataset response and the CLI print per image: "aligned crop (utk200 framing)", "photo, 2 faces"."""
    if usage == ALIGNED_CROP:
        return f"{ALIGNED_CROP} ({framing} framing)" if framing else ALIGNED_CROP
    return f"{PHOTO}, {faces} face{'s' if faces != 1 else ''}"


def describe_faces(records: Sequence[dict] | None, shape: tuple[int, ...]) -> dict:
    """How an uploaded image of `shape` (h, w) with its detection records (`face_record`) will be used, before the
    base is known (any template's framing): {"use": ALIGNED_CROP | PHOTO, "framing": template name or None,
    "faces": n, "label": `usage_label`}."""
    faces = faces_from_records(records)
    n = len(records or [])
    use, framing = image_usage(faces, shape) if faces is not None else (PHOTO, None)
    return {"use": use, "framing": framing, "faces": n, "label": usage_label(use, n, framing)}


def _safe_id(stem: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "img"
    return s[:80]


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    """An aligned crop at the model's size, resized exactly as `restoration.faces.restore.to_tensor` resizes it when the
    adapted model serves it (so that fine-tuning sees the inputs it will be served)."""
    if arr.shape[:2] == (size, size):
        return arr
    return to_uint8(to_tensor([arr], size))[0]


def _base_face_template(zoo, base: str | None) -> str:
    """The alignment template of the base restorer's card ('ffhq' when it cannot be read)."""
    if not base:
        return "ffhq"
    try:
        return template_for_card(zoo_or_default(zoo).get(base))
    except Exception:  # noqa: BLE001 - an unknown base fails later, with its own message
        return "ffhq"


def _per_image(values: dict | Sequence | None, paths: list[Path]) -> dict:
    """A list parallel to `paths`, or a dict keyed by path, as a dict keyed by str(path)."""
    if values is None:
        return {}
    if isinstance(values, dict):
        return {str(Path(k)): v for k, v in values.items()}
    return {str(p): v for p, v in zip(paths, values)}


def prepare(
    workdir: str | Path,
    image_paths: Sequence[str | Path],
    aligned: bool | None = False,
    size: int = 512,
    helper=None,
    *,
    config: AdaptConfig | None = None,
    base: str | None = None,
    prior: str | None = None,
    name: str | None = None,
    gt_paths: dict | Sequence | None = None,
    detections: dict | Sequence | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    zoo=None,
) -> dict:
    """Crop the faces of `image_paths` into `workdir/prepare` and split off the held-out eval part.

    aligned=True: each image is one aligned face crop (resized to `size`); aligned=None: decided per image
    (`image_usage`: a face crop in the base's framing is used as with aligned=True); else faces are detected and aligned
    with `helper` (a `restoration.faces.helper.FaceHelper(size)`, created when None with the alignment template of the
    `base` model's card, read from `zoo`: the framing the restorer was trained on), at most `config.max_faces` per
    image. `detections`: faces already detected, per image (a list parallel to `image_paths` or a dict path ->
    records): `face_record`s, largest first; an image with such records is aligned from them, not detected again
    (same crops), one without (None, or `Face.to_dict()` records) is detected.
    `gt_paths` (aligned only): ground truth per image, a list parallel to `image_paths` or a dict path -> gt path;
    GT is stored for evaluation only. `config`, `base`, `prior`, `name` are recorded in `job.json` for the later
    stages. Returns the manifest. Re-running with the same inputs returns the existing manifest.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = config or AdaptConfig()
    size = int(size)
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("no input images")
    if gt_paths is not None and aligned is not True:
        raise ValueError("ground truth is only supported for aligned inputs")
    aligned = None if aligned is None else bool(aligned)
    gt_map = {k: Path(v) for k, v in _per_image(gt_paths, paths).items()}
    found = _per_image(detections, paths)

    # job.json: what the later stages need
    job_path = workdir / JOB
    job = read_json(job_path) if job_path.is_file() else {}
    job.update({k: v for k, v in {"base": base, "prior": prior, "name": name}.items() if v is not None})
    job.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))

    # fingerprint of the data (content, not names), order-independent
    if progress is not None:
        progress("prepare", 0, len(paths))
    shas = {str(p): sha256_file(p) for p in paths}
    data_sha = hashlib.sha256("\n".join(sorted(shas.values())).encode()).hexdigest()
    mpath = workdir / MANIFEST
    face_template = None
    if aligned is not True:  # the framing the base model was trained on (faces fill UTKFace crops, not FFHQ ones)
        face_template = getattr(helper, "face_template", None) if helper is not None else \
            _base_face_template(zoo, base or job.get("base"))
    if mpath.is_file():
        old = read_json(mpath)
        if (old.get("data_sha256") == data_sha and old.get("size") == size and old.get("aligned") == aligned
                and old.get("eval_fraction") == config.eval_fraction and old.get("seed") == config.seed
                and old.get("has_gt") == bool(gt_map) and old.get("face_template") == face_template
                and old.get("auto_schedule") == config.auto_schedule):
            job["config"] = _job_config(config, aligned, size, old["counts"])
            write_json(job_path, job)
            if progress is not None:
                progress("prepare", len(paths), len(paths))
            return old

    # held-out split by source image: a seeded hash order, the first `k` are eval
    order = sorted(paths, key=lambda p: hashlib.sha256(f"{config.seed}/{shas[str(p)]}/{p.name}".encode()).hexdigest())
    k_eval = held_out_count(len(paths), config)
    eval_set = {str(p) for p in order[:k_eval]}

    if aligned is not True and helper is None:
        helper = FaceHelper(size, face_template=face_template)
    if aligned is not True and getattr(helper, "size", size) != size:
        raise ValueError(f"FaceHelper size {helper.size} != size {size}")

    items, skipped, used_ids = [], [], set()
    for n, p in enumerate(paths):
        check_cancel(should_cancel, f"prepare cancelled after {n}/{len(paths)} images")
        base_id = _safe_id(p.stem)
        split = "eval" if str(p) in eval_set else "train"
        try:
            img = load_image(p)
        except Exception as exc:  # undecodable file: record and go on
            skipped.append({"source": str(p), "reason": f"unreadable: {exc}"})
            continue
        faces = []
        if aligned is not True:
            faces = faces_from_records(found.get(str(p)))
            faces = helper.detect(img) if faces is None else filter_faces(faces, img.shape)
        usage, _ = image_usage(faces, img.shape, face_template, aligned)
        if usage == ALIGNED_CROP:
            crops = [(_resize(img, size), None)]
        else:
            faces = faces[: max(1, int(config.max_faces))]
            if not faces:
                skipped.append({"source": str(p), "reason": "no face detected"})
            crops = []
            for face in faces:
                crop, affine = helper.align(img, face)
                info = face.to_dict() if hasattr(face, "to_dict") else {}
                info["affine"] = np.asarray(affine, dtype=float).round(6).tolist()
                crops.append((crop, info))
        for j, (crop, info) in enumerate(crops):
            iid = base_id if usage == ALIGNED_CROP else f"{base_id}_f{j}"
            while iid in used_ids:
                iid = f"{iid}_{n}"
            used_ids.add(iid)
            rec = {"id": iid, "source": str(p), "source_sha256": shas[str(p)], "split": split,
                   "crop": f"{Path(CROPS).name}/{iid}.png", "usage": usage}
            save_image(workdir / CROPS / f"{iid}.png", crop)
            if info is not None:
                rec["face"] = info
            if str(p) in gt_map:
                save_image(workdir / GT / f"{iid}.png", _resize(load_image(gt_map[str(p)]), size))
                rec["gt"] = f"{Path(GT).name}/{iid}.png"
            items.append(rec)
        if progress is not None:
            progress("prepare", n + 1, len(paths))

    manifest = {
        "size": size, "aligned": aligned, "auto_schedule": config.auto_schedule, "eval_fraction": config.eval_fraction, "seed": config.seed,
        "data_sha256": data_sha, "data_count": len(paths), "has_gt": bool(gt_map),
        "detector": None if aligned is True else getattr(helper, "detector_name", None),
        "face_template": face_template,
        "counts": {"train": sum(i["split"] == "train" for i in items), "eval": sum(i["split"] == "eval" for i in items)},
        "usage": {u: len({i["source"] for i in items if i["usage"] == u}) for u in (ALIGNED_CROP, PHOTO)},
        "items": items, "skipped": skipped,
    }
    if manifest["counts"]["train"] == 0:
        raise ValueError(f"no training faces out of {len(paths)} images ({len(skipped)} skipped)")
    job["config"] = _job_config(config, aligned, size, manifest["counts"])
    write_json(mpath, manifest)
    write_json(job_path, job)
    return manifest


def _job_config(config: AdaptConfig, aligned: bool | None, size: int, counts: dict) -> dict:
    """The job's configuration as the later stages read it: the fine-tune fitted to the faces (`scale_for_faces`)."""
    fitted = scale_for_faces(config, counts["train"], counts["eval"], size)
    return dataclasses.replace(fitted, aligned=aligned, size=size).to_dict()
