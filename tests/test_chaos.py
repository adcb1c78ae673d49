"""Chaos: workers SIGKILLed in every stage, the broker and the database restarted mid-job, and the embedded
`faceadapt serve` with its worker killed (or itself killed).

The stage kills and restarts run on a PRIVATE stack: a PostgreSQL cluster made with initdb/pg_ctl under /tmp and a
redis-server (append-only file, as in docker-compose.yml) on their own ports, so the shared instances other tests
use are never restarted; a real uvicorn API and real Celery workers, nothing mocked. A worker is frozen (SIGSTOP)
the moment the database shows it holding a step of the stage, checked to still hold it, then SIGKILLed: the kill
lands inside the stage. Every job must end `succeeded` with exactly one model and events saying what happened.
"""
from __future__ import annotations

import copy
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytest_plugins = ["test_service_harness"]

from test_service_harness import (SHARED, TINY_PARAMS, ensure_default_models, start_stack,  # noqa: E402
                                  face_files, free_port, stop_api, wait_ready)

STAGES = ["prepare", "targets", "finetune", "evaluate", "register"]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


class PrivatePostgres:
    """A throw-away PostgreSQL cluster (initdb under /tmp, its own port, run as the `postgres` user when we are
    root: initdb refuses root)."""

    def __init__(self):
        self.bin = _pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="fa-chaos-pg-"))
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, self.user)
        self._run(str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "-E", "UTF8")
        self.start()
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "faceadapt")
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/faceadapt"

    def _run(self, *cmd: str) -> None:
        if self.user:
            cmd = ("runuser", "-u", self.user, "--") + cmd
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-l", str(self.dir / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateRedis:
    """A redis-server of our own (append-only file: queued messages survive a restart, as in docker-compose.yml)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="fa-chaos-redis-"))
        self.port = free_port()
        self.proc = None
        self.start()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                                      str(self.dir), "--appendonly", "yes", "--save", ""],
                                     stdout=open(self.dir / "log", "ab"), stderr=subprocess.STDOUT)
        import redis

        deadline = time.time() + 30
        while True:
            try:
                redis.Redis(port=self.port, socket_timeout=2).ping()
                return
            except redis.RedisError:
                assert time.time() < deadline and self.proc.poll() is None, (self.dir / "log").read_text()[-2000:]
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)  # a clean shutdown: the append-only file is synced
        self.proc.wait(timeout=30)

    def destroy(self) -> None:
        if self.proc.poll() is None:
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def chaos(tmp_path_factory):
    if _pg_bin() is None or shutil.which("redis-server") is None:
        pytest.fail("the chaos tests need PostgreSQL's binaries (/usr/lib/postgresql/*/bin) and redis-server")
    pg, rd = PrivatePostgres(), PrivateRedis()
    home = tmp_path_factory.mktemp("chaos-home")
    tag = uuid.uuid4().hex[:8]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEADAPT_")}
    env.update({
        "FACEADAPT_HOME": str(home), "FACEADAPT_MIN_ADAPT_IMAGES": "2", "FACEADAPT_MODELS_DIR": str(home / "models"),
        "FACEADAPT_DATABASE_URL": pg.url, "FACEADAPT_BROKER_URL": rd.url,
        "FACEADAPT_QUEUE_DEFAULT": f"chaos-{tag}", "FACEADAPT_QUEUE_GPU": f"chaos-{tag}-gpu",
        "FACEADAPT_REQUIRE_KEYS": "true", "FACEADAPT_METRICS_TOKEN": f"m-{tag}",
        "FACEADAPT_HQ_SETS": '{"utk": "%s"}' % (SHARED / "data" / "faces-utk200"),
        "FACEADAPT_FACEXLIB_MODEL_ROOT": str(SHARED / "weights" / "facexlib"), "FACEADAPT_SHARED": str(SHARED),
        "FACEADAPT_DEVICE": "cpu", "FACEADAPT_TARGET_SHARDS": "2",
        "FACEADAPT_LEASE_TTL_S": "8", "FACEADAPT_HEARTBEAT_S": "1", "FACEADAPT_REAPER_INTERVAL_S": "1",
        "FACEADAPT_WORKER_TTL_S": "10", "FACEADAPT_TASK_MAX_ATTEMPTS": "4", "FACEADAPT_BLOB_GC_INTERVAL_S": "3600",
        "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
    })
    st, api = start_stack(env, home, pg.url)
    st.pg, st.redis = pg, rd
    try:
        wait_ready(api, home / "logs" / "api.log", timeout=180)
        st.key = st.admin_key("chaos").strip()
        yield st
    finally:
        st.client.close()
        stop_api(api)
        st.workers.stop()
        rd.destroy()
        pg.destroy()


def _sql(st, query, *args, timeout=120):
    """st.sql, retried while the database restarts."""
    import psycopg

    deadline = time.time() + timeout
    while True:
        try:
            return st.sql(query, *args)
        except psycopg.OperationalError:
            assert time.time() < deadline
            time.sleep(0.5)


def _start_job(st, name, params, n=8, offset=0) -> str:
    r = st.upload_faces(st.key, face_files(n, offset=offset), name=name)
    assert r.status_code == 201, r.text
    r = st.client.post("/v1/adaptations", json={"dataset_id": r.json()["id"], "name": name, "params": params},
                       headers=st.auth(st.key))
    assert r.status_code == 202, r.text
    return r.json()["id"]


def _wait_final(st, job_id, timeout=600) -> str:
    deadline = time.time() + timeout
    while True:
        status = _sql(st, "SELECT status FROM jobs WHERE id = %s", job_id)[0][0]
        if status in ("succeeded", "failed", "cancelled"):
            return status
        assert time.time() < deadline, f"job {job_id} still {status}"
        time.sleep(0.5)


def _events(st, job_id) -> list[str]:
    return [m for (m,) in _sql(st, "SELECT message FROM job_events WHERE job_id = %s ORDER BY id", job_id)]


def _kill_in_stage(st, job_id: str, stage: str, timeout: float = 300) -> str:
    """Freeze the worker holding a step of `stage` (SIGSTOP), check it still holds it, SIGKILL it; start a new
    worker. Returns the killed worker's id."""
    deadline = time.time() + timeout
    while True:
        assert time.time() < deadline, f"{stage} never seen running: {_events(st, job_id)}"
        rows = st.sql("SELECT lease_owner, shard FROM job_steps WHERE job_id = %s AND stage = %s AND status = 'running'"
                      " ORDER BY shard", job_id, stage)
        alive = {p.pid for p in st.workers.alive()}
        for owner, shard in rows:
            pid = int(owner.rsplit(":", 1)[1])
            if pid not in alive:
                continue
            os.kill(pid, signal.SIGSTOP)
            now = st.sql("SELECT status, lease_owner FROM job_steps WHERE job_id = %s AND stage = %s AND shard = %s",
                         job_id, stage, shard)
            if now == [("running", owner)]:
                st.workers.kill(pid)  # SIGKILL, inside the stage
                st.workers.start()
                return owner
            os.kill(pid, signal.SIGCONT)  # it had just finished: wait for the next chance
        status = st.sql("SELECT status FROM jobs WHERE id = %s", job_id)[0][0]
        assert status not in ("succeeded", "failed", "cancelled"), (stage, status, _events(st, job_id))
        time.sleep(0.01)


def _one_model(st, job_id, name):
    assert _sql(st, "SELECT count(*) FROM models WHERE job_id = %s", job_id)[0][0] == 1
    assert _sql(st, "SELECT count(*) FROM models WHERE name = %s", name)[0][0] == 1


def test_sigkill_in_every_stage(chaos):
    st = chaos
    params = copy.deepcopy(TINY_PARAMS)
    params["finetune"].update(steps=6, ckpt_every=2)
    job_id = _start_job(st, "chaos-kill", params)
    killed = {stage: _kill_in_stage(st, job_id, stage) for stage in STAGES}
    status = _wait_final(st, job_id)
    events = _events(st, job_id)
    assert status == "succeeded", events
    _one_model(st, job_id, "chaos-kill")
    for stage, owner in killed.items():  # each kill is told: no heartbeat, then taken over by a live worker
        assert any(m.startswith(stage) and f"no heartbeat from {owner}" in m for m in events), (stage, events)
        assert any(m.startswith(stage) and f"previous worker {owner} stopped" in m for m in events), (stage, events)


def _wait_stage(st, job_id, stage, min_done=1, timeout=300):
    deadline = time.time() + timeout
    while not _sql(st, "SELECT 1 FROM job_steps WHERE job_id = %s AND stage = %s AND status = 'running' AND "
                   "done_count >= %s", job_id, stage, min_done):
        assert time.time() < deadline, _events(st, job_id)
        time.sleep(0.2)


@pytest.mark.parametrize("server, name, offset, said", [
    ("redis", "chaos-redis", 10, ("the broker was unreachable", "never queued")),
    ("pg", "chaos-pg", 20, ("the database was unreachable", "retried on")),
])
def test_restart_mid_job(chaos, server, name, offset, said):
    """Redis, or PostgreSQL, stopped for a few heartbeats mid-fine-tune and started again: the job ends succeeded with
    one model, and its events say what happened."""
    st = chaos
    params = copy.deepcopy(TINY_PARAMS)
    params["finetune"].update(steps=40, ckpt_every=5)
    job_id = _start_job(st, name, params, offset=offset)
    _wait_stage(st, job_id, "finetune")
    getattr(st, server).stop()
    time.sleep(4)  # a few heartbeats without it
    getattr(st, server).start()
    status = _wait_final(st, job_id)
    events = _events(st, job_id)
    assert status == "succeeded", events
    _one_model(st, job_id, name)
    assert any(any(w in m for w in said) for m in events), events


# ------------------------------------------------------------------------------------------------ embedded serve
def test_embedded_serve_supervises_its_worker(tmp_path):
    """`faceadapt serve`: a second one on the same home is refused; its worker SIGKILLed mid-fine-tune is restarted
    (/readyz is 503 until the new one is alive) and the job resumes at once (the dead worker's stages are released,
    not left to the 10-minute lease); 12 concurrent job requests on SQLite get at most the quota; a deleted model's
    cached copy goes; SIGKILL of `serve` takes its worker down, and the home can be served again."""
    from test_service_embedded import FACEADAPT, Serve, _env, _gone

    env = _env(tmp_path)
    env.update({"FACEADAPT_WORKER_TTL_S": "5", "FACEADAPT_HEARTBEAT_S": "1", "FACEADAPT_REAPER_INTERVAL_S": "1",
                "FACEADAPT_LEASE_TTL_S": "600"})
    ensure_default_models(tmp_path, env)
    srv = Serve(tmp_path, env)
    try:
        c = srv.client
        assert srv.ready["checks"]["worker"] == "ok" and len(srv.worker_pids) == 1
        second = subprocess.run([FACEADAPT, "serve", "--port", str(free_port())], env=env, cwd=srv.cwd,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "already running on FACEADAPT_HOME" in second.stderr, second.stderr
        faces = face_files(4, offset=150)
        ds = c.post("/v1/datasets", files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in faces])
        assert ds.status_code == 201, ds.text
        ds = ds.json()["id"]
        params = {**TINY_PARAMS, "finetune": {**TINY_PARAMS["finetune"], "steps": 16, "ckpt_every": 2}}
        job_id = c.post("/v1/adaptations", json={"dataset_id": ds, "name": "sup-v1", "params": params}).json()["id"]
        srv.wait_job(job_id, lambda j: j["status"] == "finetuning" and j["progress"]["done"] >= 2)
        old = srv.worker_pids[0]
        os.kill(int(old), signal.SIGKILL)
        deadline = time.time() + 60
        while (r := c.get("/readyz")).status_code == 200:  # no live worker until the new one is up
            assert time.time() < deadline, "readyz stayed 200 with the worker dead"
            time.sleep(0.1)
        assert r.json()["checks"]["worker"] != "ok", r.json()
        deadline = time.time() + 180
        while c.get("/readyz").status_code != 200:
            assert time.time() < deadline, srv.log.read_text()[-3000:]
            time.sleep(0.5)
        new = subprocess.run(["pgrep", "-P", str(srv.proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(new) == 1 and new != srv.worker_pids
        job = srv.wait_job(job_id, lambda j: j["status"] == "succeeded", timeout=300)
        messages = [e["message"] for e in job["events"]]
        assert any(f":{old} died (killed by signal 9)" in m for m in messages), messages
        assert any("previous worker" in m and f":{old} stopped" in m for m in messages), messages
        assert "restarting in" in srv.log.read_text()
        # the quota holds on SQLite under concurrent requests (12 at once, 4 allowed)
        import threading

        codes = []

        def post(i):
            with httpx.Client(base_url=srv.url, timeout=120) as cc:
                codes.append(cc.post("/v1/adaptations", json={"dataset_id": ds, "name": f"q-{i}", "params": TINY_PARAMS})
                             .status_code)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [202] * 4 + [429] * 8, codes
        for j in c.get("/v1/adaptations", params={"limit": 50}).json():
            if j["name"].startswith("q-"):
                c.post(f"/v1/adaptations/{j['id']}/cancel")
        # restoring with the model caches it under HOME/cache/models/<id>; deleting the model removes that copy
        model = next(m for m in c.get("/v1/models").json() if m["name"] == "sup-v1")
        r = c.post("/v1/restore", files={"image": ("f.jpg", faces[0].read_bytes(), "image/jpeg")},
                   data={"model": "sup-v1"})
        assert r.status_code == 200, r.text
        cached = tmp_path / "cache" / "models" / model["id"]
        assert cached.is_dir()
        assert c.delete(f"/v1/models/{model['id']}").status_code == 204
        assert not cached.exists()
    except BaseException:
        srv.ctrl_c()
        raise
    # SIGKILL of serve itself: its worker goes with it (no orphan on the home), and the home can be served again
    worker = subprocess.run(["pgrep", "-P", str(srv.proc.pid)], capture_output=True, text=True).stdout.split()
    os.kill(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait()
    deadline = time.time() + 150
    while not _gone(worker):
        assert time.time() < deadline, f"worker {worker} outlived its serve"
        time.sleep(0.5)
    srv = Serve(tmp_path, env)
    assert srv.ctrl_c() == 0
