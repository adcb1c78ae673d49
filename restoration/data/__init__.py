"""Training data: the UTKFace face set, its committed splits and its loader.

The public surface of the subpackage: code outside `restoration` imports these names from here.
"""
from __future__ import annotations

from restoration.data.faces import (DATA_NAME, DATA_TERMS, SPLITS, SPLIT_PREFIX, FacesDataset, default_faces_root,
                                    list_faces, load_split, split_sha256, load_face, load_faces_array, write_split)

__all__ = [
    "DATA_NAME", "DATA_TERMS", "SPLITS", "SPLIT_PREFIX", "FacesDataset", "default_faces_root", "list_faces",
    "load_split", "split_sha256", "load_face", "load_faces_array", "write_split",
]
