"""Degradation pipeline and metrics: reproducibility, ranges, parameter effects, known values."""
from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch
import torchvision
from scipy.signal import convolve2d

from restoration.degrade.damage import (
    DEFAULT,
    DOMAIN_SHIFT,
    DegradationParams,
    apply_degradation,
    degrade,
    degrade_batch,
    gaussian_kernel,
    sample_degradation,
)
from restoration.faces.imageio import load_image
from restoration.metrics.lpips import LPIPS, LPIPSUnavailable, backbone_features, lpips_available
from restoration.metrics.quality import lowpass_psnr, psnr, sharpness, ssim, ssim_map

NO_DEGRADATION = DegradationParams(blur_prob=0.0, downsample_prob=0.0, noise_prob=0.0, jpeg_prob=0.0)


@pytest.fixture(scope="module")
def face(shared_dir) -> np.ndarray:
    """A real 512 face reduced to 128 (float [0, 1]) to keep the tests light."""
    path = sorted((shared_dir / "data" / "hq512").rglob("*.png"))[0]
    img = load_image(path)
    return cv2.resize(img, (128, 128), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


# ------------------------------------------------------------------------------ degrade
@pytest.mark.parametrize("params", [DEFAULT, DOMAIN_SHIFT], ids=["default", "domain_shift"])
def test_degrade_reproducible_shape_range(face, params):
    a = degrade(face, params, np.random.default_rng(123))
    b = degrade(face, params, np.random.default_rng(123))
    c = degrade(face, params, np.random.default_rng(124))
    assert a.shape == face.shape and a.dtype == np.float32
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert np.array_equal(a, b), "same seed must give the same output"
    assert not np.array_equal(a, c), "another seed should give another output"
    assert not np.array_equal(a, face)


def test_degrade_int_seed_and_info(face):
    out, info = degrade(face, DEFAULT, 7, return_info=True)
    again = apply_degradation(face, info)
    assert np.array_equal(out, again)
    assert set(info) >= {"blur", "downsample", "noise", "jpeg", "color_cast"}
    assert 30 <= info["jpeg"]["quality"] <= 90


def test_degrade_non_square_and_uint8(face):
    img = (face[:, :100] * 255).astype(np.uint8)
    out = degrade(img, DEFAULT, 0)
    assert out.shape == (128, 100, 3) and out.dtype == np.float32


def test_identity_params_change_nothing(face):
    assert np.array_equal(degrade(face, NO_DEGRADATION, 0), np.clip(face, 0, 1))


def test_params_effect_monotonic(face):
    """Stronger settings degrade more: blur lowers sharpness, noise raises error, JPEG quality matters."""
    only_blur = lambda s: replace(  # noqa: E731
        NO_DEGRADATION, blur_prob=1.0, blur_sigma=(s, s), kernel_types=("iso",), kernel_probs=(1.0,), scale_with_size=False
    )
    mild, strong = degrade(face, only_blur(0.5), 0), degrade(face, only_blur(4.0), 0)
    assert sharpness(strong) < sharpness(mild) < sharpness(face)

    only_noise = lambda s: replace(NO_DEGRADATION, noise_prob=1.0, noise_sigma=(s, s))  # noqa: E731
    e_small = psnr(degrade(face, only_noise(2 / 255), 0), face)
    e_big = psnr(degrade(face, only_noise(20 / 255), 0), face)
    assert e_big < e_small

    only_jpeg = lambda q: replace(NO_DEGRADATION, jpeg_prob=1.0, jpeg_quality=(q, q))  # noqa: E731
    assert psnr(degrade(face, only_jpeg(10), 0), face) < psnr(degrade(face, only_jpeg(95), 0), face)

    only_down = lambda r: replace(NO_DEGRADATION, downsample_prob=1.0, downsample=(r, r), scale_with_size=False)  # noqa: E731
    assert psnr(degrade(face, only_down(8.0), 0), face) < psnr(degrade(face, only_down(1.5), 0), face)


def test_noise_sigma_is_calibrated():
    flat = np.full((128, 128, 3), 0.5, np.float32)
    p = replace(NO_DEGRADATION, noise_prob=1.0, noise_sigma=(0.05, 0.05))
    out = degrade(flat, p, 1)
    assert abs(float((out - flat).std()) - 0.05) < 0.003
    # gray noise: the same noise on every channel
    g = degrade(flat, replace(p, gray_noise_prob=1.0), 1)
    assert np.allclose(g[..., 0], g[..., 1]) and np.allclose(g[..., 1], g[..., 2])
    # correlated noise keeps its standard deviation
    c = degrade(flat, replace(p, noise_correlation=(1.0, 1.0)), 1)
    assert abs(float((c - flat).std()) - 0.05) < 0.005


def test_size_scaling():
    p = DegradationParams()
    small = p.scaled_for(128)
    assert small.blur_sigma[1] == pytest.approx(2.5) and small.downsample == (1.0, 3.0)
    assert small.kernel_size % 2 == 1 and small.kernel_size >= 3
    assert p.scaled_for(512) is p
    assert replace(p, scale_with_size=False).scaled_for(128).downsample == (1.0, 12.0)
    info = sample_degradation(p, np.random.default_rng(0), (128, 128, 3))
    if info["downsample"]:
        assert min(info["downsample"]["size"]) >= 128 / 3 - 1


def test_domain_shift_is_outside_the_training_distribution():
    assert DOMAIN_SHIFT.jpeg_quality[1] < DEFAULT.jpeg_quality[0]
    assert DOMAIN_SHIFT.color_cast_prob == 1.0 and DOMAIN_SHIFT.color_cast_gains != (1.0, 1.0, 1.0)
    assert DOMAIN_SHIFT.poisson_prob == 1.0 and DEFAULT.poisson_prob == 0.0
    flat = np.full((96, 96, 3), 0.5, np.float32)
    out = degrade(flat, DOMAIN_SHIFT, 0)
    r, g, b = out.reshape(-1, 3).mean(0)
    assert r > g > b, "the warm cast should show on a grey image"


def test_params_validation_and_dict_roundtrip():
    with pytest.raises(ValueError):
        DegradationParams(blur_sigma=(5.0, 1.0))
    with pytest.raises(ValueError):
        DegradationParams(jpeg_quality=(0, 90))
    with pytest.raises(ValueError):
        DegradationParams(noise_prob=1.5)
    d = DOMAIN_SHIFT.to_dict()
    assert DegradationParams.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}) == DOMAIN_SHIFT


def test_gaussian_kernel():
    k = gaussian_kernel(21, 3.0, 1.0, math.pi / 4)
    assert k.shape == (21, 21) and k.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.allclose(k, k[::-1, ::-1])  # point symmetric
    assert not np.allclose(k, k.T[::-1])  # anisotropic and rotated: not symmetric under a 90 degree turn
    iso = gaussian_kernel(21, 2.0)
    assert np.allclose(iso, iso.T)


def test_degrade_batch(face):
    hq = torch.from_numpy(np.stack([face, face[::-1].copy()])).permute(0, 3, 1, 2)
    lq, hq2 = degrade_batch(hq, DEFAULT, 0)
    assert lq.shape == hq.shape == hq2.shape and lq.dtype == torch.float32
    assert torch.allclose(hq2, hq)
    lq_again, _ = degrade_batch(hq, DEFAULT, 0)
    assert torch.equal(lq, lq_again)


# ------------------------------------------------------------------------------ metrics
def _ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """A plain 2-D 'valid' convolution SSIM, written independently of restoration.metrics.quality."""
    ax = np.arange(11) - 5
    w = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for ch in range(a.shape[2]):
        x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
        f = lambda z: convolve2d(z, w, mode="valid")  # noqa: E731
        mx, my = f(x), f(y)
        vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
        m = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
        vals.append(m.mean())
    return float(np.mean(vals))


def test_psnr_ssim_identity():
    rng = np.random.default_rng(0)
    x = rng.random((32, 40, 3))
    assert psnr(x, x) == math.inf
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    t = torch.from_numpy(x).permute(2, 0, 1)[None].float()
    assert psnr(t, t) == math.inf
    assert ssim(t, t) == pytest.approx(1.0, abs=1e-6)


def test_psnr_known_values():
    rng = np.random.default_rng(1)
    x = np.full((256, 256, 3), 0.5)
    sigma = 0.05
    noisy = x + rng.normal(0, sigma, x.shape)
    assert psnr(noisy, x) == pytest.approx(20 * math.log10(1 / sigma), abs=0.05)
    u8 = np.full((8, 8, 3), 100, np.uint8)
    assert psnr(u8 + 1, u8) == pytest.approx(20 * math.log10(255), abs=1e-9)  # uint8 taken as /255
    assert psnr(u8 + 1, u8, data_range=255.0) == pytest.approx(20 * math.log10(255), abs=1e-9)
    # batch: per-image values and their mean
    a = torch.zeros(2, 3, 16, 16)
    b = a.clone()
    b[0] += 0.1
    b[1] += 0.01
    per = psnr(a, b, reduction="none")
    assert per.tolist() == pytest.approx([20.0, 40.0], abs=1e-4)
    assert psnr(a, b) == pytest.approx(30.0, abs=1e-4)


def test_ssim_matches_reference_and_known_value(face):
    rng = np.random.default_rng(2)
    noisy = np.clip(face + rng.normal(0, 0.1, face.shape), 0, 1)
    assert ssim(noisy, face) == pytest.approx(_ssim_reference(noisy, face), abs=1e-7)
    t = lambda z: torch.from_numpy(np.asarray(z, np.float32)).permute(2, 0, 1)[None]  # noqa: E731
    assert ssim(t(noisy), t(face)) == pytest.approx(_ssim_reference(noisy, face), abs=1e-5)
    # flat grey + white noise of sigma s: SSIM ~ C2 / (s^2 + C2) (the contrast-structure term)
    flat = np.full((128, 128, 3), 0.5)
    n = flat + rng.normal(0, 0.05, flat.shape)
    assert 0.25 < ssim(n, flat) < 0.31
    assert 0.0 < ssim(noisy, face, channel="y") < 1.0
    assert ssim(noisy, face) < ssim(np.clip(face + rng.normal(0, 0.02, face.shape), 0, 1), face)


def test_metric_input_checks():
    with pytest.raises(ValueError):
        psnr(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))
    with pytest.raises(ValueError):
        ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))


def test_sharpness_and_lowpass_psnr(face):
    blurred = cv2.GaussianBlur(face, (0, 0), 2.0)
    assert sharpness(blurred) < sharpness(face)
    assert sharpness(np.full((32, 32, 3), 0.3)) == 0.0
    assert sharpness((face * 255).astype(np.uint8)) == pytest.approx(sharpness(face), rel=0.05)
    # blur keeps the low frequencies: consistent at factor 8, not at factor 1
    assert lowpass_psnr(blurred, face, 8) > lowpass_psnr(blurred, face, 1) + 5
    assert lowpass_psnr(face, face, 4) == math.inf
    # a larger output (2x upscale) is compared at the input's low-pass size
    up = cv2.resize(face, (256, 256), interpolation=cv2.INTER_CUBIC)
    assert lowpass_psnr(up, face, 4) > 30
    # match_color: a global per-channel gain (a colour cast removed or added) is not lost content; a moved face is
    cast = np.clip(face * np.array([0.87, 0.97, 1.2]), 0, 1)
    assert lowpass_psnr(cast, face, 4) < 30 < lowpass_psnr(cast, face, 4, match_color=True)
    moved = np.roll(face, 8, axis=1)
    assert lowpass_psnr(moved, face, 4, match_color=True) < 25


def test_lpips_available_or_skip():
    ok, reason = lpips_available()
    assert isinstance(ok, bool) and reason
    if not ok:
        assert "unavailable" in reason
        with pytest.raises(LPIPSUnavailable):
            LPIPS()
        pytest.skip(reason)
    m = LPIPS()
    x = torch.rand(1, 3, 64, 64)
    assert float(m(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(m(x, torch.rand(1, 3, 64, 64))) > 0


def test_lpips_forward_with_stand_in_weights(tmp_path):
    """The LPIPS code path with random stand-in weights (the real ones are not on disk)."""
    torch.manual_seed(0)
    feats = torchvision.models.alexnet(weights=None).features.state_dict()
    bb = tmp_path / "alexnet.pth"
    torch.save({f"features.{k}": v for k, v in feats.items()}, bb)
    lin = tmp_path / "alex.pth"
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))}, lin)
    m = LPIPS("alex", backbone_path=bb, lin_path=lin)
    x = torch.rand(2, 3, 64, 64)
    d0 = m(x, x)
    assert d0.shape == (2,) and torch.allclose(d0, torch.zeros(2))
    d1 = m(x, (x + 0.3 * torch.rand_like(x)).clamp(0, 1))
    assert (d1 > 0).all()


def test_lpips_backbone_is_torchvision_features():
    """The backbone stacks written out in metrics.lpips are torchvision's `features`, layer for layer."""
    for net, tv in (("alex", torchvision.models.alexnet), ("vgg", torchvision.models.vgg16)):
        ref = tv(weights=None).features
        ours = backbone_features(net)
        shapes = lambda m: [(k, v.shape) for k, v in m.state_dict().items()]  # noqa: E731
        assert shapes(ours) == shapes(ref)
        assert [type(m) for m in ours] == [type(m) for m in ref]
        ours.load_state_dict(ref.state_dict())
        x = torch.rand(1, 3, 64, 64)
        assert torch.equal(ours(x), ref(x.clone()))


def test_ssim_map_is_the_ssim_and_differentiable(face):
    rng = np.random.default_rng(3)
    noisy = np.clip(face + rng.normal(0, 0.1, face.shape), 0, 1)
    t = lambda z: torch.from_numpy(np.asarray(z, np.float64)).permute(2, 0, 1)[None]  # noqa: E731
    # the evaluation SSIM is the mean of the map computed in float64 (equal up to the order of the sums: torch's mean
    # splits its reduction by the threads it has, so the last bits differ on a loaded machine)
    assert ssim(noisy, face) == pytest.approx(float(ssim_map(t(noisy), t(face)).mean()), rel=1e-12, abs=1e-14)
    # the map keeps the inputs' dtype and the autograd graph
    a = t(noisy).float().requires_grad_(True)
    m = ssim_map(a, t(face).float())
    assert m.dtype == torch.float32 and m.shape == (1, 3, 118, 118)
    (1 - m.mean()).backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0
    assert float(m.detach().mean()) == pytest.approx(ssim(noisy, face), abs=1e-5)


def test_detail_recovered_counts_only_the_references_own_detail():
    import cv2

    from restoration.metrics import detail_recovered

    rng = np.random.default_rng(0)
    ref = np.clip(cv2.GaussianBlur(rng.random((64, 64, 3)), (0, 0), 0.7), 0, 1)
    assert detail_recovered(ref, ref) == pytest.approx(1.0)
    blurred = cv2.GaussianBlur(ref, (0, 0), 1.5)
    assert 0.0 < detail_recovered(blurred, ref) < 0.6
    noise = np.clip(ref.mean() + 0.2 * rng.standard_normal(ref.shape), 0, 1)  # texture, not the reference's
    assert abs(detail_recovered(noise, ref)) < 0.1
    with pytest.raises(ValueError, match="differ in shape"):
        detail_recovered(ref[:32], ref)
