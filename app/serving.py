"""Serving: a bounded per-process model cache and the restore micro-batcher.

* The model a request names is found in the registry (`service.registry.resolve_model`) on every request, so a model
  registered by a job on any worker is usable at once by every API process.
* `ModelCache` keeps at most `model_cache_size` idle restorers loaded (LRU); a model in use by a request is never
  closed (`use()` counts its users), and every wait (a load by another request, a batch) is bounded by
  `restore_timeout_s`, after which the request gets a 503 JSON error. Registry models are fetched from storage
  into `cache_dir/models/<id>/` (`service.registry.materialise`) and loaded with the zoo.
* `MicroBatcher` gathers the face crops of concurrent requests for one model into one network pass (up to
  `batch_max_size` crops); it runs on its own thread and requests wait for it from the threadpool, never on the event
  loop. It never waits for nobody: a batch starts at once with every crop already queued, and waits (at most
  `batch_max_wait_ms`) for more only while other requests for the model are on their way to it (`expecting()`:
  between `Loaded.restore` and their crops' submission). A lone request pays no batching delay; under load, the
  requests that arrive while a batch runs form the next one.
* Lean serving options (settings, for a GPU mostly; bench/speed.py measures them): `serve_precision`,
  `serve_channels_last`, `serve_compile` (with a warm-up pass at load), `serve_static_batch` (every network pass at
  exactly `batch_max_size` crops, padded: fixed shapes for compiled kernels and CUDA graphs), `serve_preload` (the
  default restorer loaded and warmed up when the app starts), `torch_threads`; pinned host memory for host-to-device
  copies on CUDA. One model copy per process: the cache loads each model once, whatever the concurrency.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from app.metrics import BATCH_SIZE, MODEL_LOADS
from restoration.diffusion import load_guard_prior
from restoration.faces import Restorer
from restoration.models import ModelCard, ZooError
from service.errors import ServiceError
from restoration.runtime import set_torch_threads, to_channels_last
from service.db import session_factory
from service.registry import open_zoo, resolve_model
from service.rows import ModelRow
from service.settings import get_settings

log = logging.getLogger(__name__)


_POLL_S = 0.001  # how often a batch waiting for announced callers looks at the queue


class BatcherClosed(ServiceError):
    """The batcher was closed (the process is shutting down): a 503, never a wait."""

    def __init__(self, label: str):
        super().__init__(503, "shutting_down", f"model {label!r} was unloaded because the server is shutting down; "
                         "retry on another instance")


class RestoreTimeout(ServiceError):
    """A restore waited longer than restore_timeout_s for its batch: a 503, the request's crops are dropped."""

    def __init__(self, label: str, timeout_s: float):
        super().__init__(503, "restore_timeout", f"restoring with model {label!r} took more than {timeout_s:g} s "
                         "(FACEADAPT_RESTORE_TIMEOUT_S); the service is busy, retry later",
                         limit="restore_timeout_s", limit_value=timeout_s)


class MicroBatcher:
    """Gathers crops from concurrent callers into batches for `fn(list of crops) -> list of crops`.

    Every crop handed in before `close()` is restored (closing drains the queue); a call after `close()` raises
    `BatcherClosed` at once, never waits. A caller waits at most `timeout_s` for its result (`RestoreTimeout`); its
    crops are then dropped from the queue if they have not been taken into a batch yet."""

    def __init__(self, fn: Callable[[list[np.ndarray]], list[np.ndarray]], max_size: int, max_wait_s: float,
                 label: str = "", timeout_s: float | None = None):
        self.fn, self.max_size, self.max_wait_s, self.label = fn, max(1, max_size), max(0.0, max_wait_s), label
        self.timeout_s = timeout_s
        self._q: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._coming = 0  # callers inside expecting() that have not submitted yet
        self._local = threading.local()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{label}", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def coming(self) -> int:
        """Callers announced by `expecting()` whose crops have not been submitted yet."""
        return self._coming

    @contextmanager
    def expecting(self) -> Iterator[None]:
        """Announce that this thread will submit crops soon (a request on its way to the network): while any caller is
        announced, a batch being formed waits for it (at most `max_wait_s`). Leaving the block without submitting
        (no face to restore) withdraws the announcement."""
        with self._lock:
            self._coming += 1
        self._local.announced = True
        try:
            yield
        finally:
            self._withdraw()

    def _withdraw(self) -> None:
        if getattr(self._local, "announced", False):
            self._local.announced = False
            with self._lock:
                self._coming -= 1

    def submit(self, crops: list[np.ndarray]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._withdraw()  # this caller's crops are queued now: a batch no longer waits for it
        with self._lock:  # nothing can be queued behind the close marker
            if self._closed:
                raise BatcherClosed(self.label)
            self._q.put((list(crops), fut))
        return fut

    def __call__(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        if not crops:
            return []
        fut = self.submit(crops)
        try:
            return fut.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()  # not restored yet: the batcher skips it
            raise RestoreTimeout(self.label, self.timeout_s) from None

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._q.put(None)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            batch, n, stop = [item], len(item[0]), False
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_size:
                try:
                    nxt = self._q.get_nowait()  # every crop already queued joins
                except queue.Empty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self._coming <= 0:
                        break  # nobody else is on the way: never wait for nobody
                    try:  # short polls: a caller that withdraws (no face) ends the wait early
                        nxt = self._q.get(timeout=min(remaining, _POLL_S))
                    except queue.Empty:
                        continue
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                n += len(nxt[0])
            batch = [(cs, fut) for cs, fut in batch if fut.set_running_or_notify_cancel()]  # drop timed-out callers
            if batch:
                crops = [c for cs, _ in batch for c in cs]
                BATCH_SIZE.labels(self.label).observe(len(crops))
                try:
                    out = self.fn(crops)
                    i = 0
                    for cs, fut in batch:
                        fut.set_result(out[i : i + len(cs)])
                        i += len(cs)
                except BaseException as exc:  # every waiting request gets the error
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
            if stop:
                return


@dataclass
class Restored:
    image: np.ndarray
    faces: list  # the restored faces (restoration.faces.detection.Face), largest first
    faces_found: int  # faces detected, restored or not
    detector: str | None
    gray: bool = False  # a gray input kept gray (colour not asked for)


@dataclass
class Loaded:
    restorer: object  # restoration.faces.restore.Restorer
    batcher: MicroBatcher

    def restore(self, img: np.ndarray, aligned: bool, only_center_face: bool, max_faces: int | None = None,
                fidelity: float | None = None, color: bool = False) -> Restored:
        """Restore the faces of `img`; at most the `max_faces` largest ones (the others are left as they are).
        `fidelity` (None: auto by each face's native size, `restoration.faces.fidelity`); every face's `extra` records
        `native_size`, `mode` and `fidelity`. The one whole-photo restore (`Restorer.restore_image`), with the crops
        going through the micro-batcher, except for archs that take the fidelity as their own input (per call). With
        auto fidelity each face is checked never worse (`extra` `reason` when it fell back); a gray input stays gray
        unless `color`."""
        batched = not self.restorer.takes_fidelity
        with self.batcher.expecting() if batched else contextlib.nullcontext():
            res = self.restorer.restore_image(img, aligned=aligned, only_center_face=only_center_face,
                                              fidelity=fidelity, max_faces=max_faces, color=color,
                                              restore_fn=self.batcher if batched else None)
        # the API names the model's detector for aligned crops too
        return Restored(res.image, res.faces, res.faces_found, self.restorer.face_helper().detector_name, res.gray)

    def close(self) -> None:
        self.batcher.close()


@dataclass
class _Entry:
    loaded: Loaded
    users: int = 0


class ModelCache:
    """At most `size` idle models stay loaded (LRU). A model is never closed while a request uses it: `use()` counts
    its users, and only idle entries are evicted; while more distinct models are in use at once than `size`, the
    cache holds them all and shrinks back as they become idle. Every wait is bounded by `timeout_s`."""

    def __init__(self, size: int, timeout_s: float | None = None):
        self.size = max(1, size)
        self.timeout_s = timeout_s
        self._items: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self._closed = False
        self._priors: dict = {}
        self._prior_lock = threading.Lock()

    @contextmanager
    def use(self, row: ModelRow) -> Iterator[Loaded]:
        """The loaded model of `row`, kept open until the block ends."""
        entry = self._acquire(row)
        try:
            yield entry.loaded
        finally:
            with self._lock:
                entry.users -= 1
                closing = self._trim_locked()
            for old in closing:
                old.close()

    def get(self, row: ModelRow) -> Loaded:
        """Load (or touch) a model without holding it; it may be evicted at any time. Prefer `use()`."""
        with self.use(row) as loaded:
            return loaded

    def loaded_keys(self) -> list[str]:
        with self._lock:
            return list(self._items)

    def _take_locked(self, key: str) -> _Entry | None:
        """The loaded entry of `key`, marked in use and most recently used (the lock held), or None."""
        self._check_open()
        entry = self._items.get(key)
        if entry is not None:
            self._items.move_to_end(key)
            entry.users += 1
        return entry

    def _acquire(self, row: ModelRow) -> _Entry:
        key = f"{row.id}:{row.sha256}"
        with self._lock:
            if (entry := self._take_locked(key)) is not None:
                return entry
            load_lock = self._loading.setdefault(key, threading.Lock())
        # one load per model, however many requests ask at once; the others wait for it, but not forever
        if not load_lock.acquire(timeout=-1 if self.timeout_s is None else self.timeout_s):
            raise ServiceError(503, "model_load_timeout", f"model {row.name!r} is still being loaded after "
                           f"{self.timeout_s:g} s (FACEADAPT_RESTORE_TIMEOUT_S); retry later",
                           limit="restore_timeout_s", limit_value=self.timeout_s)
        try:
            with self._lock:
                if (entry := self._take_locked(key)) is not None:  # loaded while we waited
                    return entry
            loaded = self._load(row)
            with self._lock:
                entry = _Entry(loaded, users=1)
                self._items[key] = entry
                closing = self._trim_locked()
                if self._closed:  # shut down while loading
                    self._items.pop(key, None)
                    closing.append(loaded)
        finally:
            with self._lock:
                if self._loading.get(key) is load_lock:
                    del self._loading[key]
            load_lock.release()
        for old in closing:
            old.close()
        if self._closed:
            raise ServiceError(503, "shutting_down", "the server is shutting down; retry on another instance")
        return entry

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceError(503, "shutting_down", "the server is shutting down; retry on another instance")

    def _trim_locked(self) -> list[Loaded]:
        """Evict idle entries, least recently used first, until at most `size` remain; returns them to close."""
        closing = []
        for key in list(self._items):
            if len(self._items) <= self.size:
                break
            if self._items[key].users == 0:
                closing.append(self._items.pop(key).loaded)
        return closing

    def clear(self) -> None:
        """Close every model (shutdown): calls in flight finish their queued crops, new ones get a 503."""
        with self._lock:
            self._closed = True
            items = list(self._items.values())
            self._items.clear()
        for item in items:
            item.loaded.close()

    def _guard_prior(self, device):
        """The never-worse check's face prior (FACEADAPT_GUARD_PRIOR), loaded once per device and shared by every
        model (read only: each call noises its own copy)."""
        with self._prior_lock:
            if str(device) not in self._priors:
                try:
                    self._priors[str(device)] = load_guard_prior(device=device)
                except (ZooError, ValueError) as exc:
                    raise ServiceError(503, "guard_prior_unavailable", f"the never-worse check's face prior "
                                       f"(FACEADAPT_GUARD_PRIOR={get_settings().guard_prior!r}) cannot be loaded: "
                                       f"{exc}; set it to a prior of the zoo, or 'none'") from exc
            return self._priors[str(device)]

    def _load(self, row: ModelRow) -> Loaded:
        settings = get_settings()
        t0 = time.perf_counter()
        set_torch_threads(settings.torch_threads)
        zoo, zoo_name = open_zoo(row)
        card = ModelCard.from_json(row.card)
        restorer = Restorer(zoo.load(zoo_name), card, device=settings.device, batch_size=settings.batch_max_size)
        restorer.guard_prior = self._guard_prior(restorer.device)
        fn = lean(restorer, settings)
        MODEL_LOADS.inc()
        log.info("loaded model %s (%s) in %.2fs", row.name, row.id, time.perf_counter() - t0)
        batcher = MicroBatcher(fn, settings.batch_max_size, settings.batch_max_wait_ms / 1000.0, row.name,
                               timeout_s=self.timeout_s)
        return Loaded(restorer, batcher)


def lean(restorer: Restorer, settings) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """Apply the lean-serving settings to a loaded restorer (precision, channels_last, torch.compile with a warm-up
    pass) and return the crops function the micro-batcher runs (padded to a static batch when asked)."""
    restorer.precision = settings.serve_precision
    if settings.serve_channels_last:
        to_channels_last(restorer.model)
    if settings.serve_compile:
        restorer.model = torch.compile(restorer.model, dynamic=False)
    fn = restorer.restore_crops
    if settings.serve_static_batch:
        fn = StaticBatch(restorer.restore_crops, restorer.batch_size)
    if settings.serve_compile or settings.serve_preload:
        t0 = time.perf_counter()
        fn([np.zeros((restorer.size, restorer.size, 3), np.uint8)] * restorer.batch_size)
        log.info("warmed up %s in %.2fs", restorer.card.name, time.perf_counter() - t0)
    return fn


class StaticBatch:
    """`fn(crops)` with the crops padded (repeating the last one) to a multiple of `size`, the padding dropped from the
    result: every network pass has the same batch shape. Aligned crops of the model's size only (as /v1/restore
    hands the batcher); other crop sizes pass unpadded."""

    def __init__(self, fn: Callable[[list[np.ndarray]], list[np.ndarray]], size: int):
        self.fn, self.size = fn, max(1, size)

    def __call__(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        pad = -len(crops) % self.size
        if not crops or not pad or len({c.shape for c in crops}) != 1:
            return self.fn(crops)
        return list(self.fn(list(crops) + [crops[-1]] * pad))[: len(crops)]


def preload_default() -> None:
    """FACEADAPT_SERVE_PRELOAD: load (and warm up) the default restorer now, at app start, so that the first request
    does not pay for it; a failure is logged, never fatal (the requests report it)."""
    settings = get_settings()
    if not settings.serve_preload:
        return
    try:
        with session_factory()() as s:
            row = resolve_model(s, settings.public_tenant, "default")
        get_cache().get(row)
    except Exception:  # noqa: BLE001 - the app still starts; the first request gets the real error
        log.exception("preloading the default restorer failed")


_cache: ModelCache | None = None


def get_cache() -> ModelCache:
    global _cache
    if _cache is None or _cache.closed:  # closed: a previous app's shutdown (several apps in one process, tests)
        settings = get_settings()
        _cache = ModelCache(settings.model_cache_size, timeout_s=settings.restore_timeout_s)
    return _cache
