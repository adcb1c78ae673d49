"""Small sets: the minimum an adaptation takes (refused before any work, in the CLI and the API alike), the fine-tune
fitted to the number of faces (steps, learning rate, held-out part), the shift augmentation and the early stopping on
the held-out pseudo targets with the best weights kept. Tiny models and 32-64 px faces."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from restoration.adaptation import (MIN_IMAGES, SMALL_SET, AdaptConfig, check_min_images, default_config,
                                    scale_for_faces)
from restoration.adaptation.config import held_out_count
from restoration.settings import get_settings
from restoration.training.finetune import FinetuneConfig, finetune, shift_pairs
from restoration.training.state import load as load_state


@pytest.fixture
def default_minimum(monkeypatch):
    """The settings as shipped: conftest lowers the minimum for the tiny-set tests; these check the default."""
    monkeypatch.delenv("FACEADAPT_MIN_ADAPT_IMAGES", raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_too_few_images_refused_with_the_number(default_minimum):
    assert get_settings().min_adapt_images == MIN_IMAGES == 8
    check_min_images(8)
    with pytest.raises(ValueError, match=r"3 images: too few to adapt to; at least 8 are needed"):
        check_min_images(3)
    with pytest.raises(ValueError, match="at least 5"):
        check_min_images(4, minimum=5)


def test_cli_adapt_refuses_three_images_before_any_work(tmp_path, shared_dir, default_minimum, monkeypatch):
    """The issue: `faceadapt adapt` on 3 images ran 400 steps (6.5 min), then refused to register. Now it exits 2
    at once with the number, and creates nothing."""
    from typer.testing import CliRunner

    from cli import app

    data = tmp_path / "three"
    data.mkdir()
    for i, p in enumerate(sorted((shared_dir / "data" / "faces-utk200").iterdir())[:3]):
        Image.open(p).convert("RGB").resize((64, 64)).save(data / f"f{i}.png")
    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    r = CliRunner().invoke(app, ["adapt", "--data", str(data), "--name", "too-few", "--device", "cpu",
                                 "--workdir", str(tmp_path / "work")])
    assert r.exit_code == 2, r.output
    assert "3 images: too few to adapt to; at least 8 are needed" in r.output
    assert not (tmp_path / "work").exists() and not (tmp_path / "home" / "adapt").exists()


def test_held_out_part_big_enough_to_judge():
    auto, fixed = AdaptConfig(), AdaptConfig(auto_schedule=False)
    assert [held_out_count(n, auto) for n in (2, 8, 16, 32, 200)] == [1, 2, 4, 4, 20]
    assert [held_out_count(n, fixed) for n in (2, 8, 16, 32, 200)] == [1, 1, 2, 3, 20]
    assert held_out_count(8, AdaptConfig(eval_fraction=0.0)) == 0


def test_schedule_fitted_to_the_number_of_faces():
    cfg = AdaptConfig(finetune=FinetuneConfig(steps=400, lr=1e-4, lr_min=2.5e-5))
    small = scale_for_faces(cfg, 6, 2, 64).finetune
    mid = scale_for_faces(cfg, 12, 4, 64).finetune
    big = scale_for_faces(cfg, 180, 20, 64).finetune
    assert small.steps == SMALL_SET["min_steps"] and mid.steps == 300 and big.steps == 400
    assert small.lr == pytest.approx(1e-4 * SMALL_SET["min_lr_scale"]) == mid.lr
    assert scale_for_faces(cfg, 28, 4, 64).finetune.lr == pytest.approx(1e-4 * np.sqrt(28 / 64))
    assert big.lr == 1e-4 and big.lr_min == 2.5e-5
    assert (small.val_every, small.patience, small.shift) == (15, SMALL_SET["patience"], 2)
    assert scale_for_faces(cfg, 6, 0, 64).finetune.val_every == 0  # nothing held out: no early stopping
    off = dataclasses.replace(cfg, auto_schedule=False)
    assert scale_for_faces(off, 6, 2, 64) is off


def test_a_schedule_given_by_hand_runs_as_given():
    from restoration.models import Zoo

    zoo = Zoo()
    base, prior = get_settings().default_restorer, get_settings().default_prior
    assert default_config(zoo, base, prior).auto_schedule
    assert not default_config(zoo, base, prior, {"finetune.steps": 50}).auto_schedule
    assert not default_config(zoo, base, prior, {"finetune": {"lr": 1e-5}}).auto_schedule
    assert default_config(zoo, base, prior, {"finetune": {"batch_size": 4}}).auto_schedule


def test_shift_moves_input_and_target_together():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16)
    xs, ys = shift_pairs(x, x.clone(), 2, gen)
    assert xs.shape == x.shape and torch.equal(xs, ys)
    assert not torch.equal(xs, x)  # some pair moved
    assert shift_pairs(x, x, 0, gen)[0] is x


class _Gain(torch.nn.Module):
    """y = a * x + b per channel, a = 1 and b = 0 at first: the identity."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.ones(1, 3, 1, 1))
        self.b = torch.nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x):
        return x * self.a + self.b


def _pairs(n: int, target_fn, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(40, 200, (32, 32, 3), dtype=np.uint8)
        out.append((x, np.clip(target_fn(x.astype(np.float64)), 0, 255).astype(np.uint8)))
    return out


def _cfg(**kw) -> FinetuneConfig:
    base = dict(steps=40, batch_size=4, lr=2e-2, lr_min=2e-2, gan=0.0, lpips=0.0, ema_decay=0.5, val_every=5,
                patience=3, ckpt_every=5, log_every=5)
    base.update(kw)
    return FinetuneConfig(**base)


def test_early_stopping_keeps_the_base_when_training_only_hurts(tmp_path):
    """Training pairs that teach a wrong mapping (darker), held-out pairs whose targets are the inputs: every step
    is worse than the base on the held-out faces; training stops after `patience` scores and the base's weights come
    back (never worse than the base)."""
    train = _pairs(8, lambda x: x * 0.5, 0)
    held = _pairs(4, lambda x: x, 1)
    model = _Gain()
    res = finetune(model, train, [], _cfg(), tmp_path / "ck", val_pairs=held)
    assert res.best["step"] == 0 and res.best["stopped_early"] and res.step == 15
    assert res.best["psnr"] == res.best["base_psnr"]
    assert torch.allclose(res.ema.a, torch.ones(1, 3, 1, 1)) and torch.allclose(res.ema.b, torch.zeros(1, 3, 1, 1))
    assert [h["step"] for h in res.val_history] == [0, 5, 10, 15]


def test_early_stopping_keeps_the_best_step_and_resumes(tmp_path):
    """Pairs of one brightening mapping for training and held out: the held-out score improves, the best EMA weights
    are returned; a run interrupted after a checkpoint resumes with the same scores and the same best."""
    fn = lambda x: x * 1.2 + 10  # noqa: E731
    train, held = _pairs(8, fn, 0), _pairs(4, fn, 1)
    cfg = _cfg(lr=2e-3, lr_min=2e-3)
    res = finetune(_Gain(), train, [], cfg, tmp_path / "a", val_pairs=held)
    assert res.best["step"] > 0 and res.best["psnr"] > res.best["base_psnr"] + 1.0
    best_a = res.ema.a.detach().clone()
    # the same run stopped at step 20 (its checkpoint), then resumed
    state = {"n": 0}

    def cancel():
        return state["n"] >= 20

    def progress(_stage, done, _total):
        state["n"] = done

    from restoration.runtime import Cancelled

    with pytest.raises(Cancelled):
        finetune(_Gain(), train, [], cfg, tmp_path / "b", val_pairs=held, progress=progress, should_cancel=cancel)
    ck = load_state(tmp_path / "b" / "last.pt")
    assert ck["step"] == 20 and [h["step"] for h in ck["val"]["history"]] == [0, 5, 10, 15, 20]
    res2 = finetune(_Gain(), train, [], cfg, tmp_path / "b", val_pairs=held)
    assert res2.resumed_from == 20 and res2.best["step"] == res.best["step"]
    assert res2.val_history == res.val_history and torch.equal(res2.ema.a.detach(), best_a)
