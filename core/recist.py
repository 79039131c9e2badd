"""RECIST 1.1 response (Eisenhauer et al., Eur J Cancer 2009;45:228-247).

Rules implemented exactly as written there:

- Measurable at baseline: non-nodal long axis >= 10 mm (CT, slice thickness <= 5 mm); lymph node
  short axis >= 15 mm. Nodes 10 to < 15 mm short axis are non-target (pathological, non-measurable);
  nodes < 10 mm are normal and not followed.
- Targets: the largest measurable lesions, at most 5 in total and 2 per organ (all lymph nodes
  count as one organ, both lungs as one organ).
- Sum of diameters: long axis of non-nodal targets plus short axis of nodal targets.
- Target response: CR when every non-nodal target has disappeared and every nodal target is
  < 10 mm short axis; PR at >= 30% decrease of the sum from baseline; PD at >= 20% increase of the
  sum over the nadir (smallest sum so far, baseline included) together with an absolute increase
  of >= 5 mm; SD otherwise. A target that cannot be assessed makes the target response NE, unless
  the assessable ones already prove PD.
- Non-target response: CR when all have disappeared (nodes < 10 mm); PD only for unequivocal
  progression, a radiologist's call passed in explicitly; non-CR/non-PD otherwise.
- Overall response: Table 1 (target disease) or Table 2 (non-target disease only); any
  unequivocal new lesion is PD. RECIST leaves "unequivocal" to the reader and names small size as
  the usual reason for doubt; Interval's rule (``is_unequivocal_new``) is a new lesion of at least
  10 mm (long axis; short axis for nodes, below which a node is normal) that, outside the nodes, is not
  band-like (short axis at least half the long axis: a metastasis grows round; a band is more often
  atelectasis, a scar, a vessel or partial volume at an organ's edge). Other new findings are
  reported as equivocal and followed; if a later study confirms them, they count then.

Every result carries its rule trace: plain sentences with the numbers that decided it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from core.types import Organ, RecistRole

__all__ = [
    "CurrentStatus",
    "MeasuredLesion",
    "NonTargetResponse",
    "RecistResult",
    "Response",
    "TrackObservation",
    "assess_response",
    "is_measurable",
    "is_unequivocal_new",
    "select_targets",
    "sum_of_diameters",
]

MEASURABLE_NON_NODAL_MM = 10.0
MEASURABLE_NODE_SHORT_AXIS_MM = 15.0
PATHOLOGICAL_NODE_SHORT_AXIS_MM = 10.0
PR_DECREASE = 0.30
PD_INCREASE = 0.20
PD_ABSOLUTE_MM = 5.0
NEW_LESION_MIN_MM = 10.0
NEW_LESION_MIN_AXIS_RATIO = 0.5  # a new non-nodal finding narrower than this (short / long axis) is band-like


class Response(enum.StrEnum):
    CR = "CR"
    PR = "PR"
    SD = "SD"
    PD = "PD"
    NE = "NE"
    NON_CR_NON_PD = "Non-CR/Non-PD"

    @property
    def label(self) -> str:
        return {
            "CR": "complete response",
            "PR": "partial response",
            "SD": "stable disease",
            "PD": "progressive disease",
            "NE": "not evaluable",
            "Non-CR/Non-PD": "non-CR/non-PD",
        }[self.value]


class NonTargetResponse(enum.StrEnum):
    CR = "CR"
    NON_CR_NON_PD = "Non-CR/Non-PD"
    PD = "PD"
    NE = "NE"
    NONE = "none"


class MeasuredLesion(Protocol):
    @property
    def track_id(self) -> str: ...
    @property
    def organ(self) -> Organ: ...
    @property
    def long_axis_mm(self) -> float: ...
    @property
    def short_axis_mm(self) -> float: ...


class CurrentStatus(enum.StrEnum):
    MEASURED = "measured"
    ABSENT = "absent"  # looked for in the scanned range and not found
    NOT_EVALUABLE = "not_evaluable"  # outside the scanned range or unreadable


@dataclass(frozen=True, slots=True)
class TrackObservation:
    """What the current study shows of one followed track."""

    status: CurrentStatus
    long_axis_mm: float = 0.0
    short_axis_mm: float = 0.0

    def diameter_mm(self, organ: Organ) -> float | None:
        if self.status is CurrentStatus.NOT_EVALUABLE:
            return None
        if self.status is CurrentStatus.ABSENT:
            return 0.0
        return self.short_axis_mm if organ.is_nodal else self.long_axis_mm


@dataclass(frozen=True, slots=True)
class RecistResult:
    category: Response
    target_response: Response | None
    non_target_response: NonTargetResponse
    baseline_sum_mm: float
    nadir_sum_mm: float
    current_sum_mm: float | None
    change_from_baseline_pct: float | None
    change_from_nadir_pct: float | None
    change_from_nadir_mm: float | None
    new_lesions: tuple[str, ...]
    trace: tuple[str, ...]


def _diameter(lesion: MeasuredLesion) -> float:
    return lesion.short_axis_mm if lesion.organ.is_nodal else lesion.long_axis_mm


def is_unequivocal_new(
    organ: Organ,
    long_axis_mm: float,
    short_axis_mm: float,
    min_mm: float = NEW_LESION_MIN_MM,
    min_axis_ratio: float = NEW_LESION_MIN_AXIS_RATIO,
) -> bool:
    """Whether a new lesion is large enough, and outside the nodes round enough, to call progression (see the
    module docstring). Nodes are oval and judged by their short axis alone."""
    if organ.is_nodal:
        return short_axis_mm >= min_mm
    return long_axis_mm >= min_mm and short_axis_mm >= min_axis_ratio * long_axis_mm


def is_measurable(lesion: MeasuredLesion) -> bool:
    if lesion.organ.is_nodal:
        return lesion.short_axis_mm >= MEASURABLE_NODE_SHORT_AXIS_MM
    return lesion.long_axis_mm >= MEASURABLE_NON_NODAL_MM


def select_targets(
    lesions: Sequence[MeasuredLesion], max_targets: int = 5, max_per_organ: int = 2
) -> dict[str, RecistRole]:
    """Baseline roles: targets (largest measurable, per-organ cap) and non-targets.

    Normal nodes (short axis < 10 mm) get no role: they are not lesions. Ties are broken by
    track id so the selection is deterministic.
    """
    roles: dict[str, RecistRole] = {}
    per_organ: dict[Organ, int] = {}
    ranked = sorted(lesions, key=lambda les: (-_diameter(les), les.track_id))
    for les in ranked:
        if les.organ.is_nodal and les.short_axis_mm < PATHOLOGICAL_NODE_SHORT_AXIS_MM:
            continue
        n_targets = sum(1 for r in roles.values() if r is RecistRole.TARGET)
        if is_measurable(les) and n_targets < max_targets and per_organ.get(les.organ, 0) < max_per_organ:
            roles[les.track_id] = RecistRole.TARGET
            per_organ[les.organ] = per_organ.get(les.organ, 0) + 1
        else:
            roles[les.track_id] = RecistRole.NON_TARGET
    return roles


def sum_of_diameters(lesions: Sequence[MeasuredLesion], roles: Mapping[str, RecistRole]) -> float:
    return float(sum(_diameter(les) for les in lesions if roles.get(les.track_id) is RecistRole.TARGET))


def _fmt_pct(x: float) -> str:
    return f"{x:+.1f}%"


def _target_response(
    targets: Sequence[MeasuredLesion],
    current: Mapping[str, TrackObservation],
    baseline_sum: float,
    nadir_sum: float,
    trace: list[str],
    name: Callable[[str], str],
) -> tuple[Response, float | None, float | None, float | None, float | None]:
    missing = [t.track_id for t in targets if current.get(t.track_id) is None]
    values: dict[str, float | None] = {}
    for t in targets:
        obs = current.get(t.track_id)
        values[t.track_id] = None if obs is None else obs.diameter_mm(t.organ)
    not_evaluable = sorted(k for k, v in values.items() if v is None)
    evaluable_sum = float(sum(v for v in values.values() if v is not None))
    if missing:
        trace.append(f"No current assessment for target(s) {', '.join(map(name, missing))}.")

    def pd_test(total: float) -> tuple[bool, float, float]:
        delta = total - nadir_sum
        pct = (delta / nadir_sum * 100.0) if nadir_sum > 0 else (float("inf") if delta > 0 else 0.0)
        return (delta >= PD_ABSOLUTE_MM and delta >= PD_INCREASE * nadir_sum - 1e-9), pct, delta

    if not_evaluable:
        is_pd, pct, delta = pd_test(evaluable_sum)
        if is_pd:
            trace.append(
                f"Targets {', '.join(map(name, not_evaluable))} could not be assessed, but the assessable targets "
                f"alone sum to {evaluable_sum:.1f} mm, {_fmt_pct(pct)} and {delta:+.1f} mm over the nadir "
                f"of {nadir_sum:.1f} mm: PD (>= 20% and >= 5 mm)."
            )
            return Response.PD, evaluable_sum, None, pct, delta
        trace.append(
            f"Targets {', '.join(map(name, not_evaluable))} could not be assessed and the rest do not prove "
            f"progression: target response NE."
        )
        return Response.NE, None, None, None, None

    total = evaluable_sum
    base_pct = (total - baseline_sum) / baseline_sum * 100.0 if baseline_sum > 0 else 0.0
    is_pd, nadir_pct, delta = pd_test(total)
    trace.append(
        f"Sum of target diameters {total:.1f} mm: {_fmt_pct(base_pct)} from baseline "
        f"({baseline_sum:.1f} mm), {_fmt_pct(nadir_pct)} / {delta:+.1f} mm from the nadir ({nadir_sum:.1f} mm)."
    )
    if is_pd:
        trace.append(
            f"Target PD: the sum rose {_fmt_pct(nadir_pct)} (>= 20%) and {delta:+.1f} mm (>= 5 mm) over the nadir."
        )
        return Response.PD, total, base_pct, nadir_pct, delta
    if 0 < delta < PD_ABSOLUTE_MM and delta >= PD_INCREASE * nadir_sum:
        trace.append(
            f"The sum rose {_fmt_pct(nadir_pct)} over the nadir but only {delta:+.1f} mm (< 5 mm): not PD."
        )
    non_nodal_gone = all(values[t.track_id] == 0.0 for t in targets if not t.organ.is_nodal)
    nodes_normal = all(
        (values[t.track_id] or 0.0) < PATHOLOGICAL_NODE_SHORT_AXIS_MM for t in targets if t.organ.is_nodal
    )
    if non_nodal_gone and nodes_normal:
        trace.append(
            "Target CR: every non-nodal target has disappeared and every target node is < 10 mm short axis."
        )
        return Response.CR, total, base_pct, nadir_pct, delta
    if total <= (1.0 - PR_DECREASE) * baseline_sum + 1e-9:
        trace.append(f"Target PR: the sum fell {_fmt_pct(base_pct)} from baseline (<= -30%).")
        return Response.PR, total, base_pct, nadir_pct, delta
    trace.append(
        f"Target SD: {_fmt_pct(base_pct)} from baseline is short of -30% and {_fmt_pct(nadir_pct)} "
        f"from the nadir is short of PD."
    )
    return Response.SD, total, base_pct, nadir_pct, delta


def _non_target_response(
    non_targets: Sequence[MeasuredLesion],
    current: Mapping[str, TrackObservation],
    unequivocal_progression: bool,
    trace: list[str],
    name: Callable[[str], str],
) -> NonTargetResponse:
    if not non_targets:
        return NonTargetResponse.NONE
    if unequivocal_progression:
        trace.append("Non-target PD: unequivocal progression of non-target disease was recorded.")
        return NonTargetResponse.PD
    remaining: list[str] = []
    for les in non_targets:
        obs = current.get(les.track_id)
        if obs is None or obs.status is CurrentStatus.NOT_EVALUABLE:
            trace.append(f"Non-target {name(les.track_id)} could not be assessed: non-target response NE.")
            return NonTargetResponse.NE
        if obs.status is CurrentStatus.ABSENT:
            continue
        if les.organ.is_nodal and obs.short_axis_mm < PATHOLOGICAL_NODE_SHORT_AXIS_MM:
            continue
        remaining.append(les.track_id)
    if not remaining:
        trace.append("Non-target CR: every non-target lesion has disappeared (nodes < 10 mm short axis).")
        return NonTargetResponse.CR
    trace.append(f"Non-target non-CR/non-PD: {len(remaining)} non-target lesion(s) persist.")
    return NonTargetResponse.NON_CR_NON_PD


def assess_response(
    baseline: Sequence[MeasuredLesion],
    roles: Mapping[str, RecistRole],
    current: Mapping[str, TrackObservation],
    previous_sums_mm: Sequence[float | None] = (),
    new_lesions: Sequence[str] = (),
    non_target_unequivocal_progression: bool = False,
    labels: Mapping[str, str] | None = None,
) -> RecistResult:
    """Overall RECIST 1.1 response of the current time point.

    ``baseline`` holds the baseline lesions, ``roles`` their roles (``select_targets``),
    ``current`` what the current study shows per track id, ``previous_sums_mm`` the target sums
    of earlier follow-ups (None where NE), ``new_lesions`` the ids of unequivocal new lesions;
    ``labels`` gives the names the trace uses for track ids (``L3`` rather than a UID).
    """
    trace: list[str] = []
    names = dict(labels or {})

    def name(track_id: str) -> str:
        return names.get(track_id, track_id)

    targets = [les for les in baseline if roles.get(les.track_id) is RecistRole.TARGET]
    non_targets = [les for les in baseline if roles.get(les.track_id) is RecistRole.NON_TARGET]
    baseline_sum = sum_of_diameters(baseline, roles)
    earlier = [s for s in previous_sums_mm if s is not None]
    nadir = min([baseline_sum, *earlier])
    if targets:
        trace.append(
            f"Baseline: {len(targets)} target lesion(s), sum {baseline_sum:.1f} mm; nadir {nadir:.1f} mm."
        )
        t_resp, cur_sum, base_pct, nadir_pct, nadir_mm = _target_response(
            targets, current, baseline_sum, nadir, trace, name
        )
    else:
        trace.append("No measurable target lesion at baseline: response from non-target disease (Table 2).")
        t_resp, cur_sum, base_pct, nadir_pct, nadir_mm = None, None, None, None, None
    nt_resp = _non_target_response(non_targets, current, non_target_unequivocal_progression, trace, name)

    if new_lesions:
        trace.append(
            f"New lesion(s) {', '.join(map(name, new_lesions))}: PD by RECIST 1.1 regardless of the sum."
        )
        category = Response.PD
    elif t_resp is Response.PD or nt_resp is NonTargetResponse.PD:
        category = Response.PD
    elif t_resp is None:
        category = {
            NonTargetResponse.CR: Response.CR,
            NonTargetResponse.NON_CR_NON_PD: Response.NON_CR_NON_PD,
            NonTargetResponse.NE: Response.NE,
            NonTargetResponse.NONE: Response.NE,
        }[nt_resp]
    elif t_resp is Response.CR:
        category = Response.CR if nt_resp in (NonTargetResponse.CR, NonTargetResponse.NONE) else Response.PR
    elif t_resp is Response.PR:
        category = Response.PR
    elif t_resp is Response.SD:
        category = Response.SD
    else:
        category = Response.NE
    trace.append(
        f"Overall response: {category.value} ({category.label}); target {t_resp.value if t_resp else 'none'}, "
        f"non-target {nt_resp.value}, new lesions {'yes' if new_lesions else 'no'}."
    )
    return RecistResult(
        category=category,
        target_response=t_resp,
        non_target_response=nt_resp,
        baseline_sum_mm=baseline_sum,
        nadir_sum_mm=nadir,
        current_sum_mm=cur_sum,
        change_from_baseline_pct=base_pct,
        change_from_nadir_pct=nadir_pct,
        change_from_nadir_mm=nadir_mm,
        new_lesions=tuple(new_lesions),
        trace=tuple(trace),
    )
