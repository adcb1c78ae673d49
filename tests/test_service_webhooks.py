"""Job webhooks on the real test stack: the allow-list (none allowed unless listed), signed deliveries to a loopback
receiver (a tiny http.server in this file), retries with backoff after failures, the tenant's secret and its rotation,
and a job followed live by its server-sent event stream while its webhooks arrive."""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest_plugins = ["test_service_harness"]

from service.jobs import ORDER  # noqa: E402
from service.webhooks import sign, url_allowed, verify  # noqa: E402
from test_service_events import read_sse  # noqa: E402
from test_service_harness import TINY_PARAMS, face_files  # noqa: E402


class Receiver:
    """Records every POST; `fail[path] = n` answers the first n calls on that path with 500."""

    def __init__(self, port: int):
        self.calls: list[dict] = []
        self.fail: dict[str, int] = {}
        self.redirect: dict[str, str] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer.lock:
                    outer.calls.append({"path": self.path, "headers": dict(self.headers), "body": body,
                                        "t": time.monotonic()})
                    failing = outer.fail.get(self.path, 0) > 0
                    if failing:
                        outer.fail[self.path] -= 1
                self.send_response(302 if self.path in outer.redirect else 500 if failing else 204)
                if self.path in outer.redirect:
                    self.send_header("Location", outer.redirect[self.path])
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def on(self, path: str) -> list[dict]:
        with self.lock:
            return [c for c in self.calls if c["path"] == path]

    def wait(self, path: str, pred, timeout: float = 60) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            calls = self.on(path)
            if pred(calls):
                return calls
            assert time.time() < deadline, f"webhook calls on {path}: {[json.loads(c['body']) for c in calls]}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def receiver(service_stack):
    r = Receiver(service_stack.webhook_port)
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(scope="module")
def dataset(service_stack, tenant_a):
    r = service_stack.upload_faces(tenant_a, face_files(4, offset=60), name="webhooks")
    assert r.status_code == 201, r.text
    return r.json()["id"]


def hook(st, path: str) -> str:
    return f"http://127.0.0.1:{st.webhook_port}{path}"


def secret(st, key: str) -> str:
    r = st.client.get("/v1/webhook-secret", headers=st.auth(key))
    assert r.status_code == 200, r.text
    return r.json()["secret"]


# ------------------------------------------------------------------------------------------------ pure functions
def test_allow_list_matches_origin_and_path_prefix():
    allowed = ["https://hooks.example.com/fa/", "http://127.0.0.1:9000/hooks"]
    assert url_allowed("https://hooks.example.com/fa/job", allowed)
    assert url_allowed("https://HOOKS.example.com:443/fa/", allowed)
    assert url_allowed("http://127.0.0.1:9000/hooks/x?y=1", allowed)
    assert url_allowed("http://127.0.0.1:9000/hooks", allowed)
    for url in ("http://hooks.example.com/fa/job", "https://hooks.example.com:8443/fa/job",
                "https://hooks.example.com/fab", "https://hooks.example.com.evil.net/fa/x",
                "http://127.0.0.1:9001/hooks/x", "http://127.0.0.1:9000/hooksx", "http://localhost:9000/hooks/x",
                "http://169.254.169.254/latest/meta-data/"):
        assert not url_allowed(url, allowed), url
    assert not url_allowed("https://hooks.example.com/fa/job", [])


def test_signature_verifies_and_refuses_tampering_and_replays():
    body = b'{"type":"completed"}'
    header = sign(["k-new", "k-old"], 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=") and header.count("v1=") == 2
    assert verify("k-new", header, body, now=1_700_000_010)
    assert verify("k-old", header, body, now=1_700_000_010)  # during a rotation's grace period
    assert not verify("k-other", header, body, now=1_700_000_010)
    assert not verify("k-new", header, body + b" ", now=1_700_000_010)
    assert not verify("k-new", header, body, now=1_700_001_000)  # too old: a replay


# ------------------------------------------------------------------------------------------------ the API
@pytest.mark.parametrize("extra,status,code", [
    ({"webhook": "http://127.0.0.1:1/hooks/x"}, 403, "webhook_not_allowed"),  # another port
    ({"webhook": "http://169.254.169.254/latest/meta-data/"}, 403, "webhook_not_allowed"),
    ({"webhook": "PORT/other"}, 403, "webhook_not_allowed"),  # the receiver's port, outside the allowed path
    ({"webhook": "http://user:pw@127.0.0.1/hooks/x"}, 403, "webhook_not_allowed"),
    ({"webhook": "http://[::1/hooks/x"}, 403, "webhook_not_allowed"),
    ({"webhook": "ftp://127.0.0.1/hooks/x"}, 422, "invalid_request"),  # the schema's pattern
    ({"webhook": "not a url"}, 422, "invalid_request"),
    ({"webhook_events": ["completed"]}, 422, "invalid_request"),  # events without a URL
    ({"webhook": "PORT/hooks/x", "webhook_events": ["bogus"]}, 422, "invalid_request"),
    ({"webhook": "PORT/hooks/x", "webhook_events": []}, 422, "invalid_request"),
])
def test_refused_webhooks_are_4xx_with_a_reason(service_stack, tenant_a, dataset, extra, status, code):
    st = service_stack
    if extra.get("webhook", "").startswith("PORT"):
        extra = {**extra, "webhook": hook(st, extra["webhook"][4:])}
    r = st.client.post("/v1/adaptations", json={"dataset_id": dataset, "name": f"wr-{uuid.uuid4().hex[:8]}", **extra},
                       headers=st.auth(tenant_a))
    assert r.status_code == status, r.text
    assert r.json()["error"] == code and r.json()["detail"]


def test_secret_is_per_tenant_and_rotates(service_stack, tenant_a, tenant_b):
    st = service_stack
    a1, b1 = secret(st, tenant_a), secret(st, tenant_b)
    assert a1 != b1 and a1.startswith("whsec_") and secret(st, tenant_a) == a1
    r = st.client.post("/v1/webhook-secret/rotate", headers=st.auth(tenant_b))
    assert r.status_code == 200, r.text
    assert r.json()["secret"] not in (b1, a1) and r.json()["previous_valid_until"]
    assert secret(st, tenant_b) == r.json()["secret"] and secret(st, tenant_a) == a1
    assert st.client.get("/v1/webhook-secret").status_code == 401


def test_cancelled_job_calls_back_signed_and_retries_with_backoff(service_stack, tenant_a, dataset, receiver):
    """The receiver fails twice: the same delivery (same id, same body) comes a third time, each retry later than the
    one before (backoff 1 s, then 2 s on the test stack); the signature checks with the tenant's secret."""
    st = service_stack
    path = f"/hooks/flaky-{uuid.uuid4().hex[:6]}"
    receiver.fail[path] = 2
    r = st.client.post("/v1/adaptations", json={"dataset_id": dataset, "name": f"wc-{uuid.uuid4().hex[:8]}",
                                                 "webhook": hook(st, path)}, headers=st.auth(tenant_a))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert st.client.post(f"/v1/adaptations/{job_id}/cancel", headers=st.auth(tenant_a)).status_code == 202
    calls = receiver.wait(path, lambda c: len(c) >= 3)
    time.sleep(1.5)
    calls = receiver.on(path)
    assert len(calls) == 3, [json.loads(c["body"]) for c in calls]  # default events: only `completed`, once delivered
    ids = {c["headers"]["FaceAdapt-Webhook-Id"] for c in calls}
    assert len(ids) == 1 and len({c["body"] for c in calls}) == 1
    assert calls[1]["t"] - calls[0]["t"] >= 0.9 and calls[2]["t"] - calls[1]["t"] >= 1.9
    body = json.loads(calls[-1]["body"])
    assert body["type"] == "completed" and body["id"] in ids
    assert body["job"]["id"] == job_id and body["job"]["status"] == "cancelled"
    assert calls[-1]["headers"]["FaceAdapt-Webhook-Event"] == "completed"
    assert calls[-1]["headers"]["Content-Type"] == "application/json"
    assert verify(secret(st, tenant_a), calls[-1]["headers"]["FaceAdapt-Signature"], calls[-1]["body"])
    assert not verify("whsec_wrong", calls[-1]["headers"]["FaceAdapt-Signature"], calls[-1]["body"])
    rows = st.sql("SELECT status, attempts, last_error FROM webhook_deliveries WHERE job_id = %s", job_id)
    assert rows == [("delivered", 3, None)]


def test_live_stream_and_webhooks_of_one_job(service_stack, tenant_a, dataset, receiver):
    """One tiny adaptation followed live: the stream shows the status and progress move and ends at success; the
    webhook gets start, every stage, the log lines and completed, all signed."""
    st = service_stack
    path = f"/hooks/live-{uuid.uuid4().hex[:6]}"
    r = st.client.post("/v1/adaptations", json={
        "dataset_id": dataset, "name": f"wl-{uuid.uuid4().hex[:8]}", "params": TINY_PARAMS,
        "webhook": hook(st, path), "webhook_events": ["start", "stage", "logs", "completed"]},
        headers=st.auth(tenant_a))
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    with st.client.stream("GET", f"/v1/adaptations/{job_id}/stream", headers=st.auth(tenant_a), timeout=300) as resp:
        assert resp.status_code == 200
        msgs = read_sse(resp)
    statuses = [m["data"]["status"] for m in msgs if m.get("event") == "status"]
    assert statuses[-1] == "succeeded", statuses
    # status messages are the job as each look saw it (every stream_poll_s): a stage shorter than that may fall
    # between two looks, so the statuses seen must only come in the job's order; every stage shows in the events
    order = ["queued", "preparing", "generating_targets", "finetuning", "evaluating", "succeeded"]
    seen = [s for i, s in enumerate(statuses) if i == 0 or s != statuses[i - 1]]
    assert all(s in order for s in seen) and seen == sorted(seen, key=order.index), statuses
    assert len(seen) >= 3, statuses
    event_stages = {m["data"]["stage"] for m in msgs if m.get("event") == "event"}
    assert {"prepare", "targets", "finetune", "evaluate", "register"} <= event_stages, event_stages
    # progress is sampled the same way: it must move (two values at least) and its stages only go forward
    progress = [(m["data"]["progress"]["stage"], m["data"]["progress"]["done"]) for m in msgs
                if m.get("event") == "status"]
    assert len(set(progress)) >= 2, progress
    stage_order = [None, *ORDER]  # before the first stage, then the engine's stages
    stages_seen = [stage_order.index(s) for s, _ in progress if s in stage_order]
    assert len(stages_seen) == len(progress) and stages_seen == sorted(stages_seen), progress
    assert msgs[-1]["event"] == "end"
    all_ids = [e["id"] for e in st.client.get(f"/v1/adaptations/{job_id}", headers=st.auth(tenant_a))
                        .json()["events"]]
    assert [int(m["id"]) for m in msgs if m.get("event") == "event"] == all_ids

    calls = receiver.wait(path, lambda c: any(json.loads(x["body"])["type"] == "completed" for x in c))
    bodies = [json.loads(c["body"]) for c in calls]
    kinds = [b["type"] for b in bodies]
    assert kinds.count("start") == 1 and kinds.count("completed") == 1
    stages = [b["stage"] for b in bodies if b["type"] == "stage"]
    assert stages[:1] == ["prepare"] and {"prepare", "targets", "finetune", "evaluate", "register"} <= set(stages)
    logs = receiver.wait(path, lambda c: sum(json.loads(x["body"])["type"] == "logs" for x in c) >= len(all_ids))
    assert sum(json.loads(x["body"])["type"] == "logs" for x in logs) == len(all_ids)
    done = next(b for b in bodies if b["type"] == "completed")
    assert done["job"]["status"] == "succeeded" and done["job"]["model_id"]
    key = secret(st, tenant_a)
    assert all(verify(key, c["headers"]["FaceAdapt-Signature"], c["body"]) for c in calls)


# ------------------------------------------------------------------------------------------------ in-process
from test_service_events import quiet_db, running_job  # noqa: E402,F401 - the fixture and its job


def deliveries(job_id: str) -> list:
    from sqlalchemy import select

    from service.db import session
    from service.rows import WebhookDelivery

    with session() as s:
        return list(s.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id)
                              .order_by(WebhookDelivery.created_at)).all())


def test_outbox_rows_live_and_die_with_the_jobs_transaction(quiet_db):
    from service.db import session
    from service.jobs import event, fail
    from service.rows import Job

    _, job_id = running_job("http://127.0.0.1:9/hooks/x", ["stage", "logs", "completed"])
    assert deliveries(job_id) == []  # made before any change
    with session() as s:  # a change rolled back leaves no delivery behind
        job = s.get(Job, job_id)
        fail(s, job, "finetune", "boom")
        s.flush()
        assert len(deliveries(job_id)) == 0  # not visible outside the transaction
        s.rollback()
    assert deliveries(job_id) == []
    with session() as s:
        job = s.get(Job, job_id)
        job.stage = "evaluate"
        event(s, job_id, "evaluate: started", "evaluate")
        fail(s, job, "evaluate", "boom")
        s.commit()
    rows = deliveries(job_id)
    kinds = sorted(r.event for r in rows)
    assert kinds == ["completed", "logs", "logs", "stage"], kinds
    done = next(r for r in rows if r.event == "completed")
    assert done.payload["job"]["status"] == "failed" and done.payload["job"]["error"] == "boom"
    assert done.status == "pending" and done.url == "http://127.0.0.1:9/hooks/x"


def test_delivery_retries_then_gives_up_and_never_follows_redirects(quiet_db, tmp_path):
    import os

    from service.settings import get_settings
    from service.webhooks import deliver_due

    port = __import__("test_service_harness").free_port()
    receiver = Receiver(port)
    os.environ["FACEADAPT_WEBHOOK_ALLOWED_URLS"] = f"http://127.0.0.1:{port}/hooks/"
    get_settings.cache_clear()
    try:
        receiver.fail["/hooks/down"] = 10
        _, job_id = running_job(f"http://127.0.0.1:{port}/hooks/down", ["completed"])
        from service.db import session
        from service.jobs import fail
        from service.rows import Job

        with session() as s:
            fail(s, s.get(Job, job_id), "finetune", "boom")
            s.commit()
        deadline = time.time() + 20
        while deliveries(job_id)[0].status == "pending":
            assert time.time() < deadline
            deliver_due()
            time.sleep(0.05)
        row = deliveries(job_id)[0]
        assert (row.status, row.attempts, row.last_error) == ("failed", 2, "HTTP 500")  # max attempts 2
        assert len(receiver.on("/hooks/down")) == 2
        # a redirect is a failure, never followed (it could point anywhere)
        receiver.redirect["/hooks/moved"] = f"http://127.0.0.1:{port}/hooks/target"
        _, job3 = running_job(f"http://127.0.0.1:{port}/hooks/moved", ["completed"])
        with session() as s:
            fail(s, s.get(Job, job3), "finetune", "boom")
            s.commit()
        deliver_due()
        row = deliveries(job3)[0]
        assert row.last_error == "HTTP 302" and row.status == "pending" and row.attempts == 1
        assert len(receiver.on("/hooks/moved")) == 1 and not receiver.on("/hooks/target")
        # a URL taken off the allow-list after the job was made is not called at all
        _, job2 = running_job(f"http://127.0.0.1:{port}/hooks/gone", ["completed"])
        os.environ["FACEADAPT_WEBHOOK_ALLOWED_URLS"] = f"http://127.0.0.1:{port}/other/"
        get_settings.cache_clear()
        with session() as s:
            fail(s, s.get(Job, job2), "finetune", "boom")
            s.commit()
        deliver_due()
        row = deliveries(job2)[0]
        assert row.status == "failed" and "no longer allowed" in row.last_error and not receiver.on("/hooks/gone")
    finally:
        os.environ.pop("FACEADAPT_WEBHOOK_ALLOWED_URLS", None)
        get_settings.cache_clear()
        receiver.server.shutdown()
        receiver.server.server_close()
