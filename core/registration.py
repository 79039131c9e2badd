"""Rigid alignment of a prior CT to the current one (translation), fast on CPU.

Patients lie differently and the table starts elsewhere, so the same lesion has other LPS
coordinates at each visit. Both volumes are resampled to a coarse isotropic grid in LPS, windowed
so that air, lung, soft tissue and bone separate, and the translation is the peak of their
FFT cross-correlation, refined to sub-voxel by a parabola through the peak. Rotation about the
long axis of a few degrees is left to the matcher's gate. Only axial, axis-aligned volumes
(identity or flipped direction cosines) are supported; others raise ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from core.types import Volume

__all__ = ["Alignment", "estimate_translation"]


@dataclass(frozen=True, slots=True)
class Alignment:
    """``current_lps = prior_lps + translation_lps_mm``; ``score`` is the normalized correlation."""

    translation_lps_mm: tuple[float, float, float]
    score: float
    method: str

    def apply(self, p: tuple[float, float, float]) -> tuple[float, float, float]:
        t = self.translation_lps_mm
        return (p[0] + t[0], p[1] + t[1], p[2] + t[2])


def _to_grid(vol: Volume, step_mm: float) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Resample to ``step_mm`` on LPS-aligned axes (z, y, x); return the array and its LPS origin."""
    d = np.asarray(vol.direction_lps, dtype=float)
    if not np.allclose(np.abs(d), np.eye(3), atol=1e-3):
        raise ValueError("registration supports axis-aligned axial volumes only")
    arr = np.clip((vol.voxels_hu.astype(np.float64) + 1000.0) / 1400.0, 0.0, 1.0)
    # flip axes whose direction is negative so that indices grow with LPS coordinates
    for axis_ijk in range(3):
        if d[axis_ijk, axis_ijk] < 0:
            arr = np.flip(arr, axis=2 - axis_ijk)
    zoom = [s / step_mm for s in vol.spacing_kji_mm]
    small = ndimage.zoom(arr, zoom, order=1)
    corners = vol.kji_to_lps(np.array([[0, 0, 0], [s - 1 for s in vol.shape]], dtype=float))
    origin = corners.min(axis=0)
    return small, origin


def _xcorr(
    fa: npt.NDArray[np.complex128], fb: npt.NDArray[np.complex128], shape: list[int]
) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = np.fft.irfftn(fa * np.conj(fb), shape, axes=(0, 1, 2))
    return out


def estimate_translation(
    current: Volume, prior: Volume, step_mm: float = 4.0, min_overlap: float = 0.3
) -> Alignment:
    """Translation mapping prior LPS to current LPS by masked normalized cross-correlation
    (Padfield 2012): the correlation at each shift uses only the voxels where both volumes
    overlap, so that partial scan ranges do not bias the peak."""
    a, oa = _to_grid(current, step_mm)
    b, ob = _to_grid(prior, step_mm)
    shape = [sa + sb for sa, sb in zip(a.shape, b.shape, strict=True)]
    ones_a, ones_b = np.ones_like(a), np.ones_like(b)
    fa, fb = np.fft.rfftn(a, shape, axes=(0, 1, 2)), np.fft.rfftn(b, shape, axes=(0, 1, 2))
    fa2, fb2 = np.fft.rfftn(a * a, shape, axes=(0, 1, 2)), np.fft.rfftn(b * b, shape, axes=(0, 1, 2))
    fma, fmb = np.fft.rfftn(ones_a, shape, axes=(0, 1, 2)), np.fft.rfftn(ones_b, shape, axes=(0, 1, 2))
    n = np.maximum(np.rint(_xcorr(fma, fmb, shape)), 1.0)
    sum_a = _xcorr(fa, fmb, shape)
    sum_b = _xcorr(fma, fb, shape)
    num = _xcorr(fa, fb, shape) - sum_a * sum_b / n
    var_a = np.maximum(_xcorr(fa2, fmb, shape) - sum_a**2 / n, 0.0)
    var_b = np.maximum(_xcorr(fma, fb2, shape) - sum_b**2 / n, 0.0)
    ncc = num / np.sqrt(var_a * var_b + 1e-9)
    ncc[n < min_overlap * min(a.size, b.size)] = -1.0
    peak = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    sub = []
    for ax, p in enumerate(peak):
        size = ncc.shape[ax]
        idx_m, idx_p = list(peak), list(peak)
        idx_m[ax] = (p - 1) % size
        idx_p[ax] = (p + 1) % size
        c0, cm, cp = ncc[peak], ncc[tuple(idx_m)], ncc[tuple(idx_p)]
        denom = cm - 2 * c0 + cp
        frac = 0.5 * (cm - cp) / denom if denom < 0 else 0.0
        shift = p if p <= size // 2 else p - size
        sub.append(shift + float(np.clip(frac, -0.5, 0.5)))
    shift_zyx_mm = np.array(sub) * step_mm
    # a[q + s] ~ b[q]: the prior point at grid index q lies at index q + s of the current grid
    t = oa - ob + shift_zyx_mm[::-1]
    return Alignment((float(t[0]), float(t[1]), float(t[2])), float(ncc[peak]), f"masked-ncc@{step_mm:g}mm")
