"""Operations: Prometheus metrics and structured (JSON) logs that carry job ids and never PHI.

Metrics (``prometheus_client``):

- ``interval_analyses_total{outcome, reason}``: analyses finished, by outcome (completed / failed) and by
  the failure's stable reason code (``core.errors`` ``reason``: ``external_service``, ``bad_input``...);
- ``interval_step_seconds{step}``: duration of each pipeline step (ingest, segment, measure, priors,
  compare, draft) and of ``publish``;
- ``interval_queue_depth{queue}``: messages waiting in each Celery queue (read from Redis at scrape time);
- ``interval_tasks{status}``: FHIR Tasks in Interval's store by status (read at scrape time);
- drift monitoring (``DriftCollector``, read from the drift tables at scrape time): ``interval_drift_score``,
  ``interval_drift_score_threshold``, ``interval_drift_alerts_active``, ``interval_drift_studies`` (since the
  reference) per ``{site, station}``, and ``interval_drift_signal_z{site, station, signal}`` (each signal's
  standardised distance in the last window); counted where they happen: ``interval_drift_alerts_raised_total
  {site, station}`` and ``interval_drift_record_failures_total``.

Celery's prefork workers are separate processes: set ``PROMETHEUS_MULTIPROC_DIR`` (a shared, emptied-at-
start folder) for workers and API on one host, and the API's ``/metrics`` aggregates them.

Logs: ``configure_logging()`` writes one JSON object per line with ``task_id`` and ``study_uid`` from
context variables (``log_context``); messages are written by Interval's own code, which logs identifiers,
never names, birth dates or report text.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = [
    "ANALYSES",
    "DRIFT_ALERTS",
    "DRIFT_RECORD_FAILURES",
    "STEP_SECONDS",
    "DriftCollector",
    "StoreCollector",
    "configure_logging",
    "log_context",
    "metrics_text",
    "observe_steps",
    "redis_queue_depths",
    "timed",
]

ANALYSES = Counter("interval_analyses_total", "Analyses finished", ["outcome", "reason"])
STEP_SECONDS = Histogram(
    "interval_step_seconds",
    "Duration of each pipeline step",
    ["step"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
)

DRIFT_ALERTS = Counter("interval_drift_alerts_raised_total", "Drift alerts raised", ["site", "station"])
DRIFT_RECORD_FAILURES = Counter(
    "interval_drift_record_failures_total", "Studies whose drift signals could not be recorded"
)

_task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("task_id", default=None)
_study_uid: contextvars.ContextVar[str | None] = contextvars.ContextVar("study_uid", default=None)


def observe_steps(step_seconds: dict[str, float]) -> None:
    for step, seconds in step_seconds.items():
        STEP_SECONDS.labels(step).observe(seconds)


@contextlib.contextmanager
def timed(step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        STEP_SECONDS.labels(step).observe(time.perf_counter() - start)


@contextlib.contextmanager
def log_context(*, task_id: str | None = None, study_uid: str | None = None) -> Iterator[None]:
    t1 = _task_id.set(task_id)
    t2 = _study_uid.set(study_uid)
    try:
        yield
    finally:
        _task_id.reset(t1)
        _study_uid.reset(t2)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, var in (("task_id", _task_id), ("study_uid", _study_uid)):
            value = getattr(record, key, None) or var.get()
            if value:
                out[key] = value
        if record.exc_info:
            out["exc_type"] = record.exc_info[0].__name__ if record.exc_info[0] else None
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class StoreCollector(Collector):
    """Gauges read at scrape time: Tasks by status, and queue depths (callables given by the app)."""

    def __init__(
        self,
        task_counts: Callable[[], dict[str, int]],
        queue_depths: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.task_counts = task_counts
        self.queue_depths = queue_depths
        self.extra: list[Collector] = []  # more scrape-time collectors (``DriftCollector``)

    def collect(self) -> Iterable[Metric]:
        tasks = GaugeMetricFamily("interval_tasks", "FHIR Tasks in the store by status", labels=["status"])
        for status, n in sorted(self.task_counts().items()):
            tasks.add_metric([status], n)
        yield tasks
        if self.queue_depths is not None:
            depth = GaugeMetricFamily("interval_queue_depth", "Messages waiting per queue", labels=["queue"])
            try:
                depths = self.queue_depths()
            except Exception:  # noqa: BLE001 - a broker that is down must not break the scrape
                depths = {}
            for queue, n in sorted(depths.items()):
                depth.add_metric([queue], n)
            yield depth
        for collector in self.extra:
            yield from collector.collect()


class DriftCollector(Collector):
    """Gauges of the drift monitor, read at scrape time from ``units`` (``DriftStore.units``)."""

    def __init__(self, units: Callable[[], list[Any]]) -> None:
        self.units = units

    def collect(self) -> Iterable[GaugeMetricFamily]:
        labels = ["site", "station"]
        score = GaugeMetricFamily(
            "interval_drift_score", "Concordance score of the last window", labels=labels
        )
        threshold = GaugeMetricFamily(
            "interval_drift_score_threshold", "Score above which a window is positive", labels=labels
        )
        active = GaugeMetricFamily("interval_drift_alerts_active", "Active drift alerts", labels=labels)
        studies = GaugeMetricFamily(
            "interval_drift_studies", "Studies recorded since the reference was set", labels=labels
        )
        z = GaugeMetricFamily(
            "interval_drift_signal_z",
            "Standardised distance of each signal in the last window",
            labels=[*labels, "signal"],
        )
        for u in self.units():
            key = [u.unit.site, u.unit.station]
            active.add_metric(key, u.active_alerts)
            studies.add_metric(key, u.studies_since_reference)
            if u.score is not None:
                score.add_metric(key, u.score)
            if u.score_threshold is not None:
                threshold.add_metric(key, u.score_threshold)
            for test in (u.last_evaluation or {}).get("tests", []):
                z.add_metric([*key, test["signal"]], test["z"])
        yield from (score, threshold, active, studies, z)


def metrics_text(extra: Collector | None = None) -> bytes:
    """The Prometheus exposition: this process (or every process, in multiprocess mode) + ``extra``."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
        if extra is not None:
            text = generate_latest(registry)
            mini = CollectorRegistry()
            mini.register(extra)
            return text + generate_latest(mini)
        return generate_latest(registry)
    if extra is not None:
        registry.register(extra)
    return generate_latest(registry)


def redis_queue_depths(broker_url: str, queues: Iterable[str]) -> Callable[[], dict[str, int]]:
    """A callable that reads the length of each Celery queue (a Redis list of the same name)."""
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=1, socket_timeout=1)
    names = list(queues)

    def depths() -> dict[str, int]:
        return {q: int(client.llen(q)) for q in names}  # type: ignore[arg-type]  # sync client

    return depths
