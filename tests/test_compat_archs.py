"""Checkpoint compatibility of our own architectures against the kit in shared/compat (README sections A and B).

(a) the full published config has exactly the reference state_dict layout (so public checkpoints load strictly);
(b) a small config with seeded weights reproduces the reference forward outputs (golden_small);
(c) the full config with recipe weights reproduces the reference probe values (full_config_probe.json).
A missing fixture is a failure, never a skip.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from compat_recipe import checksum, load_recipe, recipe_tensor
from safetensors.torch import load_file

from restoration.models.archs import ARCHS, build

ARCH_NAMES = ["swinir_face", "iddpm_unet"]
# Full-size forwards that are too heavy for the shared CI CPUs run only with FACEADAPT_SLOW_TESTS=1.
SLOW_PROBES = {"iddpm_unet"}
SLOW = os.environ.get("FACEADAPT_SLOW_TESTS") == "1"


def _require(path: Path) -> Path:
    if not path.is_file():
        pytest.fail(f"compat fixture missing: {path}")
    return path


def _json(path: Path) -> dict:
    return json.loads(_require(path).read_text())


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _assert_checksum(got: dict, expected: dict, rel: float, what: str) -> None:
    for field in ("sum", "abs_sum", "first", "last"):
        assert got[field] == pytest.approx(expected[field], rel=rel, abs=1e-9), f"{what}: {field}"


def _probe_input(spec: dict) -> torch.Tensor:
    """The probe input: seeded uint8 image, scaled as full_config_probe.json["input"]["x"] says."""
    x_u8 = torch.randint(0, 256, (1, 3, 512, 512), generator=torch.Generator().manual_seed(31337), dtype=torch.uint8)
    assert "manual_seed(31337)" in spec["x_u8"]
    _assert_checksum(checksum(x_u8.float()), spec["x_u8_checksum"], rel=0, what="probe input")
    x = x_u8.to(torch.float32)
    if spec["x"].startswith("x_u8.to(torch.float32) / 255.0"):
        return x / 255.0
    if spec["x"].startswith("x_u8.to(torch.float32) / 128.0 - 1.0"):
        return x / 128.0 - 1.0
    raise AssertionError(f"unknown probe input rule: {spec['x']}")


def _call_args(call: str, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Positional tensors for a call string like ``model(x, timesteps)``."""
    match = re.fullmatch(r"model\((.*)\)", call.strip())
    assert match, f"unsupported call {call!r}"
    return [inputs[name.strip()] for name in match.group(1).split(",")]


def test_registry():
    assert set(ARCH_NAMES) <= set(ARCHS)
    with pytest.raises(ValueError, match="known: "):
        build("nope", {})
    with pytest.raises(TypeError, match="iddpm_unet"):
        build("iddpm_unet", {"no_such_kwarg": 1})


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_full_config_structure(arch, compat_dir):
    manifest = _json(compat_dir / arch / "manifest.json")
    # Built on the meta device: only names, shapes and dtypes matter here, no memory for 160M parameters.
    with torch.device("meta"):
        model = build(arch, manifest["config"]["constructor_kwargs"])
    layout = [[k, list(v.shape), _dtype_name(v)] for k, v in model.state_dict().items()]
    assert layout == manifest["state_dict"]
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["state_dict_numel"]
    persistent_buffers = set(model.state_dict()) - {k for k, _ in model.named_parameters()}
    assert persistent_buffers == set(manifest["buffer_keys"])


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_golden_small(arch, compat_dir):
    d = compat_dir / arch / "golden_small"
    cfg = _json(d / "config.json")
    model = build(arch, cfg["constructor_kwargs"]).eval()
    weights = load_file(_require(d / "weights.safetensors"))
    # buffers the constructor computes (attn_mask, relative_position_index) must equal the reference's
    for key, buf in model.named_buffers():
        if key in weights:
            assert torch.equal(buf, weights[key]), key
    model.load_state_dict(weights, strict=True)
    assert sum(p.numel() for p in model.parameters()) == cfg["param_count"]
    inputs = load_file(_require(d / "inputs.safetensors"))
    refs = load_file(_require(d / "outputs.safetensors"))
    with torch.no_grad():
        for call in cfg["calls"]:
            out = model(*_call_args(call["call"], inputs))
            ref = refs[call["output"]]
            assert out.shape == ref.shape
            diff = (out - ref).abs().max().item()
            assert torch.allclose(out, ref, rtol=0, atol=1e-5), f"{call['output']}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_full_config_probe(arch, compat_dir):
    manifest = _json(compat_dir / arch / "manifest.json")
    probe = _json(compat_dir / arch / "full_config_probe.json")
    if arch in SLOW_PROBES and not SLOW:
        pytest.skip("full-size forward; set FACEADAPT_SLOW_TESTS=1")
    assert probe["recipe"]["base_seed"] == 100000

    index = {key: i for i, (key, _, _) in enumerate(manifest["state_dict"])}
    for key, expected in probe["weight_checksums_sample"].items():
        shape = manifest["state_dict"][index[key]][1]
        _assert_checksum(checksum(recipe_tensor(index[key], key, shape)), expected, rel=1e-6, what=key)

    model = build(arch, manifest["config"]["constructor_kwargs"]).eval()
    load_recipe(model, manifest["state_dict"])
    x = _probe_input(probe["input"])
    args = [x]
    if "timesteps" in probe["input"]:  # e.g. "torch.tensor([598], dtype=torch.int64)  (= ...)"
        match = re.match(r"torch\.tensor\(\[(\d+)\], dtype=torch\.int64\)", probe["input"]["timesteps"])
        args.append(torch.tensor([int(match.group(1))], dtype=torch.int64))
    with torch.no_grad():
        out = model(*args)

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


def _small_swinir(**overrides) -> torch.nn.Module:
    cfg = dict(
        img_size=16, embed_dim=16, depths=[2], num_heads=[2], window_size=8, mlp_ratio=2, sf=4,
        upsampler="nearest+conv", unshuffle=True, unshuffle_scale=4,
    )
    return build("swinir_face", cfg | overrides)


@pytest.mark.parametrize("scale", [2, 4, 8])
def test_swinir_other_scales(scale):
    model = _small_swinir(sf=scale, unshuffle_scale=scale).eval()
    ups = {k.split(".")[0] for k in model.state_dict() if k.startswith("conv_up")}
    assert ups == {f"conv_up{i}" for i in range(1, scale.bit_length())}
    size = 16 * scale  # token grid 16x16 == img_size: the stored attn_mask is used
    with torch.no_grad():
        assert model(torch.rand(1, 3, size, size)).shape == (1, 3, size, size)


def test_swinir_input_sizes():
    model = _small_swinir().eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        # a few pixels short of a multiple of 32 (unshuffle 4 x window 8): reflect-padded, output cropped back
        short = model(x[..., :62, :60])
        assert short.shape == (1, 3, 62, 60)
        padded = torch.nn.functional.pad(x[..., :62, :60], (0, 4, 0, 2), mode="reflect")
        assert torch.equal(short, model(padded)[..., :62, :60])
        with pytest.raises(ValueError, match="multiples of 32"):
            model(torch.rand(1, 3, 40, 64))


def test_swinir_training_step():
    model = _small_swinir(use_checkpoint=True, ape=True, resi_connection="3conv").train()
    model(torch.rand(2, 3, 64, 64)).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(
    "overrides",
    [{}, {"resblock_updown": True}, {"use_new_attention_order": True}, {"num_classes": 3}, {"num_res_blocks": 1}],
)
def test_iddpm_unet_options(overrides):
    cfg = dict(
        image_size=16, in_channels=3, model_channels=32, out_channels=6, num_res_blocks=[1, 1],
        attention_resolutions=[8], channel_mult=[1, 2], num_head_channels=32, use_scale_shift_norm=True,
    )
    model = build("iddpm_unet", cfg | overrides)
    y = torch.tensor([0, 2]) if "num_classes" in overrides else None
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]), y)
    assert out.shape == (2, 6, 16, 16)
    out.square().mean().backward()
