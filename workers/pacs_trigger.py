"""The PACS as a trigger: each study Orthanc announces as stable is ordered as an analysis Task from Interval's API.

``interval watch-pacs`` runs ``PacsTrigger.run``: it polls Orthanc's change log (``StableStudyWatcher``), and for
each ``StableStudy`` reads the study's series and PatientID by QIDO-RS and POSTs the same FHIR Task an EHR would
send (code ``analyze``, focus = the ImagingStudy by StudyInstanceUID, for = the Patient by identifier) to
``<api>/fhir/Task`` with a bearer token of its own (scopes ``system/Task.c system/Task.r``).

- **Position.** The change sequence number of the last handled announcement is saved (atomically) in a small
  JSON state file after each study: a restarted watcher starts after it, so it neither misses a study nor orders
  one twice (the one in flight at a crash may be posted again, which the API absorbs). Without a state file the
  watcher starts after the newest change (``from_start`` reads the whole log instead).
- **Repeats.** Orthanc announces a study again when anything arrives in it, Interval's own SEG and SR included.
  The API's idempotency key (StudyInstanceUID + model version) returns the existing Task for a repeat (and
  re-queues a ``failed`` one: new images are a reason to try again). The watcher also remembers each study's
  series (instance counts, Interval's own left out) and does not post when nothing but Interval's objects is new.
  Studies without a CT series are skipped.
- **Failures.** An unreachable PACS or API (or an API that refuses the token) stops the pass before the study
  in hand; the next pass starts from it again. A Task the API refuses as invalid (400) is logged and skipped.

Logs name studies and Tasks, never the patient.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from adapters.dicomweb import DicomWebClient, DicomWebRequestError, StableStudy, StableStudyWatcher, tag_value
from adapters.fhir_codes import DICOM_UID, PATIENT_ID_SYSTEM
from adapters.settings import Settings
from core.errors import ExternalRequestError, ExternalServiceError, InputError
from service.jobs import TASK_CODE_ANALYZE, TASK_CODE_SYSTEM

__all__ = [
    "INTERVAL_MANUFACTURER",
    "TASK_SCOPES",
    "Outcome",
    "PacsTrigger",
    "TaskApi",
    "WatchState",
    "analysis_task",
    "orthanc_url",
]

log = logging.getLogger("interval.workers.pacs_trigger")

TASK_SCOPES = "system/Task.c system/Task.r"
CLIENT_ID = "interval-pacs-trigger"
INTERVAL_MANUFACTURER = (
    "Interval"  # Manufacturer of the SEG and SR series Interval writes (adapters.dicom_seg)
)
CT = "CT"
REMEMBERED_STUDIES = 10_000  # the state file keeps the series of at most this many studies (the newest)
_TOKEN_TTL_S = 3600


def orthanc_url(settings: Settings) -> str:
    """Orthanc's REST root: ``pacs_orthanc_url``, else ``pacs_dicomweb_url`` without its last path segment."""
    if settings.pacs_orthanc_url:
        return settings.pacs_orthanc_url.rstrip("/")
    if not settings.pacs_dicomweb_url:
        raise InputError(
            "no PACS to watch: set INTERVAL_PACS_DICOMWEB_URL (e.g. http://pacs:8042/dicom-web) and, when "
            "Orthanc's REST API is elsewhere, INTERVAL_PACS_ORTHANC_URL"
        )
    return settings.pacs_dicomweb_url.rstrip("/").rsplit("/", 1)[0]


def analysis_task(study_uid: str, patient_id: str) -> dict[str, Any]:
    """The Task that orders the analysis of ``study_uid``, as an EHR sends it (the patient by identifier)."""
    return {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": TASK_CODE_ANALYZE}]},
        "focus": {
            "type": "ImagingStudy",
            "identifier": {"system": DICOM_UID, "value": f"urn:oid:{study_uid}"},
        },
        "for": {"type": "Patient", "identifier": {"system": PATIENT_ID_SYSTEM, "value": patient_id}},
    }


# --- the state file -------------------------------------------------------------------------------------------


@dataclass
class WatchState:
    """What survives a restart: ``since`` (the last handled change sequence number; None: not started yet) and,
    per study, the instance count of each series that is not Interval's own as it was when last ordered."""

    since: int | None = None
    studies: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> WatchState:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise InputError(
                f"the watch state file {path} cannot be read ({type(exc).__name__}); move it away to start "
                "after the newest change, or fix it"
            ) from None
        since = raw.get("since") if isinstance(raw, dict) else None
        studies = raw.get("studies") if isinstance(raw, dict) else None
        if (since is not None and not isinstance(since, int)) or not isinstance(studies, dict):
            raise InputError(f"the watch state file {path} is not one this version wrote; move it away")
        return cls(since, {str(k): {str(s): int(n) for s, n in v.items()} for k, v in studies.items()})

    def save(self, path: Path) -> None:
        """Write atomically (a crash leaves the old file or the new one, never half of one)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"since": self.since, "studies": self.studies}, f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def remember(self, study_uid: str, series: Mapping[str, int]) -> None:
        self.studies.pop(study_uid, None)
        self.studies[study_uid] = dict(series)
        while len(self.studies) > REMEMBERED_STUDIES:
            self.studies.pop(next(iter(self.studies)))


# --- Interval's API -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ordered:
    task_id: str
    status: str  # the Task's status as the API answered
    created: bool  # 201: a new Task; 200: the existing one (re-queued when it had failed)


class TaskApi:
    """POSTs analysis Tasks to Interval's FHIR API with a token minted from the settings' signing secret."""

    def __init__(
        self,
        base_url: str,
        token: Callable[[], str],
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._client = httpx.Client(timeout=timeout, transport=transport, trust_env=False)

    @classmethod
    def from_settings(cls, base_url: str, settings: Settings) -> TaskApi:
        from service.auth import mint_token

        minted: list[tuple[float, str]] = []

        def token() -> str:
            if not minted or time.monotonic() - minted[0][0] > _TOKEN_TTL_S / 2:
                value = mint_token(
                    settings.api_token_secret,
                    CLIENT_ID,
                    TASK_SCOPES,
                    ttl_s=_TOKEN_TTL_S,
                    issuer=settings.api_token_issuer,
                )
                minted[:] = [(time.monotonic(), value)]
            return minted[0][1]

        return cls(base_url, token)

    def close(self) -> None:
        self._client.close()

    def order(self, study_uid: str, patient_id: str) -> Ordered:
        """POST the Task; ``ExternalServiceError`` when the API is unreachable, answers 5xx or refuses the
        token (401/403: a configuration to fix, not a study to skip); ``ExternalRequestError`` when it refuses
        the Task itself."""
        url = f"{self.base_url}/fhir/Task"
        headers = {
            "Authorization": f"Bearer {self._token()}",
            "Content-Type": "application/fhir+json",
            "Accept": "application/fhir+json",
        }
        try:
            response = self._client.post(url, json=analysis_task(study_uid, patient_id), headers=headers)
        except httpx.TransportError as exc:
            raise ExternalServiceError(
                f"Interval's API at {self.base_url} is unreachable ({type(exc).__name__}); the study is ordered "
                "when it is back",
                study_uid=study_uid,
            ) from None
        if response.status_code in (200, 201):
            task = response.json()
            return Ordered(str(task["id"]), str(task.get("status")), response.status_code == 201)
        why = _diagnostics(response)
        if response.status_code in (401, 403) or response.status_code >= 500:
            raise ExternalServiceError(
                f"Interval's API at {self.base_url} answered {response.status_code} to a Task ({why}); "
                + (
                    "check that INTERVAL_API_TOKEN_SECRET is the API's"
                    if response.status_code in (401, 403)
                    else "the study is ordered when it answers"
                ),
                study_uid=study_uid,
            )
        raise ExternalRequestError(
            f"Interval's API refused the Task for study {study_uid}: {response.status_code} {why}",
            study_uid=study_uid,
        )


def _diagnostics(response: httpx.Response) -> str:
    try:
        issue = response.json()["issue"][0]
        return str(issue.get("diagnostics") or issue.get("code") or "")[:300]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "no OperationOutcome"


# --- the trigger ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What became of one announcement: ``ordered`` (a new Task), ``existing`` (the API returned the Task it had,
    re-queued when it had failed; ``detail`` is its status), ``skipped`` (nothing posted; ``detail`` says why)."""

    study_uid: str
    action: Literal["ordered", "existing", "skipped"]
    detail: str
    task_id: str | None = None


class PacsTrigger:
    """Orders an analysis for each stable study (see the module docstring)."""

    def __init__(
        self,
        watcher: StableStudyWatcher,
        pacs: DicomWebClient,
        api: TaskApi,
        state_path: Path,
        *,
        from_start: bool = False,
    ) -> None:
        self.watcher = watcher
        self.pacs = pacs
        self.api = api
        self.state_path = state_path
        self.state = WatchState.load(state_path)
        self._from_start = from_start
        self.outcomes: list[Outcome] = []  # every outcome of this process, in order (tests, ``--once``)

    def _start(self) -> None:
        if self.state.since is None:
            self.state.since = 0 if self._from_start else self.watcher.skip_existing()
            self.state.save(self.state_path)
            log.info("watching Orthanc's changes after #%d", self.state.since)
        self.watcher.since = self.state.since

    def run_once(self) -> list[Outcome]:
        """Handle every announcement since the saved position; the position moves after each one. Raises
        ``ExternalServiceError`` (PACS or API away) with the position on the study that could not be ordered."""
        self._start()
        events = self.watcher.poll()
        newest = self.watcher.since
        done: list[Outcome] = []
        for event in events:
            try:
                outcome = self.handle(event)
            except ExternalServiceError:
                self.watcher.since = self.state.since or 0  # from here again on the next pass
                raise
            except ExternalRequestError as exc:
                outcome = Outcome(event.study_uid, "skipped", str(exc))
                log.warning("study %s: not ordered: %s", event.study_uid, exc)
            done.append(outcome)
            self.outcomes.append(outcome)
            self.state.since = max(self.state.since or 0, event.seq)
            self.state.save(self.state_path)
        if newest != self.state.since:
            self.state.since = newest
            self.state.save(self.state_path)
        return done

    def run(self, stop: threading.Event, interval_s: float = 1.0, max_wait_s: float = 30.0) -> None:
        """Poll until ``stop`` is set; a pass that meets an unreachable PACS or API is logged and tried again
        after a wait that doubles up to ``max_wait_s``."""
        wait_s = interval_s
        while not stop.is_set():
            try:
                self.run_once()
                wait_s = interval_s
            except ExternalServiceError as exc:
                log.warning("%s; trying again in %.0f s", exc, wait_s)
                stop.wait(wait_s)
                wait_s = min(max_wait_s, wait_s * 2)
                continue
            stop.wait(interval_s)

    def handle(self, event: StableStudy) -> Outcome:
        """Order the analysis of one stable study, unless there is nothing new for it (see module docstring)."""
        uid = event.study_uid
        try:
            series = self.pacs.search_series(uid, include_fields=["Manufacturer", "PatientID"])
        except DicomWebRequestError as exc:
            if exc.status_code == 404:
                return self._skip(uid, "no longer in the PACS")
            raise
        source = {
            str(tag_value(s, "SeriesInstanceUID")): int(tag_value(s, "NumberOfSeriesRelatedInstances") or 0)
            for s in series
            if tag_value(s, "Manufacturer") != INTERVAL_MANUFACTURER
        }
        if not any(
            tag_value(s, "Modality") == CT and tag_value(s, "Manufacturer") != INTERVAL_MANUFACTURER
            for s in series
        ):
            return self._skip(uid, "no CT series")
        if self.state.studies.get(uid) == source:
            return self._skip(uid, "nothing new but Interval's own series")
        patient_id = next((str(v) for s in series if (v := tag_value(s, "PatientID"))), None)
        if patient_id is None:
            hits = self.pacs.search_studies({"StudyInstanceUID": uid}, include_fields=["PatientID"], limit=1)
            patient_id = next((str(v) for h in hits if (v := tag_value(h, "PatientID"))), None)
        if patient_id is None:
            return self._skip(uid, "no PatientID in the PACS")
        ordered = self.api.order(uid, patient_id)
        self.state.remember(uid, source)
        action: Literal["ordered", "existing"] = "ordered" if ordered.created else "existing"
        log.info("study %s: Task/%s %s (%s)", uid, ordered.task_id, action, ordered.status)
        return Outcome(uid, action, ordered.status, ordered.task_id)

    def _skip(self, study_uid: str, why: str) -> Outcome:
        log.info("study %s: skipped: %s", study_uid, why)
        return Outcome(study_uid, "skipped", why)

    def close(self) -> None:
        self.watcher.close()
        self.api.close()
