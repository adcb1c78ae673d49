"""The faces, models, diffusion and data subpackages: the one whole-photo restore (CLI and API), the one crop resize,
the shared image reader/writer, and the layout rules (imports at module top, no circles, modules under 600 lines)."""
from __future__ import annotations

import ast
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from restoration.faces.alignment import FaceAligner, resize
from restoration.faces.detection import FaceDetector
from restoration.faces.helper import FaceHelper
from restoration.faces.imageio import load_image, read_rgb, save_image
from restoration.faces.restore import Restorer, restore_photo
from restoration.models.io import to_tensor, to_uint8

REPO = Path(__file__).resolve().parents[1]
ROOM = ["restoration/faces", "restoration/models", "restoration/diffusion", "restoration/data",
        "restoration/runtime.py", "restoration/configs.py"]
#: optional heavy dependencies that may be imported where they are used (with a comment saying so)
LAZY_OK = ("facexlib", "facenet_pytorch", "diffusers")
MODEL = "faceadapt-swinir-small"
PHOTO = "01.jpg"  # four faces of different sizes


def invert(crops):
    return [255 - c for c in crops]


@pytest.fixture(scope="module")
def photo(shared_dir):
    return load_image(shared_dir / "data" / "realworld" / "whole" / PHOTO)


# ------------------------------------------------------------------------------ the whole-photo restore
def test_max_faces_restores_only_the_largest(restorer, photo):
    helper = restorer.face_helper("retinaface")
    every = restore_photo(helper, photo, invert, guard=False)  # the never-worse check would keep inverted faces
    assert every.faces_found == len(every.faces) == 4 and every.detector == "retinaface"
    two = restore_photo(helper, photo, invert, max_faces=2, guard=False)
    assert two.faces_found == 4 and len(two.faces) == 2
    areas = sorted((f.area for f in every.faces), reverse=True)
    assert [f.area for f in two.faces] == areas[:2]
    region = np.zeros(photo.shape[:2], bool)
    for f in two.faces:
        region |= helper.face_region(photo.shape, helper.affine_for(f))
    changed = (two.image != photo).any(2)
    assert changed.any() and not (changed & ~region).any(), "faces past max_faces are left as they are"
    for n in (None, 0, -1, 9):  # no limit
        assert np.array_equal(restore_photo(helper, photo, invert, max_faces=n, guard=False).image, every.image)


def test_restore_image_is_restore_photo_with_the_restorer(restorer, photo):
    res = restorer.restore_image(photo, detector="retinaface", max_faces=3)
    ref = restore_photo(restorer.face_helper("retinaface"), photo, restorer.restore_crops, arch=restorer.card.arch,
                        max_faces=3)
    assert np.array_equal(res.image, ref.image) and res.model == MODEL and res.faces_found == 4
    assert [f.extra for f in res.faces] == [f.extra for f in ref.faces]
    calls = []

    def through(crops):  # what the service's micro-batcher does: restore_crops on the batch
        calls.append(len(crops))
        return restorer.restore_crops(crops)

    other = restorer.restore_image(photo, detector="retinaface", max_faces=3, restore_fn=through)
    assert calls == [3] and np.array_equal(other.image, res.image)
    crop = photo[:80, :80]
    aligned = restorer.restore_image(crop, aligned=True)
    assert aligned.detector is None and aligned.faces_found == 1 and aligned.image.shape == crop.shape


def test_api_restore_is_the_same_restore(restorer, photo):
    """app.serving.Loaded.restore (micro-batched) gives what Restorer.restore_image gives, with the detector named."""
    from app.serving import Loaded, MicroBatcher

    batcher = MicroBatcher(restorer.restore_crops, 8, 0.0, "t", timeout_s=60)
    try:
        loaded = Loaded(restorer, batcher)
        for aligned, img, max_faces in ((False, photo, 2), (False, photo, None), (True, photo[:90, :70], 2)):
            got = loaded.restore(img, aligned, False, max_faces=max_faces, fidelity=None)
            ref = restorer.restore_image(img, aligned=aligned, max_faces=max_faces)
            assert np.array_equal(got.image, ref.image)
            assert got.faces_found == ref.faces_found and len(got.faces) == len(ref.faces)
            assert got.detector == "retinaface"  # 'auto' with the weights on disk; named for aligned crops too
    finally:
        batcher.close()


def test_restorer_takes_fidelity(restorer):
    assert restorer.takes_fidelity is False
    card = type(restorer.card)(**{**restorer.card.to_json(), "arch": "codeformer"})
    assert Restorer(torch.nn.Identity(), card, device="cpu").takes_fidelity is True


def test_face_helper_is_a_detector_and_an_aligner(facexlib_root):
    h = FaceHelper(64, detector="retinaface", model_root=facexlib_root, face_template="utk200")
    assert isinstance(h.detector, FaceDetector) and isinstance(h.aligner, FaceAligner)
    assert h.size == 64 and h.detector_name == h.detector.name == "retinaface"
    assert h.aligner.face_template == "utk200" and h.model_root == Path(facexlib_root)
    with pytest.raises(ValueError, match="at least 16"):
        FaceHelper(8, detector="dlib")


# ------------------------------------------------------------------------------ the one crop resize
def test_resize_is_one_rule_with_the_callers_choice():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 100, 3), np.uint8)
    assert resize(img, 100, 50) is img
    area = cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA)
    cubic = cv2.resize(img, (64, 64), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(resize(img, 64, 64), area)  # default: the width shrinks
    assert np.array_equal(resize(img, 64, 64, shrink=False), cubic)  # the aligned restore: min(h, w) > 64 is False
    assert np.array_equal(resize(img, 64, 64, shrink=img.shape[0] > 64), cubic)  # the paste: the height decides
    delta = rng.normal(size=(16, 16, 3)).astype(np.float32)
    assert np.array_equal(resize(delta, 64, 64, shrink=False),
                          cv2.resize(delta, (64, 64), interpolation=cv2.INTER_CUBIC))


def test_model_io_round_trip():
    rng = np.random.default_rng(1)
    crops = [rng.integers(0, 256, (32, 32, 3), np.uint8) for _ in range(2)]
    x = to_tensor(crops, 32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert all(np.array_equal(a, b) for a, b in zip(to_uint8(x), crops))
    assert to_tensor(crops, 16).shape == (2, 3, 16, 16)


# ------------------------------------------------------------------------------ the one image reader / writer
def test_save_image_writes_what_pillow_writes(tmp_path):
    """The work dirs saved PNGs with Pillow's defaults; `save_image` writes the very same bytes (atomically)."""
    rng = np.random.default_rng(2)
    arr = rng.integers(0, 256, (40, 30, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = save_image(tmp_path / "sub" / "a.png", arr)
    assert out.read_bytes() == buf.getvalue()
    assert [p.name for p in out.parent.iterdir()] == ["a.png"], "no temporary file is left behind"
    assert np.array_equal(load_image(out), arr)


def test_read_rgb_is_the_plain_pillow_reader(tmp_path, shared_dir):
    path = sorted((shared_dir / "data" / "hq512").glob("*/*.png"))[0]
    with Image.open(path) as im:
        want = np.asarray(im.convert("RGB").resize((64, 64), Image.BICUBIC))
        full = np.asarray(im.convert("RGB"))
    assert np.array_equal(read_rgb(path, 64), want)
    assert np.array_equal(read_rgb(path), full)
    rgba = tmp_path / "a.png"
    Image.fromarray(np.dstack([full[:8, :8], np.zeros((8, 8), np.uint8)])).save(rgba)
    assert np.array_equal(read_rgb(rgba), full[:8, :8]), "alpha is dropped, not composited"


# ------------------------------------------------------------------------------ layout
def _modules():
    for entry in ROOM:
        p = REPO / entry
        yield from ([p] if p.is_file() else sorted(p.rglob("*.py")))


def test_imports_at_module_top():
    hidden = []
    for path in _modules():
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                hidden += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                           if n.split(".")[0] not in LAZY_OK]
    assert not hidden, hidden


def test_no_import_circles_and_short_modules():
    graph = {}
    for path in _modules():
        mod = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{mod} opens without a docstring"
        if "archs" not in path.parts:
            assert len(path.read_text().splitlines()) <= 600, f"{mod} is over 600 lines"
        deps = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[mod] = deps
    graph = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}

    def visit(m, stack):
        assert m not in stack, " -> ".join(stack + [m])
        for d in graph[m]:
            visit(d, stack + [m])

    for m in graph:
        visit(m, [])
