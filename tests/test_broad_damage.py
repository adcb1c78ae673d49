"""The broad damage model (restoration.degrade.broad), the restorer trainer's native-size loss and its paste."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli import app
from restoration.degrade import DAMAGE_TYPES, DEFAULT, HELD_OUT, BroadDamage, DamageMix, broad_mix, degrade
from restoration.degrade.broad import BLURS, NOISES, RESIZES
from restoration.faces.fidelity import decide, blend_aligned
from restoration.training.batches import native_batch, pasted_output, training_damage
from restoration.training.evaluate import degrade_pair
from restoration.training.export import export
from restoration.training.recipes import RestorerTrainConfig
from restoration.training.restorer import train_restorer
from test_train import TINY_RESTORER, faces_root  # noqa: F401 - the fixture


def face(size: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.5 + 0.3 * np.sin(6 * xx), 0.4 + 0.3 * np.cos(5 * yy), 0.5 + 0.2 * np.sin(4 * (xx + yy))], -1)
    return np.clip(base + 0.05 * rng.standard_normal(base.shape), 0, 1).astype(np.float32)


def test_same_seed_same_damage_and_the_image_is_damaged():
    img = face()
    a = degrade(img, BroadDamage(), 7)
    b = degrade(img, BroadDamage(), 7)
    c = degrade(img, BroadDamage(), 8)
    assert a.shape == img.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.abs(a - img).mean() > 0.01


def test_held_out_types_are_never_drawn_and_forced_ones_always_are():
    d = BroadDamage(holdout=HELD_OUT)
    rng = np.random.default_rng(0)
    drawn = {d._pick(rng, group, first) for group in (BLURS, RESIZES, NOISES) for first in (True, False)
             for _ in range(200)}
    assert drawn == set(DAMAGE_TYPES) - set(HELD_OUT) - {"jpeg"}
    f = BroadDamage(force=("motion_blur",))
    assert all(f._pick(rng, BLURS, True) == "motion_blur" for _ in range(50))
    assert {f._pick(rng, BLURS, False) for _ in range(200)} == set(BLURS)  # later rounds draw freely


@pytest.mark.parametrize("kwargs, words", [
    (dict(holdout=("sepia",)), "unknown damage type 'sepia'"),
    (dict(holdout=("motion_blur",), force=("motion_blur",)), "both held out and forced"),
    (dict(holdout=BLURS), "leaves no type"),
    (dict(force=("gaussian_noise", "shot_noise")), "at most one type"),
    (dict(final_up="nearest"), "final_up"),
])
def test_bad_settings_are_refused_with_the_reason(kwargs, words):
    with pytest.raises(ValueError, match=words):
        BroadDamage(**kwargs)


def test_training_damage_and_the_bicubic_baseline_pair():
    assert isinstance(training_damage("broad", None, list(HELD_OUT)), DamageMix)
    with pytest.raises(ValueError, match="'standard' or 'broad'"):
        training_damage("weird")
    with pytest.raises(ValueError, match="for the 'broad' damage model"):
        training_damage("standard", None, ["motion_blur"])
    gt = torch.from_numpy(np.stack([face(seed=i) for i in range(3)])).permute(0, 3, 1, 2)
    lq, lqb = degrade_pair(gt, BroadDamage(force=("shot_noise",)), 100)
    assert lq.shape == lqb.shape == gt.shape and not torch.equal(lq, lqb)
    # the same draws, only the last upsampling differs: the two are close
    assert (lq - lqb).abs().mean() < 0.05


@pytest.mark.parametrize("native", [64, 96, 128, 192])
def test_the_training_paste_is_the_products_paste(native):
    """pasted_output (torch, differentiable) gives what blend_aligned (the product, auto fidelity) shows."""
    size = 64
    rng = np.random.default_rng(native)
    crop = (face(native, 1) * 255).round().astype(np.uint8)
    lq = torch.nn.functional.interpolate(torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255, size=size,
                                         mode="area") if native != size else \
        torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255
    out = (lq + 0.05 * torch.from_numpy(rng.standard_normal(lq.shape)).float()).clamp(0, 1)
    out_u8 = (out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    lq_u8 = lq[0].permute(1, 2, 0).numpy() * 255
    fm = decide(native, size, None, None, "swinir_face")
    want = blend_aligned(crop, out_u8, lq_u8, fm).astype(np.float32) / 255
    got = pasted_output(out_u8_t := torch.from_numpy(out_u8).permute(2, 0, 1)[None].float() / 255,
                        torch.from_numpy(lq_u8).permute(2, 0, 1)[None].float() / 255,
                        torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255)
    assert out_u8_t.shape[-1] == size
    got = got[0].permute(1, 2, 0).clamp(0, 1).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 3 / 255  # uint8 rounding and the resamplers' edges


def test_native_batch_draws_one_size_per_batch():
    gt = torch.from_numpy(np.stack([face(96, i) for i in range(4)])).permute(0, 3, 1, 2)
    lq, lq_s, gt_s = native_batch(gt, BroadDamage(), np.random.default_rng(3), [48, 96], 32)
    assert lq.shape == (4, 3, 32, 32) and lq_s.shape == gt_s.shape and gt_s.shape[-1] in (48, 96)


def test_restorer_trains_on_broad_damage_with_the_native_loss(tmp_path, faces_root):  # noqa: F811
    out = tmp_path / "broad"
    cfg = RestorerTrainConfig(out_dir=str(out), size=16, batch_size=2, steps=2, limit=4, model=TINY_RESTORER,
                              data_root=str(faces_root), cache_dir=None, ckpt_every=1, sample_every=2, n_grid=2,
                              gan_weight=0.01, gan_start=1, warmup_steps=1, native_sizes=[16, 32, 48], native_loss=True,
                              damage="broad", damage_holdout=list(HELD_OUT), gradient_weight=0.5)
    assert train_restorer(cfg, show_bar=False)["step"] == 2
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert any("grad" in r for r in rows)
    card = json.loads((export(out, tmp_path / "zoo" / "broad") / "card.json").read_text())
    recipe = card["extra"]["training"]["recipe"]
    assert "gradient L1 at the native size" in recipe and "standard + broad damage (held out: motion_blur, shot_noise)" in recipe
    with pytest.raises(ValueError, match="native_loss needs native_sizes"):
        train_restorer(RestorerTrainConfig(out_dir=str(tmp_path / "x"), native_loss=True), show_bar=False)


@pytest.mark.parametrize("args, words", [
    (["--hold-out", "motion_blur"], "--hold-out needs --damage broad"),
    (["--damage", "broad", "--hold-out", "sepia"], "unknown damage type 'sepia'"),
    (["--damage", "rough"], "--damage is one of standard, broad"),
    (["--native-loss"], "--native-loss needs --native-sizes"),
])
def test_train_cli_refuses_bad_damage_options_before_any_work(tmp_path, args, words):
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "restorer", "--out", str(out), "--steps", "1", *args])
    assert r.exit_code == 2, r.output
    assert words in " ".join(r.output.split())
    assert not out.exists()


def test_the_mix_draws_both_parts_and_is_seeded():
    mix = broad_mix()
    assert mix.parts[0] == DEFAULT and isinstance(mix.parts[1], BroadDamage) and mix.parts[1].holdout == HELD_OUT
    rng = np.random.default_rng(0)
    picks = [int(rng.choice(2, p=np.asarray(mix.probs) / sum(mix.probs))) for _ in range(400)]
    assert 0.25 < picks.count(0) / 400 < 0.45
    img = face()
    assert np.array_equal(degrade(img, mix, 5), degrade(img, mix, 5))
    with pytest.raises(ValueError, match="non-negative probabilities"):
        DamageMix((DEFAULT,), (0.5, 0.5))
