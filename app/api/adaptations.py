"""Thin v1 routes of adaptation jobs: parse, check access, call service.jobs, shape the answer (`job_out`); the events
of a job as pages (`/events`) and as a server-sent event stream (`/stream`); the tenant's webhook secret."""
from __future__ import annotations

import asyncio
import json
import time

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.api.deps import DB, CurrentPrincipal, Principal
from app.schemas import AdaptationIn, AdaptationOut, EventPage, WebhookSecretOut
from service.db import session_factory
from service.errors import ServiceError
from service.jobs import (GRID_KEY, cancel_job, create_job, evaluation_grid, events_after, get_job, list_jobs,
                          progress_out)
from service.rows import FINAL_STATUSES, Job, JobEvent
from service.settings import get_settings
from service.webhooks import check_url, get_secret, rotate_secret, signing_secrets

MAX_EVENT_ID = 2**31 - 1  # job_events.id is a 32-bit integer
router = APIRouter(tags=["adaptations"])


def _evaluation_out(job: Job) -> dict:
    ev = {k: v for k, v in (job.metrics or {}).items() if k != GRID_KEY}
    if (job.metrics or {}).get(GRID_KEY):
        ev["grid_url"] = f"/v1/adaptations/{job.id}/grid"
    return ev


def event_out(e: JobEvent) -> dict:
    return {"id": e.id, "ts": e.ts, "stage": e.stage, "kind": e.kind, "message": e.message, "data": e.data or {}}


def job_out(job: Job, with_events: bool = True) -> dict:
    return {
        "id": job.id, "status": job.status, "dataset_id": job.dataset_id, "base_model": job.base_model,
        "name": job.name, "params": job.params,
        "progress": progress_out(job, timing=with_events),
        "events": [event_out(e) for e in job.events] if with_events else None,
        "evaluation": _evaluation_out(job), "model_id": job.model_id, "error": job.error,
        "cancel_requested": job.cancel_requested, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at,
    }


@router.post("/v1/adaptations", status_code=202, response_model=AdaptationOut)
def start_adaptation(body: AdaptationIn, principal: Principal = CurrentPrincipal, session: Session = DB):
    """Start adapting `base_model` to a dataset; the job runs on the workers. Poll GET /v1/adaptations/{id}."""
    webhook = check_url(body.webhook) if body.webhook is not None else None
    if webhook is not None:
        get_secret(session, principal.tenant_id)  # the secret that will sign its deliveries exists from now on
    return job_out(create_job(session, principal.tenant_id, body.dataset_id, body.base_model, body.name,
                              body.params, body.shards, webhook=webhook, webhook_events=body.webhook_events))


@router.get("/v1/adaptations", response_model=list[AdaptationOut])
def list_adaptations(principal: Principal = CurrentPrincipal, session: Session = DB,
                     limit: int = Query(100, ge=1, le=1000)):
    return [job_out(j, with_events=False) for j in list_jobs(session, principal.tenant_id, limit)]


@router.get("/v1/adaptations/{job_id}", response_model=AdaptationOut)
def read_adaptation(job_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    return job_out(get_job(session, principal.tenant_id, job_id))


@router.get("/v1/adaptations/{job_id}/grid", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the before/after grid"}})
def adaptation_grid(job_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    """The held-out before/after grid of the evaluation (PNG; columns: input, base, adapted, pseudo target), once the
    job has been evaluated; 404 before."""
    png = evaluation_grid(get_job(session, principal.tenant_id, job_id))
    if png is None:
        raise ServiceError(404, "grid_not_ready", "the job has not been evaluated yet (no before/after grid)")
    return Response(png, media_type="image/png")


@router.post("/v1/adaptations/{job_id}/cancel", status_code=202, response_model=AdaptationOut)
def cancel_adaptation(job_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    """Ask the job to stop; a running stage stops at its next batch."""
    job = cancel_job(session, principal.tenant_id, job_id)
    return job_out(job)


# ------------------------------------------------------------------------------------------------ events
@router.get("/v1/adaptations/{job_id}/events", response_model=EventPage)
def list_events(job_id: str, principal: Principal = CurrentPrincipal, session: Session = DB,
                after: int = Query(0, ge=0, le=MAX_EVENT_ID, description="return the events with an id above this "
                                   "one (the `last_id` of the previous page); 0: from the first"),
                limit: int = Query(100, ge=1, le=1000, description="most events in the page")):
    """A page of the job's events, oldest first. Event ids only grow within a job, so `after=<last_id>` pages through
    them and, asked again later, returns exactly the events that came since."""
    get_job(session, principal.tenant_id, job_id)
    rows = events_after(session, job_id, after, limit + 1)
    page = rows[:limit]
    return {"object": "list", "data": [event_out(e) for e in page], "has_more": len(rows) > limit,
            "last_id": page[-1].id if page else None}


def _sse(kind: str, data: dict, event_id: int | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(data, default=str, separators=(',', ':'))}\n\n"


def _poll(tenant_id: str, job_id: str, cursor: int, limit: int = 200) -> tuple[dict, list[dict]]:
    """One short look at the job (its own session, closed at once): its state and the events after `cursor`."""
    with session_factory()() as s:
        job = get_job(s, tenant_id, job_id)
        events = [event_out(e) for e in events_after(s, job_id, cursor, limit)]
        state = {"id": job.id, "status": job.status, "progress": progress_out(job), "error": job.error,
                 "model_id": job.model_id, "cancel_requested": job.cancel_requested,
                 "final": job.status in FINAL_STATUSES, "more_events": len(events) == limit}
    return state, events


def _resume_point(after: int | None, last_event_id: str | None) -> int:
    if last_event_id is not None and last_event_id.strip():
        v = last_event_id.strip()
        if not (v.isascii() and v.isdigit()):
            raise ServiceError(422, "bad_last_event_id", "Last-Event-ID must be an event id this stream sent "
                               "(digits only)")
        return min(int(v), MAX_EVENT_ID)  # past every event: only what comes next
    return after or 0


@router.get("/v1/adaptations/{job_id}/stream", response_class=StreamingResponse, responses={200: {
    "description": "server-sent events (text/event-stream): `status` (status and progress, when they change), `event` "
                   "(each job event; its SSE id is the event id), `end` (the job finished; the stream closes); "
                   "comment lines as heartbeats",
    # the schema of one server-sent event (its fields as the SSE format names them); `data` is a JSON document
    "content": {"text/event-stream": {"schema": {"type": "object", "properties": {
        "event": {"type": "string", "enum": ["status", "event", "end"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0}}}}}}})
async def stream_adaptation(
        request: Request, job_id: str, principal: Principal = CurrentPrincipal,
        after: int = Query(None, ge=0, le=MAX_EVENT_ID, description="start after this event id (as "
                                  "Last-Event-ID, for clients that cannot set headers)"),
        # HTTP trims a header's surrounding blanks before the server sees it: blanks around the digits, or an empty
        # value (no resume), are what the server can be sent
        last_event_id: str = Header(None, json_schema_extra={"pattern": "^[ \t]*[0-9]*[ \t]*$"}, description=(
            "resume after this event id (browsers send it when they reconnect); empty: from the start"))):
    """Follow a job live as server-sent events: its state at once, then every change and every event until the job
    ends. A reconnect with `Last-Event-ID` resumes after the last event received. The stream holds no database
    session between its looks at the job (every `stream_poll_s`) and closes after `stream_max_s` (reconnect)."""
    settings = get_settings()
    cursor = _resume_point(after, last_event_id)
    tenant = principal.tenant_id
    state, events = await run_in_threadpool(_poll, tenant, job_id, cursor)  # 404 before the stream starts

    async def stream():
        nonlocal state, events, cursor
        started = last_sent = time.monotonic()
        shown = None
        yield f"retry: {int(max(settings.stream_poll_s, 1.0) * 1000)}\n\n"
        while True:
            for e in events:
                cursor = e["id"]
                yield _sse("event", e, cursor)
            view = {k: state[k] for k in ("status", "error", "model_id", "cancel_requested")}
            view["progress"] = {k: state["progress"][k] for k in ("stage", "done", "total")}
            if view != shown or events:
                shown = view
                yield _sse("status", {k: v for k, v in state.items() if k != "more_events"}, cursor)
                last_sent = time.monotonic()
            if state["final"] and not state["more_events"]:
                yield _sse("end", {"id": state["id"], "status": state["status"]}, cursor)
                return
            if not state["more_events"]:
                if time.monotonic() - started >= settings.stream_max_s or await request.is_disconnected():
                    return
                await asyncio.sleep(settings.stream_poll_s)
                if time.monotonic() - last_sent >= settings.stream_heartbeat_s:
                    yield ": heartbeat\n\n"
                    last_sent = time.monotonic()
            try:
                state, events = await run_in_threadpool(_poll, tenant, job_id, cursor)
            except ServiceError:  # the job was deleted meanwhile
                yield _sse("end", {"id": job_id, "status": "deleted"}, cursor)
                return

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ------------------------------------------------------------------------------------------------ webhook secret
def _secret_out(row) -> dict:
    until = row.previous_until if len(signing_secrets(row)) > 1 else None
    return {"secret": row.secret, "created_at": row.created_at, "previous_valid_until": until}


@router.get("/v1/webhook-secret", response_model=WebhookSecretOut, tags=["webhooks"])
def read_webhook_secret(principal: Principal = CurrentPrincipal, session: Session = DB):
    """The calling tenant's webhook signing secret (made on first use): receivers check `FaceAdapt-Signature` with
    it (docs/SERVICE.md)."""
    return _secret_out(get_secret(session, principal.tenant_id))


@router.post("/v1/webhook-secret/rotate", response_model=WebhookSecretOut, tags=["webhooks"])
def rotate_webhook_secret(principal: Principal = CurrentPrincipal, session: Session = DB):
    """A new signing secret. For `webhook_secret_grace_s` (default a day) deliveries carry a second signature made
    with the previous one, so receivers can switch without losing a call."""
    return _secret_out(rotate_secret(session, principal.tenant_id))
