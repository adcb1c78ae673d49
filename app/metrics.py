"""Prometheus metrics: request counts and latencies per route, restore batch sizes, queue depth, jobs by status."""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from service.db import session_factory
from service.jobs import status_counts
from service.queue import queue_depths
from service.rows import JOB_STATUSES

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
        try:
            for queue, n in queue_depths().items():
                depth.add_metric([queue], n)
        except Exception as exc:
            log.warning("queue depth metric unavailable: %s", exc)
        yield depth


REGISTRY.register(ServiceCollector())
