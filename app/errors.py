"""The API's last line of defence: an exception no handler answered becomes the documented JSON 500 error.

Every planned error is a `service.errors.ServiceError`, answered by the handler in app/main.py as JSON
`{"error": code, "detail": message, ...extra}`."""
from __future__ import annotations

import json
import logging
import uuid

log = logging.getLogger("faceadapt.api")


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
            error_id = uuid.uuid4().hex[:12]
            log.error("unhandled error %s on %s %s", error_id, scope.get("method"), scope.get("path"), exc_info=exc)
            body = json.dumps({"error": "internal_error", "error_id": error_id,
                               "detail": f"unexpected server error (id {error_id}, in the server log)"}).encode()
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
