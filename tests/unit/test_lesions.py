from __future__ import annotations

import numpy as np

from core.lesions import LesionFilter, extract_lesions, guided_search
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
