"""The inference side of FaceAdapt: `Restorer` (one fast network pass over face crops) and `restore_photo`, the one
whole-photo restore that the CLI (`Restorer.restore_image`) and the API (`app.serving.Loaded.restore`) both run.

`Restorer` wraps a zoo restorer: `restore_crops` runs aligned face crops through the network in batches (autocast
bf16/fp16 on GPU). `restore_photo` detects, aligns, restores (per-face mode by native size and fidelity,
:mod:`restoration.faces.fidelity`) and pastes every face of a photo back, at most ``max_faces`` of them, with any
restore function (the Restorer's own, or the service's micro-batcher).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np
import torch

from restoration.faces.alignment import resize, template_for_card
from restoration.faces.detection import Face, check_image
from restoration.faces.fidelity import (NATURALNESS_GRID, NATURALNESS_T, NETWORK_FIDELITY, affine_native_size,
                                        blend_aligned, check_face, decide, fallback_mode)
from restoration.faces.helper import FaceHelper
from restoration.models.io import run_restorer, to_tensor, to_uint8
from restoration.models.zoo import ModelCard, Zoo
from restoration.runtime import resolve_device
from restoration.settings import get_settings

__all__ = ["Restorer", "RestoreResult", "RestoreFn", "NaturalnessFn", "restore_photo", "restore_aligned_crops",
           "is_gray", "keep_gray"]

#: ``restore_fn(list of uint8 aligned crops) -> restored uint8 crops``; called ``restore_fn(crops, fidelity=w)`` for
#: archs that take the fidelity as their own input (:data:`restoration.faces.fidelity.NETWORK_FIDELITY`)
RestoreFn = Callable[..., Sequence[np.ndarray]]
#: ``naturalness(uint8 aligned face crops) -> dB each``: a face prior's naturalness figures of faces, all on the same
#: noise (`Restorer.naturalness`), compared before and after by the never-worse check
NaturalnessFn = Callable[[Sequence[np.ndarray]], list]


@dataclass
class RestoreResult:
    """A restored photo: the ``image``, the ``faces`` restored (or kept) in it, largest first, each with its
    ``extra`` ``native_size``, ``mode`` and ``fidelity`` (and, when the never-worse check ran, ``check`` and, for a
    face that fell back, ``planned`` and ``reason``); ``faces_found`` counts every face detected (more than ``faces``
    when ``max_faces`` left some out); ``detector`` is None for an aligned crop; ``gray``: the input was gray and the
    result was kept gray (colour not asked for)."""

    image: np.ndarray
    faces: list[Face] = field(default_factory=list)
    detector: str | None = None
    model: str = ""
    faces_found: int = 0
    gray: bool = False


# ------------------------------------------------------------------------------ the whole-photo restore
def restore_photo(helper: FaceHelper, img: np.ndarray, restore_fn: RestoreFn, *, aligned: bool = False,
                  only_center_face: bool = False, fidelity: float | None = None, detail_ratio: float | None = None,
                  arch: str | None = None, max_faces: int | None = None, guard: bool | None = None,
                  color: bool = False, naturalness: NaturalnessFn | None = None) -> RestoreResult:
    """Detect, align, restore (``restore_fn``) and paste back the faces of an RGB uint8 photo.

    ``max_faces`` (None or <= 0: all): only the ``max_faces`` largest faces are restored, the others are left as they
    are (``faces_found`` still counts them). ``aligned=True``: ``img`` is already an aligned face crop; it is resized
    to the helper's size, restored and pasted back at its own size through the same mask and native-size rule as a
    detected face, and the result holds one face covering the whole input. With no face found the image comes back
    unchanged (a copy) with no face.

    ``fidelity`` (None: auto), ``detail_ratio`` (None: :data:`restoration.faces.fidelity.DETAIL_RATIO`) and the
    restorer's ``arch`` decide per face between a plain restoration, a detail-preserving paste and leaving the face as
    it is (:mod:`restoration.faces.fidelity`); each returned face's ``extra`` holds ``native_size``, ``mode`` and
    ``fidelity``. For archs that take the fidelity themselves (CodeFormer) ``restore_fn`` is called as
    ``restore_fn(crops, fidelity=w)``.

    ``guard`` (None: on with auto fidelity, off with a fidelity given): the never-worse check of every face
    (:func:`restoration.faces.fidelity.check_face`); a face whose result loses detail or changes coarse content falls
    back (restored -> detail_preserving -> kept) and says why in ``extra["reason"]``; with ``naturalness`` (a face
    prior's figure of an aligned face) a result the prior finds less natural than the input falls back too.
    ``color``: a gray input (:func:`is_gray`) comes back gray unless this is True.
    """
    img = check_image(img)
    guard = fidelity is None if guard is None else bool(guard)
    if aligned:
        image, face = restore_aligned_crops(helper, [img], restore_fn, fidelity=fidelity, detail_ratio=detail_ratio,
                                            arch=arch, guard=guard, naturalness=naturalness)[0]
        faces, found, detector = [face], 1, None
    else:
        found = helper.detect(img, only_center_face=only_center_face)
        faces = found
        if max_faces is not None and max_faces > 0:
            faces = sorted(found, key=lambda f: f.area, reverse=True)[:max_faces]
        image = _restore_detected(helper, img, faces, restore_fn, fidelity, detail_ratio, arch, guard, naturalness)
        found, detector = len(found), helper.detector_name
    gray = not color and is_gray(img)
    if gray:
        image = keep_gray(img, image)
    return RestoreResult(image, faces, detector, faces_found=found, gray=gray)


def restore_aligned_crops(helper: FaceHelper, imgs: Sequence[np.ndarray], restore_fn: RestoreFn, *,
                          fidelity: float | None = None, detail_ratio: float | None = None, arch: str | None = None,
                          guard: bool | None = None,
                          naturalness: NaturalnessFn | None = None) -> list[tuple[np.ndarray, Face]]:
    """Aligned face crops of any size, restored in one ``restore_fn`` call per network fidelity: each is resized to the
    helper's size and pasted back at its own size like a detected face (the paste mask, the native-size rule, the
    never-worse check when ``guard``, None: with auto fidelity, and ``naturalness``). Returns ``(image, face)`` per
    crop, the face covering the whole crop with its ``extra`` (``aligned``, the mode and the check)."""
    guard = fidelity is None if guard is None else bool(guard)
    s = helper.size
    plans = []
    for img in imgs:
        img = check_image(img)
        h, w = img.shape[:2]
        fm = decide(max(h, w), s, fidelity, detail_ratio, arch)
        lm = helper.aligner.points * np.array([w / s, h / s])
        face = Face(box=np.array([0, 0, w, h], np.float32), score=1.0, landmarks5=lm.astype(np.float32),
                    extra={"aligned": True, **fm.to_dict()})
        affine = np.array([[s / w, 0.0, 0.0], [0.0, s / h, 0.0]], np.float64)  # crop -> model input
        plans.append((img, face, fm, affine, resize(img, s, s, shrink=min(h, w) > s)))
    outs: list = [None] * len(plans)
    groups: dict = {}
    for i, (img, face, fm, _, _) in enumerate(plans):
        if fm.mode == "kept":
            outs[i] = (img.copy(), face)
        else:
            groups.setdefault(fm.network_w, []).append(i)
    for w, idx in groups.items():
        restored = _run_restore(restore_fn, [plans[i][4] for i in idx], w)
        for i, r in zip(idx, restored):
            img, face, fm, affine, crop = plans[i]
            if guard:
                fm = _guard(helper, img, crop, r, affine, fm, face, naturalness)
            outs[i] = (_finish_aligned(helper, img, crop, r, affine, fm), face)
    return outs


def _finish_aligned(helper: FaceHelper, img: np.ndarray, crop: np.ndarray, restored: np.ndarray,
                    affine: np.ndarray, fm) -> np.ndarray:
    """One aligned crop's result at its own size: kept, restored (the upsampled output blended by fidelity over the
    whole crop, `blend_aligned`) or detail-preserving (through the paste mask, as a detected face: the crop's border
    band, hair and background, is left as it was)."""
    if fm.mode == "kept":
        return img.copy()
    if fm.mode == "restored":
        out = blend_aligned(img, restored, crop, fm)
        return img.copy() if out is img else out
    return _paste_one(helper, img, crop, restored, affine, fm)


def _paste_one(helper: FaceHelper, img: np.ndarray, crop: np.ndarray, restored: np.ndarray, affine: np.ndarray,
               fm) -> np.ndarray:
    return helper.paste(img, [restored], [affine], weights=[fm.weight],
                        bases=[crop if fm.mode == "detail_preserving" else None])


def _guard(helper: FaceHelper, img: np.ndarray, crop: np.ndarray, restored: np.ndarray, affine: np.ndarray, fm,
           face: Face, naturalness: NaturalnessFn | None = None):
    """The never-worse check of one face (`check_face` over its paste mask, in the input's pixels around it, and with
    ``naturalness`` the face prior's figures of the input's and the result's aligned face): the face's final mode,
    falling back while the result fails; ``face.extra`` gets the mode, ``check`` and, after a fallback, ``planned``
    and ``reason``."""
    s = helper.size
    inv = cv2.invertAffineTransform(np.asarray(affine, np.float64))
    pts = np.array([[0, 0], [s, 0], [s, s], [0, s]], np.float64) @ inv[:, :2].T + inv[:, 2]
    h, w = img.shape[:2]
    x0, y0 = max(0, int(np.floor(pts[:, 0].min())) - 2), max(0, int(np.floor(pts[:, 1].min())) - 2)
    x1, y1 = min(w, int(np.ceil(pts[:, 0].max())) + 3), min(h, int(np.ceil(pts[:, 1].max())) + 3)
    if x1 - x0 < 4 or y1 - y0 < 4:
        return fm
    sub = img[y0:y1, x0:x1]
    a = np.asarray(affine, np.float64).copy()
    a[:, 2] += a[:, :2] @ np.array([x0, y0], np.float64)  # the same face in the sub-image's coordinates
    inv_sub = cv2.invertAffineTransform(a)
    weight = cv2.warpAffine(helper.aligner.soft_mask(), inv_sub, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    if float(weight.sum()) < 16.0:
        return fm
    planned, failed, check = fm.mode, [], None
    render = _finish_aligned if face.extra.get("aligned") else _paste_one
    before = nat = None
    while fm.mode != "kept":
        result = render(helper, sub, crop, restored, a, fm)
        if naturalness is not None:  # the input's and the result's aligned faces, on the same noise
            if before is None:
                before, after = naturalness([helper.aligner.warp(sub, a), helper.aligner.warp(result, a)])
            else:
                after, = naturalness([helper.aligner.warp(result, a)])
            nat = (before, after)
        check = check_face(sub, result, weight, fm.native_size, nat)
        if check["ok"]:
            break
        failed.append(f"{fm.mode} rejected: {check['why']}")
        fm = fallback_mode(fm)
    face.extra.update(fm.to_dict())
    if check is not None:
        face.extra["check"] = {k: check[k] for k in ("detail_kept", "lowpass_db", "removed_structure", "naturalness_db")
                               if k in check}
    if failed:
        face.extra["planned"] = planned
        face.extra["reason"] = f"{'; '.join(failed)}; {fm.mode} instead"
        if fm.mode == "kept":
            face.extra["check"] = {"detail_kept": 1.0, "lowpass_db": 99.0,
                                   **({"naturalness_db": 0.0} if naturalness is not None else {})}
    return fm


def _restore_detected(helper: FaceHelper, img: np.ndarray, faces: list[Face], restore_fn: RestoreFn,
                      fidelity: float | None, detail_ratio: float | None, arch: str | None,
                      guard: bool = False, naturalness: NaturalnessFn | None = None) -> np.ndarray:
    """Align the given faces, restore them in one ``restore_fn`` call and paste them back (each face's ``extra`` gets
    ``native_size``, ``mode``, ``fidelity``; with ``guard`` the never-worse check, `_guard`); with no face to restore,
    a copy of ``img``."""
    if not faces:
        return img.copy()
    crops, affines, modes, owners = [], [], [], []
    for face in faces:
        crop, affine = helper.align(img, face)
        fm = decide(affine_native_size(affine, helper.size), helper.size, fidelity, detail_ratio, arch)
        face.extra.update(fm.to_dict())
        if fm.mode == "kept":
            continue
        crops.append(crop)
        affines.append(affine)
        modes.append(fm)
        owners.append(face)
    if not crops:
        return img.copy()
    restored = _run_restore(restore_fn, crops, modes[0].network_w)
    if guard:
        modes = [_guard(helper, img, c, r, a, fm, face, naturalness)
                 for c, r, a, fm, face in zip(crops, restored, affines, modes, owners)]
        keep = [k for k, fm in enumerate(modes) if fm.mode != "kept"]
        if not keep:
            return img.copy()
        crops, restored, affines, modes = ([seq[k] for k in keep] for seq in (crops, restored, affines, modes))
    return helper.paste(img, restored, affines, weights=[fm.weight for fm in modes],
                        bases=[c if fm.mode == "detail_preserving" else None for c, fm in zip(crops, modes)])


# ------------------------------------------------------------------------------ gray in, gray out
def is_gray(img: np.ndarray) -> bool:
    """Whether an RGB uint8 image is gray: its channels agree to within 2 levels on 99.9% of the pixels (every
    4th row and column looked at), which lets a gray JPEG's chroma noise through."""
    a = np.asarray(img)[::4, ::4].astype(np.int16)
    if a.size == 0:
        return False
    spread = np.maximum(np.abs(a[..., 0] - a[..., 1]), np.abs(a[..., 1] - a[..., 2]))
    return float(np.quantile(spread, 0.999)) <= 2.0


def keep_gray(original: np.ndarray, result: np.ndarray) -> np.ndarray:
    """``result`` with every pixel it changed from ``original`` set to its luma (BT.601) on all three channels;
    untouched pixels stay exactly as they were."""
    changed = np.any(result != original, axis=2)
    if not changed.any():
        return result
    y = np.clip(np.rint(result.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)), 0, 255)
    out = result.copy()
    out[changed] = y.astype(np.uint8)[changed][:, None]
    return out


def _run_restore(restore_fn: RestoreFn, crops: list[np.ndarray], network_w: float | None = None) -> list[np.ndarray]:
    restored = list(restore_fn(crops) if network_w is None else restore_fn(crops, fidelity=network_w))
    if len(restored) != len(crops):
        raise ValueError(f"restore_fn returned {len(restored)} crops for {len(crops)} inputs")
    out = []
    for r in restored:
        r = np.asarray(r)
        if r.dtype != np.uint8:
            raise ValueError(f"restore_fn must return uint8 crops, got {r.dtype}")
        if r.ndim != 3 or r.shape[2] != 3:
            raise ValueError(f"restore_fn must return HxWx3 crops, got {r.shape}")
        out.append(r)
    return out


# ------------------------------------------------------------------------------ the restorer
class Restorer:
    """A loaded restorer: aligned crops in, restored crops out, in batches."""

    def __init__(self, model: torch.nn.Module, card: ModelCard, device: str | torch.device | None = None, batch_size: int = 8,
                 fidelity: float | None = None, guard_prior=None):
        if card.kind != "restorer":
            raise ValueError(f"{card.name} is a {card.kind}, not a restorer")
        self.fidelity = _check_w(fidelity)  # the network's own fidelity weight (NETWORK_FIDELITY archs); None: default
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.model = model.to(self.device).eval()
        self.card = card
        self.size = card.restore_size  # the model's input size when restoring (card.serve_size, else input_size)
        self.batch_size = max(1, int(batch_size))
        self._helpers: dict = {}
        #: the face prior of the never-worse check's naturalness criterion (a `restoration.diffusion.Prior`, or None:
        #: the check looks at detail and coarse content only); the service and the CLI load FACEADAPT_GUARD_PRIOR
        self.guard_prior = guard_prior

    @classmethod
    def from_zoo(cls, name: str | None = None, zoo: Zoo | None = None, device: str | None = None, batch_size: int = 8,
                 fidelity: float | None = None, guard_prior=None):
        zoo = zoo or Zoo()
        name = name or get_settings().default_restorer
        card = zoo.get(name)
        return cls(zoo.load(name), card, device=device, batch_size=batch_size, fidelity=fidelity,
                   guard_prior=guard_prior)

    @torch.inference_mode()
    def naturalness(self, crops: Sequence[np.ndarray], t: float = NATURALNESS_T,
                    grid: int = NATURALNESS_GRID) -> list[float]:
        """The guard prior's naturalness figures (dB) of aligned face crops (uint8, any size), in one batch:
        `Prior.naturalness` of each crop resized to the prior's size, at ``t``, over a ``grid``-square grid of area
        averages (the check's NATURALNESS_GRID: the coarse structure, fine texture does not count), every crop on the
        same noise (seed 0), so that figures of one face before and after compare."""
        p = self.guard_prior
        size = int(p.image_size)
        x = torch.stack([torch.from_numpy(np.ascontiguousarray(resize(np.asarray(c), size, size))).permute(2, 0, 1)
                         for c in crops]).float() / 255.0
        return p.naturalness(x, t, seed=0, down=max(1, size // int(grid)), shared_noise=True)

    def _naturalness_fn(self) -> NaturalnessFn | None:
        return self.naturalness if self.guard_prior is not None else None

    @property
    def takes_fidelity(self) -> bool:
        """Whether the network takes the fidelity as its own input (CodeFormer's ``w``), so that every call of
        `restore_crops` may carry its own."""
        return self.card.arch in NETWORK_FIDELITY

    def network_kwargs(self, fidelity: float | None = None) -> dict:
        """Keyword arguments of the model call: CodeFormer gets ``w`` (``fidelity``, else the Restorer's, else the
        reference default 0.5) and ``adain=True``; other archs take none (their fidelity, if any, is a pixel blend
        done by the caller)."""
        spec = NETWORK_FIDELITY.get(self.card.arch)
        if spec is None:
            return {}
        to_kwargs, default_w = spec
        w = _check_w(fidelity)
        return to_kwargs(w if w is not None else self.fidelity if self.fidelity is not None else default_w)

    #: the network's precision: "auto" (bf16 autocast on CUDA, fp16 where bf16 is unsupported; fp32 on the CPU),
    #: "fp32", or "bf16" (autocast on any device); the service sets it from FACEADAPT_SERVE_PRECISION
    precision = "auto"

    def _autocast(self):
        if self.precision == "fp32" or (self.precision == "auto" and self.device.type != "cuda"):
            return contextlib.nullcontext()
        bf16 = self.precision == "bf16" or self.device.type != "cuda" or torch.cuda.is_bf16_supported()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if bf16 else torch.float16)

    @torch.inference_mode()
    def restore_tensor(self, x: torch.Tensor, fidelity: float | None = None) -> torch.Tensor:
        """Bx3xSxS in [0,1] -> Bx3xSxS in [0,1], in chunks of `batch_size` (the model runs in its card's value_range;
        `fidelity` is the network's own weight for NETWORK_FIDELITY archs, see `network_kwargs`)."""
        kwargs = self.network_kwargs(fidelity)
        outs = []
        for i in range(0, x.shape[0], self.batch_size):
            chunk = x[i : i + self.batch_size].to(self.device, non_blocking=True)  # async from pinned memory
            with self._autocast():
                y = run_restorer(self.model, chunk, self.card.value_range, **kwargs)
            outs.append(y.float().clamp_(0, 1).cpu())
        return torch.cat(outs) if outs else x.new_zeros((0, 3, self.size, self.size))

    def restore_crops(self, crops: list[np.ndarray], fidelity: float | None = None, detail_ratio: float | None = None,
                      return_info: bool = False):
        """Restore uint8 RGB aligned crops; each comes back at its own size.

        Native-size aware (`restoration.faces.fidelity`): a crop's native size is its side. ``fidelity`` f in [0, 1]
        (None: the Restorer's, else auto): crops up to ``detail_ratio`` x the model size (None: DETAIL_RATIO) get
        ``(1 - f) * upsampled restoration + f * crop``, larger ones the detail-preserving ``crop + (1 - f) *
        upsample(restoration - crop at model size)``, f = 1 returns the crop as it is. For NETWORK_FIDELITY archs
        (CodeFormer) f is the network's ``w`` instead of a pixel blend. Crops at the model size with f 0 / auto are
        the plain network output. ``return_info``: returns ``(crops, infos)``, infos the per-crop dicts
        ``{native_size, mode, fidelity}``."""
        crops = [np.asarray(c) for c in crops]
        f = fidelity if fidelity is not None else self.fidelity
        modes = [decide(max(c.shape[:2]), self.size, f, detail_ratio, self.card.arch) for c in crops]
        outs: list = [None] * len(crops)
        groups: dict = {}
        for i, fm in enumerate(modes):
            if fm.mode == "kept":
                outs[i] = crops[i].copy()
            else:
                groups.setdefault(fm.network_w, []).append(i)
        for w, idx in groups.items():
            x = to_tensor([crops[i] for i in idx], self.size, pin=self.device.type == "cuda")
            y = to_uint8(self.restore_tensor(x, w))
            for k, i in enumerate(idx):
                base = x[k].permute(1, 2, 0).numpy() * 255.0 if modes[i].mode == "detail_preserving" else None
                outs[i] = blend_aligned(crops[i], y[k], base, modes[i])
        if return_info:
            return outs, [fm.to_dict() for fm in modes]
        return outs

    def face_helper(self, detector: str | None = None) -> FaceHelper:
        """The FaceHelper of this restorer (its input size and alignment template) for ``detector`` (None: the
        settings'), made once."""
        key = detector or get_settings().detector
        if key not in self._helpers:
            self._helpers[key] = FaceHelper(size=self.size, detector=key, device=str(self.device),
                                            face_template=template_for_card(self.card))
        return self._helpers[key]

    def restore_image(self, img: np.ndarray, aligned: bool = False, only_center_face: bool = False,
                      detector: str | None = None, fidelity: float | None = None,
                      detail_ratio: float | None = None, max_faces: int | None = None,
                      restore_fn: RestoreFn | None = None, guard: bool | None = None,
                      color: bool = False) -> RestoreResult:
        """Detect, align, restore and paste back every face of an RGB uint8 photo (or one aligned crop):
        `restore_photo` with this restorer's face helper and arch.

        ``fidelity`` / ``detail_ratio``: see `restore_crops` (the detail-preserving paste of large faces is done in
        the photo through the inverse warp); each face's ``extra`` records ``native_size``, ``mode``, ``fidelity``.
        ``max_faces``: at most that many faces, the largest. ``restore_fn`` (None: `restore_crops`): what restores
        the aligned crops, e.g. a micro-batcher that calls `restore_crops` for many requests at once. ``guard`` (the
        never-worse check; None: with auto fidelity) and ``color`` (colour a gray input): see `restore_photo`."""
        helper = self.face_helper(detector)
        f = fidelity if fidelity is not None else self.fidelity
        res = restore_photo(helper, img, restore_fn or self.restore_crops, aligned=aligned,
                            only_center_face=only_center_face, fidelity=f, detail_ratio=detail_ratio,
                            arch=self.card.arch, max_faces=max_faces, guard=guard, color=color,
                            naturalness=self._naturalness_fn())
        res.model = self.card.name
        return res

    def restore_aligned(self, imgs: Sequence[np.ndarray], fidelity: float | None = None,
                        detail_ratio: float | None = None, guard: bool | None = None,
                        color: bool = False) -> list[RestoreResult]:
        """Aligned face crops of any size (many files, one network pass per `batch_size`): what `restore_image` does
        with ``aligned=True`` for each, in batches."""
        helper = self.face_helper("auto")  # no detection runs: any detector (and no weights) will do
        f = fidelity if fidelity is not None else self.fidelity
        results = []
        for img, (out, face) in zip(imgs, restore_aligned_crops(helper, imgs, self.restore_crops, fidelity=f,
                                                                detail_ratio=detail_ratio, arch=self.card.arch,
                                                                guard=guard, naturalness=self._naturalness_fn())):
            gray = not color and is_gray(img)
            results.append(RestoreResult(keep_gray(img, out) if gray else out, [face], None, self.card.name, 1, gray))
        return results


def _check_w(w: float | None) -> float | None:
    if w is None:
        return None
    w = float(w)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"fidelity weight must be in [0, 1], got {w}")
    return w
