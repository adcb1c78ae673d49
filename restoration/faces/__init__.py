"""Faces in photos: detection, alignment and paste-back, fidelity modes, image I/O and the whole-photo restore.

The public surface of the subpackage: code outside `restoration` imports these names from here.
"""
from __future__ import annotations

from restoration.faces.imageio import (ImageError, UnsupportedFormat, FORMATS, INPUT_FORMATS, load_image,
                                       encode_image, save_image, read_rgb, sniff_format, allowed_formats,
                                       check_format)
from restoration.faces.detection import (Face, FaceError, FaceDetector, RETINAFACE_WEIGHTS, DEFAULT_SCORE_THRESHOLD)
from restoration.faces.alignment import (TEMPLATES, FaceAligner, template, template_for_card)
from restoration.faces.fidelity import (DETAIL_RATIO, MODES, NETWORK_FIDELITY, FaceMode, decide, check_fidelity,
                                        demo_model_warning, mode_counts, MIN_DETAIL_KEPT, MIN_LOWPASS_DB,
                                        MAX_NATURALNESS_DROP_DB, MIN_NOISE_NATURALNESS_GAIN_DB, MIN_DETAIL_KEPT_PRIOR,
                                        check_face)
from restoration.faces.helper import FaceHelper
from restoration.faces.restore import (Restorer, RestoreResult, RestoreFn, NaturalnessFn, restore_photo, is_gray,
                                       keep_gray)

__all__ = [
    "ImageError", "UnsupportedFormat", "FORMATS", "INPUT_FORMATS", "load_image", "encode_image", "save_image",
    "read_rgb", "sniff_format", "allowed_formats", "check_format", "Face", "FaceError", "FaceDetector",
    "RETINAFACE_WEIGHTS", "DEFAULT_SCORE_THRESHOLD", "TEMPLATES", "FaceAligner", "template", "template_for_card",
    "DETAIL_RATIO", "MODES", "NETWORK_FIDELITY", "FaceMode", "decide", "check_fidelity", "demo_model_warning",
    "mode_counts", "FaceHelper", "Restorer", "RestoreResult", "RestoreFn", "NaturalnessFn", "restore_photo",
    "MIN_DETAIL_KEPT", "MIN_LOWPASS_DB", "MAX_NATURALNESS_DROP_DB", "MIN_NOISE_NATURALNESS_GAIN_DB",
    "MIN_DETAIL_KEPT_PRIOR", "check_face", "is_gray", "keep_gray",
]
