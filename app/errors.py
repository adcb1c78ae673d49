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


# ------------------------------------------------------------------------------------------------ the OpenAPI side
ERROR_STATUSES = {
    400: "the request is malformed or its content unusable (not an image, an unreadable zip, an empty dataset, a "
         "model of the wrong kind)",
    401: "no API key, or an unknown or revoked one (`Authorization: Bearer <key>`; required unless the server runs "
         "without keys on a loopback address)",
    403: "refused by policy (a shared public model cannot be deleted; a webhook URL outside "
         "FACEADAPT_WEBHOOK_ALLOWED_URLS)",
    404: "no such resource for this tenant (another tenant's is never found)",
    409: "conflicts with the current state (a name in use, a job already finished, a dataset a job still uses)",
    413: "a size limit was exceeded (request body, image pixels, zip entries or sizes, images per dataset); `limit` "
         "names the FACEADAPT_* setting and `limit_value` its value",
    415: "an image format outside FACEADAPT_IMAGE_FORMATS",
    422: "invalid parameters: `detail` says which and why (`errors` lists each with its location)",
    429: "a quota was reached (queued or running jobs per tenant): retry when one finished",
    503: "temporarily unavailable (the task broker, the diffusion prior, a model load, shutting down): retry later",
}

#: the statuses an operation answers beyond what its shape implies (401 on /v1, 404 with a path id, 413 on POST, 422
#: with parameters or a body; see `document_errors`)
OPERATION_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/v1/restore"): (400, 404, 415, 503),
    ("post", "/v1/datasets"): (400, 415),
    ("delete", "/v1/datasets/{dataset_id}"): (409,),
    ("post", "/v1/adaptations"): (400, 403, 404, 409, 429, 503),
    ("post", "/v1/adaptations/{job_id}/cancel"): (409,),
    ("delete", "/v1/models/{model_id}"): (403,),
    ("get", "/v1/models/{model_id}"): (),
}


def _error_response(status: int) -> dict:
    return {"description": ERROR_STATUSES[status],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}


def document_errors(schema: dict, error_body: dict, keys_always: bool) -> dict:
    """Every error status each operation can answer, with the JSON error body (`ErrorBody`); the bearer-key security
    of the /v1 operations (optional where the server may run without keys)."""
    comps = schema.setdefault("components", {})
    comps.setdefault("schemas", {})["ErrorBody"] = error_body
    comps.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer", "description": "an API key (`faceadapt keys create --tenant NAME`)"}
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            codes = set(OPERATION_ERRORS.get((method, path), ()))
            if path.startswith("/v1/"):
                codes.add(401)
                op["security"] = [{"bearer": []}] if keys_always else [{"bearer": []}, {}]
            if "{" in path:
                codes.add(404)
            if method == "post":
                codes.add(413)
            if op.get("parameters") or op.get("requestBody"):
                codes.add(422)
            responses = op.setdefault("responses", {})
            for code in sorted(codes):
                if code == 422 and "422" in responses:  # FastAPI's, with the validation error body (app/main.py)
                    responses["422"]["description"] = ERROR_STATUSES[422]
                    continue
                responses[str(code)] = _error_response(code)
    return schema
