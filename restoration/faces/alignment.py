"""Face alignment and paste-back: the five-point templates, the similarity transform, aligned crops, the feathered
mask, the inverse-warp paste, and the one OpenCV resize of face crops.

Alignment is a least-squares similarity transform (rotation, uniform scale, translation; Umeyama's
closed form, no reflection) from the five landmarks to a five-point template of a 512 crop (FFHQ's by
default), scaled to ``size``.

Paste-back warps each restored crop into the image with the inverse transform and blends it through a
soft mask: the crop square with a border band set to zero, Gaussian blurred inside the crop (the
"eroded and blurred square"), then warped like the face. The mask is exactly zero outside the face's
warped square, so pixels outside every face region are left bit-for-bit unchanged. No face-parsing
network is needed.

An image is recognised as an aligned face crop (:func:`crop_template`) when it is square and its one face's landmarks
lie near a template's in the image's own frame (:data:`CROP_MATCH`).
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from restoration.faces.detection import Face, check_image

__all__ = [
    "FFHQ_TEMPLATE_512", "UTK200_TEMPLATE_512", "TEMPLATES", "ANTIALIAS_BELOW", "BORDER_RGB", "FaceAligner",
    "similarity_transform", "template", "template_for_card", "resize", "CROP_MATCH", "template_error",
    "crop_template",
]

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

#: An image is an aligned face crop of a template when it is square (sides within `max_aspect` of each other) and its
#: face's five landmarks lie nearest to that template's at the image's size, within `max_error` (root mean square, in
#: eye distances of the template). Measured on the shared crops: faces-utk200 crops lie within 0.22 of 'utk200' with
#: RetinaFace (1,000 at 200 px; 99th percentile 0.19) and within 0.33 with MTCNN (400 at 128 px; 99th percentile
#: 0.26); the FFHQ-aligned shared/data/realworld crops within 0.27 of 'ffhq' and 0.28-0.40 of 'utk200'; the faces of
#: the whole photos 0.4 and more from both.
CROP_MATCH = {"max_error": 0.35, "max_aspect": 0.05}

#: align() reduces the face region with area averaging first when it shrinks it below this scale (no aliasing)
ANTIALIAS_BELOW = 0.75

#: colour (RGB) of the area outside the source image in aligned crops
BORDER_RGB = (132, 133, 135)


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


def template_error(landmarks5: np.ndarray, shape: tuple[int, ...], name: str | np.ndarray) -> float:
    """How far five landmarks (image pixels) lie from template `name`'s scaled to the image (its width): the root
    mean square distance in eye distances of the template."""
    t = template(int(shape[1]), name)
    d = float(np.linalg.norm(t[1] - t[0]))
    diff = np.asarray(landmarks5, dtype=np.float64).reshape(5, 2) - t
    return float(np.sqrt((diff ** 2).sum(1).mean())) / d


def crop_template(faces: Sequence[Face], shape: tuple[int, ...], names: Sequence[str] | None = None) -> str | None:
    """The template (a name of `names`, default every one of :data:`TEMPLATES`) that an image of `shape` with the
    detected `faces` is an aligned crop of: a square image with one face whose landmarks lie nearest to that
    template's at the image's size, and near it (:data:`CROP_MATCH`); None when it is no aligned crop."""
    h, w = int(shape[0]), int(shape[1])
    if len(faces) != 1 or abs(h - w) > CROP_MATCH["max_aspect"] * max(h, w):
        return None
    errors = {n: template_error(faces[0].landmarks5, shape, n) for n in (names or TEMPLATES)}
    best = min(errors, key=errors.get)
    return best if errors[best] <= CROP_MATCH["max_error"] else None


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


def resize(img: np.ndarray, width: int, height: int, shrink: bool | None = None) -> np.ndarray:
    """``img`` (HxW[xC], uint8 or float32) at ``width`` x ``height`` with OpenCV: area averaging when shrinking,
    bicubic otherwise; ``img`` itself when it has that size already. ``shrink``: whether the caller counts this as
    shrinking (default: the width gets smaller); the paste and the aligned-crop restore decide it on their own side."""
    if img.shape[1] == width and img.shape[0] == height:
        return img
    if shrink is None:
        shrink = width < img.shape[1]
    return cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


class FaceAligner:
    """Aligned ``size`` x ``size`` crops of detected faces and their paste back into the image.

    ``face_template``: the five-point template the crops are aligned to, 'ffhq' (default), 'utk200' or a 5x2 array
    in a 512 frame; it must be the framing the restorer was trained on (:func:`template_for_card`).
    ``mask_border`` and ``mask_blur``: zero band and Gaussian sigma of the paste mask, as fractions of ``size``.
    """

    def __init__(self, size: int = 512, face_template: str | np.ndarray = "ffhq", mask_border: float = 0.05,
                 mask_blur: float = 0.04):
        if int(size) < 16:
            raise ValueError(f"size must be at least 16, got {size}")
        self.size = int(size)
        self.mask_border = float(mask_border)
        self.mask_blur = float(mask_blur)
        self.face_template = face_template if isinstance(face_template, str) else "custom"
        #: the template's five points in this crop size
        self.points = template(self.size, face_template)
        self._soft_mask: np.ndarray | None = None

    def __repr__(self) -> str:
        return f"FaceAligner(size={self.size}, face_template={self.face_template!r})"

    # -------------------------------------------------------------------------- alignment
    def affine_for(self, face: Face | np.ndarray) -> np.ndarray:
        """The 2x3 image -> crop similarity transform for a face (or a 5x2 landmark array)."""
        lm = face.landmarks5 if isinstance(face, Face) else np.asarray(face)
        return similarity_transform(lm, self.points)

    def align(self, img: np.ndarray, face: Face | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Aligned crop (uint8 ``size`` x ``size`` x 3) and its 2x3 image -> crop affine.

        When the face is shrunk by more than :data:`ANTIALIAS_BELOW` (a large face for a small model), the face's
        region is first reduced with area averaging, so that the crop is not aliased."""
        affine = self.affine_for(face)
        return self.warp(img, affine), affine

    def warp(self, img: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """The ``size`` x ``size`` crop of ``img`` under an image -> crop ``affine`` (the warp of `align`, with its
        area reduction first when the image is shrunk by more than :data:`ANTIALIAS_BELOW`)."""
        img = check_image(img)
        affine = np.asarray(affine, np.float64)
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
        return cv2.warpAffine(src, warp, (self.size, self.size), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_CONSTANT, borderValue=BORDER_RGB)

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
        img = check_image(img)
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
            crop = resize(crop, s, s, shrink=crop.shape[0] > s)
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
