"""The adaptation stage contract (`restoration.adaptation.stages`), the checks every job passes first
(`restoration.adaptation.checks`) and faces detected once (`prepare` from stored detections). Tiny models, 64x64 faces
(the fixtures of test_adapt.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from restoration.adaptation import stages
from restoration.adaptation.checks import check_cards, check_job
from restoration.adaptation.config import AdaptConfig
from restoration.adaptation.prepare import EXACT_LANDMARKS, face_record, faces_from_records, prepare
from restoration.faces.helper import FaceHelper
from restoration.faces.imageio import load_image
from restoration.models.zoo import ModelCard, ModelNotFound
from test_adapt import _config, faces, zoo  # noqa: F401  (fixtures)


# ------------------------------------------------------------------------------------------------ the stage list
def test_stage_list():
    """One list, in the worker's order, with the job statuses and progress labels the API and the CLI show."""
    assert [(s.name, s.shardable, s.status, s.label) for s in stages.STAGES] == [
        ("prepare", False, "preparing", "prepare"),
        ("targets", True, "generating_targets", "pseudo_targets"),
        ("finetune", False, "finetuning", "finetune"),
        ("evaluate", False, "evaluating", "evaluate"),
        ("register", False, "evaluating", "register"),
    ]
    assert stages.get_stage("targets").shards(3) == range(3) and stages.get_stage("finetune").shards(3) == range(1)
    with pytest.raises(ValueError, match="unknown stage 'bogus'"):
        stages.get_stage("bogus")


def test_stage_results_rebuild_a_work_dir(tmp_path, faces, zoo):  # noqa: F811
    """Every stage names the files it wrote (relative to the work dir) and a JSON-able summary. A fresh work dir that
    holds only the files the earlier stages named runs the next stage (a worker on another host), shard by shard, and
    gives exactly the weights and figures of `run_adaptation` in one work dir."""
    hq = sorted((faces / "gt").glob("*.png"))
    cfg = _config()
    images = sorted((faces / "lq").glob("*.png"))
    inputs = stages.PrepareInputs(images, cfg, "tiny-restorer", "tiny-prior", "contract", 64)
    named: dict[str, Path] = {}
    results = {}
    for step in stages.STAGES:
        for shard in step.shards(2):
            wd = tmp_path / f"{step.name}-{shard}"
            for rel, src in named.items():
                (wd / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, wd / rel)
            ctx = stages.StageContext(wd, zoo, num_shards=2, hq_images=hq, inputs=inputs, name="contract-a")
            res = step.run(ctx, shard)
            assert res.files and all(not Path(f).is_absolute() and (wd / f).is_file() for f in res.files), res.files
            json.dumps(res.summary)
            named.update({f: wd / f for f in res.files})
            results[(step.name, shard)] = res
    assert sorted(n for n in named if n.startswith("targets/manifest")) == [
        "targets/manifest.shard-0-of-2.jsonl", "targets/manifest.shard-1-of-2.jsonl"]
    assert {"job.json", "prepare/manifest.json", "targets/color.json", "finetune/model.safetensors",
            "finetune/result.json", "eval/metrics.json", "eval/grid.png", "registered.json"} <= set(named)
    assert results[("prepare", 0)].summary == {"faces": {"train": 4, "eval": 2}, "skipped": [], "size": 64,
                                               "usage": {"aligned crop": 6, "photo": 0}}
    assert results[("register", 0)].card.name == "contract-a"
    assert set(results[("targets", 1)].summary) == {"shard", "num_shards", "total", "generated", "skipped", "seconds",
                                                    "color_gains"}

    one = tmp_path / "one"
    ref = stages.run_adaptation(faces / "lq", base="tiny-restorer", prior="tiny-prior", name="contract-b", config=cfg,
                                workdir=one, zoo=zoo, hq_images=hq)
    assert (one / "finetune" / "model.safetensors").read_bytes() == named["finetune/model.safetensors"].read_bytes()
    assert ref["evaluation"]["metrics"] == results[("evaluate", 0)].metrics["metrics"]
    assert (one / "eval" / "grid.png").read_bytes() == named["eval/grid.png"].read_bytes()
    zoo.delete("contract-a")
    zoo.delete("contract-b")


# ------------------------------------------------------------------------------------------------ checks
def test_check_job(zoo):  # noqa: F811
    """The refusals the CLI and the API share, with the CLI's messages, in the order base, prior, name, size."""
    cfg = _config()
    assert check_job(zoo, "tiny-restorer", "tiny-prior", cfg, name="a-new-name") == 64
    with pytest.raises(ModelNotFound):
        check_job(zoo, "no-such-model", "tiny-prior", cfg)
    with pytest.raises(ValueError, match="^tiny-prior is a prior, not a restorer$"):
        check_job(zoo, "tiny-prior", "tiny-prior", cfg, name="tiny-restorer")
    with pytest.raises(ValueError, match="^tiny-restorer is a restorer, not a prior$"):
        check_job(zoo, "tiny-restorer", "tiny-restorer", cfg)
    assert check_job(zoo, "tiny-restorer", "tiny-restorer", _config(use_prior=False, size=32)) == 32
    with pytest.raises(ValueError, match="a model named 'tiny-restorer' already exists in the zoo"):
        check_job(zoo, "tiny-restorer", "tiny-prior", cfg, name="tiny-restorer")
    assert check_job(zoo, "tiny-restorer", "tiny-prior", cfg, name="tiny-restorer", overwrite=True) == 64
    # a fixed-size base (GFPGAN, CodeFormer) takes its own input size only
    cf = ModelCard(name="cf", arch="codeformer", kind="restorer", input_size=64, value_range=[-1, 1])
    prior = zoo.get("tiny-prior")
    assert check_cards(cf, prior, cfg) == 64
    with pytest.raises(ValueError, match=r"^cf \(codeformer\) takes 64x64 faces only, not 128x128: leave size unset$"):
        check_cards(cf, prior, _config(size=128))
    with pytest.raises(ValueError, match="not a prior"):
        check_cards(cf, cf, cfg)


# ------------------------------------------------------------------------------------------------ faces detected once
class _NoDetection(FaceHelper):
    def detect(self, img, only_center_face=False):
        raise AssertionError("detected again")


def test_prepare_from_stored_detections(tmp_path, shared_dir, facexlib_root):
    """Faces detected once: `prepare` given the records stored at upload (`face_record`, through JSON as the database
    keeps them) aligns from them without detecting, to byte-identical crops and the same manifest as detecting again;
    records without the exact landmarks (`Face.to_dict()` alone) are detected again."""
    src = [shared_dir / "data" / "realworld" / "whole" / n for n in ("01.jpg", "04.jpg", "05.jpg")]
    src.append(sorted((shared_dir / "data" / "faces-utk200").iterdir())[10])
    kw = dict(aligned=False, size=64, config=AdaptConfig(eval_fraction=0.25, max_faces=3), base="b", prior="p",
              name="n")
    helper = FaceHelper(64, detector="retinaface", model_root=facexlib_root, face_template="utk200")
    found = [helper.detect(load_image(p)) for p in src]
    stored = json.loads(json.dumps([[face_record(f) for f in faces_] for faces_ in found]))
    assert all(len(r) >= 1 for r in stored) and len(stored[0]) == 4  # 01.jpg: four faces, max_faces keeps three

    detected = prepare(tmp_path / "detected", src, helper=helper, **kw)
    no_detection = _NoDetection(64, detector="retinaface", model_root=facexlib_root, face_template="utk200")
    given = prepare(tmp_path / "given", src, helper=no_detection, detections=stored, **kw)
    assert given == detected and detected["counts"]["train"] + detected["counts"]["eval"] == 6
    for it in detected["items"]:
        a = (tmp_path / "detected" / "prepare" / it["crop"]).read_bytes()
        assert a == (tmp_path / "given" / "prepare" / it["crop"]).read_bytes(), it["id"]
    # keyed by path works too; the rounded records of Face.to_dict() are not enough: those images are detected again
    legacy = [[{k: v for k, v in r.items() if k != EXACT_LANDMARKS} for r in recs] for recs in stored]
    assert faces_from_records(legacy[0]) is None and faces_from_records([]) is None
    with pytest.raises(AssertionError, match="detected again"):
        prepare(tmp_path / "legacy", src, helper=no_detection, detections=dict(zip(map(str, src), legacy)), **kw)
    again = prepare(tmp_path / "legacy2", src, helper=helper, detections=dict(zip(map(str, src), legacy)), **kw)
    assert again == detected
