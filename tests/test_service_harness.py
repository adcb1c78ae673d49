"""The service test stack: a fresh PostgreSQL database, a private Redis key prefix, a real uvicorn API process and
real Celery worker processes, all on 127.0.0.1. Test modules use it with `pytest_plugins = ["test_service_harness"]`.

Nothing of our own is mocked. When the bundled small default models are not in the repo yet, randomly initialised
64x64 stand-ins with the same names are registered in a temporary zoo (FACEADAPT_MODELS_DIR).
"""
from __future__ import annotations

import io
import zipfile
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FACEADAPT_SHARED", REPO.parent / "shared")).resolve()
PY = sys.executable
PG_ADMIN = os.environ.get("FACEADAPT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("FACEADAPT_TEST_REDIS", "redis://127.0.0.1:6379/11")

# A tiny engine configuration: a few diffusion steps and fine-tuning steps (CPU friendly)
TINY_PARAMS = {
    "pseudo": {"start": 4, "respacing": "10", "constrain_until": 2, "down_N": 4, "batch_size": 4,
               "schedule": "ancestral"},  # 5 network calls a face (the bundled prior's default DDIM makes 16)
    "finetune": {"steps": 3, "batch_size": 2, "ckpt_every": 1, "log_every": 1, "d_channels": 16},
    "eval_fraction": 0.25, "hq_count": 8, "device": "cpu",
    # stand-in models: the quality gate's verdict on them is noise, and these tests are about the service
    "quality_gate": False,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def face_files(n: int, offset: int = 0) -> list[Path]:
    folder = SHARED / "data" / "faces-utk200"
    files = sorted(folder.iterdir())[offset: offset + n]
    assert len(files) == n, f"need {n} faces in {folder}"
    return files


def ensure_default_models(home: Path, env: dict) -> None:
    """Register random-init 64x64 stand-ins for the default models when the zoo does not ship them (yet)."""
    code = r'''
import sys, torch
from restoration.models.zoo import Zoo, instantiate
from restoration.settings import get_settings
s = get_settings(); zoo = Zoo()
names = {c.name for c in zoo.list()}
torch.manual_seed(0)
if s.default_restorer not in names:
    cfg = dict(img_size=64, patch_size=1, in_chans=3, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=8,
               mlp_ratio=2, sf=8, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv", unshuffle=True,
               unshuffle_scale=8)
    m = instantiate("swinir_face", cfg)
    zoo.register(s.default_restorer, "swinir_face", cfg, m.state_dict(), kind="restorer", input_size=64,
                 value_range=[0, 1], random_init=True, provenance="test stand-in (random init)")
if s.default_prior not in names:
    cfg = dict(image_size=64, in_channels=3, model_channels=32, out_channels=6, attention_resolutions=[16, 8], dropout=0,
               channel_mult=[1, 1, 2], num_res_blocks=[1, 1, 1], conv_resample=True, dims=2, use_fp16=False,
               num_head_channels=32, use_scale_shift_norm=True, resblock_updown=False, use_new_attention_order=False)
    m = instantiate("iddpm_unet", cfg)
    zoo.register(s.default_prior, "iddpm_unet", cfg, m.state_dict(), kind="prior", input_size=64, value_range=[-1, 1],
                 random_init=True, provenance="test stand-in (random init)",
                 extra={"diffusion": {"timestep_respacing": "50"},
                        "pseudo_target_defaults": {"start": 20, "constrain_until": 5, "down_N": 4}})
'''
    subprocess.run([PY, "-c", code], env=env, cwd=REPO, check=True)


class Workers:
    """Real `celery worker` processes (solo pool: the stage runs in the worker's own process)."""

    def __init__(self, env: dict, logdir: Path):
        self.env, self.logdir, self.procs = env, logdir, []

    def start(self) -> subprocess.Popen:
        n = len(self.procs)
        log = open(self.logdir / f"worker-{n}.log", "wb")
        q = f"{self.env['FACEADAPT_QUEUE_DEFAULT']},{self.env['FACEADAPT_QUEUE_GPU']}"
        p = subprocess.Popen(
            [PY, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo", "--concurrency", "1",
             "--prefetch-multiplier", "1", "--loglevel", "INFO", "-Q", q, "-n", f"test{n}-{uuid.uuid4().hex[:6]}@%h",
             "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.procs.append(p)
        return p

    def alive(self) -> list[subprocess.Popen]:
        return [p for p in self.procs if p.poll() is None]

    def kill(self, pid: int) -> None:
        os.killpg(os.getpgid(pid), signal.SIGKILL)
        for p in self.procs:
            if p.pid == pid:
                p.wait()

    def stop(self) -> None:
        for p in self.alive():
            p.send_signal(signal.SIGTERM)
        deadline = time.time() + 20
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(os.getpgid(p.pid), signal.SIGKILL)
                p.wait()


class Stack:
    def __init__(self, url: str, env: dict, home: Path, workers: Workers, db_url: str):
        self.url, self.env, self.home, self.workers, self.db_url = url, env, home, workers, db_url
        self.client = httpx.Client(base_url=url, timeout=120)
        self.metrics_auth = {"Authorization": f"Bearer {env['FACEADAPT_METRICS_TOKEN']}"}

    def admin_key(self, tenant: str) -> str:
        out = subprocess.run([str(Path(PY).parent / "faceadapt"), "keys", "create", "--tenant", tenant], env=self.env,
                             cwd=REPO, capture_output=True, text=True, check=True)
        return out.stdout

    def auth(self, key: str) -> dict:
        return {"Authorization": f"Bearer {key}"}

    def sql(self, query: str, *args):
        import psycopg

        with psycopg.connect(self.db_url.replace("postgresql+psycopg", "postgresql")) as conn:
            return conn.execute(query, args).fetchall()

    def wait_job(self, key: str, job_id: str, until=("succeeded", "failed", "cancelled"), timeout: float = 240,
                 pred=None) -> dict:
        deadline = time.time() + timeout
        while True:
            job = self.client.get(f"/v1/adaptations/{job_id}", headers=self.auth(key)).json()
            if job["status"] in until or (pred is not None and pred(job)):
                return job
            if time.time() > deadline:
                raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s: {json.dumps(job, default=str)[-3000:]}")
            time.sleep(0.5)

    def wait_collected(self, timeout: float = 60) -> None:
        """Wait until every finished job's step outputs have been collected from the blob store (the worker does it
        right after the job ends): blob counts taken afterwards are not disturbed by that clean-up."""
        deadline = time.time() + timeout
        while self.sql("SELECT count(*) FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') "
                       "AND blobs_collected_at IS NULL")[0][0]:
            assert time.time() < deadline, "finished jobs' blobs were not collected"
            time.sleep(0.5)

    def blob_count(self) -> int:
        """Blobs in the stack's storage (S3 bucket or local folder)."""
        if self.env.get("FACEADAPT_STORAGE_BACKEND") == "s3":
            import boto3

            s3 = boto3.client("s3", endpoint_url=self.env["FACEADAPT_S3_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id="test", aws_secret_access_key="test")
            pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.env["FACEADAPT_S3_BUCKET"])
            return sum(len(p.get("Contents", [])) for p in pages)
        return sum(1 for p in (self.home / "storage").rglob("*") if p.is_file())

    def upload_faces(self, key: str, files: list[Path], name: str = "faces") -> httpx.Response:
        parts = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files]
        return self.client.post("/v1/datasets", files=parts, data={"name": name}, headers=self.auth(key))


def start_s3():
    """A local S3-compatible HTTP server (moto), or None when moto is not installed."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        return None
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    server.url = f"http://127.0.0.1:{port}"
    return server


def start_stack(env: dict, home: Path, db_url: str) -> tuple["Stack", subprocess.Popen]:
    """The default models in `home`, an API process and two worker processes on `env` (logs in home/logs); the caller
    waits for the API (`wait_ready`) and stops it all."""
    ensure_default_models(home, env)
    logdir = home / "logs"
    logdir.mkdir()
    workers = Workers(env, logdir)
    api = start_api(env, logdir / "api.log")
    workers.start()
    workers.start()
    return Stack(api.url, env, home, workers, db_url), api


def start_api(env: dict, log_path: Path) -> subprocess.Popen:
    """A real uvicorn API process on 127.0.0.1 (its URL is `proc.url`)."""
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "uvicorn", "--factory", "app.main:create_app", "--host", "127.0.0.1",
                             "--port", str(port)], cwd=REPO, env=env, stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.url = f"http://127.0.0.1:{port}"
    return proc


def wait_ready(proc: subprocess.Popen, log_path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(proc.url + "/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"API did not become ready:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.5)


def stop_api(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def service_stack(tmp_path_factory):
    import psycopg
    import redis

    tag = uuid.uuid4().hex[:10]
    dbname = f"faceadapt_test_{tag}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{dbname}"')
    db_url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{dbname}"
    home = tmp_path_factory.mktemp("faceadapt-home")
    prefix = f"fatest-{tag}:"
    hook_port = free_port()  # webhooks may call a loopback receiver on this port only (tests/test_service_webhooks.py)
    env = dict(os.environ)
    env.update({
        "FACEADAPT_HOME": str(home),
        "FACEADAPT_MODELS_DIR": str(home / "models"),
        "FACEADAPT_DATABASE_URL": db_url,
        "FACEADAPT_BROKER_URL": REDIS_URL,
        "FACEADAPT_BROKER_KEY_PREFIX": prefix,
        "FACEADAPT_QUEUE_DEFAULT": f"fa-{tag}",
        "FACEADAPT_QUEUE_GPU": f"fa-{tag}-gpu",
        "FACEADAPT_REQUIRE_KEYS": "true",
        "FACEADAPT_METRICS_TOKEN": f"metrics-{tag}",  # /metrics is closed without it when keys are required
        "FACEADAPT_HQ_SETS": json.dumps({"utk": str(SHARED / "data" / "faces-utk200")}),  # the only HQ set jobs may name
        "FACEADAPT_FACEXLIB_MODEL_ROOT": str(SHARED / "weights" / "facexlib"),
        "FACEADAPT_SHARED": str(SHARED),
        "FACEADAPT_DEVICE": "cpu",
        "FACEADAPT_MAX_UPLOAD_BYTES": str(3 * 1024 * 1024),
        "FACEADAPT_MAX_IMAGE_PIXELS": str(2_000_000),
        "FACEADAPT_MAX_DATASET_IMAGES": "12",
        "FACEADAPT_MAX_ZIP_ENTRIES": "15",
        "FACEADAPT_MAX_UNPACKED_BYTES": str(2 * 1024 * 1024),
        "FACEADAPT_BATCH_MAX_WAIT_MS": "150",
        "FACEADAPT_BATCH_MAX_SIZE": "8",
        "FACEADAPT_TARGET_SHARDS": "2",
        "FACEADAPT_LEASE_TTL_S": "15",  # a heartbeat thread can starve for seconds on 2 busy cores
        "FACEADAPT_HEARTBEAT_S": "1",
        "FACEADAPT_REAPER_INTERVAL_S": "2",
        "FACEADAPT_TASK_MAX_ATTEMPTS": "3",
        "FACEADAPT_BLOB_GC_INTERVAL_S": "20",  # the workers' blob sweep runs all through the tests
        "FACEADAPT_WEBHOOK_ALLOWED_URLS": f"http://127.0.0.1:{hook_port}/hooks/",
        "FACEADAPT_WEBHOOK_RETRY_BASE_S": "1",
        "FACEADAPT_RATE_LIMIT_PER_MINUTE": "0",  # load and schemathesis runs; rate limits: test_service_reliability.py
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    })
    env.pop("FACEADAPT_STORAGE_DIR", None)
    s3 = start_s3()  # blobs in a real S3 API over HTTP when moto is installed (the embedded test covers local storage)
    if s3 is not None:
        env.update({"FACEADAPT_STORAGE_BACKEND": "s3", "FACEADAPT_S3_BUCKET": f"fa-{tag}", "FACEADAPT_S3_PREFIX": "blobs",
                    "FACEADAPT_S3_ENDPOINT_URL": s3.url, "FACEADAPT_S3_REGION": "us-east-1",
                    "FACEADAPT_S3_ACCESS_KEY_ID": "test", "FACEADAPT_S3_SECRET_ACCESS_KEY": "test"})
    stack, api = start_stack(env, home, db_url)
    stack.webhook_port = hook_port
    try:
        wait_ready(api, home / "logs" / "api.log")
        yield stack
    finally:
        stack.client.close()
        stop_api(api)
        stack.workers.stop()
        if s3 is not None:
            s3.stop()
        if os.environ.get("FACEADAPT_TEST_KEEP"):
            print(f"\nservice test home kept at {home}, database {dbname}")
        else:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        r = redis.Redis.from_url(REDIS_URL)
        for k in r.scan_iter(match=f"{prefix}*"):
            r.delete(k)


@pytest.fixture(scope="session")
def tenant_a(service_stack) -> str:
    return service_stack.admin_key("tenant-a").strip()


@pytest.fixture(scope="session")
def tenant_b(service_stack) -> str:
    return service_stack.admin_key("tenant-b").strip()


@pytest.fixture(scope="session")
def adapted(service_stack, tenant_a):
    """The e2e path up to a registered model: 8 faces uploaded, a tiny adaptation run to success."""
    st = service_stack
    t0 = time.time()
    r = st.upload_faces(tenant_a, face_files(8))
    assert r.status_code == 201, r.text
    ds = r.json()
    r = st.client.post("/v1/adaptations", json={"dataset_id": ds["id"], "base_model": "default", "name": "acme-v1",
                                                 "params": TINY_PARAMS}, headers=st.auth(tenant_a))
    assert r.status_code == 202, r.text
    job = st.wait_job(tenant_a, r.json()["id"])
    return {"dataset": ds, "job": job, "seconds": time.time() - t0}


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    """A zip (deflated) holding `entries` (name -> bytes)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return buf.getvalue()


def png_bytes(w: int, h: int, color=(120, 100, 90)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()
