"""Stage 4, evaluation: base vs adapted on the held-out crops, the before/after grid and the quality gate's verdict.

Writes `eval/metrics.json` and `eval/grid.png`; the held-out crops' own pseudo targets go to `eval/targets/`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from restoration.adaptation.color import color_correction
from restoration.adaptation.config import AdaptConfig, apply_prior_defaults
from restoration.adaptation.files import write_json
from restoration.adaptation.gate import GATE, gate_verdict
from restoration.adaptation.loaders import base_value_range, job_device, load_adapted, load_prior, zoo_or_default
from restoration.adaptation.pseudo import generate_pseudo_targets, restore_batch, target_name
from restoration.adaptation.workdir import EVAL_TARGETS, GRID, METRICS, items, prepared_file, read_job
from restoration.faces.imageio import load_image, save_image
from restoration.models.io import to_uint8
from restoration.metrics import quality as M
from restoration.runtime import CancelFn, ProgressFn, check_cancel

__all__ = ["evaluate", "held_out_targets"]


def _metric_fns(down_N: int):
    """(psnr, ssim, sharpness, lowpass_psnr) on float HxWx3 arrays in [0,1] from restoration.metrics.quality."""
    def lowpass_psnr(a, b):  # colour-balance invariant: removing a domain's cast is not lost content
        return float(M.lowpass_psnr(a, b, down_N, match_color=True))

    return (lambda a, b: float(M.psnr(a, b))), (lambda a, b: float(M.ssim(a, b))), \
        (lambda a: float(M.sharpness(a))), lowpass_psnr


def _grid(rows: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y:y + h, x:x + w] = im
    return out


def held_out_targets(workdir: str | Path, base_model, *, zoo=None, device=None, prior=None, split: str = "eval",
                     should_cancel: CancelFn | None = None) -> tuple:
    """The held-out crops' own pseudo targets in `eval/targets/`, made exactly like the training targets (the job's
    prior, also for the self-training ablation, with its card's pseudo-target settings), never trained on: what
    `evaluate` reports as target_psnr and what the fine-tune's early stopping scores. Made once (a second call finds
    them done). Returns (prior, its pseudo-target params, why there is no judge or None, {id: target path}); without
    a usable prior (None, None, reason, {})."""
    workdir = Path(workdir)
    job = read_job(workdir)
    cfg: AdaptConfig = job["config"]
    dev = job_device(device, cfg)
    its = items(workdir, split)
    pparams, judge_error = None, None
    if prior is None and job.get("prior"):
        try:
            pcard = zoo_or_default(zoo).get(job["prior"])
            pparams = apply_prior_defaults(dataclasses.replace(cfg, use_prior=True), pcard,
                                           explicit=list(cfg.pseudo.to_dict()) if cfg.use_prior else ()).pseudo
            prior = load_prior(zoo_or_default(zoo), job["prior"], dev, respacing=pparams.respacing)
        except Exception as exc:  # no usable prior: the gate checks consistency only
            prior, pparams, judge_error = None, None, str(exc)
    elif prior is not None:
        pparams = cfg.pseudo
    if prior is None or not its:
        return prior, pparams, judge_error, {}
    target_dir = workdir / EVAL_TARGETS
    pparams = dataclasses.replace(pparams, save_x0=False)
    generate_pseudo_targets([(it["id"], prepared_file(workdir, it)) for it in its], base_model, prior,
                            target_dir, pparams, should_cancel=should_cancel,
                            fingerprint_extra=f"eval|base={job.get('base')}|prior={job.get('prior')}",
                            color_gains=color_correction(workdir, zoo=zoo)["gains"])
    return prior, pparams, judge_error, {it["id"]: target_dir / target_name(it["id"]) for it in its}


def evaluate(
    workdir: str | Path,
    *,
    base_model=None,
    adapted_model=None,
    prior=None,
    zoo=None,
    device: str | None = None,
    batch_size: int = 16,
    split: str = "eval",
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> dict:
    """Base vs adapted on the held-out crops (never trained on), with no ground truth needed, and the quality gate.

    Per model (input, base, adapted), means over the held-out crops: `target_psnr` (against the held-out crops'
    pseudo targets, made here exactly like the training targets, with the prior card's settings), `consistency_psnr`
    (low-passed output vs low-passed input, low pass = area reduction by the pseudo-target down_N), `naturalness`
    (`Prior.naturalness`), `sharpness` (Laplacian variance); PSNR / SSIM when ground truth was given (never used by
    the gate). `gate` holds the verdict on consistency and naturalness (`GATE`): "ok", "worse" (with reasons) or
    "unchecked" (no held-out crops). Writes `eval/metrics.json` and a before/after grid `eval/grid.png` (columns: input | base | adapted |
    pseudo target [| GT]); returns the metrics.
    """
    workdir = Path(workdir)
    job = read_job(workdir)
    cfg: AdaptConfig = job["config"]
    dev = job_device(device, cfg)
    its = items(workdir, split)
    if not its:
        out = {"split": split, "count": 0, "note": "no held-out images (eval_fraction 0 or too few images)",
               "gate": {"verdict": "unchecked", "reasons": ["no held-out images to compare on"], "checked": []}}
        write_json(workdir / METRICS, out)
        return out
    if base_model is None:
        base_model = zoo_or_default(zoo).load(job["base"], device=dev)
    if adapted_model is None:
        adapted_model = load_adapted(workdir, job, zoo, dev)
    base_model.eval()
    adapted_model.eval()
    vrange = base_value_range(zoo, job)  # base and adapted work in the base card's range (GFPGAN: [-1, 1])
    prior, pparams, judge_error, targets = held_out_targets(workdir, base_model, zoo=zoo, device=dev, prior=prior,
                                                            split=split, should_cancel=should_cancel)
    targets = {k: load_image(v) for k, v in targets.items()}
    lp_factor = int(pparams.down_N) if pparams is not None else int(cfg.pseudo.down_N)  # the judge's low pass
    psnr, ssim, sharp, lp_psnr = _metric_fns(lp_factor)
    has_gt = all("gt" in it for it in its)
    per_model = {"input": [], "base": [], "adapted": []}
    grid_rows = []
    for b in range(0, len(its), batch_size):
        check_cancel(should_cancel, f"evaluation cancelled after {b}/{len(its)} images")
        chunk = its[b:b + batch_size]
        imgs = [load_image(prepared_file(workdir, it)) for it in chunk]
        x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(255.0).to(dev)
        outs = {"base": to_uint8(restore_batch(base_model, x, vrange)),
                "adapted": to_uint8(restore_batch(adapted_model, x, vrange))}
        nat = {}
        if prior is not None:
            for key, arrs in (("input", imgs), ("base", outs["base"]), ("adapted", outs["adapted"])):
                t = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float().div(255.0)
                nat[key] = prior.naturalness(t, GATE["naturalness_t"], seed=cfg.seed + b)
        for k, it in enumerate(chunk):
            inp = imgs[k].astype(np.float64) / 255.0
            gt = load_image(prepared_file(workdir, it, "gt")).astype(np.float64) / 255.0 if has_gt else None
            tg = targets[it["id"]].astype(np.float64) / 255.0 if targets else None
            for key, arr in (("input", imgs[k]), ("base", outs["base"][k]), ("adapted", outs["adapted"][k])):
                o = arr.astype(np.float64) / 255.0
                m = {"sharpness": sharp(o)}
                if key != "input":  # the input against itself would be +inf
                    m["consistency_psnr"] = lp_psnr(o, inp)
                if tg is not None:
                    m["target_psnr"] = psnr(o, tg)
                if nat:
                    m["naturalness"] = nat[key][k]
                if gt is not None:
                    m["psnr"], m["ssim"] = psnr(o, gt), ssim(o, gt)
                per_model[key].append(m)
            if len(grid_rows) < cfg.grid_count:
                row = [imgs[k], outs["base"][k], outs["adapted"][k]]
                if targets:
                    row.append(targets[it["id"]])
                if has_gt:
                    row.append(load_image(prepared_file(workdir, it, "gt")))
                grid_rows.append(row)
        if progress is not None:
            progress("evaluate", min(b + batch_size, len(its)), len(its))
    summary = {key: {m: round(float(np.mean([r[m] for r in rows])), 4) for m in rows[0]} for key, rows in per_model.items()}
    gate = gate_verdict(summary, len(its))
    if prior is None:
        gate["note"] = "no prior to judge with: only consistency was checked" + (
            f" ({judge_error})" if judge_error else "")
    out = {"split": split, "count": len(its), "has_gt": has_gt, "lowpass_down_N": lp_factor,
           "metrics": summary, "gate": gate, "color_correction": color_correction(workdir, zoo=zoo), "grid": GRID,
           "grid_columns": ["input", "base", "adapted"] + (["pseudo target"] if targets else []) + (["gt"] if has_gt else [])}
    save_image(workdir / GRID, _grid(grid_rows))
    write_json(workdir / METRICS, out)
    return out
