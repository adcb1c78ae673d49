"""The service settings: database, broker, storage, limits, serving, jobs, quotas and garbage collection.

`ServiceSettings` extends the ML settings of `restoration.settings`, so every FACEADAPT_* variable stays in one
namespace (`FACEADAPT_<FIELD>`, e.g. `FACEADAPT_DATABASE_URL`). The ML core never reads these fields.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable, Literal, TypeVar

from pydantic import Field

from restoration.settings import Settings, folder
from restoration.settings import get_settings as ml_settings


class ServiceSettings(Settings):
    # --- database, broker, storage -------------------------------------------------------
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (default: SQLite at HOME/faceadapt.db)."
    )
    broker_url: str | None = Field(
        default=None, description="Celery broker, e.g. redis://host:6379/0 (default: a filesystem transport under HOME/broker, no server)."
    )
    broker_key_prefix: str = Field(default="", description="Prefix for every broker key (Redis global_keyprefix); isolates deployments sharing a Redis.")
    storage_backend: str = Field(default="local", description="'local' (a directory) or 's3' (any S3-compatible store).")
    storage_dir: Path | None = Field(default=None, description="Blob folder for the local backend (default: HOME/storage).")
    s3_bucket: str = ""
    s3_prefix: str = ""
    s3_endpoint_url: str | None = Field(default=None, description="S3-compatible endpoint, e.g. http://minio:9000.")
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    work_dir: Path | None = Field(default=None, description="Job work folders, shared by every worker (default: HOME/work).")
    cache_dir: Path | None = Field(default=None, description="Per-process cache of registry models fetched from storage (default: HOME/cache).")
    require_keys: bool = Field(default=False, description="Require `Authorization: Bearer <key>` on /v1 (always on when binding a non-loopback address).")
    public_tenant: str = Field(default="public", description="Tenant used for every request when keys are not required.")
    # limits (each violation is a 4xx naming the limit)
    max_upload_bytes: int = Field(default=50 * 1024 * 1024, description="Largest request body (one image, or one zip).")
    max_image_pixels: int = Field(default=40_000_000, description="Largest image width*height, checked before decoding.")
    max_dataset_images: int = Field(default=500, description="Most images in one dataset.")
    max_zip_entries: int = Field(default=1000, description="Most entries in an uploaded zip.")
    max_unpacked_bytes: int = Field(default=500 * 1024 * 1024, description="Largest total uncompressed size of an uploaded zip.")
    max_faces_per_image: int = Field(default=32, ge=1, description="Most faces restored in one image by /v1/restore: "
                                     "the largest ones; the response says how many were found and restored.")
    # serving
    response_png_level: int = Field(default=1, ge=0, le=9, description="zlib level of the PNGs /v1/restore answers "
                                    "(the same pixels at every level): 1 encodes a 512 px face about 4x faster than 6 "
                                    "for a file about 10% larger (docs/PERFORMANCE.md).")
    model_cache_size: int = Field(default=4, description="Models kept loaded per API process (LRU).")
    batch_max_size: int = Field(default=8, description="Most face crops restored in one micro-batch.")
    batch_max_wait_ms: float = Field(default=10.0, description="Longest wait for more requests to join a micro-batch.")
    restore_timeout_s: float = Field(default=120.0, description="Longest wait of a restore request for a model load "
                                     "or for its micro-batch; past it the request gets a 503 `restore_timeout`.")
    shutdown_timeout_s: float = Field(default=30.0, description="`faceadapt serve`: on SIGTERM/Ctrl-C, how long "
                                      "requests in flight may take to finish before their connections are closed.")
    # lean serving (issue 18; docs/PERFORMANCE.md): mostly for a GPU, each measured by bench/speed.py
    serve_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="Restorer precision in the API: 'auto' (bf16 autocast on CUDA, fp32 on the CPU), "
        "'fp32', or 'bf16' (autocast on any device).")
    serve_channels_last: bool = Field(default=False, description="Restorers in channels_last memory format (faster "
                                      "convolutions on recent GPUs).")
    serve_compile: bool = Field(default=False, description="torch.compile each restorer the API loads, with a warm-up "
                                "pass at load (the compile time is paid then, not by a request).")
    serve_static_batch: bool = Field(default=False, description="Pad every network pass to exactly batch_max_size crops: "
                                     "fixed shapes for compiled kernels and CUDA graphs (wasted work on a CPU).")
    serve_preload: bool = Field(default=False, description="Load (and warm up) the default restorer when the API "
                                "starts, not on the first request.")
    torch_threads: int | None = Field(default=None, description="torch intra-op CPU threads per process (API and "
                                      "worker); unset: every core. With several processes on one machine: cores / "
                                      "processes.")
    # jobs
    queue_default: str = Field(default="faceadapt", description="Celery queue for orchestration tasks.")
    queue_gpu: str = Field(default="faceadapt-gpu", description="Celery queue for the ML stages (GPU workers consume it).")
    target_shards: int = Field(default=4, description="Pseudo-target generation is split into this many parallel shards.")
    visibility_timeout_s: int = Field(default=12 * 3600, description="Broker redelivery timeout for unacknowledged tasks; longer than the longest job.")
    task_max_attempts: int = Field(default=3, description="Attempts per stage (redeliveries included) before the job fails.")
    lease_ttl_s: float = Field(default=60.0, description="A stage whose worker has not sent a heartbeat for this long is taken over by another worker.")
    heartbeat_s: float = Field(default=10.0, description="Worker heartbeat period while a stage runs.")
    reaper_interval_s: float = Field(default=15.0, description="How often each worker looks for stages whose worker died.")
    # security, quotas and garbage collection (issue 10)
    hq_sets: dict[str, Path] = Field(
        default_factory=dict,
        description="Named sets of clean HQ faces a job may use for the discriminator (`params.hq_set` names one), as "
                    "JSON, e.g. {\"ffhq\": \"/data/ffhq512\"}. The API never takes a path.")
    allowed_devices: str = Field(default="auto,cpu,cuda", description="Comma-separated devices a job may ask for "
                                 "(`params.device`); 'cuda' also allows 'cuda:N'.")
    max_active_jobs_per_tenant: int = Field(default=4, description="Jobs a tenant may have queued or running at once.")
    max_finetune_steps: int = Field(default=20_000, description="Largest `params.finetune.steps` of a job.")
    max_job_runtime_s: float = Field(default=24 * 3600.0, description="A job still not finished this long after it "
                                     "was created is failed by the reaper (its running stage stops at its next batch).")
    public_models: str = Field(default="", description="Comma-separated zoo models (FACEADAPT_MODELS_DIR) published to "
                               "every tenant; the bundled models and the configured defaults always are, others never.")
    metrics_token: str | None = Field(default=None, description="Bearer token for /metrics when API keys are required "
                                      "(unset: /metrics is closed then).")
    public_docs: bool = Field(default=False, description="Serve /docs, /redoc and /openapi.json without an API key even "
                              "when keys are required.")
    blob_gc_interval_s: float = Field(default=3600.0, description="How often a worker sweeps the blob store for blobs "
                                      "nothing references any more (blobs of finished jobs are collected at job end).")
    max_zip_ratio: float = Field(default=200.0, description="Largest uncompressed/compressed size ratio of one zip entry.")
    max_zip_member_bytes: int = Field(default=50 * 1024 * 1024, description="Largest uncompressed size of one zip entry.")
    # job events, their stream and webhooks (issue 19)
    webhook_allowed_urls: str = Field(default="", description="Comma-separated URL prefixes a job's `webhook` may "
                                      "start with (same scheme, host and port; the path under the prefix's), e.g. "
                                      "'https://hooks.example.com/faceadapt/'. Empty: no webhook is allowed.")
    webhook_timeout_s: float = Field(default=5.0, description="Longest wait for a webhook receiver's answer.")
    webhook_max_attempts: int = Field(default=8, ge=1, description="Tries of one webhook delivery before it is "
                                      "marked failed.")
    webhook_retry_base_s: float = Field(default=2.0, description="Wait before the first retry of a failed webhook; "
                                        "doubled after each failure.")
    webhook_retry_max_s: float = Field(default=600.0, description="Longest wait between two tries of a webhook.")
    webhook_poll_s: float = Field(default=1.0, description="How often each worker looks for webhooks to send.")
    webhook_secret_grace_s: float = Field(default=24 * 3600.0, description="After a rotation, how long the previous "
                                          "webhook secret still signs deliveries (a second v1= signature).")
    stream_poll_s: float = Field(default=1.0, description="How often an open /stream looks for news of its job.")
    stream_heartbeat_s: float = Field(default=15.0, description="A /stream with no news sends a comment line this "
                                      "often, so proxies keep it open.")
    stream_max_s: float = Field(default=900.0, description="A /stream closes after this long; the client reconnects "
                                "with Last-Event-ID and goes on where it stopped.")
    # reliability and admission control (issue 17)
    worker_ttl_s: float = Field(default=30.0, gt=0, description="A worker whose last heartbeat (every heartbeat_s) is "
                                "older than this counts as dead: /readyz is 503 while no worker is alive.")
    ready_requires_worker: bool = Field(default=True, description="/readyz answers 503 while no worker is alive (set "
                                        "false for an API deployment that is not meant to run jobs).")
    worker_restart_max_s: float = Field(default=30.0, gt=0, description="`faceadapt serve`: longest wait before "
                                        "restarting its embedded worker after it died (the wait doubles from 1 s).")
    broker_probe_timeout_s: float = Field(default=2.0, gt=0, description="/readyz and /metrics wait at most this long "
                                          "for the broker; a broker that does not answer is reported, never waited on.")
    broker_probe_max_age_s: float = Field(default=10.0, ge=0, description="/metrics and /readyz reuse a broker probe "
                                          "(queue depths, ping) this recent.")
    restore_pixel_budget: int = Field(default=64_000_000, ge=1, description="Decoded pixels (width*height) of the "
                                      "restores in flight in one API process; a restore that does not fit waits "
                                      "(restore_admission_wait_s), then gets 429 with Retry-After.")
    restore_admission_wait_s: float = Field(default=10.0, ge=0, description="Longest wait of a restore for room in "
                                            "restore_pixel_budget before its 429.")
    rate_limit_per_minute: int = Field(default=600, ge=0, description="Requests to /v1 per tenant and minute, in each "
                                       "API process (0: no limit); over it: 429 with Retry-After.")
    rate_limit_burst: int = Field(default=60, ge=1, description="Requests a tenant may send at once before "
                                  "rate_limit_per_minute paces it.")
    min_image_side: int = Field(default=32, ge=1, description="Dataset images whose width or height (from the header) "
                                "is smaller are rejected without being decoded or searched for faces.")

    @property
    def embedded_db_path(self) -> Path:
        """The SQLite file of the embedded mode (used when no database URL is set)."""
        return self.home_dir / "faceadapt.db"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.embedded_db_path}"

    @property
    def broker(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def storage_path(self) -> Path:
        return folder(self.storage_dir, self.home_dir / "storage")

    @property
    def work_path(self) -> Path:
        return folder(self.work_dir, self.home_dir / "work")

    @property
    def cache_path(self) -> Path:
        return folder(self.cache_dir, self.home_dir / "cache")


_lock = threading.Lock()
_built: tuple[Settings, ServiceSettings] | None = None


def get_settings() -> ServiceSettings:
    """The service settings, read from the environment once. They are read again whenever the ML settings are
    (`restoration.settings.get_settings.cache_clear()`), and `get_settings.cache_clear()` clears both: the two
    objects always come from the same environment."""
    global _built
    base = ml_settings()
    with _lock:
        if _built is None or _built[0] is not base:
            _built = (base, ServiceSettings())
        return _built[1]


def _cache_clear() -> None:
    global _built
    with _lock:
        _built = None
    ml_settings.cache_clear()


get_settings.cache_clear = _cache_clear


T = TypeVar("T")


def per_settings(make: Callable[[ServiceSettings], T]) -> Callable[[], T]:
    """A getter of `make(settings)`, made once per settings object: after the settings are read again (a cache clear),
    the next call makes a new one."""
    lock = threading.Lock()
    made: list[tuple[ServiceSettings, T]] = []

    def get() -> T:
        settings = get_settings()
        with lock:
            if not made or made[0][0] is not settings:
                made[:] = [(settings, make(settings))]
            return made[0][1]

    get.__doc__ = f"`{make.__name__}(settings)`, made once per settings object."
    return get
