"""The course of disease over the prior time points, reassessed from the EHR's measurements.

RECIST needs the nadir (the smallest sum so far) and iRECIST needs the state of the previous
assessment, so every prior follow-up is assessed again, by the same rules, from the findings the
EHR holds. A target not reported at a follow-up counts as absent there (0 mm).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from core.irecist import IRecistState, irecist_step
from core.recist import (
    CurrentStatus,
    RecistResult,
    TrackObservation,
    assess_response,
    is_unequivocal_new,
    select_targets,
)
from core.types import PriorTimePoint, RecistRole

__all__ = ["TimePointAssessment", "assess_history", "baseline_roles"]


@dataclass(frozen=True, slots=True)
class TimePointAssessment:
    study_date: dt.date
    study_uid: str
    target_sum_mm: float | None
    recist: RecistResult | None  # None at baseline
    irecist: IRecistState | None
    diameters_mm: dict[str, float]  # RECIST diameter per track id seen at this time point


def baseline_roles(baseline: PriorTimePoint) -> dict[str, RecistRole]:
    """Roles recorded with the baseline findings, or selected by RECIST 1.1 when none were."""
    roles: dict[str, RecistRole] = {
        f.track_id: f.role for f in baseline.findings if f.role is not None and f.role is not RecistRole.NEW
    }
    return roles or select_targets(list(baseline.findings))


def assess_history(tps: Sequence[PriorTimePoint]) -> list[TimePointAssessment]:
    """One assessment per time point, oldest first; the first is the baseline."""
    if not tps:
        return []
    baseline = tps[0]
    roles = baseline_roles(baseline)
    labels = {f.track_id: f.label or f.track_id for tp in tps for f in tp.findings}
    base_ids = {f.track_id for f in baseline.findings}
    out = [
        TimePointAssessment(
            baseline.study_date,
            baseline.study_uid,
            float(
                sum(
                    f.recist_diameter_mm()
                    for f in baseline.findings
                    if roles.get(f.track_id) is RecistRole.TARGET
                )
            ),
            None,
            None,
            {f.track_id: f.recist_diameter_mm() for f in baseline.findings},
        )
    ]
    state: IRecistState | None = None
    for tp in tps[1:]:
        current = {
            f.track_id: TrackObservation(CurrentStatus.MEASURED, f.long_axis_mm, f.short_axis_mm)
            for f in tp.findings
        }
        for f in baseline.findings:
            current.setdefault(f.track_id, TrackObservation(CurrentStatus.ABSENT))
        new = [
            f.track_id
            for f in tp.findings
            if f.track_id not in base_ids and is_unequivocal_new(f.organ, f.long_axis_mm, f.short_axis_mm)
        ]
        result = assess_response(
            list(baseline.findings), roles, current, [a.target_sum_mm for a in out[1:]], new, labels=labels
        )
        diam = {f.track_id: f.recist_diameter_mm() for f in tp.findings}
        state = irecist_step(state, result, {t: diam[t] for t in new})
        out.append(
            TimePointAssessment(tp.study_date, tp.study_uid, result.current_sum_mm, result, state, diam)
        )
    return out
