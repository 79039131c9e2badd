"""The clinician's pages: a read-only summary of each patient's change over time.

- ``/patients``: the patients whose studies a person may read, most urgent first.
- ``/patients/{id}``: the sum of diameters over time with the RECIST thresholds and the nadir (a chart drawn
  on the server), per-lesion history with thumbnails, the response and its reasoning, the reports (Interval's
  with their history of edits and signatures, and the EHR's others, shown as text).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from adapters.evidence import course_png, course_points, lesion_history, raw_report_text, urgency
from adapters.fhir_audit import entity
from adapters.fhir_publish import REPORT_ID_SYSTEM
from adapters.fhir_validation import is_fhir_id
from service.users import User
from service.web_context import SECURITY_HEADERS, PageError, StoredReport, Web, WebPages
from service.web_ehr import EhrView
from service.web_session import require_session

__all__ = ["router"]

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)


@router.get("/patients")
def patients(request: Request, web: Web) -> Response:
    session = require_session(web, request)
    by_patient: dict[str, list[StoredReport]] = {}
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


def _patient_reports(web: WebPages, user: User, patient_id: str) -> list[StoredReport]:
    if not is_fhir_id(patient_id):
        raise PageError(404, "Patient not found", "There is no patient here whose studies you may read.")
    reports = web.readable_reports(user, {"subject": f"Patient/{patient_id}"})
    if not reports:
        raise PageError(404, "Patient not found", "There is no patient here whose studies you may read.")
    return sorted(reports, key=lambda r: (r.date, r.id))


@router.get("/patients/{patient_id}")
def patient_page(request: Request, web: Web, patient_id: str) -> Response:
    session = require_session(web, request)
    reports = _patient_reports(web, session.user, patient_id)
    web.audit("patient-view", session.user, [entity(f"Patient/{patient_id}", "patient")])
    latest = next((r for r in reversed(reports) if r.analysis is not None), reports[-1])
    ehr = web.ehr.view(patient_id)
    view = ehr if isinstance(ehr, EhrView) else None
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
        patient_identifier=ehr.patient_identifier if isinstance(ehr, EhrView) else None,
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
    session = require_session(web, request)
    reports = _patient_reports(web, session.user, patient_id)
    latest = next((r for r in reversed(reports) if r.analysis is not None), None)
    png = course_png(course_points(latest.analysis)) if latest is not None and latest.analysis else None
    if png is None:
        return Response("no target lesions to chart", status_code=404, media_type="text/plain")
    return Response(
        png, media_type="image/png", headers={"Cache-Control": "private, max-age=60", **SECURITY_HEADERS}
    )
