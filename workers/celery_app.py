"""Interval's Celery app: the analysis pipeline on workers, Redis as the broker, no study lost or reported twice.

    interval worker -Q imaging -c 1          # model inference (GPU nodes)
    interval worker -Q default -c 2          # the rest (retrieval from the PACS)
    celery -A workers.celery_app worker ...  # the same, with Celery's own command line

A FHIR Task is queued by ``CeleryRunner.submit`` as a chain of two tasks, each taking the request's identifiers
(``AnalysisMessage``), never pixels: ``interval.ingest`` (queue ``default``: retrieve the study from the PACS into
the image cache when the image source is DICOMweb) and ``interval.analyze`` (queue ``imaging``: segment, read the
priors from the EHR, publish the report there, send the DICOM SEG and SR to the PACS when there is one, store the
Bundle and complete the Task). ``workers.tasks`` holds them and says how each stays idempotent. Tasks come from the
API: an EHR posts them, and so does ``interval watch-pacs`` when Orthanc announces a stable study
(``workers.pacs_trigger``).

Delivery is at least once: ``task_acks_late`` (a message is acknowledged when its task has finished) and
``task_reject_on_worker_lost`` (a pool process that dies returns its message to the queue). A worker killed as a
whole leaves its message unacknowledged in Redis; it is delivered again once it is older than
``visibility_timeout_s``, which is therefore longer than any task (``task_time_limit_s``) or retry delay.
kombu 5.6 returns such messages only when a worker starts and then every ~100 s; ``RestoreUnacked`` makes every
worker do it each ``unacked_restore_interval_s``. (kombu has no ``unacked_restore_interval`` or
``unacked_restore_throttle`` transport option: they would be ignored.) The job state is the FHIR Task in the
ResourceStore, not a Celery result: no result backend is used.

This module imports no torch and no model: the API process uses ``CeleryRunner`` and ``api_from_env`` from here.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Any

import redis.exceptions
from celery import Celery, bootsteps, chain
from celery.signals import after_setup_logger, worker_process_init
from kombu import Queue
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.utils.url import maybe_sanitize_url
from pydantic import BaseModel, ConfigDict

from adapters.resource_store import ResourceStore
from adapters.settings import Settings
from core.errors import ExternalServiceError, ModelError
from service.jobs import AnalysisRequest

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "ANALYZE",
    "DEFAULT_QUEUE",
    "IMAGING_QUEUE",
    "INGEST",
    "QUEUES",
    "AnalysisMessage",
    "CeleryRunner",
    "IntervalCelery",
    "RestoreUnacked",
    "api_from_env",
    "api_model_version",
    "app",
    "create_celery",
]

log = logging.getLogger("interval.workers")

IMAGING_QUEUE = "imaging"  # model inference
DEFAULT_QUEUE = "default"  # everything else
QUEUES = (IMAGING_QUEUE, DEFAULT_QUEUE)
INGEST = "interval.ingest"
ANALYZE = "interval.analyze"
TRUTH_MODEL_VERSION = "ground-truth"  # fixtures.synth.evaluation.TruthSegmenter (test hook)
# the API answers the EHR quickly: a broker that is down fails the Task ("post it again") within ~2 s
SUBMIT_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}
# a worker handing one step to the next waits out a Redis restart (~1 min) rather than drop the chain
PUBLISH_RETRY_POLICY = {"max_retries": 20, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 5.0}
_BROKER_ERRORS = (KombuOperationalError, redis.exceptions.RedisError, OSError)


class AnalysisMessage(BaseModel):
    """What a pipeline task receives: the ``AnalysisRequest``'s identifiers and the model version the Task's
    idempotency key names (a worker with another model refuses the job rather than mislabel its report)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    task_id: str
    study_uid: str
    patient_id: str
    patient_ref: str | None
    model_version: str

    @classmethod
    def from_request(cls, request: AnalysisRequest, model_version: str) -> AnalysisMessage:
        return cls(
            task_id=request.task_id,
            study_uid=request.study_uid,
            patient_id=request.patient_id,
            patient_ref=request.patient_ref,
            model_version=model_version,
        )

    def to_request(self) -> AnalysisRequest:
        return AnalysisRequest(self.task_id, self.study_uid, self.patient_id, self.patient_ref)

    def label(self) -> str:
        """How logs and the broker name this job: identifiers only (the patient's identifier is left out)."""
        return f"Task/{self.task_id} study {self.study_uid}"


class IntervalCelery(Celery):  # type: ignore[misc]  # celery ships no types
    """A Celery app that carries the ``Settings`` it was made from (read once, at the edge)."""

    settings: Settings


class RestoreUnacked(bootsteps.StartStopStep):  # type: ignore[misc]
    """Consumer step: every ``unacked_restore_interval_s`` return deliveries that stayed unacknowledged longer
    than the visibility timeout (their worker was killed) to their queue, through kombu's own Redis QoS
    (``restore_visible``: a Redis mutex keeps workers from doing it twice)."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._entry: Any = None

    def start(self, c: Any) -> None:
        settings: Settings = c.app.settings
        self._entry = c.timer.call_repeatedly(
            settings.unacked_restore_interval_s, self._restore, (c, settings.unacked_restore_limit)
        )

    def stop(self, c: Any) -> None:
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None

    def shutdown(self, c: Any) -> None:
        self.stop(c)

    @staticmethod
    def _restore(c: Any, limit: int) -> None:
        channel = getattr(c.task_consumer, "channel", None)
        restore = getattr(getattr(channel, "qos", None), "restore_visible", None)
        if restore is None:  # not the Redis transport
            return
        try:
            restore(num=limit, interval=1)
        except _BROKER_ERRORS as exc:  # the broker is away; the consumer reconnects, the next pass restores
            log.warning("could not return unacknowledged tasks to their queues: %s", type(exc).__name__)


def create_celery(settings: Settings) -> IntervalCelery:
    """The Celery app of Interval's pipeline, configured from ``settings`` (see the module docstring)."""
    celery_app = IntervalCelery("interval", include=["workers.tasks"])
    celery_app.settings = settings
    celery_app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_limit": settings.unacked_restore_limit,
        },
        task_queues=(Queue(DEFAULT_QUEUE), Queue(IMAGING_QUEUE)),
        task_default_queue=DEFAULT_QUEUE,
        task_routes={ANALYZE: {"queue": IMAGING_QUEUE}, INGEST: {"queue": DEFAULT_QUEUE}},
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # the job's state is its FHIR Task
        task_time_limit=settings.task_time_limit_s,
        task_soft_time_limit=settings.task_time_limit_s * 0.9,
        task_publish_retry=True,
        task_publish_retry_policy=PUBLISH_RETRY_POLICY,
        worker_cancel_long_running_tasks_on_connection_loss=False,  # a task running through a Redis restart ends
        worker_send_task_events=settings.task_events,  # for Flower
        task_send_sent_event=settings.task_events,
        worker_hijack_root_logger=True,
        worker_task_log_format=(
            "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s"
        ),
    )
    celery_app.steps["consumer"].add(RestoreUnacked)
    return celery_app


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _one_thread_per_process(**_: Any) -> None:
    """Each pool process computes on one thread (on two shared cores two threads ran 3-13x slower)."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[variable] = "1"
    torch = sys.modules.get(
        "torch"
    )  # imported only where the model is loaded (workers.tasks sets it there too)
    if torch is not None:
        torch.set_num_threads(1)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _load_dicom_tables(**_: Any) -> None:
    """Each pool process reads the DICOM standard's tables for the SEG and SR writers once, at start, not
    within its first study (``adapters.dicom_seg.load_writer_tables``; imported here, never in the API)."""
    from adapters.dicom_seg import load_writer_tables

    load_writer_tables()


@after_setup_logger.connect  # type: ignore[untyped-decorator]
def _no_urls_in_logs(**_: Any) -> None:
    """httpx logs every request's URL at INFO; a search URL can hold a patient identifier."""
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def api_model_version(settings: Settings) -> str:
    """The model version an API process keys Tasks with, without loading the model: ``settings.model_version``,
    else the ground truth's (test hook), else the version the workers' segmenter gives the configured model
    (``models.segmentation.contract.ModelSource.version``: the same digest of its files, read without torch; a
    worker whose model differs refuses the job with a message saying so)."""
    if settings.model_version:
        return settings.model_version
    if settings.test_segmenter is not None:
        return TRUTH_MODEL_VERSION
    from models.segmentation.contract import source_from_settings  # no torch: the API loads no model

    try:
        return source_from_settings(settings).version()
    except (OSError, ModelError) as exc:
        what = (
            settings.segmenter_model if settings.segmenter_kind != "builtin" else settings.segmenter_weights
        )
        raise ExternalServiceError(
            f"cannot read the segmentation model {what.name if what else ''!r} to name the model version "
            f"({exc if isinstance(exc, ModelError) else type(exc).__name__}); set INTERVAL_MODEL_VERSION or the "
            "INTERVAL_SEGMENTER_* settings"
        ) from None


class CeleryRunner:
    """``service.jobs.TaskRunner`` that queues each analysis to the Celery workers (chain ingest -> analyze).

    Only a Task in status ``requested`` is queued: one that is ``in-progress`` already has its chain, and a
    ``completed`` or ``failed`` one has nothing left to do (a failed Task is re-queued by posting it again,
    which makes it ``requested``). ``submit`` raises ``ExternalServiceError`` when the broker is unreachable,
    which the API records on the Task.
    """

    def __init__(self, store: ResourceStore, app: Celery, model_version: str) -> None:
        self._store = store
        self._app = app
        self._model_version = model_version

    @property
    def model_version(self) -> str:
        return self._model_version

    def submit(self, request: AnalysisRequest) -> None:
        task = self._store.read("Task", request.task_id)
        status = task.get("status") if task is not None else None
        if status != "requested":
            log.info("Task/%s is %s, not requested: not queued again", request.task_id, status or "missing")
            return
        message = AnalysisMessage.from_request(request, self._model_version)
        body = message.model_dump(mode="json")
        options = {"argsrepr": f"({message.label()!r},)", "kwargsrepr": "{}"}
        flow = chain(
            self._app.signature(INGEST, args=(body,), options=options, immutable=True),
            self._app.signature(ANALYZE, args=(body,), options=options, immutable=True),
        )
        try:
            flow.apply_async(retry=True, retry_policy=SUBMIT_RETRY_POLICY)
        except _BROKER_ERRORS as exc:
            broker = maybe_sanitize_url(str(self._app.conf.broker_url))
            raise ExternalServiceError(
                f"the analysis queue at {broker} is unreachable ({type(exc).__name__}); Task/{request.task_id} "
                "was not queued: post the Task again when the queue is back",
                study_uid=request.study_uid,
            ) from None
        log.info("queued %s", message.label())


def api_from_env() -> FastAPI:
    """The FHIR API whose Tasks are analysed by the Celery workers (no model in this process):
    ``uvicorn workers.celery_app:api_from_env --factory``."""
    from models.segmentation.model_card import (
        card_for_settings,
    )  # no torch: reads the card and the model's files
    from service.app import create_app

    settings = Settings()
    store = ResourceStore(settings.database_url)
    runner = CeleryRunner(store, create_celery(settings), api_model_version(settings))
    return create_app(settings, store=store, runner=runner, model_card=card_for_settings(settings))


app = create_celery(Settings())
