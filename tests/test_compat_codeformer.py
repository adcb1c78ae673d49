"""CodeFormer against the compat kit in shared/compat/codeformer (README section D), plus small-config behaviour.

(a) the published config has exactly the reference state_dict layout (so codeformer.pth loads strictly), and the
    constructor's hard-coded tables (channels, fusion taps) equal the reference's;
(b) the weight recipe reproduces every per-key checksum of golden_small/weights_recipe.json;
(c) golden_small: the published config filled with the recipe, ``model(x, w=0.5, adain=True)`` reproduces ``out``,
    ``logits`` and ``lq_feat`` (atol 1e-4) and the selected codes exactly. One full 512x512 forward (about 20 s on
    one CPU thread); the output statistics for the other arguments (w=0, w=1, adain=False) are three more forwards
    and run only with FACEADAPT_SLOW_TESTS=1;
(d) a small structure-preserving config: the fidelity knob, code prediction, frozen parts, training step,
    checkpoint import (params_ema container) through the zoo and the CLI, and ``vqgan_path``.
A missing fixture is a failure, never a skip.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from compat_recipe import checksum, load_recipe, recipe_state_dict
from safetensors.torch import load_file

from restoration.models.archs import ARCHS, build
from restoration.models.archs.codeformer import CodeFormer
from restoration.models.checkpoints import CODEFORMER_CONFIG, KNOWN_CHECKPOINTS, CheckpointError

ARCH = "codeformer"
ATOL = 1e-4
SLOW = os.environ.get("FACEADAPT_SLOW_TESTS") == "1"

# Same structure as the published model, 64 px: resolutions 64/32/16/8, 8x8 = 64 latent tokens.
TINY = dict(dim_embd=64, n_head=4, n_layers=2, codebook_size=64, latent_size=64, connect_list=["16", "32"],
            img_size=64, nf=32, ch_mult=[1, 1, 2, 2], res_blocks=1, attn_resolutions=[8], emb_dim=32)


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
def manifest(kit) -> dict:
    return _json(kit / "manifest.json")


@pytest.fixture(scope="module")
def golden(kit, manifest):
    """The published config with recipe weights (eval), the decoded input and the reference outputs."""
    d = kit / "golden_small"
    cfg = _json(d / "config.json")
    model = build(ARCH, cfg["constructor_kwargs"]).eval()
    load_recipe(model, manifest["state_dict"])
    inputs = load_file(_require(d / "inputs.safetensors"))
    x = inputs["x_u8"].to(torch.float32) / 128.0 - 1.0
    assert "x_u8.to(torch.float32) / 128.0 - 1.0" in cfg["input_decoding"]
    return cfg, model, x, load_file(_require(d / "outputs.safetensors"))


def _tiny(**overrides) -> CodeFormer:
    torch.manual_seed(0)
    return build(ARCH, TINY | overrides)


# ------------------------------------------------------------------------------------------------ (a) structure
def test_registered():
    assert ARCHS[ARCH] is CodeFormer
    assert CodeFormer.value_range == (-1.0, 1.0)


def test_full_config_structure(manifest):
    cfg = manifest["config"]
    with torch.device("meta"):
        model = build(ARCH, cfg["constructor_kwargs"])
    layout = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert layout == manifest["state_dict"]
    assert len(layout) == manifest["num_keys"]
    assert sum(p.numel() for p in model.parameters()) == manifest["param_count"]
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["state_dict_numel"]
    assert set(model.state_dict()) - {k for k, _ in model.named_parameters()} == set(manifest["buffer_keys"])
    hard = cfg["hard_coded_in_constructor"]
    assert model.channels == hard["channels"]
    assert model.fuse_encoder_block == hard["fuse_encoder_block"]
    assert model.fuse_generator_block == hard["fuse_generator_block"]
    # the constructor defaults the reference relies on
    defaults = cfg["constructor_defaults_relied_upon"]
    assert model.position_emb.shape[0] == defaults["latent_size"]
    frozen = {name.split(".")[0] for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(defaults["fix_modules"])


def test_known_checkpoint_matches_kit(kit, manifest):
    known = KNOWN_CHECKPOINTS["codeformer"]
    ckpt = _json(kit / "checkpoint.json")["public_checkpoints"][0]
    assert known.arch == ARCH and known.kind == "restorer"
    assert known.config == CODEFORMER_CONFIG == manifest["config"]["constructor_kwargs"]
    assert known.url == ckpt["download_url"] and known.file_name == ckpt["file_name"]
    assert known.sha256 == ckpt["sha256"] is None  # not published: pull records the download's own sha256
    assert known.input_size == 512 and tuple(known.value_range) == (-1.0, 1.0)
    assert "S-Lab License 1.0" in known.license and "non-commercial" in known.license


# ------------------------------------------------------------------------------------------------ (b) recipe
def test_recipe_checksums(kit, manifest):
    recipe = _json(kit / "golden_small" / "weights_recipe.json")
    expected = recipe["checksums"]
    weights = recipe_state_dict(manifest["state_dict"])
    assert set(weights) == set(expected) == {k for k, _, _ in manifest["state_dict"]}
    for key, t in weights.items():
        got, want = checksum(t), expected[key]
        assert got["sum"] == pytest.approx(want["sum"], rel=1e-9, abs=1e-9), key
        assert got["abs_sum"] == pytest.approx(want["abs_sum"], rel=1e-9), key
        assert got["first"] == want["first"][: len(got["first"])] and got["last"] == want["last"], key


# ------------------------------------------------------------------------------------------------ (c) numerics
def test_golden(golden, manifest):
    cfg, model, x, refs = golden
    assert sum(p.numel() for p in model.parameters()) == cfg["param_count"] == manifest["param_count"]
    assert [c["call"] for c in cfg["calls"]] == ["out, logits, lq_feat = model(x, w=0.5, adain=True)"]
    with torch.no_grad():
        out, logits, lq_feat = model(x, w=0.5, adain=True)
    for name, got in (("out", out), ("logits", logits), ("lq_feat", lq_feat)):
        ref = refs[name]
        assert got.shape == ref.shape, name
        diff = (got - ref).abs().max().item()
        print(f"codeformer golden {name}: max abs diff {diff:.3g}")
        assert torch.allclose(got, ref, rtol=0, atol=ATOL), f"{name}: max abs diff {diff:.3g}"
    top_idx = logits.softmax(dim=2).topk(1, dim=2).indices
    assert torch.equal(top_idx, refs["top_idx"])


@pytest.mark.skipif(not SLOW, reason="three more full-size forwards; set FACEADAPT_SLOW_TESTS=1")
@pytest.mark.parametrize("label", ["w=0.0", "w=1.0", "w=0.5, adain=False"])
def test_golden_other_arguments(golden, label):
    cfg, model, x, _ = golden
    kwargs = {"w=0.0": dict(w=0.0, adain=True), "w=1.0": dict(w=1.0, adain=True),
              "w=0.5, adain=False": dict(w=0.5, adain=False)}[label]
    expected = cfg["extra_output_stats_for_other_arguments"][label]
    with torch.no_grad():
        out = model(x, **kwargs)[0]
    assert list(out.shape) == expected["shape"]
    got = dict(mean=out.mean().item(), std=out.std().item(), min=out.min().item(), max=out.max().item())
    for k, v in got.items():
        assert v == pytest.approx(expected[k], rel=1e-4, abs=1e-4), f"{label} {k}: {v} vs {expected[k]}"


# ------------------------------------------------------------------------------------------------ (d) small config
def test_tiny_forward_and_fidelity():
    model = _tiny().eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out0, logits, lq = model(x)  # reference defaults: w=0, adain=False
        out_half = model(x, w=0.5, adain=True)[0]
        out_one = model(x, w=1.0, adain=True)[0]
        out_zero_adain = model(x, w=0.0, adain=True)[0]
        code_logits, code_lq = model(x, code_only=True)
    assert out0.shape == (2, 3, 64, 64) and logits.shape == (2, 64, 64) and lq.shape == (2, 32, 8, 8)
    assert torch.equal(code_logits, logits) and torch.equal(code_lq, lq)
    # w scales the CFT residual: 0 is the pure codebook decode, and the output moves with w
    assert not torch.allclose(out_half, out_zero_adain) and not torch.allclose(out_half, out_one)
    assert not torch.allclose(out0, out_zero_adain)  # adain changes the looked-up features
    # the decode of w=0 is the generator applied to the looked-up codes alone
    codes = logits.argmax(dim=2)
    with torch.no_grad():
        quant = model.quantize.lookup(codes, (8, 8))
        assert torch.allclose(model.decode(quant), out0, atol=1e-6)
    # batch independence
    with torch.no_grad():
        single = model(x[1:], w=0.5, adain=True)[0]
    assert torch.allclose(single, out_half[1:], atol=1e-5)


def test_tiny_quantizer_and_codes():
    model = _tiny().eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        lq = model.encode(x)[0]
        z_q, loss, info = model.quantize(lq)
        codes = model.codes(x)
    assert codes.shape == (1, 64) and torch.equal(codes, info["indices"])
    # nearest entries by brute force
    flat = lq.permute(0, 2, 3, 1).reshape(-1, 32)
    brute = torch.cdist(flat, model.quantize.embedding.weight).argmin(dim=1)
    assert torch.equal(brute, codes.reshape(-1))
    assert torch.allclose(z_q, model.quantize.lookup(codes, (8, 8)), atol=1e-6)  # straight-through: z + (e - z)
    assert loss.item() >= 0 and 1 <= info["perplexity"].item() <= 64


def test_tiny_training_step_respects_fix_modules():
    model = _tiny().train()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    target_codes = torch.randint(0, 64, (2, 64))
    out, logits, lq = model(x, w=1.0)
    loss = torch.nn.functional.cross_entropy(logits.permute(0, 2, 1), target_codes) + out.square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        frozen = name.startswith(("quantize.", "generator."))
        assert p.requires_grad is not frozen, name
        if not frozen:
            assert p.grad is not None, name
    unfrozen = _tiny(fix_modules=None)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_tiny_config_errors():
    with pytest.raises(ValueError, match="latent_size"):
        _tiny(latent_size=256)
    with pytest.raises(ValueError, match="connect_list"):
        _tiny(connect_list=["128"])
    with pytest.raises(ValueError, match="64x64"):
        _tiny()(torch.zeros(1, 3, 32, 32))
    with pytest.raises(TypeError, match="codeformer"):
        build(ARCH, {"no_such_kwarg": 1})


def test_import_params_ema_checkpoint(tmp_path, monkeypatch):
    """A basicsr-style {'params_ema', 'params'} torch.save file imports strictly, taking params_ema (CLI too)."""
    from typer.testing import CliRunner

    from cli import app
    from restoration.settings import get_settings
    from restoration.models.zoo import Zoo

    ema, raw = _tiny().state_dict(), _tiny(img_size=64).state_dict()
    raw = {k: v + 1 for k, v in raw.items()}
    ckpt = tmp_path / "codeformer_tiny.pth"
    torch.save({"params": raw, "params_ema": ema}, ckpt)

    zoo = Zoo(tmp_path / "zoo", builtin_dir=None)
    card = zoo.import_checkpoint(ckpt, arch=ARCH, name="cf-tiny", config=TINY, input_size=64)
    assert card.arch == ARCH and card.kind == "restorer" and card.value_range == [-1.0, 1.0]
    loaded = zoo.load("cf-tiny")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ema[k]), k

    # a file with a missing key is refused with the key named
    broken = dict(ema)
    broken.pop("fuse_convs_dict.16.shift.2.bias")
    torch.save({"params_ema": broken}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="fuse_convs_dict.16.shift.2.bias"):
        zoo.import_checkpoint(tmp_path / "broken.pth", arch=ARCH, name="cf-broken", config=TINY, input_size=64)

    # the CLI: faceadapt models import ckpt.pth --arch codeformer --name X --config cfg.json
    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        (tmp_path / "cfg.json").write_text(json.dumps(TINY))
        r = CliRunner().invoke(app, ["models", "import", str(ckpt), "--arch", ARCH, "--name", "cf-cli",
                                     "--config", str(tmp_path / "cfg.json"), "--input-size", "64"])
        assert r.exit_code == 0, r.output
        assert "registered cf-cli (codeformer" in r.output
        cli_card = Zoo().get("cf-cli")
        assert cli_card.sha256 == card.sha256  # same params_ema weights, same safetensors bytes
    finally:
        get_settings.cache_clear()


def test_vqgan_path(tmp_path):
    src = _tiny()
    vq = {k: v for k, v in src.state_dict().items() if k.startswith(("encoder.", "quantize.", "generator."))}
    torch.save({"params_ema": vq}, tmp_path / "vqgan.pth")
    torch.manual_seed(1)
    model = build(ARCH, TINY | {"vqgan_path": str(tmp_path / "vqgan.pth")})
    for k, v in vq.items():
        assert torch.equal(model.state_dict()[k], v), k
    vq.pop("quantize.embedding.weight")
    torch.save({"params_ema": vq}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="quantize.embedding.weight"):
        build(ARCH, TINY | {"vqgan_path": str(tmp_path / "bad.pth")})


# ------------------------------------------------------------------------------------------------ restoring with it
def _tiny_card(zoo, name="cf-tiny"):
    model = _tiny()
    return zoo.register(name, ARCH, TINY, model.state_dict(), kind="restorer", input_size=64,
                        value_range=(-1, 1), random_init=True)


def test_restorer_fidelity_weight(tmp_path):
    """Restorer: [0,1] in/out, CodeFormer called in [-1,1] with w (default 0.5, the reference's) and adain=True."""
    from restoration.faces.restore import Restorer
    from restoration.models.zoo import Zoo

    zoo = Zoo(tmp_path / "zoo", builtin_dir=None)
    _tiny_card(zoo)
    model = zoo.load("cf-tiny")
    x = torch.rand(3, 3, 64, 64)

    def expected(w):
        with torch.no_grad():
            return ((model(x * 2 - 1, w=w, adain=True)[0] + 1) / 2).clamp(0, 1)

    default = Restorer.from_zoo("cf-tiny", zoo=zoo, device="cpu", batch_size=8)  # one chunk: same batch as below
    assert default.network_kwargs() == {"w": 0.5, "adain": True}
    assert torch.allclose(default.restore_tensor(x), expected(0.5), atol=1e-5)
    assert torch.allclose(default.restore_tensor(x, fidelity=1.0), expected(1.0), atol=1e-5)
    faithful = Restorer.from_zoo("cf-tiny", zoo=zoo, device="cpu", fidelity=0.0)
    assert torch.allclose(faithful.restore_tensor(x), expected(0.0), atol=1e-5)
    assert not torch.allclose(expected(0.0), expected(1.0))
    with pytest.raises(ValueError, match="fidelity"):
        Restorer.from_zoo("cf-tiny", zoo=zoo, device="cpu", fidelity=1.5)
    # the pseudo-target / evaluation path: range from the class attribute, the reference inference call (w=0.5, adain)
    from restoration.adaptation.pseudo import restore_batch

    assert torch.allclose(restore_batch(model, x), expected(0.5), atol=1e-5)


def test_cli_restore_aligned(tmp_path, monkeypatch, shared_dir):
    """`faceadapt restore --model <codeformer> --aligned` end to end on a tiny CodeFormer in a temporary zoo."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from cli import app
    from restoration.settings import get_settings
    from restoration.models.zoo import Zoo

    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    try:
        _tiny_card(Zoo())
        crops = tmp_path / "crops"
        crops.mkdir()
        src = sorted((shared_dir / "data/faces-utk200").iterdir())[:3]
        for f in src:
            (crops / f.name).write_bytes(f.read_bytes())
        out = tmp_path / "out"
        r = CliRunner().invoke(app, ["restore", str(crops), "-o", str(out), "--model", "cf-tiny", "--aligned",
                                     "--batch-size", "2", "--device", "cpu", "--fidelity", "0.5"])  # w, no check
        assert r.exit_code == 0, r.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["model"] == "cf-tiny" and len(summary["files"]) == 3
        for entry, f in zip(summary["files"], src):
            restored = np.asarray(Image.open(out / entry["output"]))
            original = np.asarray(Image.open(f).convert("RGB"))
            assert restored.shape == original.shape and not np.array_equal(restored, original)
    finally:
        get_settings.cache_clear()
