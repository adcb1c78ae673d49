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

from restoration.restorer_io import run_restorer
from restoration.settings import get_settings
from restoration.zoo import ModelCard, Zoo


def resolve_device(device: str | None = None) -> torch.device:
    device = device or get_settings().device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but no CUDA device is available")
    return torch.device(device)


def to_tensor(crops: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 HxWx3 RGB crops -> float Bx3xSxS in [0, 1] (resized with antialiasing when needed)."""
    out = []
    for c in crops:
        t = torch.from_numpy(np.array(c, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
        if t.shape[1:] != (size, size):
            t = F.interpolate(t[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
        out.append(t)
    return torch.stack(out).clamp_(0, 1)


def to_uint8(batch: torch.Tensor) -> list[np.ndarray]:
    arr = batch.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


@dataclass
class RestoreResult:
    image: np.ndarray
    faces: list = field(default_factory=list)  # restoration.face.Face
    detector: str | None = None
    model: str = ""


class Restorer:
    """A loaded restorer: aligned crops in, restored crops out, in batches."""

    def __init__(self, model: torch.nn.Module, card: ModelCard, device: str | torch.device | None = None, batch_size: int = 8):
        if card.kind != "restorer":
            raise ValueError(f"{card.name} is a {card.kind}, not a restorer")
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self.model = model.to(self.device).eval()
        self.card = card
        self.size = int(card.input_size)
        self.batch_size = max(1, int(batch_size))
        self._helpers: dict = {}

    @classmethod
    def from_zoo(cls, name: str | None = None, zoo: Zoo | None = None, device: str | None = None, batch_size: int = 8):
        zoo = zoo or Zoo()
        name = name or get_settings().default_restorer
        card = zoo.get(name)
        return cls(zoo.load(name), card, device=device, batch_size=batch_size)

    def _autocast(self):
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def restore_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Bx3xSxS in [0,1] -> Bx3xSxS in [0,1], in chunks of `batch_size` (the model runs in its card's value_range)."""
        outs = []
        for i in range(0, x.shape[0], self.batch_size):
            chunk = x[i : i + self.batch_size].to(self.device)
            with self._autocast():
                y = run_restorer(self.model, chunk, self.card.value_range)
            outs.append(y.float().clamp_(0, 1).cpu())
        return torch.cat(outs) if outs else x.new_zeros((0, 3, self.size, self.size))

    def restore_crops(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        """Restore uint8 RGB crops; each comes back at its own size."""
        if not crops:
            return []
        out = to_uint8(self.restore_tensor(to_tensor(crops, self.size)))
        return [o if o.shape[:2] == c.shape[:2] else _resize(o, c.shape[1], c.shape[0]) for o, c in zip(out, crops)]

    def face_helper(self, detector: str | None = None):
        from restoration.face import FaceHelper

        key = detector or get_settings().detector
        if key not in self._helpers:
            self._helpers[key] = FaceHelper(size=self.size, detector=key, device=str(self.device))
        return self._helpers[key]

    def restore_image(self, img: np.ndarray, aligned: bool = False, only_center_face: bool = False,
                      detector: str | None = None) -> RestoreResult:
        """Detect, align, restore and paste back every face of an RGB uint8 photo (or one aligned crop)."""
        helper = self.face_helper(detector)
        out, faces = helper.process(img, self.restore_crops, aligned=aligned, only_center_face=only_center_face)
        return RestoreResult(image=out, faces=faces, detector=None if aligned else helper.detector_name,
                             model=self.card.name)


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    import cv2

    interp = cv2.INTER_AREA if w < img.shape[1] else cv2.INTER_CUBIC
    return cv2.resize(img, (w, h), interpolation=interp)
