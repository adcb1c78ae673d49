"""One error type for the API: every 4xx/5xx answer is JSON `{"error": code, "detail": message, ...extra}`."""
from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str, **extra):
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra

    def body(self) -> dict:
        return {"error": self.code, "detail": self.detail, **self.extra}


class LimitExceeded(ApiError):
    """A configured limit was hit; `limit` names the setting (FACEADAPT_<LIMIT>)."""

    def __init__(self, limit: str, value, detail: str, status: int = 413):
        super().__init__(status, "limit_exceeded", detail, limit=limit, limit_value=value)


class UnexpectedErrorMiddleware:
    """ASGI middleware: an exception no handler answered becomes the documented JSON error
    `{"error": "internal_error", "detail": ..., "error_id": ...}` (500), logged with its traceback under that id.
    The connection stays usable. An error after the response has started cannot be answered: it is re-raised."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            import json
            import logging
            import uuid

            error_id = uuid.uuid4().hex[:12]
            logging.getLogger("faceadapt.api").error("unhandled error %s on %s %s", error_id, scope.get("method"),
                                                     scope.get("path"), exc_info=exc)
            body = json.dumps({"error": "internal_error", "error_id": error_id,
                               "detail": f"unexpected server error (id {error_id}, in the server log)"}).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
