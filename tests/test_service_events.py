"""A job's events as pages (`GET /v1/adaptations/{id}/events?after=&limit=`) and as a server-sent event stream
(`GET /v1/adaptations/{id}/stream`, resumable with Last-Event-ID), on the real test stack."""
from __future__ import annotations

import json
import uuid

import pytest

pytest_plugins = ["test_service_harness"]

from test_service_harness import face_files  # noqa: E402


def read_sse(response) -> list[dict]:
    """The messages of a text/event-stream answer: [{"event", "id", "data"}] (comments kept as {"comment": text})."""
    out, msg = [], {}
    for line in response.iter_lines():
        if line == "":
            if msg:
                out.append(msg)
            msg = {}
        elif line.startswith(":"):
            out.append({"comment": line[1:].strip()})
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                msg["data"] = json.loads(value)
            elif field in ("event", "id", "retry"):
                msg[field] = value
    if msg:
        out.append(msg)
    return out


def stream(st, key: str, job_id: str, headers: dict | None = None, params: dict | None = None) -> list[dict]:
    with st.client.stream("GET", f"/v1/adaptations/{job_id}/stream", headers={**st.auth(key), **(headers or {})},
                          params=params, timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return read_sse(r)


def all_events(st, key: str, job_id: str) -> list[dict]:
    return st.client.get(f"/v1/adaptations/{job_id}", headers=st.auth(key)).json()["events"]


def test_events_page_through_with_a_stable_cursor(service_stack, tenant_a, adapted):
    st, job_id = service_stack, adapted["job"]["id"]
    everything = all_events(st, tenant_a, job_id)
    assert len(everything) >= 5
    ids = [e["id"] for e in everything]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    seen, after, pages = [], 0, 0
    while True:
        r = st.client.get(f"/v1/adaptations/{job_id}/events", params={"after": after, "limit": 2},
                          headers=st.auth(tenant_a))
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += page["data"]
        pages += 1
        if not page["has_more"]:
            break
        assert page["last_id"] == page["data"][-1]["id"]
        after = page["last_id"]
    assert [e["id"] for e in seen] == ids and [e["message"] for e in seen] == [e["message"] for e in everything]
    assert pages == -(-len(ids) // 2)  # pages of 2; the last one says has_more=false
    # after the last event: an empty page (asked again later, it holds exactly the events that came since)
    r = st.client.get(f"/v1/adaptations/{job_id}/events", params={"after": ids[-1]}, headers=st.auth(tenant_a))
    assert r.json() == {"object": "list", "data": [], "has_more": False, "last_id": None}
    r = st.client.get(f"/v1/adaptations/{job_id}/events", params={"after": ids[2], "limit": 1000},
                      headers=st.auth(tenant_a))
    assert [e["id"] for e in r.json()["data"]] == ids[3:]


@pytest.mark.parametrize("params", [{"after": -1}, {"after": "abc"}, {"after": 2**31}, {"limit": 0},
                                    {"limit": 1001}, {"limit": "x"}])
def test_events_bad_paging_values_are_422(service_stack, tenant_a, adapted, params):
    st = service_stack
    r = st.client.get(f"/v1/adaptations/{adapted['job']['id']}/events", params=params, headers=st.auth(tenant_a))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "invalid_request" and r.json()["detail"]


def test_events_and_stream_of_another_tenants_job_are_404(service_stack, tenant_a, tenant_b, adapted):
    st, job_id = service_stack, adapted["job"]["id"]
    for path in (f"/v1/adaptations/{job_id}/events", f"/v1/adaptations/{job_id}/stream",
                 f"/v1/adaptations/{uuid.uuid4().hex}/events", f"/v1/adaptations/{uuid.uuid4().hex}/stream"):
        r = st.client.get(path, headers=st.auth(tenant_b))
        assert r.status_code == 404 and r.json()["error"] == "job_not_found", (path, r.text)
    r = st.client.get(f"/v1/adaptations/{job_id}/events")
    assert r.status_code == 401


def test_stream_of_a_finished_job_replays_its_events_and_ends(service_stack, tenant_a, adapted):
    st, job_id = service_stack, adapted["job"]["id"]
    everything = all_events(st, tenant_a, job_id)
    msgs = stream(st, tenant_a, job_id)
    assert msgs[0].get("retry")
    events = [m for m in msgs if m.get("event") == "event"]
    assert [int(m["id"]) for m in events] == [e["id"] for e in everything]
    assert [m["data"]["message"] for m in events] == [e["message"] for e in everything]
    status = [m for m in msgs if m.get("event") == "status"]
    assert status and status[-1]["data"]["status"] == "succeeded" and status[-1]["data"]["final"] is True
    assert msgs[-1]["event"] == "end" and msgs[-1]["data"]["status"] == "succeeded"
    assert msgs[-1]["id"] == str(everything[-1]["id"])


def test_stream_resumes_after_last_event_id(service_stack, tenant_a, adapted):
    st, job_id = service_stack, adapted["job"]["id"]
    ids = [e["id"] for e in all_events(st, tenant_a, job_id)]
    msgs = stream(st, tenant_a, job_id, headers={"Last-Event-ID": str(ids[2])})
    assert [int(m["id"]) for m in msgs if m.get("event") == "event"] == ids[3:]
    msgs = stream(st, tenant_a, job_id, params={"after": ids[-2]})  # the same for clients that cannot set headers
    assert [int(m["id"]) for m in msgs if m.get("event") == "event"] == ids[-1:]
    for bad in ("abc", "-3", "1.5", "1e3"):
        r = st.client.get(f"/v1/adaptations/{job_id}/stream", headers={**st.auth(tenant_a), "Last-Event-ID": bad})
        assert r.status_code == 422 and r.json()["error"] == "bad_last_event_id", r.text
    msgs = stream(st, tenant_a, job_id, headers={"Last-Event-ID": str(10**12)})  # past every event: none replayed
    assert not [m for m in msgs if m.get("event") == "event"] and msgs[-1]["event"] == "end"


def test_stream_ends_when_a_job_is_cancelled(service_stack, tenant_a):
    st = service_stack
    r = st.upload_faces(tenant_a, face_files(2, offset=40), name="stream-cancel")
    assert r.status_code == 201, r.text
    r = st.client.post("/v1/adaptations", json={"dataset_id": r.json()["id"], "name": f"sc-{uuid.uuid4().hex[:8]}"},
                       headers=st.auth(tenant_a))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    r = st.client.post(f"/v1/adaptations/{job_id}/cancel", headers=st.auth(tenant_a))
    assert r.status_code == 202, r.text
    st.wait_job(tenant_a, job_id)
    msgs = stream(st, tenant_a, job_id)
    assert msgs[-1]["event"] == "end" and msgs[-1]["data"]["status"] == "cancelled"
    assert any(m.get("event") == "event" and "cancel" in m["data"]["message"] for m in msgs)


# ------------------------------------------------------------------------------------------------ in-process
@pytest.fixture()
def quiet_db(tmp_path):
    """A fresh PostgreSQL database (migrated) that no worker watches, and this process's settings pointing at it with
    a fast stream (poll 0.1 s, heartbeat 0.3 s, at most 2 s) and fast webhook retries; restored afterwards."""
    import os

    import psycopg

    from service.settings import get_settings
    from test_service_harness import PG_ADMIN

    name = f"faceadapt_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    env = {"FACEADAPT_HOME": str(tmp_path), "FACEADAPT_DATABASE_URL": url, "FACEADAPT_REQUIRE_KEYS": "true",
           "FACEADAPT_STREAM_POLL_S": "0.1", "FACEADAPT_STREAM_HEARTBEAT_S": "0.3", "FACEADAPT_STREAM_MAX_S": "2",
           "FACEADAPT_WEBHOOK_RETRY_BASE_S": "0.05", "FACEADAPT_WEBHOOK_MAX_ATTEMPTS": "2",
           "FACEADAPT_WEBHOOK_TIMEOUT_S": "2"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    get_settings.cache_clear()
    from service.db import migrate

    migrate(url)
    try:
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_settings.cache_clear()
        from service.db import dispose_engines

        dispose_engines()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def running_job(webhook: str | None = None, events: list[str] | None = None) -> tuple[str, str]:
    """A tenant with a key and a job that is 'finetuning' with no worker behind it (nothing will change it)."""
    from service.db import session
    from service.rows import Job, JobEvent
    from service.tenants import create_key, find_tenant

    with session() as s:
        key = create_key(s, "quiet")
        tenant = find_tenant(s, "quiet")
        job = Job(tenant_id=tenant.id, base_model="m", name=f"j-{uuid.uuid4().hex[:6]}", status="finetuning",
                  stage="finetune", progress_done=3, progress_total=10)
        s.add(job)
        s.flush()
        s.add(JobEvent(job_id=job.id, stage="finetune", message="finetune: started"))
        s.commit()
        job.webhook_url, job.webhook_events = webhook, events  # from now on (no change of the job itself)
        s.commit()
        return key, job.id


def test_stream_sends_heartbeats_and_closes_after_its_longest_time(quiet_db):
    from fastapi.testclient import TestClient

    from app.main import create_app

    key, job_id = running_job()
    with TestClient(create_app(run_startup=False)) as client:
        with client.stream("GET", f"/v1/adaptations/{job_id}/stream", headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status_code == 200 and r.headers["cache-control"] == "no-cache"
            msgs = read_sse(r)
    kinds = [m.get("event") or ("heartbeat" if m.get("comment") == "heartbeat" else "other") for m in msgs]
    assert kinds.count("status") == 1 and kinds.count("event") == 1, kinds  # nothing changed: one status only
    assert kinds.count("heartbeat") >= 3, kinds  # 2 s of silence at one heartbeat per 0.3 s
    assert "end" not in kinds  # the job goes on: the stream closed at stream_max_s, the client reconnects
    status = next(m for m in msgs if m.get("event") == "status")
    assert status["data"]["progress"]["done"] == 3 and status["data"]["status"] == "finetuning"
    assert status["id"] == next(m for m in msgs if m.get("event") == "event")["id"]
