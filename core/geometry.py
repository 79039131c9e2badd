"""RECIST geometry on voxel masks: long axis, perpendicular short axis, volume.

Measurements are made in the axial plane, slice by slice (RECIST 1.1 measures on axial images), on the
lesion's outline found to a fraction of a pixel: the mask is smoothed (Gaussian, 0.85 pixel), upsampled 4x and
cut at the level that keeps its area (its pixel count), and the calipers are taken on that outline's convex hull.
On 400 random rasterized ellipses of 5-40 mm at 0.7-2.1 mm pixels (``tests/unit/test_geometry.py``) the long
axis then measures -0.10, +0.03 and +0.11 pixel off on average for lesions under 6, 6-15 and over 15 pixels
long (SD 0.23-0.31 pixel), the short axis +0.09 to +0.18. Taking the hull of the boundary pixels' edge midpoints,
as this module did before, measured the long axis +0.17 to +0.46 pixel long (up to +0.9 mm at 2.1 mm pixels:
enough to flip a RECIST threshold). Those edge midpoints remain the outline of masks too small to smooth (fewer
than ``_MIN_SMOOTHED_PIXELS`` pixels). Outlining costs about 2 ms per slice of a 50 mm lesion.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from core.types import Measurement

__all__ = ["connected_lesions", "measure_mask", "slice_diameters"]

_EDGE_OFFSETS = np.array([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]])
_SMOOTH_PX = 0.85  # Gaussian sigma of the sub-pixel outline, in pixels
_UPSAMPLE = 4  # the smoothed mask is cut at its area-keeping level on a grid this many times finer
_PAD = 3  # pixels of background around a mask before smoothing
_MIN_SMOOTHED_PIXELS = 3


def _reduce_to_hull(pts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    if len(pts) < 3:
        return pts
    try:
        hull = ConvexHull(pts)
    except QhullError:  # collinear points: a one-pixel-wide line
        return pts
    return np.asarray(pts[hull.vertices], dtype=np.float64)


def _hull_points(mask2d: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """Edge midpoints of the boundary pixels, in (row, col) pixel units, reduced to their hull."""
    boundary = mask2d & ~ndimage.binary_erosion(mask2d)
    rc = np.argwhere(boundary).astype(float)
    pts = (rc[:, None, :] + _EDGE_OFFSETS[None, :, :]).reshape(-1, 2)
    return _reduce_to_hull(np.unique(pts, axis=0))


def _outline_points(mask2d: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """The mask's outline to a fraction of a pixel, in (row, col) pixel units, reduced to its hull.

    The mask (cropped, padded) is smoothed, upsampled ``_UPSAMPLE`` times (linear) and cut at the level above
    which exactly as many fine cells lie as the mask has pixels: the outline keeps the mask's area, so smoothing
    does not shrink a small lesion. The outline is where that level is crossed along the fine rows and columns
    (linear interpolation). Masks too small to smooth keep the edge midpoints of ``_hull_points``.
    """
    count = int(mask2d.sum())
    if count < _MIN_SMOOTHED_PIXELS:
        return _hull_points(mask2d)
    rows, cols = np.flatnonzero(mask2d.any(axis=1)), np.flatnonzero(mask2d.any(axis=0))
    crop = mask2d[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    smooth = ndimage.gaussian_filter(np.pad(crop.astype(np.float64), _PAD), _SMOOTH_PX)
    fine = ndimage.zoom(smooth, _UPSAMPLE, order=1, grid_mode=True, mode="nearest")
    keep = count * _UPSAMPLE * _UPSAMPLE
    level = float(np.partition(fine.ravel(), fine.size - keep)[fine.size - keep])
    above = fine >= level
    pts = []
    for ax in (0, 1):
        head = (slice(None, -1), slice(None)) if ax == 0 else (slice(None), slice(None, -1))
        tail = (slice(1, None), slice(None)) if ax == 0 else (slice(None), slice(1, None))
        a, b = fine[head], fine[tail]
        crossing = above[head] != above[tail]
        at = np.argwhere(crossing).astype(np.float64)
        at[:, ax] += (level - a[crossing]) / (b[crossing] - a[crossing])
        pts.append(at)
    fine_rc = np.concatenate(pts)
    if len(fine_rc) < 3:
        return _hull_points(mask2d)
    offset = np.array([rows[0] - _PAD, cols[0] - _PAD], dtype=np.float64)
    return _reduce_to_hull((fine_rc + 0.5) / _UPSAMPLE - 0.5 + offset)


def _longest_perpendicular_chord(poly_uv: npt.NDArray[np.float64]) -> float:
    """Longest chord of a convex polygon (ordered vertices, u along the long axis) parallel to v, over 129
    evenly spaced positions along u: at each, the spread of v where the polygon's edges cross it (both ends of
    an edge that lies on it). All positions and edges at once; each value is computed as a loop would."""
    u = poly_uv[:, 0]
    v = poly_uv[:, 1]
    u0 = np.linspace(u.min(), u.max(), 129)[:, None]
    ua, ub = u[None, :], np.roll(u, -1)[None, :]
    va, vb = v[None, :], np.roll(v, -1)[None, :]
    crossing = ((ua - u0) * (ub - u0) <= 0) & (ua != ub)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (u0 - ua) / (ub - ua)
    at = va + t * (vb - va)
    on_edge = (ua == ub) & (ua == u0)  # an edge along v at this position: both its ends
    hi = np.maximum(
        np.where(crossing, at, -np.inf).max(axis=1),
        np.where(on_edge, np.maximum(va, vb), -np.inf).max(axis=1),
    )
    lo = np.minimum(
        np.where(crossing, at, np.inf).min(axis=1),
        np.where(on_edge, np.minimum(va, vb), np.inf).min(axis=1),
    )
    counted = crossing.sum(axis=1) + 2 * on_edge.sum(axis=1) >= 2
    return float(max(0.0, (hi - lo)[counted].max(initial=0.0)))


@dataclass(frozen=True, slots=True)
class _LongAxis:
    """The long axis of one axial mask: its length, its ends (indices into ``pts``), the hull points in pixel
    units (row, col) and in mm."""

    long_mm: float
    a: int
    b: int
    pts: npt.NDArray[np.float64]
    mm: npt.NDArray[np.float64]

    @property
    def ends(self) -> tuple[tuple[float, float], tuple[float, float]]:
        pa, pb = self.pts[self.a], self.pts[self.b]
        return ((float(pa[0]), float(pa[1])), (float(pb[0]), float(pb[1])))


def _long_axis(mask2d: npt.NDArray[np.bool_], row_spacing_mm: float, col_spacing_mm: float) -> _LongAxis:
    """The longest distance (mm) between two points of a non-empty axial mask's outline (0 for a single point)."""
    pts = _outline_points(mask2d)
    mm = pts * np.array([row_spacing_mm, col_spacing_mm])
    if len(mm) < 2:
        return _LongAxis(0.0, 0, 0, pts, mm)
    dr = mm[:, None, 0] - mm[None, :, 0]
    dc = mm[:, None, 1] - mm[None, :, 1]
    squared = dr * dr + dc * dc  # the longest pair by squared length: no square root over every pair
    a, b = np.unravel_index(int(np.argmax(squared)), squared.shape)
    return _LongAxis(float(np.sqrt(squared[a, b])), int(a), int(b), pts, mm)


def _short_axis(axis: _LongAxis) -> float:
    """The longest chord of the hull perpendicular to the long axis (mm), at most the long axis."""
    mm, long_mm = axis.mm, axis.long_mm
    if len(mm) < 3 or long_mm == 0.0:
        return 0.0
    direction = (mm[axis.b] - mm[axis.a]) / long_mm
    perp = np.array([-direction[1], direction[0]])
    uv = np.stack([(mm - mm[axis.a]) @ direction, (mm - mm[axis.a]) @ perp], axis=1)
    try:
        order = ConvexHull(uv).vertices
    except QhullError:
        return 0.0
    return min(_longest_perpendicular_chord(uv[order]), long_mm)


def slice_diameters(
    mask2d: npt.NDArray[np.bool_], row_spacing_mm: float, col_spacing_mm: float
) -> tuple[float, float, tuple[tuple[float, float], tuple[float, float]]]:
    """Long and perpendicular short diameter (mm) of one axial mask, and the long axis ends (row, col).

    The short diameter is the longest chord of the convex hull perpendicular to the long axis.
    """
    if not mask2d.any():
        return 0.0, 0.0, ((0.0, 0.0), (0.0, 0.0))
    axis = _long_axis(mask2d, row_spacing_mm, col_spacing_mm)
    return axis.long_mm, _short_axis(axis), axis.ends


def measure_mask(mask: npt.NDArray[np.bool_], spacing_kji_mm: tuple[float, float, float]) -> Measurement:
    """RECIST measurement of one lesion given as a 3-D boolean mask on a ``[k, j, i]`` grid.

    The long axis is the longest over the axial slices (the first such slice on a tie); the short axis is
    measured on that slice only, as ``slice_diameters`` would measure it there.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3-D, got {mask.ndim}-D")
    sz, sy, sx = spacing_kji_mm
    voxel_ml = sz * sy * sx / 1000.0
    volume_ml = float(mask.sum()) * voxel_ml
    best: _LongAxis | None = None
    k = 0
    for kk in np.flatnonzero(mask.any(axis=(1, 2))):
        axis = _long_axis(mask[kk], sy, sx)
        if axis.long_mm > (best.long_mm if best else 0.0):
            best, k = axis, int(kk)
    if best is None:
        long_mm, short_mm, ((r0, c0), (r1, c1)) = 0.0, 0.0, ((0.0, 0.0), (0.0, 0.0))
    else:
        long_mm, short_mm, ((r0, c0), (r1, c1)) = best.long_mm, _short_axis(best), best.ends
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
