"""Job webhooks: the URL allow-list, the tenants' signing secrets, the outbox written with each job change, and
delivering it (signed, retried with backoff) from the workers' loop (worker/webhooks.py).

The outbox: a flush that changes a job with a webhook (its status leaves 'queued', its stage changes, it ends) or adds
one of its events also inserts the matching `WebhookDelivery` rows (a `before_flush` hook on every Session), so the
call is recorded in the very transaction of the change and the job never waits on the receiver. A delivery is a POST
of JSON with the headers `FaceAdapt-Webhook-Id` (the delivery's id: the same on every retry), `FaceAdapt-Webhook-Event`
and `FaceAdapt-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>" with the tenant's secret>` (a second
`v1=` with the previous secret during a rotation's grace period). Redirects are not followed; any 2xx is success.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets as _secrets
import time
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import event as sa_event
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from service.db import for_update, session
from service.errors import ServiceError
from service.rows import FINAL_STATUSES, Job, JobEvent, WebhookDelivery, WebhookSecret, new_id, utcnow
from service.settings import get_settings

log = logging.getLogger("faceadapt.webhooks")

EVENT_TYPES = ("start", "stage", "logs", "completed")  # what `webhook_events` may name
DEFAULT_EVENTS = ("completed",)
SIGNATURE_HEADER = "FaceAdapt-Signature"


# ------------------------------------------------------------------------------------------------ the allow-list
def _origin(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port, parts.path or "/"


def allowed_prefixes() -> list[str]:
    return [p.strip() for p in get_settings().webhook_allowed_urls.split(",") if p.strip()]


def url_allowed(url: str, prefixes: list[str]) -> bool:
    """Whether `url` falls under one of the allowed prefixes: the same scheme, host and port, and a path under the
    prefix's path (at a '/' boundary: `http://h/hooks` allows `/hooks` and `/hooks/x`, not `/hooksx`)."""
    scheme, host, port, path = _origin(url)
    for prefix in prefixes:
        try:
            p_scheme, p_host, p_port, p_path = _origin(prefix)
        except ValueError:
            continue
        if (scheme, host, port) != (p_scheme, p_host, p_port) or not p_host:
            continue
        base = p_path.rstrip("/")
        if path == base or path.startswith(base + "/"):
            return True
    return False


URL_PATTERN = r"^https?://\S+$"  # the shape the API's schema promises (AdaptationIn.webhook)


def check_url(url: str) -> str:
    """The webhook URL of a new job, or ServiceError: 422 `bad_webhook` when it is not an http(s) URL at all, 403
    `webhook_not_allowed` when it is not under FACEADAPT_WEBHOOK_ALLOWED_URLS (none by default), carries
    credentials or a #fragment, or cannot be parsed."""
    if not re.match(URL_PATTERN, url, re.IGNORECASE):
        raise ServiceError(422, "bad_webhook", "the webhook must be an absolute http:// or https:// URL without spaces")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ServiceError(403, "webhook_not_allowed", f"webhook URL refused: it cannot be parsed ({exc})") from None
    if not parts.hostname or parts.username is not None or parts.password is not None or parts.fragment:
        raise ServiceError(403, "webhook_not_allowed", "webhook URL refused: it needs a host and may not carry "
                           "credentials or a #fragment")
    prefixes = allowed_prefixes()
    if not url_allowed(url, prefixes):
        why = "no webhook URL is allowed on this server" if not prefixes else "it is not under an allowed prefix"
        raise ServiceError(403, "webhook_not_allowed", f"webhook URL refused: {why} (the operator lists the allowed "
                           "URL prefixes in FACEADAPT_WEBHOOK_ALLOWED_URLS)")
    return url


# ------------------------------------------------------------------------------------------------ secrets
def _new_secret() -> str:
    return "whsec_" + _secrets.token_urlsafe(32)


def get_secret(s: Session, tenant_id: str) -> WebhookSecret:
    """The tenant's signing secret, made on first use (committed)."""
    row = s.get(WebhookSecret, tenant_id)
    if row is None:
        s.add(WebhookSecret(tenant_id=tenant_id, secret=_new_secret()))
        try:
            s.commit()
        except Exception:  # a concurrent first use made it
            s.rollback()
        row = s.get(WebhookSecret, tenant_id)
    return row


def rotate_secret(s: Session, tenant_id: str) -> WebhookSecret:
    """A new signing secret; the old one still signs (a second `v1=`) for `webhook_secret_grace_s`."""
    get_secret(s, tenant_id)
    row = for_update(s, WebhookSecret, WebhookSecret.tenant_id == tenant_id)
    grace = timedelta(seconds=get_settings().webhook_secret_grace_s)
    row.previous_secret, row.previous_until = row.secret, utcnow() + grace
    row.secret, row.created_at = _new_secret(), utcnow()
    s.commit()
    return row


def signing_secrets(row: WebhookSecret) -> list[str]:
    out = [row.secret]
    until = row.previous_until
    if row.previous_secret and until is not None and until > utcnow():
        out.append(row.previous_secret)
    return out


def sign(secrets: list[str], timestamp: int, body: bytes) -> str:
    """The `FaceAdapt-Signature` header: `t=<timestamp>,v1=<hex>[,v1=<hex>]`, each an HMAC-SHA256 of `<t>.<body>`."""
    msg = str(timestamp).encode() + b"." + body
    return ",".join([f"t={timestamp}"] + [f"v1={hmac.new(k.encode(), msg, hashlib.sha256).hexdigest()}"
                                          for k in secrets])


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300, now: float | None = None) -> bool:
    """What a receiver does: a `v1` signature of the body matches and the timestamp is recent (replays refused)."""
    fields = [f.partition("=") for f in header.split(",")]
    ts = next((v for k, _, v in fields if k == "t"), "")
    if not ts.isdigit() or abs((now or time.time()) - int(ts)) > tolerance_s:
        return False
    want = hmac.new(secret.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return any(k == "v1" and hmac.compare_digest(v, want) for k, _, v in fields)


# ------------------------------------------------------------------------------------------------ the outbox
def job_summary(job: Job) -> dict:
    ev = {k: v for k, v in (job.metrics or {}).items() if k != "grid_png_b64"}
    return {"id": job.id, "name": job.name, "status": job.status, "stage": job.stage,
            "progress": {"done": job.progress_done or 0, "total": job.progress_total or 0},
            "model_id": job.model_id, "error": job.error, "evaluation": ev,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None}


def _changed(job: Job, attr: str) -> tuple[bool, object]:
    hist = inspect(job).attrs[attr].history
    return bool(hist.added) and hist.added != hist.deleted, (hist.added[0] if hist.added else None)


def _deliveries_for(job: Job, new_events: list[JobEvent], is_new: bool) -> list[tuple[str, dict]]:
    wanted = set(job.webhook_events or DEFAULT_EVENTS)
    out: list[tuple[str, dict]] = []
    if not is_new:
        status_changed, status = _changed(job, "status")
        stage_changed, stage = _changed(job, "stage")
        before = inspect(job).attrs.status.history.deleted
        if status_changed and "start" in wanted and "queued" in before and status not in FINAL_STATUSES:
            out.append(("start", {}))
        if stage_changed and stage and "stage" in wanted:
            out.append(("stage", {"stage": stage}))
        if status_changed and status in FINAL_STATUSES and "completed" in wanted:
            out.append(("completed", {}))
    if "logs" in wanted:
        for e in new_events:
            out.append(("logs", {"event": {"ts": (e.ts or utcnow()).isoformat(), "stage": e.stage,
                                           "kind": e.kind or "info", "message": e.message, "data": e.data or {}}}))
    return out


@sa_event.listens_for(Session, "before_flush")
def _write_outbox(s: Session, _ctx, _instances) -> None:
    """Add the deliveries of this flush's job changes to the same flush (the same transaction)."""
    events: dict[str, list[JobEvent]] = {}
    for obj in s.new:
        if isinstance(obj, JobEvent) and obj.job_id:
            events.setdefault(obj.job_id, []).append(obj)
    jobs: dict[str, tuple[Job, bool]] = {}
    for obj in list(s.new) + list(s.dirty):
        if isinstance(obj, Job) and obj.webhook_url and obj.id:
            jobs[obj.id] = (obj, obj in s.new)
    with s.no_autoflush:
        for job_id in events.keys() - jobs.keys():
            job = s.get(Job, job_id)
            if job is not None and job.webhook_url:
                jobs[job_id] = (job, False)
    now = utcnow()
    for job_id, (job, is_new) in jobs.items():
        for kind, extra in _deliveries_for(job, events.get(job_id, []), is_new):  # in the order they were added
            did = new_id()
            payload = {"id": did, "type": kind, "created_at": now.isoformat(), "job": job_summary(job), **extra}
            s.add(WebhookDelivery(id=did, job_id=job_id, tenant_id=job.tenant_id, url=job.webhook_url, event=kind,
                                  payload=payload, status="pending", attempts=0, next_attempt_at=now, created_at=now))


# ------------------------------------------------------------------------------------------------ delivery
def backoff_s(attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones: base * 2^(attempts-1), at most the cap."""
    st = get_settings()
    return min(st.webhook_retry_base_s * 2 ** max(0, attempts - 1), st.webhook_retry_max_s)


def _claim(limit: int) -> list[dict]:
    st = get_settings()
    now = utcnow()
    with session() as s:
        q = (select(WebhookDelivery).where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= now)
             .order_by(WebhookDelivery.created_at).limit(limit))
        if s.get_bind().dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)  # several workers' loops never take the same delivery
        rows = s.scalars(q).all()
        out = []
        for r in rows:
            r.attempts += 1
            # held while it is sent; a worker dying here leaves it to be retried after this
            r.next_attempt_at = now + timedelta(seconds=2 * st.webhook_timeout_s + 30)
            out.append({"id": r.id, "url": r.url, "event": r.event, "payload": r.payload, "tenant_id": r.tenant_id,
                        "attempts": r.attempts})
        s.commit()
        for d in out:
            d["secrets"] = signing_secrets(get_secret(s, d["tenant_id"]))
    return out


def send(d: dict, client: httpx.Client) -> str | None:
    """POST one delivery; None on a 2xx answer, else why it failed."""
    if not url_allowed(d["url"], allowed_prefixes()):
        return "the URL is no longer allowed (FACEADAPT_WEBHOOK_ALLOWED_URLS)"
    body = json.dumps(d["payload"], separators=(",", ":"), sort_keys=True, default=str).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "FaceAdapt-Webhooks/1",
               "FaceAdapt-Webhook-Id": d["id"], "FaceAdapt-Webhook-Event": d["event"],
               SIGNATURE_HEADER: sign(d["secrets"], int(time.time()), body)}
    try:
        r = client.post(d["url"], content=body, headers=headers)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:500]
    return None if 200 <= r.status_code < 300 else f"HTTP {r.status_code}"


def deliver_due(limit: int = 20) -> int:
    """Send the deliveries that are due (one pass); returns how many were tried. A failure is retried after
    `backoff_s` until `webhook_max_attempts`, then marked 'failed' (its last error kept)."""
    st = get_settings()
    batch = _claim(limit)
    if not batch:
        return 0
    with httpx.Client(timeout=st.webhook_timeout_s, follow_redirects=False, trust_env=False) as client:
        for d in batch:
            error = send(d, client)
            with session() as s:
                row = s.get(WebhookDelivery, d["id"])
                if row is None:
                    continue
                if error is None:
                    row.status, row.delivered_at, row.last_error = "delivered", utcnow(), None
                else:
                    row.last_error = error
                    if d["attempts"] >= st.webhook_max_attempts or error.startswith("the URL is no longer allowed"):
                        row.status = "failed"
                        log.warning("webhook %s to %s failed for good: %s", d["id"], d["url"], error)
                    else:
                        row.next_attempt_at = utcnow() + timedelta(seconds=backoff_s(d["attempts"]))
                s.commit()
    return len(batch)
