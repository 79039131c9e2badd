"""RECIST geometry on voxel masks: long axis, perpendicular short axis, volume.

Measurements are made in the axial plane, slice by slice (RECIST 1.1 measures on axial images).
Each foreground pixel contributes the midpoints of its four edges, so that a rasterized disc of
diameter d measures d within one pixel rather than d minus one pixel (centre-to-centre).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from core.types import Measurement

__all__ = ["connected_lesions", "measure_mask", "slice_diameters"]

_EDGE_OFFSETS = np.array([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]])


def _hull_points(mask2d: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """Edge midpoints of the boundary pixels, in (row, col) pixel units, reduced to their hull."""
    boundary = mask2d & ~ndimage.binary_erosion(mask2d)
    rc = np.argwhere(boundary).astype(float)
    pts = (rc[:, None, :] + _EDGE_OFFSETS[None, :, :]).reshape(-1, 2)
    pts = np.unique(pts, axis=0)
    if len(pts) < 3:
        return pts
    try:
        hull = ConvexHull(pts)
    except QhullError:  # collinear points: a one-pixel-wide line
        return pts
    return np.asarray(pts[hull.vertices], dtype=np.float64)


def _longest_perpendicular_chord(poly_uv: npt.NDArray[np.float64]) -> float:
    """Longest chord of a convex polygon (ordered vertices, u along the long axis) parallel to v."""
    u = poly_uv[:, 0]
    v = poly_uv[:, 1]
    us = np.linspace(u.min(), u.max(), 129)
    best = 0.0
    n = len(poly_uv)
    for u0 in us:
        vs: list[float] = []
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


def slice_diameters(
    mask2d: npt.NDArray[np.bool_], row_spacing_mm: float, col_spacing_mm: float
) -> tuple[float, float, tuple[tuple[float, float], tuple[float, float]]]:
    """Long and perpendicular short diameter (mm) of one axial mask, and the long axis ends (row, col).

    The short diameter is the longest chord of the convex hull perpendicular to the long axis.
    """
    if not mask2d.any():
        return 0.0, 0.0, ((0.0, 0.0), (0.0, 0.0))
    pts = _hull_points(mask2d)
    scale = np.array([row_spacing_mm, col_spacing_mm])
    mm = pts * scale
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
    short_mm = min(_longest_perpendicular_chord(uv[order]), long_mm)
    return long_mm, short_mm, ends


def measure_mask(mask: npt.NDArray[np.bool_], spacing_kji_mm: tuple[float, float, float]) -> Measurement:
    """RECIST measurement of one lesion given as a 3-D boolean mask on a ``[k, j, i]`` grid."""
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D, got {mask.ndim}-D")
    sz, sy, sx = spacing_kji_mm
    voxel_ml = sz * sy * sx / 1000.0
    volume_ml = float(mask.sum()) * voxel_ml
    best = (0.0, 0.0, 0, ((0.0, 0.0), (0.0, 0.0)))
    for kk in np.flatnonzero(mask.any(axis=(1, 2))):
        long_mm, short_mm, ends = slice_diameters(mask[kk], sy, sx)
        if long_mm > best[0]:
            best = (long_mm, short_mm, int(kk), ends)
    long_mm, short_mm, k, ((r0, c0), (r1, c1)) = best
    return Measurement(
        long_axis_mm=long_mm,
        short_axis_mm=short_mm,
        volume_ml=volume_ml,
        slice_index=k,
        long_axis_endpoints_kji=((float(k), r0, c0), (float(k), r1, c1)),
    )


def connected_lesions(mask: npt.NDArray[np.bool_], min_voxels: int = 1) -> list[npt.NDArray[np.bool_]]:
    """Split a binary mask into 26-connected components of at least ``min_voxels`` voxels,
    largest first."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    counts = np.bincount(labels.ravel())[1:]
    order = np.argsort(-counts, kind="stable")
    return [labels == (idx + 1) for idx in order if counts[idx] >= min_voxels]
