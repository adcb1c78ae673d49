"""Face pipeline on the real photos in shared/data/realworld/whole: detection, alignment, paste-back."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from restoration.faces.alignment import FFHQ_TEMPLATE_512, similarity_transform, template
from restoration.faces.detection import Face, FaceError
from restoration.faces.helper import FaceHelper
from restoration.faces.imageio import load_image
from restoration.faces.restore import restore_photo

#: faces per photo (both RetinaFace mobilenet0.25 and MTCNN find exactly these on the shared photos;
#: 03.jpg also shows the back of a head, which is rightly not a face)
EXPECTED_FACES = {
    "00.jpg": 2,
    "01.jpg": 4,
    "02.png": 4,
    "03.jpg": 1,
    "04.jpg": 1,
    "05.jpg": 1,
    "06.png": 2,
    "10045.png": 3,
    "Blake_Lively.jpg": 2,
}
PHOTO = "Blake_Lively.jpg"


def invert(crops):
    return [255 - c for c in crops]


def process(helper, img, restore_fn, **kw):
    """The whole-photo restore with a bare restore function (the never-worse check off: these are geometry tests with
    stand-in restore functions such as `invert`): (image, faces)."""
    res = restore_photo(helper, img, restore_fn, **{"guard": False, **kw})
    return res.image, res.faces


@pytest.fixture(scope="module")
def whole_dir(shared_dir) -> Path:
    return shared_dir / "data" / "realworld" / "whole"


@pytest.fixture(scope="module")
def helper(facexlib_root) -> FaceHelper:
    h = FaceHelper(size=256, detector="auto", model_root=facexlib_root)
    assert h.detector_name == "retinaface", f"weights expected in {facexlib_root}"
    return h


@pytest.fixture(scope="module")
def detections(helper, whole_dir):
    """{name: (image, faces)} for every photo, detected once."""
    out = {}
    for path in sorted(p for p in whole_dir.iterdir() if p.is_file()):
        img = load_image(path)
        out[path.name] = (img, helper.detect(img))
    return out


def region_from_affine(shape, affine, size, grow=2) -> np.ndarray:
    """Pixels covered by the crop square mapped back into the image (computed independently of paste)."""
    inv = cv2.invertAffineTransform(np.asarray(affine, np.float64))
    corners = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64)
    pts = corners @ inv[:, :2].T + inv[:, 2]
    mask = np.zeros(shape[:2], np.uint8)
    cv2.fillConvexPoly(mask, np.round(pts).astype(np.int32), 1)
    if grow:
        mask = cv2.dilate(mask, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8))
    return mask.astype(bool)


# ------------------------------------------------------------------------------ detection
def test_every_photo_is_covered(whole_dir):
    names = {p.name for p in whole_dir.iterdir() if p.is_file()}
    assert names == set(EXPECTED_FACES), "update EXPECTED_FACES when the shared photos change"


def test_detect_faces_per_photo(detections):
    found = {name: len(faces) for name, (_, faces) in detections.items()}
    print("faces per photo (retinaface):", found)
    assert found == EXPECTED_FACES
    for name, (img, faces) in detections.items():
        h, w = img.shape[:2]
        for f in faces:
            assert isinstance(f, Face)
            assert f.box.shape == (4,) and f.landmarks5.shape == (5, 2)
            x1, y1, x2, y2 = f.box
            assert -5 <= x1 < x2 <= w + 5 and -5 <= y1 < y2 <= h + 5, name
            assert 0.97 <= f.score <= 1.0
            le, re, nose, lm, rm = f.landmarks5
            assert le[0] < re[0] and lm[0] < rm[0], f"{name}: landmark order is left/right in the image"
            assert max(le[1], re[1]) < max(lm[1], rm[1]), f"{name}: eyes above the mouth"
        areas = [f.area for f in faces]
        assert areas == sorted(areas, reverse=True), "largest face first"


def test_only_center_face(helper, detections):
    img, faces = detections["02.png"]
    center = helper.detect(img, only_center_face=True)
    assert len(center) == 1
    h, w = img.shape[:2]
    dist = lambda f: (f.center[0] - w / 2) ** 2 + (f.center[1] - h / 2) ** 2  # noqa: E731
    assert np.allclose(center[0].box, min(faces, key=dist).box)


def test_no_face_returns_image_unchanged(helper):
    grey = np.full((240, 320, 3), 128, np.uint8)
    calls = []
    out, faces = process(helper, grey, lambda crops: calls.append(crops) or crops)
    assert faces == [] and calls == []
    assert np.array_equal(out, grey) and out is not grey


# ------------------------------------------------------------------------------ alignment
def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 200, (5, 2))
    a = 0.7
    true = np.array([[1.3 * np.cos(a), -1.3 * np.sin(a), 12.0], [1.3 * np.sin(a), 1.3 * np.cos(a), -40.0]])
    dst = src @ true[:, :2].T + true[:, 2]
    assert np.allclose(similarity_transform(src, dst), true, atol=1e-9)
    # never a reflection, even for mirrored points
    m = similarity_transform(src, dst * np.array([-1, 1]))
    assert np.linalg.det(m[:, :2]) > 0


def test_align_puts_landmarks_on_the_template(helper, detections):
    img, faces = detections[PHOTO]
    for face in faces:
        crop, affine = helper.align(img, face)
        assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
        assert affine.shape == (2, 3)
        mapped = face.landmarks5 @ affine[:, :2].T + affine[:, 2]
        # 5 landmarks do not fit a similarity exactly; the residual stays small for frontal faces
        assert np.abs(mapped - template(256)).max() < 0.06 * 256
        # a second detection on the aligned crop finds the face where the template says
        again = helper.detect(crop)
        assert len(again) >= 1
        assert np.abs(again[0].landmarks5 - template(256)).max() < 0.06 * 256


def test_detect_on_ffhq_aligned_crop_matches_template(helper, shared_dir):
    crop = load_image(shared_dir / "data" / "realworld" / "cropped" / "Adele_crop.png")
    assert crop.shape == (512, 512, 3)
    faces = helper.detect(crop)
    assert len(faces) >= 1
    assert np.abs(faces[0].landmarks5 - FFHQ_TEMPLATE_512).max() < 0.05 * 512


# ------------------------------------------------------------------------------ paste-back
@pytest.mark.parametrize("name", sorted(EXPECTED_FACES))
def test_paste_changes_only_face_regions(helper, detections, name):
    img, faces = detections[name]
    crops, affines = zip(*(helper.align(img, f) for f in faces))
    out = helper.paste(img, invert(list(crops)), list(affines))
    assert out.shape == img.shape and out.dtype == np.uint8
    region = np.zeros(img.shape[:2], bool)
    for a in affines:
        region |= region_from_affine(img.shape, a, helper.size)
    changed = (out != img).any(axis=2)
    assert not (changed & ~region).any(), "pixels outside every face region must stay identical"
    for f in faces:
        # the centre of each face (between eyes and mouth) is visibly inverted
        c = f.landmarks5.mean(0)
        r = max(2, int(f.eye_distance * 0.3))
        y, x = int(c[1]), int(c[0])
        patch_in = img[y - r : y + r, x - r : x + r].astype(int)
        patch_out = out[y - r : y + r, x - r : x + r].astype(int)
        assert np.abs((255 - patch_in) - patch_out).mean() < 25, f"{name}: face not pasted back"
    # restore_photo() gives the same result in one call
    out2, faces2 = process(helper, img, invert)
    assert len(faces2) == len(faces)
    assert np.array_equal(out2, out)


def test_paste_identity_restorer_is_nearly_lossless(helper, detections):
    img, faces = detections[PHOTO]
    out, _ = process(helper, img, lambda crops: crops)
    from restoration.metrics.quality import psnr

    # the face went through a warp to 256 and back (a resampling loss where the face is larger
    # than the crop): close to the input, never a visible seam or shift
    assert psnr(out, img) > 32, psnr(out, img)


def test_paste_accepts_other_crop_sizes_and_checks_inputs(helper, detections):
    img, faces = detections["04.jpg"]
    crop, affine = helper.align(img, faces[0])
    big = cv2.resize(255 - crop, (512, 512), interpolation=cv2.INTER_CUBIC)
    out = helper.paste(img, [big], [affine])
    assert not (((out != img).any(2)) & ~region_from_affine(img.shape, affine, helper.size)).any()
    with pytest.raises(ValueError):
        helper.paste(img, [crop], [])
    with pytest.raises(ValueError):
        helper.paste(img, [crop.astype(np.float32)], [affine])
    with pytest.raises(ValueError):
        process(helper, img, lambda crops: [])


def test_small_crop_size(facexlib_root, detections):
    """The bundled models work at 64x64: the feathered mask must still be valid there."""
    small = FaceHelper(size=64, model_root=facexlib_root)
    img, faces = detections["10045.png"]
    out, got = process(small, img, invert)
    assert len(got) == len(faces)
    region = np.zeros(img.shape[:2], bool)
    for f in got:
        region |= region_from_affine(img.shape, small.affine_for(f), 64)
    assert not (((out != img).any(2)) & ~region).any()
    assert (out != img).any()


# ------------------------------------------------------------------------------ aligned mode
def test_aligned_mode(helper, shared_dir):
    crop = load_image(shared_dir / "data" / "realworld" / "cropped" / "0143.png")
    seen = []

    def restore(crops):
        seen.extend(c.shape for c in crops)
        return invert(crops)

    out, faces = process(helper, crop, restore, aligned=True)
    assert seen == [(256, 256, 3)]
    assert out.shape == crop.shape and out.dtype == np.uint8
    assert len(faces) == 1 and faces[0].extra.get("aligned")
    assert np.allclose(faces[0].landmarks5, FFHQ_TEMPLATE_512, atol=1e-3)
    ref = 255 - cv2.resize(cv2.resize(crop, (256, 256), interpolation=cv2.INTER_AREA), (512, 512),
                           interpolation=cv2.INTER_CUBIC)
    assert np.abs(out.astype(int) - ref.astype(int)).mean() < 2
    # non-square / other-size aligned input comes back at its own size
    small = cv2.resize(crop, (100, 120))
    out_small, _ = process(helper, small, invert, aligned=True)
    assert out_small.shape == small.shape


# ------------------------------------------------------------------------------ input variants
def _face_count(helper, path) -> int:
    return len(helper.detect(load_image(path)))


def test_input_variants_from_a_real_photo(helper, whole_dir, tmp_path):
    src = load_image(whole_dir / PHOTO)
    expected = EXPECTED_FACES[PHOTO]

    gray = tmp_path / "gray.png"
    Image.fromarray(cv2.cvtColor(src, cv2.COLOR_RGB2GRAY)).save(gray)
    g = load_image(gray)
    assert g.shape == src.shape and np.array_equal(g[..., 0], g[..., 2])
    assert len(helper.detect(g)) == expected

    rgba = tmp_path / "rgba.png"
    alpha = np.full(src.shape[:2], 255, np.uint8)
    alpha[:, :40] = 0  # a transparent strip at the left
    Image.fromarray(np.dstack([src, alpha])).save(rgba)
    a = load_image(rgba)
    assert a.shape == src.shape
    assert (a[:, :40] == 255).all(), "transparent pixels are composited on white"
    assert np.array_equal(a[:, 40:], src[:, 40:])
    assert _face_count(helper, rgba) == expected

    png16 = tmp_path / "rgb16.png"
    cv2.imwrite(str(png16), (src[..., ::-1].astype(np.uint16) * 257))
    s16 = load_image(png16)
    assert np.array_equal(s16, src)
    gray16 = tmp_path / "gray16.png"
    Image.fromarray(cv2.cvtColor(src, cv2.COLOR_RGB2GRAY).astype(np.uint16) * 257).save(gray16)
    assert np.array_equal(load_image(gray16), g)
    assert len(helper.detect(s16)) == expected

    # EXIF orientation 6 ("rotate 90 clockwise to display"): the stored pixels lie on their side
    rotated = tmp_path / "exif6.jpg"
    im = Image.fromarray(np.ascontiguousarray(np.rot90(src, 1)))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(rotated, quality=95, exif=exif)
    upright = load_image(rotated)
    assert upright.shape == src.shape
    assert np.abs(upright.astype(int) - src.astype(int)).mean() < 3
    faces = helper.detect(upright)
    assert len(faces) == expected
    ref = helper.detect(src)
    for f, r in zip(faces, ref):
        assert np.abs(f.landmarks5 - r.landmarks5).max() < 4
    # and from bytes
    assert np.array_equal(load_image(rotated.read_bytes()), upright)


def test_real_rgba_photos(detections):
    """02.png and 06.png are stored as RGBA."""
    for name in ("02.png", "06.png"):
        img, faces = detections[name]
        assert img.shape[2] == 3 and len(faces) == EXPECTED_FACES[name]


# ------------------------------------------------------------------------------ detectors
def test_mtcnn_fallback_without_weights(tmp_path, whole_dir):
    empty = tmp_path / "no-weights"
    empty.mkdir()
    h = FaceHelper(size=128, detector="auto", model_root=empty)
    assert h.detector_name == "mtcnn"
    img = load_image(whole_dir / PHOTO)
    out, faces = process(h, img, invert)
    print("detector without weights:", h.detector_name, "faces:", len(faces))
    assert len(faces) == EXPECTED_FACES[PHOTO]
    assert (out != img).any()
    assert list(empty.iterdir()) == [], "nothing may be downloaded or written into model_root"


def test_explicit_retinaface_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FaceError, match="not found"):
        FaceHelper(detector="retinaface", model_root=tmp_path)
    with pytest.raises(ValueError):
        FaceHelper(detector="dlib", model_root=tmp_path)


def test_default_model_root_comes_from_settings(monkeypatch, facexlib_root):
    from restoration import settings

    monkeypatch.setenv("FACEADAPT_FACEXLIB_MODEL_ROOT", str(facexlib_root))
    settings.get_settings.cache_clear()
    try:
        h = FaceHelper(size=128)
        assert h.model_root == Path(facexlib_root) and h.detector_name == "retinaface"
    finally:
        settings.get_settings.cache_clear()


def test_mtcnn_matches_retinaface_on_a_photo(detections, whole_dir):
    img, ref = detections["02.png"]
    h = FaceHelper(size=128, detector="mtcnn")
    faces = h.detect(img)
    assert h.detector_name == "mtcnn" and len(faces) == len(ref)
    # same faces: every MTCNN face has a RetinaFace face whose eye centre is within a few pixels
    for f in faces:
        d = min(np.linalg.norm(f.landmarks5[:2].mean(0) - r.landmarks5[:2].mean(0)) for r in ref)
        assert d < 0.25 * f.eye_distance


def test_image_bytes_io_roundtrip_through_helper(helper, detections):
    from restoration.faces.imageio import encode_image

    img, faces = detections["04.jpg"]
    again = load_image(io.BytesIO(encode_image(img, "png")).getvalue())
    assert np.array_equal(again, img)
    assert len(helper.detect(again)) == len(faces)
