"""restoration.diffusion against the compat fixtures in shared/compat/iddpm_diffusion_math (README E).

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

from restoration import diffusion as dm

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
    # computed with the same float64 operations: exact
    np.testing.assert_array_equal(mine, ref, err_msg=f"{name}: max abs diff {np.abs(mine - ref).max():.3g}")


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
