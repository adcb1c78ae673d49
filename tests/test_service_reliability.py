"""Reliability III (issue 17), in one process on an embedded SQLite home: whole-string names, the dataset name bound,
`size` tied to the models, the job quota under concurrent requests on SQLite, the late cancel, the takeover event,
a dead worker's stages released, deleted models' cache, admission control (pixel budget, rate limits) and zip
entries streamed to disk. The HTTP side (the supervised worker, /readyz, /metrics on a dead broker) is in
tests/test_service_supervision.py."""
from __future__ import annotations

import io
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

pytest_plugins = ["test_service_harness"]

from test_service_harness import SHARED, ensure_default_models, png_bytes, zip_bytes as _zip  # noqa: E402


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """An embedded home (SQLite, local storage, filesystem broker) with the stand-in default models, migrated."""
    import os

    from restoration.settings import get_settings as ml_settings
    from service.db import dispose_engines

    home = tmp_path_factory.mktemp("reliability-home")
    mp = pytest.MonkeyPatch()
    for k in [k for k in os.environ if k.startswith("FACEADAPT_")]:
        mp.delenv(k)
    env = {"FACEADAPT_HOME": str(home), "FACEADAPT_MIN_ADAPT_IMAGES": "2", "FACEADAPT_MODELS_DIR": str(home / "models"), "FACEADAPT_DEVICE": "cpu",
           "FACEADAPT_FACEXLIB_MODEL_ROOT": str(SHARED / "weights" / "facexlib"), "FACEADAPT_SHARED": str(SHARED)}
    for k, v in env.items():
        mp.setenv(k, v)
    ml_settings.cache_clear()
    ensure_default_models(home, {**os.environ, **env})
    from app.main import startup

    startup()
    yield home
    dispose_engines()
    mp.undo()
    ml_settings.cache_clear()


def _tenant(name: str) -> str:
    from service.db import session
    from service.tenants import get_or_create_tenant

    with session() as s:
        t = get_or_create_tenant(s, name)
        s.commit()
        return t.id


def _dataset(tenant_id: str) -> str:
    from service.db import session
    from service.rows import Dataset, ImageRow

    with session() as s:
        ds = Dataset(tenant_id=tenant_id, name="d", image_count=2, face_count=2)
        for i in range(2):
            ds.images.append(ImageRow(position=i, filename=f"{i}.png", blob_key="0" * 64, width=64, height=64, faces=[]))
        s.add(ds)
        s.commit()
        return ds.id


def _job(tenant: str, name: str, params: dict | None = None):
    from service.db import session
    from service.jobs import create_job

    tid = _tenant(tenant)
    ds = _dataset(tid)
    with session() as s:
        return create_job(s, tid, ds, "default", name, params or {"use_prior": False}).id


# ------------------------------------------------------------------------------------------------ names, size
def test_names_are_matched_whole(home):
    from restoration.models import ZooError, check_name
    from service.errors import ServiceError

    for bad in ("evil\n", "ok-name\n", "a\nb", "", "Upper"):
        with pytest.raises(ZooError):
            check_name(bad)
    assert check_name("acme-v1.2_x") == "acme-v1.2_x"
    with pytest.raises(ServiceError) as e:
        _job("names", "evil\n")
    assert e.value.status == 422 and e.value.code == "bad_name"


def test_size_is_tied_to_the_models(home):
    """The 64 px stand-in takes crops up to 128 px: `size` 1024 is refused by the engine's check (API and CLI)."""
    from restoration.adaptation import AdaptConfig, check_cards
    from restoration.models import Zoo
    from service.errors import ServiceError
    from service.settings import get_settings

    card = Zoo().get(get_settings().default_restorer)
    with pytest.raises(ValueError, match="at most 128"):
        check_cards(card, None, AdaptConfig.from_dict({"size": 1024, "use_prior": False}))
    assert check_cards(card, None, AdaptConfig.from_dict({"size": 128, "use_prior": False})) == 128
    from restoration.adaptation import check_job

    with pytest.raises(ValueError, match="at most 128"):  # the CLI's check (run_adaptation) refuses the same
        check_job(Zoo(), card.name, None, AdaptConfig.from_dict({"size": 1024, "use_prior": False}))
    with pytest.raises(ServiceError) as e:
        _job("size", "too-big", {"size": 1024, "use_prior": False})
    assert e.value.status == 422 and "at most 128" in e.value.detail


def test_dataset_name_is_bounded(home):
    from sqlalchemy.exc import IntegrityError

    from service.datasets import ingest
    from service.db import session
    from service.errors import ServiceError
    from service.limits import UploadedFile
    from service.rows import Dataset
    from service.settings import get_settings

    tid = _tenant("dsname")
    with pytest.raises(ServiceError) as e:  # refused before any upload is read (none here is even an image)
        ingest(tid, "n" * 300, [UploadedFile("x.bin", b"not an image")], get_settings())
    assert e.value.status == 422 and "300 characters" in e.value.detail
    with session() as s:  # and the database refuses it too (SQLite never enforced the VARCHAR length)
        s.add(Dataset(tenant_id=tid, name="n" * 257))
        with pytest.raises(IntegrityError):
            s.commit()


# ------------------------------------------------------------------------------------------------ jobs
def test_job_quota_holds_on_sqlite_under_concurrent_requests(home):
    from service.db import session
    from service.errors import ServiceError
    from service.jobs import create_job
    from service.rows import FINAL_STATUSES, Job
    from service.settings import get_settings

    tid = _tenant("quota")
    ds = _dataset(tid)
    limit = get_settings().max_active_jobs_per_tenant
    barrier, results = threading.Barrier(12), []

    def post(i):
        barrier.wait()
        try:
            with session() as s:
                create_job(s, tid, ds, "default", f"q{i}", {"use_prior": False})
            results.append(202)
        except ServiceError as exc:
            results.append(exc.status)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [202] * limit + [429] * (12 - limit), results
    with session() as s:
        assert s.query(Job).filter(Job.tenant_id == tid, Job.status.not_in(FINAL_STATUSES)).count() == limit


def test_cancel_once_registering_is_refused(home):
    """Picked behaviour: once the register stage has started the cancel answers 409 (it used to be accepted, then
    ignored, and the job succeeded with a model)."""
    from service.db import session
    from service.errors import ServiceError
    from service.jobs import cancel_job
    from service.rows import Job

    job_id = _job("late", "late-cancel")
    with session() as s:
        job = s.get(Job, job_id)
        job.status, job.stage = "evaluating", "register"
        tid = job.tenant_id
        s.commit()
    with session() as s, pytest.raises(ServiceError) as e:
        cancel_job(s, tid, job_id)
    assert e.value.status == 409 and e.value.code == "job_registering"
    with session() as s:
        job = s.get(Job, job_id)
        assert not job.cancel_requested and job.status == "evaluating"
        job.stage = "evaluate"  # before register: still cancellable
        s.commit()
    with session() as s:
        assert cancel_job(s, tid, job_id).cancel_requested


def test_takeover_event_names_the_worker_that_stopped(home):
    from sqlalchemy import select

    from service.db import session
    from service.leases import WORKER_ID, claim
    from service.rows import JobEvent, JobStep, utcnow

    job_id = _job("takeover", "taken-over")
    with session() as s:
        step = s.scalar(select(JobStep).where(JobStep.job_id == job_id, JobStep.stage == "prepare"))
        step.status, step.lease_owner, step.attempts = "running", "deadhost:4242", 1
        step.heartbeat_at = utcnow() - timedelta(hours=1)
        s.commit()
    assert claim(job_id, "prepare", 0) == "run"
    with session() as s:
        msgs = [e.message for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
    resumed = [m for m in msgs if "resumed by" in m]
    assert resumed == [f"prepare: resumed by {WORKER_ID} (attempt 2); previous worker deadhost:4242 stopped"], msgs


def test_a_dead_workers_stages_are_released_at_once(home):
    from sqlalchemy import select

    from service.db import session
    from service.leases import beat_worker, live_workers, worker_died
    from service.rows import JobEvent, JobStep, utcnow

    job_id = _job("died", "worker-died")
    with session() as s:
        step = s.scalar(select(JobStep).where(JobStep.job_id == job_id, JobStep.stage == "prepare"))
        step.status, step.lease_owner, step.heartbeat_at = "running", "host:77", utcnow()
        s.commit()
    before = live_workers()
    beat_worker("host:77")
    assert live_workers() == before + 1
    assert worker_died("host:77", "killed by signal 9") == 1
    assert live_workers() == before
    with session() as s:
        step = s.scalar(select(JobStep).where(JobStep.job_id == job_id, JobStep.stage == "prepare"))
        assert step.heartbeat_at is None and step.status == "running"  # the next reaper pass re-queues it
        msgs = [e.message for e in s.scalars(select(JobEvent).where(JobEvent.job_id == job_id))]
    assert any("worker host:77 died (killed by signal 9)" in m for m in msgs), msgs
    from service.leases import prune_workers
    from service.rows import WorkerBeat

    with session() as s:  # a worker silent for long (no supervisor told) is forgotten by the reaper's pass
        s.add(WorkerBeat(id="host:78", started_at=utcnow(), heartbeat_at=utcnow() - timedelta(days=1)))
        s.commit()
    assert prune_workers() >= 1
    with session() as s:
        assert s.get(WorkerBeat, "host:78") is None


def test_deleting_a_model_removes_its_cached_copy(home):
    from service.db import session
    from service.registry import delete_model, materialise
    from service.rows import ModelRow
    from service.settings import get_settings
    from service.storage import get_storage

    tid = _tenant("cache")
    key = get_storage().put(b'{"name": "cached"}')
    with session() as s:
        row = ModelRow(tenant_id=tid, name="cached", kind="restorer", arch="swinir_face", files={"card.json": key},
                       card={})
        s.add(row)
        s.commit()
        materialise(row)
        folder = get_settings().cache_path / "models" / row.id
        assert (folder / "card.json").is_file()
        delete_model(s, row)
    assert not folder.exists()


# ------------------------------------------------------------------------------------------------ admission
def test_pixel_budget_waits_then_refuses_with_retry_after():
    from app.limits import Busy, PixelBudget

    budget = PixelBudget(100)
    with budget.admit(60, 0):
        with budget.admit(40, 0):  # fits exactly
            assert budget.in_use == 100
        with pytest.raises(Busy) as e:
            with budget.admit(50, 0.05):
                pass
        assert e.value.status == 429 and e.value.headers["Retry-After"] and e.value.extra["limit"] == "restore_pixel_budget"
    got = []  # a waiting request is admitted as soon as room is freed

    def waiter():
        with budget.admit(90, 5):
            got.append(budget.in_use)

    with budget.admit(20, 0):
        t = threading.Thread(target=waiter)
        t.start()
        time.sleep(0.1)
        assert not got  # 20 + 90 > 100: waiting
    t.join(5)
    assert got == [90] and budget.in_use == 0
    with budget.admit(500, 0):  # larger than the budget: admitted alone (max_image_pixels bounds one image)
        assert budget.in_use == 500


def test_rate_limit_is_per_tenant_with_retry_after():
    from app.limits import Busy, RateLimiter

    rl = RateLimiter(rate_per_minute=6, burst=3)
    for _ in range(3):
        rl.check("a")
    with pytest.raises(Busy) as e:
        rl.check("a")
    assert e.value.status == 429 and e.value.code == "rate_limited" and 1 <= int(e.value.headers["Retry-After"]) <= 10
    rl.check("b")  # another tenant is not affected
    RateLimiter(0, 1).check("a")  # 0: no limit


def test_zip_entries_go_to_disk_and_are_counted_before_any_decode(tmp_path):
    from service.errors import LimitExceeded
    from service.limits import too_small, unpack_zip
    from service.settings import ServiceSettings

    settings = ServiceSettings(_env_file=None, max_dataset_images=3)
    files = unpack_zip(_zip({"a.png": png_bytes(40, 40), "b.png": png_bytes(1, 1), "notes.txt": b"hello"}), settings,
                       rejected := [], dest=tmp_path)
    assert [f.name for f in files] == ["a.png", "b.png"] and [r["file"] for r in rejected] == ["notes.txt"]
    assert all(f.path is not None and f.path.parent == tmp_path for f in files)  # on disk, not in memory
    assert files[0].data == png_bytes(40, 40)
    assert too_small(files[1].data, settings).startswith("too small: 1x1") and too_small(files[0].data, settings) is None
    with pytest.raises(LimitExceeded) as e:  # counted as entries come out: the 4th image stops the unpacking
        unpack_zip(_zip({f"{i}.png": png_bytes(40, 40) for i in range(6)}), settings, dest=tmp_path / "x")
    assert e.value.extra["limit"] == "max_dataset_images"


def test_one_pixel_images_are_rejected_without_face_detection(home):
    """500 one-pixel PNGs in a zip: each is rejected from its header ('too small ... not decoded'); the face detector
    never runs on them (it took 72 s of API CPU before)."""
    from service.datasets import ingest
    from service.errors import ServiceError
    from service.limits import UploadedFile
    from service.settings import get_settings

    data = _zip({f"{i}.png": png_bytes(1, 1) for i in range(500)})
    with pytest.raises(ServiceError) as e:
        ingest(_tenant("tiny"), "tiny", [UploadedFile("tiny.zip", data)], get_settings())
    assert e.value.status == 422
    reasons = {r["reason"] for r in e.value.extra["rejected"]}
    assert reasons == {"too small: 1x1, under min_image_side (32 px); not decoded"}, reasons


# ------------------------------------------------------------------------------------------------ over HTTP
def _blackhole():
    """A TCP server that accepts connections and never answers (a broker that hangs)."""
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    held = []

    def accept():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    return srv, held


@pytest.fixture(scope="module")
def guarded_api(tmp_path_factory):
    """A real uvicorn API (keys required, a metrics token) whose broker black-holes every connection, with tight
    admission limits: 6 requests a minute per tenant (bursts of 10), one 128x128 image restored at a time."""
    import os
    import subprocess

    from test_service_harness import PY, REPO, start_api, stop_api

    home = tmp_path_factory.mktemp("guarded-home")
    srv, held = _blackhole()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACEADAPT_")}
    env.update({"FACEADAPT_HOME": str(home), "FACEADAPT_MIN_ADAPT_IMAGES": "2", "FACEADAPT_MODELS_DIR": str(home / "models"), "FACEADAPT_DEVICE": "cpu",
                "FACEADAPT_FACEXLIB_MODEL_ROOT": str(SHARED / "weights" / "facexlib"), "FACEADAPT_SHARED": str(SHARED),
                "FACEADAPT_BROKER_URL": f"redis://127.0.0.1:{srv.getsockname()[1]}/0", "FACEADAPT_REQUIRE_KEYS": "true",
                "FACEADAPT_METRICS_TOKEN": "metrics-secret", "FACEADAPT_RATE_LIMIT_PER_MINUTE": "6",
                "FACEADAPT_RATE_LIMIT_BURST": "10", "FACEADAPT_RESTORE_PIXEL_BUDGET": str(128 * 128),
                "FACEADAPT_RESTORE_ADMISSION_WAIT_S": "0", "FACEADAPT_BROKER_PROBE_TIMEOUT_S": "1",
                "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    ensure_default_models(home, env)
    api = start_api(env, home / "api.log")
    import httpx

    deadline = time.time() + 120
    while True:  # not ready (no worker, no broker): wait for the process to answer at all
        try:
            httpx.get(api.url + "/healthz", timeout=5).raise_for_status()
            break
        except httpx.HTTPError:
            assert api.poll() is None and time.time() < deadline, (home / "api.log").read_text()[-3000:]
            time.sleep(0.5)

    def key(tenant):
        out = subprocess.run([str(Path(PY).parent / "faceadapt"), "keys", "create", "--tenant", tenant], env=env,
                             cwd=REPO, capture_output=True, text=True, check=True)
        return {"Authorization": f"Bearer {out.stdout.strip()}"}

    yield api.url, key, home
    stop_api(api)
    srv.close()
    for c in held:
        c.close()


def test_metrics_and_readyz_do_not_hang_on_a_dead_broker(guarded_api):
    import httpx

    url, key, _ = guarded_api
    token = {"Authorization": "Bearer metrics-secret"}
    with httpx.Client(base_url=url, timeout=15) as c:  # before: each scrape blocked on the broker
        for _ in range(2):
            r = c.get("/metrics", headers=token)
            assert r.status_code == 200 and "faceadapt_broker_up 0.0" in r.text, r.text[-500:]
            assert "faceadapt_jobs{" in r.text
        r = c.get("/readyz")
        assert r.status_code == 503
        checks = r.json()["checks"]
        assert checks["broker"] == "error" and checks["worker"] == "error" and checks["database"] == "ok", checks
        assert "redis" not in r.text.lower() and "127.0.0.1" not in r.text  # no internal error text without a key
        for auth in (token, key("ops")):
            detailed = c.get("/readyz", headers=auth).json()["checks"]
            assert detailed["broker"].startswith("error: ") and "did not answer" in detailed["broker"], detailed
            assert "no worker is alive" in detailed["worker"], detailed


def test_rate_limit_per_tenant_over_http(guarded_api):
    import httpx

    url, key, _ = guarded_api
    a, b = key("rate-a"), key("rate-b")
    with httpx.Client(base_url=url, timeout=60) as c:
        codes = [c.get("/v1/models", headers=a) for _ in range(14)]
        assert [r.status_code for r in codes[:10]] == [200] * 10  # the burst
        limited = [r for r in codes[10:] if r.status_code == 429]
        assert limited, [r.status_code for r in codes]
        assert limited[0].json()["error"] == "rate_limited" and int(limited[0].headers["Retry-After"]) >= 1
        assert c.get("/v1/models", headers=b).status_code == 200  # another tenant is not limited


def test_restores_beyond_the_pixel_budget_get_429(guarded_api):
    """A budget of one 128x128 image and no wait: of 6 restores sent at once, those that find the budget taken get
    429 `busy` with Retry-After; the others are restored."""
    import httpx

    url, key, _ = guarded_api
    from PIL import Image

    img = sorted((SHARED / "data" / "faces-utk200").iterdir())[0]

    buf = io.BytesIO()
    Image.open(img).convert("RGB").resize((128, 128)).save(buf, format="PNG")
    auths = [key(f"pix-{i}") for i in range(6)]
    results = []

    def post(auth):
        with httpx.Client(base_url=url, timeout=120) as c:
            results.append(c.post("/v1/restore", files={"image": ("f.png", buf.getvalue(), "image/png")}, headers=auth))

    threads = [threading.Thread(target=post, args=(a,)) for a in auths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, [(r.status_code, r.text[:200]) for r in results]
    busy = next(r for r in results if r.status_code == 429)
    assert busy.json()["error"] == "busy" and busy.json()["limit"] == "restore_pixel_budget"
    assert busy.headers["Retry-After"]
