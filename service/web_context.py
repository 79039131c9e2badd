"""What every web page works with: ``WebPages`` (settings, stores, images, the EHR, templates, caches), the
reports it reads, the errors that end a request with a page, and the FastAPI dependencies ``Web`` and ``Form``.

The routes live in ``service.web_session``, ``service.web_review`` and ``service.web_patients``;
``service.web.mount_web`` puts them together.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol
from urllib.parse import parse_qsl

import numpy as np
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse
from jinja2 import ChainableUndefined, Environment, FileSystemLoader
from sqlalchemy.exc import SQLAlchemyError

from adapters import fhir_codes as C
from adapters.artifacts import load_artifacts
from adapters.dicom_series import load_study
from adapters.drift_store import DriftStore
from adapters.evidence import report_text
from adapters.fhir_audit import audit_event, user_agent
from adapters.fhir_publish import AI_NOT_USED, AI_OUTCOME_SYSTEM, EHR_REPORT_SYSTEM, SITE_EXTENSION
from adapters.fhir_search import parse_reference
from adapters.fhir_validation import is_fhir_id
from adapters.image_folder import FolderImageSource
from adapters.resource_store import ResourceStore, format_instant
from adapters.settings import Settings
from adapters.sql_store import utc_now
from core.errors import IntervalError
from core.oversight import site_of_station
from core.report import ReportText
from core.types import Volume
from service.users import User, UserStore, WebSession
from service.web_ehr import EhrLink

__all__ = [
    "SECURITY_HEADERS",
    "Form",
    "LoginRequired",
    "PageError",
    "StoredReport",
    "StudyImages",
    "Web",
    "WebPages",
    "now_instant",
]

log = logging.getLogger("interval.service.web")

HERE = Path(__file__).resolve().parent
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


class StudyImages(Protocol):
    def find_study(self, study_uid: str) -> Volume | None: ...


class LoginRequired(Exception):
    """Ends a request with a redirect to the login page, which comes back to ``next_url``."""

    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


class PageError(Exception):
    """Ends a request with an HTML error page (status, title, message)."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


@dataclass
class StoredReport:
    """A DiagnosticReport from Interval's store with what the pages need around it."""

    resource: dict[str, Any]
    site: str | None
    study_uid: str | None
    analysis: dict[str, Any] | None  # report.json
    seg: dict[str, np.ndarray] | None

    @property
    def id(self) -> str:
        return str(self.resource["id"])

    @property
    def version(self) -> int:
        return int(self.resource["meta"]["versionId"])

    @property
    def status(self) -> str:
        return str(self.resource.get("status"))

    @property
    def patient_id(self) -> str:
        target = parse_reference((self.resource.get("subject") or {}).get("reference"))
        return target[1] if target else ""

    @property
    def date(self) -> str:
        return str(self.resource.get("effectiveDateTime") or "")[:10]

    @property
    def text(self) -> ReportText:
        return report_text(self.resource)

    @property
    def ehr_ref(self) -> str | None:
        for ident in self.resource.get("identifier") or []:
            if ident.get("system") == EHR_REPORT_SYSTEM and ident.get("value"):
                parts = str(ident["value"]).rstrip("/").split("/")
                return f"{parts[-2]}/{parts[-1]}" if len(parts) >= 2 else None
        return None

    def lesion(self, track_id: str) -> dict[str, Any] | None:
        for lesion in (self.analysis or {}).get("lesions", []):
            if lesion.get("track_id") == track_id:
                return dict(lesion)
        return None


def now_instant() -> str:
    """Now, as a FHIR instant (UTC)."""
    return format_instant(utc_now())


class WebPages:
    """The pages' state: settings, stores, images, the EHR, the templates and small caches."""

    def __init__(
        self,
        settings: Settings,
        store: ResourceStore,
        users: UserStore | None = None,
        images: StudyImages | None = None,
    ) -> None:
        if settings.environment == "production" and not settings.web_cookie_secure:
            raise ValueError(
                "INTERVAL_WEB_COOKIE_SECURE must be true in production (session cookies only over https)"
            )
        self.settings = settings
        self.store = store
        self.users = users if users is not None else UserStore(store.database_url)
        self._owns_users = users is None
        self.images = (
            images
            if images is not None
            else FolderImageSource(list(settings.image_roots), settings.series_rules())
        )
        self.ehr = EhrLink(settings)
        self.drift = DriftStore(store.database_url)  # the drift monitor's tables (service.drift_api)
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=ChainableUndefined,  # a field an older or newer report.json lacks shows as empty
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._lock = threading.Lock()
        self._volumes: OrderedDict[str, Volume | None] = OrderedDict()
        self._artifacts: OrderedDict[str, tuple[float, dict[str, Any], dict[str, np.ndarray] | None]] = (
            OrderedDict()
        )

    def close(self) -> None:
        """Release what the pages opened (the accounts' database connections, when they opened them)."""
        if self._owns_users:
            self.users.close()
        self.drift.close()

    # --- responses ------------------------------------------------------------------------------

    def html(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        body = self.templates.get_template(template).render(**context)
        headers = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
        return HTMLResponse(body, status_code=status, headers=headers)

    def page(self, template: str, session: WebSession, status: int = 200, **context: Any) -> HTMLResponse:
        return self.html(template, status, user=session.user, csrf=session.csrf_token, **context)

    # --- reports --------------------------------------------------------------------------------

    def site_of(self, resource: dict[str, Any]) -> str | None:
        """The site of a report, study or Task: its station (``SITE_EXTENSION``) mapped by ``web_station_sites``."""
        for ext in resource.get("extension") or []:
            if ext.get("url") == SITE_EXTENSION and ext.get("valueString"):
                return site_of_station(str(ext["valueString"]), self.settings.web_station_sites)
        return None

    def audit(
        self, kind: str, user: User, entities: list[dict[str, Any]], *, outcome_desc: str | None = None
    ) -> None:
        """Record what ``user`` did as an AuditEvent (``adapters.fhir_audit``); refused when ``outcome_desc``."""
        event = audit_event(
            kind,
            user_agent(user.username, user.role.value),
            entities,
            outcome="4" if outcome_desc else "0",
            outcome_desc=outcome_desc,
        )
        self.store.create(event)

    def report(self, report_id: str, user: User, *, with_analysis: bool = True) -> StoredReport:
        """The report, when it exists and ``user`` may read its site (404 otherwise: no hint either way)."""
        resource = self.store.read("DiagnosticReport", report_id) if is_fhir_id(report_id) else None
        if resource is None or not user.can_read_site(self.site_of(resource)):
            raise PageError(404, "Report not found", "There is no report here that you may read.")
        return self.wrap(resource, with_analysis)

    def wrap(self, resource: dict[str, Any], with_analysis: bool) -> StoredReport:
        study_uid = None
        for ref in resource.get("imagingStudy") or []:
            target = parse_reference(ref.get("reference"))
            study = self.store.read("ImagingStudy", target[1]) if target else None
            for ident in (study or {}).get("identifier") or []:
                if ident.get("system") == C.DICOM_UID:
                    study_uid = str(ident.get("value", "")).removeprefix("urn:oid:")
        analysis, seg = self.artifacts(study_uid) if study_uid and with_analysis else (None, None)
        return StoredReport(resource, self.site_of(resource), study_uid, analysis, seg)

    def readable_reports(self, user: User, params: dict[str, str]) -> list[StoredReport]:
        found, _ = self.store.search("DiagnosticReport", {**params, "_count": "500"})
        return [self.wrap(r, with_analysis=True) for r in found if user.can_read_site(self.site_of(r))]

    def studies_without_ai(self, user: User) -> list[dict[str, Any]]:
        """The studies of ``user``'s sites whose analysis ended "AI not used" (the site's AI switch was off),
        newest first: Tasks with that ``businessStatus``, each with its site, study date and explanation."""
        found, _ = self.store.search(
            "Task",
            {
                "business-status": f"{AI_OUTCOME_SYSTEM}|{AI_NOT_USED}",
                "_sort": "-_lastUpdated",
                "_count": "200",
            },
        )
        rows = []
        for task in found:
            site = self.site_of(task)
            if not user.can_read_site(site):
                continue
            study = next(
                (
                    self.store.read("ImagingStudy", target[1])
                    for out in task.get("output") or []
                    if (target := parse_reference((out.get("valueReference") or {}).get("reference")))
                    and target[0] == "ImagingStudy"
                ),
                None,
            )
            patient = parse_reference(((study or {}).get("subject") or {}).get("reference"))
            rows.append(
                {
                    "task_id": task["id"],
                    "site": site,
                    "date": str((study or {}).get("started") or "")[:10],
                    "patient_id": patient[1] if patient and patient[0] == "Patient" else "",
                    "why": (task.get("businessStatus") or {}).get("text", "AI not used"),
                }
            )
        return rows

    def draft_text(self, report: StoredReport) -> ReportText:
        """The text as the analysis drafted it (the report's first version)."""
        first = self.store.read("DiagnosticReport", report.id, 1)
        return report_text(first) if first is not None else report.text

    def results(self, report: StoredReport) -> list[dict[str, Any]]:
        """The Observations the report's ``result`` names, as stored."""
        found = []
        for ref in report.resource.get("result") or []:
            target = parse_reference(ref.get("reference"))
            obs = self.store.read("Observation", target[1]) if target and target[0] == "Observation" else None
            if obs is not None:
                found.append(obs)
        return found

    def record_review(self, report: StoredReport) -> None:
        """Tell the drift monitor which share of the report's AI findings radiologists have rejected so far
        (an output signal: ``rejected_fraction``). A failure is logged; the review itself is kept."""
        findings = {
            str(lesion.get("track_id"))
            for lesion in (report.analysis or {}).get("lesions", [])
            if lesion.get("current")
        }
        if not findings or report.study_uid is None:
            return
        verdicts = self.users.feedback(report.id)
        rejected = {t for t, f in verdicts.items() if f.decision == "rejected"} & findings
        try:
            self.drift.record_review(report.study_uid, len(rejected) / len(findings))
        except SQLAlchemyError as exc:
            log.warning("review of report %s not recorded for drift (%s)", report.id, type(exc).__name__)

    # --- a study's artifacts and images ---------------------------------------------------------

    def artifacts(self, study_uid: str) -> tuple[dict[str, Any] | None, dict[str, np.ndarray] | None]:
        """The study's ``report.json`` (with the drafter's per-sentence record from ``draft.json``, when there
        is one, as ``report.sentences``) and its label map arrays; (None, None) when it was not analysed."""
        folder = self.settings.artifacts_dir / study_uid
        try:
            stamp = max(
                (folder / name).stat().st_mtime
                for name in ("report.json", "draft.json")
                if (folder / name).exists()
            )
        except (OSError, ValueError):
            return None, None
        with self._lock:
            cached = self._artifacts.get(study_uid)
            if cached is not None and cached[0] == stamp:
                return cached[1], cached[2]
        try:
            analysis, seg = load_artifacts(self.settings.artifacts_dir, study_uid)
            draft = folder / "draft.json"
            sentences = json.loads(draft.read_text()).get("sentences") if draft.is_file() else None
        except (OSError, ValueError, AttributeError, IntervalError) as exc:
            log.warning("artifacts of a study could not be read: %s", type(exc).__name__)
            return None, None
        if isinstance(sentences, list):
            analysis = {**analysis, "report": {**(analysis.get("report") or {}), "sentences": sentences}}
        with self._lock:
            self._artifacts[study_uid] = (stamp, analysis, seg)
            while len(self._artifacts) > 8:
                self._artifacts.popitem(last=False)
        return analysis, seg

    def volume(self, study_uid: str) -> Volume | None:
        with self._lock:
            if study_uid in self._volumes:
                self._volumes.move_to_end(study_uid)
                return self._volumes[study_uid]
        try:
            if isinstance(self.images, FolderImageSource):
                folder = self.images.folder_of(study_uid, refresh=True)
                volume = load_study(folder, self.images.rules) if folder is not None else None
            else:
                volume = self.images.find_study(study_uid)
        except IntervalError as exc:
            log.warning("images of a study could not be read: %s", exc.reason)
            volume = None
        with self._lock:
            self._volumes[study_uid] = volume
            while len(self._volumes) > 4:
                self._volumes.popitem(last=False)
        return volume


def _web(request: Request) -> WebPages:
    web: WebPages = request.app.state.web
    return web


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as a dict (the last value of a repeated field)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise PageError(415, "Form refused", "Forms are sent as application/x-www-form-urlencoded.")
    body = await request.body()
    if len(body) > 512_000:
        raise PageError(413, "Form refused", "The form is too large.")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=64, strict_parsing=False
        )
    except (UnicodeDecodeError, ValueError):
        raise PageError(400, "Form refused", "The form could not be read.") from None
    return dict(pairs)


Web = Annotated[WebPages, Depends(_web)]
Form = Annotated[dict[str, str], Depends(_form)]
