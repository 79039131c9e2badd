"""The drift dashboard: each monitored scanner's score and state, and the alerts with their signals and studies.

- ``/drift``: radiologists and admins (clinicians get a 403 page); the scanners of the sites a person reads.
- ``/drift/{site}/{station}``: one scanner: its reference, the last window's tests, the scores of its recent
  studies. The JSON behind both is ``service.drift_api``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from core.drift_signals import CATALOGUE, Unit
from service.users import Role, WebSession
from service.web_context import PageError, Web
from service.web_session import require_session

__all__ = ["router"]

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)


def _require_monitor_reader(web: Web, request: Request) -> WebSession:
    session = require_session(web, request)
    if session.user.role is Role.CLINICIAN:
        raise PageError(403, "Not allowed", "The drift dashboard is for radiologists and administrators.")
    return session


@router.get("/drift")
def dashboard(request: Request, web: Web) -> Response:
    session = _require_monitor_reader(web, request)
    units = [u for u in web.drift.units() if session.user.can_read_site(u.unit.site)]
    alerts = [a for a in web.drift.alerts(limit=200) if session.user.can_read_site(a.unit.site)]
    return web.page(
        "drift.html",
        session,
        units=units,
        active=[a for a in alerts if a.status == "active"],
        resolved=[a for a in alerts if a.status != "active"][:20],
        catalogue=CATALOGUE,
    )


@router.get("/drift/{site}/{station}")
def unit_page(request: Request, web: Web, site: str, station: str) -> Response:
    session = _require_monitor_reader(web, request)
    unit = Unit(site, station) if site and station else None
    status = next((u for u in web.drift.units() if u.unit == unit), None)
    if unit is None or status is None or not session.user.can_read_site(site):
        raise PageError(404, "Scanner not found", "No monitored scanner here that you may see.")
    return web.page(
        "drift_unit.html",
        session,
        unit_status=status,
        reference=web.drift.reference(unit),
        recent=web.drift.recent_scores(unit, limit=60),
        alerts=web.drift.alerts(site=site, limit=50),
        catalogue=CATALOGUE,
    )
