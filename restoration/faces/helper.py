"""FaceHelper: one face detector and one aligner for one crop size, the pair that the whole-photo restore
(`restoration.faces.restore.restore_photo`), adaptation's prepare stage and the service's upload check hold.

Detection lives in :mod:`restoration.faces.detection`, alignment and paste-back in
:mod:`restoration.faces.alignment`; this class only builds both from one set of options and answers for them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from restoration.faces.alignment import FaceAligner
from restoration.faces.detection import Face, FaceDetector

__all__ = ["FaceHelper"]


class FaceHelper:
    """Detect, align and paste back faces for crops of ``size`` x ``size``.

    ``size``: side of the aligned crops. ``detector``, ``model_root``, ``device`` and the keyword ``detect_options``
    (``score_threshold``, ``min_eye_distance``, ``detect_min_side``, ``detect_max_side``, ``detect_pad``,
    ``sort_by``): the :class:`~restoration.faces.detection.FaceDetector`'s. ``face_template``, ``mask_border``,
    ``mask_blur``: the :class:`~restoration.faces.alignment.FaceAligner`'s ('ffhq' by default; it must be the framing
    the restorer was trained on, :func:`~restoration.faces.alignment.template_for_card`).
    """

    def __init__(self, size: int = 512, detector: str | None = "auto", model_root: str | Path | None = None,
                 device: str = "cpu", *, face_template: str | np.ndarray = "ffhq", mask_border: float = 0.05,
                 mask_blur: float = 0.04, **detect_options):
        if int(size) < 16:
            raise ValueError(f"size must be at least 16, got {size}")
        self.detector = FaceDetector(detector, model_root, device, **detect_options)
        self.aligner = FaceAligner(size, face_template, mask_border, mask_blur)
        self.size = self.aligner.size
        #: which detector runs: 'retinaface' or 'mtcnn'
        self.detector_name = self.detector.name
        self.device = self.detector.device
        self.model_root = self.detector.model_root

    def __repr__(self) -> str:
        return f"FaceHelper(size={self.size}, detector={self.detector_name!r}, device={self.device!r})"

    def detect(self, img: np.ndarray, only_center_face: bool = False) -> list[Face]:
        """`FaceDetector.detect`: faces of an RGB uint8 image, largest first."""
        return self.detector.detect(img, only_center_face=only_center_face)

    def affine_for(self, face: Face | np.ndarray) -> np.ndarray:
        """`FaceAligner.affine_for`: the 2x3 image -> crop similarity of a face."""
        return self.aligner.affine_for(face)

    def align(self, img: np.ndarray, face: Face | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`FaceAligner.align`: the aligned crop of a face and its image -> crop affine."""
        return self.aligner.align(img, face)

    def face_region(self, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
        """`FaceAligner.face_region`: the image pixels a face's crop square covers."""
        return self.aligner.face_region(shape, affine)

    def paste(self, img: np.ndarray, crops: Sequence[np.ndarray], affines: Sequence[np.ndarray],
              weights: Sequence[float] | None = None, bases: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
        """`FaceAligner.paste`: restored crops blended back into a copy of ``img``."""
        return self.aligner.paste(img, crops, affines, weights=weights, bases=bases)
