"""Match the lesions of the current study to the tracks of prior studies.

Each prior track is represented by its most recent finding, placed in the current study's frame
by the alignment of the prior study it came from. The assignment minimizes, over all pairs within
the gate, distance (mm) plus a size-disagreement term plus a penalty when the organs differ (the
model may call a lung nodule that abuts the mediastinum a node; the prior's organ, a
radiologist's, is kept), by the Hungarian method (scipy ``linear_sum_assignment``). Current lesions left over are new; tracks left over
are resolved when their expected position lies inside the scanned range, not evaluable when it
lies outside.

Priors without a position (no prior image, no coordinates, or read from report text) are matched
in a second stage on what is left: same organ (and side, where both are known) and the closest
size within a factor of 2, by the same optimal assignment. Such a link is reported with
``method="site+size"``, a lower, stated confidence; a prior that finds no partner is not
evaluable, never called resolved.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from core.types import DetectedLesion, PriorFinding

__all__ = ["LesionEvent", "MatchResult", "TrackMatch", "find_splits_and_merges", "match_lesions"]

GATE_MM = 25.0
SIZE_WEIGHT_MM = 10.0  # cost of a factor e (2.7x) between diameters, in mm of distance
ORGAN_MISMATCH_MM = 15.0  # cost of matching across organs, in mm of distance
SITE_SIZE_MAX_RATIO = 2.0  # a site+size match needs diameters within this factor
_BIG = 1e6


@dataclass(frozen=True, slots=True)
class TrackMatch:
    lesion_id: int
    track_id: str
    distance_mm: float | None  # None for a site+size match
    method: str = "position"  # "position" (aligned centroids) or "site+size" (lower confidence)


@dataclass(frozen=True, slots=True)
class MatchResult:
    matches: tuple[TrackMatch, ...]
    new_lesion_ids: tuple[int, ...]
    unmatched_track_ids: tuple[str, ...]
    unlocated_track_ids: tuple[str, ...]  # priors with no position: could not be matched


def _size_cost(prior: PriorFinding, cur: DetectedLesion) -> float:
    p = max(prior.long_axis_mm, 1.0)
    c = max(cur.measurement.long_axis_mm, 1.0)
    return SIZE_WEIGHT_MM * abs(math.log(c / p))


def match_lesions(
    current: Sequence[DetectedLesion],
    priors_in_current_frame: Sequence[PriorFinding],
    gate_mm: float = GATE_MM,
) -> MatchResult:
    """``priors_in_current_frame``: one finding per track, centroids already aligned."""
    located = [p for p in priors_in_current_frame if p.centroid_lps_mm is not None]
    unlocated = [p for p in priors_in_current_frame if p.centroid_lps_mm is None]
    matches: list[TrackMatch] = []
    if current and located:
        cost = np.full((len(current), len(located)), _BIG)
        dist = np.zeros_like(cost)
        for i, c in enumerate(current):
            for j, p in enumerate(located):
                assert p.centroid_lps_mm is not None
                d = float(np.linalg.norm(np.subtract(c.centroid_lps_mm, p.centroid_lps_mm)))
                dist[i, j] = d
                if d <= gate_mm:
                    cost[i, j] = d + _size_cost(p, c) + (0.0 if c.organ == p.organ else ORGAN_MISMATCH_MM)
        rows, cols = linear_sum_assignment(cost)
        matches = [
            TrackMatch(current[i].lesion_id, located[j].track_id, round(float(dist[i, j]), 2))
            for i, j in zip(rows, cols, strict=True)
            if cost[i, j] < _BIG
        ]
    taken = {m.lesion_id for m in matches}
    rest = [c for c in current if c.lesion_id not in taken]
    if rest and unlocated:
        cost = np.full((len(rest), len(unlocated)), _BIG)
        for i, c in enumerate(rest):
            for j, p in enumerate(unlocated):
                sides_differ = c.laterality and p.laterality and c.laterality != p.laterality
                ratio = max(c.measurement.long_axis_mm, 1.0) / max(p.long_axis_mm, 1.0)
                if (
                    c.organ == p.organ
                    and not sides_differ
                    and 1 / SITE_SIZE_MAX_RATIO <= ratio <= SITE_SIZE_MAX_RATIO
                ):
                    cost[i, j] = abs(math.log(ratio))
        rows, cols = linear_sum_assignment(cost)
        matches += [
            TrackMatch(rest[i].lesion_id, unlocated[j].track_id, None, "site+size")
            for i, j in zip(rows, cols, strict=True)
            if cost[i, j] < _BIG
        ]
    matched_lesions = {m.lesion_id for m in matches}
    matched_tracks = {m.track_id for m in matches}
    return MatchResult(
        matches=tuple(matches),
        new_lesion_ids=tuple(c.lesion_id for c in current if c.lesion_id not in matched_lesions),
        unmatched_track_ids=tuple(p.track_id for p in located if p.track_id not in matched_tracks),
        unlocated_track_ids=tuple(p.track_id for p in unlocated if p.track_id not in matched_tracks),
    )


@dataclass(frozen=True, slots=True)
class LesionEvent:
    """A split or merge between time points, reported rather than hidden.

    ``split``: current lesions ``lesion_ids`` (besides the matched one) are fragments of track
    ``track_ids[0]``; RECIST 1.1 sums the fragments' diameters. ``merge``: tracks ``track_ids[1:]``
    have coalesced into the lesion matched to ``track_ids[0]``; RECIST 1.1 records the merged
    lesion on one track and 0 mm on the others.
    """

    kind: str
    track_ids: tuple[str, ...]
    lesion_ids: tuple[int, ...]


SPLIT_MARGIN_MM = 8.0
MERGE_MARGIN_MM = 5.0


def find_splits_and_merges(
    current: Sequence[DetectedLesion], priors_in_current_frame: Sequence[PriorFinding], result: MatchResult
) -> list[LesionEvent]:
    """Fragments among the unmatched lesions near a matched track's prior extent (splits), and
    unmatched prior tracks inside a matched lesion's extent (merges); same organ only."""
    by_lesion = {c.lesion_id: c for c in current}
    by_track = {p.track_id: p for p in priors_in_current_frame}
    events: list[LesionEvent] = []
    position_matches = [m for m in result.matches if m.method == "position"]
    used: set[int] = set()
    for m in position_matches:
        p = by_track[m.track_id]
        if p.centroid_lps_mm is None:
            continue
        reach = p.long_axis_mm / 2.0 + SPLIT_MARGIN_MM
        fragments = tuple(
            lid
            for lid in result.new_lesion_ids
            if lid not in used
            and by_lesion[lid].organ == p.organ
            and by_lesion[lid].measurement.long_axis_mm < p.long_axis_mm
            and float(np.linalg.norm(np.subtract(by_lesion[lid].centroid_lps_mm, p.centroid_lps_mm))) <= reach
        )
        if fragments:
            used.update(fragments)
            events.append(LesionEvent("split", (m.track_id,), (m.lesion_id, *fragments)))
    for m in position_matches:
        c = by_lesion[m.lesion_id]
        reach = c.measurement.long_axis_mm / 2.0 + MERGE_MARGIN_MM
        merged = tuple(
            tid
            for tid in result.unmatched_track_ids
            if by_track[tid].organ == c.organ
            and by_track[tid].centroid_lps_mm is not None
            and float(np.linalg.norm(np.subtract(by_track[tid].centroid_lps_mm, c.centroid_lps_mm))) <= reach  # type: ignore[arg-type]
        )
        if merged:
            events.append(LesionEvent("merge", (m.track_id, *merged), (m.lesion_id,)))
    return events
