"""The training toolkit (restoration/training: state, ema, schedules, losses, batches, discriminators): contracts
the loops rely on."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from restoration.degrade.damage import DEFAULT, degrade, degrade_batch
from restoration.metrics.quality import ssim, ssim_map
from restoration.training import state
from restoration.training.batches import (
    EpochBatches, damage_batch, degradation_params, load_uint8, sample_pairs, stack_uint8,
)
from restoration.training.discriminators import PatchDiscriminator, UNetDiscriminatorSN
from restoration.training.ema import ema_update, make_ema, warmup_decay
from restoration.training.losses import gan_loss, gradient_l1, make_perceptual, ssim_loss
from restoration.training.schedules import cosine_factor, set_lr, warmup_lr


# ------------------------------------------------------------------------------------------------ state
def test_state_save_is_atomic_and_load_reads_it(tmp_path):
    path = tmp_path / "ck.pt"
    s = {"step": 3, "w": torch.arange(4.0), "nested": {"a": [1, 2.5, "x"]}}
    assert state.save(s, path) == path
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left
    back = state.load(path)
    assert back["step"] == 3 and torch.equal(back["w"], s["w"]) and back["nested"] == s["nested"]
    state.save({"step": 4}, path)  # replaced whole
    assert state.load(path) == {"step": 4}


def test_state_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "bad.pt"
    torch.save({"obj": nn.Linear(1, 1)}, path)
    with pytest.raises(Exception):
        state.load(path)


def test_rng_capture_restore_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    st = state.capture_rng(gen)
    assert set(st) == {"torch", "numpy", "python", "data"}
    assert "data" not in state.capture_rng() and "cuda" not in state.capture_rng(cuda=False)
    draws = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    state.save({"rng": st}, tmp_path / "r.pt")  # survives a weights_only round trip
    torch.manual_seed(9), np.random.seed(9), random.seed(9), gen.manual_seed(9)
    state.restore_rng(state.load(tmp_path / "r.pt")["rng"], gen)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1]) and draws[2] == again[2]
    assert torch.equal(draws[3], again[3])


# ------------------------------------------------------------------------------------------------ ema
def _pair():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = make_ema(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(7.0)
    return model, ema


def test_make_ema_is_a_frozen_eval_copy():
    model, ema = _pair()
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("lerp", [True, False])
def test_ema_update_both_arithmetics(lerp):
    model, ema = _pair()
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9, lerp=lerp)
    for b, e, m in zip(before, ema.parameters(), model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * m, atol=1e-6)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)


def test_ema_update_trainable_only_and_buffers_left():
    model, ema = _pair()
    model[0].weight.requires_grad_(False)
    w0, rm0 = ema[0].weight.clone(), ema[1].running_mean.clone()
    ema_update(ema, model, 0.5, lerp=False, trainable_only=True, copy_buffers=False)
    assert torch.equal(ema[0].weight, w0) and torch.equal(ema[1].running_mean, rm0)
    assert not torch.equal(ema[0].bias, model[0].bias) and not torch.allclose(ema[0].bias, w0.new_zeros(3))


def test_warmup_decay():
    assert warmup_decay(0.999, 0) == 0.1 and warmup_decay(0.999, 10**6) == 0.999
    assert warmup_decay(0.9, 80) == 0.9 and warmup_decay(0.9, 79) == 80 / 89


# ------------------------------------------------------------------------------------------------ schedules
def test_warmup_lr():
    assert warmup_lr(0, 1.0, 4, 100) == 0.25 and warmup_lr(3, 1.0, 4, 100) == 1.0 and warmup_lr(50, 1.0, 4, 100) == 1.0
    assert warmup_lr(0, 1.0, 1, 100, "cosine") == 1.0
    assert warmup_lr(50, 1.0, 1, 100, "cosine") == pytest.approx(0.55)
    assert warmup_lr(100, 1.0, 1, 100, "cosine") == pytest.approx(0.1) == warmup_lr(500, 1.0, 1, 100, "cosine")


def test_cosine_factor_and_set_lr():
    f = cosine_factor(10, 1e-3, 1e-4)
    assert f(0) == 1.0 and f(10) == pytest.approx(0.1) and f(20) == f(10) and f(-1) == f(0)
    assert f(5) == pytest.approx(0.55)
    assert cosine_factor(10, 0.0, 0.0)(10) == pytest.approx(0.0, abs=1e-12)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))], lr=1.0)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 2.0})
    set_lr(opt, 0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.5]


# ------------------------------------------------------------------------------------------------ losses
def test_ssim_loss_is_one_minus_the_metrics_ssim():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    b = (a + 0.1 * torch.randn_like(a)).clamp(0, 1)
    assert float(ssim_loss(a, b)) == pytest.approx(1 - ssim(a, b), abs=1e-12)
    assert float(ssim_loss(a, b)) == float(1 - ssim_map(a, b).mean())
    assert float(ssim_loss(a, a)) == pytest.approx(0.0, abs=1e-12)
    x = a.float().requires_grad_(True)
    ssim_loss(x, b.float()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradient_l1_and_gan_loss():
    a = torch.zeros(1, 3, 8, 8)
    assert float(gradient_l1(a, a + 0.3)) == 0.0  # a constant offset has no gradient
    b = a.clone()
    b[..., ::2] = 1.0
    assert float(gradient_l1(a, b)) == pytest.approx(1.0)
    logits = torch.tensor([0.0, 2.0])
    assert float(gan_loss(logits, True)) == pytest.approx(float(torch.mean(torch.log1p(torch.exp(-logits)))))
    assert float(gan_loss(logits, False)) == pytest.approx(float(torch.mean(torch.log1p(torch.exp(logits)))))
    assert float(gan_loss(torch.zeros(3), True)) == pytest.approx(math.log(2))


def test_make_perceptual_fallbacks():
    dev = torch.device("cpu")
    assert make_perceptual(0.0, "gradient", dev) == (None, "none (weight 0)")
    fn, name = make_perceptual(0.1, "ssim", dev)
    if name != "lpips":  # no LPIPS weights on disk: the fallback, named with the reason
        assert fn is ssim_loss and name.startswith("1-ssim instead of LPIPS (")
        assert make_perceptual(0.1, "gradient", dev)[0] is gradient_l1
        fn, name = make_perceptual(0.1, "none", dev)
        assert fn is None and name.startswith("none (")


# ------------------------------------------------------------------------------------------------ batches, damage
def test_epoch_batches_cover_every_index_and_resume():
    gen = torch.Generator().manual_seed(0)
    b = EpochBatches(5, 3, gen)
    first = torch.cat([b.next(), b.next()[:2]])  # 5 indices: the first epoch
    assert sorted(first.tolist()) == [0, 1, 2, 3, 4] and b.epoch == 2
    st, gst = b.state(), gen.get_state()
    nxt = b.next()
    gen2 = torch.Generator()
    gen2.set_state(gst)
    b2 = EpochBatches(5, 3, gen2)
    b2.load(st)
    assert torch.equal(b2.next(), nxt)


def test_uint8_loading_and_pairs(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert np.array_equal(load_uint8(tmp_path / "a.png", None), arr)
    assert load_uint8(arr, 16).shape == (16, 16, 3)
    assert np.array_equal(load_uint8(torch.from_numpy(arr).permute(2, 0, 1).float() / 255, None), arr)
    with pytest.raises(ValueError):
        load_uint8(arr.astype(np.float32), None)
    lq = stack_uint8([arr, arr[::-1].copy()], None)
    assert lq.shape == (2, 3, 20, 20) and lq.dtype == torch.uint8
    x, y = sample_pairs(lq, lq, 4, torch.Generator().manual_seed(0), torch.device("cpu"), True)
    assert x.shape == (4, 3, 20, 20) and torch.equal(x, y) and 0 <= float(x.min()) and float(x.max()) <= 1


def test_damage_batch_is_degrade_batch():
    """The restorer trainer's damage is `restoration.degrade.damage.degrade_batch`: `degrade` per image, one rng."""
    gt = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lq, tgt = damage_batch(gt, DEFAULT, np.random.default_rng(4), [], 32)
    assert tgt is gt
    ref, _ = degrade_batch(gt, DEFAULT, np.random.default_rng(4))
    assert torch.equal(lq, ref)
    rng = np.random.default_rng(4)
    each = [degrade(gt[i].permute(1, 2, 0).numpy(), DEFAULT, rng) for i in range(3)]
    assert torch.equal(lq, torch.from_numpy(np.stack(each)).permute(0, 3, 1, 2))
    assert degradation_params({"jpeg_prob": 0.0}).jpeg_prob == 0.0 and degradation_params() == DEFAULT


# ------------------------------------------------------------------------------------------------ discriminators
def test_discriminators_shapes():
    x = torch.rand(2, 3, 32, 32)
    assert PatchDiscriminator(8)(x).shape == (2, 1, 4, 4)
    assert UNetDiscriminatorSN(3, 8)(x).shape == (2, 1, 32, 32)
    keys = set(PatchDiscriminator(8).state_dict())
    assert "net.0.weight_orig" in keys  # the hook form of spectral norm: the restorer checkpoints' layout
    assert any(".parametrizations.weight.original" in k for k in UNetDiscriminatorSN(3, 8).state_dict())
