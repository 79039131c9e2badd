from __future__ import annotations

from core.matching import match_lesions
from core.types import DetectedLesion, Measurement, Organ, PriorFinding


def det(i: int, organ: Organ, xyz: tuple[float, float, float], long_mm: float) -> DetectedLesion:
    m = Measurement(long_mm, long_mm * 0.7, 1.0, 0, ((0, 0, 0), (0, 0, 1)))
    return DetectedLesion(i, organ, xyz, m, 0.9, 100)


def prior(t: str, organ: Organ, xyz, long_mm: float) -> PriorFinding:
    return PriorFinding(t, organ, long_mm, long_mm * 0.7, xyz)


def test_optimal_assignment_prefers_global_fit_over_greedy():
    # greedy nearest-first would give c1->A, leaving c2 outside the gate of B
    cur = [det(1, Organ.LIVER, (0, 0, 0), 20), det(2, Organ.LIVER, (22, 0, 0), 20)]
    pri = [prior("A", Organ.LIVER, (8, 0, 0), 20), prior("B", Organ.LIVER, (-12, 0, 0), 20)]
    r = match_lesions(cur, pri, gate_mm=25)
    assert {(m.lesion_id, m.track_id) for m in r.matches} == {(1, "B"), (2, "A")}
    assert r.new_lesion_ids == () and r.unmatched_track_ids == ()


def test_gate_separates_new_from_resolved():
    cur = [det(1, Organ.LIVER, (0, 0, 0), 10), det(2, Organ.LIVER, (100, 0, 0), 15)]
    pri = [prior("A", Organ.LIVER, (2, 0, 0), 10), prior("B", Organ.LIVER, (160, 0, 0), 15)]
    r = match_lesions(cur, pri)
    assert [(m.lesion_id, m.track_id) for m in r.matches] == [(1, "A")]
    assert r.new_lesion_ids == (2,)
    assert r.unmatched_track_ids == ("B",)


def test_same_organ_is_preferred_but_a_mislabelled_organ_still_matches():
    cur = [det(1, Organ.LIVER, (0, 0, 0), 12)]
    pri = [prior("lung", Organ.LUNG, (3, 0, 0), 12), prior("liver", Organ.LIVER, (12, 0, 0), 12)]
    r = match_lesions(cur, pri)
    assert [m.track_id for m in r.matches] == ["liver"]
    # alone, a nodule the model called a node is still its own track, not new + resolved
    r = match_lesions([det(1, Organ.LYMPH_NODE, (0, 0, 0), 12)], [prior("lung", Organ.LUNG, (3, 0, 0), 12)])
    assert [m.track_id for m in r.matches] == ["lung"]


def test_priors_without_position_match_by_site_and_size_with_stated_method():
    cur = [
        det(1, Organ.LIVER, (0, 0, 0), 20),
        det(2, Organ.LIVER, (50, 0, 0), 9),
        det(3, Organ.LUNG, (0, 90, 0), 30),
    ]
    pri = [PriorFinding("A", Organ.LIVER, 18, 14, None), PriorFinding("B", Organ.LUNG, 12, 10, None)]
    r = match_lesions(cur, pri)
    assert [(m.lesion_id, m.track_id, m.method, m.distance_mm) for m in r.matches] == [
        (1, "A", "site+size", None)
    ]
    # B: the only lung lesion is 2.5x its size: no partner, not evaluable rather than guessed
    assert r.unlocated_track_ids == ("B",)
    assert set(r.new_lesion_ids) == {2, 3}


def test_position_matches_come_first_and_site_matching_uses_what_is_left():
    cur = [det(1, Organ.LIVER, (0, 0, 0), 20), det(2, Organ.LIVER, (60, 0, 0), 20)]
    pri = [prior("A", Organ.LIVER, (2, 0, 0), 20), PriorFinding("B", Organ.LIVER, 21, 15, None)]
    r = match_lesions(cur, pri)
    assert {(m.lesion_id, m.track_id, m.method) for m in r.matches} == {
        (1, "A", "position"),
        (2, "B", "site+size"),
    }


def test_a_fragmented_lesion_is_reported_as_a_split_not_a_new_lesion():
    from core.matching import find_splits_and_merges

    cur = [
        det(1, Organ.LIVER, (0, 0, 0), 14),
        det(2, Organ.LIVER, (14, 0, 0), 9),
        det(3, Organ.LIVER, (90, 0, 0), 12),
    ]
    pri = [prior("A", Organ.LIVER, (4, 0, 0), 30)]
    r = match_lesions(cur, pri)
    events = find_splits_and_merges(cur, pri, r)
    assert [(e.kind, e.track_ids, e.lesion_ids) for e in events] == [
        ("split", ("A",), (1, 2))
    ]  # 3 is far: new


def test_two_tracks_coalescing_into_one_lesion_are_reported_as_a_merge():
    from core.matching import find_splits_and_merges

    cur = [det(1, Organ.LUNG, (0, 0, 0), 30)]
    pri = [prior("A", Organ.LUNG, (-6, 0, 0), 14), prior("B", Organ.LUNG, (8, 0, 0), 12)]
    r = match_lesions(cur, pri)
    events = find_splits_and_merges(cur, pri, r)
    assert len(events) == 1 and events[0].kind == "merge"
    assert set(events[0].track_ids) == {"A", "B"} and events[0].lesion_ids == (1,)
