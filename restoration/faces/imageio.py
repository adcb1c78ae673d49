"""The one image reader and writer of FaceAdapt: `load_image` (any upload or file to RGB uint8), `encode_image`,
`save_image` (atomic, ordinary file mode), and `read_rgb` (the plain Pillow reader of the training and benchmark face sets).

Every image that enters the restoration core goes through :func:`load_image`, which returns an
``HxWx3`` ``uint8`` RGB array whatever the file held:

* the EXIF orientation tag is applied (the pixels are rotated/flipped, the tag is dropped);
* grayscale (``1``, ``L``, ``I``, ``I;16``, ``F``) is replicated to three channels;
* palette images are expanded through their palette;
* images with an alpha channel (``RGBA``, ``LA``, palette with transparency) are **composited on a
  white background** (a transparent pixel becomes white, a half transparent one is blended): this is
  what a viewer shows and it keeps a transparent surround from turning into black "hair";
* 16-bit images (16-bit grayscale PNG/TIFF, 48/64-bit RGB(A) PNG) are reduced to 8 bits with rounding
  (``v * 255 / 65535``); PNG files with 16-bit RGB(A) samples are decoded with OpenCV
  (``IMREAD_UNCHANGED``) because Pillow keeps only the high byte of those;
* CMYK, YCbCr, LAB and other modes are converted to RGB by Pillow.

Undecodable input (empty, not an image, truncated, corrupt) raises :class:`ImageError`, a
``ValueError`` subclass, with the reason. ``max_pixels`` is a decompression-bomb guard: the size is
read from the header and checked *before* any pixel data is decoded.

Only the formats of an allow-list are decoded (``formats``; default ``settings.image_formats``: PNG,
JPEG, WebP, BMP, TIFF): the format is told from the file's signature (:func:`sniff_format`) before
Pillow sees the bytes, and Pillow is then only allowed that one decoder, so an EPS/PostScript file can
never reach Ghostscript (nor any other plugin). Anything else raises :class:`UnsupportedFormat`.

:func:`save_image` writes PNG, JPEG or WebP by the file's suffix, atomically (a temporary file renamed into place):
the work dirs of adaptation and training save their PNGs with it too. :func:`read_rgb` is the reader of our own
face sets (training data, benches): Pillow's ``convert('RGB')`` as it is (no EXIF rotation, alpha dropped) and an
optional Pillow bicubic resize; photos from users go through :func:`load_image`.
"""
from __future__ import annotations

import io
import os
import re
import tempfile
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from restoration.settings import get_settings

__all__ = ["ImageError", "UnsupportedFormat", "load_image", "encode_image", "save_image", "read_rgb", "sniff_format",
           "allowed_formats", "check_format", "FORMATS", "INPUT_FORMATS"]

_EXIF_ORIENTATION = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

#: encode formats: name -> (Pillow format name, file suffixes)
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "png": ("PNG", (".png",)),
    "jpeg": ("JPEG", (".jpg", ".jpeg", ".jpe")),
    "webp": ("WEBP", (".webp",)),
}
_FORMAT_ALIASES = {"jpg": "jpeg", "jpe": "jpeg"}


#: decodable input formats: name -> Pillow decoder
INPUT_FORMATS: dict[str, str] = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP", "tiff": "TIFF"}


class ImageError(ValueError):
    """The input is not a decodable image, or is refused (too large, wrong array)."""


class UnsupportedFormat(ImageError):
    """The input is (or looks like) an image of a format outside the allow-list; `.format` names what it is."""

    def __init__(self, message: str, fmt: str | None, allowed: tuple[str, ...]):
        super().__init__(message)
        self.format, self.allowed = fmt, allowed


# other signatures, only to name what was refused
_OTHER_SIGNATURES = (
    (b"%!PS", "eps"), (b"\xc5\xd0\xd3\xc6", "eps"), (b"%PDF", "pdf"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
    (b"8BPS", "psd"), (b"\x00\x00\x01\x00", "ico"), (b"\x00\x00\x02\x00", "cur"), (b"\x00\x00\x00\x0cjP  ", "jpeg2000"),
    (b"\xff\x4f\xff\x51", "jpeg2000"), (b"gimp xcf", "xcf"), (b"#?RADIANCE", "hdr"), (b"\x76\x2f\x31\x01", "exr"),
    (b"DDS ", "dds"), (b"icns", "icns"), (b"<svg", "svg"),
)


def sniff_format(data: bytes) -> str | None:
    """The image format named by the first bytes (its signature): one of INPUT_FORMATS, another known name
    ('eps', 'gif', 'pdf', ...) or None. Nothing is decoded."""
    head = bytes(data[:32])
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis"):
        return "avif" if head[8:12].startswith(b"avi") else "heif"
    for sig, name in _OTHER_SIGNATURES:
        if head.startswith(sig):
            return name
    if len(head) > 2 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n#":
        return "pnm"
    return None


def allowed_formats(formats: str | list[str] | tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The allow-list as a tuple of INPUT_FORMATS names; None: `settings.image_formats`. Aliases: jpg, tif."""
    if formats is None:
        formats = get_settings().image_formats
    if isinstance(formats, str):
        formats = formats.split(",")
    out = []
    for f in formats:
        f = {"jpg": "jpeg", "jpe": "jpeg", "tif": "tiff"}.get(f.strip().lower(), f.strip().lower())
        if not f:
            continue
        if f not in INPUT_FORMATS:
            raise ValueError(f"unknown image format {f!r} in the allow-list; known: {', '.join(INPUT_FORMATS)}")
        if f not in out:
            out.append(f)
    return tuple(out)


def check_format(data: bytes, formats=None, label: str = "image bytes") -> str:
    """The allowed format of `data` from its signature, or :class:`UnsupportedFormat`."""
    allowed = allowed_formats(formats)
    fmt = sniff_format(data)
    if fmt is None or fmt not in allowed:
        what = f"an image of format {fmt.upper()}" if fmt else "not an image of a known format"
        raise UnsupportedFormat(f"{label} is {what}; accepted image formats: {', '.join(allowed)}", fmt, allowed)
    return fmt


# ----------------------------------------------------------------------------------- loading
def _read_source(src: bytes | bytearray | memoryview | str | os.PathLike) -> tuple[bytes, str]:
    """Return (data, label) where label names the source in error messages."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), "image bytes"
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        try:
            return path.read_bytes(), str(path)
        except FileNotFoundError:
            raise ImageError(f"cannot read image {path}: file not found") from None
        except IsADirectoryError:
            raise ImageError(f"cannot read image {path}: is a directory") from None
        except OSError as exc:
            raise ImageError(f"cannot read image {path}: {exc}") from None
    raise TypeError(f"load_image expects bytes or a path, got {type(src).__name__}")


def _png_bit_depth_and_colour(data: bytes) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG IHDR chunk, or None when `data` is not a PNG."""
    if len(data) < 29 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return data[24], data[25]


def _orient(arr: np.ndarray, orientation: int | None) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an HxW[xC] array so that it displays upright."""
    if orientation == 2:
        arr = arr[:, ::-1]
    elif orientation == 3:
        arr = arr[::-1, ::-1]
    elif orientation == 4:
        arr = arr[::-1]
    elif orientation == 5:
        arr = arr.swapaxes(0, 1)
    elif orientation == 6:
        arr = np.rot90(arr, -1)
    elif orientation == 7:
        arr = arr[::-1, ::-1].swapaxes(0, 1)
    elif orientation == 8:
        arr = np.rot90(arr, 1)
    return np.ascontiguousarray(arr)


def _to_uint8(values: np.ndarray, bits16: bool) -> np.ndarray:
    """Reduce integer or float samples to uint8 (rounding, never wrapping)."""
    if values.dtype == np.uint8:
        return values
    v = values.astype(np.float64)
    if np.issubdtype(values.dtype, np.floating):
        finite = v[np.isfinite(v)]
        # float images: [0, 1] when they look normalised, otherwise taken as 0..255
        if finite.size and finite.max() <= 1.0 and finite.min() >= 0.0:
            v = v * 255.0
        v = np.nan_to_num(v, nan=0.0, posinf=255.0, neginf=0.0)
    elif bits16 or v.max(initial=0) > 255:
        v = v * (255.0 / 65535.0)
    return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Blend uint8 RGB over white using a uint8 alpha; exact for alpha 0 and 255."""
    a = alpha.astype(np.float32)[..., None] / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _decode_png16_cv2(data: bytes, label: str) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ImageError(f"cannot decode {label}: corrupt 16-bit PNG data")
    if arr.ndim == 2:
        rgb = _to_uint8(arr, bits16=arr.dtype == np.uint16)
        return np.repeat(rgb[..., None], 3, axis=2)
    bits16 = arr.dtype == np.uint16
    if arr.shape[2] == 2:  # gray + alpha
        gray = _to_uint8(arr[..., 0], bits16)
        return _composite_on_white(np.repeat(gray[..., None], 3, axis=2), _to_uint8(arr[..., 1], bits16))
    if arr.shape[2] == 4:
        rgb = _to_uint8(arr[..., 2::-1], bits16)
        alpha = _to_uint8(arr[..., 3], bits16)
        return _composite_on_white(rgb, alpha)
    return np.ascontiguousarray(_to_uint8(arr[..., 2::-1], bits16))


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        bits16 = mode.startswith("I;16")
        gray = _to_uint8(np.asarray(im), bits16=bits16)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
        mode = "RGBA"
    elif mode == "P":
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        return _composite_on_white(rgba[..., :3], rgba[..., 3])
    if mode in ("1", "L"):
        gray = np.asarray(im.convert("L"), dtype=np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_image(src: bytes | str | Path, max_pixels: int | None = None,
               formats: str | list[str] | tuple[str, ...] | None = None) -> np.ndarray:
    """Decode an image file or bytes to an ``HxWx3 uint8`` RGB array (see the module doc).

    ``max_pixels``: refuse images with more than this many pixels (width x height), checked from the
    header before the pixel data is decoded. ``formats``: the allow-list (default
    ``settings.image_formats``), checked from the signature before decoding. Raises
    :class:`ImageError` (:class:`UnsupportedFormat` for a refused format) for anything undecodable.
    """
    data, label = _read_source(src)
    if not data:
        raise ImageError(f"cannot decode {label}: empty input")
    if max_pixels is not None and max_pixels <= 0:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageError(f"cannot decode {label}: not a recognised image format")
    fmt = check_format(data, formats, label)

    try:
        with warnings.catch_warnings():
            # we enforce our own limit; Pillow's bomb *warning* would only be noise
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[INPUT_FORMATS[fmt]])  # only that one decoder
    except Image.DecompressionBombError as exc:  # Pillow's own limit (far above ours); its message has the size
        m = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{m.group(1)} pixels, " if m else ""
        limit = f"over the limit of max_pixels={max_pixels}; " if max_pixels is not None else ""
        raise ImageError(f"image {label} is {size}{limit}refused as a decompression bomb") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode {label}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode {label}: {exc}") from None

    with im:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise ImageError(f"cannot decode {label}: empty image ({width}x{height})")
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(
                f"image {label} is {width}x{height} = {width * height} pixels, over the limit of "
                f"max_pixels={max_pixels}"
            )
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION)
        except Exception:  # a broken EXIF block must not make a decodable image fail
            orientation = None
        png = _png_bit_depth_and_colour(data)
        try:
            if png is not None and png[0] == 16 and png[1] in (2, 4, 6):
                arr = _decode_png16_cv2(data, label)
            else:
                im.load()
                arr = _pil_to_rgb(im)
        except ImageError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"cannot decode {label}: corrupt or truncated image data ({exc})") from None

    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:  # defensive: never hand back junk
        raise ImageError(f"cannot decode {label}: unexpected decoded layout {arr.shape} {arr.dtype}")
    return _orient(arr, orientation if isinstance(orientation, int) else None)


# ----------------------------------------------------------------------------------- saving
def _normalise_format(fmt: str) -> str:
    f = fmt.lower().lstrip(".")
    f = _FORMAT_ALIASES.get(f, f)
    if f not in FORMATS:
        raise ImageError(f"unsupported output format {fmt!r}; use one of {sorted(FORMATS)}")
    return f


def _check_array(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ImageError(f"encode_image expects a uint8 array, got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ImageError(f"encode_image expects HxW, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"cannot encode an empty image of shape {arr.shape}")
    return np.ascontiguousarray(arr)


def encode_image(arr: np.ndarray, fmt: str = "png", quality: int = 95, png_level: int = 6) -> bytes:
    """Encode a uint8 RGB (HxWx3), RGBA (HxWx4, PNG/WebP only) or gray (HxW) array.

    ``fmt``: 'png' (lossless, quality ignored), 'jpeg'/'jpg' or 'webp'; ``quality`` 1..100. ``png_level``: zlib's
    compression level of a PNG, 0..9 (the same pixels at every level; 6, the default, makes files about 10% smaller
    than 1 and takes about 4x as long).
    """
    f = _normalise_format(fmt)
    if not 1 <= int(quality) <= 100:
        raise ImageError(f"quality must be in 1..100, got {quality}")
    if not 0 <= int(png_level) <= 9:
        raise ImageError(f"png_level must be in 0..9, got {png_level}")
    arr = _check_array(arr)
    if f == "jpeg" and arr.ndim == 3 and arr.shape[2] == 4:
        raise ImageError("JPEG has no alpha channel: pass an HxWx3 array")
    im = Image.fromarray(arr)
    buf = io.BytesIO()
    if f == "png":
        im.save(buf, format="PNG", compress_level=int(png_level))
    elif f == "jpeg":
        im.save(buf, format="JPEG", quality=int(quality), subsampling=0 if quality >= 90 else 2)
    else:
        im.save(buf, format="WEBP", quality=int(quality), method=4)
    return buf.getvalue()


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux /proc), else by setting and
    restoring it."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_image(path: str | Path, arr: np.ndarray, quality: int = 95) -> Path:
    """Write an image, format chosen by the suffix (.png, .jpg/.jpeg, .webp); atomic (temp + rename); the file gets
    an ordinary mode (0666 minus the umask, e.g. 0644), as `open()` would give it."""
    path = Path(path)
    suffix = path.suffix.lower()
    fmt = next((name for name, (_, sfx) in FORMATS.items() if suffix in sfx), None)
    if fmt is None:
        raise ImageError(f"cannot tell the format from {path.name!r}; use .png, .jpg, .jpeg or .webp")
    data = encode_image(arr, fmt, quality)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # an ordinary file's mode, not mkstemp's 0600
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


# ----------------------------------------------------------------------------------- our own face sets
def read_rgb(path: str | Path, size: int | None = None) -> np.ndarray:
    """An image file as HxWx3 uint8 RGB the plain Pillow way (``convert('RGB')``: no EXIF rotation, alpha dropped,
    any format Pillow reads), resized to ``size`` x ``size`` with Pillow's bicubic (antialiased when shrinking) when
    ``size`` is given and differs. For our own face sets; user uploads go through :func:`load_image`."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        return np.asarray(im, dtype=np.uint8).copy()
