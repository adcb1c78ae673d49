"""restoration.diffusion (gaussian, resample, samplers) against the compat fixtures in
shared/compat/iddpm_diffusion_math (README E).

The reference values were produced by DT-BFR's own code; README E states they are reproducible
bit-exactly, so the tolerances here are tight (0 for float64 schedule arrays, <= 1e-6 for float32
tensors). A missing fixture file is a test FAILURE, not a skip.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from restoration.diffusion import gaussian as dm
from restoration.diffusion import resample, samplers

# float32 tensor fixtures: README E reports bit-exact re-derivations; allow a hair for BLAS/threads
ATOL32 = 1e-6


# ------------------------------------------------------------------------------------------------
# fixture loading
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def math_dir(compat_dir: Path) -> Path:
    d = compat_dir / "iddpm_diffusion_math"
    if not d.is_dir():
        pytest.fail(f"compat fixture folder missing: {d}")
    return d


def _load(math_dir: Path, name: str) -> dict[str, torch.Tensor]:
    f = math_dir / name
    if not f.is_file():
        pytest.fail(f"compat fixture missing: {f}")
    return load_file(str(f))


@pytest.fixture(scope="module")
def meta(math_dir: Path) -> dict:
    f = math_dir / "fixtures_meta.json"
    if not f.is_file():
        pytest.fail(f"compat fixture missing: {f}")
    return json.loads(f.read_text())


@pytest.fixture(scope="module")
def schedule(math_dir):
    return _load(math_dir, "schedule.safetensors")


@pytest.fixture(scope="module")
def pmv(math_dir):
    return _load(math_dir, "p_mean_variance.safetensors")


@pytest.fixture(scope="module")
def diffusion(meta) -> dm.GaussianDiffusion:
    p = meta["diffusion_params"]
    assert p["predict_xstart"] is False and p["rescale_timesteps"] is False
    return dm.create_gaussian_diffusion(
        steps=p["steps"], learn_sigma=p["learn_sigma"], sigma_small=p["sigma_small"],
        noise_schedule=p["noise_schedule"], use_kl=p["use_kl"],
        rescale_learned_sigmas=p["rescale_learned_sigmas"], timestep_respacing=p["timestep_respacing"],
    )


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def _fixed_model(out: torch.Tensor, seen: list | None = None):
    def model(x, ts):
        if seen is not None:
            seen.append(ts.clone())
        return out
    return model


# ------------------------------------------------------------------------------------------------
# schedule
# ------------------------------------------------------------------------------------------------
SCHEDULE_ARRAYS = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "log_betas",
]


def test_space_timesteps_and_map(diffusion, schedule, meta):
    kept = sorted(dm.space_timesteps(1000, "250"))
    assert kept == schedule["use_timesteps"].tolist()
    assert diffusion.timestep_map.tolist() == schedule["timestep_map"].tolist()
    assert diffusion.num_timesteps == meta["num_timesteps_respaced"] == 250
    assert diffusion.timestep_map[:8].tolist() == meta["timestep_map_head"]
    assert diffusion.timestep_map[-4:].tolist() == meta["timestep_map_tail"]
    assert diffusion.timestep_map[149] == 598 and diffusion.timestep_map[90] == 361
    # other respacing forms
    assert sorted(dm.space_timesteps(1000, "ddim25"))[:3] == [0, 40, 80]
    assert len(dm.space_timesteps(100, "10,15,20")) == 45


def test_base_schedule(diffusion, schedule):
    np.testing.assert_array_equal(diffusion.base_betas, schedule["base_betas"].numpy())
    np.testing.assert_array_equal(diffusion.base_alphas_cumprod, schedule["base_alphas_cumprod"].numpy())


@pytest.mark.parametrize("name", SCHEDULE_ARRAYS)
def test_respaced_schedule_array(diffusion, schedule, name):
    ref = schedule[name].numpy()
    mine = np.asarray(getattr(diffusion, name))
    assert mine.dtype == np.float64 and ref.dtype == np.float64
    # computed with the same float64 operations: equal to the last bit or two (on an AVX2 machine without AVX-512,
    # 3 of 250 log values differed from the fixture by one ulp, 1.8e-16 relative: vectorised log differs by CPU)
    np.testing.assert_allclose(mine, ref, rtol=5e-16, atol=0,
                               err_msg=f"{name}: max abs diff {np.abs(mine - ref).max():.3g}")


# ------------------------------------------------------------------------------------------------
# p_mean_variance / p_sample / q_sample
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", [149, 90, 0])
def test_p_mean_variance(diffusion, pmv, meta, T):
    case = next(c for c in meta["p_mean_variance_cases"] if c["t_respaced"] == T)
    x, out, t = pmv[f"t{T}_x_t"], pmv[f"t{T}_model_output"], pmv[f"t{T}_t"]
    seen: list = []
    res = diffusion.p_mean_variance(_fixed_model(out, seen), x, t, clip_denoised=True)
    assert seen[0].dtype == torch.int64
    assert seen[0].tolist() == pmv[f"t{T}_model_timestep"].tolist() == [case["model_timestep_original"]]
    for k in ("mean", "variance", "log_variance", "pred_xstart"):
        assert _maxdiff(res[k], pmv[f"t{T}_{k}"]) <= ATOL32, k
    clipped = (res["pred_xstart"].abs() == 1).float().mean().item()
    assert clipped == pytest.approx(case["frac_pred_xstart_clipped"], abs=1e-6)

    res = diffusion.p_mean_variance(_fixed_model(out), x, t, clip_denoised=False)
    assert _maxdiff(res["pred_xstart"], pmv[f"t{T}_pred_xstart_noclip"]) <= ATOL32
    assert _maxdiff(res["mean"], pmv[f"t{T}_mean_noclip"]) <= ATOL32


@pytest.mark.parametrize("T", [149, 90, 0])
def test_p_sample_fixed_noise(diffusion, pmv, meta, T):
    case = next(c for c in meta["p_mean_variance_cases"] if c["t_respaced"] == T)
    x, out, t = pmv[f"t{T}_x_t"], pmv[f"t{T}_model_output"], pmv[f"t{T}_t"]
    # explicit noise
    res = diffusion.p_sample(_fixed_model(out), x, t, noise=pmv[f"t{T}_p_sample_noise"])
    assert _maxdiff(res["sample"], pmv[f"t{T}_p_sample_sample"]) <= ATOL32
    assert _maxdiff(res["pred_xstart"], pmv[f"t{T}_p_sample_pred_xstart"]) <= ATOL32
    # default generator, as the reference (manual_seed right before the call), noise drawn even at t=0
    torch.manual_seed(case["p_sample_torch_manual_seed"])
    res = diffusion.p_sample(_fixed_model(out), x, t)
    after = torch.randn(1)
    assert _maxdiff(res["sample"], pmv[f"t{T}_p_sample_sample"]) <= ATOL32
    torch.manual_seed(case["p_sample_torch_manual_seed"])
    torch.randn_like(x)
    assert torch.equal(after, torch.randn(1)), "p_sample must draw exactly one randn_like(x)"
    # explicit generator gives the same stream as the seeded default generator
    g = torch.Generator().manual_seed(case["p_sample_torch_manual_seed"])
    res_g = diffusion.p_sample(_fixed_model(out), x, t, generator=g)
    assert torch.equal(res_g["sample"], res["sample"])


@pytest.mark.parametrize("T", [149, 150])
def test_q_sample(diffusion, pmv, T):
    res = diffusion.q_sample(pmv["q_x0"], T, noise=pmv["q_noise"])
    assert _maxdiff(res, pmv[f"q_sample_t{T}"]) <= ATOL32
    res_t = diffusion.q_sample(pmv["q_x0"], torch.tensor([T]), noise=pmv["q_noise"])
    assert torch.equal(res, res_t)


def test_q_posterior_matches_coefficients(diffusion, pmv):
    x0, xt = pmv["q_x0"], pmv["q_sample_t149"]
    mean, var, logvar = diffusion.q_posterior(x0, xt, 149)
    c1 = torch.tensor(diffusion.posterior_mean_coef1[149], dtype=torch.float32)
    c2 = torch.tensor(diffusion.posterior_mean_coef2[149], dtype=torch.float32)
    assert torch.equal(mean, c1 * x0 + c2 * xt)
    assert var.item() == np.float32(diffusion.posterior_variance[149])
    assert logvar.item() == np.float32(diffusion.posterior_log_variance_clipped[149])


# ------------------------------------------------------------------------------------------------
# training losses
# ------------------------------------------------------------------------------------------------
class _TinyEpsVar(torch.nn.Module):
    """A tiny learned-range model: 3 -> 6 channels, timestep-conditioned bias."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.temb = torch.nn.Linear(1, 6)

    def forward(self, x, ts):
        return self.conv(x) + self.temb(ts.float()[:, None] / 1000.0)[:, :, None, None]


@pytest.mark.parametrize("respacing", [None, "250"])
def test_training_losses(respacing):
    torch.manual_seed(0)
    diff = dm.create_gaussian_diffusion(timestep_respacing=respacing)
    model = _TinyEpsVar()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 1, diff.num_timesteps // 2, diff.num_timesteps - 1])
    terms = diff.training_losses(model, x0, t)
    assert set(terms) >= {"loss", "mse", "vb"}
    for k in ("loss", "mse", "vb"):
        assert terms[k].shape == (4,) and torch.isfinite(terms[k]).all(), k
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])
    assert (terms["vb"] >= 0).all()
    terms["loss"].mean().backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


def test_training_losses_values_and_stop_gradient():
    """mse is the eps MSE; vb only sends gradients to the variance channels (mean detached), and
    equals the explicit KL in bits/dim scaled by num_timesteps/1000."""
    diff = dm.create_gaussian_diffusion(timestep_respacing="250")
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 8, 8, generator=g)
    out = torch.randn(2, 6, 8, 8, generator=g).requires_grad_(True)
    t = torch.tensor([10, 200])
    terms = diff.training_losses(lambda x, ts: out, x0, t, noise=noise)
    assert torch.allclose(terms["mse"], ((noise - out[:, :3]) ** 2).mean(dim=(1, 2, 3)))

    # explicit VLB for comparison
    x_t = diff.q_sample(x0, t, noise=noise)
    true_mean, _, true_logvar = diff.q_posterior(x0, x_t, t)
    p = diff.p_mean_variance_from_output(out.detach(), x_t, t, clip_denoised=False)
    kl = dm.normal_kl(true_mean, true_logvar, p["mean"], p["log_variance"]).mean(dim=(1, 2, 3)) / np.log(2.0)
    assert torch.allclose(terms["vb"].detach(), kl * 250 / 1000.0, rtol=1e-5, atol=1e-7)

    (grad,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert grad[:, :3].abs().max() == 0, "vb must not reach the eps channels (stop-gradient on the mean)"
    assert grad[:, 3:].abs().max() > 0, "vb must train the variance channels"
    (grad,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad[:, 3:].abs().max() == 0 and grad[:, :3].abs().max() > 0

    # t = 0 uses the decoder NLL instead of the KL
    t0 = torch.tensor([0, 0])
    terms0 = diff.training_losses(lambda x, ts: out.detach(), x0, t0, noise=noise)
    x_t0 = diff.q_sample(x0, t0, noise=noise)
    p0 = diff.p_mean_variance_from_output(out.detach(), x_t0, t0, clip_denoised=False)
    nll = -dm.discretized_gaussian_log_likelihood(x0, p0["mean"], 0.5 * p0["log_variance"]).mean(dim=(1, 2, 3)) / np.log(2.0)
    assert torch.allclose(terms0["vb"], nll * 0.25, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# low-pass filter (Resizer down-up)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def filt(math_dir):
    return _load(math_dir, "filter.safetensors")


FILTER_CASES = [(64, 2), (64, 4), (64, 8), (64, 16), (512, 8), (512, 16)]


@pytest.mark.parametrize("S,N", FILTER_CASES)
def test_lowpass_internals(filt, meta, S, N):
    """Tap tables: same index table (exact) and float32 weights, dims processed in the recorded order."""
    lp = resample.LowPass((1, 3, S, S), N)
    rec = meta["filter"][f"S{S}_N{N}"]
    assert [m.dim for m in lp.down] == rec["down"]["sorted_dims"] == [3, 2]
    assert [m.dim for m in lp.up] == rec["up"]["sorted_dims"] == [2, 3]
    for part, mods in (("down", lp.down), ("up", lp.up)):
        for m in mods:
            key = f"S{S}_N{N}_{part}_dim{m.dim}"
            assert list(m.index.shape) == rec[part][f"dim{m.dim}"]["field_of_view_shape"]
            assert torch.equal(m.index, filt[key + "_field_of_view"]), key
            assert m.weights.dtype == torch.float32
            assert _maxdiff(m.weights, filt[key + "_weights"]) == 0.0, key


@pytest.mark.parametrize("N", [2, 4, 8, 16])
def test_lowpass_64(filt, N):
    lp = resample.LowPass((64, 64), N)
    x = filt["x64"]
    assert _maxdiff(lp.downsample(x), filt[f"x64_N{N}_down"]) <= ATOL32
    assert _maxdiff(lp(x), filt[f"x64_N{N}_up_down"]) <= ATOL32


def test_lowpass_512_N8(filt):
    x = filt["x512_u8"].to(torch.float32) / 128 - 1
    lp = resample.LowPass((1, 3, 512, 512), 8)
    assert _maxdiff(lp.downsample(x), filt["x512_N8_down"]) <= ATOL32
    assert _maxdiff(lp(x), filt["x512_N8_up_down"]) <= ATOL32


def test_lowpass_512_N16(filt, meta):
    x = filt["x512_u8"].to(torch.float32) / 128 - 1
    lp = resample.LowPass((1, 3, 512, 512), 16)
    assert _maxdiff(lp.downsample(x), filt["x512_N16_down"]) <= ATOL32
    y = lp(x)
    ck, st = meta["filter"]["x512_N16_up_down_checksum"], meta["filter"]["x512_N16_up_down_stats"]
    assert list(y.shape) == st["shape"]
    flat = y.flatten()
    assert flat[:3].tolist() == pytest.approx(ck["first"], abs=1e-7)
    assert flat[-1].item() == pytest.approx(ck["last"], abs=1e-7)
    assert y.double().sum().item() == pytest.approx(ck["sum"], rel=1e-9, abs=1e-6)
    assert y.double().abs().sum().item() == pytest.approx(ck["abs_sum"], rel=1e-9)
    assert y.min().item() == pytest.approx(st["min"], abs=1e-7)
    assert y.max().item() == pytest.approx(st["max"], abs=1e-7)


def test_lowpass_batch_and_errors():
    lp = resample.LowPass((32, 32), 8)
    x = torch.randn(3, 4, 32, 32)
    y = lp(x)
    for k in range(3):
        assert torch.equal(y[k:k + 1], lp(x[k:k + 1]))
    # projector-like: constant images are preserved, filtering twice is close to filtering once
    c = torch.full((1, 3, 32, 32), 0.3)
    assert torch.allclose(lp(c), c, atol=1e-6)
    with pytest.raises(ValueError):
        resample.LowPass((30, 32), 8)
    with pytest.raises(ValueError):
        lp(torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------------------------------------------
# consistency step and the end-to-end DT-BFR loop
# ------------------------------------------------------------------------------------------------
def test_consistency_step(diffusion, filt):
    t = int(filt["step_t"].item())
    assert t == 120
    q = diffusion.q_sample(filt["step_ref_img"], t - 1, noise=filt["step_q_noise"])
    assert _maxdiff(q, filt["step_q_sample_ref_t_minus_1"]) <= ATOL32
    lp = resample.LowPass((64, 64), 8)
    out = samplers.consistency_step(diffusion, filt["step_img"], filt["step_ref_img"], t, lp,
                                    noise=filt["step_q_noise"])
    assert _maxdiff(out, filt["step_out"]) <= ATOL32


def _fake_model(x, ts):
    """The documented mini_loop fake model (README E); ts are ORIGINAL timesteps."""
    return torch.cat([torch.tanh(x) * 0.5, (ts.float() / 999 * 2 - 1).view(-1, 1, 1, 1).expand_as(x)], 1)


@pytest.fixture(scope="module")
def mini(math_dir):
    return _load(math_dir, "mini_loop.safetensors")


def test_mini_loop_start_point(diffusion, mini, meta):
    torch.manual_seed(meta["mini_loop"]["torch_manual_seed"])
    y = diffusion.q_sample(mini["ref_img"], meta["mini_loop"]["start_timesteps"])
    assert _maxdiff(y, mini["y_t_start"]) <= ATOL32


def test_mini_loop_default_generator(diffusion, mini, meta):
    cfg = meta["mini_loop"]
    lp = resample.LowPass((cfg["image_size"], cfg["image_size"]), cfg["down_N"])
    steps = []
    torch.manual_seed(cfg["torch_manual_seed"])
    out = samplers.constrained_sample(_fake_model, mini["ref_img"], cfg["start_timesteps"], cfg["reg_end_timesteps"],
                                      lp, progress=lambda s, d, n: steps.append((s, d, n)), diffusion=diffusion)
    assert _maxdiff(out, mini["sample"]) <= ATOL32
    assert _maxdiff((out * 0.5 + 0.5).clamp(0, 1), mini["sample_01"]) <= ATOL32
    assert steps[-1] == ("diffusion", 150, 150) and len(steps) == 150


def test_mini_loop_explicit_generator(mini, meta):
    """A torch.Generator seeded like the default one gives the same stream (default diffusion, int N)."""
    cfg = meta["mini_loop"]
    g = torch.Generator().manual_seed(cfg["torch_manual_seed"])
    out = samplers.constrained_sample(_fake_model, mini["ref_img"], 150, 90, cfg["down_N"], generator=g)
    assert _maxdiff(out, mini["sample"]) <= ATOL32


def test_constrained_sample_batch_with_per_image_generators(mini):
    """One generator per image: each result equals the single-image run, whatever the batch."""
    x = torch.cat([mini["ref_img"], mini["ref_img"].flip(-1)])[:, :, :32, :32].contiguous()
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
    both = samplers.constrained_sample(_fake_model, x, 20, 10, 4, generator=gens())
    g = gens()
    one = samplers.constrained_sample(_fake_model, x[1:], 20, 10, 4, generator=g[1])
    assert torch.equal(both[1:], one)
    assert not torch.equal(both[0], both[1])
    with pytest.raises(samplers.SamplingCancelled):
        samplers.constrained_sample(_fake_model, x, 20, 10, 4, generator=gens(), should_cancel=lambda: True)


@pytest.mark.parametrize("T", [149, 90, 0])
def test_diffusers_ddpm_scheduler_cross_check(diffusion, pmv, meta, T):
    """diffusers' DDPMScheduler (learned_range, custom respaced timesteps) as an independent check.

    Measured with diffusers 0.42.1: single steps differ by <= 3e-6 (float32 schedule arithmetic:
    its alphas_cumprod is a float32 cumprod, ours float64 cast to float32, as the reference), its
    log variance at t=0 differs by ~37 (log(1e-20) instead of the clipped posterior variance; unused
    since no noise is added at t=0), it draws no noise at t=0 (the reference does), and a full
    150-step mini_loop run through it (same RNG order) ends 1.5e-5 away from the fixture. Close, but
    not the bit-exact reference process: that is why restoration.diffusion has its own process and samplers.
    """
    from diffusers import DDPMScheduler

    case = next(c for c in meta["p_mean_variance_cases"] if c["t_respaced"] == T)
    sch = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range",
                        clip_sample=True)
    sch.set_timesteps(timesteps=list(reversed(diffusion.timestep_map.tolist())))
    t_orig = int(diffusion.timestep_map[T])
    g = torch.Generator().manual_seed(case["p_sample_torch_manual_seed"])
    out = sch.step(pmv[f"t{T}_model_output"], t_orig, pmv[f"t{T}_x_t"], generator=g)
    assert _maxdiff(out.prev_sample, pmv[f"t{T}_p_sample_sample"]) < 1e-5
    assert _maxdiff(out.pred_original_sample, pmv[f"t{T}_pred_xstart"]) < 1e-5


# ------------------------------------------------------------------------------------------------
# fast schedule (DDIM)
# ------------------------------------------------------------------------------------------------
def test_ddim_timesteps():
    grid = samplers.ddim_timesteps(602, 25)
    assert len(grid) == 25 and grid[0] == 602 and grid[-1] == 0 and grid == sorted(grid, reverse=True)
    assert samplers.ddim_timesteps(3, 10) == [3, 2, 1, 0]


def test_ddim_step_matches_diffusers_ddim():
    """Our DDIM update equals diffusers' DDIMScheduler.step on its own fixed-stride grid (with
    use_clipped_model_output=True: like guided-diffusion we re-derive eps from the clipped x0;
    diffusers' default keeps the raw eps, which differs by O(1) wherever x0 is clipped)."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, set_alpha_to_one=True)
    sch.set_timesteps(25)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 8, 8, generator=g)
    eps = torch.randn(2, 3, 8, 8, generator=g)
    noise = torch.randn(2, 3, 8, 8, generator=g)
    t, t_prev = 400, 360
    for eta in (0.0, 1.0):
        ref = sch.step(eps, t, x, eta=eta, variance_noise=noise, use_clipped_model_output=True).prev_sample
        mine = samplers.ddim_step(x, eps, sch.alphas_cumprod[t], sch.alphas_cumprod[t_prev], eta=eta,
                                  noise=noise)["sample"]
        assert _maxdiff(mine, ref) <= 1e-5


def test_ddim_oracle_recovers_x0():
    """With a perfect eps predictor for x0, DDIM (eta=0) returns x0 from any start."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 16, 16, generator=g) * 1.6 - 0.8
    abar = dm.create_gaussian_diffusion().base_alphas_cumprod

    def oracle(x, ts):
        a = torch.tensor(abar[ts.cpu().numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
        return torch.cat([(x - a.sqrt() * x0) / (1 - a).sqrt(), torch.zeros_like(x)], 1)

    out = samplers.constrained_sample_ddim(oracle, x0, 150, 90, None, steps=10, eta=0.0, generator=g)
    assert _maxdiff(out, x0) <= 1e-4


def test_ddim_constrained_sample(mini):
    x0 = torch.cat([mini["ref_img"], mini["ref_img"].flip(-1)])[:, :, 16:48, 16:48].contiguous()
    lp = resample.LowPass((32, 32), 4)
    calls = []

    def model(x, ts):
        calls.append(int(ts[0]))
        return _fake_model(x, ts)

    run = lambda eta, **kw: samplers.constrained_sample_ddim(  # noqa: E731
        model, x0, 150, 90, lp, steps=10, eta=eta, generator=torch.Generator().manual_seed(5), **kw)
    a = run(0.0)
    assert len(calls) == 10 and calls[0] == 602 and calls[-1] == 0
    assert torch.equal(a, run(0.0)), "eta=0 must be deterministic for a fixed generator"
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6 and torch.isfinite(a).all()
    c = run(1.0)
    assert torch.isfinite(c).all() and not torch.equal(a, c)
    b = run(0.0, constraint_noise="initial")
    assert b.shape == a.shape and torch.isfinite(b).all()

    # The constraint keeps the result's low frequencies close to x0's. Test model: a denoiser that
    # knows x0's high frequencies, trusts the low frequencies of its input and hallucinates a
    # low-frequency shift (+0.3) at high noise (t >= 361); unconstrained sampling keeps the shift.
    abar = dm.create_gaussian_diffusion().base_alphas_cumprod
    x0, lp = mini["ref_img"] * 0.8, resample.LowPass((64, 64), 8)

    def drifting(x, ts):
        ab = torch.tensor(abar[ts.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
        x0_hat = x0 - lp(x0) + lp(x) / ab.sqrt() + torch.where(ts.view(-1, 1, 1, 1) >= 361, 0.3, 0.0)
        return torch.cat([(x - ab.sqrt() * x0_hat) / (1 - ab).sqrt(), torch.zeros_like(x)], 1)

    errs = {}
    for name, filt in (("constrained", lp), ("free", None)):
        out = samplers.constrained_sample_ddim(drifting, x0, 150, 90, filt, steps=25, eta=0.0,
                                               generator=torch.Generator().manual_seed(5))
        errs[name] = (lp(out) - lp(x0)).abs().mean().item()
    # measured when written: constrained 0.052, free 0.257
    assert errs["constrained"] < 0.15 and errs["constrained"] < 0.5 * errs["free"], errs


# ------------------------------------------------------------------------------------------------
# priors
# ------------------------------------------------------------------------------------------------
def test_iddpm_prior_with_callable_model(mini, meta):
    """IDDPMPrior over any callable: ancestral pseudo targets reproduce mini_loop's sample_01."""
    from restoration.diffusion.prior import IDDPMPrior

    prior = IDDPMPrior(_fake_model, image_size=64)
    assert prior.device == torch.device("cpu")
    x01 = mini["ref_img"] * 0.5 + 0.5
    out = prior.pseudo_targets(x01, start=150, constrain_until=90, down_N=8, schedule="ancestral",
                               generator=torch.Generator().manual_seed(meta["mini_loop"]["torch_manual_seed"]))
    assert _maxdiff(out, mini["sample_01"]) <= 1e-6
    fast = prior.pseudo_targets(torch.cat([x01, x01]), down_N=8, schedule="ddim", steps=5,
                                generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert fast.shape == (2, 3, 64, 64) and fast.min() >= 0 and fast.max() <= 1
    # other input sizes are resized to the prior's size and back
    small = prior.pseudo_targets(x01[:, :, ::2, ::2], down_N=8, schedule="ddim", steps=3,
                                 generator=torch.Generator().manual_seed(0))
    assert small.shape == (1, 3, 32, 32)
    x_t = prior.noise_image(x01, 50, generator=torch.Generator().manual_seed(0))
    x0_hat = prior.denoise_x0(x_t, 50)
    assert x0_hat.shape == x01.shape and x0_hat.abs().max() <= 1
    with pytest.raises(ValueError):
        prior.pseudo_targets(x01, schedule="dpm")


def test_iddpm_prior_with_iddpm_unet(compat_dir):
    """Wiring to our iddpm_unet (golden_small config, random init): runs, right shapes and range."""
    from restoration.models.archs import build
    from restoration.diffusion.prior import IDDPMPrior

    cfg_file = compat_dir / "iddpm_unet" / "golden_small" / "config.json"
    if not cfg_file.is_file():
        pytest.fail(f"compat fixture missing: {cfg_file}")
    unet = build("iddpm_unet", json.loads(cfg_file.read_text())["constructor_kwargs"])
    prior = IDDPMPrior(unet)
    assert prior.image_size == 32
    x01 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = prior.pseudo_targets(x01, down_N=8, schedule="ddim", steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1


def test_iddpm_prior_from_zoo(compat_dir, tmp_path):
    from restoration.models.archs import build
    from restoration.diffusion.prior import IDDPMPrior
    from restoration.models.zoo import Zoo

    cfg = json.loads((compat_dir / "iddpm_unet" / "golden_small" / "config.json").read_text())["constructor_kwargs"]
    zoo = Zoo(root=tmp_path, builtin_dir=None)
    zoo.register("tiny-prior", "iddpm_unet", cfg, build("iddpm_unet", cfg).state_dict(), kind="prior",
                 input_size=32, value_range=[-1, 1], extra={"diffusion": {"timestep_respacing": "100"}})
    prior = IDDPMPrior.from_zoo("tiny-prior", zoo=zoo)
    assert prior.image_size == 32 and prior.diffusion.num_timesteps == 100
    x_t = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert prior.denoise_x0(x_t, 10).shape == (1, 3, 32, 32)


def _tiny_unet(out_channels: int):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=3, out_channels=out_channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)


@pytest.mark.parametrize("out_channels", [6, 3])
def test_diffusers_prior_roundtrip(tmp_path, out_channels):
    from restoration.diffusion.prior import DiffusersPrior

    unet = _tiny_unet(out_channels).eval()
    unet.save_pretrained(str(tmp_path))
    prior = DiffusersPrior.from_pretrained(tmp_path)
    assert prior.image_size == 16
    assert prior.diffusion.learn_sigma == (out_channels == 6)
    assert prior.diffusion.num_timesteps == 250
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ts = torch.tensor([598, 3])
    with torch.no_grad():
        assert torch.equal(prior.model_fn(x, ts), unet(x, ts).sample)
    x01 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    run = lambda schedule, x: prior.pseudo_targets(  # noqa: E731
        x, start=6, constrain_until=3, down_N=4, schedule=schedule, steps=2, generator=torch.Generator().manual_seed(3))
    a = run("ddim", x01)
    assert a.shape == x01.shape and torch.equal(a, run("ddim", x01)) and a.min() >= 0 and a.max() <= 1
    a = run("ancestral", x01[:1])
    assert a.shape == (1, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    x0_hat = prior.denoise_x0(prior.noise_image(x01, 100), torch.tensor([100, 20]))
    assert x0_hat.shape == x01.shape and x0_hat.abs().max() <= 1


def test_diffusers_prior_reads_scheduler_config(tmp_path):
    from diffusers import DDPMScheduler

    from restoration.diffusion.prior import DiffusersPrior

    _tiny_unet(3).save_pretrained(str(tmp_path / "unet"))
    DDPMScheduler(num_train_timesteps=500, beta_start=0.0002, beta_end=0.03, variance_type="fixed_large").save_pretrained(
        str(tmp_path / "scheduler"))
    prior = DiffusersPrior.from_pretrained(tmp_path, timestep_respacing="100")
    d = prior.diffusion
    assert d.num_base_timesteps == 500 and d.num_timesteps == 100 and not d.learn_sigma and not d.sigma_small
    assert d.base_betas[0] == pytest.approx(0.0002) and d.base_betas[-1] == pytest.approx(0.03)
