"""Stage 3, fine-tuning: the base restorer learns (training crop, pseudo target) pairs; EMA weights in `finetune/`.

SwinIR-like and GFPGAN bases go through `restoration.training.finetune` (L1 + perceptual + GAN, the discriminator's
real images are the clean HQ faces); a CodeFormer base through `restoration.training.finetune_codeformer`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Sequence

from safetensors.torch import save_file

from restoration.adaptation.config import AdaptConfig
from restoration.adaptation.evaluate import held_out_targets
from restoration.adaptation.files import read_json, write_json
from restoration.adaptation.loaders import base_value_range, is_codeformer, job_device, zoo_or_default
from restoration.adaptation.sources import hq_faces
from restoration.adaptation.targets import targets_status
from restoration.adaptation.pseudo import target_name
from restoration.adaptation.workdir import CHECKPOINTS, FINETUNE_RESULT, MODEL, TARGETS, items, prepared_file, read_job
from restoration.runtime import CancelFn, ProgressFn
from restoration.training.finetune import finetune as finetune_restorer
from restoration.training.finetune_codeformer import CodeFormerFinetuneConfig, finetune_codeformer

__all__ = ["finetune"]


def finetune(
    workdir: str | Path,
    *,
    restorer=None,
    zoo=None,
    device: str | None = None,
    hq_images: Sequence | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> dict:
    """Fine-tune the base restorer on (training crop, pseudo target) pairs; resumes from `finetune/ckpt`.

    Needs every pseudo target (all shards). `hq_images` (paths or arrays) override the discriminator's real images
    (default: `config.hq_dir`, else the UTKFace training split). Writes `finetune/model.safetensors` (EMA weights)
    and `finetune/result.json`; returns the result dict.
    """
    workdir = Path(workdir)
    job = read_job(workdir)
    cfg: AdaptConfig = job["config"]
    result_path, model_path = workdir / FINETUNE_RESULT, workdir / MODEL
    if result_path.is_file() and model_path.is_file():
        res = read_json(result_path)
        if res.get("steps") == cfg.finetune.steps and res.get("config") == cfg.finetune.to_dict():
            if progress is not None:
                progress("finetune", res["steps"], res["steps"])
            return res
    st = targets_status(workdir, zoo)
    if not st["complete"]:
        raise RuntimeError(f"pseudo targets incomplete: {st['done']}/{st['total']} (run generate_targets for every shard)")
    dev = job_device(device, cfg)
    if restorer is None:
        restorer = zoo_or_default(zoo).load(job["base"], device=dev)
    pairs = [(prepared_file(workdir, it), workdir / TARGETS / target_name(it["id"])) for it in items(workdir, "train")]
    if hq_images is None:
        hq_images, hq_source = hq_faces(cfg)
    else:
        hq_source = f"given ({len(hq_images)} images)"
    fcfg = dataclasses.replace(cfg.finetune, device=str(dev))
    extra_result = {}
    val_pairs = []
    if fcfg.val_every > 0 and not is_codeformer(restorer):
        # early stopping scores the held-out crops against their own pseudo targets (made now, from the base, as
        # `evaluate` makes them: it finds them done)
        _, _, why, val_targets = held_out_targets(workdir, restorer, zoo=zoo, device=dev, should_cancel=should_cancel)
        val_pairs = [(prepared_file(workdir, it), val_targets[it["id"]]) for it in items(workdir, "eval")
                     if it["id"] in val_targets]
        if not val_pairs:
            extra_result["early_stopping"] = "off: no held-out pseudo targets (%s)" % (why or "no held-out faces")
    if is_codeformer(restorer):
        # CodeFormer (the paper's second model): encoder + transformer learn the target's codes; the schedule fields
        # of `cfg.finetune` apply, the optimiser / EMA / loss weights are CodeFormer's (restoration.training.finetune_codeformer)
        ccfg = CodeFormerFinetuneConfig.from_finetune(fcfg)
        res = finetune_codeformer(restorer, pairs, (), ccfg, workdir / CHECKPOINTS, progress=progress,
                                  should_cancel=should_cancel)
        hq_source = "not used (CodeFormer: code cross-entropy + feature loss, no discriminator)"
        extra_result["codeformer_config"] = ccfg.to_dict()
    else:
        res = finetune_restorer(restorer, pairs, list(hq_images), fcfg, workdir / CHECKPOINTS, progress=progress,
                                should_cancel=should_cancel, value_range=base_value_range(zoo, job),
                                val_pairs=val_pairs)
        if res.best is not None:
            extra_result["early_stopping"] = {**res.best, "history": res.val_history}
    sd = {k: v.detach().to("cpu").contiguous() for k, v in res.ema.state_dict().items()}
    tmp = model_path.with_name(f".{model_path.name}.tmp{os.getpid()}")
    save_file(sd, str(tmp))
    os.replace(tmp, model_path)
    out = {"steps": res.step, "config": cfg.finetune.to_dict(), "losses": res.losses, "hq_source": hq_source,
           "pairs": len(pairs), "resumed_from": res.resumed_from, "seconds": round(res.seconds, 2),
           "history": res.history, "weights": "EMA", **extra_result}
    write_json(result_path, out)
    return out
