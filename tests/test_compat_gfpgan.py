"""GFPGAN v1.4 (GFPGANv1Clean) against the compat kit in shared/compat/gfpgan_v1_4 (README section C).

(a) the full published config has exactly the reference state_dict layout (so GFPGANv1.4.pth loads strictly);
(b) golden_small: the deterministic call, the intermediate RGBs, and the GFPGANer call with seeded random noise
    (both through the default generator and with the stored noise maps passed explicitly);
(c) the full config with recipe weights reproduces full_config_probe.json (about 10 s on one CPU thread, so it runs
    in the default suite).
A missing fixture is a failure, never a skip.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compat_recipe import checksum, load_recipe, recipe_tensor
from safetensors.torch import load_file

from restoration.models.archs import ARCHS, build
from restoration.models.archs.gfpgan import GFPGANv1Clean
from restoration.models.checkpoints import KNOWN_CHECKPOINTS

ARCH = "gfpgan_v1_4"
ATOL = 1e-5


def _require(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"compat fixture missing: {path}")
    return path


def _json(path: Path) -> dict:
    return json.loads(_require(path).read_text())


@pytest.fixture(scope="module")
def kit(compat_dir) -> Path:
    return compat_dir / ARCH


@pytest.fixture(scope="module")
def golden(kit):
    d = kit / "golden_small"
    cfg = _json(d / "config.json")
    model = build(ARCH, cfg["constructor_kwargs"]).eval()
    model.load_state_dict(load_file(_require(d / "weights.safetensors")), strict=True)
    return cfg, model, load_file(_require(d / "inputs.safetensors")), load_file(_require(d / "outputs.safetensors"))


def _close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert out.shape == ref.shape, what
    diff = (out - ref).abs().max().item()
    assert torch.allclose(out, ref, rtol=0, atol=ATOL), f"{what}: max abs diff {diff:.3g}"


def test_registered():
    assert ARCHS[ARCH] is GFPGANv1Clean
    known = KNOWN_CHECKPOINTS["gfpgan-v1.4"]
    assert known.arch == ARCH and tuple(known.value_range) == (-1.0, 1.0) and known.input_size == 512


def test_full_config_structure(kit):
    manifest = _json(kit / "manifest.json")
    assert KNOWN_CHECKPOINTS["gfpgan-v1.4"].config == manifest["config"]["constructor_kwargs"]
    with torch.device("meta"):
        model = build(ARCH, manifest["config"]["constructor_kwargs"])
    layout = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert layout == manifest["state_dict"]
    assert len(layout) == manifest["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["state_dict_numel"]
    persistent_buffers = set(model.state_dict()) - {k for k, _ in model.named_parameters()}
    assert persistent_buffers == set(manifest["buffer_keys"])


def test_golden_small_deterministic(golden):
    cfg, model, inputs, refs = golden
    assert sum(p.numel() for p in model.parameters()) == cfg["param_count"]
    assert len(model.state_dict()) == cfg["num_state_dict_keys"]
    with torch.no_grad():
        image, rgbs = model(inputs["x"], return_rgb=False, randomize_noise=False)
        assert rgbs == []
        _close(image, refs["image"], "image")
        image2, rgbs = model(inputs["x"], return_rgb=True, randomize_noise=False)
    assert torch.equal(image, image2)
    assert len(rgbs) == 4
    for i, rgb in enumerate(rgbs):
        _close(rgb, refs[f"out_rgb_{i}"], f"out_rgb_{i}")


def test_golden_small_gfpganer_call(golden):
    """`torch.manual_seed(1234); model(x, return_rgb=False, weight=0.5)[0]`: fresh noise per StyleConv, in layer order."""
    _, model, inputs, refs = golden
    ref = refs["image_gfpganer_call_seed1234"]
    noise = [inputs[f"gfpganer_call_noise_{i}"] for i in range(model.stylegan_decoder.num_layers)]
    assert f"gfpganer_call_noise_{len(noise)}" not in inputs
    with torch.no_grad():
        torch.manual_seed(1234)
        _close(model(inputs["x"], return_rgb=False, weight=0.5)[0], ref, "seeded GFPGANer call")
        _close(model(inputs["x"], return_rgb=False, noise=noise)[0], ref, "explicit noise maps")
        # the noise matters: another seed gives another image
        torch.manual_seed(4321)
        assert (model(inputs["x"], return_rgb=False)[0] - ref).abs().max() > 1e-3


def test_input_size_checked(golden):
    _, model, _, _ = golden
    with pytest.raises(ValueError, match="64x64"):
        model(torch.zeros(1, 3, 32, 32))


def test_training_step_small():
    cfg = dict(out_size=32, num_style_feat=16, channel_multiplier=2, fix_decoder=True, num_mlp=2,
               input_is_latent=True, different_w=True, narrow=0.0625, sft_half=True)
    model = build(ARCH, cfg).train()
    decoder = {id(p) for p in model.stylegan_decoder.parameters()}
    assert all(not p.requires_grad for p in model.stylegan_decoder.parameters())
    image, rgbs = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    (image.square().mean() + sum(r.square().mean() for r in rgbs)).backward()
    for name, p in model.named_parameters():
        if id(p) not in decoder:
            assert p.grad is not None, name


def test_full_config_probe(kit):
    manifest = _json(kit / "manifest.json")
    probe = _json(kit / "full_config_probe.json")
    assert probe["recipe"]["base_seed"] == 100000
    rows = manifest["state_dict"]
    index = {key: i for i, (key, _, _) in enumerate(rows)}
    for key, expected in probe["weight_checksums_sample"].items():
        got = checksum(recipe_tensor(index[key], key, rows[index[key]][1]))
        for field in ("sum", "abs_sum", "first", "last"):
            assert got[field] == pytest.approx(expected[field], rel=1e-6, abs=1e-9), f"{key}: {field}"

    model = build(ARCH, manifest["config"]["constructor_kwargs"]).eval()
    load_recipe(model, rows)
    spec = probe["input"]
    assert "manual_seed(31337)" in spec["x_u8"] and spec["x"].startswith("x_u8.to(torch.float32) / 128.0 - 1.0")
    x_u8 = torch.randint(0, 256, (1, 3, 512, 512), generator=torch.Generator().manual_seed(31337), dtype=torch.uint8)
    assert checksum(x_u8.float())["sum"] == spec["x_u8_checksum"]["sum"]
    x = x_u8.to(torch.float32) / 128.0 - 1.0
    assert probe["call"].startswith("model(x, return_rgb=False, randomize_noise=False)[0]")
    with torch.no_grad():
        out = model(x, return_rgb=False, randomize_noise=False)[0]

    expected = probe["output"]
    assert list(out.shape) == expected["stats"]["shape"]
    tol = dict(rel=1e-4, abs=1e-4)
    coords = expected["probe_coords_hw"]
    assert len(expected["probe_values"]) == out.shape[1]
    for c, row in enumerate(expected["probe_values"]):  # probe_values[channel][coordinate]
        assert [out[0, c, h, w].item() for h, w in coords] == pytest.approx(row, **tol), f"channel {c}"
    assert out.mean().item() == pytest.approx(expected["stats"]["mean"], **tol)
    assert out.std().item() == pytest.approx(expected["stats"]["std"], **tol)
    got = checksum(out)
    assert got["sum"] == pytest.approx(expected["checksum"]["sum"], rel=1e-4)
    assert got["abs_sum"] == pytest.approx(expected["checksum"]["abs_sum"], rel=1e-4)
