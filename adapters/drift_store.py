"""The drift monitor's records in SQL (SQLAlchemy, the same database as ``adapters.resource_store``).

Tables (created on start):

- ``drift_unit``: one row per scanner at a site (``core.drift_signals.Unit``): its reference
  (``core.drift.Reference`` as JSON; none until someone sets it), the sequential rule's state, the last
  window's evaluation and score;
- ``drift_study``: one row per analysed study: StudyInstanceUID, unit, scanner, the signal values, and the
  evaluation of the window the study completed (score, positive);
- ``drift_alert``: alerts raised: unit, status (``active`` / ``resolved``), the signals that moved with
  what the window and the reference showed, the studies of the window (UIDs only), the scanners.

``DriftStore.record`` is the whole step for one study, in one transaction: store the signals, evaluate the
unit's last ``rule.window`` studies recorded since its reference was set, advance the rule, raise or resolve
an alert. The unit's row is locked for the step (``SELECT ... FOR UPDATE`` on PostgreSQL; one writer at a
time on SQLite), so workers recording studies of one scanner at once advance its state one after the other.
A study recorded again (a retried analysis) replaces its values and advances nothing.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    String,
    Text,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from adapters.resource_store import format_instant
from adapters.sql_store import SqlStore, utc_now
from core.drift import (
    AlertDraft,
    MonitorState,
    Reference,
    Transition,
    WindowEvaluation,
    advance,
    describe_alert,
    evaluate_window,
)
from core.drift_signals import StudySignals, Unit

__all__ = ["AlertRecord", "DriftStore", "RecordOutcome", "UnitStatus"]

ACTIVE, RESOLVED = "active", "resolved"


class _Base(DeclarativeBase):
    pass


class _Unit(_Base):
    __tablename__ = "drift_unit"
    site: Mapped[str] = mapped_column(String(128), primary_key=True)
    station: Mapped[str] = mapped_column(String(128), primary_key=True)
    reference: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    reference_set_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    reference_after_pk: Mapped[int] = mapped_column(Integer, default=0)  # the window starts after this study
    state: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    last_score: Mapped[float | None] = mapped_column(Float, nullable=True)
    last_evaluation: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    last_study_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    last_scanner: Mapped[str] = mapped_column(Text, default="")


class _Study(_Base):
    __tablename__ = "drift_study"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(128), unique=True)
    site: Mapped[str] = mapped_column(String(128))
    station: Mapped[str] = mapped_column(String(128))
    scanner: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime)
    numeric: Mapped[dict[str, float]] = mapped_column(JSON)
    categorical: Mapped[dict[str, str]] = mapped_column(JSON)
    score: Mapped[float | None] = mapped_column(Float, nullable=True)
    positive: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    __table_args__ = (Index("ix_drift_study_unit", "site", "station", "pk"),)


class _Alert(_Base):
    __tablename__ = "drift_alert"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(String(128))
    station: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))
    opened_at: Mapped[dt.datetime] = mapped_column(DateTime)
    resolved_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    opened_by_study: Mapped[str] = mapped_column(String(128))
    score: Mapped[float] = mapped_column(Float)
    summary: Mapped[str] = mapped_column(Text)
    signals: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    study_uids: Mapped[list[str]] = mapped_column(JSON)
    scanners: Mapped[list[str]] = mapped_column(JSON)
    resolution: Mapped[str] = mapped_column(Text, default="")
    __table_args__ = (Index("ix_drift_alert_status", "status", "site", "station"),)


@dataclass(frozen=True)
class AlertRecord:
    """An alert as stored (what the API and the dashboard show)."""

    id: str
    unit: Unit
    status: str
    opened_at: dt.datetime
    resolved_at: dt.datetime | None
    opened_by_study: str
    score: float
    summary: str
    signals: list[dict[str, Any]]
    study_uids: list[str]
    scanners: list[str]
    resolution: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "site": self.unit.site,
            "station": self.unit.station,
            "status": self.status,
            "opened_at": format_instant(self.opened_at),
            "resolved_at": format_instant(self.resolved_at) if self.resolved_at else None,
            "opened_by_study": self.opened_by_study,
            "score": round(self.score, 3),
            "summary": self.summary,
            "signals": self.signals,
            "study_uids": self.study_uids,
            "scanners": self.scanners,
            "resolution": self.resolution,
        }


@dataclass(frozen=True)
class UnitStatus:
    """Where one monitored scanner stands (the dashboard's row)."""

    unit: Unit
    has_reference: bool
    reference_set_at: dt.datetime | None
    studies_since_reference: int
    window: int | None
    score: float | None
    score_threshold: float | None
    state: MonitorState
    active_alerts: int
    last_study_at: dt.datetime | None
    last_scanner: str
    last_evaluation: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.unit.site,
            "station": self.unit.station,
            "has_reference": self.has_reference,
            "reference_set_at": format_instant(self.reference_set_at) if self.reference_set_at else None,
            "studies_since_reference": self.studies_since_reference,
            "window": self.window,
            "score": None if self.score is None else round(self.score, 3),
            "score_threshold": None if self.score_threshold is None else round(self.score_threshold, 3),
            "positive_run": self.state.positive_run,
            "alert_open": self.state.alert_open,
            "active_alerts": self.active_alerts,
            "last_study_at": format_instant(self.last_study_at) if self.last_study_at else None,
            "last_scanner": self.last_scanner,
            "last_evaluation": self.last_evaluation,
        }


@dataclass(frozen=True)
class RecordOutcome:
    """What recording one study did."""

    unit: Unit
    duplicate: bool = False  # the study was recorded before: values replaced, nothing evaluated
    evaluation: WindowEvaluation | None = None  # None: no reference yet, or the window is not full
    raised: AlertRecord | None = None
    resolved: tuple[str, ...] = ()  # ids of alerts this study resolved


def _latest_studies(s: Session, unit: Unit, limit: int) -> Iterator[_Study]:
    """The unit's last ``limit`` studies, newest first."""
    return iter(
        s.scalars(
            select(_Study)
            .where(_Study.site == unit.site, _Study.station == unit.station)
            .order_by(_Study.pk.desc())
            .limit(limit)
        )
    )


class DriftStore(SqlStore):
    """Signals, references, the rule's state and alerts of every monitored unit."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        super().__init__(database_url, _Base.metadata)

    # --- recording ------------------------------------------------------------------------------------------

    def record(self, signals: StudySignals, *, at: dt.datetime | None = None) -> RecordOutcome:
        """Store one study's signals and take the monitor's step for its unit (see the module's docstring)."""
        for attempt in (1, 2):
            try:
                with self._tx() as s:
                    return self._record(s, signals, at or utc_now())
            except IntegrityError:
                if attempt == 2:  # the unit's row (or the study's) was inserted by another writer: once more
                    raise
        raise AssertionError("unreachable")

    def _record(self, s: Session, signals: StudySignals, at: dt.datetime) -> RecordOutcome:
        unit = signals.unit
        row = self._unit_row(s, unit)
        existing = s.scalar(select(_Study).where(_Study.study_uid == signals.study_uid))
        if existing is not None:
            existing.numeric, existing.categorical = dict(signals.numeric), dict(signals.categorical)
            return RecordOutcome(Unit(existing.site, existing.station), duplicate=True)
        s.add(
            _Study(
                study_uid=signals.study_uid,
                site=unit.site,
                station=unit.station,
                scanner=signals.scanner,
                recorded_at=at,
                numeric=dict(signals.numeric),
                categorical=dict(signals.categorical),
            )
        )
        s.flush()
        row.last_study_at, row.last_scanner = at, signals.scanner
        if row.reference is None:
            return RecordOutcome(unit)
        reference = Reference.from_json(row.reference)
        rule = reference.rule
        recent = list(
            s.scalars(
                select(_Study)
                .where(
                    _Study.site == unit.site,
                    _Study.station == unit.station,
                    _Study.pk > row.reference_after_pk,
                )
                .order_by(_Study.pk.desc())
                .limit(rule.window)
            )
        )[::-1]
        if len(recent) < rule.window:
            return RecordOutcome(unit)
        window = [_signals(r) for r in recent]
        evaluation = evaluate_window(reference, window)
        state, transition = advance(MonitorState.from_json(row.state), evaluation.positive, rule)
        score = None if math.isnan(evaluation.score) else evaluation.score
        row.state, row.last_score, row.last_evaluation = state.to_json(), score, evaluation.to_json()
        recent[-1].score, recent[-1].positive = score, evaluation.positive
        raised: AlertRecord | None = None
        resolved: tuple[str, ...] = ()
        if transition is Transition.RAISE:
            raised = self._raise(s, describe_alert(reference, window, evaluation), signals.study_uid, at)
        elif transition is Transition.RESOLVE:
            resolved = self._resolve(
                s, unit, at, f"{rule.negatives_to_resolve} windows in a row like the reference"
            )
        return RecordOutcome(unit, evaluation=evaluation, raised=raised, resolved=resolved)

    def _unit_row(self, s: Session, unit: Unit) -> _Unit:
        row = s.get(_Unit, (unit.site, unit.station), with_for_update=True)
        if row is None:
            row = _Unit(site=unit.site, station=unit.station, state={}, reference_after_pk=0, last_scanner="")
            s.add(row)
            s.flush()
        return row

    def _raise(self, s: Session, draft: AlertDraft, study_uid: str, at: dt.datetime) -> AlertRecord:
        alert = _Alert(
            id=uuid.uuid4().hex,
            site=draft.unit.site,
            station=draft.unit.station,
            status=ACTIVE,
            opened_at=at,
            resolved_at=None,
            opened_by_study=study_uid,
            score=float(draft.score),
            summary=draft.summary(),
            signals=[
                {
                    "signal": f.signal,
                    "group": f.group,
                    "p_adjusted": float(f"{f.p_adjusted:.4g}"),
                    "z": round(f.z, 2),
                    "window": f.window,
                    "reference": f.reference,
                }
                for f in draft.signals
            ],
            study_uids=list(draft.study_uids),
            scanners=list(draft.scanners),
            resolution="",
        )
        s.add(alert)
        return _alert(alert)

    def _resolve(self, s: Session, unit: Unit, at: dt.datetime, why: str) -> tuple[str, ...]:
        active = s.scalars(
            select(_Alert).where(
                _Alert.site == unit.site, _Alert.station == unit.station, _Alert.status == ACTIVE
            )
        )
        ids = []
        for alert in active:
            alert.status, alert.resolved_at, alert.resolution = RESOLVED, at, why
            ids.append(alert.id)
        return tuple(ids)

    def record_review(self, study_uid: str, rejected_fraction: float) -> bool:
        """Add a radiologist's verdicts to a recorded study (the share of its findings rejected, 0..1); it
        enters the windows of the studies recorded after it. False when the study was never recorded."""
        if not 0.0 <= rejected_fraction <= 1.0:
            raise ValueError(f"rejected_fraction must lie in 0..1, got {rejected_fraction}")
        with self._tx() as s:
            row = s.scalar(select(_Study).where(_Study.study_uid == study_uid))
            if row is None:
                return False
            row.numeric = {**row.numeric, "rejected_fraction": round(rejected_fraction, 4)}
            return True

    # --- references -----------------------------------------------------------------------------------------

    def set_reference(self, reference: Reference, *, at: dt.datetime | None = None) -> tuple[str, ...]:
        """Make ``reference`` the unit's: the window restarts with the next study, the rule's state is reset,
        and the unit's active alerts are resolved (a new reference answers them). Returns their ids."""
        at = at or utc_now()
        with self._tx() as s:
            row = self._unit_row(s, reference.unit)
            last = s.scalar(
                select(func.max(_Study.pk)).where(
                    _Study.site == reference.unit.site, _Study.station == reference.unit.station
                )
            )
            row.reference, row.reference_set_at = reference.to_json(), at
            row.reference_after_pk = int(last or 0)
            row.state, row.last_score, row.last_evaluation = MonitorState().to_json(), None, None
            return self._resolve(s, reference.unit, at, "a new reference was set for the unit")

    def reference(self, unit: Unit) -> Reference | None:
        with self._tx() as s:
            row = s.get(_Unit, (unit.site, unit.station))
            return Reference.from_json(row.reference) if row is not None and row.reference else None

    def studies(self, unit: Unit, *, limit: int = 1000) -> list[StudySignals]:
        """The unit's most recent studies (oldest first): e.g. the validation studies of a new reference."""
        with self._tx() as s:
            rows = _latest_studies(s, unit, limit)
            return [_signals(r) for r in rows][::-1]

    def recent_scores(self, unit: Unit, *, limit: int = 50) -> list[dict[str, Any]]:
        """The last studies of a unit with the score of the window each completed (newest first)."""
        with self._tx() as s:
            rows = _latest_studies(s, unit, limit)
            return [
                {
                    "study_uid": r.study_uid,
                    "recorded_at": format_instant(r.recorded_at),
                    "scanner": r.scanner,
                    "score": None if r.score is None else round(r.score, 3),
                    "positive": r.positive,
                }
                for r in rows
            ]

    # --- reading --------------------------------------------------------------------------------------------

    def units(self) -> list[UnitStatus]:
        with self._tx() as s:
            rows = list(s.scalars(select(_Unit).order_by(_Unit.site, _Unit.station)))
            active = dict(
                ((site, station), n)
                for site, station, n in s.execute(
                    select(_Alert.site, _Alert.station, func.count())
                    .where(_Alert.status == ACTIVE)
                    .group_by(_Alert.site, _Alert.station)
                )
            )
            counts = {
                (site, station): n
                for site, station, n in s.execute(
                    select(_Study.site, _Study.station, func.count())
                    .join(_Unit, (_Unit.site == _Study.site) & (_Unit.station == _Study.station))
                    .where(_Study.pk > _Unit.reference_after_pk)
                    .group_by(_Study.site, _Study.station)
                )
            }
            out = []
            for r in rows:
                rule = r.reference["rule"] if r.reference else None
                key = (r.site, r.station)
                out.append(
                    UnitStatus(
                        unit=Unit(r.site, r.station),
                        has_reference=r.reference is not None,
                        reference_set_at=r.reference_set_at,
                        studies_since_reference=counts.get(key, 0),
                        window=int(rule["window"]) if rule else None,
                        score=r.last_score,
                        score_threshold=rule.get("score_threshold") if rule else None,
                        state=MonitorState.from_json(r.state),
                        active_alerts=active.get(key, 0),
                        last_study_at=r.last_study_at,
                        last_scanner=r.last_scanner,
                        last_evaluation=r.last_evaluation,
                    )
                )
            return out

    def alerts(
        self, *, status: str | None = None, site: str | None = None, limit: int = 100
    ) -> list[AlertRecord]:
        """Alerts, newest first."""
        if status not in (None, ACTIVE, RESOLVED):
            raise ValueError(f"status must be {ACTIVE} or {RESOLVED}, got {status!r}")
        query = select(_Alert).order_by(_Alert.opened_at.desc(), _Alert.id).limit(limit)
        if status is not None:
            query = query.where(_Alert.status == status)
        if site is not None:
            query = query.where(_Alert.site == site)
        with self._tx() as s:
            return [_alert(a) for a in s.scalars(query)]

    def alert(self, alert_id: str) -> AlertRecord | None:
        with self._tx() as s:
            row = s.get(_Alert, alert_id)
            return _alert(row) if row is not None else None


def _signals(row: _Study) -> StudySignals:
    return StudySignals(row.study_uid, Unit(row.site, row.station), row.scanner, row.numeric, row.categorical)


def _alert(row: _Alert) -> AlertRecord:
    return AlertRecord(
        id=row.id,
        unit=Unit(row.site, row.station),
        status=row.status,
        opened_at=row.opened_at,
        resolved_at=row.resolved_at,
        opened_by_study=row.opened_by_study,
        score=row.score,
        summary=row.summary,
        signals=list(row.signals),
        study_uids=list(row.study_uids),
        scanners=list(row.scanners),
        resolution=row.resolution,
    )
