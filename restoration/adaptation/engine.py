"""The adaptation engine: stages over a work dir (Kuai et al., WACV 2025).

    prepare          detect + align faces (or take aligned crops), hold out an eval part     -> prepare/
    generate_targets restorer x0 + diffusion pseudo targets for the training crops (sharded) -> targets/
    finetune         fine-tune the restorer on (crop, pseudo target) pairs, D real = HQ faces -> finetune/
    evaluate         held-out crops: consistency PSNR, sharpness, (PSNR/SSIM with GT), grid  -> eval/
    register         write the adapted model into the zoo with a full model card             -> registered.json

`run_adaptation` runs them all (the CLI); the service's worker calls the same stage functions, with
`generate_targets(workdir, shard, num_shards)` spread over several workers. Every stage reads what it needs from the
work dir (`job.json` holds base, prior, name and the `AdaptConfig`), is safe to re-run and resumes where it stopped:
prepare is skipped when its manifest matches, pseudo targets skip finished images, fine-tuning resumes from its last
checkpoint. Progress callbacks are `progress(stage, done, total)`; `should_cancel()` is checked between batches and
raises `restoration.runtime.Cancelled`.

Work dir layout:

    job.json                    {"base", "prior", "name", "config": AdaptConfig.to_dict(), "created_at"}
    prepare/manifest.json       items [{id, source, source_sha256, split, crop, gt?, face?}], data_sha256, data_count
    prepare/crops/<id>.png      aligned low-quality crops at `size`
    prepare/gt/<id>.png         ground truth crops (only when given; used by evaluate, never for training)
    targets/<id>.png, <id>.x0.png, manifest.shard-<i>-of-<n>.jsonl
    finetune/ckpt/last.pt       resumable training state
    finetune/model.safetensors  EMA weights of the adapted restorer; finetune/result.json
    eval/metrics.json, eval/grid.png
    registered.json             the registered model card
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from restoration.configs import strict_from_dict
from restoration.runtime import Cancelled, CancelFn, ProgressFn, check_cancel, resolve_device
from restoration.training.finetune import FinetuneConfig
from restoration.adaptation.pseudo import PseudoTargetParams, read_manifest, params_fingerprint


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
JOB, PREPARE, TARGETS, FINETUNE, EVAL = "job.json", "prepare", "targets", "finetune", "eval"
#: restorer archs that take one input size only (the base card's input_size): GFPGAN (out_size), CodeFormer (img_size)
FIXED_SIZE_ARCHS = ("gfpgan_v1_4", "codeformer")

__all__ = [
    "AdaptConfig", "Cancelled", "prepare", "generate_targets", "targets_status", "finetune", "evaluate", "register",
    "run_adaptation", "list_images", "apply_prior_defaults", "apply_base_defaults", "default_config", "read_job",
    "QualityGateFailed", "GATE", "prior_naturalness",
]


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class AdaptConfig:
    """Everything the engine needs besides the data and the model names. JSON-serialisable via `to_dict`.

    pseudo: pseudo-target parameters; finetune: fine-tuning parameters (its `device` is overridden by `device`).
    eval_fraction: share of the source images held out for evaluation (never trained on), split by source image.
    aligned: the inputs are already aligned face crops (else faces are detected and aligned).
    size: crop side (None: the base model card's input_size).
    use_prior: False gives the "self-training without the prior" ablation (pseudo target = x0).
    hq_dir: clean high-quality faces for the discriminator's real images (None: the UTKFace training split of
        `restoration.data.faces` when present, else no GAN term); hq_count: how many of them to use at most.
    max_faces: faces kept per source image when detecting (largest first).
    quality_gate: `register` refuses an adapted model that `evaluate` judged worse than the base on the held-out
        images (see `GATE`); False registers it anyway (the verdict is still recorded in the card).
    """

    pseudo: PseudoTargetParams = field(default_factory=PseudoTargetParams)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_fraction: float = 0.1
    seed: int = 0
    aligned: bool = False
    size: int | None = None
    use_prior: bool = True
    hq_dir: str | None = None
    hq_count: int = 1000
    max_faces: int = 4
    device: str = "auto"
    grid_count: int = 8
    quality_gate: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.pseudo, dict):
            self.pseudo = PseudoTargetParams.from_dict(self.pseudo)
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig.from_dict(self.finetune)
        if not 0.0 <= float(self.eval_fraction) < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["pseudo"] = self.pseudo.to_dict()
        d["finetune"] = self.finetune.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "AdaptConfig":
        return strict_from_dict(cls, d, "adaptation")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "AdaptConfig":
        return cls.from_dict(json.loads(s))


def apply_prior_defaults(config: AdaptConfig, prior_card, explicit: Sequence[str] = ()) -> AdaptConfig:
    """Fill start / constrain_until / down_N (and respacing) from the prior card's `extra.pseudo_target_defaults`
    (and `extra.diffusion.respacing`), except the names in `explicit` (given by the user)."""
    extra = getattr(prior_card, "extra", None) or {}
    defaults = dict(extra.get("pseudo_target_defaults") or {})
    resp = (extra.get("diffusion") or {}).get("respacing")
    if resp is not None:
        defaults.setdefault("respacing", str(resp))
    p = config.pseudo.to_dict()
    for k, v in defaults.items():
        if k in p and k not in explicit:
            p[k] = v
    return dataclasses.replace(config, pseudo=PseudoTargetParams.from_dict(p))


def apply_base_defaults(config: AdaptConfig, base_card, explicit: Sequence[str] = ()) -> AdaptConfig:
    """Fill the fine-tuning settings from the base restorer card's `extra.finetune_defaults` (the settings chosen
    for that model with `bench/adaptation.py`), except the names in `explicit` (given by the user). A card without
    them keeps `FinetuneConfig`'s defaults (the paper's)."""
    extra = getattr(base_card, "extra", None) or {}
    defaults = dict(extra.get("finetune_defaults") or {})
    f = config.finetune.to_dict()
    for k, v in defaults.items():
        if k in f and k not in explicit:
            f[k] = v
    return dataclasses.replace(config, finetune=FinetuneConfig.from_dict(f))


def nest_overrides(overrides: dict | None) -> dict:
    """{"finetune.steps": 300, "seed": 1} -> {"finetune": {"steps": 300}, "seed": 1} (nested dicts pass through)."""
    out: dict = {}
    for key, value in (overrides or {}).items():
        parts = str(key).split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ValueError(f"bad override {key!r}")
        if isinstance(value, dict) and isinstance(d.get(parts[-1]), dict):
            d[parts[-1]].update(value)
        else:
            d[parts[-1]] = value
    return out


def default_config(zoo, base: str, prior: str | None, params: dict | None = None, **fields) -> AdaptConfig:
    """The engine configuration for adapting `base` with `prior`, as the CLI, the worker and the benchmark build it:
    `AdaptConfig` defaults, then the prior card's pseudo-target defaults and the base card's fine-tuning defaults,
    then `params` (an `AdaptConfig` dict, nested or with dotted keys such as "finetune.steps") and `fields` (top-level
    fields such as aligned=True), which always win."""
    params = nest_overrides(params)
    params.update({k: v for k, v in fields.items()})
    cfg = AdaptConfig.from_dict(params)
    if cfg.use_prior and prior:
        cfg = apply_prior_defaults(cfg, zoo.get(prior), explicit=list(params.get("pseudo") or {}))
    return apply_base_defaults(cfg, zoo.get(base), explicit=list(params.get("finetune") or {}))


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def _read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_job(workdir: str | Path) -> dict:
    p = Path(workdir) / JOB
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run prepare() first")
    job = _read_json(p)
    job["config"] = AdaptConfig.from_dict(job.get("config"))
    return job


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_images(data_dir: str | Path) -> list[Path]:
    """Image files directly in `data_dir` (sorted by name)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"data folder not found: {d}")
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def _safe_id(stem: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "img"
    return s[:80]


def _load_rgb(path: Path) -> np.ndarray:
    from restoration.faces.imageio import load_image

    return load_image(str(path))


def _save_png(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
    os.replace(tmp, path)


def _resize(arr: np.ndarray, size: int) -> np.ndarray:
    """An aligned crop at the model's size, resized exactly as `restoration.models.io.to_tensor` resizes it when the
    adapted model serves it (so that fine-tuning sees the inputs it will be served)."""
    if arr.shape[:2] == (size, size):
        return arr
    from restoration.models.io import to_tensor, to_uint8

    return to_uint8(to_tensor([arr], size))[0]


def _device(device: str | None, job_cfg: AdaptConfig | None = None):
    return resolve_device(device or (job_cfg.device if job_cfg else None))


def _zoo(zoo):
    if zoo is not None:
        return zoo
    from restoration.models.zoo import Zoo

    return Zoo()


def load_prior(zoo, name: str, device, respacing: str | None = None):
    """A `restoration.diffusion.prior.IDDPMPrior` for the zoo prior `name`; `respacing` (the pseudo-target parameter)
    overrides the sampler respacing of the card's `extra.diffusion`."""
    from restoration.diffusion.prior import IDDPMPrior

    return IDDPMPrior.from_zoo(name, zoo=_zoo(zoo), device=device, respacing=respacing)


def _base_face_template(zoo, base: str | None) -> str:
    """The alignment template of the base restorer's card ('ffhq' when it cannot be read)."""
    from restoration.faces.alignment import template_for_card

    if not base:
        return "ffhq"
    try:
        return template_for_card(_zoo(zoo).get(base))
    except Exception:  # noqa: BLE001 - an unknown base fails later, with its own message
        return "ffhq"


def _is_codeformer(model) -> bool:
    from restoration.models.archs.codeformer import CodeFormer

    return isinstance(model, CodeFormer)


def _base_value_range(zoo, job: dict) -> list[float] | None:
    """The base restorer card's value_range (the range the model works in; the adapted model keeps it), None when the
    base is not in the zoo (`restorer_io.run_restorer` then uses the arch's own `value_range` attribute)."""
    from restoration.models.zoo import ModelNotFound

    try:
        return [float(v) for v in _zoo(zoo).get(job["base"]).value_range]
    except ModelNotFound:
        return None


# ------------------------------------------------------------------------------------------------
# stage 1: prepare
# ------------------------------------------------------------------------------------------------
def prepare(
    workdir: str | Path,
    image_paths: Sequence[str | Path],
    aligned: bool = False,
    size: int = 512,
    helper=None,
    *,
    config: AdaptConfig | None = None,
    base: str | None = None,
    prior: str | None = None,
    name: str | None = None,
    gt_paths: dict | Sequence | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    zoo=None,
) -> dict:
    """Crop the faces of `image_paths` into `workdir/prepare` and split off the held-out eval part.

    aligned=True: each image is one aligned face crop (resized to `size`); else faces are detected and aligned
    with `helper` (a `restoration.faces.helper.FaceHelper(size)`, created when None with the alignment template of the
    `base` model's card, read from `zoo`: the framing the restorer was trained on), at most `config.max_faces` per
    image.
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
    if gt_paths is not None:
        if not aligned:
            raise ValueError("ground truth is only supported for aligned inputs")
        gt_map = ({str(Path(k)): Path(v) for k, v in gt_paths.items()} if isinstance(gt_paths, dict)
                  else {str(p): Path(g) for p, g in zip(paths, gt_paths)})
    else:
        gt_map = {}

    # job.json: what the later stages need
    job_path = workdir / JOB
    job = _read_json(job_path) if job_path.is_file() else {}
    job.update({k: v for k, v in {"base": base, "prior": prior, "name": name}.items() if v is not None})
    job["config"] = dataclasses.replace(config, aligned=bool(aligned), size=size).to_dict()
    job.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))

    # fingerprint of the data (content, not names), order-independent
    if progress is not None:
        progress("prepare", 0, len(paths))
    shas = {str(p): _sha256_file(p) for p in paths}
    data_sha = hashlib.sha256("\n".join(sorted(shas.values())).encode()).hexdigest()
    pdir = workdir / PREPARE
    mpath = pdir / "manifest.json"
    face_template = None
    if not aligned:  # the framing the base model was trained on (faces fill UTKFace crops, not FFHQ ones)
        face_template = getattr(helper, "face_template", None) if helper is not None else \
            _base_face_template(zoo, base or job.get("base"))
    if mpath.is_file():
        old = _read_json(mpath)
        if (old.get("data_sha256") == data_sha and old.get("size") == size and old.get("aligned") == bool(aligned)
                and old.get("eval_fraction") == config.eval_fraction and old.get("seed") == config.seed
                and old.get("has_gt") == bool(gt_map) and old.get("face_template") == face_template):
            _write_json(job_path, job)
            if progress is not None:
                progress("prepare", len(paths), len(paths))
            return old

    # held-out split by source image: a seeded hash order, the first `k` are eval
    order = sorted(paths, key=lambda p: hashlib.sha256(f"{config.seed}/{shas[str(p)]}/{p.name}".encode()).hexdigest())
    k_eval = int(round(config.eval_fraction * len(paths)))
    if config.eval_fraction > 0 and len(paths) >= 2:
        k_eval = min(max(k_eval, 1), len(paths) - 1)
    eval_set = {str(p) for p in order[:k_eval]}

    if not aligned and helper is None:
        from restoration.faces.helper import FaceHelper

        helper = FaceHelper(size, face_template=face_template)
    if not aligned and getattr(helper, "size", size) != size:
        raise ValueError(f"FaceHelper size {helper.size} != size {size}")

    items, skipped, used_ids = [], [], set()
    for n, p in enumerate(paths):
        check_cancel(should_cancel, f"prepare cancelled after {n}/{len(paths)} images")
        base_id = _safe_id(p.stem)
        split = "eval" if str(p) in eval_set else "train"
        try:
            img = _load_rgb(p)
        except Exception as exc:  # undecodable file: record and go on
            skipped.append({"source": str(p), "reason": f"unreadable: {exc}"})
            continue
        if aligned:
            crops = [(_resize(img, size), None)]
        else:
            faces = helper.detect(img)[: max(1, int(config.max_faces))]
            if not faces:
                skipped.append({"source": str(p), "reason": "no face detected"})
            crops = []
            for face in faces:
                crop, affine = helper.align(img, face)
                info = face.to_dict() if hasattr(face, "to_dict") else {}
                info["affine"] = np.asarray(affine, dtype=float).round(6).tolist()
                crops.append((crop, info))
        for j, (crop, info) in enumerate(crops):
            iid = base_id if aligned else f"{base_id}_f{j}"
            while iid in used_ids:
                iid = f"{iid}_{n}"
            used_ids.add(iid)
            rec = {"id": iid, "source": str(p), "source_sha256": shas[str(p)], "split": split,
                   "crop": f"crops/{iid}.png"}
            _save_png(crop, pdir / "crops" / f"{iid}.png")
            if info is not None:
                rec["face"] = info
            if str(p) in gt_map:
                _save_png(_resize(_load_rgb(gt_map[str(p)]), size), pdir / "gt" / f"{iid}.png")
                rec["gt"] = f"gt/{iid}.png"
            items.append(rec)
        if progress is not None:
            progress("prepare", n + 1, len(paths))

    manifest = {
        "size": size, "aligned": bool(aligned), "eval_fraction": config.eval_fraction, "seed": config.seed,
        "data_sha256": data_sha, "data_count": len(paths), "has_gt": bool(gt_map),
        "detector": None if aligned else getattr(helper, "detector_name", None),
        "face_template": face_template,
        "counts": {"train": sum(i["split"] == "train" for i in items), "eval": sum(i["split"] == "eval" for i in items)},
        "items": items, "skipped": skipped,
    }
    if manifest["counts"]["train"] == 0:
        raise ValueError(f"no training faces out of {len(paths)} images ({len(skipped)} skipped)")
    _write_json(mpath, manifest)
    _write_json(job_path, job)
    return manifest


def _manifest(workdir: Path) -> dict:
    p = workdir / PREPARE / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run prepare() first")
    return _read_json(p)


def _items(workdir: Path, split: str) -> list[dict]:
    return [it for it in _manifest(workdir)["items"] if it["split"] == split]


# ------------------------------------------------------------------------------------------------
# stage 2: pseudo targets (shardable)
# ------------------------------------------------------------------------------------------------
COLOR = "color.json"
#: Reference faces read for the clean-face colour statistics (`color_correction`).
COLOR_REFERENCE_COUNT = 256


def color_correction(workdir: str | Path, hq_images: Sequence | None = None, zoo=None) -> dict:
    """The domain white balance of the pseudo targets (`PseudoTargetParams.color_correction`), computed once per job
    and kept in `targets/color.json`: {"strength", "gains" (R, G, B, or None: nothing to correct), "domain",
    "reference_stats" (`color_stats`), "reference"}. The domain's statistics come from its training crops, the
    reference from clean faces: `hq_images` (paths or arrays), else the discriminator's real images (`config.hq_dir`,
    else the UTKFace training split), else the prior card's `extra.face_color_stats` (the faces it was trained on);
    with none of them there is no correction. Deterministic, so every shard computes the same."""
    from restoration.adaptation.pseudo import color_stats, domain_color_gains

    workdir = Path(workdir)
    job = read_job(workdir)
    cfg: AdaptConfig = job["config"]
    path = workdir / TARGETS / COLOR
    strength = float(cfg.pseudo.color_correction)
    if path.is_file():
        rec = _read_json(path)
        if rec.get("strength") == strength:
            return rec
    rec = {"strength": strength, "gains": None, "domain": None, "reference_stats": None, "reference": None}
    if strength > 0:
        if hq_images is None:
            hq_images, source = _hq_images(cfg)
        else:
            source = f"given ({len(hq_images)} images)"
        refs = list(hq_images)[:COLOR_REFERENCE_COUNT]
        if refs:
            rec["reference"] = source
            rec["reference_stats"] = color_stats(im if isinstance(im, np.ndarray) else _load_rgb(Path(im)) for im in refs)
        elif job.get("prior"):
            try:
                fs = (_zoo(zoo).get(job["prior"]).extra or {}).get("face_color_stats") or {}
            except Exception:  # noqa: BLE001 - an unknown prior has no reference; the job fails elsewhere if it matters
                fs = {}
            if fs.get("face") and fs.get("surround"):
                rec["reference"] = f"prior card {job['prior']} (face_color_stats)"
                rec["reference_stats"] = {"face": list(fs["face"]), "surround": list(fs["surround"])}
        if rec["reference_stats"] is not None:
            rec["domain"] = color_stats(_load_rgb(workdir / PREPARE / it["crop"]) for it in _items(workdir, "train"))
            rec["gains"] = domain_color_gains(rec["domain"], rec["reference_stats"], strength)
        else:
            rec["reference"] = "none found: no correction"
    _write_json(path, rec)
    return rec


def _targets_fingerprint(job: dict, gains=None) -> str:
    cfg: AdaptConfig = job["config"]
    extra = f"base={job.get('base')}|prior={job.get('prior')}" + ("" if cfg.use_prior else "|prior=none")
    if gains is not None:
        extra += f"|color={[round(float(v), 4) for v in gains]}"
    return params_fingerprint(cfg.pseudo, extra)


def generate_targets(
    workdir: str | Path,
    shard: int = 0,
    num_shards: int = 1,
    *,
    restorer=None,
    prior=None,
    zoo=None,
    device: str | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    hq_images: Sequence | None = None,
) -> dict:
    """Pseudo targets for shard `shard` of `num_shards` of the training crops, into `workdir/targets`.

    `restorer` / `prior` (loaded modules) default to the zoo models named in job.json; `hq_images`: the clean
    reference faces of `color_correction`. Returns {"shard", "num_shards", "total", "generated", "skipped",
    "seconds", "color_gains"}.
    """
    from restoration.adaptation.pseudo import generate_pseudo_targets

    workdir = Path(workdir)
    job = read_job(workdir)
    cfg: AdaptConfig = job["config"]
    dev = _device(device, cfg)
    if restorer is None:
        restorer = _zoo(zoo).load(job["base"], device=dev)
    if prior is None and cfg.use_prior:
        prior = load_prior(_zoo(zoo), job["prior"], dev, respacing=cfg.pseudo.respacing)
    if not cfg.use_prior:
        prior = None
    inputs = [(it["id"], workdir / PREPARE / it["crop"]) for it in _items(workdir, "train")]
    extra = f"base={job.get('base')}|prior={job.get('prior')}"
    gains = color_correction(workdir, hq_images, zoo)["gains"]
    res = generate_pseudo_targets(inputs, restorer, prior, workdir / TARGETS, cfg.pseudo, shard=(shard, num_shards),
                                  progress=progress, should_cancel=should_cancel, fingerprint_extra=extra,
                                  color_gains=gains)
    out = {"shard": shard, "num_shards": num_shards, "total": res.total, "generated": res.generated,
           "skipped": res.skipped, "seconds": round(res.seconds, 3), "color_gains": gains}
    _write_json(workdir / TARGETS / f"shard-{shard}-of-{num_shards}.json", out)
    return out


def targets_status(workdir: str | Path, zoo=None) -> dict:
    """{"done", "total", "complete", "missing": [ids]} over all shards (for the worker's fan-in)."""
    workdir = Path(workdir)
    job = read_job(workdir)
    ids = [it["id"] for it in _items(workdir, "train")]
    gains = color_correction(workdir, zoo=zoo)["gains"]
    done = read_manifest(workdir / TARGETS, fingerprint=_targets_fingerprint(job, gains)) if (workdir / TARGETS).is_dir() else {}
    missing = [i for i in ids if i not in done]
    return {"done": len(ids) - len(missing), "total": len(ids), "complete": not missing, "missing": missing}


# ------------------------------------------------------------------------------------------------
# stage 3: fine-tuning
# ------------------------------------------------------------------------------------------------
def _hq_images(cfg: AdaptConfig, exclude_sha: set[str] | None = None) -> tuple[list, str]:
    """Clean HQ faces for D (paths) and where they come from."""
    import random

    n = int(cfg.hq_count)
    if cfg.hq_dir:
        files = list_images(cfg.hq_dir)
        if not files:
            raise ValueError(f"no images in hq_dir {cfg.hq_dir}")
        random.Random(cfg.seed).shuffle(files)
        return files[:n], f"{cfg.hq_dir} ({min(n, len(files))} images)"
    try:
        from restoration.data import faces as data_mod

        root = data_mod.default_faces_root()
        names = data_mod.load_split("train")
        random.Random(cfg.seed).shuffle(names)
        files = [root / x for x in names[:n] if (root / x).is_file()]
        if files:
            return files, f"{data_mod.DATA_NAME} train split ({len(files)} images)"
    except (ImportError, FileNotFoundError, AttributeError):
        pass
    return [], "none found: no GAN term"


def finetune(
    workdir: str | Path,
    *,
    restorer=None,
    zoo=None,
    device: str | None = None,
    hq_images: Sequence | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> dict:
    """Fine-tune the base restorer on (training crop, pseudo target) pairs; resumes from `finetune/ckpt`.

    Needs every pseudo target (all shards). `hq_images` (paths or arrays) override the discriminator's real images
    (default: `config.hq_dir`, else the UTKFace training split). Writes `finetune/model.safetensors` (EMA weights)
    and `finetune/result.json`; returns the result dict.
    """
    from safetensors.torch import save_file

    from restoration.training import finetune as ft

    workdir = Path(workdir)
    job = read_job(workdir)
    cfg: AdaptConfig = job["config"]
    fdir = workdir / FINETUNE
    result_path = fdir / "result.json"
    if result_path.is_file() and (fdir / "model.safetensors").is_file():
        res = _read_json(result_path)
        if res.get("steps") == cfg.finetune.steps and res.get("config") == cfg.finetune.to_dict():
            if progress is not None:
                progress("finetune", res["steps"], res["steps"])
            return res
    st = targets_status(workdir, zoo)
    if not st["complete"]:
        raise RuntimeError(f"pseudo targets incomplete: {st['done']}/{st['total']} (run generate_targets for every shard)")
    dev = _device(device, cfg)
    if restorer is None:
        restorer = _zoo(zoo).load(job["base"], device=dev)
    pairs = [(workdir / PREPARE / it["crop"], workdir / TARGETS / f"{it['id']}.png") for it in _items(workdir, "train")]
    if hq_images is None:
        hq_images, hq_source = _hq_images(cfg)
    else:
        hq_source = f"given ({len(hq_images)} images)"
    fcfg = dataclasses.replace(cfg.finetune, device=str(dev))
    extra_result = {}
    if _is_codeformer(restorer):
        # CodeFormer (the paper's second model): encoder + transformer learn the target's codes; the schedule fields
        # of `cfg.finetune` apply, the optimiser / EMA / loss weights are CodeFormer's (restoration.training.finetune_codeformer)
        from restoration.training.finetune_codeformer import CodeFormerFinetuneConfig, finetune_codeformer

        ccfg = CodeFormerFinetuneConfig.from_finetune(fcfg)
        res = finetune_codeformer(restorer, pairs, (), ccfg, fdir / "ckpt", progress=progress,
                                  should_cancel=should_cancel)
        hq_source = "not used (CodeFormer: code cross-entropy + feature loss, no discriminator)"
        extra_result["codeformer_config"] = ccfg.to_dict()
    else:
        res = ft.finetune(restorer, pairs, list(hq_images), fcfg, fdir / "ckpt", progress=progress,
                          should_cancel=should_cancel, value_range=_base_value_range(zoo, job))
    sd = {k: v.detach().to("cpu").contiguous() for k, v in res.ema.state_dict().items()}
    tmp = fdir / f".model.safetensors.tmp{os.getpid()}"
    save_file(sd, str(tmp))
    os.replace(tmp, fdir / "model.safetensors")
    out = {"steps": res.step, "config": cfg.finetune.to_dict(), "losses": res.losses, "hq_source": hq_source,
           "pairs": len(pairs), "resumed_from": res.resumed_from, "seconds": round(res.seconds, 2),
           "history": res.history, "weights": "EMA", **extra_result}
    _write_json(result_path, out)
    return out


# ------------------------------------------------------------------------------------------------
# stage 4: evaluation
# ------------------------------------------------------------------------------------------------
def _metric_fns(down_N: int):
    """(psnr, ssim, sharpness, lowpass_psnr) on float HxWx3 arrays in [0,1] from restoration.metrics.quality."""
    from restoration.metrics import quality as M

    def lowpass_psnr(a, b):  # colour-balance invariant: removing a domain's cast is not lost content
        return float(M.lowpass_psnr(a, b, down_N, match_color=True))

    return (lambda a, b: float(M.psnr(a, b))), (lambda a, b: float(M.ssim(a, b))), \
        (lambda a: float(M.sharpness(a))), lowpass_psnr


def _grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = im
    return out


def _load_adapted(workdir: Path, job: dict, zoo, dev):
    from safetensors.torch import load_file

    from restoration.models.zoo import instantiate

    c = _zoo(zoo).config(job["base"])
    sd = load_file(str(workdir / FINETUNE / "model.safetensors"))
    return instantiate(c["arch"], c["config"], sd, name="adapted").to(dev)


#: The quality gate of `evaluate` (no ground truth): the adapted model is judged worse than the base when, on the
#: held-out crops, one of these means drops below the base's by more than its margin (dB):
#:   consistency_psnr  PSNR of the low-passed output against the low-passed input (area reduction by the pseudo-target
#:                     down_N), after matching the output's channel means to the input's (a removed colour cast is
#:                     not lost content): the content is kept. The margin is wide on purpose: a good adaptation legitimately
#:                     moves the input's colour and noise (bench/adaptation.py, `camera` at 128 px: -3.3 dB for a model
#:                     1.3 dB better against the ground truth), a broken one moves the face (-15.6 dB seen);
#:   naturalness       the prior's one-shot reconstruction PSNR of the output noised to `naturalness_t` of the way
#:                     through its (respaced) schedule, t = 25/250 for the default priors: clean faces are
#:                     reconstructed better than noisy or broken ones.
#: Reported, not gated: target_psnr, the PSNR against the held-out crops' own pseudo targets (made like the training
#: targets, never trained on). With gentle pseudo-target settings those stay close to the base's output x0, so the
#: base scores high on it even where the adapted model is better against the ground truth.
#: Over-smoothing is not caught by these (a blurred face keeps its content and looks clean to the prior).
GATE = {"consistency_psnr": 6.0, "naturalness": 0.5, "naturalness_t": 0.1}


def prior_naturalness(prior, imgs01, t: float = 0.1, seed: int = 0) -> list[float]:
    """Per image: PSNR between an image (Bx3xHxW in [0,1]) and the prior's one-shot x0 prediction from that image
    noised to respaced step `t` (a float in (0, 1): that fraction of the respaced schedule; fixed noise per position
    in the batch, seeded: comparable between models)."""
    import torch

    if isinstance(t, float):
        t = max(1, int(round(t * int(prior.diffusion.num_timesteps))))

    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    tt = torch.full((imgs01.shape[0],), int(t), dtype=torch.long)
    noise = torch.randn(imgs01.shape, generator=g)
    x0 = imgs01.to(prior.device, torch.float32).clamp(0, 1) * 2 - 1
    xt = prior.diffusion.q_sample(x0, tt.to(prior.device), noise=noise.to(prior.device))
    rec = (prior.denoise_x0(xt, tt.to(prior.device)) + 1) / 2
    mse = ((rec.cpu().float() - imgs01.cpu().float().clamp(0, 1)) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return [float(v) for v in (-10.0 * torch.log10(mse))]


def _gate(summary: dict, count: int) -> dict:
    reasons = []
    for key in ("consistency_psnr", "naturalness"):
        if key not in summary.get("base", {}) or key not in summary.get("adapted", {}):
            continue
        b, a = summary["base"][key], summary["adapted"][key]
        if a < b - GATE[key]:
            reasons.append(f"{key} {a:.2f} dB < base {b:.2f} dB - {GATE[key]} dB")
    checked = [k for k in ("consistency_psnr", "naturalness") if k in summary.get("adapted", {})]
    verdict = "worse" if reasons else ("ok" if checked else "unchecked")
    return {"verdict": verdict, "reasons": reasons, "checked": checked, "margins_db": dict(GATE), "count": count}


def evaluate(
    workdir: str | Path,
    *,
    base_model=None,
    adapted_model=None,
    prior=None,
    zoo=None,
    device: str | None = None,
    batch_size: int = 16,
    split: str = "eval",
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> dict:
    """Base vs adapted on the held-out crops (never trained on), with no ground truth needed, and the quality gate.

    Per model (input, base, adapted), means over the held-out crops: `target_psnr` (against the held-out crops'
    pseudo targets, made here exactly like the training targets, with the prior card's settings), `consistency_psnr`
    (low-passed output vs low-passed input, low pass = area reduction by the pseudo-target down_N), `naturalness`
    (`prior_naturalness`), `sharpness` (Laplacian variance); PSNR / SSIM when ground truth was given (never used by
    the gate). `gate` holds the verdict on consistency and naturalness (`GATE`): "ok", "worse" (with reasons) or
    "unchecked" (no held-out crops). Writes `eval/metrics.json` and a before/after grid `eval/grid.png` (columns: input | base | adapted |
    pseudo target [| GT]); returns the metrics.
    """
    import torch

    from restoration.models.io import to_uint8
    from restoration.adaptation.pseudo import generate_pseudo_targets, restore_batch

    workdir = Path(workdir)
    job = read_job(workdir)
    cfg: AdaptConfig = job["config"]
    dev = _device(device, cfg)
    items = _items(workdir, split)
    edir = workdir / EVAL
    if not items:
        out = {"split": split, "count": 0, "note": "no held-out images (eval_fraction 0 or too few images)",
               "gate": {"verdict": "unchecked", "reasons": ["no held-out images to compare on"], "checked": []}}
        _write_json(edir / "metrics.json", out)
        return out
    if base_model is None:
        base_model = _zoo(zoo).load(job["base"], device=dev)
    if adapted_model is None:
        adapted_model = _load_adapted(workdir, job, zoo, dev)
    base_model.eval()
    adapted_model.eval()
    vrange = _base_value_range(zoo, job)  # base and adapted work in the base card's range (GFPGAN: [-1, 1])
    # the judge: the job's prior (also for the self-training ablation), with its card's pseudo-target settings
    pparams, judge_error = None, None
    if prior is None and job.get("prior"):
        try:
            pcard = _zoo(zoo).get(job["prior"])
            pparams = apply_prior_defaults(dataclasses.replace(cfg, use_prior=True), pcard,
                                           explicit=list(cfg.pseudo.to_dict()) if cfg.use_prior else ()).pseudo
            prior = load_prior(_zoo(zoo), job["prior"], dev, respacing=pparams.respacing)
        except Exception as exc:  # no usable prior: the gate checks consistency only
            prior, pparams, judge_error = None, None, str(exc)
    elif prior is not None:
        pparams = cfg.pseudo
    target_dir = edir / "targets"
    targets = {}
    if prior is not None:
        pparams = dataclasses.replace(pparams, save_x0=False)
        generate_pseudo_targets([(it["id"], workdir / PREPARE / it["crop"]) for it in items], base_model, prior,
                                target_dir, pparams, should_cancel=should_cancel,
                                fingerprint_extra=f"eval|base={job.get('base')}|prior={job.get('prior')}",
                                color_gains=color_correction(workdir, zoo=zoo)["gains"])
        targets = {it["id"]: _load_rgb(target_dir / f"{it['id']}.png") for it in items}
    lp_factor = int(pparams.down_N) if pparams is not None else int(cfg.pseudo.down_N)  # the judge's low pass
    psnr, ssim, sharp, lp_psnr = _metric_fns(lp_factor)
    has_gt = all("gt" in it for it in items)
    per_model = {"input": [], "base": [], "adapted": []}
    grid_rows = []
    for b in range(0, len(items), batch_size):
        check_cancel(should_cancel, f"evaluation cancelled after {b}/{len(items)} images")
        chunk = items[b:b + batch_size]
        imgs = [_load_rgb(workdir / PREPARE / it["crop"]) for it in chunk]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(255.0).to(dev)
        outs = {"base": to_uint8(restore_batch(base_model, x, vrange)),
                "adapted": to_uint8(restore_batch(adapted_model, x, vrange))}
        nat = {}
        if prior is not None:
            for key, arrs in (("input", imgs), ("base", outs["base"]), ("adapted", outs["adapted"])):
                t = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div(255.0)
                nat[key] = prior_naturalness(prior, t, GATE["naturalness_t"], seed=cfg.seed + b)
        for k, it in enumerate(chunk):
            inp = imgs[k].astype(np.float64) / 255.0
            gt = _load_rgb(workdir / PREPARE / it["gt"]).astype(np.float64) / 255.0 if has_gt else None
            tg = targets[it["id"]].astype(np.float64) / 255.0 if targets else None
            for key, arr in (("input", imgs[k]), ("base", outs["base"][k]), ("adapted", outs["adapted"][k])):
                o = arr.astype(np.float64) / 255.0
                m = {"sharpness": sharp(o)}
                if key != "input":  # the input against itself would be +inf
                    m["consistency_psnr"] = lp_psnr(o, inp)
                if tg is not None:
                    m["target_psnr"] = psnr(o, tg)
                if nat:
                    m["naturalness"] = nat[key][k]
                if gt is not None:
                    m["psnr"], m["ssim"] = psnr(o, gt), ssim(o, gt)
                per_model[key].append(m)
            if len(grid_rows) < cfg.grid_count:
                row = [imgs[k], outs["base"][k], outs["adapted"][k]]
                if targets:
                    row.append(targets[it["id"]])
                if has_gt:
                    row.append(_load_rgb(workdir / PREPARE / it["gt"]))
                grid_rows.append(row)
        if progress is not None:
            progress("evaluate", min(b + batch_size, len(items)), len(items))
    summary = {key: {m: round(float(np.mean([r[m] for r in rows])), 4) for m in rows[0]} for key, rows in per_model.items()}
    gate = _gate(summary, len(items))
    if prior is None:
        gate["note"] = "no prior to judge with: only consistency was checked" + (
            f" ({judge_error})" if judge_error else "")
    out = {"split": split, "count": len(items), "has_gt": has_gt, "lowpass_down_N": lp_factor,
           "metrics": summary, "gate": gate, "color_correction": color_correction(workdir, zoo=zoo), "grid": f"{EVAL}/grid.png",
           "grid_columns": ["input", "base", "adapted"] + (["pseudo target"] if targets else []) + (["gt"] if has_gt else [])}
    _save_png(_grid(grid_rows), edir / "grid.png")
    _write_json(edir / "metrics.json", out)
    return out


class QualityGateFailed(RuntimeError):
    """`register` refused an adapted model that `evaluate` judged worse than its base."""


# ------------------------------------------------------------------------------------------------
# stage 5: register
# ------------------------------------------------------------------------------------------------
def register(workdir: str | Path, zoo=None, name: str | None = None, overwrite: bool = False, force: bool = False):
    """Register the adapted EMA weights under `name` (default: job.json's name). Returns the ModelCard.

    Raises `QualityGateFailed` when `evaluate` judged the adapted model worse than the base (`GATE`), unless the
    job's `quality_gate` is off or `force`."""
    from safetensors.torch import load_file

    workdir = Path(workdir)
    job = read_job(workdir)
    zoo = _zoo(zoo)
    name = name or job.get("name")
    if not name:
        raise ValueError("no model name given")
    cfg: AdaptConfig = job["config"]
    base_card = zoo.get(job["base"])
    from restoration.faces.alignment import template_for_card
    base_cfg = zoo.config(job["base"])
    man = _manifest(workdir)
    ft_res = _read_json(workdir / FINETUNE / "result.json")
    ev_path = workdir / EVAL / "metrics.json"
    ev = _read_json(ev_path) if ev_path.is_file() else None
    verdict = ((ev or {}).get("gate") or {}).get("verdict")
    if verdict == "worse" and cfg.quality_gate and not force:
        raise QualityGateFailed(
            "not registered: the adapted model is worse than the base on the held-out images ("
            + "; ".join(ev["gate"]["reasons"]) + "); see the grid eval/grid.png; "
            "set quality_gate=false (CLI: --no-quality-gate) to register it anyway")
    prior_card = None
    if cfg.use_prior and job.get("prior"):
        try:
            prior_card = zoo.get(job["prior"])
        except Exception:
            prior_card = None
    extra = {
        "adapted": True,
        "method": "Kuai et al., WACV 2025: diffusion-prior pseudo targets + fine-tuning",
        "base": job["base"], "base_sha256": base_card.sha256,
        "prior": job.get("prior") if cfg.use_prior else None,
        "prior_sha256": prior_card.sha256 if prior_card is not None else None,
        "data_sha256": man["data_sha256"], "data_count": man["data_count"],
        "faces": man["counts"], "aligned": man["aligned"], "detector": man.get("detector"),
        "face_template": man.get("face_template") or template_for_card(base_card),
        "config": cfg.to_dict(),
        "losses": ft_res.get("losses"), "hq_source": ft_res.get("hq_source"), "finetune_steps": ft_res.get("steps"),
        "evaluation": ev,
    }
    card = zoo.register(
        name, base_cfg["arch"], base_cfg["config"], load_file(str(workdir / FINETUNE / "model.safetensors")),
        kind="restorer", input_size=man["size"], value_range=base_card.value_range, overwrite=overwrite,
        license=base_card.license,
        provenance=f"FaceAdapt adaptation of {job['base']} on {man['data_count']} customer images "
                   f"(data sha256 {man['data_sha256'][:12]}), pseudo targets from "
                   f"{job.get('prior') if cfg.use_prior else 'the base model itself (no prior)'}",
        description=f"{job['base']} adapted to a new image domain ({man['counts']['train']} training faces)",
        extra=extra,
    )
    _write_json(workdir / "registered.json", card.to_json())
    return card


# ------------------------------------------------------------------------------------------------
# everything
# ------------------------------------------------------------------------------------------------
def run_adaptation(
    data_dir: str | Path,
    base: str | None = None,
    prior: str | None = None,
    name: str | None = None,
    config: AdaptConfig | dict | None = None,
    workdir: str | Path | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    *,
    zoo=None,
    helper=None,
    gt_dir: str | Path | None = None,
    hq_images: Sequence | None = None,
    register_model: bool = True,
    overwrite: bool = False,
) -> dict:
    """All stages: prepare -> generate_targets -> finetune -> evaluate -> register. Resumable (same workdir).

    `base` / `prior` default to the settings' default restorer / prior. `gt_dir`: ground truth with the same file
    names as `data_dir` (aligned inputs only; evaluation only). Returns a summary dict with the stage results.
    """
    from restoration.settings import get_settings

    t0 = time.perf_counter()
    settings = get_settings()
    zoo = _zoo(zoo)
    cfg = AdaptConfig.from_dict(config) if isinstance(config, dict) else (config or AdaptConfig())
    base = base or settings.default_restorer
    prior = prior or settings.default_prior
    if name is None:
        name = f"{base}-adapted-{datetime.now(timezone.utc).strftime('%Y%m%d%H%M%S')}"
    workdir = Path(workdir) if workdir is not None else settings.home_dir / "adapt" / name
    base_card = zoo.get(base)
    if base_card.kind != "restorer":
        raise ValueError(f"{base} is a {base_card.kind}, not a restorer")
    if cfg.use_prior:
        pcard = zoo.get(prior)
        if pcard.kind != "prior":
            raise ValueError(f"{prior} is a {pcard.kind}, not a prior")
    if register_model and not overwrite:
        from restoration.models.zoo import ModelNotFound

        try:
            zoo.get(name)
        except ModelNotFound:
            pass
        else:
            raise ValueError(f"a model named {name!r} already exists in the zoo; choose another name or overwrite")
    size = int(cfg.size or base_card.input_size)
    if base_card.arch in FIXED_SIZE_ARCHS and size != int(base_card.input_size):
        raise ValueError(f"{base} ({base_card.arch}) takes {base_card.input_size}x{base_card.input_size} faces only, "
                         f"not {size}x{size}: leave size unset")
    images = list_images(data_dir)
    gt = None
    if gt_dir is not None:
        gt = {str(p): Path(gt_dir) / p.name for p in images if (Path(gt_dir) / p.name).is_file()}
    timings = {}

    def timed(stage, fn):
        t = time.perf_counter()
        r = fn()
        timings[stage] = round(time.perf_counter() - t, 2)
        return r

    man = timed("prepare", lambda: prepare(workdir, images, aligned=cfg.aligned, size=size, helper=helper, config=cfg,
                                           base=base, prior=prior, name=name, gt_paths=gt, progress=progress,
                                           should_cancel=should_cancel, zoo=zoo))
    tg = timed("pseudo_targets", lambda: generate_targets(workdir, 0, 1, zoo=zoo, progress=progress,
                                                          should_cancel=should_cancel, hq_images=hq_images))
    ft_res = timed("finetune", lambda: finetune(workdir, zoo=zoo, hq_images=hq_images, progress=progress,
                                                should_cancel=should_cancel))
    ev = timed("evaluate", lambda: evaluate(workdir, zoo=zoo, progress=progress, should_cancel=should_cancel))
    card, refused = None, None
    if register_model:
        check_cancel(should_cancel, "cancelled before registering")
        try:
            card = timed("register", lambda: register(workdir, zoo=zoo, name=name, overwrite=overwrite))
        except QualityGateFailed as exc:
            refused = str(exc)
        if progress is not None:
            progress("register", 1, 1)
    return {
        "name": name if card is not None else None, "refused": refused, "gate": ev.get("gate"),
        "workdir": str(workdir), "base": base,
        "prior": prior if cfg.use_prior else None, "faces": man["counts"], "skipped_images": len(man["skipped"]),
        "pseudo_targets": tg, "finetune": {k: ft_res[k] for k in ("steps", "losses", "hq_source", "seconds", "resumed_from")},
        "evaluation": ev, "card": card.to_json() if card is not None else None, "timings": timings,
        "seconds": round(time.perf_counter() - t0, 2),
    }
