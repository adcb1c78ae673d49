"""restoration.faces.imageio: decoding every kind of input to HxWx3 uint8 RGB, errors, limits, encoding."""
from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from restoration.faces.imageio import ImageError, encode_image, load_image, save_image


@pytest.fixture(scope="module")
def photo(shared_dir) -> np.ndarray:
    img = load_image(shared_dir / "data" / "realworld" / "whole" / "04.jpg")
    return img[:120, :90].copy()  # small and non-square, so that rotations show


def _png_bytes(arr, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, followed by a tiny, truncated data stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b"")


def test_rgb_from_path_and_bytes(shared_dir):
    path = shared_dir / "data" / "realworld" / "whole" / "04.jpg"
    a, b = load_image(path), load_image(path.read_bytes())
    assert a.shape == (225, 225, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert np.array_equal(load_image(str(path)), a)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(photo, orientation):
    im = Image.fromarray(photo)
    exif = im.getexif()
    exif[0x0112] = orientation
    data = _png_bytes(photo, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = load_image(data)
    assert got.shape == expected.shape and np.array_equal(got, expected)


def test_modes(photo):
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    g3 = np.repeat(gray[..., None], 3, axis=2)
    assert np.array_equal(load_image(_png_bytes(gray)), g3)  # L
    bw = load_image(_png_bytes(gray > 128))  # 1-bit
    assert set(np.unique(bw)) <= {0, 255}
    pal = Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    assert np.array_equal(load_image(buf.getvalue()), np.asarray(pal.convert("RGB")))
    cmyk = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(cmyk, "JPEG", quality=95)
    assert load_image(cmyk.getvalue()).shape == photo.shape


def test_alpha_composited_on_white(photo):
    alpha = np.zeros(photo.shape[:2], np.uint8)
    alpha[:, 30:] = 255
    alpha[:, 20:30] = 128
    out = load_image(_png_bytes(np.dstack([photo, alpha])))
    assert (out[:, :20] == 255).all()
    assert np.array_equal(out[:, 30:], photo[:, 30:])
    half = np.rint(photo[:, 20:30] * (128 / 255) + 255 * (1 - 128 / 255))
    assert np.abs(out[:, 20:30] - half).max() <= 1
    la = load_image(_png_bytes(np.dstack([photo[..., 0], alpha])))  # LA
    assert (la[:, :20] == 255).all()
    # palette with a transparent entry
    p = Image.new("P", (4, 4), 0)
    p.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    buf = io.BytesIO()
    p.save(buf, "PNG", transparency=0)
    assert (load_image(buf.getvalue()) == 255).all()


def test_16_bit(photo):
    rgb16 = photo.astype(np.uint16) * 257
    ok, buf = cv2.imencode(".png", rgb16[..., ::-1])
    assert ok and np.array_equal(load_image(buf.tobytes()), photo)
    # values that are not multiples of 257 are rounded, not truncated
    odd = np.full((4, 4, 3), 200 * 257 + 200, np.uint16)
    ok, buf = cv2.imencode(".png", odd)
    assert (load_image(buf.tobytes()) == 201).all()
    rgba16 = np.dstack([rgb16[..., ::-1], np.full(photo.shape[:2], 65535, np.uint16)])
    ok, buf = cv2.imencode(".png", rgba16)
    assert np.array_equal(load_image(buf.tobytes()), photo)
    gray16 = photo[..., 1].astype(np.uint16) * 257
    for fmt in ("PNG", "TIFF"):
        b = io.BytesIO()
        Image.fromarray(gray16).save(b, fmt)
        assert np.array_equal(load_image(b.getvalue()), np.repeat(photo[..., 1:2], 3, axis=2)), fmt


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"definitely not an image", "not a recognised image format"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot decode"),
    ],
)
def test_undecodable_input(data, reason):
    with pytest.raises(ImageError, match=reason):
        load_image(data)


def test_truncated_and_missing(shared_dir, tmp_path):
    data = (shared_dir / "data" / "realworld" / "whole" / "04.jpg").read_bytes()
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(data[: len(data) // 3])
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    assert issubclass(ImageError, ValueError)
    with pytest.raises(TypeError):
        load_image(12345)  # type: ignore[arg-type]


def test_max_pixels_is_checked_before_decoding(photo):
    # the header says 5000x5000 but the data is a few bytes: only a header check can name the limit
    with pytest.raises(ImageError, match="max_pixels=1000000"):
        load_image(_png_header_only(5000, 5000), max_pixels=1_000_000)
    with pytest.raises(ImageError, match="max_pixels=1000000"):
        load_image(_png_header_only(100_000, 100_000), max_pixels=1_000_000)
    data = _png_bytes(photo)
    assert load_image(data, max_pixels=photo.shape[0] * photo.shape[1]).shape == photo.shape
    with pytest.raises(ImageError, match="max_pixels=100"):
        load_image(data, max_pixels=100)


@pytest.mark.parametrize("fmt, tol", [("png", 0), ("jpeg", 6), ("jpg", 6), ("webp", 8)])
def test_encode_roundtrip(photo, fmt, tol):
    data = encode_image(photo, fmt, quality=95)
    back = load_image(data)
    assert back.shape == photo.shape
    assert np.abs(back.astype(int) - photo.astype(int)).mean() <= tol
    if fmt == "png":
        assert np.array_equal(back, photo)


def test_encode_checks(photo):
    with pytest.raises(ImageError):
        encode_image(photo.astype(np.float32), "png")
    with pytest.raises(ImageError):
        encode_image(photo, "bmp")
    with pytest.raises(ImageError):
        encode_image(np.dstack([photo, photo[..., :1]]), "jpeg")
    with pytest.raises(ImageError):
        encode_image(photo, "jpeg", quality=0)
    assert len(encode_image(photo, "jpeg", 30)) < len(encode_image(photo, "jpeg", 95))


def test_save_image(photo, tmp_path):
    p = save_image(tmp_path / "sub" / "x.png", photo)
    assert np.array_equal(load_image(p), photo)
    save_image(tmp_path / "x.jpg", photo)
    assert load_image(tmp_path / "x.jpg").shape == photo.shape
    with pytest.raises(ImageError):
        save_image(tmp_path / "x.gif", photo)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["sub", "x.jpg"]  # no temp files left


def test_format_allow_list_is_checked_before_any_decoder(monkeypatch):
    """Only the allow-list's formats are decoded, told from the signature: an EPS never reaches Ghostscript, and a
    file claiming to be one format cannot be handed to another decoder."""
    from PIL import EpsImagePlugin

    from restoration.faces.imageio import UnsupportedFormat, sniff_format

    def no_ghostscript(*a, **k):
        raise AssertionError("Ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
    with pytest.raises(UnsupportedFormat, match="EPS") as err:
        load_image(eps)
    assert err.value.format == "eps" and "png" in err.value.allowed
    for fmt, name in (("GIF", "gif"), ("PPM", "pnm"), ("ICO", "ico")):
        b = io.BytesIO()
        Image.new("RGB", (16, 16)).save(b, fmt)
        assert sniff_format(b.getvalue()) == name
        with pytest.raises(UnsupportedFormat):
            load_image(b.getvalue())
    for fmt in ("PNG", "JPEG", "WEBP", "BMP", "TIFF"):
        b = io.BytesIO()
        Image.new("RGB", (16, 12)).save(b, fmt)
        assert load_image(b.getvalue()).shape == (12, 16, 3)
    # a narrower allow-list refuses the others
    b = io.BytesIO()
    Image.new("RGB", (16, 12)).save(b, "BMP")
    with pytest.raises(UnsupportedFormat, match="accepted image formats: png, jpeg"):
        load_image(b.getvalue(), formats="png,jpg")


def test_png_level_changes_the_bytes_not_the_pixels():
    rng = np.random.default_rng(0)
    img = (np.clip(rng.normal(128, 40, (64, 64, 3)), 0, 255)).astype(np.uint8)
    fast, small = encode_image(img, "png", png_level=1), encode_image(img, "png", png_level=9)
    assert np.array_equal(load_image(fast), img) and np.array_equal(load_image(small), img)
    assert fast != small
    with pytest.raises(ImageError, match="png_level must be in 0..9"):
        encode_image(img, "png", png_level=10)
