"""Issue 10 (security and reliability) on the real stack: HQ sets by name only, bounded job parameters, per-tenant
quotas and max runtime, unique adaptation names, enqueue failures, key revocation, keys enforced by the app factory,
closed /metrics and docs, private CLI models, and the compose file."""
from __future__ import annotations

import concurrent.futures
import copy
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import psycopg
import pytest

pytest_plugins = ["test_service_harness"]

from test_service_harness import PY, REPO, TINY_PARAMS, face_files, free_port, stop_api  # noqa: E402

FACEADAPT = str(Path(PY).parent / "faceadapt")


def _dataset(st, key, n=2, offset=100, name="sec"):
    r = st.upload_faces(key, face_files(n, offset=offset), name=name)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _post(st, key, ds, name, params=None, **kw):
    body = {"dataset_id": ds, "name": name, "params": params if params is not None else TINY_PARAMS}
    return st.client.post("/v1/adaptations", json=body, headers=st.auth(key), **kw)


def _jobs_named(st, name) -> int:
    return st.sql("SELECT count(*) FROM jobs WHERE name = %s", name)[0][0]


def _cancel_all(st, key):
    for j in st.client.get("/v1/adaptations", headers=st.auth(key)).json():
        if j["status"] not in ("succeeded", "failed", "cancelled"):
            st.client.post(f"/v1/adaptations/{j['id']}/cancel", headers=st.auth(key))
    for j in st.client.get("/v1/adaptations", headers=st.auth(key)).json():
        st.wait_job(key, j["id"], timeout=120)


@pytest.fixture(scope="module")
def sec_key(service_stack):
    return service_stack.admin_key("tenant-sec").strip()


@pytest.fixture(scope="module")
def sec_ds(service_stack, sec_key):
    return _dataset(service_stack, sec_key)


# ------------------------------------------------------------------------------------------ item 2: hq_dir
def test_hq_dir_is_refused_only_named_sets(service_stack, sec_key, sec_ds):
    st = service_stack
    for params, field in (({"hq_dir": "/etc"}, "hq_dir"), ({"hq_set": "/etc"}, "hq_set"),
                          ({"hq_set": "nope"}, "hq_set")):
        r = _post(st, sec_key, sec_ds, "hq-probe", params)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["error"] == "bad_params" and body["field"] == field, body
        assert "/etc" not in body["detail"] or field != "hq_dir" or "not accepted" in body["detail"]
    assert _jobs_named(st, "hq-probe") == 0
    # a configured set (FACEADAPT_HQ_SETS={"utk": ...}) is used by name; the worker maps it to the server folder
    params = copy.deepcopy(TINY_PARAMS)
    params["hq_set"] = "utk"
    r = _post(st, sec_key, sec_ds, "hq-named", params)
    assert r.status_code == 202, r.text
    job = st.wait_job(sec_key, r.json()["id"], timeout=300)
    (status, result) = st.sql("SELECT status, result FROM job_steps WHERE job_id = %s AND stage = 'finetune'",
                              job["id"])[0]
    assert status == "done", job  # (whether the adapted model is then registered is not what this checks)
    assert "faces-utk200" in result["hq_source"], result


# ------------------------------------------------------------------------------------------ item 3: bounds
BAD = [
    ({"finetune": {"steps": 1e9}}, "finetune.steps"),
    ({"finetune": {"steps": 10**9}}, "max_finetune_steps"),
    ({"size": 100000}, "size"),
    ({"pseudo": {"batch_size": 10**6}}, "pseudo.batch_size"),
    ({"finetune": {"batch_size": 10**6}}, "finetune.batch_size"),
    ({"finetune": {"d_channels": 10**6}}, "finetune.d_channels"),
    ({"finetune": {"lr": -1}}, "finetune.lr"),
    ({"finetune": {"lr": 0}}, "finetune.lr"),
    ({"device": "meta"}, "device"),
    ({"finetune": {"device": "meta"}}, "finetune.device"),
    ({"eval_fraction": True}, "eval_fraction"),
    ({"seed": -1}, "seed"),
    ({"pseudo": {"respacing": "1000000"}}, "pseudo.respacing"),
    ({"pseudo": {"start": 10**7}}, "pseudo.start"),
    ({"hq_count": 10**9}, "hq_count"),
    ({"max_faces": 10**6}, "max_faces"),
    ({"finetune": {"betas": [0.9, 5]}}, "finetune.betas[1]"),
]


def test_job_parameters_are_bounded(service_stack, sec_key, sec_ds):
    st = service_stack
    for params, field in BAD:
        r = _post(st, sec_key, sec_ds, "bounds", params)
        assert r.status_code == 422, (params, r.text)
        body = r.json()
        if field == "max_finetune_steps":
            assert body["error"] == "limit_exceeded" and body["limit"] == "max_finetune_steps", body
        else:
            assert body["error"] == "bad_params" and body["field"] == field, (params, body)
    # NaN and Infinity (Python's JSON parser reads them) are refused, not fed to the optimiser
    for lit in ("NaN", "Infinity", "-Infinity"):
        raw = '{"dataset_id": "%s", "name": "bounds", "params": {"finetune": {"lr": %s}}}' % (sec_ds, lit)
        r = st.client.post("/v1/adaptations", content=raw, headers={**st.auth(sec_key), "Content-Type": "application/json"})
        assert r.status_code == 422, (lit, r.text)
        assert r.json().get("field") == "finetune.lr" or r.json()["error"] == "invalid_request", r.text
    assert _jobs_named(st, "bounds") == 0


def test_active_job_quota_and_max_runtime(service_stack, sec_key, sec_ds):
    """max_active_jobs_per_tenant (default 4) holds under concurrent POSTs; a job older than max_job_runtime_s is
    failed by the workers' reaper and its running stage stops."""
    st = service_stack
    _cancel_all(st, sec_key)
    long = copy.deepcopy(TINY_PARAMS)
    long["finetune"].update(steps=3000, ckpt_every=100)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda i: _post(st, sec_key, sec_ds, f"quota-{i}", long if i == 0 else TINY_PARAMS),
                           range(6)))
    codes = sorted(r.status_code for r in rs)
    assert codes == [202] * 4 + [429] * 2, [r.text for r in rs]
    refused = next(r.json() for r in rs if r.status_code == 429)
    assert refused["error"] == "limit_exceeded" and refused["limit"] == "max_active_jobs_per_tenant", refused
    ids = {r.json()["name"]: r.json()["id"] for r in rs if r.status_code == 202}
    # keep one long job running, cancel the others; then age the long one past max_job_runtime_s (24 h)
    long_id = ids.pop("quota-0", None)
    for jid in ids.values():
        st.client.post(f"/v1/adaptations/{jid}/cancel", headers=st.auth(sec_key))
    if long_id is None:  # quota-0 lost the race: start it now (a slot is free)
        r = _post(st, sec_key, sec_ds, "quota-long", long)
        assert r.status_code == 202, r.text
        long_id = r.json()["id"]
    st.wait_job(sec_key, long_id, pred=lambda j: j["status"] == "finetuning" and j["progress"]["done"] >= 1,
                until=("succeeded", "failed", "cancelled"), timeout=300)
    st.sql("UPDATE jobs SET created_at = now() - interval '25 hours' WHERE id = %s RETURNING id", long_id)
    job = st.wait_job(sec_key, long_id, timeout=60)
    assert job["status"] == "failed" and "max_job_runtime_s" in job["error"], job
    deadline = time.time() + 60  # the running fine-tune stops (its lease is released), it does not run on
    while st.sql("SELECT status FROM job_steps WHERE job_id = %s AND stage = 'finetune'", long_id)[0][0] == "running":
        assert time.time() < deadline, "the fine-tune kept running after the job failed"
        time.sleep(0.5)
    assert job["progress"]["done"] < 3000


# ------------------------------------------------------------------------------------------ item 4: unique names
def test_concurrent_same_name_creates_one_job(service_stack, sec_key, sec_ds):
    st = service_stack
    _cancel_all(st, sec_key)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(lambda _: _post(st, sec_key, sec_ds, "twin"), range(6)))
    ok = [r for r in rs if r.status_code == 202]
    assert len(ok) == 1, [r.text for r in rs]
    for r in rs:
        if r.status_code != 202:
            assert r.status_code == 409 and r.json()["error"] == "name_taken", r.text
    assert _jobs_named(st, "twin") == 1
    # the database itself refuses a second active job and a second model with one (tenant, name)
    with pytest.raises(psycopg.errors.UniqueViolation):
        st.sql("INSERT INTO jobs (id, tenant_id, base_model, name, params, status, progress_done, progress_total, "
               "num_shards, cancel_requested, metrics, created_at, updated_at) SELECT md5(random()::text)::varchar(32), "
               "tenant_id, base_model, name, params, 'queued', 0, 0, 1, false, '{}', now(), now() FROM jobs WHERE id = %s "
               "RETURNING id", ok[0].json()["id"])
    (tid,) = st.sql("SELECT tenant_id FROM jobs WHERE id = %s", ok[0].json()["id"])[0]
    st.sql("INSERT INTO models (id, tenant_id, name, kind, arch, builtin, sha256, card, files, created_at) "
           "VALUES (md5(random()::text)::varchar(32), %s, 'uniq-model', 'restorer', 'swinir_face', false, '', '{}', '{}', "
           "now()) RETURNING id", tid)
    with pytest.raises(psycopg.errors.UniqueViolation):
        st.sql("INSERT INTO models (id, tenant_id, name, kind, arch, builtin, sha256, card, files, created_at) "
               "VALUES (md5(random()::text)::varchar(32), %s, 'uniq-model', 'restorer', 'swinir_face', false, '', "
               "'{}', '{}', now()) RETURNING id", tid)
    st.sql("DELETE FROM models WHERE name = 'uniq-model' RETURNING id")
    _cancel_all(st, sec_key)
    # the name is free again once the job is final
    r = _post(st, sec_key, sec_ds, "twin")
    assert r.status_code == 202, r.text
    _cancel_all(st, sec_key)


# ------------------------------------------------------------------------------------------ item 5: enqueue fails
def _start_api(env: dict, log: Path, host: str = "127.0.0.1") -> subprocess.Popen:
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", host, "--port",
                             str(port)], cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    proc.port = port
    return proc


def _wait_up(proc, url, log: Path, timeout=120):
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"API did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def test_enqueue_failure_fails_the_job_and_reaper_rescues_unsent(service_stack, sec_key, sec_ds):
    st = service_stack
    _cancel_all(st, sec_key)
    env = dict(st.env, FACEADAPT_BROKER_URL="redis://127.0.0.1:1/11")  # nothing listens there
    log = st.home / "logs" / "api-nobroker.log"
    api = _start_api(env, log)
    url = f"http://127.0.0.1:{api.port}"
    try:
        _wait_up(api, url, log)
        r = httpx.post(url + "/v1/adaptations", json={"dataset_id": sec_ds, "name": "unsent", "params": TINY_PARAMS},
                       headers=st.auth(sec_key), timeout=120)
    finally:
        stop_api(api)
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/json"), r.text
    body = r.json()
    assert body["error"] == "queue_unavailable" and body["job_id"], body
    job = st.client.get(f"/v1/adaptations/{body['job_id']}", headers=st.auth(sec_key)).json()
    assert job["status"] == "failed" and "could not queue" in job["error"], job
    # an API that died between committing a job and sending its message: the job is 'queued', its first step
    # 'pending' (never sent). The workers' reaper sends it once the lease TTL has passed, and the job runs.
    st.sql("UPDATE jobs SET status = 'queued', error = NULL, finished_at = NULL, created_at = now() - interval '1 minute'"
           " WHERE id = %s RETURNING id", body["job_id"])
    job = st.wait_job(sec_key, body["job_id"], until=("succeeded", "failed", "cancelled"),
                      pred=lambda j: j["status"] not in ("queued",), timeout=120)
    assert job["status"] in ("preparing", "generating_targets", "finetuning", "evaluating", "succeeded"), job
    assert any("re-queued by the reaper" in e["message"] for e in job["events"]), job["events"]
    _cancel_all(st, sec_key)  # it runs; no need to finish it


# ------------------------------------------------------------------------------------------ item 8: keys, routes
def test_revoked_key_gets_401(service_stack):
    st = service_stack
    key = st.admin_key("tenant-revoke").strip()
    assert st.client.get("/v1/models", headers=st.auth(key)).status_code == 200
    out = subprocess.run([FACEADAPT, "keys", "list", "--tenant", "tenant-revoke"], env=st.env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    key_id = next(line.split()[0] for line in out.splitlines() if key[:10] in line)
    out = subprocess.run([FACEADAPT, "keys", "revoke", key_id], env=st.env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = st.client.get("/v1/models", headers=st.auth(key))
    assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
    # by the key itself too; an unknown key is an error
    key2 = st.admin_key("tenant-revoke").strip()
    assert subprocess.run([FACEADAPT, "keys", "revoke", key2], env=st.env, cwd=REPO, capture_output=True).returncode == 0
    assert st.client.get("/v1/models", headers=st.auth(key2)).status_code == 401
    assert subprocess.run([FACEADAPT, "keys", "revoke", "fa_nope"], env=st.env, cwd=REPO,
                          capture_output=True).returncode == 2


def test_metrics_and_docs_closed_when_keys_required(service_stack, tenant_a):
    st = service_stack
    assert st.client.get("/metrics").status_code == 401
    assert st.client.get("/metrics", headers=st.auth(tenant_a)).status_code == 401  # a tenant key is not enough
    r = st.client.get("/metrics", headers=st.metrics_auth)
    assert r.status_code == 200 and "faceadapt_http_requests_total" in r.text
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert st.client.get(path).status_code == 401, path
        assert st.client.get(path, headers={"Authorization": "Bearer fa_wrong"}).status_code == 401, path
    assert "/v1/restore" in st.client.get("/openapi.json", headers=st.auth(tenant_a)).json()["paths"]
    assert st.client.get("/healthz").status_code == 200


def _private_model(st, name: str) -> None:
    """A model imported with the CLI into the stack's zoo (FACEADAPT_MODELS_DIR)."""
    src = REPO / "restoration" / "zoo_defaults" / "faceadapt-swinir-small"
    cfg = st.home / f"{name}-config.json"
    cfg.write_text(json.dumps(json.loads((src / "config.json").read_text())["config"]))
    out = subprocess.run([FACEADAPT, "models", "import", str(src / "model.safetensors"), "--arch", "swinir_face",
                          "--name", name, "--config", str(cfg), "--input-size", "64", "--kind", "restorer"],
                         env=st.env, cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_app_factory_enforces_keys_off_loopback_and_cli_models_are_private(service_stack, tenant_a):
    """Plain uvicorn on 0.0.0.0 with FACEADAPT_REQUIRE_KEYS=false: keyless requests are served (as the public
    tenant) only over loopback; over the machine's other address they need a key, and /metrics and the docs are
    closed there. A model imported with the CLI is not published to every tenant."""
    st = service_stack
    addrs = [a for a in subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
             if "." in a and not a.startswith("127.")]
    if not addrs:
        pytest.skip("this machine has no non-loopback IPv4 address")
    _private_model(st, "cli-private")
    env = dict(st.env, FACEADAPT_REQUIRE_KEYS="false")
    env.pop("FACEADAPT_METRICS_TOKEN")
    log = st.home / "logs" / "api-open.log"
    api = _start_api(env, log, host="0.0.0.0")
    local, remote = f"http://127.0.0.1:{api.port}", f"http://{addrs[0]}:{api.port}"
    try:
        _wait_up(api, local, log)
        assert httpx.get(local + "/v1/models", timeout=30).status_code == 200  # loopback: the public tenant
        r = httpx.get(remote + "/v1/models", timeout=30)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", r.text
        assert httpx.get(remote + "/v1/models", headers=st.auth(tenant_a), timeout=30).status_code == 200
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert httpx.get(remote + path, timeout=30).status_code == 401, path
            assert httpx.get(local + path, timeout=30).status_code == 200, path
        # the CLI model is in the zoo but not in anyone's model list, and cannot be used
        names = [m["name"] for m in httpx.get(remote + "/v1/models", headers=st.auth(tenant_a), timeout=30).json()]
        assert "cli-private" not in names and "faceadapt-swinir-small" in names, names
        assert httpx.get(local + "/v1/models/cli-private", timeout=30).status_code == 404
    finally:
        stop_api(api)
    assert st.sql("SELECT count(*) FROM models WHERE name = 'cli-private'")[0][0] == 0
    # published explicitly (FACEADAPT_PUBLIC_MODELS), it is shared
    env["FACEADAPT_PUBLIC_MODELS"] = "cli-private"
    api = _start_api(env, log, host="127.0.0.1")
    try:
        _wait_up(api, f"http://127.0.0.1:{api.port}", log)
        names = [m["name"] for m in httpx.get(f"http://127.0.0.1:{api.port}/v1/models", timeout=30).json()]
        assert "cli-private" in names, names
    finally:
        stop_api(api)
    # and unpublished again on the next start without it
    env.pop("FACEADAPT_PUBLIC_MODELS")
    api = _start_api(env, log, host="127.0.0.1")
    try:
        _wait_up(api, f"http://127.0.0.1:{api.port}", log)
        assert st.sql("SELECT count(*) FROM models WHERE name = 'cli-private'")[0][0] == 0
    finally:
        stop_api(api)
        shutil.rmtree(Path(st.env["FACEADAPT_MODELS_DIR"]) / "cli-private", ignore_errors=True)


def test_compose_does_not_publish_minio_console():
    import yaml

    text = (REPO / "docker-compose.yml").read_text()
    minio = yaml.safe_load(text)["services"]["minio"]
    assert not minio.get("ports"), minio.get("ports")
    assert "--console-address" not in minio["command"]
    assert minio["environment"]["MINIO_BROWSER"] == "off"
    assert minio["environment"]["MINIO_ROOT_PASSWORD"].startswith("${MINIO_ROOT_PASSWORD:?")
    assert "faceadapt-secret" not in text
