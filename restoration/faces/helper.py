"""Face detection, 5-point alignment to the FFHQ template and feathered paste-back.

Detectors (never downloading anything):

* ``retinaface``: facexlib's RetinaFace mobilenet0.25 ('retinaface_mobile0.25'), built directly and
  loaded from ``<model_root>/detection_mobilenet0.25_Final.pth`` (``model_root`` defaults to
  ``get_settings().facexlib_dir``). facexlib's own loader would download a missing file, so it is not
  used: when the file is absent RetinaFace is simply not available.
* ``mtcnn``: facenet-pytorch's MTCNN, whose weights ship inside the wheel.
* ``auto``: RetinaFace when its weights are on disk, otherwise MTCNN.

:attr:`FaceHelper.detector_name` says which detector runs.

Landmarks are always 5x2 ``(x, y)`` in image pixels, ordered left eye, right eye, nose, left mouth
corner, right mouth corner, where "left" is the image left (the subject's right).

Alignment is a least-squares similarity transform (rotation, uniform scale, translation; Umeyama's
closed form, no reflection) from the five landmarks to the FFHQ five-point template of a 512 crop,
scaled to ``size``.

Paste-back warps each restored crop into the image with the inverse transform and blends it through a
soft mask: the crop square with a border band set to zero, Gaussian blurred inside the crop (the
"eroded and blurred square"), then warped like the face. The mask is exactly zero outside the face's
warped square, so pixels outside every face region are left bit-for-bit unchanged. No face-parsing
network is needed.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

__all__ = [
    "Face",
    "FaceHelper",
    "FaceError",
    "FFHQ_TEMPLATE_512",
    "UTK200_TEMPLATE_512",
    "TEMPLATES",
    "RETINAFACE_WEIGHTS",
    "similarity_transform",
    "template",
    "template_for_card",
]

RETINAFACE_WEIGHTS = "detection_mobilenet0.25_Final.pth"

#: Five-point template of FFHQ-aligned 512x512 faces (x, y): left eye, right eye, nose, mouth corners.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.19360],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)

#: Five-point template of UTKFace "aligned & cropped" faces (the framing of shared/data/faces-utk200, on which the
#: bundled 64 px models were trained), in a 512 frame: the mean RetinaFace landmarks of 300 training-split faces
#: (seed 0) scaled by 512/200. Eye distance 199 px of 512 vs FFHQ's 126: the face fills the crop.
UTK200_TEMPLATE_512 = np.array(
    [
        [153.96, 148.87],
        [352.73, 149.82],
        [249.87, 265.08],
        [166.57, 353.87],
        [338.29, 354.05],
    ],
    dtype=np.float64,
)

#: named alignment templates (512 frame); a model card's `extra.face_template` names the framing it was trained on
TEMPLATES = {"ffhq": FFHQ_TEMPLATE_512, "utk200": UTK200_TEMPLATE_512}

#: align() reduces the face region with area averaging first when it shrinks it below this scale (no aliasing)
ANTIALIAS_BELOW = 0.75

#: colour (RGB) of the area outside the source image in aligned crops
BORDER_RGB = (132, 133, 135)

#: default minimum confidence per detector (RetinaFace's 0.97 is what GFPGAN/CodeFormer pipelines use)
DEFAULT_SCORE_THRESHOLD = {"retinaface": 0.97, "mtcnn": 0.95}

RestoreFn = Callable[[list[np.ndarray]], Sequence[np.ndarray]]


class FaceError(RuntimeError):
    """A detector cannot be set up (for example RetinaFace asked for explicitly without weights)."""


@dataclass
class Face:
    """One detected face. ``box`` is (x1, y1, x2, y2), ``landmarks5`` is 5x2 (x, y), image pixels."""

    box: np.ndarray
    score: float
    landmarks5: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = (float(v) for v in self.box)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    @property
    def center(self) -> tuple[float, float]:
        x1, y1, x2, y2 = (float(v) for v in self.box)
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0

    @property
    def eye_distance(self) -> float:
        return float(np.linalg.norm(self.landmarks5[1] - self.landmarks5[0]))

    def to_dict(self) -> dict:
        return {
            "box": [round(float(v), 2) for v in self.box],
            "score": round(float(self.score), 4),
            "landmarks5": [[round(float(x), 2), round(float(y), 2)] for x, y in self.landmarks5],
        }


def template(size: int, name: str | np.ndarray = "ffhq") -> np.ndarray:
    """The five-point template ``name`` (a key of :data:`TEMPLATES`, or a 5x2 array in a 512 frame) for a
    ``size`` x ``size`` crop. The default is FFHQ's."""
    if isinstance(name, str):
        if name not in TEMPLATES:
            raise ValueError(f"unknown face template {name!r}; known: {', '.join(sorted(TEMPLATES))}")
        pts = TEMPLATES[name]
    else:
        pts = np.asarray(name, dtype=np.float64).reshape(5, 2)
    return pts * (float(size) / 512.0)


def template_for_card(card) -> str:
    """The alignment template a restorer was trained with: its card's ``extra.face_template`` when set, 'utk200' for
    models trained on the UTKFace crops (``extra.data.name == 'faces-utk200'``: the bundled 64 px models, whose
    faces fill the crop far more than FFHQ's), else 'ffhq' (the public 512 px checkpoints)."""
    extra = getattr(card, "extra", None) or {}
    name = extra.get("face_template")
    if isinstance(name, str) and name in TEMPLATES:
        return name
    data = extra.get("data")
    if isinstance(data, dict) and str(data.get("name", "")).startswith("faces-utk"):
        return "utk200"
    return "ffhq"


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation + uniform scale + translation) mapping ``src`` onto ``dst``.

    Umeyama's closed form with the reflection case excluded. Returns a 2x3 float64 matrix ``M`` with
    ``dst ~ M @ [x, y, 1]``.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise ValueError(f"need matching point sets of at least 2 points, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0**2).sum() / len(src)
    if var_s <= 1e-12:
        raise ValueError("degenerate landmarks: all points coincide")
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[1] = -1.0
    rot = u @ np.diag(d) @ vt
    scale = float((sig * d).sum() / var_s)
    t = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, t[:, None]])


# ------------------------------------------------------------------------------ detectors
_MODEL_CACHE: dict[tuple, object] = {}
_MODEL_LOCK = threading.Lock()


def _load_retinaface(weights: Path, device: str):
    key = ("retinaface", str(weights), str(device))
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            import torch
            from facexlib.detection.retinaface import RetinaFace

            net = RetinaFace(network_name="mobile0.25", half=False, device=torch.device(device))
            state = torch.load(str(weights), map_location="cpu", weights_only=True)
            state = {k[7:] if k.startswith("module.") else k: v for k, v in state.items()}
            net.load_state_dict(state, strict=True)
            net.eval().to(device)
            _MODEL_CACHE[key] = net
        return _MODEL_CACHE[key]


def _load_mtcnn(device: str):
    key = ("mtcnn", str(device))
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            from facenet_pytorch import MTCNN

            _MODEL_CACHE[key] = MTCNN(keep_all=True, select_largest=False, post_process=False, device=device)
        return _MODEL_CACHE[key]


def _check_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {img.shape} {img.dtype}")
    return img


# ------------------------------------------------------------------------------ helper
class FaceHelper:
    """Detect, align, restore and paste back faces.

    ``size``: side of the aligned crops. ``detector``: 'auto', 'retinaface' or 'mtcnn' (None: the
    settings' ``detector``). ``model_root``: folder with facexlib weights (None: the settings'
    ``facexlib_dir``). ``score_threshold``: minimum detector confidence (None: the per-detector
    default in :data:`DEFAULT_SCORE_THRESHOLD`). ``min_eye_distance``: faces whose eyes are closer than
    this many pixels are ignored (too small to restore). ``detect_min_side``: images whose shorter side
    is below this are upscaled for detection only (small faces in small images are otherwise missed);
    ``detect_max_side``: larger images are downscaled for detection. ``detect_pad``: a replicated border of this
    fraction of the shorter side is added for detection (MTCNN's landmarks on faces touching the image edge, e.g.
    tight face crops, are off by ~10% of the side without it, ~3% with it). ``sort_by``: 'area' (largest
    first) or 'score'. ``mask_border`` and ``mask_blur``: zero band and Gaussian sigma of the paste
    mask, as fractions of ``size``. ``face_template``: the five-point template the crops are aligned to, 'ffhq'
    (default), 'utk200' or a 5x2 array in a 512 frame; it must be the framing the restorer was trained on
    (:func:`template_for_card`).
    """

    def __init__(
        self,
        size: int = 512,
        detector: str | None = "auto",
        model_root: str | Path | None = None,
        device: str = "cpu",
        score_threshold: float | None = None,
        min_eye_distance: float = 5.0,
        detect_min_side: int = 512,
        detect_max_side: int = 2048,
        detect_pad: float = 0.25,
        sort_by: str = "area",
        mask_border: float = 0.05,
        mask_blur: float = 0.04,
        face_template: str | np.ndarray = "ffhq",
    ):
        if int(size) < 16:
            raise ValueError(f"size must be at least 16, got {size}")
        if sort_by not in ("area", "score"):
            raise ValueError("sort_by must be 'area' or 'score'")
        self.size = int(size)
        self.device = str(device)
        self.min_eye_distance = float(min_eye_distance)
        self.detect_min_side = int(detect_min_side)
        self.detect_max_side = int(detect_max_side)
        self.detect_pad = float(detect_pad)
        self.sort_by = sort_by
        self.mask_border = float(mask_border)
        self.mask_blur = float(mask_blur)
        if detector is None or model_root is None:
            from restoration.settings import get_settings

            settings = get_settings()
            detector = detector or settings.detector
            model_root = model_root if model_root is not None else settings.facexlib_dir
        self.model_root = Path(model_root).expanduser()
        detector = str(detector).lower()
        weights = self.model_root / RETINAFACE_WEIGHTS
        if detector == "auto":
            detector = "retinaface" if weights.is_file() else "mtcnn"
        elif detector == "retinaface":
            if not weights.is_file():
                raise FaceError(
                    f"RetinaFace weights not found at {weights} (nothing is downloaded); put "
                    f"{RETINAFACE_WEIGHTS} there, or use detector='mtcnn' or 'auto'"
                )
        elif detector != "mtcnn":
            raise ValueError(f"unknown detector {detector!r}; use 'auto', 'retinaface' or 'mtcnn'")
        self.detector_name = detector
        if score_threshold is None:
            score_threshold = DEFAULT_SCORE_THRESHOLD[detector]
        self.score_threshold = float(score_threshold)
        self._weights = weights
        self.face_template = face_template if isinstance(face_template, str) else "custom"
        self._template = template(self.size, face_template)
        self._soft_mask: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"FaceHelper(size={self.size}, detector={self.detector_name!r}, device={self.device!r})"

    # -------------------------------------------------------------------------- detection
    def _detect_raw(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes Nx4, scores N, landmarks Nx5x2) in the coordinates of ``img``."""
        import torch

        with torch.inference_mode():
            if self.detector_name == "retinaface":
                net = _load_retinaface(self._weights, self.device)
                # facexlib's RetinaFace takes OpenCV BGR order (its mean is BGR)
                out = net.detect_faces(np.ascontiguousarray(img[..., ::-1]), conf_threshold=min(0.5, self.score_threshold))
                out = np.asarray(out, dtype=np.float64).reshape(-1, 15)
                return out[:, :4], out[:, 4], out[:, 5:15].reshape(-1, 5, 2)
            mtcnn = _load_mtcnn(self.device)
            boxes, probs, points = mtcnn.detect(img, landmarks=True)
            if boxes is None:
                return np.zeros((0, 4)), np.zeros(0), np.zeros((0, 5, 2))
            return (
                np.asarray(boxes, np.float64).reshape(-1, 4),
                np.asarray(probs, np.float64).reshape(-1),
                np.asarray(points, np.float64).reshape(-1, 5, 2),
            )

    def detect(self, img: np.ndarray, only_center_face: bool = False) -> list[Face]:
        """Faces in an RGB uint8 image, largest first (or best score first with ``sort_by='score'``).

        Detection runs on the image with a replicated border (``detect_pad``: faces that touch the image edge get
        their landmarks right); when that finds no face, once more on the image as it is (RetinaFace misses some
        tight face crops with the border)."""
        img = _check_image(img)
        faces = self._detect(img, self.detect_pad)
        if not faces and self.detect_pad > 0:
            faces = self._detect(img, 0.0)
        key = (lambda f: f.area) if self.sort_by == "area" else (lambda f: f.score)
        faces.sort(key=key, reverse=True)
        if only_center_face and faces:
            h, w = img.shape[:2]
            cx, cy = w / 2.0, h / 2.0
            faces = [min(faces, key=lambda f: (f.center[0] - cx) ** 2 + (f.center[1] - cy) ** 2)]
        return faces

    def _detect(self, img: np.ndarray, detect_pad: float) -> list[Face]:
        h, w = img.shape[:2]
        pad = int(round(detect_pad * min(h, w))) if detect_pad > 0 else 0
        padded = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_REPLICATE) if pad else img
        ph, pw = padded.shape[:2]
        scale = 1.0
        if min(ph, pw) < self.detect_min_side:
            scale = self.detect_min_side / min(ph, pw)
        if max(ph, pw) * scale > self.detect_max_side:
            scale = self.detect_max_side / max(ph, pw)
        work = padded
        if abs(scale - 1.0) > 1e-6:
            interp = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
            work = cv2.resize(padded, (max(1, round(pw * scale)), max(1, round(ph * scale))), interpolation=interp)
        sx, sy = work.shape[1] / pw, work.shape[0] / ph
        boxes, scores, lms = self._detect_raw(work)
        faces = []
        for box, score, lm in zip(boxes, scores, lms):
            if not np.isfinite(score) or score < self.score_threshold:
                continue
            box = box / np.array([sx, sy, sx, sy]) - pad
            lm = lm / np.array([sx, sy]) - pad
            if not (np.isfinite(box).all() and np.isfinite(lm).all()):
                continue
            face = Face(box=box.astype(np.float32), score=float(score), landmarks5=lm.astype(np.float32))
            cx, cy = face.center
            if not (0 <= cx < w and 0 <= cy < h):
                continue  # found in the added border only
            if face.eye_distance < self.min_eye_distance:
                continue
            faces.append(face)
        return faces

    # -------------------------------------------------------------------------- alignment
    def affine_for(self, face: Face | np.ndarray) -> np.ndarray:
        """The 2x3 image -> crop similarity transform for a face (or a 5x2 landmark array)."""
        lm = face.landmarks5 if isinstance(face, Face) else np.asarray(face)
        return similarity_transform(lm, self._template)

    def align(self, img: np.ndarray, face: Face | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Aligned crop (uint8 ``size`` x ``size`` x 3) and its 2x3 image -> crop affine.

        When the face is shrunk by more than :data:`ANTIALIAS_BELOW` (a large face for a small model), the face's
        region is first reduced with area averaging, so that the crop is not aliased."""
        img = _check_image(img)
        affine = self.affine_for(face)
        src, warp = img, affine
        scale = float(np.hypot(affine[0, 0], affine[0, 1]))
        if scale < ANTIALIAS_BELOW:
            inv = cv2.invertAffineTransform(affine)
            s = self.size
            pts = np.array([[0, 0], [s, 0], [s, s], [0, s]], np.float64) @ inv[:, :2].T + inv[:, 2]
            h, w = img.shape[:2]
            x0, y0 = max(0, int(np.floor(pts[:, 0].min())) - 2), max(0, int(np.floor(pts[:, 1].min())) - 2)
            x1, y1 = min(w, int(np.ceil(pts[:, 0].max())) + 3), min(h, int(np.ceil(pts[:, 1].max())) + 3)
            if x1 - x0 >= 2 and y1 - y0 >= 2:
                sw, sh = max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))
                src = cv2.resize(img[y0:y1, x0:x1], (sw, sh), interpolation=cv2.INTER_AREA)
                # pixel (u, v) of the reduced region is centred on x = x0 + (u + 0.5) / kx - 0.5 (same for y)
                kx, ky = sw / (x1 - x0), sh / (y1 - y0)
                offset = np.array([x0 + 0.5 / kx - 0.5, y0 + 0.5 / ky - 0.5], np.float64)
                warp = np.hstack([affine[:, :2] @ np.diag([1.0 / kx, 1.0 / ky]),
                                  (affine[:, 2] + affine[:, :2] @ offset)[:, None]])
        crop = cv2.warpAffine(
            src,
            warp,
            (self.size, self.size),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=BORDER_RGB,
        )
        return crop, affine

    # -------------------------------------------------------------------------- paste-back
    def soft_mask(self) -> np.ndarray:
        """The blending mask in crop coordinates (float32 ``size`` x ``size``, 1 inside, 0 on the border)."""
        if self._soft_mask is None:
            s = self.size
            border = max(2, int(round(s * self.mask_border)))
            sigma = max(0.5, s * self.mask_blur)
            m = np.zeros((s, s), np.float32)
            m[border:-border, border:-border] = 1.0
            # erode by the blur's reach so that the blurred mask still ends inside the square
            reach = int(np.ceil(2.5 * sigma))
            inner = np.zeros_like(m)
            if border + reach < s // 2:
                inner[border + reach : s - border - reach, border + reach : s - border - reach] = 1.0
            else:
                inner = m
            blurred = cv2.GaussianBlur(inner, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_CONSTANT)
            blurred = blurred / max(float(blurred.max()), 1e-6)
            self._soft_mask = np.clip(blurred * m, 0.0, 1.0).astype(np.float32)
        return self._soft_mask

    def face_region(self, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
        """Boolean HxW mask of the image pixels that the face's crop square covers (where paste may write)."""
        inv = cv2.invertAffineTransform(np.asarray(affine, np.float64))
        region = cv2.warpAffine(
            np.ones((self.size, self.size), np.uint8), inv, (shape[1], shape[0]), flags=cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_CONSTANT, borderValue=0,
        )
        return region > 0

    def paste(
        self,
        img: np.ndarray,
        crops: Sequence[np.ndarray],
        affines: Sequence[np.ndarray],
        weights: Sequence[float] | None = None,
        bases: Sequence[np.ndarray | None] | None = None,
    ) -> np.ndarray:
        """Blend restored crops back into a copy of ``img`` (uint8 RGB) with a feathered mask.

        Crops of another size than ``size`` are resized first. Pixels outside every face's warped
        crop square are returned exactly as they were. ``weights`` (default all 1): the share of the
        restoration per face, 1 - fidelity (0: the face is left as it is). ``bases`` (default None): per face, the
        aligned crop the restoration was made from; given, the paste is detail-preserving, ``img + weight * mask *
        warp(restored - base)`` (only the band the model represents is replaced, the image's finer detail is kept),
        else ``img + weight * mask * (warp(restored) - img)``.
        """
        img = _check_image(img)
        if len(crops) != len(affines):
            raise ValueError(f"{len(crops)} crops but {len(affines)} affines")
        if weights is not None and len(weights) != len(crops):
            raise ValueError(f"{len(crops)} crops but {len(weights)} weights")
        if bases is not None and len(bases) != len(crops):
            raise ValueError(f"{len(crops)} crops but {len(bases)} bases")
        out = img.copy()
        h, w = img.shape[:2]
        s = self.size
        mask_crop = self.soft_mask()
        corners = np.array([[0, 0], [s, 0], [s, s], [0, s]], np.float64)
        for i, (crop, affine) in enumerate(zip(crops, affines)):
            weight = 1.0 if weights is None else float(weights[i])
            base = None if bases is None else bases[i]
            if weight <= 0.0:
                continue
            crop = np.asarray(crop)
            if crop.ndim != 3 or crop.shape[2] != 3:
                raise ValueError(f"restored crops must be HxWx3, got {crop.shape}")
            if crop.dtype != np.uint8:
                raise ValueError(f"restored crops must be uint8, got {crop.dtype}")
            if crop.shape[:2] != (s, s):
                interp = cv2.INTER_AREA if crop.shape[0] > s else cv2.INTER_CUBIC
                crop = cv2.resize(crop, (s, s), interpolation=interp)
            inv = cv2.invertAffineTransform(np.asarray(affine, np.float64))
            pts = corners @ inv[:, :2].T + inv[:, 2]
            x0 = max(0, int(np.floor(pts[:, 0].min())) - 2)
            y0 = max(0, int(np.floor(pts[:, 1].min())) - 2)
            x1 = min(w, int(np.ceil(pts[:, 0].max())) + 3)
            y1 = min(h, int(np.ceil(pts[:, 1].max())) + 3)
            if x1 <= x0 or y1 <= y0:
                continue  # the face lies outside the image
            inv_roi = inv.copy()
            inv_roi[:, 2] -= (x0, y0)
            size_roi = (x1 - x0, y1 - y0)
            if base is None:
                warped = cv2.warpAffine(
                    crop, inv_roi, size_roi, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
                ).astype(np.float32)
            else:
                base = np.asarray(base)
                if base.shape != (s, s, 3):
                    raise ValueError(f"base crops must be {s}x{s}x3, got {base.shape}")
                delta = crop.astype(np.float32) - base.astype(np.float32)
                warped = cv2.warpAffine(
                    delta, inv_roi, size_roi, flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE
                )
            mask = cv2.warpAffine(
                mask_crop, inv_roi, size_roi, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
            )
            touched = mask > 0
            if not touched.any():
                continue
            roi = out[y0:y1, x0:x1]
            m = mask[touched][:, None]
            if weight != 1.0:
                m = m * weight
            if base is None:
                blended = warped[touched] * m + roi[touched].astype(np.float32) * (1.0 - m)
            else:
                blended = roi[touched].astype(np.float32) + warped[touched] * m
            roi[touched] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        return out

    # -------------------------------------------------------------------------- all together
    def process(
        self,
        img: np.ndarray,
        restore_fn: RestoreFn,
        aligned: bool = False,
        only_center_face: bool = False,
        fidelity: float | None = None,
        detail_ratio: float | None = None,
        arch: str | None = None,
    ) -> tuple[np.ndarray, list[Face]]:
        """Detect, align, restore (``restore_fn(list of crops) -> list of crops``) and paste back.

        ``aligned=True``: ``img`` is already an aligned face crop; it is resized to ``size``, restored
        and resized back, and the returned face list holds one face covering the whole input. With no
        face found the image comes back unchanged (a copy) with an empty list.

        ``fidelity`` (None: auto), ``detail_ratio`` (None: :data:`restoration.faces.fidelity.DETAIL_RATIO`) and the
        restorer's ``arch`` decide per face between a plain restoration, a detail-preserving paste and leaving the
        face as it is (:mod:`restoration.faces.fidelity`); each returned face's ``extra`` holds ``native_size``, ``mode``
        and ``fidelity``. For archs that take the fidelity themselves (CodeFormer) ``restore_fn`` is called as
        ``restore_fn(crops, fidelity=w)``.
        """
        from restoration.faces.fidelity import blend_aligned, decide

        img = _check_image(img)
        if aligned:
            h, w = img.shape[:2]
            fm = decide(max(h, w), self.size, fidelity, detail_ratio, arch)
            lm = self._template * np.array([w / self.size, h / self.size])
            face = Face(box=np.array([0, 0, w, h], np.float32), score=1.0, landmarks5=lm.astype(np.float32),
                        extra={"aligned": True, **fm.to_dict()})
            if fm.mode == "kept":
                return img.copy(), [face]
            crop = img
            if (h, w) != (self.size, self.size):
                interp = cv2.INTER_AREA if min(h, w) > self.size else cv2.INTER_CUBIC
                crop = cv2.resize(img, (self.size, self.size), interpolation=interp)
            restored = self._run_restore(restore_fn, [crop], fm.network_w)[0]
            if restored.shape[:2] != (self.size, self.size):
                restored = cv2.resize(restored, (self.size, self.size), interpolation=cv2.INTER_AREA
                                      if restored.shape[0] > self.size else cv2.INTER_CUBIC)
            restored = blend_aligned(img, restored, crop, fm)
            if restored is img:
                restored = img.copy()  # never hand the caller's array back as the result
            return restored, [face]
        faces = self.detect(img, only_center_face=only_center_face)
        return self.restore_faces(img, faces, restore_fn, fidelity=fidelity, detail_ratio=detail_ratio,
                                  arch=arch), faces

    def restore_faces(self, img: np.ndarray, faces: list[Face], restore_fn: RestoreFn,
                      fidelity: float | None = None, detail_ratio: float | None = None,
                      arch: str | None = None) -> np.ndarray:
        """Align the given (already detected) faces, restore them with ``restore_fn`` and paste them back.
        With no face the image comes back unchanged (a copy). ``fidelity``, ``detail_ratio``, ``arch``: as in
        :meth:`process`; each face's ``extra`` gets ``native_size``, ``mode`` and ``fidelity``."""
        from restoration.faces.fidelity import affine_native_size, decide

        img = _check_image(img)
        if not faces:
            return img.copy()
        crops, affines, modes = [], [], []
        for face in faces:
            crop, affine = self.align(img, face)
            fm = decide(affine_native_size(affine, self.size), self.size, fidelity, detail_ratio, arch)
            face.extra.update(fm.to_dict())
            if fm.mode == "kept":
                continue
            crops.append(crop)
            affines.append(affine)
            modes.append(fm)
        if not crops:
            return img.copy()
        restored = self._run_restore(restore_fn, crops, modes[0].network_w)
        return self.paste(img, restored, affines, weights=[fm.weight for fm in modes],
                          bases=[c if fm.mode == "detail_preserving" else None for c, fm in zip(crops, modes)])

    def _run_restore(self, restore_fn: RestoreFn, crops: list[np.ndarray], network_w: float | None = None) -> list[np.ndarray]:
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
