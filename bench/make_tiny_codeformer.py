"""Register a tiny CodeFormer (arch `codeformer`, 64 px) into a zoo folder, trained here in CodeFormer's three
stages, as a base for `bench/adaptation.py` (the CodeFormer row of issue 11).

The public CodeFormer is 512 px and 94 M parameters: far too slow for the CPU benchmark, and it is not on disk. This
script builds the same architecture at 64 px (`TINY_CODEFORMER`: an 8x8 latent, as the reference's 16x16 at 512 px
is the image size / 32, here / 8; a 256-entry codebook of 64-d codes; CFT fusion at 16 and 32 px, i.e. from twice
the latent size up to half the image size as the reference's 32..256 at 512 px; a 3-layer transformer; 1.74 M
parameters) and trains it on the faces-utk200 training split (`restoration.data.faces.FacesDataset("train", 64)`, read in
place), seeded, on the CPU:

I.   VQ autoencoder on clean faces (encoder + codebook + generator): L1 reconstruction in [-1, 1] + 0.25 x
     commitment loss (straight-through), Adam cosine; the codebook follows the encoder outputs by EMA k-means
     updates (VQ-VAE's alternative to the codebook loss term, which with a lagging codebook collapsed to a handful
     of codes here), is initialised from encoder outputs, and dead entries (unused over the last `--restart-every`
     steps) are re-initialised from the encoder outputs of the current batch (not in the last fifth of the stage),
     so it stays used. EMA weights; the next stage starts from them.
II.  Code prediction (encoder + transformer; codebook, generator and CFT frozen) from the *standard* degradations
     (`restoration.degrade.damage.DEFAULT`): 0.5 x cross-entropy against the codes of the clean face under a frozen copy
     of the stage-I encoder + 1.0 x L2 between the encoder latent and those codebook features (the losses of
     `restoration.training.finetune_codeformer.code_losses`, the adaptation's own fine-tune). A fraction `--clean-frac` of
     each batch is the clean face itself, so that the served encoder, which the adaptation uses to code its pseudo
     targets, still codes clean faces as stage I did (the agreement is measured and recorded).
III. CFT fusion (only `fuse_convs_dict` learns): L1 between the output in [0, 1] and the clean face at the served
     call (`restorer_io.run_restorer`: `w=0.5, adain=True`, CodeFormer's `inference_kwargs`), standard degradations.

The registered weights are the EMA of the last stage. The card records the recipe and the measured figures on 50
test faces with the standard degradations (as `bench/make_tiny_gfpgan.py`): the input, the served call (w=0.5), the
pure codebook result (w=0) and w=1, the stage-I reconstruction of the clean faces and the code accuracy.

    python bench/make_tiny_codeformer.py --zoo-root /tmp/cf/zoo                  # ~20-25 min on 1 thread here
    python bench/adaptation.py --zoo-root /tmp/cf/zoo --base tiny-codeformer ... # see docs/MODELS.md

Everything is seeded (same thread count and step counts -> same weights).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from restoration import data

from restoration import metrics
from restoration.models import Zoo, build, run_restorer  # noqa: E402
from restoration.training import CodeFormerFinetuneConfig, HQCodes, code_losses, trainable_parameters  # noqa: E402
from bench.make_tiny_gfpgan import _degraded, _t  # noqa: E402  (standard damage; uint8/float NHWC -> NCHW)

SIZE = 64
TINY_CODEFORMER = dict(dim_embd=128, n_head=4, n_layers=3, codebook_size=256, latent_size=64,
                       connect_list=["16", "32"], img_size=SIZE, nf=32, ch_mult=[1, 1, 2, 2], res_blocks=1,
                       attn_resolutions=[8], emb_dim=64)
LICENSE = ("Weights trained on UTKFace (non-commercial research use only): research / non-commercial use only. "
           "Architecture after CodeFormer (sczhou/CodeFormer, S-Lab License 1.0, non-commercial); FaceAdapt's own "
           "implementation, weights trained here (no S-Lab weights).")


def _cosine(opt, steps: int, floor: float):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(k, steps) / max(steps, 1))))


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1.0 + step) / (10.0 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        if pm.requires_grad:
            pe.mul_(d).add_(pm.detach(), alpha=1 - d)


def _q(t: torch.Tensor) -> np.ndarray:
    return t.clamp(0, 1).mul(255).round().div(255).permute(0, 2, 3, 1).numpy().astype(np.float64)


def _scores(out: torch.Tensor, gt: torch.Tensor) -> tuple[float, float]:
    o, g = _q(out), _q(gt)
    return (round(float(np.mean([metrics.psnr(o[k], g[k]) for k in range(len(g))])), 3),
            round(float(np.mean([metrics.ssim(o[k], g[k]) for k in range(len(g))])), 4))


@torch.no_grad()
def evaluate(model: torch.nn.Module, lq: torch.Tensor, gt: torch.Tensor, ref_encoder=None) -> dict:
    """PSNR/SSIM of the input and of the model at w=0.5 (served), 0 and 1 (adain=True) on (lq, gt) in [0, 1];
    the stage-I style reconstruction of the clean faces (nearest codes, generator, no fusion); code accuracy."""
    model.eval()
    ps_in, ss_in = _scores(lq, gt)
    res = {"input_psnr": ps_in, "input_ssim": ss_in, "count": len(gt)}
    for w in (0.5, 0.0, 1.0):
        ps, ss = _scores(run_restorer(model, lq, (-1.0, 1.0), w=w, adain=True), gt)
        key = "" if w == 0.5 else f"_w{w:g}"
        res[f"psnr{key}"], res[f"ssim{key}"] = ps, ss
    z = model.encode(gt * 2 - 1)[0]
    codes = model.quantize.nearest(z)
    rec = model.decode(model.quantize.lookup(codes, z.shape[-2:])).add(1).div(2)
    res["clean_recon_psnr"], res["clean_recon_ssim"] = _scores(rec, gt)
    logits = model.predict_logits(model.encode(lq * 2 - 1)[0])
    res["code_acc_degraded"] = round(float((logits.argmax(2) == codes).float().mean()), 4)
    if ref_encoder is not None:  # does the served encoder still code clean faces as the stage-I encoder does?
        ref = model.quantize.nearest(ref_encoder(gt * 2 - 1))
        res["clean_code_agreement_with_stage1"] = round(float((codes == ref).float().mean()), 4)
    res["codebook_used_test"] = int(codes.unique().numel())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo-root", required=True, help="zoo folder to register into (created if missing)")
    ap.add_argument("--name", default="tiny-codeformer")
    ap.add_argument("--steps-vq", type=int, default=2800, help="stage I steps (VQ autoencoder on clean faces)")
    ap.add_argument("--steps-code", type=int, default=1600, help="stage II steps (code prediction)")
    ap.add_argument("--steps-fuse", type=int, default=2000, help="stage III steps (CFT fusion at w=0.5)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr-vq", type=float, default=1e-3)
    ap.add_argument("--lr-code", type=float, default=1e-3)
    ap.add_argument("--lr-fuse", type=float, default=1e-3)
    ap.add_argument("--lr-floor", type=float, default=0.1, help="cosine floor, fraction of each stage's lr")
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--restart-every", type=int, default=50, help="stage I dead-code re-initialisation cadence")
    ap.add_argument("--codebook-decay", type=float, default=0.99, help="stage I EMA k-means decay of the codebook")
    ap.add_argument("--clean-frac", type=float, default=0.25, help="stage II: fraction of clean inputs per batch")
    ap.add_argument("--n-faces", type=int, default=None, help="first N faces of the training split (default all)")
    ap.add_argument("--n-test", type=int, default=50, help="test-split faces for the figures in the card")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    ds = data.FacesDataset("train", SIZE, limit=args.n_faces)  # read in place, held in memory as uint8
    hq = ds.images
    test_names = sorted(data.load_split("test"))[: args.n_test]
    test_hq = data.load_faces_array(test_names, SIZE)
    test_lq = _t(_degraded(test_hq, np.random.default_rng(12345)))
    test_gt = _t(test_hq)
    print(f"{len(hq)} training faces, {len(test_hq)} test faces at {SIZE}px ({time.perf_counter() - t0:.0f}s)", flush=True)

    model = build("codeformer", TINY_CODEFORMER)
    n_params = sum(p.numel() for p in model.parameters())
    parts = {k: sum(p.numel() for p in getattr(model, k).parameters()) for k in
             ("encoder", "quantize", "generator", "ft_layers", "fuse_convs_dict")}
    print(f"tiny CodeFormer: {n_params:,} parameters {parts}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    np_rng = np.random.default_rng(args.seed + 1)
    bs = args.batch_size
    timings, stage_logs = {}, {}

    def batch_u8() -> np.ndarray:
        idx = torch.randint(0, len(hq), (bs,), generator=gen).numpy()
        out = hq[idx]
        return out[:, :, ::-1] if bool(torch.rand(1, generator=gen) < 0.5) else out

    def set_trainable(prefixes: tuple[str, ...]) -> list[torch.nn.Parameter]:
        ps = []
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in prefixes)
            if p.requires_grad:
                ps.append(p)
        return ps

    # ------------------------------------------------------------------ stage I: VQ autoencoder on clean faces
    # codebook: exponential-moving-average k-means updates (decay --codebook-decay) instead of the codebook loss
    # term, plus dead-code re-initialisation; encoder and generator by gradient (L1 + 0.25 commitment)
    params = set_trainable(("encoder", "generator"))
    model.quantize.embedding.weight.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=args.lr_vq, betas=(0.9, 0.99))
    sched = _cosine(opt, args.steps_vq, args.lr_floor)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    K = model.quantize.codebook_size
    usage = torch.zeros(K)
    cb_size, cb_sum = torch.ones(K), None
    logs, t_st = [], time.perf_counter()
    restarts = 0
    for step in range(args.steps_vq):
        model.train()
        y = _t(batch_u8()) * 2 - 1
        z, _ = model.encode(y)
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        emb = model.quantize.embedding.weight
        if step == 0:  # codebook from encoder outputs (random latent vectors, jittered)
            with torch.no_grad():
                pick = torch.randint(0, flat.shape[0], (K,), generator=gen)
                emb.copy_(flat[pick] + 0.01 * flat.std() * torch.randn(K, flat.shape[1], generator=gen))
                cb_sum = emb.clone()
        idx = model.quantize.nearest(z.detach())
        zq = model.quantize.lookup(idx, z.shape[-2:])
        commit = model.quantize.beta * (z - zq.detach()).pow(2).mean()
        out = model.decode(z + (zq - z).detach())  # straight-through
        l1 = F.l1_loss(out, y)
        loss = l1 + commit
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():  # EMA k-means step of the codebook
            onehot = F.one_hot(idx.reshape(-1), K).float()
            d = args.codebook_decay
            cb_size.mul_(d).add_(onehot.sum(0), alpha=1 - d)
            cb_sum.mul_(d).add_(onehot.t() @ flat, alpha=1 - d)
            n = cb_size.sum()
            size = (cb_size + 1e-5) / (n + K * 1e-5) * n
            emb.copy_(cb_sum / size[:, None])
        counts = torch.bincount(idx.reshape(-1), minlength=K).float()
        usage += counts
        p = counts / counts.sum()
        perplexity = float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))
        used = None
        if (step + 1) % args.restart_every == 0:
            dead = (usage == 0).nonzero().flatten()
            if len(dead) and step < 0.8 * args.steps_vq:
                with torch.no_grad():
                    pick = torch.randint(0, flat.shape[0], (len(dead),), generator=gen)
                    new = flat[pick] + 0.01 * flat.std() * torch.randn(len(dead), flat.shape[1], generator=gen)
                    emb[dead] = new
                    cb_sum[dead] = new
                    cb_size[dead] = 1.0
                restarts += len(dead)
            used = int((usage > 0).sum())
            usage.zero_()
        ema.quantize.embedding.weight.copy_(emb)  # the codebook is already an average
        _ema_update(ema, model, args.ema, step)
        logs.append((l1.item(), commit.item(), perplexity))
        if (step + 1) % 50 == 0 or step + 1 == args.steps_vq:
            m = np.mean(logs[-50:], axis=0)
            print(f"[I vq] step {step + 1}/{args.steps_vq} l1 {m[0]:.4f} commit {m[1]:.4f} perplexity {m[2]:.0f}"
                  + (f" used {used}/{K} in the last {args.restart_every} steps (dead re-init so far {restarts})"
                     if used is not None else "")
                  + f" ({(time.perf_counter() - t_st) / (step + 1):.2f} s/step)", flush=True)
    timings["vq"] = round(time.perf_counter() - t_st, 1)
    stage_logs["vq"] = {"final_l1": round(float(np.mean([x[0] for x in logs[-50:]])), 4) if logs else None,
                        "final_perplexity": round(float(np.mean([x[2] for x in logs[-50:]])), 1) if logs else None,
                        "dead_codes_reinitialised": restarts}
    model.load_state_dict(ema.state_dict())
    stage1_encoder = copy.deepcopy(model.encoder).eval().requires_grad_(False)
    m1 = evaluate(model, test_lq, test_gt)
    print(f"after stage I (EMA): {m1}", flush=True)

    # ------------------------------------------------------------------ stage II: code prediction
    ccfg = CodeFormerFinetuneConfig(entropy=0.5, feat=1.0)
    hq_codes = HQCodes(model, stage1_encoder)  # stage-I encoder codes of the clean face (CodeFormer's stage II)
    params = [p for _, p in trainable_parameters(model)]  # encoder + transformer
    opt = torch.optim.Adam(params, lr=args.lr_code, betas=(0.9, 0.99))
    sched = _cosine(opt, args.steps_code, args.lr_floor)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_clean = int(round(args.clean_frac * bs))
    logs, t_st = [], time.perf_counter()
    for step in range(args.steps_code):
        model.train()
        gt_u8 = batch_u8()
        y = _t(gt_u8)
        x = torch.cat([y[:n_clean], _t(_degraded(gt_u8[n_clean:], np_rng))])
        codes, code_feat = hq_codes(y)
        loss, p = code_losses(model, x, codes, code_feat, ccfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _ema_update(ema, model, args.ema, step)
        logs.append((p["ce"], p["feat"], p["code_acc"]))
        if (step + 1) % 50 == 0 or step + 1 == args.steps_code:
            m = np.mean(logs[-50:], axis=0)
            print(f"[II code] step {step + 1}/{args.steps_code} ce {m[0]:.3f} feat {m[1]:.4f} acc {m[2]:.3f} "
                  f"({(time.perf_counter() - t_st) / (step + 1):.2f} s/step)", flush=True)
    timings["code"] = round(time.perf_counter() - t_st, 1)
    stage_logs["code"] = {k: round(float(np.mean([x[i] for x in logs[-50:]])), 4) if logs else None
                          for i, k in enumerate(("final_ce", "final_feat", "final_code_acc"))}
    model.load_state_dict(ema.state_dict())
    m2 = evaluate(model, test_lq, test_gt, stage1_encoder)
    print(f"after stage II (EMA): {m2}", flush=True)

    # ------------------------------------------------------------------ stage III: CFT fusion at the served call
    params = set_trainable(("fuse_convs_dict",))
    opt = torch.optim.Adam(params, lr=args.lr_fuse, betas=(0.9, 0.99))
    sched = _cosine(opt, args.steps_fuse, args.lr_floor)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    logs, t_st = [], time.perf_counter()
    for step in range(args.steps_fuse):
        model.train()
        gt_u8 = batch_u8()
        x, y = _t(_degraded(gt_u8, np_rng)), _t(gt_u8)
        out = run_restorer(model, x, (-1.0, 1.0))  # w=0.5, adain=True (inference_kwargs)
        loss = F.l1_loss(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _ema_update(ema, model, args.ema, step)
        logs.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == args.steps_fuse:
            print(f"[III fuse] step {step + 1}/{args.steps_fuse} l1 {np.mean(logs[-50:]):.4f} "
                  f"({(time.perf_counter() - t_st) / (step + 1):.2f} s/step)", flush=True)
    timings["fuse"] = round(time.perf_counter() - t_st, 1)
    stage_logs["fuse"] = {"final_l1": round(float(np.mean(logs[-50:])), 4) if logs else None}
    model.load_state_dict(ema.state_dict())
    for p in model.parameters():
        p.requires_grad_(True)
    after = evaluate(model, test_lq, test_gt, stage1_encoder)
    print(f"final (EMA): {after}", flush=True)
    train_s = sum(timings.values())

    zoo = Zoo(root=args.zoo_root)
    steps = {"vq": args.steps_vq, "code": args.steps_code, "fuse": args.steps_fuse}
    card = zoo.register(
        args.name, "codeformer", TINY_CODEFORMER, model.state_dict(), kind="restorer", input_size=SIZE,
        value_range=[-1.0, 1.0], overwrite=args.overwrite, license=LICENSE,
        random_init=sum(steps.values()) == 0,
        provenance=f"bench/make_tiny_codeformer.py (seed {args.seed}, steps {steps}, {args.threads} thread(s)) on the "
                   "faces-utk200 training split; stages I clean faces, II-III standard degradations "
                   "(restoration.degrade.damage.DEFAULT)",
        description=f"Tiny CodeFormer-architecture restorer at {SIZE}x{SIZE} ({n_params:,} parameters, "
                    f"{TINY_CODEFORMER['codebook_size']}-entry codebook, 8x8 codes), a CPU benchmark base for the "
                    "CodeFormer adaptation row; not a substitute for the public 512 px model",
        extra={"face_template": "utk200",
               "inference": {"w": 0.5, "adain": True},
               "data": {"name": "faces-utk200", "split": "train", "faces": len(hq)},
               "parameters": {"total": n_params, **parts},
               "training": {
                   "recipe": {
                       "I_vq": "encoder + generator on clean faces: L1 ([-1,1]) + 0.25 commitment (straight-"
                               f"through); codebook by EMA k-means (decay {args.codebook_decay}), initialised from "
                               f"encoder outputs, dead codes re-initialised every {args.restart_every} steps (first "
                               "80 % of the stage)",
                       "II_code": "encoder + transformer: 0.5 CE to the stage-I encoder's codes of the clean face + "
                                  f"1.0 latent L2 (finetune_codeformer.code_losses); standard degradations, "
                                  f"{n_clean}/{bs} of each batch clean",
                       "III_fuse": "fuse_convs_dict only: L1 on [0,1] outputs at w=0.5, adain=True "
                                   "(restorer_io.run_restorer), standard degradations",
                       "common": "Adam (0.9, 0.99), cosine to lr_floor x lr per stage, EMA per stage (each stage "
                                 "starts from the previous stage's EMA), random horizontal flips"},
                   "steps": steps, "batch_size": bs,
                   "lr": {"vq": args.lr_vq, "code": args.lr_code, "fuse": args.lr_fuse, "floor": args.lr_floor},
                   "ema": args.ema, "clean_frac": args.clean_frac, "seed": args.seed, "threads": args.threads,
                   "wall_seconds": {**timings, "total": round(train_s, 1)}, "logs": stage_logs},
               "metrics": {"test_standard_degradations": after, "after_stage_I": m1, "after_stage_II": m2}},
    )
    print(f"registered {card.name} in {zoo.root} ({n_params:,} parameters; training {train_s / 60:.1f} min; "
          f"total {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
