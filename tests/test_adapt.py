"""Adaptation engine: pseudo targets (resumable, shardable), fine-tuning (exact resume after SIGKILL), run_adaptation
(registers a zoo model), cancellation, config round trip, CLI. Tiny models and a handful of 64x64 faces."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from restoration.adaptation import stages, tune
from restoration.adaptation.card import register
from restoration.adaptation.config import AdaptConfig, default_config
from restoration.adaptation.evaluate import evaluate
from restoration.adaptation.gate import QualityGateFailed
from restoration.adaptation.prepare import prepare
from restoration.adaptation.stages import run_adaptation
from restoration.adaptation.targets import generate_targets, targets_status
from restoration.runtime import Cancelled
from restoration.training.finetune import CKPT_NAME, FinetuneConfig, finetune
from restoration.training.state import load as load_state
from restoration.adaptation.pseudo import PseudoTargetParams, generate_pseudo_targets, read_manifest
from restoration.models.zoo import Zoo

REPO = Path(__file__).resolve().parents[1]
N_IMAGES = 6

TINY_SWINIR = dict(img_size=8, patch_size=1, in_chans=3, embed_dim=16, depths=[1], num_heads=[2], window_size=8,
                   mlp_ratio=2, sf=8, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv",
                   unshuffle=True, unshuffle_scale=8)
TINY_UNET = dict(image_size=32, in_channels=3, model_channels=32, out_channels=6, attention_resolutions=[2],
                 dropout=0, channel_mult=[1, 1], num_res_blocks=1, conv_resample=True, dims=2, use_fp16=False,
                 num_head_channels=32, use_scale_shift_norm=True, resblock_updown=False, use_new_attention_order=False)
# few diffusion steps so that the tests stay fast: respaced 10 steps, start 4, constrain until 2; the prior works at
# 32x32 (Prior resizes the 64x64 crops to its size and back)
FAST_PSEUDO = dict(start=4, respacing="10", constrain_until=2, down_N=8, schedule="ancestral", fast_steps=3, batch_size=4)


# ------------------------------------------------------------------------------------------------ fixtures
def _tiny_restorer(seed: int = 0):
    from restoration.models.archs import build

    torch.manual_seed(seed)
    return build("swinir_face", TINY_SWINIR).eval()


def _tiny_unet(seed: int = 1):
    from restoration.models.archs import build

    torch.manual_seed(seed)
    return build("iddpm_unet", TINY_UNET).eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    z = Zoo(root=tmp_path_factory.mktemp("zoo"), builtin_dir=None)
    z.register("tiny-restorer", "swinir_face", TINY_SWINIR, _tiny_restorer().state_dict(), kind="restorer",
               input_size=64, value_range=(0, 1), license="test", random_init=True)
    z.register("tiny-prior", "iddpm_unet", TINY_UNET, _tiny_unet().state_dict(), kind="prior", input_size=32,
               value_range=(-1, 1), license="test", random_init=True,
               extra={"diffusion": {"steps": 1000, "noise_schedule": "linear", "learn_sigma": True, "respacing": "10"},
                      "pseudo_target_defaults": {"start": 4, "constrain_until": 2, "down_N": 4}})
    return z


@pytest.fixture(scope="module")
def prior(zoo):
    from restoration.adaptation.loaders import load_prior

    return load_prior(zoo, "tiny-prior", torch.device("cpu"), respacing="10")


def _degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from PIL import ImageFilter

    im = Image.fromarray(img).filter(ImageFilter.GaussianBlur(1.2))
    arr = np.asarray(im).astype(np.float32) + rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=30)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@pytest.fixture(scope="module")
def faces(tmp_path_factory, shared_dir):
    """N_IMAGES low-quality 64x64 faces (lq/) and their ground truth (gt/), same file names."""
    root = shared_dir / "data" / "faces-utk200"
    names = sorted(p.name for p in root.iterdir())[:N_IMAGES]
    d = tmp_path_factory.mktemp("faces")
    (d / "lq").mkdir()
    (d / "gt").mkdir()
    rng = np.random.default_rng(0)
    for i, n in enumerate(names):
        hq = np.asarray(Image.open(root / n).convert("RGB").resize((64, 64), Image.BICUBIC))
        Image.fromarray(hq).save(d / "gt" / f"face{i}.png")
        Image.fromarray(_degrade(hq, rng)).save(d / "lq" / f"face{i}.png")
    return d


def _inputs(faces):
    return [(p.stem, p) for p in sorted((faces / "lq").iterdir())]


def _pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


# ------------------------------------------------------------------------------------------------ pseudo targets
def test_pseudo_targets_resumable_and_sharded(tmp_path, faces, prior):
    restorer = _tiny_restorer()
    params = PseudoTargetParams(**FAST_PSEUDO, seed=7)
    inputs = _inputs(faces)
    full = tmp_path / "full"
    calls = []

    # cancelled after the first batch: finished images stay recorded
    with pytest.raises(Cancelled):
        generate_pseudo_targets(inputs, restorer, prior, full, params,
                                progress=lambda s, d, t: calls.append((s, d, t)), should_cancel=lambda: len(calls) >= 2)
    assert len(read_manifest(full)) == params.batch_size
    r = generate_pseudo_targets(inputs, restorer, prior, full, params)
    assert (r.generated, r.skipped, r.total) == (N_IMAGES - params.batch_size, params.batch_size, N_IMAGES)
    r = generate_pseudo_targets(inputs, restorer, prior, full, params)  # everything done: skipped
    assert (r.generated, r.skipped) == (0, N_IMAGES)
    assert calls[0] == ("pseudo_targets", 0, N_IMAGES)

    # 2 shards, another batch size: the same pixels
    sharded = tmp_path / "sharded"
    p2 = dataclasses.replace(params, batch_size=2)
    for i in range(2):
        generate_pseudo_targets(inputs, restorer, prior, sharded, p2, shard=(i, 2))
    a, b = _pngs(full), _pngs(sharded)
    assert sorted(a) == sorted(b) and len(a) == 2 * N_IMAGES  # targets + x0
    worst = max(int(np.abs(a[k].astype(int) - b[k].astype(int)).max()) for k in a)
    assert worst == 0, f"sharded/batched results differ from unsharded by up to {worst}/255"
    # the prior changed the images (pseudo target != x0), another seed changes them again
    assert any(not np.array_equal(a[f"{i}.png"], a[f"{i}.x0.png"]) for i, _ in inputs)
    other = tmp_path / "other"
    generate_pseudo_targets(inputs[:1], restorer, prior, other, dataclasses.replace(params, seed=8))
    assert not np.array_equal(_pngs(other)[f"{inputs[0][0]}.png"], a[f"{inputs[0][0]}.png"])
    # a torn manifest line (killed mid-write) is ignored; changed parameters do not reuse old results
    with open(next(full.glob("manifest.shard-*.jsonl")), "a") as fh:
        fh.write('{"id": "face0", "targ')
    assert len(read_manifest(full)) == N_IMAGES
    r = generate_pseudo_targets(inputs[:2], restorer, prior, full, dataclasses.replace(params, down_N=4))
    assert r.generated == 2


# ------------------------------------------------------------------------------------------------ fine-tuning
FT_CHILD = textwrap.dedent("""
    import sys, time, torch, numpy as np
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_adapt import _ft_setup
    from restoration.training.finetune import finetune
    model, pairs, hq, cfg = _ft_setup()
    def progress(stage, step, total):
        print("step", step, flush=True)
        if step >= {slow_after}:
            time.sleep(30)  # the parent kills us here
    finetune(model, pairs, hq, cfg, {ckpt!r}, progress=progress)
""")


def _ft_setup():
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(7)]
    pairs = [(imgs[i], imgs[i + 1]) for i in range(4)]
    hq = imgs[4:]
    cfg = FinetuneConfig(steps=5, batch_size=2, grad_accum=2, ckpt_every=2, d_channels=8, log_every=1, seed=11,
                         ema_decay=0.9, lr=1e-3, lr_min=1e-4)
    return _tiny_restorer(seed=5), pairs, hq, cfg


def test_finetune_resume_after_sigkill(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # reference: uninterrupted
        model, pairs, hq, cfg = _ft_setup()
        ref = finetune(model, pairs, hq, cfg, tmp_path / "ref")
        assert ref.step == 5 and ref.resumed_from == 0

        # killed (SIGKILL) after the first checkpoint, then resumed in this process
        ck = tmp_path / "killed"
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        code = FT_CHILD.format(tests=str(REPO / "tests"), slow_after=3, ckpt=str(ck))
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=str(REPO))
        try:
            for line in proc.stdout:
                if line.strip() == "step 3":
                    break
            else:
                pytest.fail("child ended early: " + proc.stderr.read())
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        assert load_state(ck / CKPT_NAME)["step"] == 2

        model, pairs, hq, cfg = _ft_setup()
        seen = []
        res = finetune(model, pairs, hq, cfg, ck, progress=lambda s, d, t: seen.append(d))
        assert res.resumed_from == 2 and res.step == 5 and seen[0] == 2
        for a, b in ((ref.model, res.model), (ref.ema, res.ema)):
            for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
                assert torch.equal(va, vb), f"{k} differs after resume"
        da, db = load_state(tmp_path / "ref" / CKPT_NAME), load_state(ck / CKPT_NAME)
        for k, v in da["net_d"].items():
            assert torch.equal(v, db["net_d"][k]), f"D {k} differs after resume"
        assert da["history"] == db["history"]
        assert res.losses["gan"] == 0.1 and res.losses["l1"] == 1.0
    finally:
        torch.set_num_threads(threads)


def test_finetune_cancel_saves_checkpoint(tmp_path):
    model, pairs, hq, cfg = _ft_setup()
    cfg = dataclasses.replace(cfg, gan=0.0)
    steps = []
    with pytest.raises(Cancelled):
        finetune(model, pairs, [], cfg, tmp_path, progress=lambda s, d, t: steps.append(d),
                 should_cancel=lambda: len(steps) >= 2)
    assert load_state(tmp_path / CKPT_NAME)["step"] == 1
    res = finetune(_tiny_restorer(seed=5), pairs, [], dataclasses.replace(cfg, steps=2), tmp_path)
    assert res.resumed_from == 1 and res.step == 2 and res.losses["gan"] == 0.0


# ------------------------------------------------------------------------------------------------ engine
def _config(**kw) -> AdaptConfig:
    ft = FinetuneConfig(steps=2, batch_size=2, ckpt_every=1, d_channels=8, log_every=1)
    # random tiny models: the quality gate's verdict is noise, so these tests register regardless (the gate has its
    # own tests below)
    kw.setdefault("quality_gate", False)
    kw.setdefault("auto_schedule", False)  # the schedule as given (fitting it to 6 faces is tests/test_small_sets.py's)
    return AdaptConfig(pseudo=PseudoTargetParams(**FAST_PSEUDO), finetune=ft, eval_fraction=0.34, aligned=True,
                       device="cpu", **kw)


def test_config_json_roundtrip():
    cfg = _config(hq_dir="/x")
    d = json.loads(json.dumps(cfg.to_dict()))
    assert AdaptConfig.from_dict(d) == cfg
    assert AdaptConfig.from_json(cfg.to_json()).finetune.betas == (0.9, 0.99)
    with pytest.raises(ValueError, match="unknown"):
        AdaptConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError):
        PseudoTargetParams(schedule="euler")


def test_adapted_model_restores_at_its_base_serve_size(zoo):
    """A base trained at two sizes (serve_size) passes it on when adapted at its input size, not at another size."""
    from dataclasses import replace

    from restoration.adaptation import adapted_serve_size

    base = zoo.get("tiny-restorer")
    assert adapted_serve_size(base, 64) is None  # no serve_size: restored at the size it is adapted at
    two = replace(base, serve_size=128)
    assert adapted_serve_size(two, 64) == 128 and adapted_serve_size(two, 96) is None


def test_run_adaptation_registers_model(tmp_path, faces, zoo):
    stages = set()
    res = run_adaptation(faces / "lq", base="tiny-restorer", prior="tiny-prior", name="tiny-adapted",
                         config=_config(), workdir=tmp_path / "work", zoo=zoo, gt_dir=faces / "gt",
                         hq_images=sorted((faces / "gt").glob("*.png")), progress=lambda s, d, t: stages.add(s))
    assert stages >= {"prepare", "pseudo_targets", "finetune", "evaluate", "register"}
    assert res["faces"] == {"train": 4, "eval": 2}
    card = zoo.get("tiny-adapted")
    ex = card.extra
    assert card.kind == "restorer" and card.input_size == 64 and card.serve_size is None and card.restore_size == 64
    assert ex["base"] == "tiny-restorer" and ex["prior"] == "tiny-prior" and ex["data_count"] == N_IMAGES
    assert len(ex["data_sha256"]) == 64 and ex["config"]["pseudo"]["start"] == 4
    ev = ex["evaluation"]["metrics"]
    for row in ("base", "adapted"):
        assert set(ev[row]) == {"consistency_psnr", "target_psnr", "naturalness", "sharpness", "psnr", "ssim"}
    assert set(ev["input"]) == {"sharpness", "target_psnr", "naturalness", "psnr", "ssim"}
    gate = ex["evaluation"]["gate"]
    assert gate["verdict"] in ("ok", "worse") and set(gate["checked"]) == {"consistency_psnr", "naturalness"}
    assert res["gate"] == gate and res["refused"] is None
    assert ex["evaluation"]["grid_columns"] == ["input", "base", "adapted", "pseudo target", "gt"]
    grid = np.asarray(Image.open(tmp_path / "work" / "eval" / "grid.png"))
    assert grid.shape[1] == 5 * (64 + 2) + 2  # five 64 px columns with 2 px gaps
    adapted = zoo.load("tiny-adapted")
    base = zoo.load("tiny-restorer")
    assert any(not torch.equal(a, b) for a, b in zip(adapted.state_dict().values(), base.state_dict().values()))
    assert targets_status(tmp_path / "work")["complete"]
    # eval images never became training pairs
    man = json.loads((tmp_path / "work" / "prepare" / "manifest.json").read_text())
    eval_ids = {i["id"] for i in man["items"] if i["split"] == "eval"}
    assert eval_ids and not eval_ids & set(read_manifest(tmp_path / "work" / "targets"))


def test_run_adaptation_cancel_and_resume(tmp_path, faces, zoo):
    state = {"ft": 0}

    def progress(stage, done, total):
        if stage == "finetune":
            state["ft"] = done

    kw = dict(base="tiny-restorer", prior="tiny-prior", name="tiny-resumed", workdir=tmp_path / "w", zoo=zoo,
              hq_images=sorted((faces / "gt").glob("*.png")))
    cfg = _config(use_prior=False)  # self-training ablation: cheap, and exercises prior=None
    with pytest.raises(Cancelled):
        run_adaptation(faces / "lq", config=cfg, progress=progress, should_cancel=lambda: state["ft"] >= 1, **kw)
    assert load_state(tmp_path / "w" / "finetune" / "ckpt" / CKPT_NAME)["step"] == 1
    with pytest.raises(Exception):
        zoo.get("tiny-resumed")
    res = run_adaptation(faces / "lq", config=cfg, **kw)
    assert res["finetune"]["resumed_from"] == 1 and res["pseudo_targets"]["generated"] == 0
    assert zoo.get("tiny-resumed").extra["prior"] is None


def test_cli_adapt(tmp_path, faces, zoo, monkeypatch):
    from typer.testing import CliRunner

    from cli import app
    from restoration.settings import get_settings

    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FACEADAPT_MODELS_DIR", str(zoo.root))
    get_settings.cache_clear()
    try:
        r = CliRunner().invoke(app, ["adapt", "--data", str(faces / "lq"), "--base", "tiny-restorer", "--prior",
                                     "tiny-prior", "--name", "cli-adapted", "--aligned", "--steps", "1",
                                     "--batch-size", "2", "--device", "cpu", "--schedule", "ddim", "--fast-steps", "2",
                                     "--hq-dir", str(faces / "gt"), "--workdir", str(tmp_path / "w")])
        assert r.exit_code == 0, r.output + repr(r.exception)
        assert "registered cli-adapted" in r.output and "consistency_psnr" in r.output
        card = Zoo(root=zoo.root, builtin_dir=None).get("cli-adapted")
        p = card.extra["config"]["pseudo"]
        # from the prior card's pseudo_target_defaults / diffusion.respacing, and the flags
        assert (p["start"], p["constrain_until"], p["respacing"], p["schedule"], p["fast_steps"]) == (4, 2, "10", "ddim", 2)
    finally:
        get_settings.cache_clear()


def test_cancel_during_diffusion_sampling(tmp_path, faces, prior):
    """should_cancel reaches the sampler: a long batch stops within a step, not at the end of the batch."""
    calls = {"n": 0}

    def should_cancel():
        calls["n"] += 1
        return calls["n"] > 2  # the batch check passes, then the sampler's 2nd step check cancels

    with pytest.raises(Cancelled, match="during sampling"):
        generate_pseudo_targets(_inputs(faces), _tiny_restorer(), prior, tmp_path,
                                PseudoTargetParams(**FAST_PSEUDO), should_cancel=should_cancel)
    assert read_manifest(tmp_path) == {}


def test_prepare_detects_and_aligns(tmp_path, shared_dir, facexlib_root):
    """Whole photos: faces are detected (RetinaFace from the shared weights) and aligned; a photo without a face is
    recorded as skipped; the data fingerprint does not depend on the file order."""
    from restoration.faces.helper import FaceHelper

    whole = shared_dir / "data" / "realworld" / "whole"
    src = [whole / "04.jpg", whole / "05.jpg"]
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((120, 120, 3), 128, np.uint8)).save(blank)
    helper = FaceHelper(64, detector="retinaface", model_root=facexlib_root)
    cfg = AdaptConfig(eval_fraction=0.0, max_faces=2)
    man = prepare(tmp_path / "w", src + [blank], aligned=False, size=64, helper=helper, config=cfg,
                  base="b", prior="p", name="n")
    assert man["detector"] == "retinaface" and man["counts"]["eval"] == 0
    assert [s["reason"] for s in man["skipped"]] == ["no face detected"]
    assert 2 <= man["counts"]["train"] <= 4
    for it in man["items"]:
        crop = np.asarray(Image.open(tmp_path / "w" / "prepare" / it["crop"]))
        assert crop.shape == (64, 64, 3) and len(it["face"]["affine"]) == 2
    man2 = prepare(tmp_path / "w2", [blank] + src[::-1], aligned=False, size=64, helper=helper, config=cfg)
    assert man2["data_sha256"] == man["data_sha256"] and man2["data_count"] == 3


def test_stages_worker_style_sharded(tmp_path, faces, zoo):
    """The worker's order: prepare, targets shard by shard (finetune refuses until all are done), finetune."""
    wd = tmp_path / "w"
    cfg = _config(use_prior=False)
    paths = sorted((faces / "lq").glob("*.png"))
    man = prepare(wd, paths, aligned=True, size=64, config=cfg, base="tiny-restorer", prior="tiny-prior",
                  name="x")
    assert AdaptConfig.from_dict(json.loads((wd / "job.json").read_text())["config"]).use_prior is False
    r0 = generate_targets(wd, 0, 2, zoo=zoo, device="cpu")
    st = targets_status(wd)
    assert r0["total"] == 2 and st == {"done": 2, "total": 4, "complete": False, "missing": st["missing"]}
    with pytest.raises(RuntimeError, match="incomplete"):
        tune.finetune(wd, zoo=zoo, device="cpu", hq_images=[])
    generate_targets(wd, 1, 2, zoo=zoo, device="cpu")
    assert targets_status(wd)["complete"] and man["counts"]["train"] == 4
    res = tune.finetune(wd, zoo=zoo, device="cpu", hq_images=[])
    assert res["steps"] == 2 and res["losses"]["gan"] == 0.0 and (wd / "finetune" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ colour correction
def test_domain_color_gains():
    from restoration.adaptation.color import color_stats, domain_color_gains

    ref = {"face": [0.67, 0.50, 0.43], "surround": [0.57, 0.45, 0.38]}
    sepia = np.array([1.10, 0.98, 0.78])

    def tint(stats, face=1.0, surround=1.0):
        return {"face": list(np.array(stats["face"]) * face), "surround": list(np.array(stats["surround"]) * surround)}

    g = np.array(domain_color_gains(tint(ref, sepia, sepia), ref))
    # a cast on the whole picture is undone up to brightness (chromaticity only): gains * cast is a constant
    assert np.allclose(g * sepia / (g * sepia).mean(), 1.0, atol=5e-3)
    assert abs(np.log(g).sum()) < 1e-3  # geometric mean 1: the exposure is kept
    # darker, a tiny tint, a tint of the face only (skin tone) or of the surround only (a coloured wall), strength 0
    # or no statistics: nothing to correct
    assert domain_color_gains(tint(ref, 0.6, 0.6), ref) is None
    assert domain_color_gains(tint(ref, np.array([1.02, 1.0, 0.99]), np.array([1.02, 1.0, 0.99])), ref) is None
    assert domain_color_gains(tint(ref, face=sepia), ref) is None
    assert domain_color_gains(tint(ref, surround=sepia), ref) is None
    assert domain_color_gains(tint(ref, sepia, sepia), ref, strength=0.0) is None
    assert domain_color_gains(None, ref) is None
    # face and surround disagree in size: the smaller shared part is corrected
    weak = np.array(domain_color_gains(tint(ref, sepia, np.sqrt(sepia)), ref))
    assert np.allclose(weak, np.sqrt(g), atol=2e-3)
    half = np.array(domain_color_gains(tint(ref, sepia, sepia), ref, strength=0.5))
    assert np.allclose(half, np.sqrt(g), atol=1e-3)
    # color_stats: the central half is the face, outside the central 60 % the surround
    im = np.zeros((40, 40, 3), np.uint8)
    im[10:30, 10:30] = (255, 0, 51)
    st = color_stats([im, im])
    assert np.allclose(st["face"], [1.0, 0.0, 0.2]) and np.allclose(st["surround"], 0.0)
    assert color_stats([]) is None
    with pytest.raises(ValueError, match="color_correction"):
        PseudoTargetParams(color_correction=1.5)


def test_targets_undo_a_domain_cast(tmp_path, faces, zoo):
    """A domain with a shared sepia cast: the gains (color.json) undo the cast measured on the crops against the
    reference faces, and the targets (self-training ablation: target = corrected x0) are x0 times those gains;
    color_correction=0 turns it off (target = x0)."""
    cast_dir = tmp_path / "cast"
    cast_dir.mkdir()
    for p in sorted((faces / "gt").glob("*.png")):
        arr = np.asarray(Image.open(p)).astype(np.float64) * np.array([1.10, 0.98, 0.78])
        Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8)).save(cast_dir / p.name)
    hq = sorted((faces / "gt").glob("*.png"))  # the clean faces of the same photos: the cast is all that differs
    for strength in (1.0, 0.0):
        wd = tmp_path / f"w{strength}"
        cfg = _config(use_prior=False)
        cfg.pseudo.color_correction = strength
        prepare(wd, sorted(cast_dir.glob("*.png")), aligned=True, size=64, config=cfg, base="tiny-restorer",
                prior="tiny-prior", name="x")
        res = generate_targets(wd, 0, 1, zoo=zoo, device="cpu", hq_images=hq)
        rec = json.loads((wd / "targets" / "color.json").read_text())
        assert rec["gains"] == res["color_gains"] and targets_status(wd)["complete"]
        ids = sorted(p.stem for p in (wd / "targets").glob("*.x0.png"))
        ids = [i[: -len(".x0")] for i in ids]
        x0 = np.stack([np.asarray(Image.open(wd / "targets" / f"{i}.x0.png")) for i in ids]).astype(np.float64)
        tg = np.stack([np.asarray(Image.open(wd / "targets" / f"{i}.png")) for i in ids]).astype(np.float64)
        if strength == 1.0:
            g = np.array(rec["gains"])
            # train crops vs all references: the same photos up to the eval split, so close to the inverse cast
            assert np.allclose(g * np.array([1.10, 0.98, 0.78]) / np.mean(g * np.array([1.10, 0.98, 0.78])), 1.0,
                               atol=0.06)
            assert rec["reference"].startswith("given") and rec["domain"] and rec["reference_stats"]
            assert np.abs(tg - np.clip(x0 * g, 0, 255)).max() <= 1.0
        else:
            assert rec["gains"] is None and np.array_equal(tg, x0)
    # no HQ faces: the prior card's face_color_stats are the reference; without them there is no correction
    card = zoo.get("tiny-prior")
    zoo.register("tiny-prior-rgb", "iddpm_unet", TINY_UNET, _tiny_unet().state_dict(), kind="prior", input_size=32,
                 value_range=(-1, 1), license="test", random_init=True,
                 extra={**card.extra, "face_color_stats": {"face": [0.67, 0.50, 0.43], "surround": [0.57, 0.45, 0.38]}})
    try:
        for prior_name, expect in (("tiny-prior-rgb", "prior card tiny-prior-rgb"), ("tiny-prior", "none found")):
            wd = tmp_path / f"p-{prior_name}"
            prepare(wd, sorted(cast_dir.glob("*.png")), aligned=True, size=64, config=_config(use_prior=False),
                    base="tiny-restorer", prior=prior_name, name="x")
            rec = generate_targets(wd, 0, 1, zoo=zoo, device="cpu", hq_images=[])
            cc = json.loads((wd / "targets" / "color.json").read_text())
            assert cc["reference"].startswith(expect) and (cc["gains"] is None) == (expect == "none found")
            assert rec["color_gains"] == cc["gains"]
    finally:
        zoo.delete("tiny-prior-rgb")


# ------------------------------------------------------------------------------------------------ quality gate
class _Broken(torch.nn.Module):
    """An "adapted" restorer that wrecks its input: content shifted and noise added (what the gate must refuse)."""

    def forward(self, x):
        g = torch.Generator().manual_seed(0)
        return (x.flip(-2).flip(-1) * 0.5 + 0.5 * torch.rand(x.shape, generator=g)).clamp(0, 1)


class _Smooth(torch.nn.Module):
    """A sane stand-in base restorer (a light 3x3 smoothing): keeps the content, removes some noise."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)


def test_quality_gate_refuses_a_worse_model(tmp_path, faces, zoo):
    wd = tmp_path / "w"
    kw = dict(base="tiny-restorer", prior="tiny-prior", name="gated", workdir=wd, zoo=zoo,
              hq_images=sorted((faces / "gt").glob("*.png")))
    res = run_adaptation(faces / "lq", config=_config(quality_gate=True), register_model=False, **kw)
    assert res["gate"]["verdict"] in ("ok", "worse")
    # the base judged against itself is never worse
    ev_same = evaluate(wd, zoo=zoo, base_model=_Smooth(), adapted_model=_Smooth())
    assert ev_same["gate"]["verdict"] == "ok" and ev_same["gate"]["reasons"] == []
    assert ev_same["metrics"]["adapted"] == ev_same["metrics"]["base"]
    # a model that wrecks the faces is refused, with the reasons, and nothing is registered
    ev = evaluate(wd, zoo=zoo, base_model=_Smooth(), adapted_model=_Broken())
    assert ev["gate"]["verdict"] == "worse"
    assert any(r.startswith("consistency_psnr") for r in ev["gate"]["reasons"])
    assert json.loads((wd / "eval" / "metrics.json").read_text())["gate"]["verdict"] == "worse"
    with pytest.raises(QualityGateFailed, match="worse than the base.*quality_gate=false"):
        register(wd, zoo=zoo)
    with pytest.raises(Exception):
        zoo.get("gated")
    # overridable: force, or the job's quality_gate off
    card = register(wd, zoo=zoo, force=True)
    assert card.extra["evaluation"]["gate"]["verdict"] == "worse"
    zoo.delete("gated")


def test_cli_adapt_reports_a_refused_model(tmp_path, faces, zoo, monkeypatch):
    """The CLI prints the before/after table and the gate verdict; a refused model is one error line, exit 1."""
    from typer.testing import CliRunner

    from cli import app
    from restoration.settings import get_settings

    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FACEADAPT_MODELS_DIR", str(zoo.root))
    real = stages.evaluate
    monkeypatch.setattr(stages, "evaluate",
                        lambda wd, **kw: real(wd, **{**kw, "base_model": _Smooth(), "adapted_model": _Broken()}))
    get_settings.cache_clear()
    try:
        args = ["adapt", "--data", str(faces / "lq"), "--base", "tiny-restorer", "--prior", "tiny-prior", "--name",
                "cli-gated", "--aligned", "--steps", "1", "--batch-size", "2", "--device", "cpu", "--schedule", "ddim",
                "--fast-steps", "2", "--hq-dir", str(faces / "gt"), "--workdir", str(tmp_path / "w")]
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 1, r.output
        assert "not registered: cli-gated" in r.output and "quality gate: worse" in r.output
        assert "target_psnr" in r.output and "naturalness" in r.output and "Traceback" not in r.output
        with pytest.raises(Exception):
            Zoo(root=zoo.root, builtin_dir=None).get("cli-gated")
        r = CliRunner().invoke(app, args + ["--no-quality-gate"])
        assert r.exit_code == 0, r.output
        assert "registered cli-gated" in r.output
    finally:
        get_settings.cache_clear()


def test_default_config_layers(zoo):
    """AdaptConfig defaults < prior card pseudo-target defaults < base card finetune_defaults < given parameters."""
    zoo.register("tiny-restorer-tuned", "swinir_face", TINY_SWINIR, _tiny_restorer().state_dict(), kind="restorer",
                 input_size=64, value_range=(0, 1), license="test", random_init=True,
                 extra={"finetune_defaults": {"steps": 7, "lr": 3e-4, "d_channels": 8}})
    cfg = default_config(zoo, "tiny-restorer-tuned", "tiny-prior", {"finetune.lr": 1e-4, "pseudo": {"down_N": 2}},
                         aligned=True)
    assert (cfg.finetune.steps, cfg.finetune.lr, cfg.finetune.d_channels) == (7, 1e-4, 8)
    assert (cfg.pseudo.start, cfg.pseudo.constrain_until, cfg.pseudo.down_N) == (4, 2, 2) and cfg.aligned
    plain = default_config(zoo, "tiny-restorer", None, None, use_prior=False)
    assert plain.finetune == FinetuneConfig() and plain.pseudo == PseudoTargetParams()
    with pytest.raises(ValueError, match="unknown"):
        default_config(zoo, "tiny-restorer", "tiny-prior", {"finetune.bogus": 1})
