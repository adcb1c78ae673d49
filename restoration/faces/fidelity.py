"""Fidelity modes and blends: how much of a restoration goes into each face, by its native size (a restored face is
never a blurry upsampled model crop by default), and the archs that take the fidelity as their own input.

A restorer works at ``size`` = ``card.restore_size`` (its card's ``serve_size``, else ``input_size``: 128 px for the
bundled demo model). A face's *native size* is the
side, in the input's own pixels, of the square that is aligned to the model input: ``size / scale`` of the
image -> crop similarity for detected faces, the crop's side for aligned crops.

``fidelity`` f in [0, 1] (0 = fully restored, 1 = the face left exactly as it is) and the native size decide the
mode of each face (:func:`decide`):

* ``"kept"``: f == 1, the face is not touched (not even run through the network).
* ``"restored"`` (native <= ``ratio`` x size): ``out = (1 - f) * upsample(restored) + f * original``.
* ``"detail_preserving"`` (native > ``ratio`` x size): ``out = original + (1 - f) * upsample(restored -
  original_at_model_size)``: only the band the model can represent is replaced, the input's own finer detail is
  kept. For detected faces this is done in the photo domain through the inverse warp (`FaceAligner.paste`).

Default (``fidelity=None``, "auto"): f = 0 with the mode from the native size, the threshold being
:data:`DETAIL_RATIO` (chosen with ``bench/fidelity.py``, see docs/MODELS.md). For CodeFormer-style archs
(:func:`network_fidelity`) f is the network's own fidelity weight ``w`` instead of a pixel blend (auto: the
reference default 0.5, :data:`NETWORK_FIDELITY`); f == 1 still keeps the face as it is.

Never worse (auto fidelity only, :func:`check_face`): the result of every face is compared with the input at the
input's own scale, over the face's paste mask: the share of the input's fine detail it keeps (:data:`MIN_DETAIL_KEPT`)
unless what it removed does not follow the result's edges (:data:`MAX_REMOVED_STRUCTURE`: removed noise, not detail),
and the agreement of the two low-passes (:data:`MIN_LOWPASS_DB`); with a face prior, also how natural the prior finds
the two faces' coarse structure (:data:`MAX_NATURALNESS_DROP_DB`), which also tells removed noise from a blur
(:data:`MIN_NOISE_NATURALNESS_GAIN_DB`, :data:`MIN_DETAIL_KEPT_PRIOR`). A face that fails falls back one mode
(:data:`FALLBACK`: restored -> detail_preserving -> kept), and its ``extra`` says why (``reason``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from restoration.faces.alignment import resize
from restoration.metrics.quality import (detail_energy, lowpass_consistency, noise_detail_energy, noise_sigma,
                                         removed_structure)

__all__ = [
    "DETAIL_RATIO", "MODES", "NETWORK_FIDELITY", "FaceMode", "decide", "network_fidelity", "demo_model_warning",
    "mode_counts", "check_fidelity", "affine_native_size", "blend_aligned", "MIN_DETAIL_KEPT", "MIN_LOWPASS_DB",
    "FALLBACK", "check_face", "fallback_mode", "MAX_REMOVED_STRUCTURE", "MAX_NATURALNESS_DROP_DB", "NATURALNESS_T",
    "NATURALNESS_GRID", "MIN_NOISE_NATURALNESS_GAIN_DB", "MIN_DETAIL_KEPT_PRIOR",
]

#: faces whose native size exceeds DETAIL_RATIO x the model input size get the detail-preserving paste by default
#: (measured with bench/fidelity.py: docs/MODELS.md, "Fidelity and native size")
DETAIL_RATIO = 2.0

MODES = ("restored", "detail_preserving", "kept")

#: archs whose forward takes a fidelity weight: arch -> (keyword arguments for a weight w, default w).
#: CodeFormer: ``model(x, w=w, adain=True)`` as in the reference inference_codeformer.py (``--w 0.5``).
NETWORK_FIDELITY = {"codeformer": (lambda w: {"w": w, "adain": True}, 0.5)}


def network_fidelity(arch: str | None) -> tuple[bool, float | None]:
    """(True, default w) for archs that take the fidelity as their own input (:data:`NETWORK_FIDELITY`:
    CodeFormer's ``w``, default 0.5 as in the reference inference script), else (False, None)."""
    if not arch:
        return False, None
    spec = NETWORK_FIDELITY.get(arch)
    return (True, float(spec[1])) if spec is not None else (False, None)


def check_fidelity(fidelity: float | None) -> float | None:
    """None, or a float in [0, 1]; anything else is a ValueError saying so."""
    if fidelity is None:
        return None
    try:
        f = float(fidelity)
    except (TypeError, ValueError):
        raise ValueError(f"fidelity must be a number in [0, 1], got {fidelity!r}") from None
    if not math.isfinite(f) or not 0.0 <= f <= 1.0:
        raise ValueError(f"fidelity must be in [0, 1] (0 = fully restored, 1 = the face left as it is), got {fidelity!r}")
    return f


@dataclass
class FaceMode:
    """What happens to one face: ``mode`` (one of :data:`MODES`), the pixel blend weight ``fidelity`` (the f of
    the formulas), ``network_w`` (the network's own fidelity input, CodeFormer only, else None) and the face's
    ``native_size`` in input pixels."""

    mode: str
    fidelity: float
    native_size: float
    network_w: float | None = None

    @property
    def weight(self) -> float:
        """How much of the restoration goes in: 1 - f (0 for kept faces)."""
        return 0.0 if self.mode == "kept" else 1.0 - self.fidelity

    def to_dict(self) -> dict:
        d = {"native_size": round(float(self.native_size), 1), "mode": self.mode,
             "fidelity": round(float(self.network_w if self.network_w is not None else self.fidelity), 4)}
        return d


def decide(native_size: float, size: int, fidelity: float | None = None, ratio: float | None = None,
           arch: str | None = None) -> FaceMode:
    """The mode of a face of ``native_size`` input pixels for a model of input ``size`` (see the module docstring)."""
    f = check_fidelity(fidelity)
    ratio = DETAIL_RATIO if ratio is None else float(ratio)
    network, default_w = network_fidelity(arch)
    if f is not None and f >= 1.0:
        return FaceMode("kept", 1.0, native_size, 1.0 if network else None)
    mode = "detail_preserving" if native_size > ratio * size else "restored"
    if network:  # the network blends itself; no pixel blend on top
        return FaceMode(mode, 0.0, native_size, default_w if f is None else f)
    return FaceMode(mode, 0.0 if f is None else f, native_size)


def affine_native_size(affine: np.ndarray, size: int) -> float:
    """Side, in image pixels, of the ``size`` x ``size`` crop square of an image -> crop similarity."""
    a = np.asarray(affine, np.float64)
    scale = float(np.hypot(a[0, 0], a[0, 1]))
    return float(size) / max(scale, 1e-12)


def blend_aligned(original: np.ndarray, restored: np.ndarray, model_input: np.ndarray, fm: FaceMode) -> np.ndarray:
    """The output for one aligned crop: ``original`` (uint8, native size), ``restored`` (uint8, model size),
    ``model_input`` (what the network saw: the original resampled to the model size, uint8 or float in [0, 255])."""
    h, w = original.shape[:2]
    if fm.mode == "kept":
        return original.copy()
    if fm.mode == "restored":
        up = resize(restored, w, h)
        if fm.weight >= 1.0:
            return up if up is not restored else up.copy()
        out = fm.weight * up.astype(np.float32) + (1.0 - fm.weight) * original.astype(np.float32)
    else:  # detail_preserving: original + (1 - f) * upsample(restored - model_input)
        delta = restored.astype(np.float32) - np.asarray(model_input, np.float32)
        delta = resize(delta, w, h, shrink=False)  # bicubic, whatever the sizes
        out = original.astype(np.float32) + fm.weight * delta
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


#: the public 512 px restorer `faceadapt models pull` can fetch, named in the demo-model warning
PULLABLE_RESTORER = "swinir-face-dtbfr"


def demo_model_warning(card) -> str | None:
    """A one-line warning when ``card`` is a bundled small demo restorer (input below 256 px), else None."""
    if card is None or getattr(card, "kind", None) != "restorer" or not getattr(card, "builtin", False):
        return None
    size = card.restore_size
    if size >= 256:
        return None
    return (f"{card.name} is the bundled {size} px demo restorer: faces up to {int(DETAIL_RATIO * size)} px are "
            f"restored at {size} px and larger ones only get a detail-preserving correction. For real photos pull "
            f"a 512 px model: `faceadapt models pull {PULLABLE_RESTORER}` (needs internet), then use "
            f"--model {PULLABLE_RESTORER}")


def mode_counts(infos) -> dict:
    """{mode: count} of per-face dicts (or Faces with ``extra``), in MODES order, zero counts left out."""
    modes = [(i.extra if hasattr(i, "extra") else i).get("mode") for i in infos]
    return {m: modes.count(m) for m in MODES if m in modes}


# ------------------------------------------------------------------------------ never worse
#: a face's result must keep at least this share of the input's fine detail (`detail_energy`, sigma 1 px, over the
#: paste mask, at the input's scale, less what the input's estimated noise adds to it); below it the model blurred the
#: face. Chosen on bench/never_worse.py (the realworld faces the bundled model smears keep 0.18-0.77 of it) and on
#: noisy UTK test faces at 64 px, whose denoised restorations keep more than it (tests/test_never_worse.py)
MIN_DETAIL_KEPT = 0.8
#: ... unless what it removed does not follow the result's edges (`removed_structure` at most this): then it removed
#: noise or blocking, not detail (a denoised face keeps less fine detail than its noisy input, a smeared one loses edge
#: contrast where its edges are). Chosen with bench/never_worse.py (column struct): the bundled model's smeared
#: realworld faces score +0.08 to +0.25 over their boxes; the UTK test faces at 128 px it denoises and the detail
#: criterion alone sends back score -0.48 to +0.15 (median -0.30 / -0.18 / -0.11 on the standard / motion blur / shot
#: noise damages, 60 faces each). docs/MODELS.md, "What a user gets", has the effect on bench/restorer_native.py
MAX_REMOVED_STRUCTURE = 0.0
#: ... or, when a face prior is given, unless the prior finds the result's coarse structure at least this much more
#: natural than the input's (dB of `Prior.naturalness`, as for MAX_NATURALNESS_DROP_DB below): then what it removed
#: was noise the prior sees. Chosen with run 8b's results on 1,200 damaged UTK test faces at 128 px and
#: on shared/data/realworld (docs/MODELS.md, "Never worse: denoised faces"): the 49 results that lose detail with
#: removed_structure > 0 all gained on the input (+0.45 to +5.3 dB PSNR against the clean face) and score +0.29 to
#: +2.35 (all but one >= +0.59); the realworld smears score +0.04 to +0.27, plain Gaussian blurs of the UTK faces
#: mostly under +0.5
MIN_NOISE_NATURALNESS_GAIN_DB = 0.5
#: with a face prior, a result that keeps under this share of the input's fine detail is a blur however
#: `removed_structure` comes out (after a heavy blur too little fine detail is left for that correlation to mean
#: anything: many Gaussian blurs of the realworld crops score -0.4 to 0), unless the prior's gain above says it
#: was noise
MIN_DETAIL_KEPT_PRIOR = 0.5
#: and its low-pass must agree with the input's to this PSNR (`lowpass_consistency`, sigma native/48 px, >= 1.5 px);
#: below it the face was washed out, recoloured or moved
MIN_LOWPASS_DB = 30.0
#: and, when a face prior is given, the prior must not find the result's coarse structure less natural than the input's
#: by more than this (dB of `Prior.naturalness` at NATURALNESS_T, over a NATURALNESS_GRID-square grid of area
#: averages of the aligned face): artefacts, blotches and blocks. Chosen with bench/naturalness.py (docs/MODELS.md,
#: "Never worse: the face prior's naturalness"): on 48 damaged UTK test faces at 128 px the clean faces score -0.35 to
#: +1.07 dB against their inputs and the bundled restorer's results +0.21 to +1.27, the results with JPEG quality-8
#: blocks -3.11 to -0.80 (92% under -1), with colour blotches -6.35 to -3.01; on the whole grid (every pixel) clean
#: faces would fail too (38% under -1: fine texture is what the prior reconstructs worst)
MAX_NATURALNESS_DROP_DB = 1.0
NATURALNESS_T = 0.1
NATURALNESS_GRID = 16
#: the share of the input's fine detail counted as detail however noisy the input looks
NOISY_FLOOR = 0.1
#: the mode a face falls back to when its result fails the check
FALLBACK = {"restored": "detail_preserving", "detail_preserving": "kept"}


def check_face(before: np.ndarray, after: np.ndarray, weight: np.ndarray | None = None,
               native_size: float | None = None, naturalness: tuple[float, float] | None = None) -> dict:
    """Compare a face's result with the input at the input's own scale (HxWx3 uint8 each, the same size; ``weight``:
    the face's paste mask on them, None: every pixel). Returns ``{"ok", "detail_kept", "lowpass_db", "why"}``:
    ``detail_kept`` = detail_energy(after) / detail_energy(before) (1.0 for a flat input), ``lowpass_db`` the
    low-pass agreement (capped at 99 dB), ``why`` the failed criteria in words (None when ok); when ``detail_kept``
    is under MIN_DETAIL_KEPT also ``removed_structure`` (`metrics.removed_structure`: above MAX_REMOVED_STRUCTURE the
    loss is a blur). ``naturalness``: the face prior's (before, after) figures of the two aligned faces
    (`Prior.naturalness`), which adds ``naturalness_db`` (after - before) and its criterion
    (:data:`MAX_NATURALNESS_DROP_DB`), and weighs in on a loss of detail: a gain of at least
    :data:`MIN_NOISE_NATURALNESS_GAIN_DB` says the detail removed was noise; without it a result that keeps under
    :data:`MIN_DETAIL_KEPT_PRIOR` is a blur."""
    before, after = np.asarray(before), np.asarray(after)
    if before.shape != after.shape:
        raise ValueError(f"before {before.shape} and after {after.shape} differ in shape")
    sigma = max(1.5, float(native_size or max(before.shape[:2])) / 48.0)
    # the input's fine detail less what its noise adds (a restorer that removes noise does not blur the face);
    # at least NOISY_FLOOR of it is counted as detail, however noisy the input
    d_all = detail_energy(before, 1.0, weight)
    d_in = max(d_all - noise_detail_energy(noise_sigma(before, weight)), NOISY_FLOOR * d_all)
    kept = detail_energy(after, 1.0, weight) / d_in if d_in > 1e-7 else 1.0
    lp = min(99.0, lowpass_consistency(after, before, sigma, weight))
    out, why = {"detail_kept": round(float(kept), 3), "lowpass_db": round(float(lp), 2)}, []
    gain = None if naturalness is None else float(naturalness[1]) - float(naturalness[0])
    if kept < MIN_DETAIL_KEPT:
        structure = removed_structure(before, after, 1.0, weight)
        out["removed_structure"] = round(float(structure), 3)
        noise = gain is not None and gain >= MIN_NOISE_NATURALNESS_GAIN_DB  # the prior: what went was noise
        if structure > MAX_REMOVED_STRUCTURE and not noise:
            why.append(f"it would blur the face (keeps {kept:.2f} of the input's fine detail, under "
                       f"{MIN_DETAIL_KEPT}, and what it removes follows the face's edges: {structure:+.2f})")
        elif gain is not None and kept < MIN_DETAIL_KEPT_PRIOR and not noise:
            why.append(f"it would blur the face (keeps {kept:.2f} of the input's fine detail, under "
                       f"{MIN_DETAIL_KEPT_PRIOR}, and the face prior does not find it more natural: {gain:+.2f} dB, "
                       f"under +{MIN_NOISE_NATURALNESS_GAIN_DB:g})")
    if lp < MIN_LOWPASS_DB:
        why.append(f"it would change the face's coarse content (low-pass agreement {lp:.1f} dB, under "
                   f"{MIN_LOWPASS_DB:g} dB)")
    if gain is not None:
        out["naturalness_db"] = round(gain, 2)
        if gain < -MAX_NATURALNESS_DROP_DB:
            why.append(f"it would look less natural to the face prior ({gain:+.2f} dB against the input, under "
                       f"-{MAX_NATURALNESS_DROP_DB:g} dB: artefacts)")
    out.update(ok=not why, why="; ".join(why) or None)
    return out


def fallback_mode(fm: FaceMode) -> FaceMode:
    """The next mode down for a face whose result failed :func:`check_face` (same fidelity; kept stays kept)."""
    nxt = FALLBACK.get(fm.mode, "kept")
    if nxt == "kept":
        return FaceMode("kept", 1.0, fm.native_size, 1.0 if fm.network_w is not None else None)
    return FaceMode(nxt, fm.fidelity, fm.native_size, fm.network_w)
