"""The quality gate: is the adapted model worse than its base on the held-out crops? No ground truth needed.

`evaluate` measures; `gate_verdict` judges its figures against `GATE`; `register` refuses a model judged worse
(`QualityGateFailed`) unless the job's `quality_gate` is off.
"""
from __future__ import annotations

__all__ = ["GATE", "QualityGateFailed", "gate_verdict"]

#: The quality gate of `evaluate` (no ground truth): the adapted model is judged worse than the base when, on the
#: held-out crops, one of these means drops below the base's by more than its margin (dB):
#:   consistency_psnr  PSNR of the low-passed output against the low-passed input (area reduction by the pseudo-target
#:                     down_N), after matching the output's channel means to the input's (a removed colour cast is
#:                     not lost content): the content is kept. The margin is wide on purpose: a good adaptation legitimately
#:                     moves the input's colour and noise (bench/adaptation.py, `camera` at 128 px: -3.3 dB for a model
#:                     1.3 dB better against the ground truth), a broken one moves the face (-15.6 dB seen);
#:   naturalness       `Prior.naturalness`: the prior's one-shot reconstruction PSNR of the output noised to
#:                     `naturalness_t` of the way through its (respaced) schedule, t = 25/250 for the default
#:                     priors: clean faces are reconstructed better than noisy or broken ones.
#: Reported, not gated: target_psnr, the PSNR against the held-out crops' own pseudo targets (made like the training
#: targets, never trained on). With gentle pseudo-target settings those stay close to the base's output x0, so the
#: base scores high on it even where the adapted model is better against the ground truth.
#: Over-smoothing is not caught by these (a blurred face keeps its content and looks clean to the prior).
GATE = {"consistency_psnr": 6.0, "naturalness": 0.5, "naturalness_t": 0.1}


class QualityGateFailed(RuntimeError):
    """`register` refused an adapted model that `evaluate` judged worse than its base."""


def gate_verdict(summary: dict, count: int) -> dict:
    """The verdict on `evaluate`'s per-model means: {"verdict": "ok" | "worse" | "unchecked", "reasons",
    "checked", "margins_db", "count"}."""
    reasons = []
    for key in ("consistency_psnr", "naturalness"):
        if key not in summary.get("base", {}) or key not in summary.get("adapted", {}):
            continue
        b, a = summary["base"][key], summary["adapted"][key]
        if a < b - GATE[key]:
            reasons.append(f"{key} {a:.2f} dB < base {b:.2f} dB - {GATE[key]} dB")
    checked = [k for k in ("consistency_psnr", "naturalness") if k in summary.get("adapted", {})]
    verdict = "worse" if reasons else ("ok" if checked else "unchecked")
    return {"verdict": verdict, "reasons": reasons, "checked": checked, "margins_db": dict(GATE), "count": count}
