"""Input limits of uploads, checked before anything is decoded or stored. Every violation raises `LimitExceeded`
naming the setting.

* `max_upload_bytes`: the request body (checked by the API's middleware from Content-Length, then while reading);
* `max_image_pixels`: width*height read from the image header, before any pixel is decoded (decompression bombs);
* `image_formats`: the format from the file's signature (`check_image_format`);
* `max_dataset_images`: images in one dataset upload;
* `max_zip_entries`, `max_unpacked_bytes`: entries and real uncompressed bytes of an uploaded zip (the sizes the zip
  declares are checked first, then the bytes actually inflated, so a lying header cannot get past);
* zip entries with absolute paths, `..` components, drive letters or symlinks are refused (`zip_paths`);
* zip entries are streamed to files in a folder of the caller (`unpack_zip(dest=...)`), never all held in memory;
* `min_image_side`: images smaller than that (from the header) are rejected without being decoded (`image_size`).
"""
from __future__ import annotations

import io
import re
import stat
import warnings
import zipfile
from pathlib import Path, PurePosixPath

from PIL import Image

from restoration.faces import INPUT_FORMATS, UnsupportedFormat, allowed_formats, check_format, sniff_format
from service.errors import LimitExceeded, ServiceError
from service.settings import ServiceSettings

ZIP_MAGIC = b"PK\x03\x04"
IGNORED_ZIP_PREFIXES = ("__MACOSX/",)


class UploadedFile:
    """An uploaded image: its bytes in memory, or a file on disk (a zip entry) read when needed."""

    def __init__(self, name: str, data: bytes | None = None, path: Path | None = None):
        if data is None and path is None:
            raise ValueError("an UploadedFile needs its data or a path")
        self.name, self._data, self.path = name, data, path

    @property
    def data(self) -> bytes:
        return self._data if self._data is not None else self.path.read_bytes()

    def head(self, n: int = 64) -> bytes:
        if self._data is not None:
            return self._data[:n]
        with open(self.path, "rb") as f:
            return f.read(n)


def check_upload_size(n: int, settings: ServiceSettings) -> None:
    if n > settings.max_upload_bytes:
        raise LimitExceeded("max_upload_bytes", settings.max_upload_bytes,
                            f"upload is larger than max_upload_bytes ({settings.max_upload_bytes} bytes)")



def check_image_format(data: bytes, settings: ServiceSettings, name: str = "image") -> str:
    """The image's format from its signature, before anything decodes it: 415 `unsupported_format` for a format
    outside `image_formats` (EPS, GIF, PDF, ...), 400 `bad_image` for bytes that are no image at all."""
    if sniff_format(data) is None:
        raise ServiceError(400, "bad_image", f"cannot read {name}: not a recognised image format "
                       f"(accepted: {', '.join(allowed_formats(settings.image_formats))})")
    try:
        return check_format(data, settings.image_formats, name)
    except UnsupportedFormat as exc:
        raise ServiceError(415, "unsupported_format", str(exc), limit="image_formats", limit_value=list(exc.allowed),
                       format=exc.format) from None


def image_size(data: bytes, settings: ServiceSettings) -> tuple[int, int] | None:
    """(width, height) from the header of an image of an allowed format, nothing decoded; None when unreadable."""
    fmt = sniff_format(data)
    if fmt not in allowed_formats(settings.image_formats):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[INPUT_FORMATS[fmt]]) as im:
                return im.size
    except Exception:
        return None


def too_small(data: bytes, settings: ServiceSettings) -> str | None:
    """Why a dataset image is too small to hold a face (`min_image_side`, from its header), or None."""
    size = image_size(data, settings)
    if size is not None and min(size) < settings.min_image_side:
        return f"too small: {size[0]}x{size[1]}, under min_image_side ({settings.min_image_side} px); not decoded"
    return None


def check_pixels(data: bytes, settings: ServiceSettings, name: str = "image") -> int | None:
    """Refuse images whose header announces more than max_image_pixels; only the header is read, and only by the
    decoder of an allowed format (anything else is refused by load_image / check_image_format). Returns the pixel
    count (None when the header cannot be read: load_image will say why)."""
    fmt = sniff_format(data)
    if fmt not in allowed_formats(settings.image_formats):
        return None
    size = ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[INPUT_FORMATS[fmt]]) as im:
                w, h = im.size
        n, size = w * h, f"{w}x{h} = "
    except Image.DecompressionBombError as exc:  # Pillow's own, far higher limit: its message holds the real size
        m = re.search(r"\((\d+) pixels\)", str(exc))
        if m is None:
            raise LimitExceeded("max_image_pixels", settings.max_image_pixels,
                                f"{name} announces more pixels than max_image_pixels ({settings.max_image_pixels})")
        n = int(m.group(1))
    except Exception:
        return None  # not decodable by the header reader: load_image will say why
    if n > settings.max_image_pixels:
        raise LimitExceeded("max_image_pixels", settings.max_image_pixels,
                            f"{name} is {size}{n} pixels, more than max_image_pixels ({settings.max_image_pixels})")
    return n


def _safe_member_name(info: zipfile.ZipInfo) -> str:
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise LimitExceeded("zip_paths", "no symlinks", f"zip entry {name!r} is a symbolic link", status=400)
    p = PurePosixPath(name.replace("\\", "/"))
    if name.startswith(("/", "\\")) or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise LimitExceeded("zip_paths", "relative paths inside the archive",
                            f"zip entry {name!r} points outside the archive (path traversal)", status=400)
    return str(p)


def _image_signature(head: bytes, settings: ServiceSettings) -> bool:
    """The first bytes of a zip member name an accepted image format (nothing else is inflated)."""
    return sniff_format(head) in allowed_formats(settings.image_formats)


def unpack_zip(data: bytes, settings: ServiceSettings, rejected: list | None = None,
               dest: Path | None = None) -> list[UploadedFile]:
    """Image files of a zip, checked against every zip limit; directories and macOS metadata are skipped.

    Header checks first (nothing inflated): entry count, paths, the declared total (`max_unpacked_bytes`), each
    entry's declared size (`max_zip_member_bytes`) and compression ratio (`max_zip_ratio`). Then each entry is opened
    as a stream: its first bytes must name an accepted image format, else it goes to `rejected` without being
    inflated further; image entries are read in blocks with the real running total checked. With `dest` (a folder)
    each entry is streamed to a file there and the result holds paths, not bytes; nothing is decoded here."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise ServiceError(400, "bad_zip", f"the zip archive cannot be read: {exc}") from None
    if len(infos) > settings.max_zip_entries:
        raise LimitExceeded("max_zip_entries", settings.max_zip_entries,
                            f"zip has {len(infos)} entries, more than max_zip_entries ({settings.max_zip_entries})")
    members = []
    for info in infos:
        name = _safe_member_name(info)
        if info.is_dir() or name.startswith(IGNORED_ZIP_PREFIXES) or PurePosixPath(name).name.startswith("._"):
            continue
        members.append((info, name))
    declared = sum(i.file_size for i, _ in members)
    if declared > settings.max_unpacked_bytes:
        raise LimitExceeded("max_unpacked_bytes", settings.max_unpacked_bytes,
                            f"zip unpacks to {declared} bytes, more than max_unpacked_bytes ({settings.max_unpacked_bytes})")
    for info, name in members:
        if info.file_size > settings.max_zip_member_bytes:
            raise LimitExceeded("max_zip_member_bytes", settings.max_zip_member_bytes,
                                f"zip entry {name!r} unpacks to {info.file_size} bytes, more than max_zip_member_bytes "
                                f"({settings.max_zip_member_bytes})")
        ratio = info.file_size / max(1, info.compress_size)
        if info.file_size > 65536 and ratio > settings.max_zip_ratio:
            raise LimitExceeded("max_zip_ratio", settings.max_zip_ratio,
                                f"zip entry {name!r} is compressed {ratio:.0f}:1, more than max_zip_ratio "
                                f"({settings.max_zip_ratio:g}:1): a zip bomb, not images")
    out, total = [], 0
    if dest is not None:
        dest.mkdir(parents=True, exist_ok=True)
    for index, (info, name) in enumerate(members):
        path = dest / f"{index:05d}.entry" if dest is not None else None
        buf = open(path, "wb") if path is not None else io.BytesIO()
        try:
            with zf.open(info) as f:
                head = f.read(32)
                if not _image_signature(head, settings):
                    if rejected is not None:
                        rejected.append({"file": name, "reason": "not a readable image: not an accepted image "
                                                                 "format (not unpacked)"})
                    continue
                buf.write(head)
                total += len(head)
                while block := f.read(1 << 20):
                    total += len(block)
                    if total > settings.max_unpacked_bytes or buf.tell() + len(block) > settings.max_zip_member_bytes:
                        raise LimitExceeded("max_unpacked_bytes", settings.max_unpacked_bytes,
                                            f"zip unpacks to more than max_unpacked_bytes ({settings.max_unpacked_bytes})")
                    buf.write(block)
        except LimitExceeded:
            raise
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, OSError) as exc:
            raise ServiceError(400, "bad_zip", f"zip entry {name!r} cannot be extracted: {exc}") from None
        finally:
            if path is not None:
                buf.close()
        out.append(UploadedFile(name, buf.getvalue()) if path is None else UploadedFile(name, path=path))
        check_max_images(len(out), settings)  # counted as they come: no work past the limit
    check_max_images(len(out), settings)
    return out


def check_max_images(n: int, settings: ServiceSettings) -> None:
    """Refuse (413 `max_dataset_images`) a dataset of more than `max_dataset_images` images."""
    if n > settings.max_dataset_images:
        raise LimitExceeded("max_dataset_images", settings.max_dataset_images,
                            f"{n} images, more than max_dataset_images ({settings.max_dataset_images})")


def is_zip(data: bytes) -> bool:
    return data[:4] == ZIP_MAGIC
