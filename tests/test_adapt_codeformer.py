"""Adaptation of a CodeFormer end to end (prepare -> pseudo targets -> code fine-tune -> evaluate -> register) on a
tiny randomly initialised 64 px CodeFormer and a tiny randomly initialised prior."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from restoration.adaptation.config import AdaptConfig
from restoration.adaptation.stages import run_adaptation
from restoration.models.archs import build
from restoration.training.finetune import FinetuneConfig
from restoration.adaptation.pseudo import PseudoTargetParams
from restoration.models.zoo import Zoo

TINY_CF = dict(dim_embd=64, n_head=4, n_layers=2, codebook_size=64, latent_size=64, connect_list=["16", "32"],
               img_size=64, nf=32, ch_mult=[1, 1, 2, 2], res_blocks=1, attn_resolutions=[8], emb_dim=32)
TINY_UNET = dict(image_size=32, in_channels=3, model_channels=32, out_channels=6, attention_resolutions=[2],
                 dropout=0, channel_mult=[1, 1], num_res_blocks=1, conv_resample=True, dims=2, use_fp16=False,
                 num_head_channels=32, use_scale_shift_norm=True, resblock_updown=False, use_new_attention_order=False)
FAST_PSEUDO = dict(start=4, respacing="10", constrain_until=2, down_N=8, schedule="ancestral", fast_steps=3, batch_size=4)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    z = Zoo(root=tmp_path_factory.mktemp("zoo"), builtin_dir=None)
    torch.manual_seed(0)
    cf = build("codeformer", TINY_CF)
    with torch.no_grad():
        cf.quantize.embedding.weight.normal_(0, 1.0)
    z.register("cf-base", "codeformer", TINY_CF, cf.state_dict(), kind="restorer", input_size=64,
               value_range=(-1, 1), license="test-licence", random_init=True)
    torch.manual_seed(1)
    z.register("tiny-prior", "iddpm_unet", TINY_UNET, build("iddpm_unet", TINY_UNET).state_dict(), kind="prior",
               input_size=32, value_range=(-1, 1), license="test", random_init=True,
               extra={"diffusion": {"steps": 1000, "noise_schedule": "linear", "learn_sigma": True, "respacing": "10"}})
    return z


@pytest.fixture(scope="module")
def faces(tmp_path_factory, shared_dir):
    root = shared_dir / "data" / "faces-utk200"
    d = tmp_path_factory.mktemp("faces")
    (d / "lq").mkdir()
    (d / "gt").mkdir()
    rng = np.random.default_rng(0)
    for i, f in enumerate(sorted(root.iterdir())[:6]):
        hq = Image.open(f).convert("RGB").resize((64, 64), Image.BICUBIC)
        hq.save(d / "gt" / f"face{i}.png")
        lq = np.asarray(hq.filter(ImageFilter.GaussianBlur(1.2)), np.float32) + rng.normal(0, 8, (64, 64, 3))
        Image.fromarray(np.clip(lq, 0, 255).astype(np.uint8)).save(d / "lq" / f"face{i}.png")
    return d


def test_adapt_codeformer_end_to_end(tmp_path, faces, zoo):
    cfg = AdaptConfig(pseudo=PseudoTargetParams(**FAST_PSEUDO),
                      finetune=FinetuneConfig(steps=3, batch_size=2, ckpt_every=1, log_every=1),
                      eval_fraction=0.34, aligned=True, device="cpu", quality_gate=False,  # random tiny models
                      auto_schedule=False)
    stages = set()
    res = run_adaptation(faces / "lq", base="cf-base", prior="tiny-prior", name="cf-adapted", config=cfg,
                         workdir=tmp_path / "work", zoo=zoo, gt_dir=faces / "gt",
                         progress=lambda s, d, t: stages.add(s))
    assert stages >= {"prepare", "pseudo_targets", "finetune", "evaluate", "register"}
    assert res["faces"] == {"train": 4, "eval": 2}

    result = json.loads((tmp_path / "work" / "finetune" / "result.json").read_text())
    assert result["steps"] == 3 and result["weights"] == "EMA"
    assert result["losses"]["entropy"] == 0.5 and result["losses"]["feat"] == 1.0
    assert set(result["losses"]["frozen"]) == {"quantize", "generator", "fuse_convs_dict"}
    cc = result["codeformer_config"]
    assert (cc["lr"], cc["ema_decay"], cc["steps"], cc["batch_size"]) == (1e-4, 0.995, 3, 2)
    assert all(np.isfinite(h["loss"]) for h in result["history"])

    card = zoo.get("cf-adapted")
    assert card.arch == "codeformer" and card.value_range == [-1.0, 1.0] and card.input_size == 64
    assert card.license == "test-licence" and card.extra["base"] == "cf-base"
    ev = card.extra["evaluation"]["metrics"]
    assert set(ev["adapted"]) >= {"psnr", "ssim"}

    base, adapted = zoo.load("cf-base").state_dict(), zoo.load("cf-adapted").state_dict()
    for k, v in base.items():
        if k.startswith(("quantize.", "generator.", "fuse_convs_dict.")):  # codebook, decoder, CFT: frozen
            assert torch.equal(adapted[k], v), k
    assert any(not torch.equal(adapted[k], base[k]) for k in base if k.startswith("encoder."))
    assert any(not torch.equal(adapted[k], base[k]) for k in base if k.startswith("ft_layers."))

    from restoration.faces.restore import Restorer

    restorer = Restorer.from_zoo("cf-adapted", zoo=zoo, device="cpu")
    crop = np.asarray(Image.open(faces / "lq" / "face0.png").convert("RGB"))
    out = restorer.restore_crops([crop])[0]
    assert out.shape == crop.shape and out.dtype == np.uint8
