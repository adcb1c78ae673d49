"""bench/speed.py's service section: one aligned 512 face through POST /v1/restore over real HTTP (uvicorn in a
subprocess on 127.0.0.1, embedded mode in a temporary FACEADAPT_HOME) against the same decode-restore-encode in this
process, and the throughput of concurrent clients with and without micro-batching.
"""
from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from restoration import Restorer, encode_image, load_image
from service.settings import get_settings
from timing import median, pct, row, time_calls

REPO = Path(__file__).resolve().parents[1]
HQ = Path(os.environ.get("FACEADAPT_SHARED", REPO.parent / "shared")) / "data" / "hq512"


def face_bytes() -> bytes:
    """One aligned 512 x 512 face (PNG) from the shared HQ set."""
    for f in sorted(HQ.rglob("*.png")):
        return f.read_bytes()
    raise SystemExit(f"error: no PNG face under {HQ}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`uvicorn --factory app.main:create_app` on 127.0.0.1 in embedded mode, with the given FACEADAPT_* overrides."""

    def __init__(self, home: Path, device: str, **env: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("FACEADAPT_")
                 or k in ("FACEADAPT_SHARED", "FACEADAPT_MODELS_DIR")}
        # the server runs with this process's torch threads, as the in-process path does
        self.env = {**clean, "FACEADAPT_HOME": str(home), "FACEADAPT_DEVICE": device,
                    "FACEADAPT_TORCH_THREADS": str(torch.get_num_threads()),
                    # an API without workers (restores only): ready without one; no per-tenant rate limit on the load
                    "FACEADAPT_READY_REQUIRES_WORKER": "false", "FACEADAPT_RATE_LIMIT_PER_MINUTE": "0", **env}
        self.log = open(home / f"api-{self.port}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app", "--host",
                                      "127.0.0.1", "--port", str(self.port), "--log-level", "warning"],
                                     cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"the API did not start: {Path(self.log.name).read_text()[-2000:]}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def post(client: httpx.Client, data: bytes) -> None:
    r = client.post("/v1/restore", files={"image": ("face.png", data, "image/png")}, data={"aligned": "true"})
    if r.status_code != 200:
        raise RuntimeError(f"POST /v1/restore: {r.status_code} {r.text[:300]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency(srv: "Server", data: bytes, n: int, local=None) -> tuple[list[float], float, list[float]]:
    """Seconds of `n` sequential requests (after 2 warm-up ones), the server's CPU seconds per request (CPU time does
    not grow when other jobs share the machine, wall time does) and, with `local` (the same work in this process),
    its seconds, each call right after one request: paired, so that a slow spell of the machine hits both alike."""
    with httpx.Client(base_url=srv.url, timeout=300) as c:
        time_calls(lambda: post(c, data), 0, warmup=2)
        if local is not None:
            time_calls(local, 0, warmup=2)
        times, local_times, cpu = [], [], 0.0
        for _ in range(n):
            cpu0 = cpu_seconds(srv.proc.pid)
            times += time_calls(lambda: post(c, data), 1, warmup=0)[0]
            cpu += cpu_seconds(srv.proc.pid) - cpu0
            if local is not None:
                local_times += time_calls(local, 1, warmup=0)[0]
    return times, cpu / max(1, n), local_times


def throughput(url: str, data: bytes, clients: int, per_client: int) -> float:
    """Faces/s of `clients` concurrent clients (one connection each) sending `per_client` requests each."""
    def client_loop(_):
        with httpx.Client(base_url=url, timeout=300) as c:
            for _ in range(per_client):
                post(c, data)

    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        t0 = time.perf_counter()
        list(pool.map(client_loop, range(clients)))
        return clients * per_client / (time.perf_counter() - t0)


def in_process(data: bytes, device: str):
    """The API's work without HTTP, as a callable: decode, restore the aligned face with the default restorer, encode
    PNG."""
    settings = get_settings()
    restorer = Restorer.from_zoo(settings.default_restorer, device=device, batch_size=settings.batch_max_size)

    def work():
        img = load_image(data, max_pixels=settings.max_image_pixels)
        res = restorer.restore_image(img, aligned=True, max_faces=settings.max_faces_per_image)
        return encode_image(res.image, "png", png_level=settings.response_png_level)  # as the API encodes

    return work


def section_service(plan) -> list[dict]:
    data = face_bytes()
    device = str(plan.device)
    rows = []
    label = f"one aligned 512 face, {get_settings().default_restorer}, PNG out"
    local = in_process(data, device)
    with tempfile.TemporaryDirectory() as tmp:
        servers = {"micro-batching": {}, "no batching": {"FACEADAPT_BATCH_MAX_SIZE": "1"}}
        http_times, tput = {}, {}
        for name, env in servers.items():
            home = Path(tmp) / name.replace(" ", "-")
            home.mkdir()
            srv = Server(home, device, **env)
            try:
                latency(srv, data, 0)  # the model loads on the first request
                if name == "micro-batching":
                    cpu0 = time.process_time()
                    http_times, http_cpu, proc_times = latency(srv, data, plan.requests, local)
                    proc_cpu = (time.process_time() - cpu0) / max(1, plan.requests)  # the client's share is small
                for k in plan.clients:
                    tput[(name, k)] = throughput(srv.url, data, k, plan.per_client)
                    print(f"  service {name} {k} client(s): {tput[(name, k)]:.2f} faces/s", file=sys.stderr,
                          flush=True)
            finally:
                srv.stop()
    p50_in, p50_http = median(proc_times), median(http_times)
    rows.append(row("service", label, 1, "in process", p50_in, "s p50", p99_s=pct(proc_times, 0.99),
                    n=len(proc_times), cpu_s=proc_cpu))
    rows.append(row("service", label, 1, "HTTP", p50_http, "s p50", p99_s=pct(http_times, 0.99),
                    n=len(http_times), cpu_s=http_cpu, note="cpu_s: the server process's CPU per request"))
    paired = median([h - p for h, p in zip(http_times, proc_times)])
    rows.append(row("service", "HTTP overhead at p50", 1, "HTTP - in process", (p50_http - p50_in) * 1000, "ms",
                    note=f"{(p50_http / p50_in - 1) * 100:+.1f}%; target <= +10% or +5 ms"))
    rows.append(row("service", "HTTP overhead, median of paired differences", 1, "HTTP - in process", paired * 1000,
                    "ms", note="each request timed next to one in-process call (robust to the machine's drift)"))
    for (name, k), v in tput.items():
        rows.append(row("service", f"{label}, {plan.per_client} requests per client", k, name, v, "faces/s",
                        note=f"{k} concurrent client(s)"))
    for name in servers:
        top = max(plan.clients)
        rows.append(row("service", f"throughput {top} clients / 1 client", top, name,
                        tput[(name, top)] / tput[(name, 1)], "x", note="target >= 1.5x with micro-batching"))
    return rows
