"""The segmenter's working grid: a fine series is segmented at the training spacing and the result is brought
back to the native grid (nearest organs, trilinear lesion boundary); stored label maps are reused only when
model, series and geometry all match."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest

from adapters.artifacts import ReusingSegmenter, load_artifacts, save_saliency
from core.errors import InputError
from core.lesions import LesionFilter, extract_lesions
from core.types import AcquisitionInfo, LabelId, Segmentation, Volume
from models.segmentation.inference import _to_native, working_shape


def test_working_shape_coarsens_only_axes_finer_than_the_training_grid():
    assert working_shape((130, 512, 512), (2.0, 0.703125, 0.703125)) == (130, 180, 180)
    assert working_shape((400, 512, 512), (0.625, 0.7, 0.7)) == (100, 179, 179)
    assert working_shape((80, 192, 192), (3.0, 2.0, 2.0)) == (80, 192, 192)  # the cohort's grid: untouched
    assert working_shape((60, 192, 192), (5.0, 1.6, 1.6)) == (60, 192, 192)  # 1.6 mm >= 3/4 of 2 mm


def _sphere_probabilities(work_shape, spacing, centre_mm, radius_mm):
    """Softmax-like class probabilities on the working grid: liver everywhere, a lesion ball whose
    probability falls smoothly from 1 to 0 across its edge (0.5 exactly at ``radius_mm``)."""
    k, j, i = np.indices(work_shape, dtype=float)
    pos = np.stack([(k + 0.5) * spacing[0], (j + 0.5) * spacing[1], (i + 0.5) * spacing[2]])
    d = np.sqrt(((pos - np.reshape(centre_mm, (3, 1, 1, 1))) ** 2).sum(axis=0))
    lesion = 1.0 / (1.0 + np.exp((d - radius_mm) / 1.0))
    prob = np.zeros((4, *work_shape), np.float32)
    prob[LabelId.LESION] = lesion
    prob[LabelId.LIVER] = 1.0 - lesion
    return prob


def test_native_lesion_edge_is_interpolated_not_blocky():
    work, work_spacing = (20, 30, 30), (2.5, 2.0, 2.0)
    native, native_spacing = (20, 90, 90), (2.5, 2.0 / 3, 2.0 / 3)
    vol = Volume(np.zeros(native, np.float32), native_spacing, (0.0, 0.0, 0.0))
    keep = LesionFilter(min_volume_ml=0.01)
    fine_err, blocky_err = [], []
    for radius in (5.3, 6.1, 6.9, 7.7, 8.5):
        prob = _sphere_probabilities(work, work_spacing, (25.0, 30.6, 29.3), radius_mm=radius)
        seg = _to_native(prob, native)
        assert seg.labels.shape == native and seg.lesion_probability.shape == native
        assert set(np.unique(seg.labels)) == {LabelId.LIVER, LabelId.LESION}
        (lesion,) = extract_lesions(vol, seg, keep)
        assert lesion.organ.value == "liver"
        fine_err.append(abs(lesion.measurement.long_axis_mm - 2 * radius))
        # nearest-neighbour upsampling of the working-grid argmax: edges in 2 mm steps
        blocky = np.repeat(np.repeat(np.argmax(prob, axis=0).astype(np.uint8), 3, axis=1), 3, axis=2)
        (coarse,) = extract_lesions(vol, Segmentation(blocky, seg.lesion_probability), keep)
        blocky_err.append(abs(coarse.measurement.long_axis_mm - 2 * radius))
    assert max(fine_err) <= 0.8, fine_err
    assert np.mean(fine_err) < np.mean(blocky_err), (fine_err, blocky_err)


def test_organs_come_back_from_the_nearest_working_voxel_on_every_resampled_axis():
    rng = np.random.default_rng(3)
    work, native = (6, 7, 9), (12, 20, 9)  # k and j resampled, i kept
    prob = rng.random((4, *work), dtype=np.float32)
    prob[LabelId.LESION] = 0.0  # no lesion candidate: organs and probabilities only
    prob /= prob.sum(axis=0, keepdims=True)
    seg = _to_native(prob, native)
    nearest = [
        np.clip(np.rint((np.arange(n) + 0.5) * w / n - 0.5), 0, w - 1).astype(int)
        for n, w in zip(native, work, strict=True)
    ]
    expected = np.argmax(prob, axis=0)[np.ix_(*nearest)]
    assert np.array_equal(seg.labels, expected)
    assert np.array_equal(seg.lesion_probability, prob[LabelId.LESION][np.ix_(*nearest)])


class _Counting:
    model_version = "seg-v1"

    def __init__(self) -> None:
        self.calls = 0

    def segment(self, volume: Volume) -> Segmentation:
        self.calls += 1
        labels = np.full(volume.shape, LabelId.LIVER, np.uint8)
        return Segmentation(labels, np.zeros(volume.shape, np.float32))


def _acq(series: str) -> AcquisitionInfo:
    return AcquisitionInfo("1.2.3", series, "1.2.9", "P", dt.date(2026, 1, 2))


def _store(root, *, model="seg-v1", series="1.2.4", shape=(4, 8, 8), origin=(0.0, 0.0, 0.0)):
    folder = root / "1.2.3"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps({"model_version": model, "study": {"series_uid": series}}))
    labels = np.full(shape, LabelId.LESION, np.uint8)
    np.savez(
        folder / "segmentation.npz",
        labels=labels,
        lesion_probability=np.ones(shape, np.float16),
        spacing_kji_mm=np.array([2.0, 1.0, 1.0]),
        origin_lps_mm=np.array(origin),
        direction_lps=np.eye(3),
    )


def test_stored_label_map_is_reused_only_for_the_same_model_series_and_geometry(tmp_path):
    vol = Volume(np.zeros((4, 8, 8), np.float32), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), acquisition=_acq("1.2.4"))
    inner = _Counting()
    seg = ReusingSegmenter(inner, tmp_path)
    assert seg.model_version == "seg-v1"
    assert (seg.segment(vol).labels == LabelId.LIVER).all() and inner.calls == 1  # nothing stored yet
    _store(tmp_path)
    assert (seg.segment(vol).labels == LabelId.LESION).all() and inner.calls == 1 and seg.reused == 1
    for changed in (
        {"model": "seg-v2"},
        {"series": "1.2.5"},
        {"shape": (4, 8, 9)},
        {"origin": (0.0, 0.0, 5.0)},
    ):
        _store(tmp_path, **changed)
        assert (seg.segment(vol).labels == LabelId.LIVER).all(), changed
    assert inner.calls == 5 and seg.reused == 1
    (tmp_path / "1.2.3" / "segmentation.npz").write_bytes(b"not an npz")
    assert (seg.segment(vol).labels == LabelId.LIVER).all()  # unreadable: the model runs


def test_the_edge_refinements_voxels_are_kept_with_the_stored_label_map(tmp_path):
    """A reused label map keeps which lesion voxels the image added (``core.edges``), so a lesion's probability is the
    model's own on reuse too; a file stored before they were kept reads as unrefined."""
    vol = Volume(np.zeros((4, 8, 8), np.float32), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), acquisition=_acq("1.2.4"))
    _store(tmp_path)
    assert ReusingSegmenter(_Counting(), tmp_path).segment(vol).refined is None
    refined = np.zeros((4, 8, 8), bool)
    refined[1, 2:4, 2:4] = True
    with np.load(tmp_path / "1.2.3" / "segmentation.npz") as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(tmp_path / "1.2.3" / "segmentation.npz", **arrays, refined_voxels=np.flatnonzero(refined))
    got = ReusingSegmenter(_Counting(), tmp_path).segment(vol).refined
    assert got is not None and np.array_equal(got, refined)
    np.savez(tmp_path / "1.2.3" / "segmentation.npz", **arrays, refined_voxels=np.array([4 * 8 * 8]))
    assert ReusingSegmenter(_Counting(), tmp_path).segment(vol).refined is None  # does not fit: not used


def test_an_explained_lesions_saliency_is_kept_with_the_stored_analysis(tmp_path):
    """``interval explain --artifacts``: the overlay the report page draws; a second lesion adds to the first."""
    _store(tmp_path)
    first = np.zeros((4, 8, 8), np.float32)
    first[1, 2:4, 2:4] = 1.0
    second = np.zeros((4, 8, 8), np.float32)
    second[2, 5:7, 5:7] = 0.5
    save_saliency(tmp_path, "1.2.3", first)
    save_saliency(tmp_path, "1.2.3", second)
    _, arrays = load_artifacts(tmp_path, "1.2.3")
    assert arrays is not None and arrays["saliency"].dtype == np.float16
    assert np.allclose(arrays["saliency"], np.maximum(first, second))
    assert (arrays["labels"] == LabelId.LESION).all()  # the rest is unchanged
    # the ReusingSegmenter still reads the stored label map
    vol = Volume(np.zeros((4, 8, 8), np.float32), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), acquisition=_acq("1.2.4"))
    assert (ReusingSegmenter(_Counting(), tmp_path).segment(vol).labels == LabelId.LESION).all()
    with pytest.raises(InputError, match="not the same series"):
        save_saliency(tmp_path, "1.2.3", np.zeros((4, 8, 9), np.float32))


def test_organ_and_best_other_equal_argmax_and_max_over_the_other_classes_ties_included():
    from models.segmentation.inference import _organ_and_best_other, _take_nearest

    rng = np.random.default_rng(3)
    prob = np.round(rng.random((4, 6, 7, 8)), 1).astype(np.float32)  # rounded: many ties
    others = [c for c in range(4) if c != LabelId.LESION]
    organ, best = _organ_and_best_other(prob)
    assert organ.dtype == np.uint8
    assert np.array_equal(organ, np.asarray(others, np.uint8)[prob[others].argmax(axis=0)])
    assert np.array_equal(best, prob[others].max(axis=0))
    index = [rng.integers(0, n, size=m) for n, m in zip(prob.shape[1:], (9, 5, 11), strict=True)]
    assert np.array_equal(_take_nearest(prob[0], index), prob[0][np.ix_(*index)])
