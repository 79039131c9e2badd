"""The pipeline's Celery tasks: ``interval.ingest`` then ``interval.analyze``, each safe to run more than once.

Delivery is at least once (``workers.celery_app``): after a worker is killed, or when an acknowledgement is lost
in a Redis restart, a step runs again, and a trigger may queue a second chain for the same Task. What keeps the
result exactly once:

- **Claims.** A step starts by claiming the FHIR Task in the ResourceStore (a compare-and-set on its version):
  status ``in-progress``, ``Task.owner`` = the chain's root task id, ``Task.businessStatus`` = the step,
  ``Task.lastModified`` = now. A delivery of the same chain (same root id: a redelivery, a retry, the next
  step) takes the claim over at once. Another chain waits while the claim is younger than ``task_time_limit_s``
  (within which a live step has ended or been killed) and takes it over after that. A Task that is
  ``completed``, ``failed`` or ``cancelled`` is left alone: the step ends doing nothing.
- **The EHR** receives the report as one transaction keyed by the report identifier (study + model version);
  a repeat finds it and writes nothing (``adapters.fhir_publish.publish_report``).
- **The PACS** receives the DICOM SEG and SR (when ``pacs_dicomweb_url`` is set) with SOP Instance UIDs derived
  from the series and the model version: a repeat stores the same instances again, which the PACS keeps once
  (``workers.analysis.publish_to_pacs``).
- **The store** receives the Bundle and the completed Task in one database transaction guarded by the Task's
  version, and a Task already ``completed`` is left alone (``service.jobs.complete_task``).

Errors: an unreachable EHR, PACS or database (``ExternalServiceError``, a lost database connection) is retried
with exponential backoff, ``task_max_retries`` times, then the Task ends ``failed`` with the error's message;
any other error fails the Task at once (``service.jobs.record_failure``), as does a step that outlives its soft
time limit. Logs name the Task, the study and the step; never the patient.

Each worker process builds its store, image source and analyzer once, on first use (the model is loaded in the
process that runs ``interval.analyze``, never per task, never in a process that only ingests).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy.exc
from celery import Task
from celery.exceptions import Retry, SoftTimeLimitExceeded
from sqlalchemy import create_engine, text

from adapters.dicomweb import DicomWebImageSource
from adapters.resource_store import ResourceStore, format_instant
from adapters.settings import Settings
from adapters.telemetry import timed
from core.errors import AnalysisError, ExternalServiceError, InputError, ModelError
from core.ports import ImageSource, Segmenter
from core.types import Segmentation, Volume
from service.jobs import AnalysisRequest, Analyzer, complete_task, record_failure, transition
from workers.celery_app import ANALYZE, INGEST, TRUTH_MODEL_VERSION, AnalysisMessage, IntervalCelery, app
from workers.serve import image_source, pacs_client

__all__ = ["OWNER_SYSTEM", "STEP_SYSTEM", "Claim", "WorkerResources", "analyze", "claim_task", "ingest"]

log = logging.getLogger("interval.workers.tasks")

OWNER_SYSTEM = (
    "http://interval.local/fhir/analysis-attempt"  # Task.owner.identifier: the chain's root task id
)
STEP_SYSTEM = "http://interval.local/fhir/CodeSystem/analysis-step"  # Task.businessStatus
STEP_TEXT = {"ingest": "retrieving the study", "analyze": "analysing the study"}
_OPEN = ("requested", "in-progress")
# an unreachable service: retried with backoff. A lost database connection counts (SQLAlchemy's errors)
RETRYABLE: tuple[type[BaseException], ...] = (
    ExternalServiceError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
)
Outcome = Literal["done", "failed", "skipped"]
_COMPLETION_LOCK = 0x496E74657276616C  # PostgreSQL advisory lock key ("Interval")


@dataclass(frozen=True)
class Claim:
    """Whether this attempt may run its step: ``run``; ``done`` (the Task is finished: nothing to do); ``busy``
    (another chain holds a fresh claim; ask again in ``wait_s`` seconds)."""

    state: Literal["run", "done", "busy"]
    wait_s: float = 0.0


def _owner(task: dict[str, Any]) -> str | None:
    ident = (task.get("owner") or {}).get("identifier") or {}
    value = ident.get("value") if ident.get("system") == OWNER_SYSTEM else None
    return value if isinstance(value, str) else None


def _age_s(instant: Any, now: dt.datetime) -> float:
    if not isinstance(instant, str):
        return float("inf")
    try:
        then = dt.datetime.fromisoformat(instant.replace("Z", "+00:00"))
    except ValueError:
        return float("inf")
    if then.tzinfo is None:
        then = then.replace(tzinfo=dt.UTC)
    return (now - then).total_seconds()


def claim_task(store: ResourceStore, task_id: str, attempt: str, step: str, stale_after_s: float) -> Claim:
    """Claim Task ``task_id`` for ``step`` of chain ``attempt`` (see the module docstring)."""
    result = Claim("run")

    def change(task: dict[str, Any]) -> bool:
        nonlocal result
        if task.get("status") not in _OPEN:
            result = Claim("done")
            return False
        now = dt.datetime.now(dt.UTC)
        owner = _owner(task)
        if task.get("status") == "in-progress" and owner not in (None, attempt):
            age = _age_s(task.get("lastModified"), now)
            if age < stale_after_s:
                result = Claim("busy", stale_after_s - age)
                return False
            log.warning("Task/%s: taking over from attempt %s, silent for %.0f s", task_id, owner, age)
        result = Claim("run")
        instant = format_instant(now.replace(tzinfo=None))
        task["status"] = "in-progress"
        task["lastModified"] = instant
        task["executionPeriod"] = {"start": instant, **(task.get("executionPeriod") or {})}
        task["owner"] = {
            "identifier": {"system": OWNER_SYSTEM, "value": attempt},
            "display": "Interval analysis worker",
        }
        task["businessStatus"] = {"coding": [{"system": STEP_SYSTEM, "code": step}], "text": STEP_TEXT[step]}
        task.pop("statusReason", None)
        return True

    transition(store, task_id, change)
    return result


# --- per-process resources ----------------------------------------------------------------------------------


class _TruthSegmenters:
    """Test hook (``INTERVAL_TEST_SEGMENTER=truth:<folder>``): the synthetic cohort's ground-truth label maps
    instead of the model, for every patient folder under ``root`` (or ``root`` itself)."""

    model_version = TRUTH_MODEL_VERSION

    def __init__(self, root: Path) -> None:
        from fixtures.synth.evaluation import TruthSegmenter

        folders = [root] if any(root.glob("t*/truth.json")) else sorted(root.glob("*/"))
        self._by_uid: dict[str, Segmenter] = {}
        for folder in folders:
            if any(folder.glob("t*/truth.json")):
                truth = TruthSegmenter(folder)
                self._by_uid.update(dict.fromkeys(truth.by_uid, truth))

    def segment(self, volume: Volume) -> Segmentation:
        uid = volume.acquisition.study_uid if volume.acquisition is not None else ""
        segmenter = self._by_uid.get(uid)
        if segmenter is None:
            raise InputError(f"the test segmenter has no ground truth for study {uid}", study_uid=uid)
        return segmenter.segment(volume)


class _Delayed:
    """Test hook (``INTERVAL_TEST_ANALYSIS_DELAY_S``): sleeps before and after the analysis (which publishes
    to the EHR), so that a test can kill the worker on either side of the publication."""

    def __init__(self, inner: Analyzer, delay_s: float) -> None:
        self._inner = inner
        self._delay_s = delay_s

    @property
    def model_version(self) -> str:
        return self._inner.model_version

    def __call__(self, request: AnalysisRequest) -> dict[str, Any]:
        time.sleep(self._delay_s)
        bundle = self._inner(request)
        time.sleep(self._delay_s)
        return bundle


class WorkerResources:
    """What the tasks of one worker process share, each built on first use: the store, the image source, the
    analyzer (and with it the model)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._store: ResourceStore | None = None
        self._images: ImageSource | None = None
        self._analyzer: Analyzer | None = None
        self._lock_engine: sqlalchemy.Engine | None = None

    @contextmanager
    def completion_lock(self) -> Iterator[None]:
        """Completions one at a time across all worker processes (PostgreSQL session advisory lock, released by
        the server if the holder dies). The store's conditional creates (the model's Device, lesion tracks)
        look up, then insert: two processes completing at once would both insert, and every later completion
        would then fail on "matches more than one". Completing takes milliseconds."""
        url = self.settings.database_url
        if not url.startswith("postgresql"):
            yield  # SQLite: one writer at a time already
            return
        with self._lock:
            if self._lock_engine is None:
                self._lock_engine = create_engine(url, pool_size=1, max_overflow=1, pool_pre_ping=True)
            engine = self._lock_engine
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _COMPLETION_LOCK})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _COMPLETION_LOCK})

    @property
    def store(self) -> ResourceStore:
        with self._lock:
            if self._store is None:
                self._store = ResourceStore(self.settings.database_url)
            return self._store

    @property
    def images(self) -> ImageSource:
        with self._lock:
            if self._images is None:
                self._images = self._image_source()
            return self._images

    @property
    def analyzer(self) -> Analyzer:
        images = self.images
        with self._lock:
            if self._analyzer is None:
                self._analyzer = self._build_analyzer(images)
            return self._analyzer

    def _image_source(self) -> ImageSource:
        """The PACS (DICOMweb, with the study cache) when ``pacs_dicomweb_url`` is set, else the folders."""
        return image_source(self.settings, pacs_client(self.settings))

    def _build_analyzer(self, images: ImageSource) -> Analyzer:
        from workers.serve import build_analyzer

        s = self.settings
        segmenter: Segmenter | None = None
        if s.test_segmenter is not None:
            segmenter = _TruthSegmenters(Path(s.test_segmenter.removeprefix("truth:")))
        started = time.monotonic()
        # loads the model (torch on one thread) unless a test hook; the SEG and SR go to this source's PACS
        pipeline = build_analyzer(s, segmenter, images)
        log.info(
            "process %d: analyzer %s ready in %.1f s",
            os.getpid(),
            pipeline.model_version,
            time.monotonic() - started,
        )
        return _Delayed(pipeline, s.test_analysis_delay_s) if s.test_analysis_delay_s else pipeline


_resources: dict[int, WorkerResources] = {}
_resources_lock = threading.Lock()


def resources(settings: Settings) -> WorkerResources:
    """This process's resources (a forked child never uses its parent's database connections)."""
    with _resources_lock:
        found = _resources.get(os.getpid())
        if found is None or found.settings is not settings:
            _resources.clear()
            found = _resources[os.getpid()] = WorkerResources(settings)
        return found


# --- the tasks ------------------------------------------------------------------------------------------------


def _backoff_s(settings: Settings, retries: int) -> float:
    return float(min(settings.task_retry_backoff_max_s, settings.task_retry_backoff_s * 2**retries))


def _run_step(
    task: Task[Any, Any],
    message: AnalysisMessage,
    io_retries: int,
    step: str,
    work: Callable[[WorkerResources, AnalysisRequest], None],
) -> Outcome:
    """Claim the Task, do ``work``, record how it ended; retry what an unreachable service made fail."""
    celery_app = task.app
    assert isinstance(celery_app, IntervalCelery)
    settings = celery_app.settings
    attempt = str(task.request.root_id or task.request.id)
    label = message.label()
    res = resources(settings)
    request = message.to_request()
    try:
        claim = claim_task(res.store, request.task_id, attempt, step, settings.task_time_limit_s)
        if claim.state == "done":
            log.info("%s: already finished, %s skipped", label, step)
            return "skipped"
        if claim.state == "busy":
            wait_s = max(0.5, min(claim.wait_s, settings.task_retry_backoff_max_s))
            log.info("%s: another attempt holds it; %s asks again in %.1f s", label, step, wait_s)
            raise task.retry(countdown=wait_s)
        log.info("%s: %s started (attempt %s)", label, step, attempt)
        work(res, request)
        log.info("%s: %s done", label, step)
        return "done"
    except Retry:
        raise
    except RETRYABLE as exc:
        if io_retries < settings.task_max_retries:
            wait_s = _backoff_s(settings, io_retries)
            log.warning(
                "%s: %s met %s; retry %d in %.1f s", label, step, type(exc).__name__, io_retries + 1, wait_s
            )
            _note_retry(res.store, request.task_id, attempt, step, exc)
            raise task.retry(countdown=wait_s, kwargs={"io_retries": io_retries + 1}) from None
        failure: BaseException = exc
    except SoftTimeLimitExceeded:
        failure = AnalysisError(
            f"{step} of study {message.study_uid} took longer than {settings.task_time_limit_s * 0.9:.0f} s "
            "(INTERVAL_TASK_TIME_LIMIT_S); post the Task again, or raise the limit",
            study_uid=message.study_uid,
        )
    except Exception as exc:  # noqa: BLE001 - every failure ends recorded on the Task (service.jobs)
        failure = exc
    record_failure(res.store, request.task_id, failure, unless=lambda t: _owner(t) not in (None, attempt))
    log.info("%s: %s failed (%s)", label, step, getattr(failure, "reason", type(failure).__name__))
    return "failed"


def _note_retry(store: ResourceStore, task_id: str, attempt: str, step: str, exc: BaseException) -> None:
    """Say on the Task (``businessStatus``) that its step waits to retry, and why; best effort."""
    why = (
        str(exc)
        if isinstance(exc, ExternalServiceError)
        else f"the database is unreachable ({type(exc).__name__})"
    )

    def note(task: dict[str, Any]) -> bool:
        if task.get("status") != "in-progress" or _owner(task) != attempt:
            return False
        task["businessStatus"] = {
            "coding": [{"system": STEP_SYSTEM, "code": step}],
            "text": f"{STEP_TEXT[step]}: waiting to retry: {why}",
        }
        task["lastModified"] = format_instant(dt.datetime.now(dt.UTC).replace(tzinfo=None))
        return True

    try:
        transition(store, task_id, note)
    except Exception:  # noqa: BLE001 - the store may be what is down; the retry goes ahead regardless
        log.warning("Task/%s: could not note the retry on the Task", task_id)


def _ingest(res: WorkerResources, request: AnalysisRequest) -> None:
    images = res.images
    if isinstance(images, DicomWebImageSource):
        with timed("retrieve"):
            images.fetch(request.study_uid)  # into the image cache, once; a repeat finds it there


def _analyze(model_version: str) -> Callable[[WorkerResources, AnalysisRequest], None]:
    def work(res: WorkerResources, request: AnalysisRequest) -> None:
        analyzer = res.analyzer
        if analyzer.model_version != model_version:
            raise ModelError(
                f"Task/{request.task_id} was keyed for model {model_version}, but this worker runs "
                f"{analyzer.model_version}: give the API and the imaging workers the same model "
                "(INTERVAL_SEGMENTER_WEIGHTS or INTERVAL_MODEL_VERSION), then post the Task again"
            )
        bundle = analyzer(request)
        with res.completion_lock():
            complete_task(res.store, request, bundle)

    return work


@app.task(bind=True, name=INGEST, pydantic=True, max_retries=None)  # type: ignore[untyped-decorator]
def ingest(self: Task, message: AnalysisMessage, io_retries: int = 0) -> str:
    """Retrieve the study from the PACS into the image cache (DICOMweb image source); nothing for folders."""
    return _run_step(self, message, io_retries, "ingest", _ingest)


@app.task(bind=True, name=ANALYZE, pydantic=True, max_retries=None)  # type: ignore[untyped-decorator]
def analyze(self: Task, message: AnalysisMessage, io_retries: int = 0) -> str:
    """Segment, read priors from the EHR, publish the report there and the SEG + SR to the PACS, store the Bundle,
    complete the Task."""
    return _run_step(self, message, io_retries, "analyze", _analyze(message.model_version))
