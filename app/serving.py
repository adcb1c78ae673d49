"""Serving: the model registry lookup, a bounded per-process model cache, and the restore micro-batcher.

* `resolve_model` finds the model a tenant asked for (its own first, then public ones) in the database on every
  request, so a model registered by a job on any worker is usable at once by every API process.
* `ModelCache` keeps at most `model_cache_size` loaded restorers (LRU). Registry models are fetched from storage
  into `cache_dir/models/<id>/` (atomic writes, checked against the card's sha256) and loaded with the zoo.
* `MicroBatcher` gathers the face crops of concurrent requests for one model into one network pass (up to
  `batch_max_size` crops, waiting at most `batch_max_wait_ms` for more); it runs on its own thread and requests wait
  for it from the threadpool, never on the event loop.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.metrics import BATCH_SIZE, MODEL_LOADS
from app.models import ModelRow
from restoration.settings import get_settings

log = logging.getLogger(__name__)


def visible(tenant_id: str):
    """SQL filter: the tenant's own models and the public ones."""
    return or_(ModelRow.tenant_id == tenant_id, ModelRow.tenant_id.is_(None))


def resolve_model(session: Session, tenant_id: str, name_or_id: str, kind: str | None = "restorer") -> ModelRow:
    if name_or_id in ("", "default"):
        name_or_id = get_settings().default_restorer if kind != "prior" else get_settings().default_prior
    rows = session.scalars(
        select(ModelRow).where(visible(tenant_id), or_(ModelRow.name == name_or_id, ModelRow.id == name_or_id))
    ).all()
    if not rows:
        raise ApiError(404, "model_not_found", f"no model {name_or_id!r}; GET /v1/models lists the models you can use")
    # the tenant's own model shadows a public one of the same name; newest first
    row = sorted(rows, key=lambda r: (r.tenant_id is not None, r.created_at), reverse=True)[0]
    if kind and row.kind != kind:
        raise ApiError(400, "wrong_model_kind", f"model {name_or_id!r} is a {row.kind}, not a {kind}")
    return row


def sync_zoo_models(session: Session) -> None:
    """Make the zoo's models (bundled defaults and FACEADAPT_MODELS_DIR) public registry entries."""
    from restoration.zoo import Zoo

    try:
        cards = Zoo().list()
    except Exception as exc:
        log.warning("cannot list the model zoo: %s", exc)
        return
    existing = {r.name: r for r in session.scalars(select(ModelRow).where(ModelRow.builtin.is_(True)))}
    for card in cards:
        row = existing.get(card.name)
        data = card.to_json()
        if row is None:
            session.add(ModelRow(tenant_id=None, name=card.name, kind=card.kind, arch=card.arch, builtin=True,
                                 sha256=card.sha256, card=data, files={}))
        elif row.sha256 != card.sha256 or row.card != data:
            row.sha256, row.card, row.kind, row.arch = card.sha256, data, card.kind, card.arch
    session.flush()


class MicroBatcher:
    """Gathers crops from concurrent callers into batches for `fn(list of crops) -> list of crops`."""

    def __init__(self, fn: Callable[[list[np.ndarray]], list[np.ndarray]], max_size: int, max_wait_s: float, label: str = ""):
        self.fn, self.max_size, self.max_wait_s, self.label = fn, max(1, max_size), max(0.0, max_wait_s), label
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{label}", daemon=True)
        self._thread.start()

    def __call__(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        if not crops:
            return []
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._q.put((list(crops), fut))
        return fut.result()

    def close(self) -> None:
        self._q.put(None)

    def _loop(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            batch, n, stop = [item], len(item[0]), False
            deadline = time.monotonic() + self.max_wait_s
            while n < self.max_size:
                remaining = deadline - time.monotonic()
                try:
                    nxt = self._q.get(timeout=remaining) if remaining > 0 else self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
                n += len(nxt[0])
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
class Loaded:
    restorer: object  # restoration.pipeline.Restorer
    batcher: MicroBatcher

    def restore(self, img: np.ndarray, aligned: bool, only_center_face: bool):
        helper = self.restorer.face_helper()
        out, faces = helper.process(img, self.batcher, aligned=aligned, only_center_face=only_center_face)
        return out, faces, helper.detector_name


class ModelCache:
    def __init__(self, size: int):
        self.size = max(1, size)
        self._items: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, row: ModelRow) -> Loaded:
        key = f"{row.id}:{row.sha256}"
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:  # one load per model, however many requests ask at once
            with self._lock:
                if key in self._items:
                    return self._items[key]
            loaded = self._load(row)
            with self._lock:
                self._items[key] = loaded
                self._loading.pop(key, None)
                while len(self._items) > self.size:
                    _, old = self._items.popitem(last=False)
                    old.batcher.close()
            return loaded

    def clear(self) -> None:
        with self._lock:
            for item in self._items.values():
                item.batcher.close()
            self._items.clear()

    def _load(self, row: ModelRow) -> Loaded:
        from restoration.pipeline import Restorer
        from restoration.zoo import ModelCard, Zoo

        settings = get_settings()
        t0 = time.perf_counter()
        if row.builtin:
            zoo, zoo_name = Zoo(), row.name
        else:
            zoo, zoo_name = materialise(row), row.id
        card = ModelCard.from_json(row.card)
        restorer = Restorer(zoo.load(zoo_name), card, device=settings.device, batch_size=settings.batch_max_size)
        MODEL_LOADS.inc()
        log.info("loaded model %s (%s) in %.2fs", row.name, row.id, time.perf_counter() - t0)
        batcher = MicroBatcher(restorer.restore_crops, settings.batch_max_size, settings.batch_max_wait_ms / 1000.0, row.name)
        return Loaded(restorer, batcher)


def materialise(row: ModelRow):
    """Fetch a registry model's files from storage into this process's cache; returns a Zoo holding it as `row.id`."""
    from app.storage import get_storage
    from restoration.zoo import Zoo

    root = get_settings().cache_path / "models"
    storage = get_storage()
    folder = root / row.id
    for fname, key in row.files.items():
        storage.fetch_to(key, folder / fname)
    return Zoo(root=root, builtin_dir=None)


_cache: ModelCache | None = None


def get_cache() -> ModelCache:
    global _cache
    if _cache is None:
        _cache = ModelCache(get_settings().model_cache_size)
    return _cache
