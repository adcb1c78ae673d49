"""Input limits. Every violation raises `LimitExceeded` naming the setting, before anything is stored.

* `max_upload_bytes`: the request body (checked from Content-Length by the middleware, then again while reading);
* `max_image_pixels`: width*height read from the image header, before any pixel is decoded (decompression bombs);
* `max_dataset_images`: images in one dataset upload;
* `max_zip_entries`, `max_unpacked_bytes`: entries and real uncompressed bytes of an uploaded zip (the sizes the zip
  declares are checked first, then the bytes actually inflated, so a lying header cannot get past);
* zip entries with absolute paths, `..` components, drive letters or symlinks are refused (`zip_paths`).
"""
from __future__ import annotations

import io
import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath

from PIL import Image

from app.errors import ApiError, LimitExceeded
from restoration.settings import Settings

ZIP_MAGIC = b"PK\x03\x04"
IGNORED_ZIP_PREFIXES = ("__MACOSX/",)


@dataclass
class UploadedFile:
    name: str
    data: bytes


def check_upload_size(n: int, settings: Settings) -> None:
    if n > settings.max_upload_bytes:
        raise LimitExceeded("max_upload_bytes", settings.max_upload_bytes,
                            f"upload is larger than max_upload_bytes ({settings.max_upload_bytes} bytes)")


async def read_upload(upload, settings: Settings, already: int = 0) -> bytes:
    """Read a starlette UploadFile in chunks, refusing to hold more than the upload limit."""
    chunks, total = [], already
    while chunk := await upload.read(1 << 20):
        total += len(chunk)
        check_upload_size(total, settings)
        chunks.append(chunk)
    return b"".join(chunks)


def check_image_format(data: bytes, settings: Settings, name: str = "image") -> str:
    """The image's format from its signature, before anything decodes it: 415 `unsupported_format` for a format
    outside `image_formats` (EPS, GIF, PDF, ...), 400 `bad_image` for bytes that are no image at all."""
    from restoration.faces.imageio import UnsupportedFormat, allowed_formats, check_format, sniff_format

    if sniff_format(data) is None:
        raise ApiError(400, "bad_image", f"cannot read {name}: not a recognised image format "
                       f"(accepted: {', '.join(allowed_formats(settings.image_formats))})")
    try:
        return check_format(data, settings.image_formats, name)
    except UnsupportedFormat as exc:
        raise ApiError(415, "unsupported_format", str(exc), limit="image_formats", limit_value=list(exc.allowed),
                       format=exc.format) from None


def check_pixels(data: bytes, settings: Settings, name: str = "image") -> None:
    """Refuse images whose header announces more than max_image_pixels; only the header is read, and only by the
    decoder of an allowed format (anything else is refused by load_image / check_image_format)."""
    import re
    import warnings

    from restoration.faces.imageio import INPUT_FORMATS, allowed_formats, sniff_format

    fmt = sniff_format(data)
    if fmt not in allowed_formats(settings.image_formats):
        return
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
        return  # not decodable by the header reader: load_image will say why
    if n > settings.max_image_pixels:
        raise LimitExceeded("max_image_pixels", settings.max_image_pixels,
                            f"{name} is {size}{n} pixels, more than max_image_pixels ({settings.max_image_pixels})")


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


def _image_signature(head: bytes, settings: Settings) -> bool:
    """The first bytes of a zip member name an accepted image format (nothing else is inflated)."""
    try:
        from restoration.faces.imageio import allowed_formats, sniff_format

        return sniff_format(head) in allowed_formats(settings.image_formats)
    except ImportError:  # pragma: no cover - older imageio without the allow-list
        return head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")) or \
            (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def unpack_zip(data: bytes, settings: Settings, rejected: list | None = None) -> list[UploadedFile]:
    """Image files of a zip, checked against every zip limit; directories and macOS metadata are skipped.

    Header checks first (nothing inflated): entry count, paths, the declared total (`max_unpacked_bytes`), each
    entry's declared size (`max_zip_member_bytes`) and compression ratio (`max_zip_ratio`). Then each entry is opened
    as a stream: its first bytes must name an accepted image format, else it goes to `rejected` without being
    inflated further; image entries are read in blocks with the real running total checked."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise ApiError(400, "bad_zip", f"the zip archive cannot be read: {exc}") from None
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
    for info, name in members:
        buf = io.BytesIO()
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
            raise ApiError(400, "bad_zip", f"zip entry {name!r} cannot be extracted: {exc}") from None
        out.append(UploadedFile(name, buf.getvalue()))
    check_image_count(len(out), settings)
    return out


def check_image_count(n: int, settings: Settings) -> None:
    if n > settings.max_dataset_images:
        raise LimitExceeded("max_dataset_images", settings.max_dataset_images,
                            f"{n} images, more than max_dataset_images ({settings.max_dataset_images})")


def is_zip(data: bytes) -> bool:
    return data[:4] == ZIP_MAGIC


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.4g} MiB"


class BodyLimitMiddleware:
    """ASGI middleware: a request body over `max_upload_bytes` is answered 413 JSON naming the limit and its value,
    as soon as it is announced (Content-Length) or, for chunked bodies, as soon as that many bytes have arrived; the
    app never buffers more than the limit to memory or disk.

    A client that sends its whole body before reading the answer (most do: httpx, requests, browsers' fetch) would see
    a connection reset instead of the 413 if the server closed the socket with unread bytes in it. So the rest of
    the body is read and thrown away (nothing is kept; at most `drain_max_bytes`, 1 GiB) before the 413 is sent. A
    client that asked `Expect: 100-continue` (curl) has sent no body yet: it gets the 413 at once."""

    DRAIN_MAX_BYTES = 1 << 30

    def __init__(self, app, limit: int, slack: int = 65536, drain_max_bytes: int = DRAIN_MAX_BYTES):
        self.app, self.limit, self.max_body = app, limit, limit + slack  # slack: multipart boundaries and fields
        self.drain_max_bytes = drain_max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        responded = False
        total = 0
        headers = dict(scope.get("headers") or [])
        expect_continue = headers.get(b"expect", b"").lower() == b"100-continue"

        async def drain(seen: int) -> bool:
            """Read and discard the rest of the body; False when it is longer than drain_max_bytes or the client left."""
            while seen <= self.drain_max_bytes:
                message = await receive()
                if message["type"] != "http.request":
                    return False
                seen += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return True
            return False

        async def refuse(announced: int | None, seen: int, body_done: bool):
            nonlocal responded
            responded = True
            size = f"request body of {announced} bytes" if announced is not None else "request body"
            err = LimitExceeded("max_upload_bytes", self.limit, f"{size} is larger than max_upload_bytes "
                                f"({self.limit} bytes = {_mib(self.limit)}; FACEADAPT_MAX_UPLOAD_BYTES)")
            too_long = announced is not None and announced > self.drain_max_bytes  # would be cut anyway
            if not body_done and not too_long and not (expect_continue and seen == 0):
                body_done = await drain(seen)
            import json

            body = json.dumps(err.body()).encode()
            hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if not body_done:
                hdrs.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": err.status, "headers": hdrs})
            await send({"type": "http.response.body", "body": body})

        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await refuse(int(length), 0, False)

        async def limited_receive():
            nonlocal total
            if responded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_body:
                    await refuse(None, total, not message.get("more_body", False))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not responded:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not responded:
                raise  # the app's own error; a refused body's aftermath (client disconnect) is not one
