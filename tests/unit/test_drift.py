"""The drift monitor's statistics (core.drift, core.drift_calibration, core.drift_signals), on hand-made signals."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pytest
from scipy import stats

from core.drift import (
    NOVEL,
    DecisionRule,
    MonitorState,
    Reference,
    SignalReference,
    Transition,
    advance,
    categorical_batch,
    describe_alert,
    evaluate_window,
    holm_adjust,
    ks_batch,
)
from core.drift_calibration import build_reference, false_alarms_per_1000
from core.drift_signals import (
    CATALOGUE,
    StudySignals,
    Unit,
    header_signals,
    image_signals,
    output_signals,
)
from core.errors import InputError
from core.types import AcquisitionInfo, DetectedLesion, LabelId, Measurement, Organ, Volume
from tests.unit.drift_data import UNIT, stream, study


@pytest.fixture(scope="module")
def reference() -> Reference:
    return build_reference(
        UNIT, stream(1, 120), rule=DecisionRule(window=12, persistence=3), null_studies=20_000
    )


def _run(reference: Reference, studies: list[StudySignals]) -> list[tuple[int, Transition]]:
    state, events = MonitorState(), []
    w = reference.rule.window
    for t in range(w, len(studies) + 1):
        ev = evaluate_window(reference, studies[t - w : t])
        state, tr = advance(state, ev.positive, reference.rule)
        if tr is not None:
            events.append((t - 1, tr))
    return events


# --- the tests themselves ------------------------------------------------------------------------------------


def test_ks_distance_equals_scipy_including_ties_and_missing_values():
    rng = np.random.default_rng(3)
    ref = np.sort(np.round(rng.normal(0, 1, 60), 1))  # rounded: ties within and across samples
    rows = np.round(rng.normal(0.3, 1.2, (50, 12)), 1)
    rows[::7, -3:] = np.nan
    d, p, n = ks_batch(ref, rows)
    for row, di, pi, ni in zip(rows, d, p, n, strict=True):
        values = row[~np.isnan(row)]
        assert ni == values.size
        assert di == pytest.approx(stats.ks_2samp(values, ref).statistic, abs=1e-12)
        assert 0.0 <= pi <= 1.0
    empty_d, empty_p, empty_n = ks_batch(ref, np.full((1, 5), np.nan))
    assert empty_n[0] == 0 and math.isnan(empty_d[0]) and math.isnan(empty_p[0])


def test_ks_p_value_is_small_only_for_a_real_shift():
    rng = np.random.default_rng(4)
    ref = np.sort(rng.normal(0, 1, 60))
    _, p_same, _ = ks_batch(ref, rng.normal(0, 1, (200, 12)))
    _, p_shift, _ = ks_batch(ref, rng.normal(3, 1, (1, 12)))
    assert np.mean(p_same < 0.05) < 0.08  # about its level when nothing changed (it is conservative)
    assert p_shift[0] < 1e-4


def test_novel_categorical_values_are_counted_against_good_turing():
    ref = SignalReference("manufacturer", counts={"GE MEDICAL SYSTEMS": 60})
    assert ref.novel_chance() == pytest.approx(0.5 / 61)
    codes = np.array([[0] * 10 + [NOVEL] * 2, [0] * 12])
    tv, p, n = categorical_batch(ref, codes)
    assert list(n) == [12, 12]
    assert tv[0] == pytest.approx(2 / 12) and tv[1] == 0.0
    assert p[0] == pytest.approx(stats.binom.sf(1, 12, 0.5 / 61)) and p[1] == 1.0


def test_holm_adjusts_step_down_and_keeps_the_order_given():
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_an_alert_needs_persistence_and_resolves_after_a_window_of_negatives():
    rule = DecisionRule(window=4, persistence=3)
    state, transitions = MonitorState(), []
    for positive in [True, True, False, True, True, True, True, False, False, False, False]:
        state, tr = advance(state, positive, rule)
        transitions.append(tr)
    assert transitions.index(Transition.RAISE) == 5  # the third positive in a row, not the second
    assert transitions.count(Transition.RAISE) == 1  # an open alert is not raised again
    assert transitions[-1] is Transition.RESOLVE and not state.alert_open


def test_a_stable_window_is_negative_and_a_shifted_one_names_its_signal(reference):
    stable = stream(2, 12)
    ev = evaluate_window(reference, stable)
    assert not ev.positive and ev.significant == ()
    noisy = stream(3, 12, noise_hu=8.0)
    ev = evaluate_window(reference, noisy)
    assert ev.positive and ev.significant == ("noise_hu",)
    assert ev.tests[0].name == "noise_hu" and ev.tests[0].z > 5


def test_a_new_manufacturer_is_called_by_the_header_test(reference):
    window = stream(2, 8) + stream(4, 4, start=500, manufacturer="UIH")
    ev = evaluate_window(reference, window)
    assert "manufacturer" in ev.significant
    manufacturer = next(t for t in ev.tests if t.name == "manufacturer")
    assert manufacturer.window_summary == "never in reference: UIH"


def test_small_shifts_in_many_signals_raise_the_combined_score(reference):
    rng = np.random.default_rng(9)
    shifted = [
        s.with_values(
            liver_hu_median=s.numeric["liver_hu_median"] + 3.0,
            liver_hu_sd=s.numeric["liver_hu_sd"] + 1.2,
            body_hu_median=s.numeric["body_hu_median"] + 3.5,
            noise_hu=s.numeric["noise_hu"] + 0.5,
        )
        for s in (study(rng, 900 + i) for i in range(12))
    ]
    assert evaluate_window(reference, shifted).score > evaluate_window(reference, stream(5, 12)).score + 3


def test_calibration_keeps_false_alerts_near_the_target_on_fresh_stable_data(reference):
    assert reference.calibration["estimated_false_alarms_per_1000"] <= 0.25
    assert reference.rule.alpha < 0.05 and math.isfinite(reference.rule.score_threshold)
    events = _run(reference, stream(6, 4000, start=10_000))
    assert [e for e in events if e[1] is Transition.RAISE] == []
    # the same stream under an uncalibrated rule (level 5%, alert on the first positive) cries wolf
    loose = Reference(
        reference.unit,
        DecisionRule(window=12, persistence=1, alpha=0.05, score_threshold=1.64),
        reference.signals,
        reference.n_studies,
    )
    assert sum(tr is Transition.RAISE for _, tr in _run(loose, stream(6, 4000, start=10_000))) > 20


def test_a_noise_change_is_detected_within_a_window_and_persistence(reference):
    studies = stream(7, 100) + stream(8, 40, start=2000, noise_hu=9.0)
    raised = [t for t, tr in _run(reference, studies) if tr is Transition.RAISE]
    assert raised and 100 <= raised[0] < 100 + reference.rule.window + reference.rule.persistence


def test_false_alarm_rate_counts_raised_alerts_not_positive_windows():
    rule = DecisionRule(window=4, persistence=2)
    positive = np.array([True, True, True, True] + [False] * 4 + [True, True] + [False] * 990)
    assert false_alarms_per_1000(positive, rule) == pytest.approx(2.0)


def test_a_reference_needs_enough_validation_studies_of_its_unit():
    others = stream(1, 100)
    with pytest.raises(InputError, match="at least 40 validation studies"):
        build_reference(Unit("south", "CT-S1"), others + stream(2, 10), null_studies=2000)


def test_a_reference_survives_json_and_keeps_its_rule(reference):
    again = Reference.from_json(reference.to_json())
    assert again.rule == reference.rule and again.unit == reference.unit
    assert again.signals["manufacturer"].counts == {"GE MEDICAL SYSTEMS": 60}
    window = stream(3, 12, noise_hu=8.0)
    assert evaluate_window(again, window) == evaluate_window(reference, window)
    unbounded = Reference(reference.unit, DecisionRule(), reference.signals, 60)
    assert Reference.from_json(unbounded.to_json()).rule.score_threshold == math.inf


def test_an_alert_names_unit_signals_scanners_and_the_windows_studies(reference):
    window = stream(2, 6) + stream(4, 6, start=700, manufacturer="UIH", noise_hu=9.0)
    ev = evaluate_window(reference, window)
    alert = describe_alert(reference, window, ev)
    assert alert.unit == UNIT
    assert {"manufacturer", "noise_hu"} <= {f.signal for f in alert.signals}
    noise = next(f for f in alert.signals if f.signal == "noise_hu")
    assert noise.group == "image" and noise.reference.startswith("median 4.8")
    assert noise.window.startswith("median 7")
    assert alert.study_uids == tuple(s.study_uid for s in window)
    assert alert.scanners == ("GE MEDICAL SYSTEMS Revolution CT", "UIH Revolution CT")
    assert "north/CT-N1" in alert.summary()


def test_study_signals_refuse_unknown_names_and_non_finite_values():
    with pytest.raises(ValueError, match="not a numeric drift signal"):
        StudySignals("1.2.3", UNIT, "x", numeric={"patient_age": 54.0})
    with pytest.raises(ValueError, match="not finite"):
        StudySignals("1.2.3", UNIT, "x", numeric={"noise_hu": float("nan")})
    with pytest.raises(ValueError, match="not a categorical drift signal"):
        StudySignals("1.2.3", UNIT, "x", categorical={"noise_hu": "a"})
    s = StudySignals("1.2.3", UNIT, "x", numeric={"noise_hu": 3.0}, categorical={"kvp": "120"})
    assert StudySignals.from_json(s.to_json()) == s
    assert set(CATALOGUE) >= {
        "manufacturer",
        "kernel",
        "kvp",
        "noise_hu",
        "lesion_count",
        "rejected_fraction",
    }


def test_image_signals_measure_hu_and_white_noise_in_the_liver():
    rng = np.random.default_rng(11)
    hu = np.full((20, 64, 64), -1000.0, dtype=np.float32)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    hu[:, 8:56, 8:56] = 40.0  # body
    hu[:, 10:30, 10:40] = 100.0  # liver
    labels[:, 10:30, 10:40] = LabelId.LIVER
    hu[:, 34:54, 12:50] = -850.0  # lung
    labels[:, 34:54, 12:50] = LabelId.LUNG
    hu += rng.normal(0.0, 20.0, hu.shape).astype(np.float32)
    sig = image_signals(Volume(hu, (2.5, 1.0, 1.0), (0.0, 0.0, 0.0)), labels)
    assert sig["liver_hu_median"] == pytest.approx(100.0, abs=1.0)
    assert sig["liver_hu_sd"] == pytest.approx(20.0, rel=0.05)
    assert sig["noise_hu"] == pytest.approx(20.0, rel=0.1)
    assert sig["lung_hu_median"] == pytest.approx(-850.0, abs=1.5)
    with pytest.raises(ValueError, match="do not fit"):
        image_signals(Volume(hu, (2.5, 1.0, 1.0), (0.0, 0.0, 0.0)), labels[:5])


def test_organ_boxes_found_on_the_sampled_map_give_the_signals_of_the_exact_boxes(monkeypatch):
    """The sampled boxes (every step-th row and column, widened by the step) erode to what the exact boxes do, on
    blocky organs of any size: same signals, with sampling steps of 2 to 7."""
    from scipy import ndimage

    import core.drift_signals as signals

    rng = np.random.default_rng(5)
    for _ in range(12):
        blocks = rng.integers(0, 3, (4, 12, 12))
        labels = ndimage.zoom(blocks, (3, 23, 23), order=0).astype(np.uint8)[:, : rng.integers(200, 276), :]
        labels[:, rng.integers(0, 200), :] = LabelId.LIVER  # a one-row sliver: gone after erosion
        hu = rng.normal(0.0, 15.0, labels.shape).astype(np.float32) + 100.0 * (labels == LabelId.LIVER)
        volume = Volume(hu, (2.0, 0.7, 0.7), (0.0, 0.0, 0.0))
        budget = int(rng.integers(1500, 20000))
        sampled = image_signals(volume, labels, max_voxels=budget)
        exact = ndimage.find_objects(labels)
        monkeypatch.setattr(signals, "_organ_boxes", lambda *_, boxes=exact: boxes)
        assert image_signals(volume, labels, max_voxels=budget) == sampled
        monkeypatch.undo()


def test_header_and_output_signals():
    acq = AcquisitionInfo(
        "1.2.3",
        "1.2.3.1",
        "1.2.3.2",
        "P1",
        dt.date(2024, 1, 1),
        "GE MEDICAL SYSTEMS",
        "Revolution CT",
        "STANDARD",
        120.0,
        2.5,
        "CT-N1",
    )
    numeric, categorical = header_signals(acq, (2.5, 0.8, 0.8))
    assert numeric == {"pixel_spacing_mm": 0.8, "slice_spacing_mm": 2.5, "slice_thickness_mm": 2.5}
    assert categorical == {
        "manufacturer": "GE MEDICAL SYSTEMS",
        "model_name": "Revolution CT",
        "kernel": "STANDARD",
        "kvp": "120",
    }

    def lesion(p: float, ml: float) -> DetectedLesion:
        return DetectedLesion(
            1, Organ.LIVER, (0.0, 0.0, 0.0), Measurement(12.0, 8.0, ml, 3, ((0, 0, 0), (0, 0, 1))), p, 10
        )

    out = output_signals([lesion(0.95, 2.0), lesion(0.6, 1.5)], 1)
    assert out == {
        "lesion_count": 2.0,
        "lesion_volume_ml": 3.5,
        "lesion_confidence_mean": 0.775,
        "low_confidence_fraction": 0.5,
        "verifier_replacements": 1.0,
    }
    assert output_signals([], None) == {"lesion_count": 0.0, "lesion_volume_ml": 0.0}


def test_in_box_erosion_equals_scipy_binary_erosion_of_the_whole_volume():
    from scipy import ndimage

    from core.drift_signals import _INPLANE, _eroded_in_box

    rng = np.random.default_rng(7)
    for _ in range(20):
        shape = (int(rng.integers(1, 6)), int(rng.integers(3, 40)), int(rng.integers(3, 40)))
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=float(rng.uniform(0.5, 3.0)))
        labels = np.digitize(noise, np.quantile(noise, [0.3, 0.6, 0.9])).astype(np.uint8)
        boxes = ndimage.find_objects(labels)
        for label in (1, 2, 3):
            box, eroded = _eroded_in_box(labels, label, boxes)
            whole = ndimage.binary_erosion(labels == label, structure=_INPLANE)
            assert eroded.dtype == np.bool_
            assert np.array_equal(whole[box], eroded)
            assert int(whole.sum()) == int(eroded.sum())
