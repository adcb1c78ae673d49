"""Prometheus metrics: request counts and latencies per route, restore batch sizes, queue depth, jobs by status,
live workers; and the broker probe /metrics and /readyz share (`BROKER`: never waits long on a dead broker)."""
from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from service.db import session_factory
from service.jobs import status_counts
from service.leases import live_workers
from service.queue import ping_broker, queue_depths
from service.rows import JOB_STATUSES
from service.settings import get_settings

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry()
REQUESTS = Counter("faceadapt_http_requests_total", "HTTP requests by route, method and status code",
                   ["route", "method", "status"], registry=REGISTRY)
LATENCY = Histogram("faceadapt_http_request_duration_seconds", "HTTP request latency by route and method",
                    ["route", "method"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
BATCH_SIZE = Histogram("faceadapt_restore_batch_size", "Face crops per restore micro-batch", ["model"],
                       registry=REGISTRY, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
MODEL_LOADS = Counter("faceadapt_model_loads_total", "Models loaded into this API process", registry=REGISTRY)


class ObserveMiddleware:
    """ASGI middleware: every HTTP request counted (`REQUESTS`, by route template, method and status) and timed
    (`LATENCY`). An exception that escapes counts as a 500 (the outer UnexpectedErrorMiddleware answers it). Plain
    ASGI, not Starlette's BaseHTTPMiddleware: no extra task and body stream per request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except Exception:
            status = 500
            raise
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            REQUESTS.labels(label, scope["method"], str(status)).inc()
            LATENCY.labels(label, scope["method"]).observe(time.perf_counter() - t0)


class BrokerProbe:
    """The broker's health and queue depths, measured in a background thread at most every
    `broker_probe_max_age_s`; a caller waits at most `broker_probe_timeout_s` for a fresh answer, then gets the last
    one (or 'no answer'). One probe at a time: a broker that black-holes connections holds one thread, not one per
    scrape."""

    def __init__(self):
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._result: tuple[float, str | None, dict[str, int]] | None = None  # (when, error or None, depths)
        self._running_since: float | None = None

    def _probe(self) -> None:
        try:
            ping_broker()
            result = (time.monotonic(), None, queue_depths())
        except Exception as exc:
            result = (time.monotonic(), f"{type(exc).__name__}: {exc}"[:300], {})
        with self._lock:
            self._result, self._running_since = result, None
            self._done.notify_all()

    def get(self) -> tuple[str | None, dict[str, int]]:
        """(None, queue depths) when the broker answered; (the error, {}) when it did not."""
        settings = get_settings()
        now = time.monotonic()
        with self._lock:
            fresh = self._result is not None and now - self._result[0] <= settings.broker_probe_max_age_s
            if not fresh:
                if self._running_since is None:
                    self._running_since = now
                    threading.Thread(target=self._probe, name="faceadapt-broker-probe", daemon=True).start()
                self._done.wait_for(lambda: self._running_since is None, timeout=settings.broker_probe_timeout_s)
            if self._running_since is not None and \
                    time.monotonic() - self._running_since >= settings.broker_probe_timeout_s:
                return (f"the broker did not answer within {settings.broker_probe_timeout_s:g}s "
                        "(broker_probe_timeout_s)"), {}
            if self._result is None:
                return "the broker was not probed yet", {}
            return self._result[1], self._result[2]


BROKER = BrokerProbe()


class ServiceCollector:
    """Collected at scrape time: queue depth from the broker, jobs by status from the database."""

    def collect(self):
        jobs = GaugeMetricFamily("faceadapt_jobs", "Adaptation jobs by status", labels=["status"])
        try:
            with session_factory()() as s:
                counts = status_counts(s)
            for status in JOB_STATUSES:
                jobs.add_metric([status], counts.get(status, 0))
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("jobs metric unavailable: %s", exc)
        yield jobs
        depth = GaugeMetricFamily("faceadapt_queue_depth", "Messages waiting in each Celery queue", labels=["queue"])
        error, depths = BROKER.get()  # bounded wait (broker_probe_timeout_s), a cached answer
        for queue, n in depths.items():
            depth.add_metric([queue], n)
        if error is not None:
            log.warning("queue depth metric unavailable: %s", error)
        yield depth
        yield GaugeMetricFamily("faceadapt_broker_up", "1 when the broker answered its last probe", value=int(error is None))
        workers = GaugeMetricFamily("faceadapt_workers_alive", "Workers with a fresh heartbeat (worker_ttl_s)")
        try:
            workers.add_metric([], live_workers())
        except Exception as exc:
            log.warning("workers metric unavailable: %s", exc)
        yield workers


REGISTRY.register(ServiceCollector())
