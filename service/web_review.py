"""The radiologist's pages: the worklist, the draft editor with its evidence, and signing.

- ``/worklist``: drafts awaiting review, most urgent first (progression and new lesions), filtered by site
  and status; below them the studies whose site had AI switched off ("AI not used").
- ``/reports/{id}``: the draft editor. Every sentence shows where it came from (deterministic wording, model
  text, replaced or added by the verifier, edited by a person) and whether it agrees with the measurements;
  each finding shows its key slice with the contour, the matched prior slice, the saliency overlay when the
  model computed one, the confidence and the measurement, and can be accepted or rejected (a rejected
  finding leaves the report and is kept as feedback).
- Sign -> ``final`` once every AI finding is accepted or rejected (``service.signoff``: refused with the pending
  ones named, the text kept); a signed report is amended -> ``amended``; both in Interval's store with a Provenance
  naming the radiologist, and at the EHR (``service.web_ehr``) when one is configured. The diff between the
  draft and the signed text is kept (``service.users``). A signature the EHR did not take can be sent again.

Two people editing one draft: every form carries the version it was read at; a save or signature of an
older version is refused (409) with the person's text kept in the form and the current text shown beside it.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from adapters.evidence import (
    key_slice_png,
    prior_link,
    prior_slice_png,
    remove_lesion_sentences,
    sentence_views,
    set_report_text,
    urgency,
)
from adapters.fhir_audit import audit_event, identified_entity, report_entities, user_agent
from adapters.fhir_codes import DICOM_UID
from adapters.fhir_publish import OBSERVATION_ID_SYSTEM
from adapters.resource_store import VersionConflict
from adapters.sql_store import utc_now
from core.errors import IntervalError, OversightError
from core.oversight import pending_findings
from core.report import ReportText
from service.signoff import (
    ai_findings,
    record_signature,
    require_reviewed,
    set_status,
    signature_kind,
    signer,
)
from service.users import FeedbackRecord, ReportEvent, Role, User, WebSession
from service.web_context import (
    SECURITY_HEADERS,
    Form,
    PageError,
    StoredReport,
    Web,
    WebPages,
    now_instant,
)
from service.web_ehr import EhrView
from service.web_session import check_form, require_radiologist, require_session

__all__ = ["router"]

log = logging.getLogger("interval.service.web")

_SIGNABLE = ("preliminary", "final", "amended")

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)


# --- worklist -------------------------------------------------------------------------------------


@router.get("/worklist")
def worklist(request: Request, web: Web, site: str = "", status: str = "preliminary") -> Response:
    session = require_session(web, request)
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
    without_ai = [] if status == "final" else web.studies_without_ai(user)
    if site:
        without_ai = [r for r in without_ai if (r["site"] or "(no site)") == site]
    return web.page(
        "worklist.html",
        session,
        rows=rows,
        sites=sorted({*sites, *((r["site"] or "(no site)") for r in without_ai)}),
        site=site,
        status_filter=status,
        without_ai=without_ai,
    )


# --- the report page --------------------------------------------------------------------------------


def _finding_rows(web: WebPages, report: StoredReport) -> list[dict[str, Any]]:
    feedback = web.users.feedback(report.id)
    saliency = report.seg.get("saliency") if report.seg is not None else None
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
                "saliency": _has_saliency(saliency, lesion),
                "base": f"/reports/{report.id}/evidence/{quote(lesion['track_id'])}",
            }
        )
    return rows


def _has_saliency(saliency: Any, lesion: dict[str, Any]) -> bool:
    """Whether a saliency map was kept for this lesion (``interval explain --artifacts``): non-zero on its key
    slice."""
    current = lesion.get("current")
    if saliency is None or not current:
        return False
    k = int(current.get("slice_index", -1))
    return 0 <= k < saliency.shape[0] and bool(saliency[k].max() > 0)


def _report_page(
    web: WebPages,
    session: WebSession,
    report: StoredReport,
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
    ehr = web.ehr.view(report.patient_id)
    prior_text = None
    if isinstance(ehr, EhrView):
        earlier = [tp for tp in ehr.time_points if tp.study_date.isoformat() < report.date and tp.report_text]
        prior_text = earlier[-1] if earlier else None
    editable = user.can_sign and report.status in _SIGNABLE
    events = web.users.events(report.id)
    verdicts = {t: f.decision for t, f in web.users.feedback(report.id).items()}
    pending = pending_findings(ai_findings(report), verdicts) if report.status == "preliminary" else []
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
        pending=pending,
    )


@router.get("/reports/{report_id}")
def report_page(request: Request, web: Web, report_id: str, done: str = "") -> Response:
    session = require_session(web, request)
    report = web.report(report_id, session.user)
    web.audit("report-view", session.user, report_entities(report.resource, report.version))
    notices = {
        "saved": "Draft saved.",
        "signed": "Report signed.",
        "amended": "Report amended.",
        "rejected": "Finding rejected: it left the report and was recorded as feedback.",
        "accepted": "Finding accepted.",
    }
    return _report_page(web, session, report, notice=notices.get(done))


def _posted_text(form: dict[str, str]) -> ReportText:
    def clean(name: str) -> str:
        return " ".join(form.get(name, "").replace("\r", "").split())

    return ReportText(clean("comparison"), clean("findings"), clean("impression"))


def _posted_version(form: dict[str, str]) -> int:
    value = form.get("version", "")
    if not value.isdigit() or len(value) > 9:
        raise PageError(400, "Form refused", "The form does not say which version of the report it edits.")
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
    session = require_session(web, request)
    require_radiologist(session, "edit reports")
    check_form(web, request, session, form)
    report = web.report(report_id, session.user, with_analysis=False)
    version, text = _posted_version(form), _posted_text(form)
    if report.status != "preliminary":
        raise PageError(
            409, "Already signed", "A signed report is changed by amending it, not by saving a draft."
        )
    if version != report.version:
        return _conflict(web, session, report_id, version, text)
    resource = dict(report.resource)
    set_report_text(resource, text, now_instant())
    edit = _audited("report-edit", session.user, resource, version + 1)
    try:
        stored = web.store.update(resource, if_match=f'W/"{version}"', also_create=[edit])
    except VersionConflict:
        return _conflict(web, session, report_id, version, text)
    web.users.record_event(
        ReportEvent(
            report_id,
            int(stored["meta"]["versionId"]),
            session.user.username,
            session.user.display_name,
            "saved",
            utc_now(),
        )
    )
    return RedirectResponse(f"/reports/{report_id}?done=saved", 303)


@router.post("/reports/{report_id}/sign")
def sign(request: Request, web: Web, form: Form, report_id: str) -> Response:
    session = require_session(web, request)
    require_radiologist(session, "sign reports")
    check_form(web, request, session, form)
    user = session.user
    report = web.report(report_id, user, with_analysis=False)
    version, text = _posted_version(form), _posted_text(form)
    if report.status not in _SIGNABLE:
        raise PageError(409, "Cannot sign", f"A report with status {report.status} cannot be signed.")
    if version != report.version:
        return _conflict(web, session, report_id, version, text)
    if not text.impression:
        raise PageError(400, "Cannot sign", "The impression is empty: write it before signing.")
    kind = signature_kind(report.status)
    if report.status == "preliminary":
        try:
            require_reviewed(web, web.wrap(report.resource, with_analysis=True))
        except OversightError as exc:
            web.audit(kind, user, report_entities(report.resource), outcome_desc=f"refused: {exc}")
            return _refused(web, session, report_id, text, exc)
    status = "final" if report.status == "preliminary" else "amended"
    now = now_instant()
    resource = dict(report.resource)
    set_report_text(resource, text, now)
    resource["status"] = status
    resource["issued"] = now
    resource["resultsInterpreter"] = [signer(user)]
    signed_event = _audited(kind, user, resource, version + 1)
    try:
        stored = web.store.update(resource, if_match=f'W/"{version}"', also_create=[signed_event])
    except VersionConflict:
        return _conflict(web, session, report_id, version, text)
    signed = web.wrap(stored, with_analysis=True)
    record_signature(web, signed, user, read_version=version, text=text, now=now, ehr_status="sending")
    web.users.set_ehr_status(report_id, signed.version, _send_to_ehr(web, signed, user))
    return RedirectResponse(f"/reports/{report_id}?done={'signed' if status == 'final' else 'amended'}", 303)


def _audited(kind: str, user: User, resource: dict[str, Any], version: int) -> dict[str, Any]:
    """The AuditEvent of ``user``'s change producing ``version`` of the report, stored with the change."""
    return audit_event(kind, user_agent(user.username, user.role.value), report_entities(resource, version))


def _refused(
    web: WebPages, session: WebSession, report_id: str, text: ReportText, exc: OversightError
) -> Response:
    """The report page again (409), the radiologist's text kept, saying what to do before signing."""
    report = web.report(report_id, session.user)
    return _report_page(web, session, report, status=409, edit_text=text, conflict=f"Not signed. {exc}")


@router.post("/reports/{report_id}/resend")
def resend(request: Request, web: Web, form: Form, report_id: str) -> Response:
    """Send the latest signature to the EHR again (after the EHR was unreachable)."""
    session = require_session(web, request)
    require_radiologist(session, "send signatures to the EHR")
    check_form(web, request, session, form)
    report = web.report(report_id, session.user, with_analysis=False)
    if report.status not in ("final", "amended"):
        raise PageError(409, "Not signed", "Only a signed report is sent to the EHR.")
    status = _send_to_ehr(web, report, session.user, again=True)
    web.users.set_ehr_status(report_id, report.version, status)
    return RedirectResponse(f"/reports/{report_id}", 303)


def _send_to_ehr(web: WebPages, report: StoredReport, user: User, *, again: bool = False) -> str:
    """Send the signature (and the findings' verdicts) to the EHR; returns the status to record.

    ``again`` (the "send again" button, after a failure): the EHR may have taken the first try and lost
    its reply; when it already holds this signature (signed, the same text) nothing is written, so that the
    report is not marked ``amended`` by its own signature (``service.web_ehr.holds_signature``)."""
    ref = report.ehr_ref
    if not web.ehr.configured:
        return "no EHR configured"
    if ref is None:
        return "this report was not published to the EHR"
    try:
        written = web.ehr.sign(
            ref,
            report.text,
            user,
            _observation_statuses(web, report),
            unless_holds=report.status if again else None,
        )
    except IntervalError as exc:
        log.warning("report %s: signature not sent to the EHR: %s", report.id, exc.reason)
        return f"failed: {exc}"
    web.ehr.forget(report.patient_id)
    return "sent" if written else "sent (the EHR already had this signature)"


def _observation_statuses(web: WebPages, report: StoredReport) -> dict[str, str]:
    """Observation identifier -> status for the EHR: ``final`` for the report's results, ``entered-in-error``
    for the findings a radiologist rejected (identifiers as ``adapters.fhir_publish`` made them)."""
    out = {
        str(i["value"]): "final"
        for obs in web.results(report)
        for i in obs.get("identifier") or []
        if i.get("system") == OBSERVATION_ID_SYSTEM and i.get("value")
    }
    model_version = (report.analysis or {}).get("model_version")
    if report.study_uid and model_version:
        for track, verdict in web.users.feedback(report.id).items():
            if verdict.decision == "rejected":
                out[f"{report.study_uid}/{model_version}/{track}"] = "entered-in-error"
    return out


@router.post("/reports/{report_id}/findings/{track_id}")
def review_finding(request: Request, web: Web, form: Form, report_id: str, track_id: str) -> Response:
    session = require_session(web, request)
    require_radiologist(session, "accept or reject findings")
    check_form(web, request, session, form)
    user = session.user
    report = web.report(report_id, user)
    decision = form.get("decision")
    lesion = report.lesion(track_id)
    if lesion is None or decision not in ("accept", "reject"):
        raise PageError(404, "Finding not found", "This report has no such finding.")
    if report.status != "preliminary":
        raise PageError(
            409, "Already signed", "Findings are reviewed before signing; amend the text instead."
        )
    version = _posted_version(form)
    if version != report.version:
        return _conflict(web, session, report_id, version, report.text)
    label = str(lesion.get("label") or "")
    now = utc_now()
    reason = " ".join(form.get("reason", "").split())[:500]
    new_version = version
    if decision == "reject":
        text, mixed = remove_lesion_sentences(report.text, label)
        resource = dict(report.resource)
        set_report_text(resource, text, now_instant())
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
        verdict = _finding_event("finding-reject", user, resource, version + 1, track_id)
        try:
            stored = web.store.update(resource, if_match=f'W/"{version}"', also_create=[verdict])
        except VersionConflict:
            return _conflict(web, session, report_id, version, report.text)
        new_version = int(stored["meta"]["versionId"])
        for obs in dropped:
            set_status(web.store, obs, "entered-in-error")
        if mixed:
            reason = (
                reason + " " if reason else ""
            ) + f"(kept {len(mixed)} sentence(s) naming other lesions too)"
    else:
        web.store.create(_finding_event("finding-accept", user, report.resource, version, track_id))
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
    web.record_review(report)  # the drift monitor's rejected_fraction
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


def _finding_event(
    kind: str, user: User, report: dict[str, Any], version: int, track_id: str
) -> dict[str, Any]:
    """The AuditEvent of a verdict on one AI finding: the report (at ``version``), its patient, and the finding
    by its tracking UID."""
    finding = identified_entity(DICOM_UID, f"urn:oid:{track_id}", "resource")
    return audit_event(
        kind, user_agent(user.username, user.role.value), [*report_entities(report, version), finding]
    )


@router.get("/reports/{report_id}/evidence/{track_id}/{kind}.png")
def evidence_image(
    request: Request, web: Web, report_id: str, track_id: str, kind: str, thumb: int = 0
) -> Response:
    session = require_session(web, request)
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
        png, media_type="image/png", headers={"Cache-Control": "private, max-age=300", **SECURITY_HEADERS}
    )


def _prior_centre(
    web: WebPages, report: StoredReport, track_id: str, prior_uid: str | None
) -> tuple[float, float, float] | None:
    """The prior lesion's centroid in the prior study's own frame, as the EHR holds it (when read recently)."""
    view = web.ehr.view(report.patient_id, cached_only=True)
    if not isinstance(view, EhrView) or prior_uid is None:
        return None
    for tp in view.time_points:
        if tp.study_uid == prior_uid:
            for f in tp.findings:
                if f.track_id == track_id and f.centroid_lps_mm is not None:
                    return f.centroid_lps_mm
    return None
