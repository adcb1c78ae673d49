"""GFPGAN (gfpgan_v1_4) through the zoo, `faceadapt models import` and `faceadapt restore --aligned`, on a tiny config.

GFPGAN works in [-1, 1] and returns a tuple; the pipeline converts [0, 1] <-> the card's value_range in one place
(`restoration.models.io.run_restorer`). The tiny model here is random-init with the noise strengths set to zero, so
its output does not depend on the random noise maps and can be compared with a direct call.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from restoration.models.archs import build
from restoration.faces.restore import Restorer
from restoration.models.io import to_tensor, to_uint8
from restoration.adaptation.pseudo import restore_batch
from restoration.models.io import run_restorer
from restoration.settings import get_settings
from restoration.models.zoo import Zoo

TINY = dict(out_size=64, num_style_feat=32, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
            num_mlp=8, input_is_latent=True, different_w=True, narrow=0.0625, sft_half=True)


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = build("gfpgan_v1_4", TINY).state_dict()
    for k in sd:  # StyleConv noise strengths (shape [1]) -> 0: deterministic output
        if k.startswith("stylegan_decoder.") and k.endswith(".weight") and sd[k].shape == (1,):
            sd[k] = torch.zeros(1)
    return sd


def reference(model: torch.nn.Module, x01: torch.Tensor) -> torch.Tensor:
    """What GFPGANer does with a [0,1] face: (x - 0.5) / 0.5 in, element 0 out, back to [0, 1], clamped."""
    with torch.no_grad():
        return ((model(x01 * 2 - 1, return_rgb=False)[0] + 1) / 2).clamp(0, 1)


def run(args):
    from cli import app

    return CliRunner().invoke(app, args)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_run_restorer_value_ranges():
    calls = []

    def unit_model(x):
        calls.append(x)
        return x * 0.5

    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(run_restorer(unit_model, x), x * 0.5)
    assert calls[-1] is x  # a [0, 1] model sees the input untouched

    class Signed(torch.nn.Module):
        value_range = (-1.0, 1.0)

        def forward(self, x, **kw):
            calls.append((x, kw))
            return x, ["extras"]

    m = Signed()
    out = run_restorer(m, x, weight=0.5)
    assert torch.allclose(calls[-1][0], x * 2 - 1) and calls[-1][1] == {"weight": 0.5}
    assert torch.allclose(out, x, atol=1e-6)  # mapped back; element 0 of the tuple
    # the card's value_range wins over the class attribute
    run_restorer(m, x, value_range=[0, 1])
    assert calls[-1][0] is x
    with pytest.raises(ValueError, match="value_range"):
        run_restorer(m, x, value_range=[1, 1])


def test_restorer_and_restore_batch_convert_ranges(home):
    zoo = Zoo()
    card = zoo.register("gfp-tiny", "gfpgan_v1_4", TINY, tiny_state_dict(), kind="restorer", input_size=64,
                        value_range=(-1, 1), random_init=True)
    assert card.value_range == [-1.0, 1.0]
    model = zoo.load("gfp-tiny")
    x = torch.rand(3, 3, 64, 64)
    ref = reference(model, x)
    assert ref.std() > 0.01  # not a degenerate all-clamped image
    got = Restorer(model, card, device="cpu", batch_size=8).restore_tensor(x)
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.allclose(restore_batch(model, x), ref, atol=1e-6)  # no card: the arch's value_range
    # feeding the [0, 1] input unconverted would give another image: the conversion is really exercised
    with torch.no_grad():
        assert (((model(x)[0] + 1) / 2).clamp(0, 1) - ref).abs().max() > 1e-2


def test_restore_cli_aligned(home, shared_dir):
    Zoo().register("gfp-tiny", "gfpgan_v1_4", TINY, tiny_state_dict(), kind="restorer", input_size=64,
                   value_range=(-1, 1), random_init=True, license="test")
    crops = home / "crops"
    crops.mkdir()
    src = sorted((shared_dir / "data/faces-utk200").iterdir())[:3]
    imgs = []
    for f in src:
        img = Image.open(f).convert("RGB").resize((64, 64), Image.BICUBIC)
        img.save(crops / f"{f.stem}.png")
        imgs.append(np.asarray(img))
    out = home / "out"
    r = run(["restore", str(crops), "-o", str(out), "--model", "gfp-tiny", "--aligned", "--batch-size", "4",
             "--device", "cpu", "--fidelity", "0"])  # fidelity given: the plain output (no never-worse check)
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "gfp-tiny" and len(summary["files"]) == 3
    expected = to_uint8(reference(Zoo().load("gfp-tiny"), to_tensor(imgs, 64)))
    for entry, exp in zip(summary["files"], expected):
        got = np.asarray(Image.open(out / entry["output"]))
        assert got.shape == (64, 64, 3)
        assert np.abs(got.astype(int) - exp.astype(int)).max() <= 1


@pytest.mark.parametrize("container", ["params_ema", "params"])
def test_models_import_gfpgan(home, container):
    sd = tiny_state_dict(seed=1)
    other = tiny_state_dict(seed=2)
    obj = {"params_ema": sd, "params": other} if container == "params_ema" else {"params": sd}
    ckpt = home / "GFPGANtiny.pth"
    torch.save(obj, ckpt)
    cfg = home / "cfg.json"
    cfg.write_text(json.dumps(TINY))
    r = run(["models", "import", str(ckpt), "--arch", "gfpgan_v1_4", "--name", "gfp-imp", "--config", str(cfg),
             "--input-size", "64"])
    assert r.exit_code == 0, r.output
    card = Zoo().get("gfp-imp")
    assert (card.arch, card.kind, card.input_size, card.value_range) == ("gfpgan_v1_4", "restorer", 64, [-1.0, 1.0])
    loaded = Zoo().load("gfp-imp").state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_models_import_gfpgan_default_config_is_the_public_one(home):
    """Without --config the public 512 px config is used: a tiny checkpoint is refused with a clear message."""
    ckpt = home / "tiny.pth"
    torch.save({"params_ema": tiny_state_dict()}, ckpt)
    r = run(["models", "import", str(ckpt), "--arch", "gfpgan_v1_4", "--name", "gfp-bad"])
    assert r.exit_code == 1
    assert "does not fit the architecture" in r.output and "shape mismatches" in r.output
    assert not (Zoo().root / "gfp-bad").exists()
