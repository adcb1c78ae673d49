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

from test_service_harness import REPO, SHARED, TINY_PARAMS, ensure_default_models, face_files, free_port  # noqa: E402

FACEADAPT = str(Path(sys.executable).parent / "faceadapt")


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEADAPT_")}
    env.update({"FACEADAPT_HOME": str(home), "FACEADAPT_MODELS_DIR": str(home / "models"),
                "FACEADAPT_FACEXLIB_MODEL_ROOT": str(SHARED / "weights" / "facexlib"), "FACEADAPT_SHARED": str(SHARED),
                "FACEADAPT_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def test_public_bind_without_keys_is_refused(tmp_path):
    r = subprocess.run([FACEADAPT, "serve", "--host", "0.0.0.0", "--port", str(free_port())], env=_env(tmp_path),
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "FACEADAPT_REQUIRE_KEYS" in r.stderr
    assert not (tmp_path / "faceadapt.db").exists()  # refused before touching anything


def test_embedded_serve_end_to_end(tmp_path):
    env = _env(tmp_path)
    ensure_default_models(tmp_path, env)
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([FACEADAPT, "serve", "--port", str(port)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert proc.stdout.readline().decode().strip() == url  # the URL, printed on stdout
        c = httpx.Client(base_url=url, timeout=120)
        deadline = time.time() + 90
        while True:
            try:
                r = c.get("/readyz")
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        assert r.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok", "default_model": "ok"}
        assert (tmp_path / "faceadapt.db").is_file()
        assert c.get("/docs").status_code == 200 and "/v1/restore" in c.get("/openapi.json").text
        faces = face_files(4, offset=140)
        r = c.post("/v1/datasets", files=[("files", (f.name, f.read_bytes(), "image/jpeg")) for f in faces])
        assert r.status_code == 201, r.text  # no key needed on 127.0.0.1
        r = c.post("/v1/adaptations", json={"dataset_id": r.json()["id"], "name": "local-v1", "params": TINY_PARAMS})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.time() + 240
        while (job := c.get(f"/v1/adaptations/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.time() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "succeeded", job
        r = c.post("/v1/restore", files={"image": ("f.jpg", faces[0].read_bytes(), "image/jpeg")},
                   data={"model": "local-v1", "format": "webp"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/webp", r.text
        worker_pids = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(worker_pids) == 1
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert rc == 0, (tmp_path / "serve.log").read_text()[-3000:]
    for pid in worker_pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
