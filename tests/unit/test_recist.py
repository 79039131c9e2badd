"""RECIST 1.1 on hand-built cases (Eisenhauer 2009)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from core.recist import (
    CurrentStatus,
    NonTargetResponse,
    Response,
    TrackObservation,
    assess_response,
    select_targets,
)
from core.types import Organ, RecistRole


@dataclass(frozen=True)
class L:
    track_id: str
    organ: Organ
    long_axis_mm: float
    short_axis_mm: float


def seen(long_mm: float, short_mm: float | None = None) -> TrackObservation:
    return TrackObservation(
        CurrentStatus.MEASURED, long_mm, short_mm if short_mm is not None else long_mm * 0.7
    )


GONE = TrackObservation(CurrentStatus.ABSENT)
UNSEEN = TrackObservation(CurrentStatus.NOT_EVALUABLE)

BASE = [L("a", Organ.LIVER, 30.0, 20.0), L("b", Organ.LUNG, 20.0, 15.0)]  # sum 50 mm
ROLES = {"a": RecistRole.TARGET, "b": RecistRole.TARGET}


def test_target_selection_caps_and_node_thresholds():
    lesions = [
        L("l1", Organ.LIVER, 40, 30),
        L("l2", Organ.LIVER, 35, 30),
        L("l3", Organ.LIVER, 30, 20),
        L("n1", Organ.LYMPH_NODE, 30, 16),
        L("n2", Organ.LYMPH_NODE, 25, 12),
        L("n3", Organ.LYMPH_NODE, 14, 8),
        L("p1", Organ.LUNG, 9, 8),
        L("p2", Organ.LUNG, 12, 10),
        L("p3", Organ.LUNG, 11, 10),
        L("a1", Organ.ADRENAL, 15, 12),
    ]
    roles = select_targets(lesions)
    targets = {k for k, r in roles.items() if r is RecistRole.TARGET}
    # 2 liver max, node >= 15 mm short axis, 5 in all: largest first by the RECIST diameter
    assert targets == {"l1", "l2", "n1", "a1", "p2"}
    assert roles["l3"] is RecistRole.NON_TARGET  # third liver lesion
    assert roles["n2"] is RecistRole.NON_TARGET  # node 10-15 mm: pathological, non-measurable
    assert "n3" not in roles  # node < 10 mm short axis: normal
    assert roles["p1"] is RecistRole.NON_TARGET  # < 10 mm: non-measurable
    assert roles["p3"] is RecistRole.NON_TARGET  # sixth measurable lesion: over the cap of 5


def test_partial_response_at_exactly_minus_30_percent():
    r = assess_response(BASE, ROLES, {"a": seen(21.0), "b": seen(14.0)})  # 35 mm = -30%
    assert r.category is Response.PR
    assert r.change_from_baseline_pct == pytest.approx(-30.0)
    assert any("PR" in line and "-30.0%" in line for line in r.trace)


def test_minus_29_percent_is_stable_disease():
    r = assess_response(BASE, ROLES, {"a": seen(21.5), "b": seen(14.0)})  # 35.5 mm = -29%
    assert r.category is Response.SD


def test_progression_needs_20_percent_and_5_mm_over_nadir():
    small = [L("a", Organ.LIVER, 12.0, 8.0), L("b", Organ.LUNG, 10.0, 8.0)]  # 22 mm
    roles = {"a": RecistRole.TARGET, "b": RecistRole.TARGET}
    # nadir 20 mm at the first follow-up; now 24.5 mm = +22.5% but only +4.5 mm: not PD
    r = assess_response(small, roles, {"a": seen(14.0), "b": seen(10.5)}, previous_sums_mm=[20.0])
    assert r.category is Response.SD
    assert r.change_from_nadir_mm == pytest.approx(4.5)
    assert any("< 5 mm" in line for line in r.trace)
    # now 25 mm: +25% and +5 mm over the nadir: PD
    r = assess_response(small, roles, {"a": seen(14.5), "b": seen(10.5)}, previous_sums_mm=[20.0])
    assert r.category is Response.PD


def test_progression_is_measured_from_the_nadir_not_the_baseline():
    # baseline 50, nadir 30 at a previous follow-up, now 37 mm: -26% vs baseline, +23% / +7 mm vs nadir
    r = assess_response(BASE, ROLES, {"a": seen(22.0), "b": seen(15.0)}, previous_sums_mm=[40.0, 30.0])
    assert r.nadir_sum_mm == 30.0
    assert r.category is Response.PD


def test_a_new_lesion_is_progression_even_when_targets_shrink():
    r = assess_response(BASE, ROLES, {"a": seen(10.0), "b": seen(5.0)}, new_lesions=["x"])
    assert r.target_response is Response.PR
    assert r.category is Response.PD
    assert r.new_lesions == ("x",)


def test_complete_response_needs_non_nodal_targets_gone_and_nodes_under_10_mm():
    base = [L("a", Organ.LIVER, 30.0, 20.0), L("n", Organ.LYMPH_NODE, 25.0, 18.0)]
    roles = {"a": RecistRole.TARGET, "n": RecistRole.TARGET}
    r = assess_response(base, roles, {"a": GONE, "n": seen(12.0, 9.0)})
    assert r.category is Response.CR
    assert r.current_sum_mm == pytest.approx(9.0)  # the node's short axis still counts in the sum
    r = assess_response(base, roles, {"a": GONE, "n": seen(14.0, 10.0)})
    assert r.category is Response.PR  # node at 10 mm is not normal: -79% is PR, not CR


def test_target_cr_with_persisting_non_target_is_pr():
    base = [*BASE, L("c", Organ.LIVER, 8.0, 6.0)]
    roles = {**ROLES, "c": RecistRole.NON_TARGET}
    r = assess_response(base, roles, {"a": GONE, "b": GONE, "c": seen(8.0)})
    assert r.target_response is Response.CR
    assert r.non_target_response is NonTargetResponse.NON_CR_NON_PD
    assert r.category is Response.PR


def test_unassessable_target_is_not_evaluable_unless_the_rest_proves_progression():
    r = assess_response(BASE, ROLES, {"a": seen(25.0), "b": UNSEEN})
    assert r.category is Response.NE
    r = assess_response(BASE, ROLES, {"a": seen(65.0), "b": UNSEEN})  # 65 >= 1.2 * 50 and +15 mm
    assert r.category is Response.PD


def test_non_target_only_disease_uses_table_2():
    base = [L("c", Organ.LIVER, 8.0, 6.0)]
    roles = {"c": RecistRole.NON_TARGET}
    assert assess_response(base, roles, {"c": seen(8.0)}).category is Response.NON_CR_NON_PD
    assert assess_response(base, roles, {"c": GONE}).category is Response.CR
    assert (
        assess_response(base, roles, {"c": seen(8.0)}, non_target_unequivocal_progression=True).category
        is Response.PD
    )


def test_new_lesions_under_10_mm_are_equivocal():
    from core.recist import is_unequivocal_new

    assert is_unequivocal_new(Organ.LIVER, 10.0, 6.0)
    assert not is_unequivocal_new(Organ.LUNG, 9.9, 9.0)
    assert not is_unequivocal_new(Organ.LYMPH_NODE, 14.0, 9.5)  # a node under 10 mm short axis is normal
    assert is_unequivocal_new(Organ.LYMPH_NODE, 14.0, 10.0)


def test_band_like_new_findings_outside_the_nodes_are_equivocal():
    from core.recist import is_unequivocal_new

    assert not is_unequivocal_new(Organ.LUNG, 30.0, 5.0)  # a band: atelectasis, scar, a vessel
    assert not is_unequivocal_new(Organ.LIVER, 20.0, 9.9)
    assert is_unequivocal_new(Organ.LIVER, 20.0, 10.0)
    assert is_unequivocal_new(Organ.LYMPH_NODE, 30.0, 10.0)  # nodes are oval: judged by the short axis
    assert is_unequivocal_new(Organ.LUNG, 30.0, 5.0, min_axis_ratio=0.0)  # the size rule alone


def test_the_nadir_stays_the_smallest_sum_after_an_increase():
    # sums: baseline 50, then 40 (nadir), then 44 (an increase that is not PD); now 47.5 mm:
    # +18.75% over the nadir of 40 (not over 44): SD; at 48 mm it is +20% and +8 mm: PD
    r = assess_response(BASE, ROLES, {"a": seen(30.0), "b": seen(17.5)}, previous_sums_mm=[40.0, 44.0])
    assert r.nadir_sum_mm == 40.0 and r.category is Response.SD
    r = assess_response(BASE, ROLES, {"a": seen(30.0), "b": seen(18.0)}, previous_sums_mm=[40.0, 44.0])
    assert r.category is Response.PD
