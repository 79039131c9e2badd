"""The contract between the FHIR API and the analysis: a Task in, a transaction Bundle out.

An EHR posts a ``Task`` (code ``analyze``, focus = the ImagingStudy, for = the Patient). The API turns
it into an ``AnalysisRequest`` and hands it to a ``TaskRunner``. The runner moves the Task through
``requested -> in-progress -> completed | failed``: it calls the ``Analyzer``, which returns a FHIR
transaction Bundle (``urn:uuid:`` fullUrls) holding exactly one DiagnosticReport plus its Observations,
BodyStructures, Provenance and Device; the runner stores that Bundle and completes the Task with an
``output`` naming the DiagnosticReport, in the same database transaction.

Failures are recorded on the Task, never lost: an ``IntervalError`` (whose message is written to be
shown to users and holds no PHI) becomes ``Task.statusReason.text``; anything else becomes
``internal error, reference <uuid>``, with the traceback logged under that reference. A failed Task is
retried by posting the same Task again (the API re-queues it).

Every runner records the end of a job with the same two functions: ``complete_task`` (store the
Bundle and complete the Task in one database transaction; a Task already ``completed`` is left alone,
so that a job run twice, after a crash or a duplicate delivery, stores one report) and
``record_failure``. ``InProcessRunner`` runs analyses on a thread pool in the API process (the
embedded default); ``workers.celery_app.CeleryRunner`` queues them to Celery workers (production).
"""

from __future__ import annotations

import concurrent.futures
import logging
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from adapters.fhir_audit import audit_event, entity, model_agent, system_agent
from adapters.fhir_codes import DICOM_UID, PATIENT_ID_SYSTEM
from adapters.fhir_publish import AI_NOT_USED, AI_OUTCOME_SYSTEM, SITE_EXTENSION
from adapters.fhir_search import parse_reference
from adapters.fhir_validation import InvalidResourceError, require_code
from adapters.resource_store import ResourceNotFoundError, ResourceStore, VersionConflict, format_instant
from adapters.sql_store import utc_now
from core.errors import AnalysisError, IntervalError, ModelError, PatientMismatchError

__all__ = [
    "TASK_CODE_ANALYZE",
    "TASK_CODE_SYSTEM",
    "TASK_KEY_SYSTEM",
    "AnalysisRequest",
    "Analyzer",
    "InProcessRunner",
    "TaskRunner",
    "UnconfiguredAnalyzer",
    "check_new_task",
    "complete_task",
    "failure_message",
    "job_key",
    "mark_failed",
    "record_failure",
    "resume_pending",
    "transition",
]

log = logging.getLogger("interval.service.jobs")

TASK_CODE_SYSTEM = "http://interval.local/fhir/CodeSystem/task-code"
TASK_CODE_ANALYZE = "analyze"
TASK_KEY_SYSTEM = "http://interval.local/fhir/analysis-key"  # Task.identifier: the idempotency key
DICOM_STUDY_UID_CODE = "110180"  # DCM "Study Instance UID"
_UID = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+")
_TASK_STATUSES = frozenset(
    {
        "draft",
        "requested",
        "received",
        "accepted",
        "rejected",
        "ready",
        "cancelled",
        "in-progress",
        "on-hold",
        "failed",
        "completed",
        "entered-in-error",
    }
)


@dataclass(frozen=True)
class AnalysisRequest:
    """What the analysis needs to know about one trigger; identifiers only, no clinical content."""

    task_id: str
    study_uid: str  # DICOM StudyInstanceUID, without the urn:oid: prefix
    patient_id: str  # the patient's identifier value (system PATIENT_ID_SYSTEM) or the Patient's id
    patient_ref: str | None  # Task.for.reference when given ("Patient/123")

    @classmethod
    def from_fhir(cls, task: dict[str, Any]) -> AnalysisRequest:
        """Read the study and patient from a Task; ``InvalidResourceError`` names what is missing.

        The StudyInstanceUID comes from ``Task.focus.identifier`` (system ``urn:dicom:uid``, value
        ``urn:oid:<uid>``) or else from a ``Task.input`` (valueOid, a urn:dicom:uid valueIdentifier,
        or a valueString typed DCM 110180 / "StudyInstanceUID"). The patient is ``Task.for``: an
        identifier with system ``PATIENT_ID_SYSTEM`` and/or a reference to a Patient.
        """
        task_id = task.get("id") if isinstance(task.get("id"), str) else ""
        return cls(str(task_id), _study_uid(task), *_patient(task))


class Analyzer(Protocol):
    """Runs one analysis; returns a FHIR transaction Bundle with exactly one DiagnosticReport."""

    @property
    def model_version(self) -> str: ...

    def __call__(self, request: AnalysisRequest) -> dict[str, Any]: ...


class UnconfiguredAnalyzer:
    """Stands in when the API starts without an analyzer: each Task fails with a message saying so."""

    model_version = "unconfigured"

    def __call__(self, request: AnalysisRequest) -> dict[str, Any]:
        raise ModelError(
            f"Task/{request.task_id} cannot be analysed: this API process has no analyzer configured; "
            "start it with create_app(analyzer=...) or with a runner that queues to the analysis workers"
        )


class TaskRunner(Protocol):
    """Where analyses run. ``model_version`` is part of each trigger's idempotency key."""

    @property
    def model_version(self) -> str: ...

    def submit(self, request: AnalysisRequest) -> None:
        """Queue the analysis; raise ``IntervalError`` (e.g. ``ExternalServiceError``) if it cannot be."""
        ...


def job_key(study_uid: str, model_version: str) -> str:
    """The idempotency key of a trigger: the same study analysed by the same model is one job."""
    return f"{study_uid}:{model_version}"


def check_new_task(task: dict[str, Any]) -> AnalysisRequest:
    """The request a newly posted Task asks for, after checking it is an Interval analysis order."""
    require_code(task.get("status"), "Task.status", {"requested"})
    require_code(task.get("intent"), "Task.intent", {"order"})
    codings = task.get("code", {}).get("coding", []) if isinstance(task.get("code"), dict) else []
    if not any(
        isinstance(c, dict) and c.get("system") == TASK_CODE_SYSTEM and c.get("code") == TASK_CODE_ANALYZE
        for c in codings
    ):
        raise InvalidResourceError(
            "Task.code.coding", f"must contain system {TASK_CODE_SYSTEM} code {TASK_CODE_ANALYZE}"
        )
    return AnalysisRequest.from_fhir(task)


def _study_uid(task: dict[str, Any]) -> str:
    focus = task.get("focus")
    if not isinstance(focus, dict):
        raise InvalidResourceError("Task.focus", "required: the ImagingStudy to analyse")
    if focus.get("type") not in (None, "ImagingStudy"):
        raise InvalidResourceError("Task.focus.type", "must be ImagingStudy")
    if "reference" in focus:
        target = parse_reference(focus.get("reference"))
        if target is None or target[0] != "ImagingStudy":
            raise InvalidResourceError(
                "Task.focus.reference", "must reference an ImagingStudy (ImagingStudy/id)"
            )
    candidates: list[tuple[str, Any]] = []
    ident = focus.get("identifier")
    if isinstance(ident, dict) and ident.get("system") == DICOM_UID:
        candidates.append(("Task.focus.identifier.value", ident.get("value")))
    for i, item in enumerate(task.get("input") or []):
        if not isinstance(item, dict):
            continue
        where = f"Task.input[{i}]"
        if "valueOid" in item:
            candidates.append((f"{where}.valueOid", item["valueOid"]))
        value_ident = item.get("valueIdentifier")
        if isinstance(value_ident, dict) and value_ident.get("system") == DICOM_UID:
            candidates.append((f"{where}.valueIdentifier.value", value_ident.get("value")))
        if "valueString" in item and _is_study_uid_type(item.get("type")):
            candidates.append((f"{where}.valueString", item["valueString"]))
    if not candidates:
        raise InvalidResourceError(
            "Task.focus.identifier",
            f"the StudyInstanceUID is needed: identifier system {DICOM_UID}, value urn:oid:<uid> "
            "(or a Task.input valueOid)",
        )
    element, value = candidates[0]
    uid = value.removeprefix("urn:oid:") if isinstance(value, str) else ""
    if len(uid) > 64 or not _UID.fullmatch(uid):
        raise InvalidResourceError(element, "not a DICOM UID (digits and dots, at most 64 characters)")
    return uid


def _is_study_uid_type(concept: Any) -> bool:
    if not isinstance(concept, dict):
        return False
    if concept.get("text") == "StudyInstanceUID":
        return True
    codings = concept.get("coding")
    return isinstance(codings, list) and any(
        isinstance(c, dict) and c.get("code") == DICOM_STUDY_UID_CODE for c in codings
    )


def _patient(task: dict[str, Any]) -> tuple[str, str | None]:
    for_ = task.get("for")
    if not isinstance(for_, dict):
        raise InvalidResourceError("Task.for", "required: the Patient whose study this is")
    if for_.get("type") not in (None, "Patient"):
        raise InvalidResourceError("Task.for.type", "must be Patient")
    reference = for_.get("reference")
    ref_id: str | None = None
    if reference is not None:
        target = parse_reference(reference)
        if target is None or target[0] != "Patient":
            raise InvalidResourceError("Task.for.reference", "must reference a Patient (Patient/id)")
        ref_id = target[1]
    ident = for_.get("identifier")
    if (
        isinstance(ident, dict)
        and ident.get("system") == PATIENT_ID_SYSTEM
        and isinstance(ident.get("value"), str)
    ):
        return ident["value"], reference
    if ref_id is not None:
        return ref_id, reference
    raise InvalidResourceError(
        "Task.for", f"give reference Patient/id or an identifier with system {PATIENT_ID_SYSTEM}"
    )


class InProcessRunner:
    """Runs analyses on a thread pool inside the API process (the embedded default)."""

    def __init__(self, store: ResourceStore, analyzer: Analyzer, max_workers: int = 1) -> None:
        self._store = store
        self._analyzer = analyzer
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers, thread_name_prefix="interval-analysis"
        )
        self._futures: set[concurrent.futures.Future[None]] = set()
        self._lock = threading.Lock()

    @property
    def model_version(self) -> str:
        return self._analyzer.model_version

    def submit(self, request: AnalysisRequest) -> None:
        future = self._pool.submit(self.run, request)
        with self._lock:
            self._futures.add(future)
        future.add_done_callback(self._forget)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every submitted analysis; True when none is left running."""
        with self._lock:
            pending = set(self._futures)
        _, not_done = concurrent.futures.wait(pending, timeout)
        return not not_done

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def _forget(self, future: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._futures.discard(future)

    def run(self, request: AnalysisRequest) -> None:
        """One analysis, start to recorded end (synchronously; ``submit`` calls this on the pool)."""
        try:
            transition(self._store, request.task_id, _start)
            bundle = self._analyzer(request)
            complete_task(self._store, request, bundle)
        except Exception as exc:  # noqa: BLE001 - every failure ends recorded on the Task
            record_failure(self._store, request.task_id, exc)


def complete_task(store: ResourceStore, request: AnalysisRequest, bundle: dict[str, Any]) -> dict[str, Any]:
    """Store the analyzer's Bundle and complete the Task with an output naming its DiagnosticReport.

    Both happen in one database transaction, guarded by the Task's version (If-Match), so that of two
    attempts completing the same Task only one stores its Bundle. A Task that is already ``completed``
    is returned as it is and nothing is stored: re-running a job (a redelivered queue message, a
    duplicate trigger) never adds a second report. Returns the Task as stored.

    The same transaction stores the AuditEvent of the AI output (``ai-output``: the model's Device as agent, the
    report, the Task and the patient as entities). A Bundle tagged ``ai-not-used`` (the study's site has AI
    switched off: ``adapters.fhir_publish.ai_not_used_bundle``) holds no report: the Task completes with
    ``businessStatus`` ``ai-not-used`` (``AI_OUTCOME_SYSTEM``), the reason as its text, an ``output`` coded
    ``ai-not-used`` and one naming the ImagingStudy, and the study's site; its AuditEvent is ``ai-not-used``.
    """
    outcome = _check_result(request, bundle)
    for attempt in range(3):
        task = _read_task(store, request.task_id)
        if task.get("status") == "completed":
            log.info("Task/%s is already completed; the repeated result is not stored", request.task_id)
            return task
        done = dict(task)
        now = format_instant_now()
        done["status"] = "completed"
        done["lastModified"] = now
        done["executionPeriod"] = {**(task.get("executionPeriod") or {}), "end": now}
        done.pop("statusReason", None)
        done.pop("businessStatus", None)
        if isinstance(outcome, _NoAi):
            _mark_ai_not_used(done, outcome)
            event = audit_event(
                "ai-not-used",
                system_agent(),
                [entity(f"Task/{request.task_id}", "job"), entity(outcome.study_url, "resource")],
            )
        else:
            done["output"] = [
                {"type": {"text": "DiagnosticReport"}, "valueReference": {"reference": outcome.report_url}}
            ]
            event = audit_event(
                "ai-output",
                model_agent(outcome.device_url, _model_version(task)),
                [
                    entity(outcome.report_url, "report"),
                    entity(f"Task/{request.task_id}", "job"),
                    *([entity(outcome.patient_ref, "patient")] if outcome.patient_ref else []),
                ],
            )
        entry = {
            "resource": done,
            "request": {
                "method": "PUT",
                "url": f"Task/{request.task_id}",
                "ifMatch": f'W/"{task["meta"]["versionId"]}"',
            },
        }
        audit = {"resource": event, "request": {"method": "POST", "url": "AuditEvent"}}
        try:
            store.apply_transaction({**bundle, "entry": [*bundle["entry"], entry, audit]})
        except VersionConflict:
            if attempt == 2:
                raise
            continue
        return _read_task(store, request.task_id)
    raise AssertionError("unreachable")


def _mark_ai_not_used(task: dict[str, Any], outcome: _NoAi) -> None:
    code = {"system": AI_OUTCOME_SYSTEM, "code": AI_NOT_USED, "display": "AI not used"}
    task["businessStatus"] = {"coding": [code], "text": outcome.why}
    task["output"] = [
        {"type": {"coding": [code]}, "valueCodeableConcept": {"coding": [code], "text": outcome.why}},
        {"type": {"text": "ImagingStudy"}, "valueReference": {"reference": outcome.study_url}},
    ]
    others = [e for e in task.get("extension") or [] if e.get("url") != SITE_EXTENSION]
    task["extension"] = [*others, *outcome.site_ext]
    if not task["extension"]:
        task.pop("extension")


def _model_version(task: dict[str, Any]) -> str:
    """The model version the Task was keyed with (its idempotency key is ``<study uid>:<model version>``)."""
    for ident in task.get("identifier") or []:
        if ident.get("system") == TASK_KEY_SYSTEM and ":" in str(ident.get("value")):
            return str(ident["value"]).rsplit(":", 1)[1]
    return "unknown"


def failure_message(task_id: str, exc: BaseException) -> str:
    """What a Task's ``statusReason`` says about ``exc``: an ``IntervalError``'s own message (written for
    users, no PHI); for anything else ``internal error, reference <uuid>``, the traceback logged under it."""
    if isinstance(exc, IntervalError):
        log.info("analysis of Task/%s failed: %s", task_id, exc.reason)
        return str(exc)
    reference = uuid.uuid4()
    log.error("analysis of Task/%s failed, internal error reference %s", task_id, reference, exc_info=exc)
    return f"internal error, reference {reference}"


def record_failure(
    store: ResourceStore,
    task_id: str,
    exc: BaseException,
    *,
    unless: Callable[[dict[str, Any]], bool] | None = None,
) -> str:
    """Record on the Task that its analysis failed with ``exc`` (``failure_message``); returns the message.

    A Task already ``completed`` stays completed (a late failure of a duplicate attempt does not undo a
    stored report), and so does one for which ``unless(task)`` is true. Never raises: when the store
    itself is down, the failure is logged instead.
    """
    message = failure_message(task_id, exc)

    def fail(task: dict[str, Any]) -> bool:
        if task.get("status") == "completed" or (unless is not None and unless(task)):
            return False
        _set_failed(task, message)
        return True

    try:
        transition(store, task_id, fail)
    except Exception:  # the store is down or the Task is gone: the log keeps the record
        log.exception("could not record the failure of Task/%s", task_id)
    return message


def mark_failed(store: ResourceStore, task_id: str, message: str) -> dict[str, Any]:
    """Record that a Task's analysis failed; ``message`` is shown to users (no PHI)."""

    return transition(store, task_id, lambda task: _set_failed(task, message))


def _set_failed(task: dict[str, Any], message: str) -> None:
    task["status"] = "failed"
    task["statusReason"] = {"text": message}
    task["lastModified"] = format_instant_now()
    task.pop("output", None)


def transition(
    store: ResourceStore, task_id: str, change: Callable[[dict[str, Any]], bool | None]
) -> dict[str, Any]:
    """Apply ``change`` to the current Task and store it, re-reading when another writer came first.

    ``change`` edits the Task in place; when it returns ``False`` the Task is left as it is (nothing is
    written) and returned as read.
    """
    for attempt in range(5):
        task = _read_task(store, task_id)
        if change(task) is False:
            return task
        try:
            return store.update(task, if_match=f'W/"{task["meta"]["versionId"]}"')
        except VersionConflict:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def _read_task(store: ResourceStore, task_id: str) -> dict[str, Any]:
    task = store.read("Task", task_id)
    if task is None:
        raise ResourceNotFoundError(f"Task/{task_id} disappeared while it was being analysed")
    return task


def _start(task: dict[str, Any]) -> None:
    now = format_instant_now()
    task["status"] = "in-progress"
    task["lastModified"] = now
    task["executionPeriod"] = {"start": now}


def format_instant_now() -> str:
    return format_instant(utc_now())


@dataclass(frozen=True)
class _Report:
    report_url: str  # the DiagnosticReport's fullUrl in the Bundle
    device_url: str | None  # the model's Device entry, when the Bundle has one
    patient_ref: str | None  # the report's subject, when it is a Patient


@dataclass(frozen=True)
class _NoAi:
    study_url: str  # the ImagingStudy's fullUrl in the Bundle
    why: str
    site_ext: list[dict[str, Any]]


def _check_result(request: AnalysisRequest, bundle: Any) -> _Report | _NoAi:
    """What the analyzer's Bundle holds: one preliminary DiagnosticReport, or (tagged ``ai-not-used``) none and
    the ImagingStudy; refuse anything else."""
    if (
        not isinstance(bundle, dict)
        or bundle.get("resourceType") != "Bundle"
        or bundle.get("type") != "transaction"
    ):
        raise AnalysisError(f"the analyzer returned no transaction Bundle for Task/{request.task_id}")
    entries = bundle.get("entry")
    resources = [
        e
        for e in (entries if isinstance(entries, list) else [])
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]

    def of_type(rtype: str) -> list[dict[str, Any]]:
        return [e for e in resources if e["resource"].get("resourceType") == rtype]

    reports = of_type("DiagnosticReport")
    tags = (bundle.get("meta") or {}).get("tag") or []
    no_ai = next(
        (t for t in tags if t.get("system") == AI_OUTCOME_SYSTEM and t.get("code") == AI_NOT_USED), None
    )
    if no_ai is not None:
        studies = of_type("ImagingStudy")
        if reports or len(studies) != 1 or not isinstance(studies[0].get("fullUrl"), str):
            raise AnalysisError(
                f"the analyzer said AI was not used for Task/{request.task_id} but returned "
                f"{len(reports)} DiagnosticReport(s) and {len(studies)} ImagingStudy entries; expected none "
                "and one"
            )
        site_ext = [
            e for e in studies[0]["resource"].get("extension") or [] if e.get("url") == SITE_EXTENSION
        ]
        return _NoAi(studies[0]["fullUrl"], str(no_ai.get("display") or "AI not used"), site_ext)
    if len(reports) != 1:
        raise AnalysisError(
            f"the analyzer returned {len(reports)} DiagnosticReports for Task/{request.task_id}; exactly one is expected"
        )
    full_url = reports[0].get("fullUrl")
    if not isinstance(full_url, str) or not full_url:
        raise AnalysisError("the analyzer's DiagnosticReport entry has no fullUrl")
    if reports[0]["resource"].get("status") != "preliminary":
        raise AnalysisError(
            f"the analyzer's report for Task/{request.task_id} is not preliminary: an analysis only drafts, "
            "a radiologist signs"
        )
    subject = reports[0]["resource"].get("subject")
    reference = subject.get("reference") if isinstance(subject, dict) else None
    named = parse_reference(reference)
    if request.patient_ref and named is not None and named != parse_reference(request.patient_ref):
        raise PatientMismatchError(
            f"the report for study {request.study_uid} names another patient than Task/{request.task_id}",
            study_uid=request.study_uid,
        )
    devices = of_type("Device")
    device_url = devices[0].get("fullUrl") if devices else None
    return _Report(
        full_url,
        device_url if isinstance(device_url, str) else None,
        reference if isinstance(reference, str) and named is not None and named[0] == "Patient" else None,
    )


def resume_pending(store: ResourceStore, runner: TaskRunner) -> int:
    """Resubmit Tasks left ``requested`` or ``in-progress`` (an in-process runner that restarted)."""
    resumed = 0
    tasks, total = store.search("Task", {"status": "requested,in-progress", "_count": "500"})
    for task in tasks:
        try:
            request = AnalysisRequest.from_fhir(task)
        except InvalidResourceError:
            continue
        runner.submit(replace(request, task_id=str(task["id"])))
        resumed += 1
    if total > len(tasks):
        log.warning("%d pending Tasks were not resumed (more than one page)", total - len(tasks))
    return resumed
