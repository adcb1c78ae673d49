"""The work-dir layout of an adaptation: every file name in one place, and reading job.json and the manifest.

    inputs/                     the source images a service job fetched from storage (the CLI reads its folder)
    zoo/                        a service job's zoo: its base restorer and prior, then the adapted model
    job.json                    {"base", "prior", "name", "config": AdaptConfig.to_dict(), "created_at"}
    prepare/manifest.json       items [{id, source, source_sha256, split, crop, gt?, face?}], data_sha256, data_count
    prepare/crops/<id>.png      aligned low-quality crops at `size`
    prepare/gt/<id>.png         ground truth crops (only when given; used by evaluate, never for training)
    targets/<id>.png, <id>.x0.png, manifest.shard-<i>-of-<n>.jsonl, shard-<i>-of-<n>.json, color.json
    finetune/ckpt/last.pt       resumable training state
    finetune/model.safetensors  EMA weights of the adapted restorer; finetune/result.json
    eval/metrics.json, eval/grid.png, eval/targets/ (the held-out crops' pseudo targets)
    registered.json             the registered model card

Paths given as strings are relative to the work dir (what a stage result names, what the worker uploads).
"""
from __future__ import annotations

from pathlib import Path

from restoration.adaptation.config import AdaptConfig
from restoration.adaptation.files import read_json
from restoration.adaptation.pseudo import manifest_name

__all__ = [
    "INPUTS", "ZOO", "JOB", "PREPARE", "MANIFEST", "CROPS", "GT", "TARGETS", "COLOR", "FINETUNE", "CHECKPOINTS",
    "MODEL", "FINETUNE_RESULT", "EVAL", "EVAL_TARGETS", "METRICS", "GRID", "REGISTERED", "shard_manifest",
    "shard_summary", "read_job", "read_prepare_manifest", "items", "prepared_file",
]

INPUTS = "inputs"
ZOO = "zoo"
JOB = "job.json"
PREPARE = "prepare"
MANIFEST = f"{PREPARE}/manifest.json"
CROPS = f"{PREPARE}/crops"
GT = f"{PREPARE}/gt"
TARGETS = "targets"
COLOR = f"{TARGETS}/color.json"
FINETUNE = "finetune"
CHECKPOINTS = f"{FINETUNE}/ckpt"
MODEL = f"{FINETUNE}/model.safetensors"
FINETUNE_RESULT = f"{FINETUNE}/result.json"
EVAL = "eval"
EVAL_TARGETS = f"{EVAL}/targets"
METRICS = f"{EVAL}/metrics.json"
GRID = f"{EVAL}/grid.png"
REGISTERED = "registered.json"


def shard_manifest(shard: int, num_shards: int) -> str:
    """The pseudo-target manifest of one shard (`restoration.adaptation.pseudo.manifest_name`)."""
    return f"{TARGETS}/{manifest_name((shard, num_shards))}"


def shard_summary(shard: int, num_shards: int) -> str:
    """What `generate_targets` returned for one shard."""
    return f"{TARGETS}/shard-{shard}-of-{num_shards}.json"


def read_job(workdir: str | Path) -> dict:
    """job.json, with its "config" as an `AdaptConfig`."""
    p = Path(workdir) / JOB
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run prepare() first")
    job = read_json(p)
    job["config"] = AdaptConfig.from_dict(job.get("config"))
    return job


def read_prepare_manifest(workdir: str | Path) -> dict:
    """prepare/manifest.json."""
    p = Path(workdir) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run prepare() first")
    return read_json(p)


def items(workdir: str | Path, split: str) -> list[dict]:
    """The manifest's items of one split ("train" or "eval")."""
    return [it for it in read_prepare_manifest(workdir)["items"] if it["split"] == split]


def prepared_file(workdir: str | Path, item: dict, key: str = "crop") -> Path:
    """The crop (or, key="gt", the ground truth) of a manifest item."""
    return Path(workdir) / PREPARE / item[key]
