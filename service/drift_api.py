"""The drift monitor, read over HTTP: a JSON resource for machines, metrics for Prometheus, a page for people.

JSON (not FHIR: nothing here is clinical data about a patient), bearer token with the SMART-style scope
``system/DriftMonitor.rs`` (or ``system/*.read``), errors as OperationOutcome like the rest of the API:

- ``GET /api/drift/units``: every monitored scanner (site, station) with its last score, the threshold, the rule's
  state, active alerts and the last window's per-signal tests;
- ``GET /api/drift/units/{site}/{station}``: one unit, with its reference (rule, calibration, signals) and the
  score of its recent studies;
- ``GET /api/drift/alerts?status=active|resolved&site=...&_count=N``: alerts, newest first;
- ``GET /api/drift/alerts/{id}``: one alert: the site and station, the signals that moved (what the window and
  the reference showed, adjusted p-value, z), the StudyInstanceUIDs of the window, the scanners.

Prometheus: ``DriftCollector`` joins the API's ``/metrics`` (``adapters.telemetry``). The dashboard page is
``service.web_drift`` (``/drift``). ``mount_drift`` adds all three to the app.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from adapters.drift_store import DriftStore
from adapters.resource_store import ResourceNotFoundError
from adapters.telemetry import DriftCollector, StoreCollector
from core.drift_signals import CATALOGUE, Unit
from service import web_drift
from service.auth import Client, require

__all__ = ["mount_drift", "router"]

router = APIRouter(prefix="/api/drift", tags=["drift monitoring"], default_response_class=JSONResponse)
Reader = Annotated[Client, Depends(require("DriftMonitor", "r"))]
Searcher = Annotated[Client, Depends(require("DriftMonitor", "s"))]


def _drift(request: Request) -> DriftStore:
    store: DriftStore = request.app.state.web.drift
    return store


Drift = Annotated[DriftStore, Depends(_drift)]


@router.get("/units", summary="Monitored scanners with their drift score and state")
def list_units(_client: Searcher, drift: Drift) -> dict[str, Any]:
    return {"units": [u.to_json() for u in drift.units()]}


@router.get("/units/{site}/{station}", summary="One monitored scanner: reference, state, recent scores")
def read_unit(site: str, station: str, _client: Reader, drift: Drift) -> dict[str, Any]:
    unit = Unit(site, station)
    status = next((u for u in drift.units() if u.unit == unit), None)
    if status is None:
        raise ResourceNotFoundError(f"no monitored scanner {station!r} at site {site!r}")
    reference = drift.reference(unit)
    return {
        **status.to_json(),
        "reference": None
        if reference is None
        else {
            "studies": reference.n_studies,
            "rule": {
                **{k: v for k, v in reference.to_json()["rule"].items() if k != "score_threshold"},
                "score_threshold": round(reference.rule.score_threshold, 3),
            },
            "calibration": dict(reference.calibration),
            "signals": [
                {
                    "signal": name,
                    "group": CATALOGUE[name].group.value,
                    "description": CATALOGUE[name].description,
                    "reference": s.summary(),
                }
                for name, s in reference.signals.items()
            ],
        },
        "recent_studies": drift.recent_scores(unit),
    }


@router.get("/alerts", summary="Drift alerts, newest first")
def list_alerts(
    _client: Searcher,
    drift: Drift,
    status: Annotated[str | None, Query(pattern="^(active|resolved)$")] = None,
    site: Annotated[str | None, Query(max_length=128)] = None,
    count: Annotated[int, Query(alias="_count", ge=1, le=500)] = 100,
) -> dict[str, Any]:
    return {"alerts": [a.to_json() for a in drift.alerts(status=status, site=site, limit=count)]}


@router.get("/alerts/{alert_id}", summary="One drift alert: site, signals and studies")
def read_alert(alert_id: str, _client: Reader, drift: Drift) -> dict[str, Any]:
    alert = drift.alert(alert_id) if alert_id.isalnum() and len(alert_id) <= 64 else None
    if alert is None:
        raise ResourceNotFoundError("no drift alert has that id")
    return alert.to_json()


def mount_drift(app: FastAPI, collector: StoreCollector) -> None:
    """Add the JSON resource, the dashboard page and the Prometheus gauges (after ``service.web.mount_web``,
    whose ``WebPages`` holds the drift store)."""
    app.include_router(router)
    app.include_router(web_drift.router)
    collector.extra.append(DriftCollector(app.state.web.drift.units))
