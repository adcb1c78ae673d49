"""`faceadapt serve`: the embedded mode (SQLite, local storage, filesystem broker, one local worker, no keys on
127.0.0.1) runs a tiny adaptation end to end and stops cleanly on Ctrl-C, worker included; binding a public
address without keys is refused."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

pytest_plugins = ["test_service_harness"]

from test_service_harness import SHARED, TINY_PARAMS, ensure_default_models, face_files, free_port  # noqa: E402

FACEADAPT = str(Path(sys.executable).parent / "faceadapt")


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEADAPT_")}
    env.update({"FACEADAPT_HOME": str(home), "FACEADAPT_MIN_ADAPT_IMAGES": "2", "FACEADAPT_MODELS_DIR": str(home / "models"),
                "FACEADAPT_FACEXLIB_MODEL_ROOT": str(SHARED / "weights" / "facexlib"), "FACEADAPT_SHARED": str(SHARED),
                "FACEADAPT_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def test_public_bind_without_keys_is_refused(tmp_path):
    (tmp_path / "cwd").mkdir()
    r = subprocess.run([FACEADAPT, "serve", "--host", "0.0.0.0", "--port", str(free_port())], env=_env(tmp_path),
                       cwd=tmp_path / "cwd", capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "FACEADAPT_REQUIRE_KEYS" in r.stderr
    assert not (tmp_path / "faceadapt.db").exists()  # refused before touching anything


class Serve:
    """`faceadapt serve` in its own process group, as a terminal runs it."""

    def __init__(self, home: Path, env: dict):
        self.port = free_port()
        self.log = home / f"serve-{self.port}.log"
        self.cwd = home / "cwd"
        self.cwd.mkdir(exist_ok=True)
        self.proc = subprocess.Popen([FACEADAPT, "serve", "--port", str(self.port)], env=env, cwd=self.cwd,
                                     stdout=subprocess.PIPE, stderr=open(self.log, "wb"), start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"
        assert self.proc.stdout.readline().decode().strip() == self.url  # the URL, printed on stdout
        self.client = httpx.Client(base_url=self.url, timeout=120)
        deadline = time.time() + 90
        while True:
            try:
                r = self.client.get("/readyz")
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.5)
        self.ready = r.json()
        self.worker_pids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()

    def ctrl_c(self, timeout: float = 60) -> int:
        os.killpg(self.proc.pid, signal.SIGINT)  # the terminal sends SIGINT to the whole foreground group
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise

    def wait_job(self, job_id: str, pred, timeout: float = 240) -> dict:
        deadline = time.time() + timeout
        while not pred(job := self.client.get(f"/v1/adaptations/{job_id}").json()):
            assert time.time() < deadline and job["status"] not in ("failed", "cancelled"), job
            time.sleep(0.3)
        return job


def _gone(pids) -> bool:
    return all(not Path(f"/proc/{p}").exists() or "zombie" in Path(f"/proc/{p}/status").read_text().lower() for p in pids)


def test_embedded_serve_end_to_end(tmp_path):
    env = _env(tmp_path)
    ensure_default_models(tmp_path, env)
    srv = Serve(tmp_path, env)
    try:
        c = srv.client
        assert srv.ready["checks"] == {"database": "ok", "broker": "ok", "storage": "ok", "default_model": "ok",
                                   "worker": "ok"}
        assert (tmp_path / "faceadapt.db").is_file() and len(srv.worker_pids) == 1
        assert c.get("/docs").status_code == 200 and "/v1/restore" in c.get("/openapi.json").text
        faces = face_files(4, offset=140)
        r = c.post("/v1/datasets", files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in faces])
        assert r.status_code == 201, r.text  # no key needed on 127.0.0.1
        ds = r.json()["id"]
        r = c.post("/v1/adaptations", json={"dataset_id": ds, "name": "local-v1", "params": TINY_PARAMS})
        assert r.status_code == 202, r.text
        job = srv.wait_job(r.json()["id"], lambda j: j["status"] == "succeeded")
        r = c.post("/v1/restore", files={"image": ("f.jpg", faces[0].read_bytes(), "image/jpeg")},
                   data={"model": "local-v1", "format": "webp"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/webp", r.text
        # a longer job, interrupted by Ctrl-C in the middle of fine-tuning
        params = {**TINY_PARAMS, "finetune": {**TINY_PARAMS["finetune"], "steps": 16, "ckpt_every": 2}}
        job_id = c.post("/v1/adaptations", json={"dataset_id": ds, "name": "local-v2", "params": params}).json()["id"]
        srv.wait_job(job_id, lambda j: j["status"] == "finetuning" and j["progress"]["done"] >= 2)
    finally:
        t0 = time.time()
        rc = srv.ctrl_c()
    assert rc == 0, srv.log.read_text()[-3000:]
    assert time.time() - t0 < 30  # the running stage stopped at its next step, the worker did not finish it
    assert _gone(srv.worker_pids)
    assert not any(srv.cwd.iterdir())  # everything lives under FACEADAPT_HOME, nothing in the working directory
    # the next start picks the job up where it stopped
    srv = Serve(tmp_path, env)
    try:
        job = srv.wait_job(job_id, lambda j: j["status"] == "succeeded")
        assert any("paused and re-queued" in e["message"] for e in job["events"]), job["events"]
        assert any(m["name"] == "local-v2" for m in srv.client.get("/v1/models").json())
    finally:
        assert srv.ctrl_c() == 0
