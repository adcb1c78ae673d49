"""Bounded load test of a running FaceAdapt API on this machine (loopback only): N concurrent clients for T seconds,
each looping over a mix of restores with several models, dataset uploads (then deleted) and job polling.

    faceadapt serve &                                              # embedded mode on 127.0.0.1:8000
    python bench/load.py                                           # 50 clients, 60 s, 3 restorer models
    python bench/load.py --clients 10 --duration 10 --key fa_...  # short run against a stack that needs keys

Models: the first 3 restorers of GET /v1/models (the default first) or --models; with fewer, --prepare-models runs
tiny adaptations through the API first (dataset upload + job + polling) to get more. The jobs created then, and any
job of the tenant, are what the clients poll.

Prints per operation: requests, errors (5xx, unexpected 4xx, connection failures), hangs (no answer within
--timeout s), p50/p99/max latency; then the totals. Exit status 1 when there was any error or hang.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from urllib.parse import urlparse

import httpx

from timing import pct  # the benches' one percentile

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FACES = REPO.parent / "shared" / "data" / "faces-utk200"
TINY_PARAMS = {  # the service tests' tiny engine configuration: seconds on a CPU
    "pseudo": {"start": 4, "respacing": "10", "constrain_until": 2, "down_N": 4, "batch_size": 4},
    "finetune": {"steps": 3, "batch_size": 2, "ckpt_every": 1, "log_every": 1, "d_channels": 16},
    "eval_fraction": 0.25, "hq_count": 8, "device": "cpu",
    "quality_gate": False,  # 3 fine-tuning steps: the models only need to exist, not to beat their base
}
# operation -> weight in the mix
MIX = {"restore": 70, "restore_detect": 10, "dataset": 5, "poll_job": 10, "list_jobs": 5}
EXPECTED = {"restore": {200}, "restore_detect": {200}, "dataset": {201, 422}, "poll_job": {200}, "list_jobs": {200},
            "delete_dataset": {204, 404, 409}}


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"error: {url} is not a loopback address; this load test only targets this machine")


class Stats:
    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.errors: dict[str, list[str]] = defaultdict(list)
        self.hangs: dict[str, int] = defaultdict(int)

    def record(self, op: str, seconds: float, status: int | None, note: str = "") -> None:
        self.latency[op].append(seconds)
        self.statuses[op][str(status)] += 1
        if status is None or status not in EXPECTED[op]:
            self.errors[op].append(f"{status} {note}"[:300])


class Load:
    def __init__(self, args, faces: list[bytes]):
        self.args, self.faces = args, faces
        self.stats = Stats()
        self.jobs: list[str] = []
        self.models: list[str] = []
        self.headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}

    async def call(self, client: httpx.AsyncClient, op: str, method: str, url: str, **kw) -> httpx.Response | None:
        t0 = time.perf_counter()
        try:
            r = await asyncio.wait_for(client.request(method, url, headers=self.headers, **kw), self.args.timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            self.stats.hangs[op] += 1
            self.stats.latency[op].append(time.perf_counter() - t0)
            return None
        except httpx.HTTPError as exc:
            self.stats.record(op, time.perf_counter() - t0, None, f"{type(exc).__name__}: {exc}")
            return None
        self.stats.record(op, time.perf_counter() - t0, r.status_code, r.text[:200] if r.status_code >= 300 else "")
        return r

    async def one(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        op = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        if op in ("poll_job", "list_jobs") and not self.jobs:
            op = "list_jobs"
        if op in ("restore", "restore_detect"):
            model = rng.choice(self.models)
            data = {"model": model, "aligned": "true" if op == "restore" else "false"}
            await self.call(client, op, "POST", "/v1/restore", data=data,
                            files={"image": ("face.jpg", rng.choice(self.faces), "image/jpeg")})
        elif op == "dataset":
            files = [("files", (f"f{i}.jpg", f, "image/jpeg")) for i, f in enumerate(rng.sample(self.faces, 3))]
            r = await self.call(client, op, "POST", "/v1/datasets", files=files, data={"name": "load"})
            if r is not None and r.status_code == 201:
                await self.call(client, "delete_dataset", "DELETE", f"/v1/datasets/{r.json()['id']}")
        elif op == "poll_job":
            await self.call(client, op, "GET", f"/v1/adaptations/{rng.choice(self.jobs)}")
        else:
            await self.call(client, op, "GET", "/v1/adaptations")

    async def client_loop(self, i: int, deadline: float) -> None:
        rng = random.Random(self.args.seed + i)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=self.args.url, timeout=None, limits=limits) as client:
            while time.monotonic() < deadline:
                await self.one(client, rng)

    async def prepare(self) -> None:
        async with httpx.AsyncClient(base_url=self.args.url, timeout=120, headers=self.headers) as c:
            r = await c.get("/v1/models")
            r.raise_for_status()
            restorers = [m["name"] for m in r.json() if m["kind"] == "restorer"]
            self.models = self.args.models.split(",") if self.args.models else restorers[: self.args.n_models]
            r = await c.get("/v1/adaptations")
            r.raise_for_status()
            self.jobs = [j["id"] for j in r.json()][:20]
            missing = self.args.n_models - len(self.models)
            if missing > 0 and self.args.prepare_models:
                print(f"preparing {missing} model(s) with tiny adaptations ...", flush=True)
                files = [("files", (f"p{i}.jpg", f, "image/jpeg")) for i, f in enumerate(self.faces[:8])]
                r = await c.post("/v1/datasets", files=files, data={"name": "load-prepare"})
                r.raise_for_status()
                ds = r.json()["id"]
                stamp = int(time.time())
                for k in range(missing):
                    r = await c.post("/v1/adaptations", json={"dataset_id": ds, "name": f"load-{stamp}-{k}",
                                                              "params": TINY_PARAMS})
                    r.raise_for_status()
                    job = r.json()["id"]
                    self.jobs.insert(0, job)
                    t0 = time.time()
                    while (j := (await c.get(f"/v1/adaptations/{job}")).json())["status"] not in (
                            "succeeded", "failed", "cancelled"):
                        if time.time() - t0 > 600:
                            sys.exit(f"error: preparation job {job} still {j['status']} after 600 s")
                        await asyncio.sleep(1)
                    if j["status"] != "succeeded":
                        sys.exit(f"error: preparation job {job} {j['status']}: {j.get('error')}")
                    self.models.append(f"load-{stamp}-{k}")
                    print(f"  model load-{stamp}-{k} ready in {time.time() - t0:.0f} s", flush=True)
            if len(self.models) < self.args.n_models:
                print(f"warning: only {len(self.models)} restorer model(s) visible: {self.models}", flush=True)

    async def model_loads(self) -> float | None:
        """faceadapt_model_loads_total of the API process, when /metrics is readable."""
        try:
            async with httpx.AsyncClient(base_url=self.args.url, timeout=30, headers=self.headers) as c:
                r = await c.get("/metrics")
            if r.status_code != 200:
                return None
            return sum(float(line.split()[-1]) for line in r.text.splitlines()
                       if line.startswith("faceadapt_model_loads_total"))
        except (httpx.HTTPError, ValueError):
            return None

    async def run(self) -> int:
        await self.prepare()
        loads0 = await self.model_loads()
        print(f"{self.args.clients} clients for {self.args.duration:g} s against {self.args.url}; models "
              f"{', '.join(self.models)}; {len(self.jobs)} job(s) to poll; hang = no answer within {self.args.timeout:g} s",
              flush=True)
        t0 = time.monotonic()
        deadline = t0 + self.args.duration
        await asyncio.gather(*(self.client_loop(i, deadline) for i in range(self.args.clients)))
        wall = time.monotonic() - t0
        loads1 = await self.model_loads()
        if loads0 is not None and loads1 is not None:
            print(f"model loads during the run: {loads1 - loads0:g} (from /metrics)")
        return self.report(wall)

    def report(self, wall: float) -> int:
        s = self.stats
        print(f"\n{'operation':<16}{'requests':>9}{'errors':>8}{'hangs':>7}{'p50 s':>9}{'p99 s':>9}{'max s':>9}  statuses")
        all_lat, n_err, n_hang = [], 0, 0
        for op in list(MIX) + ["delete_dataset"]:
            lat = s.latency.get(op, [])
            if not lat and not s.hangs.get(op):
                continue
            err, hang = len(s.errors.get(op, [])), s.hangs.get(op, 0)
            n_err, n_hang = n_err + err, n_hang + hang
            all_lat += lat
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(s.statuses[op].items()))
            print(f"{op:<16}{len(lat):>9}{err:>8}{hang:>7}{pct(lat, .5):>9.3f}{pct(lat, .99):>9.3f}{max(lat):>9.3f}  {statuses}")
        print(f"{'all':<16}{len(all_lat):>9}{n_err:>8}{n_hang:>7}{pct(all_lat, .5):>9.3f}{pct(all_lat, .99):>9.3f}"
              f"{max(all_lat, default=float('nan')):>9.3f}")
        print(f"\n{len(all_lat)} requests in {wall:.1f} s ({len(all_lat) / wall:.1f}/s), {n_err} errors, {n_hang} hangs; "
              f"mean {statistics.fmean(all_lat) if all_lat else float('nan'):.3f} s")
        for op, errs in s.errors.items():
            for e in errs[:5]:
                print(f"  error {op}: {e}")
        return 1 if n_err or n_hang else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", default=None, help="API key (not needed for faceadapt serve on 127.0.0.1)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--timeout", type=float, default=60.0, help="a request with no answer after this many s is a hang")
    ap.add_argument("--models", default=None, help="comma-separated restorers (default: the first --n-models visible)")
    ap.add_argument("--n-models", type=int, default=3)
    ap.add_argument("--prepare-models", action=argparse.BooleanOptionalAction, default=True,
                    help="run tiny adaptations first when fewer than --n-models restorers are visible")
    ap.add_argument("--faces", type=Path, default=DEFAULT_FACES, help="folder of face images to send")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    check_loopback(args.url)
    files = sorted(p for p in args.faces.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:64]
    if len(files) < 8:
        sys.exit(f"error: need at least 8 face images in {args.faces}")
    return asyncio.run(Load(args, [p.read_bytes() for p in files]).run())


if __name__ == "__main__":
    sys.exit(main())
