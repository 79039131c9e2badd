"""``measure_mask`` (long axis on every slice's outline, short axis on the chosen slice only, the chord search
vectorised) against the slice-by-slice, loop-by-loop algorithm it replaced, kept here as the reference. Equal to
the last bit, not approximately."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from core.geometry import _longest_perpendicular_chord, _outline_points, measure_mask, slice_diameters


def reference_chord(poly_uv):
    u, v = poly_uv[:, 0], poly_uv[:, 1]
    best, n = 0.0, len(poly_uv)
    for u0 in np.linspace(u.min(), u.max(), 129):
        vs = []
        for a in range(n):
            b = (a + 1) % n
            ua, ub = u[a], u[b]
            if (ua - u0) * (ub - u0) <= 0 and ua != ub:
                t = (u0 - ua) / (ub - ua)
                vs.append(float(v[a] + t * (v[b] - v[a])))
            elif ua == ub == u0:
                vs.extend((float(v[a]), float(v[b])))
        if len(vs) >= 2:
            best = max(best, max(vs) - min(vs))
    return best


def reference_slice(mask2d, sy, sx):
    if not mask2d.any():
        return 0.0, 0.0, ((0.0, 0.0), (0.0, 0.0))
    pts = _outline_points(mask2d)
    mm = pts * np.array([sy, sx])
    if len(mm) < 2:
        return 0.0, 0.0, ((float(pts[0, 0]), float(pts[0, 1])),) * 2
    d = np.linalg.norm(mm[:, None, :] - mm[None, :, :], axis=-1)
    a, b = np.unravel_index(int(np.argmax(d)), d.shape)
    long_mm = float(d[a, b])
    ends = ((float(pts[a, 0]), float(pts[a, 1])), (float(pts[b, 0]), float(pts[b, 1])))
    if len(mm) < 3 or long_mm == 0.0:
        return long_mm, 0.0, ends
    axis = (mm[b] - mm[a]) / long_mm
    perp = np.array([-axis[1], axis[0]])
    uv = np.stack([(mm - mm[a]) @ axis, (mm - mm[a]) @ perp], axis=1)
    try:
        order = ConvexHull(uv).vertices
    except QhullError:
        return long_mm, 0.0, ends
    return long_mm, min(reference_chord(uv[order]), long_mm), ends


def reference_measure(mask, spacing):
    sz, sy, sx = spacing
    best = (0.0, 0.0, 0, ((0.0, 0.0), (0.0, 0.0)))
    for kk in np.flatnonzero(mask.any(axis=(1, 2))):
        long_mm, short_mm, ends = reference_slice(mask[kk], sy, sx)
        if long_mm > best[0]:
            best = (long_mm, short_mm, int(kk), ends)
    long_mm, short_mm, k, ((r0, c0), (r1, c1)) = best
    return long_mm, short_mm, float(mask.sum()) * (sz * sy * sx / 1000.0), k, ((k, r0, c0), (k, r1, c1))


def random_lesion(rng, shape):
    """A blob from smoothed noise (irregular, sometimes several pieces), a box, a line or a single voxel."""
    kind = rng.integers(0, 8)
    mask = np.zeros(shape, bool)
    if kind == 0:
        mask[tuple(rng.integers(0, n) for n in shape)] = True
    elif kind == 1:
        k, j = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        a = int(rng.integers(0, shape[2]))
        mask[k, j, a : int(rng.integers(a + 1, shape[2] + 1))] = True  # part of one row
    elif kind == 2:
        lo = [int(rng.integers(0, n // 2 + 1)) for n in shape]
        mask[
            tuple(slice(a, a + int(rng.integers(1, n // 2 + 2))) for a, n in zip(lo, shape, strict=True))
        ] = True
    else:
        noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(1.0, 4.0))
        mask = noise > np.quantile(noise, rng.uniform(0.8, 0.99))
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_measure_mask_equals_the_reference_algorithm_on_random_lesions(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        shape = (int(rng.integers(1, 8)), int(rng.integers(4, 40)), int(rng.integers(4, 40)))
        spacing = (float(rng.uniform(0.5, 5.0)), float(rng.uniform(0.5, 2.0)), float(rng.uniform(0.5, 2.0)))
        if rng.random() < 0.3:
            spacing = (spacing[0], spacing[1], spacing[1])
        mask = random_lesion(rng, shape)
        m = measure_mask(mask, spacing)
        long_mm, short_mm, volume_ml, k, ends = reference_measure(mask, spacing)
        assert (m.long_axis_mm, m.short_axis_mm, m.volume_ml) == (long_mm, short_mm, volume_ml)
        assert m.slice_index == k
        assert m.long_axis_endpoints_kji == tuple(tuple(float(v) for v in e) for e in ends)


@pytest.mark.parametrize("seed", range(4))
def test_slice_diameters_and_chord_equal_the_reference_on_random_slices(seed):
    rng = np.random.default_rng(100 + seed)
    for _ in range(40):
        mask = random_lesion(rng, (1, int(rng.integers(3, 50)), int(rng.integers(3, 50))))[0]
        sy, sx = float(rng.uniform(0.4, 2.0)), float(rng.uniform(0.4, 2.0))
        assert slice_diameters(mask, sy, sx) == reference_slice(mask, sy, sx)
    for _ in range(40):  # convex polygons, some with edges along v (equal u at both ends)
        angles = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 30))))
        poly = np.stack([np.cos(angles), rng.uniform(0.2, 1.0) * np.sin(angles)], axis=1) * 10
        if rng.random() < 0.5:
            poly = np.round(poly)
        try:
            poly = poly[ConvexHull(poly).vertices]
        except QhullError:
            continue
        assert _longest_perpendicular_chord(poly) == reference_chord(poly)


def test_a_chord_along_a_vertical_edge_is_counted():
    square = np.array([[0.0, 0.0], [4.0, 0.0], [4.0, 3.0], [0.0, 3.0]])
    assert _longest_perpendicular_chord(square) == reference_chord(square) == 3.0
