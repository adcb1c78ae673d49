"""The one error of the service: status, code and detail, which the HTTP API answers as JSON
`{"error": code, "detail": message, ...extra}` (app/main.py); `LimitExceeded` names the limit that was hit."""
from __future__ import annotations


class ServiceError(Exception):
    def __init__(self, status: int, code: str, detail: str, **extra):
        super().__init__(detail)
        self.status, self.code, self.detail, self.extra = status, code, detail, extra

    def body(self) -> dict:
        return {"error": self.code, "detail": self.detail, **self.extra}


class LimitExceeded(ServiceError):
    """A configured limit was hit; `limit` names the setting (FACEADAPT_<LIMIT>)."""

    def __init__(self, limit: str, value, detail: str, status: int = 413):
        super().__init__(status, "limit_exceeded", detail, limit=limit, limit_value=value)
