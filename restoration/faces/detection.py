"""Face detection: the RetinaFace and MTCNN detectors (never downloading anything), `Face`, the score thresholds and
the padded-border retry.

Detectors:

* ``retinaface``: facexlib's RetinaFace mobilenet0.25 ('retinaface_mobile0.25'), built directly and
  loaded from ``<model_root>/detection_mobilenet0.25_Final.pth`` (``model_root`` defaults to
  ``get_settings().facexlib_dir``). facexlib's own loader would download a missing file, so it is not
  used: when the file is absent RetinaFace is simply not available.
* ``mtcnn``: facenet-pytorch's MTCNN, whose weights ship inside the wheel.
* ``auto``: RetinaFace when its weights are on disk, otherwise MTCNN.

:attr:`FaceDetector.name` says which detector runs.

Landmarks are always 5x2 ``(x, y)`` in image pixels, ordered left eye, right eye, nose, left mouth
corner, right mouth corner, where "left" is the image left (the subject's right).

False detections are filtered (:func:`filter_faces`, on by default): beside the score threshold, a face must have a
face's landmark geometry (:func:`geometry_problem`) and must not be a small face inside or beside a face that fills
the image (:data:`FILTER`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from restoration.settings import get_settings

__all__ = ["Face", "FaceError", "FaceDetector", "RETINAFACE_WEIGHTS", "DEFAULT_SCORE_THRESHOLD", "FILTER",
           "check_image", "geometry_problem", "filter_faces"]

RETINAFACE_WEIGHTS = "detection_mobilenet0.25_Final.pth"

#: default minimum confidence per detector (RetinaFace's 0.97 is what GFPGAN/CodeFormer pipelines use)
DEFAULT_SCORE_THRESHOLD = {"retinaface": 0.97, "mtcnn": 0.95}


#: The false-detection filter (`filter_faces`). Landmark geometry, in the face's own frame (x along the eyes, unit =
#: the eye distance): the mouth corners `mouth_width` apart and tilted at most `max_tilt_deg` from the eyes' line, the
#: mouth centre `eye_mouth` below the eyes' centre and at most `max_mouth_offset` beside it, the nose below the eyes
#: and above the mouth (`nose_depth`, a share of the eye-mouth height) and at most `max_nose_offset` beside the eyes'
#: centre, all five points inside the box grown by `box_margin` of its side. Checked on the landmarks of 1,000
#: faces-utk200 crops (RetinaFace) and 400 (MTCNN) and of the shared real-world crops and photos: every real face
#: passes (tests/test_uploads_crops.py).
#: Size: when the largest face fills the image (its box covers at least `fill_area` of it), a face whose eye distance
#: is under `small_in_fill` of the largest's is a false detection (a face-like patch of that face: an ear, the hair);
#: so is any face whose box lies mostly (`max_inside`) within a larger face's box.
FILTER = {"mouth_width": (0.35, 1.5), "max_tilt_deg": 35.0, "eye_mouth": (0.55, 1.9), "max_mouth_offset": 0.6,
          "nose_depth": (0.05, 1.0), "max_nose_offset": 0.9, "box_margin": 0.25, "fill_area": 0.2,
          "small_in_fill": 0.45, "max_inside": 0.6}


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


def check_image(img: np.ndarray) -> np.ndarray:
    """``img`` as an array, or a ValueError when it is not an HxWx3 uint8 RGB image."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got {img.shape} {img.dtype}")
    return img


def geometry_problem(face: Face) -> str | None:
    """Why `face`'s five landmarks are not a face's (see `FILTER`), or None when they are."""
    lm = np.asarray(face.landmarks5, dtype=np.float64)
    eyes = lm[1] - lm[0]
    d = float(np.linalg.norm(eyes))
    if d <= 1e-6:
        return "eyes coincide"
    ux = eyes / d
    uy = np.array([-ux[1], ux[0]])  # image y grows downwards: (x, y) rotated by +90 degrees points down the face
    centre = (lm[0] + lm[1]) / 2.0

    def frame(pt):
        v = pt - centre
        return float(v @ ux) / d, float(v @ uy) / d

    mouth = lm[4] - lm[3]
    mw = float(np.linalg.norm(mouth)) / d
    if not FILTER["mouth_width"][0] <= mw <= FILTER["mouth_width"][1]:
        return f"mouth width {mw:.2f} eye distances"
    tilt = abs(float(np.degrees(np.arctan2(mouth @ uy, mouth @ ux))))
    if tilt > FILTER["max_tilt_deg"]:
        return f"mouth tilted {tilt:.0f} degrees from the eyes"
    mx, my = frame((lm[3] + lm[4]) / 2.0)
    if not FILTER["eye_mouth"][0] <= my <= FILTER["eye_mouth"][1] or abs(mx) > FILTER["max_mouth_offset"]:
        return f"mouth at ({mx:.2f}, {my:.2f}) eye distances from the eyes"
    nx, ny = frame(lm[2])
    if not FILTER["nose_depth"][0] * my <= ny <= FILTER["nose_depth"][1] * my or abs(nx) > FILTER["max_nose_offset"]:
        return f"nose at ({nx:.2f}, {ny:.2f}) eye distances from the eyes"
    x1, y1, x2, y2 = (float(v) for v in face.box)
    mx_, my_ = FILTER["box_margin"] * (x2 - x1), FILTER["box_margin"] * (y2 - y1)
    if not ((lm[:, 0] >= x1 - mx_).all() and (lm[:, 0] <= x2 + mx_).all() and (lm[:, 1] >= y1 - my_).all()
            and (lm[:, 1] <= y2 + my_).all()):
        return "landmarks outside the face box"
    return None


def _inside_share(small: Face, big: Face) -> float:
    """The share of `small`'s box that lies inside `big`'s."""
    a, b = small.box, big.box
    w = max(0.0, min(float(a[2]), float(b[2])) - max(float(a[0]), float(b[0])))
    h = max(0.0, min(float(a[3]), float(b[3])) - max(float(a[1]), float(b[1])))
    return w * h / max(small.area, 1e-6)


def filter_faces(faces: list[Face], shape: tuple[int, ...]) -> list[Face]:
    """`faces` (of an image of `shape`) without the false detections (`FILTER`), in their order; each dropped face's
    reason goes to the log of the kept ones' first `extra["dropped"]` (a list of {box, score, reason})."""
    kept, dropped = [], []
    h, w = shape[:2]
    for f in faces:
        why = geometry_problem(f)
        if why is not None:
            dropped.append((f, why))
        else:
            kept.append(f)
    if kept:
        largest = max(kept, key=lambda f: f.area)
        fills = largest.area >= FILTER["fill_area"] * h * w
        out = []
        for f in kept:
            if f is not largest:
                if fills and f.eye_distance < FILTER["small_in_fill"] * largest.eye_distance:
                    dropped.append((f, "a small face beside a face that fills the image"))
                    continue
                if any(g.area > f.area and _inside_share(f, g) > FILTER["max_inside"] for g in kept if g is not f):
                    dropped.append((f, "inside a larger face"))
                    continue
            out.append(f)
        kept = out
    if kept and dropped:
        kept[0].extra["dropped"] = [{"box": [round(float(v), 1) for v in f.box], "score": round(float(f.score), 4),
                                     "reason": why} for f, why in dropped]
    return kept


# ------------------------------------------------------------------------------ the networks, loaded once per process
_MODEL_CACHE: dict[tuple, object] = {}
_MODEL_LOCK = threading.Lock()


def _load_retinaface(weights: Path, device: str):
    key = ("retinaface", str(weights), str(device))
    with _MODEL_LOCK:
        if key not in _MODEL_CACHE:
            # facexlib is an optional heavy dependency (installed --no-deps): imported only when RetinaFace runs
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
            # facenet-pytorch is an optional heavy dependency (installed --no-deps): imported only when MTCNN runs
            from facenet_pytorch import MTCNN

            _MODEL_CACHE[key] = MTCNN(keep_all=True, select_largest=False, post_process=False, device=device)
        return _MODEL_CACHE[key]


# ------------------------------------------------------------------------------ the detector
class FaceDetector:
    """Finds faces in RGB uint8 images.

    ``detector``: 'auto', 'retinaface' or 'mtcnn' (None: the settings' ``detector``). ``model_root``: folder with
    facexlib weights (None: the settings' ``facexlib_dir``). ``score_threshold``: minimum detector confidence (None:
    the per-detector default in :data:`DEFAULT_SCORE_THRESHOLD`). ``min_eye_distance``: faces whose eyes are closer
    than this many pixels are ignored (too small to restore). ``detect_min_side``: images whose shorter side is below
    this are upscaled for detection only (small faces in small images are otherwise missed); ``detect_max_side``:
    larger images are downscaled for detection. ``detect_pad``: a replicated border of this fraction of the shorter
    side is added for detection (MTCNN's landmarks on faces touching the image edge, e.g. tight face crops, are off by
    ~10% of the side without it, ~3% with it). ``sort_by``: 'area' (largest first) or 'score'. ``filter_false``:
    drop false detections (:func:`filter_faces`: landmark geometry, a small face beside or inside a larger one).
    """

    def __init__(
        self,
        detector: str | None = "auto",
        model_root: str | Path | None = None,
        device: str = "cpu",
        score_threshold: float | None = None,
        min_eye_distance: float = 5.0,
        detect_min_side: int = 512,
        detect_max_side: int = 2048,
        detect_pad: float = 0.25,
        sort_by: str = "area",
        filter_false: bool = True,
    ):
        if sort_by not in ("area", "score"):
            raise ValueError("sort_by must be 'area' or 'score'")
        self.device = str(device)
        self.min_eye_distance = float(min_eye_distance)
        self.detect_min_side = int(detect_min_side)
        self.detect_max_side = int(detect_max_side)
        self.detect_pad = float(detect_pad)
        self.sort_by = sort_by
        self.filter_false = bool(filter_false)
        if detector is None or model_root is None:
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
        self.name = detector
        if score_threshold is None:
            score_threshold = DEFAULT_SCORE_THRESHOLD[detector]
        self.score_threshold = float(score_threshold)
        self._weights = weights

    def __repr__(self) -> str:
        return f"FaceDetector({self.name!r}, device={self.device!r})"

    def detect(self, img: np.ndarray, only_center_face: bool = False) -> list[Face]:
        """Faces in an RGB uint8 image, largest first (or best score first with ``sort_by='score'``).

        Detection runs on the image with a replicated border (``detect_pad``: faces that touch the image edge get
        their landmarks right); when that finds no face, once more on the image as it is (RetinaFace misses some
        tight face crops with the border). False detections are dropped (``filter_false``: :func:`filter_faces`)."""
        img = check_image(img)
        faces = self._detect(img, self.detect_pad)
        if not faces and self.detect_pad > 0:
            faces = self._detect(img, 0.0)
        if self.filter_false:
            faces = filter_faces(sorted(faces, key=lambda f: f.area, reverse=True), img.shape)
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

    def _detect_raw(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxes Nx4, scores N, landmarks Nx5x2) in the coordinates of ``img``."""
        with torch.inference_mode():
            if self.name == "retinaface":
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
