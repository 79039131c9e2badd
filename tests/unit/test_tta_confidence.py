"""Test-time-augmentation spread per lesion (core.confidence): counting and measuring the views a model
returns, carried through the pipeline into report.json."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import numpy as np
import pytest

from adapters.report_json import result_to_json
from core.confidence import add_spreads, lesion_mask, lesion_spread, spread_box
from core.lesions import LesionFilter, extract_lesions
from core.pipeline import analyze_study
from core.types import (
    AcquisitionInfo,
    BoxKji,
    LabelId,
    LesionSpread,
    PriorTimePoint,
    Segmentation,
    Volume,
)

SPACING = (2.0, 1.0, 1.0)


def _volume() -> Volume:
    hu = np.full((20, 64, 64), 40.0, dtype=np.float32)
    acq = AcquisitionInfo("1.2.3", "1.2.3.4", "1.2.3.5", "P1", dt.date(2026, 1, 2))
    return Volume(hu, SPACING, (0.0, 0.0, 0.0), acquisition=acq)


def _ball(shape, centre, radius_i, p=0.9) -> Segmentation:
    k, j, i = np.indices(shape)
    d = np.sqrt(((k - centre[0]) * 2.0) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
    labels = np.full(shape, LabelId.LIVER, np.uint8)
    labels[d <= radius_i] = LabelId.LESION
    prob = np.where(d <= radius_i, p, 0.05).astype(np.float32)
    return Segmentation(labels, prob)


class FakeTTA:
    """An AugmentingSegmenter whose views are given: lesion balls of the given radii (0: not found)."""

    model_version = "fake-tta"

    def __init__(self, base: Segmentation, radii: Sequence[float], centre=(10, 30, 30)) -> None:
        self.base, self.radii, self.centre = base, radii, centre
        self.augmentations = tuple(f"view{n}" for n in range(len(radii)))
        self.calls = 0

    def segment(self, volume: Volume) -> Segmentation:
        return self.base

    def augmented_views(self, volume: Volume, boxes_kji: Sequence[BoxKji]) -> list[list[Segmentation]]:
        self.calls += 1
        out = []
        for box in boxes_kji:
            sl = tuple(slice(a, b) for a, b in box)
            views = []
            for r in self.radii:
                whole = (
                    _ball(volume.shape, self.centre, r, p=0.6) if r else _ball(volume.shape, self.centre, -1)
                )
                views.append(Segmentation(whole.labels[sl], whole.lesion_probability[sl]))
            out.append(views)
        return out


def test_views_that_agree_give_zero_spread_and_one_that_misses_counts_zero():
    vol = _volume()
    base = _ball(vol.shape, (10, 30, 30), 6)
    (lesion,) = extract_lesions(vol, base, LesionFilter(min_volume_ml=0.01))
    assert lesion.box_kji == ((7, 14), (24, 37), (24, 37))
    box = spread_box(lesion.box_kji, vol.shape)
    mask = lesion_mask(base, lesion, box)
    assert mask.sum() == lesion.voxel_count
    crop = tuple(slice(a, b) for a, b in box)
    same = Segmentation(base.labels[crop], base.lesion_probability[crop])
    agree = lesion_spread(lesion, mask, [same, same], SPACING)
    assert (agree.views, agree.detected_in, agree.agreement) == (3, 3, 1.0)
    assert agree.long_axis_spread_mm == pytest.approx(0.0)
    assert agree.probability_range == pytest.approx((0.9, 0.9))
    empty = Segmentation(np.full_like(same.labels, LabelId.LIVER), np.zeros_like(same.lesion_probability))
    missed = lesion_spread(lesion, mask, [same, empty], SPACING)
    assert (missed.views, missed.detected_in) == (3, 2)
    assert missed.long_axis_mm_range[0] == 0.0 and missed.volume_ml_range[0] == 0.0
    assert missed.probability_range == pytest.approx((0.0, 0.9))


def test_a_view_that_draws_the_lesion_larger_widens_the_long_axis_range():
    vol = _volume()
    base = _ball(vol.shape, (10, 30, 30), 6)
    (lesion,) = extract_lesions(vol, base, LesionFilter(min_volume_ml=0.01))
    model = FakeTTA(base, radii=[6, 9, 0])
    (out,) = add_spreads(vol, base, [lesion], model)
    s = out.spread
    assert s is not None and s.augmentations == ("view0", "view1", "view2")
    assert (s.views, s.detected_in) == (4, 3)
    assert s.long_axis_mm_range[0] == 0.0  # the view that missed it
    assert s.long_axis_mm_range[1] == pytest.approx(19.0, abs=1.0)  # radius 9 voxels of 1 mm
    assert s.probability_range[1] == pytest.approx(0.9)
    assert out.measurement == lesion.measurement  # the measurement itself is untouched


def test_no_augmentations_means_no_spread_and_no_model_call():
    vol = _volume()
    base = _ball(vol.shape, (10, 30, 30), 6)
    lesions = extract_lesions(vol, base, LesionFilter(min_volume_ml=0.01))
    model = FakeTTA(base, radii=[])
    assert add_spreads(vol, base, lesions, model) == lesions
    assert model.calls == 0


def test_spread_values_are_checked():
    with pytest.raises(ValueError, match="detected_in"):
        LesionSpread(3, 4, (0.1, 0.2), (1.0, 2.0), (0.1, 0.2))
    with pytest.raises(ValueError, match="long_axis_mm_range"):
        LesionSpread(3, 3, (0.1, 0.2), (3.0, 2.0), (0.1, 0.2))


class _Images:
    def __init__(self, vol: Volume) -> None:
        self.vol = vol

    def load_study(self, ref: str) -> Volume:
        return self.vol

    def find_study(self, study_uid: str) -> Volume | None:
        return None


class _NoPriors:
    def prior_time_points(self, patient_id: str, before: dt.date) -> list[PriorTimePoint]:
        return []


def test_the_pipeline_reports_each_lesions_spread_in_report_json():
    vol = _volume()
    base = _ball(vol.shape, (10, 30, 30), 6)
    result = analyze_study(
        "study",
        images=_Images(vol),
        priors=_NoPriors(),
        segmenter=FakeTTA(base, radii=[6, 7]),
    )
    (lesion,) = result_to_json(result)["lesions"]
    tta = lesion["current"]["tta"]
    assert tta["augmentations"] == ["view0", "view1"]
    assert (tta["views"], tta["detected_in"]) == (3, 3)
    assert tta["long_axis_mm"][0] <= lesion["current"]["long_axis_mm"] <= tta["long_axis_mm"][1]
    assert tta["long_axis_mm"][1] == pytest.approx(15.0, abs=1.0)
    assert lesion["current"]["box_kji"] == [[7, 14], [24, 37], [24, 37]]


def test_a_views_probability_is_averaged_over_the_voxels_the_model_drew_not_the_refined_rim():
    """With the edge refinement's rim (low model probability) marked, a view that draws the lesion as the model did
    reads the lesion's own probability: the range has no width."""
    vol = _volume()
    model = _ball(vol.shape, (10, 30, 30), 6.0)
    rim = (_ball(vol.shape, (10, 30, 30), 8.0).labels == LabelId.LESION) & (model.labels != LabelId.LESION)
    labels = model.labels.copy()
    labels[rim] = LabelId.LESION
    refined = Segmentation(labels, model.lesion_probability, refined=rim)
    (lesion,) = extract_lesions(vol, refined, LesionFilter())
    assert lesion.probability == pytest.approx(0.9)

    class SameAsTheModel(FakeTTA):
        def augmented_views(self, volume: Volume, boxes_kji: Sequence[BoxKji]) -> list[list[Segmentation]]:
            crops = [tuple(slice(a, b) for a, b in box) for box in boxes_kji]
            return [[Segmentation(refined.labels[sl], refined.lesion_probability[sl])] for sl in crops]

    (spread,) = [d.spread for d in add_spreads(vol, refined, [lesion], SameAsTheModel(refined, [8.0]))]
    assert spread is not None
    assert spread.probability_range[0] == pytest.approx(spread.probability_range[1], abs=1e-6)
