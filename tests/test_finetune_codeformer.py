"""CodeFormer fine-tuning (restoration/training/finetune_codeformer.py) on a tiny structure-preserving CodeFormer, 64 px."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from restoration.models.archs import build
from restoration.runtime import Cancelled
from restoration.training.finetune_codeformer import (
    TRAINABLE, CodeFormerFinetuneConfig, HQCodes, code_losses, finetune_codeformer,
)

TINY = dict(dim_embd=64, n_head=4, n_layers=2, codebook_size=64, latent_size=64, connect_list=["16", "32"],
            img_size=64, nf=32, ch_mult=[1, 1, 2, 2], res_blocks=1, attn_resolutions=[8], emb_dim=32)


def _tiny():
    torch.manual_seed(0)
    model = build("codeformer", TINY)
    # a spread-out codebook (the reference init is uniform in +-1/codebook_size: every latent maps to one entry)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_(0, 1.0)
    return model


@pytest.fixture(scope="module")
def pairs(shared_dir):
    """(degraded, clean) 64 px UTK faces: blur + noise + JPEG-free, deterministic."""
    rng = np.random.default_rng(0)
    out = []
    for f in sorted((shared_dir / "data/faces-utk200").iterdir())[:8]:
        clean = Image.open(f).convert("RGB").resize((64, 64), Image.BICUBIC)
        lq = np.asarray(clean.filter(ImageFilter.GaussianBlur(1.5)), np.float32)
        lq = np.clip(lq + rng.normal(0, 8, lq.shape), 0, 255).astype(np.uint8)
        out.append((lq, np.array(clean)))
    return out


def _state(model, prefix):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_frozen_parts_and_learning(pairs, tmp_path):
    model = _tiny()
    before = {p: _state(model, p) for p in ("quantize.", "generator.", "fuse_convs_dict.", "encoder.", "ft_layers.")}
    hq = HQCodes(model)
    x = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a, _ in pairs])
    y = torch.stack([torch.from_numpy(b).permute(2, 0, 1).float() / 255 for _, b in pairs])
    codes, feat = hq(y)
    cfg = CodeFormerFinetuneConfig(steps=30, batch_size=4, lr=1e-3, ckpt_every=30, log_every=10, flip=False)
    model.eval()
    with torch.no_grad():
        loss0, parts0 = code_losses(model, x, codes, feat, cfg)
    res = finetune_codeformer(model, pairs, cfg=cfg, ckpt_dir=tmp_path / "ckpt")
    assert res.step == 30 and len(res.history) == 3 and res.losses["trainable"] == list(TRAINABLE)
    assert set(res.losses["frozen"]) == {"quantize", "generator", "fuse_convs_dict"}
    for prefix, sd in before.items():
        for trained in (res.model, res.ema):
            now = _state(trained, prefix)
            same = all(torch.equal(now[k], v) for k, v in sd.items())
            assert same == (prefix in ("quantize.", "generator.", "fuse_convs_dict.")), prefix
    # the target codes come from the frozen copy of the base encoder: unchanged by training
    codes_after, _ = HQCodes(res.model, hq.encoder)(y)
    assert torch.equal(codes_after, codes)
    with torch.no_grad():
        loss1, parts1 = code_losses(res.model.eval(), x, codes, feat, cfg)
    print("codeformer fine-tune on 8 pairs, 30 steps:", parts0, "->", parts1)
    assert loss1.item() < 0.8 * loss0.item(), (parts0, parts1)
    assert parts1["ce"] < parts0["ce"] and parts1["feat"] < parts0["feat"]
    # the EMA moved towards the trained weights but is not them
    k = "ft_layers.0.linear1.weight"
    assert not torch.equal(res.ema.state_dict()[k], res.model.state_dict()[k])
    assert not torch.equal(res.ema.state_dict()[k], before["ft_layers."][k])


def test_resume_is_exact(pairs, tmp_path):
    cfg = CodeFormerFinetuneConfig(steps=6, batch_size=2, grad_accum=2, ckpt_every=3, log_every=1)
    straight = finetune_codeformer(_tiny(), pairs, cfg=cfg, ckpt_dir=tmp_path / "a")

    calls = {"n": 0}

    def cancel_at_4():
        calls["n"] += 1
        return calls["n"] == 4  # checked before step index 3: steps 0..2 done

    with pytest.raises(Cancelled, match="step 3/6"):
        finetune_codeformer(_tiny(), pairs, cfg=cfg, ckpt_dir=tmp_path / "b", should_cancel=cancel_at_4)
    resumed = finetune_codeformer(_tiny(), pairs, cfg=cfg, ckpt_dir=tmp_path / "b")
    assert resumed.resumed_from == 3 and resumed.step == 6
    for k, v in straight.ema.state_dict().items():
        assert torch.equal(resumed.ema.state_dict()[k], v), k
    assert resumed.history == straight.history


def test_config_and_errors(pairs, tmp_path):
    from restoration.training.finetune import FinetuneConfig

    cfg = CodeFormerFinetuneConfig.from_finetune(FinetuneConfig(steps=7, batch_size=3, seed=5, lr=2e-5))
    assert (cfg.steps, cfg.batch_size, cfg.seed, cfg.lr, cfg.ema_decay, cfg.entropy, cfg.feat) == (
        7, 3, 5, 1e-4, 0.995, 0.5, 1.0)
    assert CodeFormerFinetuneConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown"):
        CodeFormerFinetuneConfig.from_dict({"gan": 0.1})
    with pytest.raises(TypeError, match="CodeFormer"):
        finetune_codeformer(torch.nn.Conv2d(3, 3, 1), pairs, ckpt_dir=tmp_path / "x")
