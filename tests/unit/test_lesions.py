from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from core.lesions import (
    ContrastSearch,
    FaintSearch,
    LesionFilter,
    contrast_search,
    extract_lesions,
    faint_search,
    guided_search,
    lesion_box,
    mask_box,
)
from core.types import LabelId, Organ, Segmentation, Volume


def _volume() -> Volume:
    hu = np.full((20, 64, 64), -1000.0, dtype=np.float32)
    hu[:, 8:56, 8:56] = 40.0  # a body
    return Volume(hu, (2.0, 1.0, 1.0), (-32.0, -32.0, 0.0))


def _blob(shape, centre_kji, radius_vox, value):
    k, j, i = np.indices(shape)
    d = np.sqrt(((k - centre_kji[0]) * 2.0) ** 2 + (j - centre_kji[1]) ** 2 + (i - centre_kji[2]) ** 2)
    return np.where(d <= radius_vox, value, 0.0).astype(np.float32)


def test_extract_measures_places_and_filters():
    vol = _volume()
    labels = np.zeros(vol.shape, np.uint8)
    labels[:, 8:56, 8:32] = LabelId.LIVER
    prob = _blob(vol.shape, (10, 30, 20), 6, 0.9) + _blob(vol.shape, (10, 40, 45), 1, 0.9)
    labels[prob > 0] = LabelId.LESION
    found = extract_lesions(vol, Segmentation(labels, prob), LesionFilter(min_volume_ml=0.1))
    assert len(found) == 1  # the one-voxel-radius blob is under 0.1 ml
    les = found[0]
    assert les.organ is Organ.LIVER
    assert abs(les.measurement.long_axis_mm - 13.0) <= 1.0
    assert np.allclose(les.centroid_lps_mm, vol.kji_to_lps([10, 30, 20]), atol=0.5)


def test_guided_search_finds_a_faint_lesion_where_the_prior_was():
    vol = _volume()
    labels = np.zeros(vol.shape, np.uint8)
    prob = _blob(vol.shape, (10, 30, 30), 4, 0.4)  # under the detector's 0.5, over the second look's 0.3
    seg = Segmentation(labels, prob)
    expected = tuple(vol.kji_to_lps([10, 32, 33]))
    hit = guided_search(vol, seg, expected, Organ.LIVER, avoid_lps_mm=[])
    assert hit is not None and hit.organ is Organ.LIVER
    assert abs(hit.measurement.long_axis_mm - 9.0) <= 1.0
    # the same blob is someone else's lesion: leave it alone
    assert (
        guided_search(vol, seg, expected, Organ.LIVER, avoid_lps_mm=[tuple(vol.kji_to_lps([10, 30, 30]))])
        is None
    )
    # too far from the expected position, or too faint
    far = tuple(vol.kji_to_lps([10, 30, 55]))
    assert guided_search(vol, seg, far, Organ.LIVER, avoid_lps_mm=[]) is None
    faint = Segmentation(labels, prob * 0.5)
    assert guided_search(vol, faint, expected, Organ.LIVER, avoid_lps_mm=[]) is None


def _liver_volume(seed: int, lesion_hu: float | None, noise_hu: float = 15.0) -> tuple[Volume, Segmentation]:
    """A liver (110 HU, noise of a CT's grain) filling most of a body, the model's label map calling all of it
    liver and its lesion probability zero everywhere: what the model says of a lesion it does not see. With
    ``lesion_hu``, a 7 mm lesion of that contrast sits at voxel (10, 30, 30)."""
    rng = np.random.default_rng(seed)
    hu = np.full((20, 64, 64), -1000.0, dtype=np.float32)
    hu[:, 4:60, 4:60] = -90.0  # fat
    hu[:, 8:56, 8:56] = 110.0
    if lesion_hu is not None:
        hu += _blob(hu.shape, (10, 30, 30), 3.5, lesion_hu)
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape), (0.0, 0.7, 0.7))
    hu += (noise / noise.std() * noise_hu).astype(np.float32)
    vol = Volume(hu, (2.0, 1.0, 1.0), (-32.0, -32.0, 0.0))
    labels = np.zeros(vol.shape, np.uint8)
    labels[:, 8:56, 8:56] = LabelId.LIVER
    return vol, Segmentation(labels, np.zeros(vol.shape, np.float32))


@pytest.mark.parametrize(
    "lesion_hu", [-45.0, 45.0]
)  # hypodense (portal venous) and hyperenhancing (arterial)
def test_contrast_search_finds_a_lesion_the_model_missed_by_its_contrast(lesion_hu):
    vol, seg = _liver_volume(0, lesion_hu)
    expected = tuple(vol.kji_to_lps([10, 33, 34]))  # the prior's aligned position, a few mm off
    hit = contrast_search(vol, seg, expected, Organ.LIVER, avoid_lps_mm=[])
    assert hit is not None and hit.organ is Organ.LIVER
    assert np.allclose(hit.centroid_lps_mm, vol.kji_to_lps([10, 30, 30]), atol=1.5)
    assert abs(hit.measurement.long_axis_mm - 7.0) <= 1.5, hit.measurement
    # someone else's lesion, or too far away to be this one
    assert contrast_search(vol, seg, expected, Organ.LIVER, [tuple(vol.kji_to_lps([10, 30, 30]))]) is None
    assert contrast_search(vol, seg, tuple(vol.kji_to_lps([10, 30, 50])), Organ.LIVER, []) is None
    # a node has no organ around it to set the background: not searched
    assert contrast_search(vol, seg, expected, Organ.LYMPH_NODE, []) is None
    # a site whose lesion filter starts above the lesion's size does not get it back by a second look
    assert contrast_search(vol, seg, expected, Organ.LIVER, [], min_long_axis_mm=9.0) is None


def test_contrast_search_finds_nothing_where_the_lesion_resolved():
    # noise alone must not come back as the lesion (a resolved lesion would be read as persisting): 40 livers
    found = []
    for seed in range(40):
        vol, seg = _liver_volume(seed, None)
        hit = contrast_search(vol, seg, tuple(vol.kji_to_lps([10, 30, 30])), Organ.LIVER, avoid_lps_mm=[])
        found += [hit] if hit is not None else []
    assert found == []
    # nor a lesion too faint to tell from the noise (10 HU under 15 HU of noise)
    vol, seg = _liver_volume(0, -10.0)
    assert contrast_search(vol, seg, tuple(vol.kji_to_lps([10, 30, 30])), Organ.LIVER, []) is None


def test_contrast_search_refuses_a_band_it_grew_into():
    # a vessel-like band of contrast (20 x 4 mm in plane) where the lesion was: not a lesion
    vol, seg = _liver_volume(0, None)
    band = np.zeros(vol.shape, np.float32)
    band[9:12, 28:32, 20:40] = -60.0
    vol = Volume(vol.voxels_hu + band, vol.spacing_kji_mm, vol.origin_lps_mm)
    where = tuple(vol.kji_to_lps([10, 30, 30]))
    assert contrast_search(vol, seg, where, Organ.LIVER, avoid_lps_mm=[]) is None
    # it is the shape that refuses it: without the rule the band comes back
    assert contrast_search(vol, seg, where, Organ.LIVER, [], ContrastSearch(min_axis_ratio=0.0)) is not None


@pytest.mark.parametrize("lesion_hu", [-30.0, 30.0])
def test_faint_search_finds_a_lesion_no_voxel_of_which_stands_out(lesion_hu):
    # 7 mm, 30 HU off the liver under 25 HU of grainy noise: the voxel threshold of the contrast look sees nothing,
    # the mean over a ball the lesion's size does
    vol, seg = _liver_volume(1, lesion_hu, noise_hu=25.0)
    expected = tuple(vol.kji_to_lps([10, 32, 31]))  # the prior's aligned position, 2 mm off
    assert contrast_search(vol, seg, expected, Organ.LIVER, avoid_lps_mm=[]) is None
    hit = faint_search(vol, seg, expected, Organ.LIVER, [], prior_diameter_mm=12.0)
    assert hit is not None and hit.organ is Organ.LIVER
    assert np.allclose(hit.centroid_lps_mm, vol.kji_to_lps([10, 30, 30]), atol=2.0), hit.centroid_lps_mm
    assert abs(hit.measurement.long_axis_mm - 7.0) <= 2.5, hit.measurement
    # someone else's lesion; further than the alignment's error; an organ where vessels look like it; under the
    # site's floor: not searched, or not found
    assert faint_search(vol, seg, expected, Organ.LIVER, [tuple(vol.kji_to_lps([10, 30, 30]))], 12.0) is None
    assert faint_search(vol, seg, tuple(vol.kji_to_lps([10, 30, 38])), Organ.LIVER, [], 12.0) is None
    assert faint_search(vol, seg, expected, Organ.LUNG, [], 12.0) is None
    assert faint_search(vol, seg, expected, Organ.LIVER, [], 12.0, min_long_axis_mm=12.0) is None
    # it is the significance that decides: asked for more than this lesion has, nothing
    assert faint_search(vol, seg, expected, Organ.LIVER, [], 12.0, FaintSearch(min_z=12.0)) is None


def test_faint_search_finds_nothing_in_noise_alone():
    # where a lesion resolved, grainy noise must not come back as it: 60 livers, twice the test's lesion's noise
    found = []
    for seed in range(60):
        vol, seg = _liver_volume(seed, None, noise_hu=25.0)
        hit = faint_search(
            vol, seg, tuple(vol.kji_to_lps([10, 30, 30])), Organ.LIVER, [], prior_diameter_mm=15.0
        )
        found += [hit] if hit is not None else []
    assert found == []


def test_lesion_box_found_slab_by_slab_is_the_lesion_masks_box():
    rng = np.random.default_rng(3)
    for _ in range(40):
        shape = tuple(int(n) for n in rng.integers(1, 30, 3))
        labels = rng.integers(0, 3, shape).astype(np.uint8)
        for _ in range(int(rng.integers(0, 4))):
            k, j, i = (int(rng.integers(0, n)) for n in shape)
            labels[k, j, i] = LabelId.LESION
        slab = int(rng.integers(1, 10))
        assert lesion_box(labels, slab=slab) == mask_box(labels == LabelId.LESION)
        # widened, within the array: as mask_box widens, and per axis
        margin = int(rng.integers(0, 5))
        assert lesion_box(labels, margin, slab) == mask_box(labels == LabelId.LESION, margin)
        wide = lesion_box(labels, (0, margin, 1), slab)
        plain = mask_box(labels == LabelId.LESION)
        if plain is not None and wide is not None:
            expected = (
                plain[0],
                mask_box(labels == LabelId.LESION, margin)[1],
                mask_box(labels == LabelId.LESION, 1)[2],
            )
            assert wide == expected
        else:
            assert plain is None and wide is None
