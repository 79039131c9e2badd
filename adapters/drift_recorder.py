"""Every analysed study feeds the drift monitor: its unit (site and station), its signals, one step.

``DriftRecorder.record_result`` is called by the analysis (``workers.analysis.PipelineAnalyzer``) once the
result exists. The site of a study is its DICOM StationName mapped by ``INTERVAL_WEB_STATION_SITES`` (the
mapping the web pages use; an unmapped station is its own site); a study without a StationName is known by
its Manufacturer and model. Monitoring must not cost an analysis: when the drift tables cannot be written,
the failure is logged with the study's UID and counted (``interval_drift_record_failures_total``), and the
analysis goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sqlalchemy.exc import SQLAlchemyError

from adapters.drift_store import DriftStore, RecordOutcome
from adapters.settings import Settings
from adapters.telemetry import DRIFT_ALERTS, DRIFT_RECORD_FAILURES
from core.drift_signals import Unit, signals_of_result
from core.pipeline import StudyResult
from core.types import AcquisitionInfo

__all__ = ["DriftRecorder", "unit_of"]

log = logging.getLogger(__name__)


def unit_of(acquisition: AcquisitionInfo, station_sites: Mapping[str, str]) -> Unit:
    """The monitored unit of a study: (site, station)."""
    station = acquisition.station_name.strip()
    if not station:
        station = " ".join(p for p in (acquisition.manufacturer.strip(), acquisition.model_name.strip()) if p)
    station = station or "unknown station"
    return Unit(station_sites.get(station, station), station)


class DriftRecorder:
    def __init__(self, store: DriftStore, station_sites: Mapping[str, str] | None = None) -> None:
        self.store = store
        self.station_sites = dict(station_sites or {})

    @classmethod
    def from_settings(cls, settings: Settings) -> DriftRecorder:
        return cls(DriftStore(settings.database_url), settings.web_station_sites)

    def record_result(self, result: StudyResult) -> RecordOutcome | None:
        """Record the study's signals and step its unit's monitor; None when the store failed (logged)."""
        signals = signals_of_result(result, unit_of(result.acquisition, self.station_sites))
        try:
            outcome = self.store.record(signals)
        except SQLAlchemyError as exc:
            DRIFT_RECORD_FAILURES.inc()
            log.warning(
                "drift signals of study %s not recorded (%s); the analysis goes on",
                signals.study_uid,
                type(exc).__name__,
            )
            return None
        if outcome.raised is not None:
            DRIFT_ALERTS.labels(outcome.unit.site, outcome.unit.station).inc()
            log.warning("drift alert %s: %s", outcome.raised.id, outcome.raised.summary)
        for alert_id in outcome.resolved:
            log.info("drift alert %s resolved at %s", alert_id, outcome.unit)
        return outcome
