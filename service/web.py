"""The web pages: radiologists review evidence, edit and sign drafts; clinicians see change over time.

Server-rendered HTML (Jinja2, autoescaped: report text from a model, a prior report or a person is always
shown as text, never as markup), no JavaScript, no external assets; images are PNGs drawn on the server
(``adapters.evidence``). ``mount_web`` adds the pages to the FHIR API's app (``service.app.create_app``).

- ``/worklist``: drafts awaiting review, most urgent first (progression and new lesions), filtered by site
  and status.
- ``/reports/{id}``: the draft editor. Every sentence shows where it came from (deterministic wording, model
  text, replaced or added by the verifier, edited by a person) and whether it agrees with the measurements;
  each finding shows its key slice with the contour, the matched prior slice, the saliency overlay when the
  model computed one, the confidence and the measurement, and can be accepted or rejected (a rejected
  finding leaves the report and is kept as feedback). Sign -> ``final``; a signed report is amended ->
  ``amended``; both in Interval's store with a Provenance naming the radiologist, and at the EHR
  (``adapters.fhir_publish.sign_report``) when one is configured. The diff between the draft and the signed
  text is kept (``service.users``).
- ``/patients/{id}``: the clinician's read-only summary: sum of diameters over time with the RECIST
  thresholds and the nadir, per-lesion history with thumbnails, the response and its reasoning, the reports.

Safety: argon2id passwords; a login is a random token in an HttpOnly, SameSite=Strict cookie (Secure when
``web_cookie_secure``, required in production); every form carries a CSRF token bound to the session (the
login form a signed double-submit token); a POST from another origin is refused; only radiologists change
reports (others get a 403 page); a user reads the reports of their sites only. The site of a report is its
``adapters.fhir_publish.SITE_EXTENSION`` (recorded by the analysis), mapped by ``web_station_sites``.

Two people editing one draft: every form carries the version it was read at; a save or signature of an
older version is refused (409) with the person's text kept in the form and the current text shown beside it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Protocol
from urllib.parse import parse_qsl, quote

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import ChainableUndefined, Environment, FileSystemLoader
from starlette.concurrency import run_in_threadpool

from adapters import fhir_codes as C
from adapters.artifacts import load_artifacts
from adapters.dicom_series import load_study
from adapters.ehr_priors import fetch_snapshot
from adapters.evidence import (
    course_png,
    course_points,
    key_slice_png,
    lesion_history,
    prior_link,
    prior_slice_png,
    raw_report_text,
    remove_lesion_sentences,
    report_text,
    sentence_views,
    set_report_text,
    text_diff,
    urgency,
)
from adapters.fhir_client import FhirClient, RetryPolicy, SmartBackendAuth
from adapters.fhir_publish import (
    EHR_REPORT_SYSTEM,
    OBSERVATION_ID_SYSTEM,
    REPORT_ID_SYSTEM,
    SITE_EXTENSION,
    sign_report,
)
from adapters.fhir_search import parse_reference
from adapters.fhir_validation import is_fhir_id
from adapters.image_folder import FolderImageSource
from adapters.resource_store import ResourceStore, VersionConflict, format_instant
from adapters.settings import Settings
from core.errors import IntervalError
from core.report import ReportText
from core.types import PriorTimePoint, Volume
from service.users import (
    FeedbackRecord,
    ReportEvent,
    Role,
    User,
    UserStore,
    WebSession,
    csrf_matches,
    login_csrf_token,
)

__all__ = ["USER_SYSTEM", "StudyImages", "WebPages", "mount_web", "router"]

log = logging.getLogger("interval.service.web")

HERE = Path(__file__).resolve().parent
SESSION_COOKIE = "interval_session"
LOGIN_COOKIE = "interval_login"
# how an Interval report names its copy at the EHR (set by workers.analysis.PipelineAnalyzer)
USER_SYSTEM = "http://interval.local/fhir/user"
_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_SIGNABLE = ("preliminary", "final", "amended")
_EHR_TTL_S = 60.0
_EHR_RETRY_S = 15.0
_SECURITY_HEADERS = {
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


class _LoginRequired(Exception):
    def __init__(self, next_url: str) -> None:
        self.next_url = next_url


class _PageError(Exception):
    """Ends a request with an HTML error page (status, title, message)."""

    def __init__(self, status: int, title: str, message: str) -> None:
        super().__init__(message)
        self.status, self.title, self.message = status, title, message


@dataclass
class _Report:
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


@dataclass
class _EhrView:
    patient_identifier: str
    time_points: tuple[PriorTimePoint, ...]
    reports: list[dict[str, Any]]
    at: float = field(default_factory=time.monotonic)


def _now() -> str:
    return format_instant(dt.datetime.now(dt.UTC).replace(tzinfo=None))


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
        self.images = images if images is not None else FolderImageSource(list(settings.image_roots))
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=ChainableUndefined,  # a field an older or newer report.json lacks shows as empty
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._login_key = hmac.new(
            settings.api_token_secret.encode(), b"interval-web-login", "sha256"
        ).digest()
        self._ehr_auth: SmartBackendAuth | None = None
        if settings.ehr_client_id and settings.ehr_private_key:
            self._ehr_auth = SmartBackendAuth.from_key_file(
                settings.ehr_client_id,
                settings.ehr_private_key,
                scope=settings.ehr_scope,
                token_url=settings.ehr_token_url,
            )
        self._lock = threading.Lock()
        self._volumes: OrderedDict[str, Volume | None] = OrderedDict()
        self._artifacts: OrderedDict[str, tuple[float, dict[str, Any], dict[str, np.ndarray] | None]] = (
            OrderedDict()
        )
        self._ehr_views: dict[str, _EhrView] = {}
        self._ehr_failures: dict[str, tuple[float, str]] = {}

    def close(self) -> None:
        """Release what the pages opened (the accounts' database connections, when they opened them)."""
        if self._owns_users:
            self.users.close()

    # --- responses ------------------------------------------------------------------------------

    def html(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        body = self.templates.get_template(template).render(**context)
        headers = {**_SECURITY_HEADERS, "Cache-Control": "no-store"}
        return HTMLResponse(body, status_code=status, headers=headers)

    def page(self, template: str, session: WebSession, status: int = 200, **context: Any) -> HTMLResponse:
        return self.html(template, status, user=session.user, csrf=session.csrf_token, **context)

    def set_cookie(self, response: Response, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path="/",
            httponly=True,
            samesite="strict",
            secure=self.settings.web_cookie_secure,
        )

    # --- who is asking --------------------------------------------------------------------------

    def session(self, request: Request) -> WebSession:
        session = self.users.session(request.cookies.get(SESSION_COOKIE))
        if session is None:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise _LoginRequired(target)
        return session

    def check_form(self, request: Request, session: WebSession, form: dict[str, str]) -> None:
        """Refuse a POST that comes from another origin or lacks the session's CSRF token."""
        self.check_origin(request)
        if not csrf_matches(session.csrf_token, form.get("csrf_token")):
            raise _PageError(
                403,
                "Form refused",
                "This form did not carry a valid security token (it is old, or it came from another site). "
                "Reload the page and try again.",
            )

    def check_origin(self, request: Request) -> None:
        origin = request.headers.get("origin")
        if origin is None:  # not sent by every client on same-origin requests; the CSRF token still applies
            return
        own = {f"{request.url.scheme}://{request.url.netloc}", self.settings.public_base_url}
        if origin not in own:
            raise _PageError(403, "Form refused", "This request came from another site and was refused.")

    def login_token(self, nonce: str) -> str:
        return login_csrf_token(self._login_key, nonce)

    def site_of(self, resource: dict[str, Any]) -> str | None:
        for ext in resource.get("extension") or []:
            if ext.get("url") == SITE_EXTENSION and ext.get("valueString"):
                name = str(ext["valueString"])
                return self.settings.web_station_sites.get(name, name)
        return None

    # --- reports --------------------------------------------------------------------------------

    def report(self, report_id: str, user: User, *, with_analysis: bool = True) -> _Report:
        """The report, when it exists and ``user`` may read its site (404 otherwise: no hint either way)."""
        resource = self.store.read("DiagnosticReport", report_id) if is_fhir_id(report_id) else None
        if resource is None or not user.can_read_site(self.site_of(resource)):
            raise _PageError(404, "Report not found", "There is no report here that you may read.")
        return self.wrap(resource, with_analysis)

    def wrap(self, resource: dict[str, Any], with_analysis: bool) -> _Report:
        study_uid = None
        for ref in resource.get("imagingStudy") or []:
            target = parse_reference(ref.get("reference"))
            study = self.store.read("ImagingStudy", target[1]) if target else None
            for ident in (study or {}).get("identifier") or []:
                if ident.get("system") == C.DICOM_UID:
                    study_uid = str(ident.get("value", "")).removeprefix("urn:oid:")
        analysis, seg = self.artifacts(study_uid) if study_uid and with_analysis else (None, None)
        return _Report(resource, self.site_of(resource), study_uid, analysis, seg)

    def readable_reports(self, user: User, params: dict[str, str]) -> list[_Report]:
        found, _ = self.store.search("DiagnosticReport", {**params, "_count": "500"})
        return [self.wrap(r, with_analysis=True) for r in found if user.can_read_site(self.site_of(r))]

    def draft_text(self, report: _Report) -> ReportText:
        """The text as the analysis drafted it (the report's first version)."""
        first = self.store.read("DiagnosticReport", report.id, 1)
        return report_text(first) if first is not None else report.text

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
                volume = load_study(folder) if folder is not None else None
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

    # --- the EHR --------------------------------------------------------------------------------

    def ehr_client(self, *, reading: bool = False) -> FhirClient | None:
        """A client of the configured EHR (None without one). ``reading`` is for a page being shown: two
        quick tries, so that a slow or dead EHR costs seconds, not minutes; a signature gets the full retries."""
        s = self.settings
        if not s.ehr_base_url:
            return None
        retry = (
            RetryPolicy(
                attempts=2, backoff_s=0.2, connect_timeout_s=2.0, read_timeout_s=min(10.0, s.ehr_timeout_s)
            )
            if reading
            else RetryPolicy(
                attempts=s.ehr_retry_attempts, backoff_s=s.ehr_backoff_s, read_timeout_s=s.ehr_timeout_s
            )
        )
        return FhirClient(s.ehr_base_url, auth=self._ehr_auth, retry=retry)

    def ehr_view(self, patient_id: str, *, cached_only: bool = False) -> _EhrView | str | None:
        """The patient's imaging history at the EHR (kept a minute; a failure is kept 15 s); a string saying
        why it could not be read; None when no EHR is configured (or, with ``cached_only``, nothing is kept)."""
        with self._lock:
            view = self._ehr_views.get(patient_id)
            if view is not None and time.monotonic() - view.at < _EHR_TTL_S:
                return view
            failed = self._ehr_failures.get(patient_id)
            if failed is not None and time.monotonic() - failed[0] < _EHR_RETRY_S:
                return None if cached_only else failed[1]
        client = self.ehr_client(reading=True)
        if client is None or cached_only:
            return None

        async def fetch() -> _EhrView:
            async with client as ehr:
                patient, _ = await ehr.read("Patient", patient_id)
                pid = next(
                    (
                        str(i["value"])
                        for i in patient.get("identifier") or []
                        if i.get("system") == C.PATIENT_ID_SYSTEM and i.get("value")
                    ),
                    patient_id,
                )
                snapshot = await fetch_snapshot(ehr, pid, f"Patient/{patient_id}")
                rows = await ehr.search(
                    "DiagnosticReport", {"subject": f"Patient/{patient_id}", "_count": "200"}
                )
                return _EhrView(pid, snapshot.time_points, [r["resource"] for r in rows])

        try:
            view = asyncio.run(fetch())
        except IntervalError as exc:
            message = f"the EHR could not be read: {exc}"
            with self._lock:
                self._ehr_failures[patient_id] = (time.monotonic(), message)
            return message
        with self._lock:
            self._ehr_views[patient_id] = view
            self._ehr_failures.pop(patient_id, None)
        return view

    def forget_ehr_view(self, patient_id: str) -> None:
        with self._lock:
            self._ehr_views.pop(patient_id, None)

    async def _practitioner(self, ehr: FhirClient, user: User) -> str:
        if user.practitioner_ref:
            return user.practitioner_ref
        ident = f"{USER_SYSTEM}|{user.username}"
        rows = await ehr.search("Practitioner", {"identifier": ident})
        if rows:
            return f"Practitioner/{rows[0]['resource']['id']}"
        created = await ehr.create(
            {
                "resourceType": "Practitioner",
                "identifier": [{"system": USER_SYSTEM, "value": user.username}],
                "name": [{"text": user.display_name}],
            }
        )
        return f"Practitioner/{created['id']}"

    def push_to_ehr(self, report: _Report, user: User) -> str:
        """Send the signature (and the findings' verdicts) to the EHR; returns the status to record."""
        client = self.ehr_client()
        ref = report.ehr_ref
        if client is None:
            return "no EHR configured"
        if ref is None:
            return "this report was not published to the EHR"
        statuses = self._observation_statuses(report)

        async def push() -> None:
            async with client as ehr:
                practitioner = await self._practitioner(ehr, user)
                for ident, status in statuses.items():
                    for row in await ehr.search(
                        "Observation", {"identifier": f"{OBSERVATION_ID_SYSTEM}|{ident}"}
                    ):
                        obs = row["resource"]
                        if obs.get("status") != status:
                            obs["status"] = status
                            version = (obs.get("meta") or {}).get("versionId")
                            await ehr.update(obs, f'W/"{version}"' if version else None)
                await sign_report(
                    ehr,
                    ref,
                    practitioner_ref=practitioner,
                    practitioner_display=user.display_name,
                    text=report.text,
                )

        try:
            asyncio.run(push())
        except IntervalError as exc:
            log.warning("report %s: signature not sent to the EHR: %s", report.id, exc.reason)
            return f"failed: {exc}"
        self.forget_ehr_view(report.patient_id)
        return "sent"

    def results(self, report: _Report) -> list[dict[str, Any]]:
        """The Observations the report's ``result`` names, as stored."""
        found = []
        for ref in report.resource.get("result") or []:
            target = parse_reference(ref.get("reference"))
            obs = self.store.read("Observation", target[1]) if target and target[0] == "Observation" else None
            if obs is not None:
                found.append(obs)
        return found

    def _observation_statuses(self, report: _Report) -> dict[str, str]:
        """Observation identifier -> status for the EHR: ``final`` for the report's results, ``entered-in-error``
        for the findings a radiologist rejected (identifiers as ``adapters.fhir_publish`` made them)."""
        out = {
            str(i["value"]): "final"
            for obs in self.results(report)
            for i in obs.get("identifier") or []
            if i.get("system") == OBSERVATION_ID_SYSTEM and i.get("value")
        }
        model_version = (report.analysis or {}).get("model_version")
        if report.study_uid and model_version:
            for track, verdict in self.users.feedback(report.id).items():
                if verdict.decision == "rejected":
                    out[f"{report.study_uid}/{model_version}/{track}"] = "entered-in-error"
        return out


def _web(request: Request) -> WebPages:
    web: WebPages = request.app.state.web
    return web


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body as a dict (the last value of a repeated field)."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise _PageError(415, "Form refused", "Forms are sent as application/x-www-form-urlencoded.")
    body = await request.body()
    if len(body) > 512_000:
        raise _PageError(413, "Form refused", "The form is too large.")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, max_num_fields=64, strict_parsing=False
        )
    except (UnicodeDecodeError, ValueError):
        raise _PageError(400, "Form refused", "The form could not be read.") from None
    return dict(pairs)


Web = Annotated[WebPages, Depends(_web)]
Form = Annotated[dict[str, str], Depends(_form)]
router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)


def _safe_next(target: str | None) -> str:
    """A same-site path to go to after signing in; anything else (another host, odd characters) is "/"."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or not target.isprintable()
        or any(c.isspace() for c in target)
    ):
        return "/"
    return target


def _home(user: User) -> str:
    return "/patients" if user.role is Role.CLINICIAN else "/worklist"


# --- login ----------------------------------------------------------------------------------------


@router.get("/login")
def login_page(request: Request, web: Web, next: str = "/") -> Response:
    session = web.users.session(request.cookies.get(SESSION_COOKIE))
    if session is not None:
        return RedirectResponse(_safe_next(next) if next != "/" else _home(session.user), 303)
    nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
    response = web.html(
        "login.html", csrf=web.login_token(nonce), next=_safe_next(next), error=None, user=None
    )
    web.set_cookie(response, LOGIN_COOKIE, nonce, 3600)
    return response


@router.post("/login")
def login(request: Request, web: Web, form: Form) -> Response:
    web.check_origin(request)
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not csrf_matches(web.login_token(nonce), form.get("csrf_token")):
        raise _PageError(
            403, "Form refused", "The sign-in form has expired. Reload the page and sign in again."
        )
    user = web.users.authenticate(form.get("username", "")[:64], form.get("password", "")[:1024])
    target = _safe_next(form.get("next"))
    if user is None:
        return web.html(
            "login.html",
            401,
            csrf=web.login_token(nonce),
            next=target,
            user=None,
            error="The user name or the password is not right.",
        )
    ttl = dt.timedelta(hours=web.settings.web_session_ttl_h)
    token, _ = web.users.start_session(user, ttl)
    response = RedirectResponse(target if target != "/" else _home(user), 303)
    web.set_cookie(response, SESSION_COOKIE, token, int(ttl.total_seconds()))
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(request: Request, web: Web, form: Form) -> Response:
    session = web.session(request)
    web.check_form(request, session, form)
    web.users.end_session(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", 303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/")
def home(request: Request, web: Web) -> Response:
    return RedirectResponse(_home(web.session(request).user), 303)


# --- worklist -------------------------------------------------------------------------------------


@router.get("/worklist")
def worklist(request: Request, web: Web, site: str = "", status: str = "preliminary") -> Response:
    session = web.session(request)
    user = session.user
    if user.role is Role.CLINICIAN:
        return RedirectResponse("/patients", 303)
    statuses = {"preliminary": "preliminary", "final": "final,amended", "all": ""}
    status = status if status in statuses else "preliminary"
    params = {"status": statuses[status]} if statuses[status] else {}
    reports = web.readable_reports(user, params)
    sites = sorted({r.site or "(no site)" for r in reports})
    if site:
        reports = [r for r in reports if (r.site or "(no site)") == site]
    rows: list[dict[str, Any]] = []
    for r in reports:
        rank, words = urgency(r.analysis)
        rows.append(
            {
                "report": r,
                "rank": rank,
                "urgency": words,
                "lesions": len((r.analysis or {}).get("lesions", [])),
            }
        )
    rows.sort(key=lambda row: (row["rank"], row["report"].date, row["report"].id))
    return web.page("worklist.html", session, rows=rows, sites=sites, site=site, status_filter=status)


# --- the report page --------------------------------------------------------------------------------


def _finding_rows(web: WebPages, report: _Report) -> list[dict[str, Any]]:
    feedback = web.users.feedback(report.id)
    saliency = report.seg is not None and "saliency" in report.seg
    rows = []
    for lesion in (report.analysis or {}).get("lesions", []):
        link = prior_link(report.analysis or {}, lesion)
        rows.append(
            {
                "lesion": lesion,
                "site": str(lesion.get("organ", "")).replace("_", " ")
                + (f" ({lesion['laterality']})" if lesion.get("laterality") else ""),
                "feedback": feedback.get(lesion["track_id"]),
                "prior_date": link.date,
                "has_prior_image": link.study_uid is not None,
                "saliency": saliency,
                "base": f"/reports/{report.id}/evidence/{quote(lesion['track_id'])}",
            }
        )
    return rows


def _report_page(
    web: WebPages,
    session: WebSession,
    report: _Report,
    *,
    status: int = 200,
    edit_text: ReportText | None = None,
    conflict: str | None = None,
    notice: str | None = None,
) -> HTMLResponse:
    user = session.user
    draft = web.draft_text(report)
    current = report.text
    rejected = frozenset(t for t, f in web.users.feedback(report.id).items() if f.decision == "rejected")
    views, omissions = sentence_views(current, draft, report.analysis, rejected)
    ehr = web.ehr_view(report.patient_id)
    prior_text = None
    if isinstance(ehr, _EhrView):
        earlier = [tp for tp in ehr.time_points if tp.study_date.isoformat() < report.date and tp.report_text]
        prior_text = earlier[-1] if earlier else None
    editable = user.can_sign and report.status in _SIGNABLE
    events = web.users.events(report.id)
    return web.page(
        "report.html",
        session,
        status,
        report=report,
        analysis=report.analysis,
        views=views,
        omissions=omissions,
        findings=_finding_rows(web, report),
        text=edit_text or current,
        current=current,
        editable=editable,
        can_review=user.can_sign and report.status == "preliminary",
        conflict=conflict,
        notice=notice,
        prior=prior_text,
        ehr_error=ehr if isinstance(ehr, str) else None,
        events=events,
    )


@router.get("/reports/{report_id}")
def report_page(request: Request, web: Web, report_id: str, done: str = "") -> Response:
    session = web.session(request)
    report = web.report(report_id, session.user)
    notices = {
        "saved": "Draft saved.",
        "signed": "Report signed.",
        "amended": "Report amended.",
        "rejected": "Finding rejected: it left the report and was recorded as feedback.",
        "accepted": "Finding accepted.",
    }
    return _report_page(web, session, report, notice=notices.get(done))


def _require_radiologist(session: WebSession, what: str) -> None:
    if not session.user.can_sign:
        raise _PageError(
            403,
            "Not allowed",
            f"Only radiologists can {what}. You are signed in as {session.user.display_name} "
            f"({session.user.role.value}).",
        )


def _posted_text(form: dict[str, str]) -> ReportText:
    def clean(name: str) -> str:
        return " ".join(form.get(name, "").replace("\r", "").split())

    return ReportText(clean("comparison"), clean("findings"), clean("impression"))


def _posted_version(form: dict[str, str]) -> int:
    value = form.get("version", "")
    if not value.isdigit() or len(value) > 9:
        raise _PageError(400, "Form refused", "The form does not say which version of the report it edits.")
    return int(value)


def _conflict(
    web: WebPages, session: WebSession, report_id: str, read_version: int, text: ReportText
) -> Response:
    report = web.report(report_id, session.user)
    changed = [e for e in web.users.events(report_id) if e.version_id > read_version]
    who = f" by {changed[-1].display_name} at {changed[-1].at:%H:%M:%S} UTC" if changed else ""
    message = (
        f"This report was changed{who} after you opened it (you edited version {read_version}; it is now at "
        f"version {report.version}, status {report.status}). Your changes were NOT saved: they are kept in "
        "the form below. Compare them with the current text, then save again."
    )
    return _report_page(web, session, report, status=409, edit_text=text, conflict=message)


@router.post("/reports/{report_id}/save")
def save_draft(request: Request, web: Web, form: Form, report_id: str) -> Response:
    session = web.session(request)
    _require_radiologist(session, "edit reports")
    web.check_form(request, session, form)
    report = web.report(report_id, session.user, with_analysis=False)
    version, text = _posted_version(form), _posted_text(form)
    if report.status != "preliminary":
        raise _PageError(
            409, "Already signed", "A signed report is changed by amending it, not by saving a draft."
        )
    if version != report.version:
        return _conflict(web, session, report_id, version, text)
    resource = dict(report.resource)
    set_report_text(resource, text, _now())
    try:
        stored = web.store.update(resource, if_match=f'W/"{version}"')
    except VersionConflict:
        return _conflict(web, session, report_id, version, text)
    web.users.record_event(
        ReportEvent(
            report_id,
            int(stored["meta"]["versionId"]),
            session.user.username,
            session.user.display_name,
            "saved",
            dt.datetime.now(dt.UTC).replace(tzinfo=None),
        )
    )
    return RedirectResponse(f"/reports/{report_id}?done=saved", 303)


@router.post("/reports/{report_id}/sign")
def sign(request: Request, web: Web, form: Form, report_id: str) -> Response:
    session = web.session(request)
    _require_radiologist(session, "sign reports")
    web.check_form(request, session, form)
    user = session.user
    report = web.report(report_id, user, with_analysis=False)
    version, text = _posted_version(form), _posted_text(form)
    if report.status not in _SIGNABLE:
        raise _PageError(409, "Cannot sign", f"A report with status {report.status} cannot be signed.")
    if version != report.version:
        return _conflict(web, session, report_id, version, text)
    if not text.impression:
        raise _PageError(400, "Cannot sign", "The impression is empty: write it before signing.")
    status = "final" if report.status == "preliminary" else "amended"
    now = _now()
    who = {"identifier": {"system": USER_SYSTEM, "value": user.username}, "display": user.display_name}
    resource = dict(report.resource)
    set_report_text(resource, text, now)
    resource["status"] = status
    resource["issued"] = now
    resource["resultsInterpreter"] = [who]
    try:
        stored = web.store.update(resource, if_match=f'W/"{version}"')
    except VersionConflict:
        return _conflict(web, session, report_id, version, text)
    new_version = int(stored["meta"]["versionId"])
    signed = web.wrap(stored, with_analysis=True)
    for obs in web.results(signed):
        _set_status(web.store, obs, "final")
    activity = (
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            "code": "LA",
            "display": "legal authenticator",
        }
        if status == "final"
        else {
            "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
            "code": "UPDATE",
            "display": "revise",
        }
    )
    web.store.create(
        {
            "resourceType": "Provenance",
            "target": [{"reference": f"DiagnosticReport/{report_id}"}],
            "recorded": now,
            "activity": {"coding": [activity]},
            "agent": [
                {
                    "type": {"coding": [{"system": _PARTICIPANT, "code": "author", "display": "Author"}]},
                    "who": who,
                },
                {
                    "type": {
                        "coding": [
                            {"system": _PARTICIPANT, "code": "legal", "display": "Legal Authenticator"}
                        ]
                    },
                    "who": who,
                },
            ],
            "entity": [
                {
                    "role": "revision",
                    "what": {"reference": f"DiagnosticReport/{report_id}/_history/{version}"},
                }
            ],
        }
    )
    draft = web.draft_text(signed)
    web.users.record_event(
        ReportEvent(
            report_id,
            new_version,
            user.username,
            user.display_name,
            "signed" if status == "final" else "amended",
            dt.datetime.now(dt.UTC).replace(tzinfo=None),
            draft_text=draft.as_text(),
            signed_text=text.as_text(),
            diff=text_diff(draft, text),
            ehr_status="sending",
        )
    )
    web.users.set_ehr_status(report_id, new_version, web.push_to_ehr(signed, user))
    return RedirectResponse(f"/reports/{report_id}?done={'signed' if status == 'final' else 'amended'}", 303)


@router.post("/reports/{report_id}/resend")
def resend(request: Request, web: Web, form: Form, report_id: str) -> Response:
    """Send the latest signature to the EHR again (after the EHR was unreachable)."""
    session = web.session(request)
    _require_radiologist(session, "send signatures to the EHR")
    web.check_form(request, session, form)
    report = web.report(report_id, session.user, with_analysis=False)
    if report.status not in ("final", "amended"):
        raise _PageError(409, "Not signed", "Only a signed report is sent to the EHR.")
    web.users.set_ehr_status(report_id, report.version, web.push_to_ehr(report, session.user))
    return RedirectResponse(f"/reports/{report_id}", 303)


def _set_status(store: ResourceStore, resource: dict[str, Any], status: str) -> None:
    if resource.get("status") != status:
        store.update({**resource, "status": status}, if_match=f'W/"{resource["meta"]["versionId"]}"')


@router.post("/reports/{report_id}/findings/{track_id}")
def review_finding(request: Request, web: Web, form: Form, report_id: str, track_id: str) -> Response:
    session = web.session(request)
    _require_radiologist(session, "accept or reject findings")
    web.check_form(request, session, form)
    user = session.user
    report = web.report(report_id, user)
    decision = form.get("decision")
    lesion = report.lesion(track_id)
    if lesion is None or decision not in ("accept", "reject"):
        raise _PageError(404, "Finding not found", "This report has no such finding.")
    if report.status != "preliminary":
        raise _PageError(
            409, "Already signed", "Findings are reviewed before signing; amend the text instead."
        )
    version = _posted_version(form)
    if version != report.version:
        return _conflict(web, session, report_id, version, report.text)
    label = str(lesion.get("label") or "")
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    reason = " ".join(form.get("reason", "").split())[:500]
    new_version = version
    if decision == "reject":
        text, mixed = remove_lesion_sentences(report.text, label)
        resource = dict(report.resource)
        set_report_text(resource, text, _now())
        suffix = f"/{track_id}"
        dropped = [
            obs
            for obs in web.results(report)
            if any(
                i.get("system") == OBSERVATION_ID_SYSTEM and str(i.get("value", "")).endswith(suffix)
                for i in obs.get("identifier") or []
            )
        ]
        gone = {f"Observation/{obs['id']}" for obs in dropped}
        resource["result"] = [r for r in resource.get("result") or [] if r.get("reference") not in gone]
        try:
            stored = web.store.update(resource, if_match=f'W/"{version}"')
        except VersionConflict:
            return _conflict(web, session, report_id, version, report.text)
        new_version = int(stored["meta"]["versionId"])
        for obs in dropped:
            _set_status(web.store, obs, "entered-in-error")
        if mixed:
            reason = (
                reason + " " if reason else ""
            ) + f"(kept {len(mixed)} sentence(s) naming other lesions too)"
    web.users.record_feedback(
        FeedbackRecord(
            report_id,
            track_id,
            label,
            "rejected" if decision == "reject" else "accepted",
            user.username,
            reason,
            now,
        )
    )
    web.users.record_event(
        ReportEvent(
            report_id,
            new_version,
            user.username,
            user.display_name,
            f"{decision}ed",
            now,
            detail=f"finding {label}",
        )
    )
    return RedirectResponse(f"/reports/{report_id}?done={decision}ed#finding-{quote(label)}", 303)


@router.get("/reports/{report_id}/evidence/{track_id}/{kind}.png")
def evidence_image(
    request: Request, web: Web, report_id: str, track_id: str, kind: str, thumb: int = 0
) -> Response:
    session = web.session(request)
    report = web.report(report_id, session.user)
    lesion = report.lesion(track_id)
    if lesion is None or report.study_uid is None or kind not in ("current", "prior"):
        return Response("no such image", status_code=404, media_type="text/plain")
    current, prior = lesion.get("current"), lesion.get("prior")
    link = prior_link(report.analysis or {}, lesion)
    prior_centre = _prior_centre(web, report, track_id, link.study_uid)
    png: bytes | None = None
    if kind == "current":
        volume = web.volume(report.study_uid)
        if volume is not None:
            png = key_slice_png(
                volume,
                lesion,
                labels=report.seg.get("labels") if report.seg else None,
                saliency=report.seg.get("saliency") if report.seg else None,
                expected_lps_mm=link.to_current(prior_centre) if current is None and prior_centre else None,
                expected_radius_mm=float((prior or {}).get("long_axis_mm") or 0.0) / 2,
                thumb=bool(thumb),
            )
    elif link.study_uid is not None:
        if prior_centre is None and current is not None:
            prior_centre = link.to_prior(current["centroid_lps_mm"])
        volume = web.volume(link.study_uid) if prior_centre is not None else None
        if volume is not None and prior_centre is not None:
            size = (prior or {}).get("long_axis_mm") or (current or {}).get("long_axis_mm") or 10.0
            png = prior_slice_png(
                volume,
                prior_centre,
                organ=str(lesion.get("organ")),
                radius_mm=float(size) / 2,
                thumb=bool(thumb),
                seen=prior is not None,
            )
    if png is None:
        return Response("image not available", status_code=404, media_type="text/plain")
    return Response(
        png, media_type="image/png", headers={"Cache-Control": "private, max-age=300", **_SECURITY_HEADERS}
    )


def _prior_centre(
    web: WebPages, report: _Report, track_id: str, prior_uid: str | None
) -> tuple[float, float, float] | None:
    """The prior lesion's centroid in the prior study's own frame, as the EHR holds it (when read recently)."""
    view = web.ehr_view(report.patient_id, cached_only=True)
    if not isinstance(view, _EhrView) or prior_uid is None:
        return None
    for tp in view.time_points:
        if tp.study_uid == prior_uid:
            for f in tp.findings:
                if f.track_id == track_id and f.centroid_lps_mm is not None:
                    return f.centroid_lps_mm
    return None


# --- the clinician's view ---------------------------------------------------------------------------


@router.get("/patients")
def patients(request: Request, web: Web) -> Response:
    session = web.session(request)
    by_patient: dict[str, list[_Report]] = {}
    for r in web.readable_reports(session.user, {}):
        by_patient.setdefault(r.patient_id, []).append(r)
    rows: list[dict[str, Any]] = []
    for pid, reports in by_patient.items():
        latest = max(reports, key=lambda r: r.date)
        rows.append(
            {"patient_id": pid, "latest": latest, "count": len(reports), "urgency": urgency(latest.analysis)}
        )
    rows.sort(key=lambda row: (row["urgency"][0], row["latest"].date))
    return web.page("patients.html", session, rows=rows)


def _patient_reports(web: WebPages, user: User, patient_id: str) -> list[_Report]:
    if not is_fhir_id(patient_id):
        raise _PageError(404, "Patient not found", "There is no patient here whose studies you may read.")
    reports = web.readable_reports(user, {"subject": f"Patient/{patient_id}"})
    if not reports:
        raise _PageError(404, "Patient not found", "There is no patient here whose studies you may read.")
    return sorted(reports, key=lambda r: (r.date, r.id))


@router.get("/patients/{patient_id}")
def patient_page(request: Request, web: Web, patient_id: str) -> Response:
    session = web.session(request)
    reports = _patient_reports(web, session.user, patient_id)
    latest = next((r for r in reversed(reports) if r.analysis is not None), reports[-1])
    ehr = web.ehr_view(patient_id)
    view = ehr if isinstance(ehr, _EhrView) else None
    rejected = frozenset(t for t, f in web.users.feedback(latest.id).items() if f.decision == "rejected")
    lesions = (
        lesion_history(latest.analysis, view.time_points if view else (), rejected)
        if latest.analysis
        else None
    )
    own_ids = {
        i.get("value")
        for r in reports
        for i in r.resource.get("identifier") or []
        if i.get("system") == REPORT_ID_SYSTEM
    }
    ehr_reports = [
        {
            "date": str(res.get("effectiveDateTime") or res.get("issued") or "")[:10],
            "status": res.get("status"),
            "text": raw_report_text(res),
        }
        for res in (view.reports if view else [])
        if not any(
            i.get("system") == REPORT_ID_SYSTEM and i.get("value") in own_ids
            for i in res.get("identifier") or []
        )
    ]
    ehr_reports.sort(key=lambda r: str(r["date"]), reverse=True)
    history = [{"report": r, "events": web.users.events(r.id)} for r in reversed(reports)]
    return web.page(
        "patient.html",
        session,
        patient_id=patient_id,
        patient_identifier=ehr.patient_identifier if isinstance(ehr, _EhrView) else None,
        latest=latest,
        analysis=latest.analysis,
        lesions=lesions,
        rejected=rejected,
        evidence=f"/reports/{latest.id}/evidence",
        ehr_reports=ehr_reports,
        ehr_error=ehr if isinstance(ehr, str) else None,
        history=history,
    )


@router.get("/patients/{patient_id}/course.png")
def course_image(request: Request, web: Web, patient_id: str) -> Response:
    session = web.session(request)
    reports = _patient_reports(web, session.user, patient_id)
    latest = next((r for r in reversed(reports) if r.analysis is not None), None)
    png = course_png(course_points(latest.analysis)) if latest is not None and latest.analysis else None
    if png is None:
        return Response("no target lesions to chart", status_code=404, media_type="text/plain")
    return Response(
        png, media_type="image/png", headers={"Cache-Control": "private, max-age=60", **_SECURITY_HEADERS}
    )


# --- mounting -----------------------------------------------------------------------------------------


def mount_web(
    app: FastAPI,
    settings: Settings,
    store: ResourceStore,
    users: UserStore | None = None,
    images: StudyImages | None = None,
) -> WebPages:
    """Add the pages, their static files and their error pages to ``app``."""
    web = WebPages(settings, store, users, images)
    app.state.web = web
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(_LoginRequired)
    async def login_required(_: Request, exc: _LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.next_url, safe='/')}", 303)

    @app.exception_handler(_PageError)
    async def page_error(request: Request, exc: _PageError) -> Response:
        session = await run_in_threadpool(web.users.session, request.cookies.get(SESSION_COOKIE))
        return web.html(
            "error.html",
            exc.status,
            title=exc.title,
            message=exc.message,
            user=session.user if session else None,
            csrf=session.csrf_token if session else "",
        )

    return web
