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


def check_pixels(data: bytes, settings: Settings, name: str = "image") -> None:
    """Refuse images whose header announces more than max_image_pixels; only the header is read."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError:
        w, h = 1 << 20, 1 << 20
    except Exception:
        return  # not decodable by the header reader: load_image will say why
    if w * h > settings.max_image_pixels:
        raise LimitExceeded("max_image_pixels", settings.max_image_pixels,
                            f"{name} is {w}x{h} = {w * h} pixels, more than max_image_pixels ({settings.max_image_pixels})")


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


def unpack_zip(data: bytes, settings: Settings) -> list[UploadedFile]:
    """Files of a zip, checked against every zip limit; directories and macOS metadata are skipped."""
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
    check_image_count(len(members), settings)
    out, total = [], 0
    for info, name in members:
        buf = io.BytesIO()
        try:
            with zf.open(info) as f:
                while block := f.read(1 << 20):
                    total += len(block)
                    if total > settings.max_unpacked_bytes:
                        raise LimitExceeded("max_unpacked_bytes", settings.max_unpacked_bytes,
                                            f"zip unpacks to more than max_unpacked_bytes ({settings.max_unpacked_bytes})")
                    buf.write(block)
        except LimitExceeded:
            raise
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, EOFError, OSError) as exc:
            raise ApiError(400, "bad_zip", f"zip entry {name!r} cannot be extracted: {exc}") from None
        out.append(UploadedFile(name, buf.getvalue()))
    return out


def check_image_count(n: int, settings: Settings) -> None:
    if n > settings.max_dataset_images:
        raise LimitExceeded("max_dataset_images", settings.max_dataset_images,
                            f"{n} images, more than max_dataset_images ({settings.max_dataset_images})")


def is_zip(data: bytes) -> bool:
    return data[:4] == ZIP_MAGIC


class BodyLimitMiddleware:
    """ASGI middleware: a request body over `max_upload_bytes` is answered 413 (naming the limit) as soon as it is
    announced (Content-Length) or, for chunked bodies, as soon as that many bytes have arrived; the app never buffers
    more than the limit to memory or disk."""

    def __init__(self, app, limit: int, slack: int = 65536):
        self.app, self.limit, self.max_body = app, limit, limit + slack  # slack: multipart boundaries and fields

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        responded = False
        total = 0

        async def refuse():
            nonlocal responded
            responded = True
            err = LimitExceeded("max_upload_bytes", self.limit,
                                f"request body is larger than max_upload_bytes ({self.limit} bytes)")
            import json

            body = json.dumps(err.body()).encode()
            await send({"type": "http.response.start", "status": err.status,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})

        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await refuse()

        async def limited_receive():
            nonlocal total
            if responded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                total += len(message.get("body", b""))
                if total > self.max_body:
                    await refuse()
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
