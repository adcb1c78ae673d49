"""One fast network pass over faces: the inference side of FaceAdapt.

`Restorer` wraps a zoo restorer: `restore_crops` runs aligned face crops through the network in
batches (autocast bf16/fp16 on GPU), `restore_image` detects, aligns, restores and pastes every face
of a photo back.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from restoration.models.io import run_restorer
from restoration.runtime import resolve_device
from restoration.settings import get_settings
from restoration.models.zoo import ModelCard, Zoo

#: archs whose forward takes a fidelity weight: arch -> (keyword arguments for a weight w, default w).
#: CodeFormer: ``model(x, w=w, adain=True)`` as in the reference inference_codeformer.py (``--w 0.5``).
NETWORK_FIDELITY = {"codeformer": (lambda w: {"w": w, "adain": True}, 0.5)}


def resize_for_model(x: torch.Tensor, size: int) -> torch.Tensor:
    """NCHW [0, 1] -> N x C x size x size as the model is fed (bicubic, antialiased; unchanged at that size).
    Training resizes with this too (`restoration.training.batches.degrade_native_batch`), so the model learns on
    what it is served."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def to_tensor(crops: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 HxWx3 RGB crops -> float Bx3xSxS in [0, 1] (resized with antialiasing when needed)."""
    out = []
    for c in crops:
        t = torch.from_numpy(np.array(c, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
        out.append(resize_for_model(t[None], size)[0])
    return torch.stack(out).clamp_(0, 1)


def to_uint8(batch: torch.Tensor) -> list[np.ndarray]:
    arr = batch.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


@dataclass
class RestoreResult:
    image: np.ndarray
    faces: list = field(default_factory=list)  # restoration.faces.helper.Face
    detector: str | None = None
    model: str = ""


class Restorer:
    """A loaded restorer: aligned crops in, restored crops out, in batches."""

    def __init__(self, model: torch.nn.Module, card: ModelCard, device: str | torch.device | None = None, batch_size: int = 8,
                 fidelity: float | None = None):
        if card.kind != "restorer":
            raise ValueError(f"{card.name} is a {card.kind}, not a restorer")
        self.fidelity = _check_w(fidelity)  # the network's own fidelity weight (NETWORK_FIDELITY archs); None: default
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.model = model.to(self.device).eval()
        self.card = card
        self.size = int(card.input_size)
        self.batch_size = max(1, int(batch_size))
        self._helpers: dict = {}

    @classmethod
    def from_zoo(cls, name: str | None = None, zoo: Zoo | None = None, device: str | None = None, batch_size: int = 8,
                 fidelity: float | None = None):
        zoo = zoo or Zoo()
        name = name or get_settings().default_restorer
        card = zoo.get(name)
        return cls(zoo.load(name), card, device=device, batch_size=batch_size, fidelity=fidelity)

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

    def _autocast(self):
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def restore_tensor(self, x: torch.Tensor, fidelity: float | None = None) -> torch.Tensor:
        """Bx3xSxS in [0,1] -> Bx3xSxS in [0,1], in chunks of `batch_size` (the model runs in its card's value_range;
        `fidelity` is the network's own weight for NETWORK_FIDELITY archs, see `network_kwargs`)."""
        kwargs = self.network_kwargs(fidelity)
        outs = []
        for i in range(0, x.shape[0], self.batch_size):
            chunk = x[i : i + self.batch_size].to(self.device)
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
        from restoration.faces.fidelity import blend_aligned, decide

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
            x = to_tensor([crops[i] for i in idx], self.size)
            y = to_uint8(self.restore_tensor(x, w))
            for k, i in enumerate(idx):
                base = x[k].permute(1, 2, 0).numpy() * 255.0 if modes[i].mode == "detail_preserving" else None
                outs[i] = blend_aligned(crops[i], y[k], base, modes[i])
        if return_info:
            return outs, [fm.to_dict() for fm in modes]
        return outs

    def face_helper(self, detector: str | None = None):
        from restoration.faces.helper import FaceHelper, template_for_card

        key = detector or get_settings().detector
        if key not in self._helpers:
            self._helpers[key] = FaceHelper(size=self.size, detector=key, device=str(self.device),
                                            face_template=template_for_card(self.card))
        return self._helpers[key]

    def restore_image(self, img: np.ndarray, aligned: bool = False, only_center_face: bool = False,
                      detector: str | None = None, fidelity: float | None = None,
                      detail_ratio: float | None = None) -> RestoreResult:
        """Detect, align, restore and paste back every face of an RGB uint8 photo (or one aligned crop).

        ``fidelity`` / ``detail_ratio``: see `restore_crops` (the detail-preserving paste of large faces is done in
        the photo through the inverse warp); each face's ``extra`` records ``native_size``, ``mode``, ``fidelity``."""
        helper = self.face_helper(detector)
        f = fidelity if fidelity is not None else self.fidelity
        out, faces = helper.process(img, self.restore_crops, aligned=aligned, only_center_face=only_center_face,
                                    fidelity=f, detail_ratio=detail_ratio, arch=self.card.arch)
        return RestoreResult(image=out, faces=faces, detector=None if aligned else helper.detector_name,
                             model=self.card.name)


def _check_w(w: float | None) -> float | None:
    if w is None:
        return None
    w = float(w)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"fidelity weight must be in [0, 1], got {w}")
    return w


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2

    interp = cv2.INTER_AREA if w < img.shape[1] else cv2.INTER_CUBIC
    return cv2.resize(img, (w, h), interpolation=interp)
