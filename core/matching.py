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

__all__ = ["MatchResult", "TrackMatch", "match_lesions"]

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
