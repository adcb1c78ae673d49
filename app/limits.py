"""The upload limit and the admission control of the HTTP API: `BodyLimitMiddleware` refuses a request body over
`max_upload_bytes` before it is buffered, `read_upload` reads a multipart file part in chunks with the same limit,
`pixel_budget()` bounds the decoded pixels of the restores in flight and `rate_limiter()` the requests of each
tenant (both per API process). The limits of the content itself (pixels, formats, zips) are in `service/limits.py`."""
from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from typing import Iterator

from service.errors import LimitExceeded, ServiceError
from service.limits import check_upload_size
from service.settings import ServiceSettings, per_settings


async def read_upload(upload, settings: ServiceSettings, already: int = 0) -> bytes:
    """Read a starlette UploadFile in chunks, refusing to hold more than the upload limit."""
    chunks, total = [], already
    while chunk := await upload.read(1 << 20):
        total += len(chunk)
        check_upload_size(total, settings)
        chunks.append(chunk)
    return b"".join(chunks)


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


# ------------------------------------------------------------------------------------------ admission control
class Busy(ServiceError):
    """A 429 with its Retry-After header (app.main's handler sends `headers`)."""

    def __init__(self, code: str, detail: str, retry_after: int, **extra):
        super().__init__(429, code, detail, retry_after_s=retry_after, **extra)
        self.headers = {"Retry-After": str(retry_after)}


class PixelBudget:
    """The decoded pixels of the restores in flight in this process: `admit(n)` waits (at most `wait_s`) until `n`
    more fit in `budget`, else raises 429 `busy` with Retry-After. One image larger than the whole budget is admitted
    alone (when nothing else is in flight): `max_image_pixels` bounds a single image."""

    def __init__(self, budget: int):
        self.budget, self.in_use = budget, 0
        self._cond = threading.Condition()

    def _fits(self, n: int) -> bool:
        return self.in_use + n <= self.budget or self.in_use == 0

    @contextlib.contextmanager
    def admit(self, n: int, wait_s: float) -> Iterator[None]:
        with self._cond:
            if not self._cond.wait_for(lambda: self._fits(n), timeout=wait_s):
                raise Busy("busy", f"the server is restoring {self.in_use} pixels already; this image "
                           f"({n} pixels) does not fit in restore_pixel_budget ({self.budget}) within "
                                   f"{wait_s:g}s; retry later", RETRY_AFTER_S, limit="restore_pixel_budget",
                           limit_value=self.budget)
            self.in_use += n
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= n
                self._cond.notify_all()


RETRY_AFTER_S = 2


def _pixel_budget(settings: ServiceSettings) -> PixelBudget:
    return PixelBudget(settings.restore_pixel_budget)


pixel_budget = per_settings(_pixel_budget)


class RateLimiter:
    """Per-tenant token buckets: `rate_per_minute` requests a minute, `burst` at once (in this process)."""

    def __init__(self, rate_per_minute: int, burst: int):
        self.rate, self.burst = rate_per_minute / 60.0, float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, when)
        self._lock = threading.Lock()

    def check(self, tenant: str) -> None:
        """Take one token of `tenant`'s bucket, or raise 429 `rate_limited` with the seconds until the next one."""
        if self.rate <= 0:
            return
        now = time.monotonic()
        with self._lock:
            tokens, when = self._buckets.get(tenant, (self.burst, now))
            tokens = min(self.burst, tokens + (now - when) * self.rate)
            if tokens < 1.0:
                self._buckets[tenant] = (tokens, now)
                retry = max(1, math.ceil((1.0 - tokens) / self.rate))
                raise Busy("rate_limited", f"too many requests: at most {self.rate * 60:g} a minute "
                           f"(rate_limit_per_minute) with bursts of {self.burst:g} (rate_limit_burst); retry in "
                           f"{retry} s", retry, limit="rate_limit_per_minute", limit_value=round(self.rate * 60))
            self._buckets[tenant] = (tokens - 1.0, now)
            if len(self._buckets) > 100_000:  # forget idle tenants (their buckets are full again anyway)
                full = [t for t, (k, w) in self._buckets.items() if k + (now - w) * self.rate >= self.burst]
                for t in full:
                    del self._buckets[t]


def _rate_limiter(settings: ServiceSettings) -> RateLimiter:
    return RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)


rate_limiter = per_settings(_rate_limiter)
