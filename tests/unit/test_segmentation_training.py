"""The training recipe's sampling and cohort handling (``models.segmentation.train``), without training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.types import LabelId
from models.segmentation.mining import case_errors
from models.segmentation.train import PATCH, Case, HardExamples, _merged_cohort_meta, _sample, lesion_voxels


def _two_lesion_case() -> Case:
    """A large lesion on the left and a 2x2x2 one on the right, further apart than a patch is wide."""
    shape = (PATCH[0], 120, 400)
    labels = np.zeros(shape, np.uint8)
    instances = np.zeros(shape, np.int16)
    instances[14:34, 40:80, 30:70] = 1  # 32,000 voxels
    instances[23:25, 59:61, 349:351] = 2  # 8 voxels
    labels[instances > 0] = LabelId.LESION
    return Case(np.zeros((2, *shape), np.float16), labels, lesion_voxels(instances), "P/t0")


def _small_lesion_share(by_instance: bool, draws: int = 400) -> float:
    """Share of patches that hold the small lesion (1-8 lesion voxels: no patch reaches both lesions)."""
    case = _two_lesion_case()
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(draws):
        _, y = _sample(rng, case, by_instance, 0.0)
        hits += int(1 <= int((y == LabelId.LESION).sum()) <= 8)
    return hits / draws


def test_instance_sampling_draws_a_small_lesion_as_often_as_a_large_one():
    by_voxel = _small_lesion_share(by_instance=False)
    by_instance = _small_lesion_share(by_instance=True)
    # 60% of patches are lesion-centred: half of those on the small lesion when lesions are drawn uniformly
    # (+0.3), 8 in 32,008 when voxels are; both get what the uniformly placed 25% happen to cover
    assert by_instance - by_voxel > 0.2, (by_instance, by_voxel)


def test_blur_augmentation_softens_the_image_and_keeps_the_labels():
    case = _two_lesion_case()
    rng_img = np.random.default_rng(1)
    noisy = rng_img.normal(0, 1, case.image.shape).astype(np.float16)
    case = Case(noisy, case.labels, case.lesions)
    x0, y0 = _sample(np.random.default_rng(5), case, True, 0.0)
    x1, y1 = _sample(np.random.default_rng(5), case, True, 1.0)
    assert np.array_equal(y0, y1)
    assert float(np.abs(np.diff(x1, axis=-1)).mean()) < 0.8 * float(np.abs(np.diff(x0, axis=-1)).mean())


def test_cohorts_made_with_one_recipe_merge_and_different_recipes_are_refused(tmp_path):
    options = {"seed": 101, "vendors": ["ge"], "min_time_points": 2}

    def cohort(name: str, patients: list[str], opts: dict[str, object]) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cohort.json").write_text(json.dumps({"seed": 101, "options": opts, "patients": patients}))
        return folder

    a = cohort("a", ["P0", "P1"], options)
    b = cohort("b", ["P2"], options)
    merged = _merged_cohort_meta([a, b])
    assert merged["patients"] == ["P0", "P1", "P2"]
    assert merged["options"] == options
    c = cohort("c", ["P3"], {**options, "vendors": ["uih"]})
    with pytest.raises(SystemExit, match="different options"):
        _merged_cohort_meta([a, c])


def test_mining_scores_each_lesion_and_keeps_false_positives_at_their_most_probable_voxel():
    shape = (20, 40, 40)
    instances = np.zeros(shape, np.int16)
    instances[5:9, 5:9, 5:9] = 1
    instances[12:15, 25:28, 25:28] = 2
    predicted = np.zeros(shape, np.uint8)
    predicted[5:9, 5:9, 6:9] = LabelId.LESION  # lesion 1 under-segmented by a quarter; lesion 2 missed
    predicted[2:4, 30:32, 5:7] = LabelId.LESION  # a false positive of 8 voxels
    predicted[18, 2, 2:4] = LabelId.LESION  # 2 voxels: below the floor
    probability = np.zeros(shape, np.float32)
    probability[predicted == LabelId.LESION] = 0.6
    probability[3, 31, 5] = 0.9
    errors = case_errors(predicted, probability, instances)
    assert errors.lesion_dice == pytest.approx({1: 2 * 48 / (48 + 64), 2: 0.0})
    assert errors.false_positives == [(3, 31, 5)]


def _mined(dice: list[float], false_positives: list[list[int]]) -> dict[str, object]:
    return {
        "cases": {
            "P/t0": {
                "lesions": [{"instance": i + 1, "dice": d} for i, d in enumerate(dice)],
                "false_positives": false_positives,
            }
        }
    }


def test_hard_examples_draw_the_missed_lesion_more_often_and_centre_patches_on_false_positives():
    case = _two_lesion_case()
    marker = (24, 100, 200)  # far from both lesions
    image = case.image.copy()
    image[(slice(None), *marker)] = 20.0
    case = Case(image, case.labels, case.lesions, case.key)

    def shares(hard: HardExamples, draws: int = 600) -> tuple[float, float]:
        rng = np.random.default_rng(0)
        small = marked = 0
        for _ in range(draws):
            x, y = hard.sample(rng, [case], 0.0)
            small += int(1 <= int((y == LabelId.LESION).sum()) <= 8)
            marked += int(float(x.max()) > 10.0)
        return small / draws, marked / draws

    # the large lesion segmented well, the small one missed, one false positive at the marker
    small_hard, marked = shares(HardExamples.from_record(_mined([0.95, 0.0], [list(marker)]), [case]))
    small_even, unmarked = shares(HardExamples.from_record(_mined([0.95, 0.95], []), [case]))
    # lesion draws (55%): 1.25 / 1.55 of them on the missed lesion against half when both are alike
    assert small_hard - small_even > 0.12, (small_hard, small_even)
    # 10% of patches centred on the false positive, less the uniform patches that would have covered it
    # anyway (without false positives those 10% are uniform): about +0.07; none without them
    assert marked - unmarked > 0.04, (marked, unmarked)


def test_hard_examples_refuse_a_record_of_other_cases():
    case = _two_lesion_case()
    with pytest.raises(SystemExit, match="has 2 lesions, mined 1"):
        HardExamples.from_record(_mined([0.5], []), [case])
    with pytest.raises(SystemExit, match="no mined errors for P/t0"):
        HardExamples.from_record({"cases": {}}, [case])
