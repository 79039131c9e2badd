"""Site recalibration and validation bookkeeping: lookup by scanner identity, intensity harmonisation, the
lesion decision bias, and the per-vendor table against the imaging targets."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import numpy as np
import pytest

from core.errors import ModelError
from core.lesions import LesionFilter
from core.types import AcquisitionInfo, LabelId, Volume
from models.segmentation.calibration import (
    CalibrationRegistry,
    SiteCalibration,
    apply_intensity,
    choose,
    intensity_stats,
)
from models.segmentation.inference import to_segmentation
from models.segmentation.validation import LesionRecord, StudyRecord, score_study, summarize


def _acq(manufacturer="UIH", model="uCT 760", station="UICT01") -> AcquisitionInfo:
    return AcquisitionInfo(
        "1.2.3",
        "1.2.4",
        "1.2.5",
        "P",
        dt.date(2026, 1, 1),
        manufacturer=manufacturer,
        model_name=model,
        station_name=station,
    )


def test_calibration_is_chosen_by_station_then_by_scanner_model_and_only_for_its_model_version(tmp_path):
    anywhere = SiteCalibration("UIH", "uCT 760", None, hu_offset=-6.0, model_version="m1")
    station = SiteCalibration("UIH", "uCT 760", "UICT02", hu_offset=-2.0, model_version="m1")
    other = SiteCalibration("GE MEDICAL SYSTEMS", "Revolution CT", None, hu_offset=1.0)
    for i, cal in enumerate((anywhere, station, other)):
        (tmp_path / f"{i}.json").write_text(json.dumps(cal.to_json()))
    reg = CalibrationRegistry.load(tmp_path)
    assert reg.lookup(_acq(station="UICT02"), "m1") == station
    assert reg.lookup(_acq(station="UICT01"), "m1") == anywhere
    assert reg.lookup(_acq(station="UICT01"), "m2") is None  # fitted for another model
    assert reg.lookup(_acq("SIEMENS", "SOMATOM Force"), "m1") is None
    assert reg.lookup(_acq("GE MEDICAL SYSTEMS", "Revolution CT"), "any") == other  # no version: any model
    assert reg.lookup(None, "m1") is None
    assert CalibrationRegistry.load(tmp_path / "absent").calibrations == []
    (tmp_path / "bad.json").write_text(json.dumps({"manufacturer": "X"}))
    with pytest.raises(ModelError, match=r"bad\.json"):
        CalibrationRegistry.load(tmp_path)


def _noisy_liver(noise: float, offset: float, seed: int = 0) -> tuple[Volume, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.zeros((6, 64, 64), np.uint8)
    labels[:, 8:56, 8:56] = LabelId.LIVER
    hu = np.where(labels == LabelId.LIVER, 100.0 + offset, -1000.0) + rng.normal(0, noise, labels.shape)
    return Volume(hu.astype(np.float32), (3.0, 1.0, 1.0), (0.0, 0.0, 0.0)), labels


def test_intensity_harmonisation_removes_the_offset_and_brings_the_noise_down():
    vol, labels = _noisy_liver(noise=24.0, offset=6.0)
    median, noise = intensity_stats(vol, labels)
    assert median == pytest.approx(106.0, abs=1.0)
    cal = SiteCalibration("UIH", "uCT 760", None, hu_offset=-6.0, smooth_sigma_mm=1.0)
    median2, noise2 = intensity_stats(apply_intensity(vol, cal), labels)
    assert median2 == pytest.approx(100.0, abs=1.0)
    assert noise2 < noise / 2
    assert (
        vol.voxels_hu.mean() != apply_intensity(vol, cal).voxels_hu.mean()
    )  # a copy; the input is untouched
    with pytest.raises(ModelError, match="too little liver"):
        intensity_stats(vol, np.zeros_like(labels))


def test_lesion_logit_bias_moves_the_decision_monotonically():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, (4, 4, 16, 16)).astype(np.float32)
    prob = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    counts = [
        int((to_segmentation(prob, (4, 16, 16), b).labels == LabelId.LESION).sum()) for b in (-2, -1, 0, 1, 2)
    ]
    assert counts == sorted(counts) and counts[0] < counts[-1]
    plain = to_segmentation(prob, (4, 16, 16))
    assert (plain.labels == np.argmax(prob, axis=0)).all()
    shifted = to_segmentation(prob, (4, 16, 16), 1.0).lesion_probability
    expected = prob[3] * np.e / (prob[3] * np.e + 1 - prob[3])
    assert np.allclose(shifted, expected, atol=1e-5)


def test_score_study_counts_found_missed_and_false_positive_lesions():
    vol = Volume(np.zeros((10, 40, 40), np.float32), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    instances = np.zeros(vol.shape, np.int16)
    instances[4:7, 5:17, 5:17] = 1  # found
    instances[4:7, 25:35, 25:35] = 2  # missed
    labels = np.full(vol.shape, LabelId.LIVER, np.uint8)
    labels[4:7, 6:17, 5:17] = LabelId.LESION  # measured 1 mm short along j
    labels[4:7, 25:35, 5:15] = LabelId.LESION  # nowhere in the truth
    prob = (labels == LabelId.LESION).astype(np.float32)
    truth = {
        "lesions": [
            {"instance": 1, "organ": "liver", "long_axis_mm": 15.6, "short_axis_mm": 11.0, "present": True},
            {"instance": 2, "organ": "liver", "long_axis_mm": 13.0, "short_axis_mm": 9.0, "present": True},
            {"instance": 3, "organ": "lung", "long_axis_mm": 8.0, "short_axis_mm": 6.0, "present": False},
        ]
    }
    from core.types import Segmentation

    fp, overlap, total, records = score_study(
        vol, Segmentation(labels, prob), truth, instances, LesionFilter()
    )
    assert fp == 1
    assert [r.found for r in records] == [True, False]
    assert records[0].measured_mm is not None and records[1].measured_mm is None
    assert 0 < overlap < total


def test_summary_flags_each_vendor_against_the_targets():
    def study(vendor, fps, lesions):
        return StudyRecord(
            "P", "t0", vendor, "x", fps, 1.0, 2.0, [LesionRecord("liver", d, f, m) for d, f, m in lesions]
        )

    records = [
        study("ge", 0, [(15.0, True, 15.5), (25.0, True, 24.0), (8.0, False, None)]),
        study("ge", 1, [(12.0, True, 12.5)]),
        study("uih", 2, [(15.0, False, None), (22.0, True, 25.0)]),
    ]
    s = summarize(records)
    ge, uih = s["per_vendor"]["ge"], s["per_vendor"]["uih"]
    assert ge["sensitivity_ge10mm"] == 1.0 and ge["found_ge10mm"] == "3/3"
    assert ge["sensitivity_all"] == 0.75 and ge["false_positives_per_study"] == 0.5
    assert ge["median_abs_diameter_error_mm"] == 0.5
    assert all(ge["meets_targets"].values())
    assert uih["sensitivity_ge10mm"] == 0.5 and uih["false_positives_per_study"] == 2.0
    assert not uih["meets_targets"]["sensitivity_ge10mm"]
    assert not uih["meets_targets"]["false_positives_per_study"]
    assert not uih["meets_targets"]["median_abs_diameter_error_mm"]
    assert s["groups"]["size:<10mm"]["total"] == 1


def test_model_card_is_written_from_the_measured_figures_and_names_missed_targets():
    from pathlib import Path

    from models.segmentation.model_card import render_model_card

    weights = Path(__file__).resolve().parents[2] / "models" / "weights"
    config = json.loads((weights / "train_config.json").read_text())
    records = [
        StudyRecord("P", "t0", "ge", "x", 0, 1.0, 2.0, [LesionRecord("liver", 15.0, True, 15.4)]),
        StudyRecord("P", "t0", "uih", "x", 3, 1.0, 2.0, [LesionRecord("lung", 12.0, False, None)]),
    ]
    validation = {**summarize(records), "model_version": "interval-seg-unet-abc", "cohort": "data/test"}
    card = render_model_card(config, validation, unseen={"after calibration": validation})
    assert "`interval-seg-unet-abc`" in card
    assert "| ge | 1 | 100.0% (1/1) |" in card
    assert "| uih | 1 | 0.0% (0/1) |" in card
    assert (
        "uih (sensitivity_ge10mm, false_positives_per_study, median_abs_diameter_error_mm)" in card
    )  # named under known limits
    assert "after calibration" in card and "Intended use" in card and "Human oversight" in card
    # a record from before the setting says nothing of it
    assert "clear-contrast lesion edges" not in card and "edge refinement off" not in card
    refined = render_model_card(config, {**validation, "edge_refinement": True})
    assert "clear-contrast lesion edges placed by the image" in refined
    assert "edge refinement off" in render_model_card(config, {**validation, "edge_refinement": False})
    # the longitudinal figures name the second looks they ran with (a record from before names none)
    link = {"correct": 9, "total": 10, "rate": 0.9}
    agree = {"agree": 3, "total": 3, "rate": 1.0}
    summary = {"track_links": link, "new_lesion_recall": {"found": 1, "total": 1}, "recist_agreement": agree}
    tracking = {"summary": {"all": summary}}
    assert "Track links 9/10" in render_model_card(config, validation, tracking=tracking)
    assert "Second looks" not in render_model_card(config, validation, tracking=tracking)
    looks = {"guided": True, "contrast": True, "faint": False}
    card = render_model_card(config, validation, tracking={**tracking, "second_look_settings": looks})
    assert (
        "Second looks where a prior lesion was missed: the model at a lower threshold, image contrast."
        in card
    )


def test_audit_flags_the_subgroup_served_worse_and_not_the_others():
    from models.segmentation.audit import audit

    rng = np.random.default_rng(3)
    records = []
    for i in range(40):
        size = ("small", "medium", "large")[i % 3]
        sex = "F" if i % 2 else "M"
        p_find = 0.55 if size == "large" else 0.97
        lesions = [LesionRecord("liver", 15.0, bool(rng.random() < p_find), 15.2) for _ in range(6)]
        subgroups = {"sex": sex, "body_size": size, "age_band": "50-69", "vendor": "ge"}
        records.append(StudyRecord(f"P{i}", "t0", "ge", "x", 0, 1.0, 2.0, lesions, subgroups))
    result = audit(records, n_boot=300)
    assert {(f["attribute"], f["value"]) for f in result["flagged"]} == {("body_size", "large")}
    large = next(r for r in result["rows"] if r["value"] == "large")
    m = large["metrics"]["sensitivity"]
    assert m["ci95"][0] <= m["value"] <= m["ci95"][1] and m["gap"] < -0.1 and m["gap_ci95"][1] < 0
    assert all(r["attribute"] != "age_band" for r in result["rows"])  # one value: nothing to compare
    assert "| body_size | large |" in result["markdown"]
    again = StudyRecord.from_json(dataclasses.asdict(records[0]))
    assert again == records[0]


def test_the_fit_trades_no_lesion_for_fewer_false_positives_and_lets_none_get_worse():
    site = SiteCalibration("ACME", "CT", None)

    def tried(bias, found, fp, error=1.0, simplicity=0):
        return (simplicity, bias, site, (found, 28, fp, error))

    # the model as trained makes 2.67 false positives per study here: a bias that keeps every lesion with 0.83 is
    # kept although 0.83 is over the 0.5 target, and one that finds a lesion more with 3.0 is refused
    identity = tried(0.0, 26, 2.67)
    fewer = tried(-2.0, 26, 0.83)
    assert choose([tried(1.0, 27, 3.0), identity, fewer], 0.5) is fewer
    # within the target, a lesion more wins over fewer false positives; over it, never
    quiet = tried(0.0, 26, 0.2)
    assert choose([quiet, tried(0.5, 27, 0.5), tried(1.0, 28, 0.67)], 0.5)[1] == 0.5
    # detection tied: the closest diameters, then the smallest change, then the simplest input adjustment
    assert choose([quiet, tried(0.25, 26, 0.2, 0.6), tried(0.5, 26, 0.2, 0.6)], 0.5)[1] == 0.25
    assert choose([quiet, tried(0.0, 26, 0.2, simplicity=1)], 0.5) is quiet


def test_model_card_names_every_training_leg_and_the_hard_examples(tmp_path):
    from models.segmentation.model_card import _legs

    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "train_config.json").write_text(json.dumps({"runs": [{"stopped_at_step": 3000}]}))
    (tmp_path / "stage2").mkdir()
    first = {"path": str(tmp_path / "stage1" / "checkpoint.pt"), "sha256": "aaa", "step": 3000}
    (tmp_path / "stage2" / "train_config.json").write_text(json.dumps({"init_from": first}))
    config = {
        "init_from": {"path": str(tmp_path / "stage2" / "segmenter.pt"), "sha256": "bbb", "step": 5000},
        "runs": [{"stopped_at_step": 2500}, {"stopped_at_step": 4000}],
        "hard_examples": {
            "path": "hard_examples.json",
            "mined_with": "stage2/segmenter.pt",
            "mined_with_sha256": "bbb",
            "summary": {
                "lesions": 700,
                "median_dice": 0.92,
                "missed (Dice < 0.1)": 25,
                "false_positives": 200,
            },
        },
    }
    legs, mined = _legs(config)
    assert legs.startswith("- 3 training legs")
    assert "3000 steps (`" in legs and "sha256 aaa); then 5000 steps" in legs and "then 4000 steps" in legs
    assert "700 lesions, median Dice 0.92, 25 missed, 200 false-positive components" in mined
    assert _legs({"runs": [{"stopped_at_step": 3000}]}) == []
