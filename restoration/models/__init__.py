"""Models: the architectures, the model zoo, public checkpoints and the restorer input/output conversions.

The public surface of the subpackage: code outside `restoration` imports these names from here.
"""
from __future__ import annotations

from restoration.models.archs import (ARCHS, build)
from restoration.models.checkpoints import (CheckpointError, KNOWN_CHECKPOINTS, KnownCheckpoint, SWINIR_FACE_CONFIG,
                                            CODEFORMER_CONFIG, read_pth, load_strict)
from restoration.models.zoo import (CARD, BUILTIN_DIR, ModelCard, ModelNotFound, Zoo, ZooError, check_name,
                                    instantiate, sha256_file)
from restoration.models.io import (model_value_range, run_restorer, resize_for_model, to_tensor, to_uint8)

__all__ = [
    "ARCHS", "build", "CheckpointError", "KNOWN_CHECKPOINTS", "KnownCheckpoint", "SWINIR_FACE_CONFIG",
    "CODEFORMER_CONFIG", "read_pth", "load_strict", "CARD", "BUILTIN_DIR", "ModelCard", "ModelNotFound", "Zoo",
    "ZooError", "check_name", "instantiate", "sha256_file", "model_value_range", "run_restorer", "resize_for_model",
    "to_tensor", "to_uint8",
]
