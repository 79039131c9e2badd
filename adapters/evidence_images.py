"""Key images of a stored analysis, drawn on the server as PNG (numpy + scipy + matplotlib).

- The lesion's key axial slice (the slice of its RECIST long axis) from the study's own volume, windowed for
  the organ, with the lesion's contour from the saved label map (``adapters.artifacts``), its long axis, and
  the saliency map as an overlay when the analysis saved one.
- The matched prior slice, found through the prior lesion's centroid in the prior study's own frame, marked
  with a circle of the prior long axis.
- The course chart (``adapters.charts.draw_course``) as PNG bytes.

Images are shown in the radiological convention: patient's right on the image's left, anterior up. Voxel
indices are (k, j, i); positions in mm are LPS.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from scipy import ndimage

from adapters.charts import CoursePoint, draw_course
from core.types import LabelId, Volume

__all__ = ["course_png", "key_slice_png", "prior_slice_png"]

Window = tuple[float, float]  # (centre, width) in HU
_WINDOWS: dict[str, Window] = {"lung": (-600.0, 1500.0), "default": (40.0, 400.0)}
_CONTOUR = (255, 214, 0)
_AXIS = (0, 220, 255)
_PRIOR = (255, 120, 0)
FULL_PX = 384
THUMB_PX = 112
THUMB_HALF_MM = 40.0
FULL_HALF_MM = 75.0  # the key image shows 15 cm around the lesion: its surroundings, at a readable size


def _window(organ: str) -> Window:
    return _WINDOWS.get(organ, _WINDOWS["default"])


def _gray(hu: npt.NDArray[Any], window: Window) -> npt.NDArray[np.float64]:
    centre, width = window
    return np.clip((hu.astype(np.float64) - (centre - width / 2)) / width, 0.0, 1.0)


def _flips(direction: Sequence[Sequence[float]]) -> tuple[bool, bool]:
    """(flip rows, flip columns) that bring an axis-aligned axial slice to anterior-up, patient-right-left."""
    d = np.asarray(direction, dtype=float)
    return bool(d[1, 1] < 0), bool(d[0, 0] < 0)


@dataclass(frozen=True)
class _Canvas:
    """A slice resampled to square display pixels; ``scale`` display px per voxel along (j, i)."""

    rgb: npt.NDArray[np.uint8]
    scale_ji: tuple[float, float]
    offset_ji: tuple[int, int]  # voxel (j, i) of the canvas' top-left corner (after cropping)
    flips: tuple[bool, bool]
    shape_ji: tuple[int, int]  # the cropped slice's shape in voxels

    def to_px(self, j: float, i: float) -> tuple[float, float]:
        jj, ii = j - self.offset_ji[0], i - self.offset_ji[1]
        if self.flips[0]:
            jj = self.shape_ji[0] - 1 - jj
        if self.flips[1]:
            ii = self.shape_ji[1] - 1 - ii
        return (jj + 0.5) * self.scale_ji[0] - 0.5, (ii + 0.5) * self.scale_ji[1] - 0.5


def _crop_box(
    shape_ji: tuple[int, int], spacing_ji: tuple[float, float], centre_ji: tuple[float, float], half_mm: float
) -> tuple[slice, slice]:
    out = []
    for axis in range(2):
        half = max(round(half_mm / spacing_ji[axis]), 4)
        lo = round(centre_ji[axis]) - half
        lo = min(max(lo, 0), max(shape_ji[axis] - 2 * half, 0))
        out.append(slice(lo, min(lo + 2 * half, shape_ji[axis])))
    return out[0], out[1]


def _canvas(
    hu: npt.NDArray[Any],
    spacing_ji: tuple[float, float],
    window: Window,
    direction: Sequence[Sequence[float]],
    out_px: int,
    box: tuple[slice, slice] | None,
) -> tuple[_Canvas, tuple[slice, slice]]:
    box = box or (slice(0, hu.shape[0]), slice(0, hu.shape[1]))
    part = hu[box]
    flips = _flips(direction)
    gray = _gray(part, window)
    if flips[0]:
        gray = gray[::-1]
    if flips[1]:
        gray = gray[:, ::-1]
    extent_mm = (part.shape[0] * spacing_ji[0], part.shape[1] * spacing_ji[1])
    px_per_mm = out_px / max(extent_mm)
    zoom = (spacing_ji[0] * px_per_mm, spacing_ji[1] * px_per_mm)
    big = ndimage.zoom(gray, zoom, order=1, grid_mode=True, mode="nearest")
    rgb = np.repeat((big * 255).astype(np.uint8)[..., None], 3, axis=2)
    scale = (big.shape[0] / part.shape[0], big.shape[1] / part.shape[1])
    offset = (box[0].start or 0, box[1].start or 0)
    return _Canvas(rgb, scale, offset, flips, (part.shape[0], part.shape[1])), box


def _mask_on(canvas: _Canvas, mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    m = mask[::-1] if canvas.flips[0] else mask
    m = m[:, ::-1] if canvas.flips[1] else m
    big: npt.NDArray[np.bool_] = (
        ndimage.zoom(m.astype(np.uint8), canvas.scale_ji, order=0, grid_mode=True, mode="nearest") > 0
    )
    h, w = canvas.rgb.shape[:2]
    out = np.zeros((h, w), dtype=bool)
    out[: min(h, big.shape[0]), : min(w, big.shape[1])] = big[:h, :w]
    return out


def _paint(canvas: _Canvas, where: npt.NDArray[np.bool_], colour: tuple[int, int, int]) -> None:
    canvas.rgb[where] = colour


def _draw_contour(canvas: _Canvas, mask: npt.NDArray[np.bool_], colour: tuple[int, int, int]) -> None:
    big = _mask_on(canvas, mask)
    edge = big & ~ndimage.binary_erosion(big, iterations=2)
    _paint(canvas, edge, colour)


def _draw_line(canvas: _Canvas, a_ji: tuple[float, float], b_ji: tuple[float, float]) -> None:
    (y0, x0), (y1, x1) = canvas.to_px(*a_ji), canvas.to_px(*b_ji)
    n = int(max(abs(y1 - y0), abs(x1 - x0)) * 2) + 2
    h, w = canvas.rgb.shape[:2]
    for t in np.linspace(0.0, 1.0, n):
        y, x = round(y0 + t * (y1 - y0)), round(x0 + t * (x1 - x0))
        if 0 <= y < h and 0 <= x < w:
            canvas.rgb[y, x] = _AXIS


def _draw_circle(canvas: _Canvas, centre_ji: tuple[float, float], radius_px: float, dashed: bool) -> None:
    cy, cx = canvas.to_px(*centre_ji)
    h, w = canvas.rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(yy - cy, xx - cx)
    ring = np.abs(dist - radius_px) <= 1.2
    if dashed:
        ring &= (np.floor(np.degrees(np.arctan2(yy - cy, xx - cx)) / 15.0) % 2) == 0
    _paint(canvas, ring, _PRIOR)


def _overlay(canvas: _Canvas, heat: npt.NDArray[Any]) -> None:
    h = np.clip(np.asarray(heat, dtype=np.float64), 0.0, 1.0)
    h = h[::-1] if canvas.flips[0] else h
    h = h[:, ::-1] if canvas.flips[1] else h
    big = ndimage.zoom(h, canvas.scale_ji, order=1, grid_mode=True, mode="nearest")
    rows, cols = min(big.shape[0], canvas.rgb.shape[0]), min(big.shape[1], canvas.rgb.shape[1])
    big = big[:rows, :cols]
    colours = colormaps["inferno"](big)[..., :3] * 255
    alpha = (0.55 * big)[..., None]
    base = canvas.rgb[:rows, :cols].astype(np.float64)
    canvas.rgb[:rows, :cols] = (base * (1 - alpha) + colours * alpha).astype(np.uint8)


def _png(rgb: npt.NDArray[np.uint8]) -> bytes:
    buf = io.BytesIO()
    mpimg.imsave(buf, rgb, format="png")
    return buf.getvalue()


def _component(labels_2d: npt.NDArray[Any], near_ji: tuple[float, float]) -> npt.NDArray[np.bool_]:
    """The lesion-labelled connected region on a slice that contains (or lies nearest) ``near_ji``."""
    lesion: npt.NDArray[np.bool_] = np.asarray(labels_2d == LabelId.LESION)
    regions, n = ndimage.label(lesion)
    if n == 0:
        return lesion
    j = int(np.clip(round(near_ji[0]), 0, lesion.shape[0] - 1))
    i = int(np.clip(round(near_ji[1]), 0, lesion.shape[1] - 1))
    if regions[j, i]:
        chosen = int(regions[j, i])
    else:
        jj, ii = np.nonzero(regions)
        nearest = int(np.argmin((jj - near_ji[0]) ** 2 + (ii - near_ji[1]) ** 2))
        chosen = int(regions[jj[nearest], ii[nearest]])
    mask: npt.NDArray[np.bool_] = regions == chosen
    return mask


def key_slice_png(
    volume: Volume,
    lesion: dict[str, Any],
    *,
    labels: npt.NDArray[Any] | None = None,
    saliency: npt.NDArray[Any] | None = None,
    expected_lps_mm: tuple[float, float, float] | None = None,
    expected_radius_mm: float = 0.0,
    thumb: bool = False,
) -> bytes | None:
    """The lesion's key axial slice with its contour and long axis (``lesion`` is a ``report.json`` lesion).

    A lesion not seen on this study (no ``current``) is drawn at ``expected_lps_mm`` (its prior position
    mapped into this study) with a dashed circle; None when there is nothing to show.
    """
    current = lesion.get("current")
    spacing_ji = (volume.spacing_kji_mm[1], volume.spacing_kji_mm[2])
    window = _window(str(lesion.get("organ")))
    if current is not None:
        k = int(current["slice_index"])
        ends = [tuple(float(v) for v in e) for e in current["long_axis_endpoints_kji"]]
        centre = ((ends[0][1] + ends[1][1]) / 2, (ends[0][2] + ends[1][2]) / 2)
    elif expected_lps_mm is not None and volume.contains_lps(expected_lps_mm):
        kji = volume.lps_to_kji(expected_lps_mm)
        k, centre, ends = round(kji[0]), (float(kji[1]), float(kji[2])), []
    else:
        return None
    k = int(np.clip(k, 0, volume.shape[0] - 1))
    box = _crop_box(volume.shape[1:], spacing_ji, centre, THUMB_HALF_MM if thumb else FULL_HALF_MM)
    canvas, box = _canvas(
        volume.voxels_hu[k], spacing_ji, window, volume.direction_lps, THUMB_PX if thumb else FULL_PX, box
    )
    if saliency is not None and saliency.shape == volume.shape and not thumb:
        _overlay(canvas, saliency[k][box])
    if current is not None and labels is not None and labels.shape == volume.shape:
        mask = _component(labels[k], centre)
        _draw_contour(canvas, mask[box], _CONTOUR)
    if len(ends) == 2 and not thumb:
        _draw_line(canvas, (ends[0][1], ends[0][2]), (ends[1][1], ends[1][2]))
    if current is None:
        _draw_circle(canvas, centre, _radius_px(canvas, spacing_ji, expected_radius_mm), dashed=True)
    return _png(canvas.rgb)


def _radius_px(canvas: _Canvas, spacing_ji: tuple[float, float], radius_mm: float) -> float:
    return max(radius_mm, 6.0) / spacing_ji[1] * canvas.scale_ji[1] + 3.0


def prior_slice_png(
    volume: Volume,
    centre_lps_mm: tuple[float, float, float],
    *,
    organ: str,
    radius_mm: float,
    thumb: bool = False,
    seen: bool = True,
) -> bytes | None:
    """The prior study's axial slice through ``centre_lps_mm`` (in the prior's own frame), circled (dashed
    when the lesion was not reported there: the position where a new lesion would have been)."""
    if not volume.contains_lps(centre_lps_mm, margin_voxels=2.0):
        return None
    kji = volume.lps_to_kji(centre_lps_mm)
    k = int(np.clip(round(kji[0]), 0, volume.shape[0] - 1))
    centre = (float(kji[1]), float(kji[2]))
    spacing_ji = (volume.spacing_kji_mm[1], volume.spacing_kji_mm[2])
    box = _crop_box(volume.shape[1:], spacing_ji, centre, THUMB_HALF_MM if thumb else FULL_HALF_MM)
    canvas, _ = _canvas(
        volume.voxels_hu[k],
        spacing_ji,
        _window(organ),
        volume.direction_lps,
        THUMB_PX if thumb else FULL_PX,
        box,
    )
    _draw_circle(canvas, centre, _radius_px(canvas, spacing_ji, radius_mm), dashed=not seen)
    return _png(canvas.rgb)


def course_png(points: Sequence[CoursePoint], title: str = "Sum of target diameters") -> bytes | None:
    """``draw_course`` as PNG bytes; None when no time point has a target sum."""
    with tempfile.TemporaryDirectory(prefix="interval-course-") as folder:
        paths = draw_course(points, Path(folder) / "course", title=title)
        png = next((p for p in paths if p.suffix == ".png"), None)
        return png.read_bytes() if png is not None else None
