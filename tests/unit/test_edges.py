"""The image-placed lesion edge (``core.edges``): where it moves the model's edge, and where it must not."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage

from core.edges import EdgeRefinement, refine_lesion_edges
from core.geometry import measure_mask
from core.lesions import LesionFilter, extract_lesions
from core.types import LabelId, Segmentation, Volume

SPACING = (5.0, 2.0, 2.0)
SHAPE = (9, 48, 48)


def _ball(centre: tuple[float, float, float], radius_mm: float) -> npt.NDArray[np.bool_]:
    k, j, i = np.indices(SHAPE, dtype=float)
    d2 = sum(((a - c) * s) ** 2 for a, c, s in zip((k, j, i), centre, SPACING, strict=True))
    ball: npt.NDArray[np.bool_] = d2 <= radius_mm**2
    return ball


def _scene(
    lesion: npt.NDArray[np.bool_], organ_hu: float, lesion_hu: float, noise_hu: float, seed: int = 0
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(seed)
    # a reconstruction's in-plane blur: the edge is a ramp, which crosses half its height at the true edge
    sharp = np.where(lesion, lesion_hu, organ_hu).astype(float)
    hu = ndimage.gaussian_filter(sharp, (0.0, 1.0, 1.0)) + rng.normal(0.0, noise_hu, SHAPE)
    labels = np.full(SHAPE, LabelId.LUNG, dtype=np.uint8)
    return hu.astype(np.float32), labels


def _model(labels: npt.NDArray[np.uint8], drawn: npt.NDArray[np.bool_], p: float = 0.9) -> Segmentation:
    out = labels.copy()
    out[drawn] = LabelId.LESION
    return Segmentation(labels=out, lesion_probability=np.where(drawn, p, 0.02).astype(np.float32))


def _erode(mask: npt.NDArray[np.bool_], n: int) -> npt.NDArray[np.bool_]:
    out: npt.NDArray[np.bool_] = ndimage.binary_erosion(mask, np.ones((1, 3, 3), dtype=bool), iterations=n)
    return out


def _long(mask: npt.NDArray[np.bool_]) -> float:
    return measure_mask(mask, SPACING).long_axis_mm


def test_an_undersegmented_nodule_gets_its_edge_back() -> None:
    truth = _ball((4, 24, 24), 7.0)
    hu, labels = _scene(truth, -850.0, 30.0, 20.0)
    seg = _model(labels, _erode(truth, 1))
    assert _long(truth) - _long(seg.labels == LabelId.LESION) >= 3.0  # the model's edge a voxel inside
    out = refine_lesion_edges(hu, seg, SPACING)
    lesion = out.labels == LabelId.LESION
    assert abs(_long(lesion) - _long(truth)) <= 1.0
    assert out.refined is not None and np.array_equal(out.refined, lesion & ~(seg.labels == LabelId.LESION))
    assert np.array_equal(out.lesion_probability, seg.lesion_probability)  # the model's probability is kept
    # a lesion's probability stays the model's own: averaged over the voxels the model drew
    volume = Volume(voxels_hu=hu, spacing_kji_mm=SPACING, origin_lps_mm=(0.0, 0.0, 0.0))
    (found,) = extract_lesions(volume, out)
    assert found.probability == pytest.approx(0.9)
    assert found.voxel_count == int(lesion.sum())


def test_an_oversegmented_nodule_is_trimmed_to_its_edge() -> None:
    truth = _ball((4, 24, 24), 7.0)
    hu, labels = _scene(truth, -850.0, 30.0, 20.0)
    drawn = ndimage.binary_dilation(truth, np.ones((1, 3, 3), dtype=bool))
    seg = _model(labels, drawn)
    out = refine_lesion_edges(hu, seg, SPACING)
    assert abs(_long(out.labels == LabelId.LESION) - _long(truth)) <= 1.0
    assert np.all(out.labels[drawn & ~truth & (out.labels != LabelId.LESION)] == LabelId.LUNG)


def test_a_low_contrast_lesion_keeps_the_models_edge() -> None:
    # a liver metastasis 40 HU under the parenchyma at 16 HU of noise: a half-contrast edge would follow the noise
    truth = _ball((4, 24, 24), 9.0)
    hu, labels = _scene(truth, 105.0, 65.0, 16.0)
    seg = _model(labels, _erode(truth, 1))
    out = refine_lesion_edges(hu, seg, SPACING)
    assert np.array_equal(out.labels, seg.labels)
    assert out.refined is None


def test_a_speck_under_the_lesion_floor_is_not_grown_into_a_finding() -> None:
    truth = _ball((4, 24, 24), 3.0)  # a 6 mm nodule: 3 x 3 voxels on one slice
    hu, labels = _scene(truth, -850.0, 30.0, 20.0)
    speck = np.zeros(SHAPE, dtype=bool)
    speck[4, 24, 24] = True  # the model drew one voxel of it: under the 5 mm floor
    seg = _model(labels, speck)
    out = refine_lesion_edges(hu, seg, SPACING)
    assert np.array_equal(out.labels, seg.labels)
    # the same speck is grown once the site's floor lets it count as a lesion
    low = EdgeRefinement(keep=LesionFilter(min_long_axis_mm=0.0, min_volume_ml=0.0))
    assert np.count_nonzero(refine_lesion_edges(hu, seg, SPACING, low).labels == LabelId.LESION) > 1


def test_the_edge_does_not_move_into_the_chest_wall_it_touches() -> None:
    truth = _ball((4, 24, 24), 7.0)
    hu, labels = _scene(truth, -850.0, 30.0, 20.0)
    wall = np.zeros(SHAPE, dtype=bool)
    wall[:, :, 28:] = True  # soft tissue as dense as the nodule, labelled body by the model
    hu[wall & ~truth] = 40.0
    labels[wall] = LabelId.BACKGROUND
    seg = _model(labels, _erode(truth, 1) & ~wall)
    out = refine_lesion_edges(hu, seg, SPACING)
    lesion = out.labels == LabelId.LESION
    assert np.count_nonzero(lesion & wall & ~(seg.labels == LabelId.LESION)) == 0
    assert np.count_nonzero(lesion) > np.count_nonzero(seg.labels == LabelId.LESION)  # it grew where it may


def test_two_close_nodules_are_not_merged() -> None:
    a, b = _ball((4, 24, 17), 6.0), _ball((4, 24, 24), 6.0)  # edge to edge: columns 14-20 and 21-27
    hu, labels = _scene(a | b, -850.0, 30.0, 20.0)
    seg = _model(labels, _erode(a, 1) | _erode(b, 1))
    assert ndimage.label(seg.labels == LabelId.LESION, structure=np.ones((3, 3, 3), dtype=bool))[1] == 2
    out = refine_lesion_edges(hu, seg, SPACING)
    _, n = ndimage.label(out.labels == LabelId.LESION, structure=np.ones((3, 3, 3), dtype=bool))
    assert n == 2


def test_a_vessel_running_from_the_nodule_is_not_followed() -> None:
    truth = _ball((4, 24, 24), 7.0)
    hu, labels = _scene(truth, -850.0, 30.0, 20.0)
    vessel = np.zeros(SHAPE, dtype=bool)
    vessel[:, 24, 24:46] = True  # one voxel wide, leaving the nodule sideways
    hu[vessel & ~truth] = 40.0
    seg = _model(labels, truth)  # two voxels of band beyond the edge, along the vessel
    out = refine_lesion_edges(hu, seg, SPACING)
    assert _long(out.labels == LabelId.LESION) <= _long(truth) + 1.0


def test_shapes_must_agree() -> None:
    truth = _ball((4, 24, 24), 7.0)
    hu, labels = _scene(truth, -850.0, 30.0, 20.0)
    with pytest.raises(ValueError, match="shape"):
        refine_lesion_edges(hu[:-1], _model(labels, truth), SPACING)


def test_in_place_refines_the_given_label_map_and_otherwise_it_is_left_as_it_was():
    truth = _ball((4, 24, 24), 7.0)
    hu, labels = _scene(truth, -850.0, 30.0, 20.0)
    seg = _model(labels, _erode(truth, 1))
    before = seg.labels.copy()
    copied = refine_lesion_edges(hu, seg, SPACING)
    assert np.array_equal(seg.labels, before) and not np.array_equal(copied.labels, before)
    in_place = refine_lesion_edges(hu, seg, SPACING, in_place=True)
    assert in_place.labels is seg.labels and np.array_equal(in_place.labels, copied.labels)
    assert in_place.refined is not None and copied.refined is not None
    assert np.array_equal(in_place.refined, copied.refined)
