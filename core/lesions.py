"""From a segmentation to measured lesions: instances, organ, side, RECIST measurement."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import ndimage, signal

from core.geometry import measure_mask
from core.recist import NEW_LESION_MIN_AXIS_RATIO
from core.types import DetectedLesion, LabelId, Organ, Segmentation, Volume

__all__ = [
    "CONNECTIVITY",
    "ORGAN_LABEL",
    "ContrastSearch",
    "FaintSearch",
    "LesionFilter",
    "contrast_search",
    "extract_lesions",
    "faint_search",
    "guided_search",
    "laterality_of",
    "lesion_box",
    "mask_box",
    "robust_sd",
]


MIN_LONG_AXIS_MM = 5.0  # RECIST's floor: the lesion filter's default


@dataclass(frozen=True, slots=True)
class LesionFilter:
    """What counts as a lesion: RECIST cannot use anything below 5 mm, and a weak, tiny blob is
    more often noise than disease. Values are settings, reported with every result."""

    min_long_axis_mm: float = MIN_LONG_AXIS_MM
    min_volume_ml: float = 0.1
    min_probability: float = 0.5


def _organ(labels: np.ndarray, comp: np.ndarray) -> Organ:
    shell = ndimage.binary_dilation(comp, structure=np.ones((1, 5, 5), dtype=bool)) & ~comp
    around = labels[shell]
    n = max(int(around.size), 1)
    liver = int(np.count_nonzero(around == LabelId.LIVER)) / n
    lung = int(np.count_nonzero(around == LabelId.LUNG)) / n
    if liver >= 0.3 and liver >= lung:
        return Organ.LIVER
    if lung >= 0.3:
        return Organ.LUNG
    return Organ.LYMPH_NODE


def laterality_of(volume: Volume, kji: tuple[float, float, float]) -> str:
    """Patient side of a point: left or right of the body's midline on its slice."""
    k = round(kji[0])
    body = volume.voxels_hu[k] > -400.0
    cols = np.flatnonzero(body.any(axis=0))
    mid_i = (cols[0] + cols[-1]) / 2.0 if cols.size else volume.shape[2] / 2.0
    mid = volume.kji_to_lps([kji[0], kji[1], mid_i])
    pt = volume.kji_to_lps(list(kji))
    return "left" if pt[0] > mid[0] else "right"  # LPS: +x is the patient's left


def _place(
    volume: Volume, comp: np.ndarray, start_kji: Sequence[int], organ: Organ, probability: float
) -> DetectedLesion:
    """Measure a component cropped at ``start_kji`` and express it in the whole volume."""
    offset = np.asarray(start_kji, dtype=float)
    m = measure_mask(comp, volume.spacing_kji_mm)
    e0, e1 = m.long_axis_endpoints_kji
    m = replace(
        m,
        slice_index=m.slice_index + int(start_kji[0]),
        long_axis_endpoints_kji=(_vec(np.add(e0, offset)), _vec(np.add(e1, offset))),
    )
    idx = np.argwhere(comp)
    k, j, i = (float(v) for v in idx.mean(axis=0) + offset)
    c = volume.kji_to_lps([k, j, i])
    lo, hi = idx.min(axis=0) + np.asarray(start_kji), idx.max(axis=0) + np.asarray(start_kji) + 1
    return DetectedLesion(
        lesion_id=0,
        organ=organ,
        centroid_lps_mm=(float(c[0]), float(c[1]), float(c[2])),
        measurement=m,
        probability=probability,
        voxel_count=int(comp.sum()),
        laterality=laterality_of(volume, (k, j, i)) if organ is Organ.LUNG else None,
        box_kji=((int(lo[0]), int(hi[0])), (int(lo[1]), int(hi[1])), (int(lo[2]), int(hi[2]))),
    )


CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # lesion voxels touching by a face, edge or corner: one lesion


def mask_box(mask: npt.NDArray[np.bool_], margin: int = 0) -> tuple[slice, ...] | None:
    """The bounding box of ``mask``'s voxels widened by ``margin`` voxels (within the array); None when empty."""
    box = []
    for axis, n in enumerate(mask.shape):  # one projection per axis: no index array of every voxel
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, n)))
    return tuple(box)


def robust_sd(values: npt.NDArray[np.floating], level: float) -> float:
    """The median absolute deviation from ``level``, scaled to a Gaussian's SD (a lesion or vessel among the values
    moves it little)."""
    return float(np.median(np.abs(values - level))) * 1.4826


def lesion_box(
    labels: npt.NDArray[np.uint8], margin: int | tuple[int, int, int] = 0, slab: int = 8
) -> tuple[slice, ...] | None:
    """The bounding box of the lesion label in a label map, widened by ``margin`` voxels (per axis when a tuple;
    within the array), None when there is none. Found ``slab`` slices at a time: no lesion mask of the whole series
    is made (a fresh 31 MB array costs ~60 ms of page faults on a 512 series on the benchmark machine)."""
    slices = np.zeros(labels.shape[0], dtype=bool)
    rows = np.zeros(labels.shape[1], dtype=bool)
    cols = np.zeros(labels.shape[2], dtype=bool)
    for k in range(0, labels.shape[0], slab):
        part = labels[k : k + slab] == LabelId.LESION
        slices[k : k + slab] = part.any(axis=(1, 2))
        rows |= part.any(axis=(0, 2))
        cols |= part.any(axis=(0, 1))
    if not slices.any():
        return None
    margins = (margin,) * 3 if isinstance(margin, int) else margin
    return tuple(
        slice(max(int(h[0]) - m, 0), min(int(h[-1]) + 1 + m, n))
        for h, m, n in zip(
            (np.flatnonzero(a) for a in (slices, rows, cols)), margins, labels.shape, strict=True
        )
    )


def extract_lesions(
    volume: Volume, seg: Segmentation, keep: LesionFilter = LesionFilter()
) -> list[DetectedLesion]:
    """Connected lesion components that pass ``keep``, measured and placed, largest first."""
    out: list[DetectedLesion] = []
    # label only the box around all lesion voxels (plus the 3-voxel margin each lesion gets below): the same
    # components as labelling the whole volume, in a fraction of the time on a 512 x 512 series
    crop = lesion_box(seg.labels, margin=3)
    if crop is None:
        return out
    lo = [s.start for s in crop]
    comps, _ = ndimage.label(seg.labels[crop] == LabelId.LESION, structure=CONNECTIVITY)
    boxes = ndimage.find_objects(comps)
    sz, sy, sx = volume.spacing_kji_mm
    voxel_ml = sz * sy * sx / 1000.0
    for idx, box in enumerate(boxes, start=1):
        if box is None:
            continue
        local = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in box)
        pad = tuple(slice(a + s.start, a + s.stop) for a, s in zip(lo, local, strict=True))
        comp = comps[local] == idx
        count = int(comp.sum())
        if count * voxel_ml < keep.min_volume_ml:
            continue
        # the probability is the model's: over the voxels it drew, not those the edge refinement added
        own = comp if seg.refined is None else comp & ~seg.refined[pad]
        prob = float(seg.lesion_probability[pad][own if own.any() else comp].mean())
        if prob < keep.min_probability:
            continue
        found = _place(volume, comp, [sl.start for sl in pad], _organ(seg.labels[pad], comp), prob)
        if found.measurement.long_axis_mm >= keep.min_long_axis_mm:
            out.append(found)
    out.sort(key=lambda d: -d.measurement.long_axis_mm)
    return [replace(d, lesion_id=i + 1) for i, d in enumerate(out)]


def _nearest_blob(
    volume: Volume,
    blobs: Iterable[npt.NDArray[np.bool_]],
    start_kji: Sequence[int],
    expected_lps_mm: tuple[float, float, float],
    avoid_lps_mm: list[tuple[float, float, float]],
) -> npt.NDArray[np.bool_] | None:
    """Of blobs on a crop starting at ``start_kji``, the one whose centroid lies nearest the expected position (the
    first on a tie), leaving out another detected lesion's (a centroid within 5 mm of one in ``avoid_lps_mm``)."""
    best: tuple[float, npt.NDArray[np.bool_]] | None = None
    for blob in blobs:
        c_lps = volume.kji_to_lps(np.argwhere(blob).mean(axis=0) + np.asarray(start_kji, dtype=float))
        if any(np.linalg.norm(c_lps - np.asarray(a)) < 5.0 for a in avoid_lps_mm):
            continue
        d = float(np.linalg.norm(c_lps - np.asarray(expected_lps_mm)))
        if best is None or d < best[0]:
            best = (d, blob)
    return None if best is None else best[1]


def guided_search(
    volume: Volume,
    seg: Segmentation,
    expected_lps_mm: tuple[float, float, float],
    organ: Organ,
    avoid_lps_mm: list[tuple[float, float, float]],
    radius_mm: float = 12.0,
    min_probability: float = 0.3,
    min_long_axis_mm: float = 3.0,
) -> DetectedLesion | None:
    """Look again where a known lesion should be, as a radiologist does with the prior beside.

    A prior lesion that the detector missed on this study is searched for within ``radius_mm`` of
    its aligned position, at a lower probability threshold. The nearest blob is returned (or None)
    unless it is another detected lesion (a centroid in ``avoid_lps_mm`` within 5 mm).
    """
    centre = volume.lps_to_kji(expected_lps_mm)
    r_vox = [radius_mm / s for s in volume.spacing_kji_mm]
    lo = [max(0, int(np.floor(c - r))) for c, r in zip(centre, r_vox, strict=True)]
    hi = [min(n, int(np.ceil(c + r)) + 1) for c, r, n in zip(centre, r_vox, volume.shape, strict=True)]
    if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
        return None
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grid = np.stack(
        np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi, strict=True)], indexing="ij"), axis=-1
    )
    dist_mm = np.linalg.norm((grid - centre) * np.asarray(volume.spacing_kji_mm), axis=-1)
    cand = (seg.lesion_probability[box] >= min_probability) & (dist_mm <= radius_mm)
    comps, n = ndimage.label(cand, structure=np.ones((3, 3, 3), dtype=bool))
    comp = _nearest_blob(volume, (comps == idx for idx in range(1, n + 1)), lo, expected_lps_mm, avoid_lps_mm)
    if comp is None:
        return None
    hit = _place(volume, comp, lo, organ, float(seg.lesion_probability[box][comp].mean()))
    return hit if hit.measurement.long_axis_mm >= min_long_axis_mm else None


# the organs the image looks search, and their label: the organ's own level is the lesion's background
ORGAN_LABEL = {Organ.LIVER: LabelId.LIVER, Organ.LUNG: LabelId.LUNG}


@dataclass(frozen=True, slots=True)
class ContrastSearch:
    """The image-contrast second look (``contrast_search``): where to look, how strong the contrast must be."""

    radius_mm: float = 12.0  # around the prior lesion's aligned position
    context_mm: float = 30.0  # the organ around it that sets the background level and its noise
    smooth_mm: float = 1.0  # Gaussian sigma before thresholding, in plane (one voxel across slices at most)
    seed_sd: float = 4.0  # seed voxels differ from the background by this many noise SDs (after smoothing)
    min_contrast_hu: float = 25.0  # and by at least this many HU
    min_seed_voxels: int = 3
    # narrower than this (short / long axis), what the growth found is a vessel or the pleura it ran into: refused,
    # as a band-like new finding is not called a lesion (``core.recist.NEW_LESION_MIN_AXIS_RATIO``)
    min_axis_ratio: float = NEW_LESION_MIN_AXIS_RATIO


class _OrganAround(NamedTuple):
    spacing: npt.NDArray[np.float64]
    lo: npt.NDArray[np.int_]  # the box's first voxel
    box: tuple[slice, ...]
    inside: npt.NDArray[np.bool_]  # the organ as the model labels it, with its lesions
    # away from its edge, where partial volume with the neighbours reads as contrast
    core: npt.NDArray[np.bool_]
    dist_mm: npt.NDArray[np.float64]  # each voxel's distance from the expected position


def _organ_around(
    volume: Volume,
    seg: Segmentation,
    expected_lps_mm: tuple[float, float, float],
    label: LabelId,
    context_mm: float,
) -> _OrganAround | None:
    """The box of ``context_mm`` around a position and the organ in it; None when the organ is hardly there."""
    spacing = np.asarray(volume.spacing_kji_mm, dtype=float)
    centre = np.asarray(volume.lps_to_kji(expected_lps_mm), dtype=float)
    reach = np.ceil(context_mm / spacing).astype(int)
    lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(centre).astype(int) + reach + 1, volume.shape)
    if np.any(hi <= lo):
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    inside = (seg.labels[box] == label) | (seg.labels[box] == LabelId.LESION)
    if np.count_nonzero(inside) < 50:
        return None
    core = ndimage.binary_erosion(inside, structure=np.ones((1, 3, 3), dtype=bool), iterations=2)
    if np.count_nonzero(core) < 50:
        return None
    grid = np.indices(inside.shape, dtype=float).transpose(1, 2, 3, 0) + lo
    return _OrganAround(spacing, lo, box, inside, core, np.linalg.norm((grid - centre) * spacing, axis=-1))


def contrast_search(
    volume: Volume,
    seg: Segmentation,
    expected_lps_mm: tuple[float, float, float],
    organ: Organ,
    avoid_lps_mm: list[tuple[float, float, float]],
    params: ContrastSearch = ContrastSearch(),
    min_long_axis_mm: float = MIN_LONG_AXIS_MM,
) -> DetectedLesion | None:
    """Look for a known lesion by its contrast to the organ around it, where the model saw nothing.

    A small lesion that shrank can fall under what the detector calls a lesion while it still stands out of its
    organ clearly (a 6 mm liver metastasis 40 HU under the parenchyma at 15 HU of noise). Within ``radius_mm`` of
    the prior lesion's aligned position, inside the organ as the model labels it (liver and lung only: a node
    has no organ whose level could be its background), voxels whose smoothed value differs from the organ's
    median around it by ``seed_sd`` robust SDs and ``min_contrast_hu`` seed a search, either darker or brighter;
    the lesion is the seed component nearest the expected position (not another detected lesion), grown to the
    half of its peak contrast (the edge of a blurred step) within the organ. None when nothing stands out, or
    when what stands out is shorter than ``min_long_axis_mm`` (the site's lesion filter) or band-like.
    """
    label = ORGAN_LABEL.get(organ)
    around = None if label is None else _organ_around(volume, seg, expected_lps_mm, label, params.context_mm)
    if around is None:
        return None
    spacing, lo, box, inside, core_organ, dist = around
    sigma = [
        min(params.smooth_mm / spacing[0], 1.0),
        params.smooth_mm / spacing[1],
        params.smooth_mm / spacing[2],
    ]
    hu = ndimage.gaussian_filter(volume.voxels_hu[box].astype(np.float32), sigma)
    values = hu[core_organ]
    level = float(np.median(values))
    noise = max(robust_sd(values, level), 1.0)
    near = dist <= params.radius_mm
    threshold = max(params.seed_sd * noise, params.min_contrast_hu)
    blobs: list[npt.NDArray[np.bool_]] = []
    for sign in (-1.0, 1.0):
        contrast = sign * (hu - level)
        seeds = (contrast >= threshold) & near & core_organ
        comps, n = ndimage.label(seeds, structure=CONNECTIVITY)
        for idx in range(1, n + 1):
            seed = comps == idx
            if np.count_nonzero(seed) < params.min_seed_voxels:
                continue
            peak = float(np.percentile(contrast[seed], 90))
            grown, _ = ndimage.label((contrast >= peak / 2) & inside, structure=CONNECTIVITY)
            parts = np.unique(grown[seed])
            hit = np.isin(grown, parts[parts > 0])
            if not hit.any():
                continue
            if np.count_nonzero(hit & ~near) > np.count_nonzero(hit & near):
                continue  # most of it lies beyond the search: a larger structure, not this lesion
            blobs.append(hit)
    start = [int(v) for v in lo]
    lesion = _nearest_blob(volume, blobs, start, expected_lps_mm, avoid_lps_mm)
    if lesion is None:
        return None
    found = _place(volume, lesion, start, organ, float(seg.lesion_probability[box][lesion].mean()))
    m = found.measurement
    if m.long_axis_mm < min_long_axis_mm or m.short_axis_mm < params.min_axis_ratio * m.long_axis_mm:
        return None
    return found


@dataclass(frozen=True, slots=True)
class FaintSearch:
    """The matched-filter second look (``faint_search``): which ball sizes are tried, where, at what significance."""

    # around the prior lesion's aligned position (the longitudinal cohort's alignment put it within 3.1 mm)
    radius_mm: float = 4.0
    context_mm: float = 30.0  # the organ around it that says how much a ball's mean varies without a lesion
    exclude_mm: float = 12.0  # and not nearer the position than this plus the ball's radius
    diameters_mm: tuple[float, ...] = (5.0, 7.0, 9.0, 12.0)  # ball sizes, none above the prior's diameter
    # the ball's mean differs from the organ's by this many of the robust SDs it has over the organ around
    min_z: float = 3.8
    min_coverage: float = 0.8  # of the ball inside the organ (an edge ball reads the neighbour as contrast)
    organs: tuple[Organ, ...] = (Organ.LIVER,)  # lung: vessels are bright tubes of a nodule's contrast


def faint_search(
    volume: Volume,
    seg: Segmentation,
    expected_lps_mm: tuple[float, float, float],
    organ: Organ,
    avoid_lps_mm: list[tuple[float, float, float]],
    prior_diameter_mm: float,
    params: FaintSearch = FaintSearch(),
    min_long_axis_mm: float = MIN_LONG_AXIS_MM,
) -> DetectedLesion | None:
    """Look for a known lesion that is too faint for a voxel threshold, by the mean of a ball its size.

    A 7 mm liver metastasis 30-50 HU under the parenchyma at 20-30 HU of grainy noise (a sharp kernel, thick
    slices) has no voxel that stands out of the noise, and the model gives it a probability near zero; averaged
    over its own extent it still differs from the liver clearly. At the prior lesion's aligned position, the mean
    HU of the organ within a ball (``diameters_mm``, each no larger than the prior lesion) is compared with that of
    the same ball everywhere else in the organ around it (``context_mm``, away from the position and from other
    lesions): the test is significant at ``min_z`` of those balls' robust SDs, which carry the grain of the noise
    and the organ's own texture as they are on this series. Only a peak within ``radius_mm`` counts, which keeps
    the chance of a false find at a resolved lesion's place small (2 of 444 lesion-free liver positions of the
    longitudinal cohort, ``interval second-look-nulls``). The lesion is the voxels within the best ball's reach
    whose contrast, smoothed by a quarter of the ball, reaches half of that at its centre, connected to it. None
    when nothing is significant, when what is found is another detected lesion, smaller than ``min_long_axis_mm``
    or band-like.
    """
    label = ORGAN_LABEL.get(organ)
    if label is None or organ not in params.organs:
        return None
    around = _organ_around(volume, seg, expected_lps_mm, label, params.context_mm)
    if around is None:
        return None
    spacing, lo, box, inside, core_organ, dist = around
    labels = seg.labels[box]
    hu = volume.voxels_hu[box].astype(np.float32)
    weight = inside.astype(np.float32)
    others = ndimage.binary_dilation(labels == LabelId.LESION, iterations=2)
    best: tuple[float, float, float, npt.NDArray[np.float64]] | None = None  # z, diameter, contrast, where
    for diameter in params.diameters_mm:
        if diameter > max(prior_diameter_mm, params.diameters_mm[0]):
            continue
        ball = _ball(diameter / 2 / spacing)
        total = float(ball.sum())
        # a ball is symmetric: its correlation is its convolution, by FFT (a 12 mm ball on a thin-slice grid is
        # thousands of taps)
        covered = signal.fftconvolve(weight, ball, mode="same")
        means = signal.fftconvolve(hu * weight, ball, mode="same") / np.maximum(covered, 1e-3)
        valid = core_organ & (covered >= params.min_coverage * total)
        ref = valid & (dist > params.exclude_mm + diameter / 2) & ~others
        near = valid & (dist <= params.radius_mm)
        if np.count_nonzero(ref) < 50 or not near.any():
            continue
        level = float(np.median(means[ref]))
        spread = max(robust_sd(means[ref], level), 1e-3)
        z = np.abs(means - level) / spread
        z[~near] = 0.0
        at = np.unravel_index(int(np.argmax(z)), z.shape)
        if z[at] >= params.min_z and (best is None or z[at] > best[0]):
            best = (float(z[at]), diameter, float(means[at] - level), np.asarray(at, dtype=float))
    if best is None:
        return None
    _, diameter, contrast, peak = best
    # the extent: smoothed by a quarter of the ball (the noise down, the lesion's half-contrast edge kept), the
    # voxels at half the contrast of the lesion's centre, connected to it, within the reach of the ball
    sigma = diameter / 4 / spacing
    smooth = ndimage.gaussian_filter(hu, [min(sigma[0], 1.0), sigma[1], sigma[2]])
    level = float(np.median(smooth[core_organ & ~others]))
    signed = np.sign(contrast) * (smooth - level)
    from_peak = np.linalg.norm(
        (np.indices(hu.shape, dtype=float).transpose(1, 2, 3, 0) - peak) * spacing, axis=-1
    )
    centre_vox = np.unravel_index(
        int(np.argmax(np.where(from_peak <= diameter / 4, signed, -np.inf))), hu.shape
    )
    cand = (signed >= signed[centre_vox] / 2) & inside & (from_peak <= diameter * 0.75)
    comps, _ = ndimage.label(cand, structure=CONNECTIVITY)
    lesion = comps == comps[centre_vox]
    start = [int(v) for v in lo]
    if _nearest_blob(volume, [lesion], start, expected_lps_mm, avoid_lps_mm) is None:
        return None
    found = _place(volume, lesion, start, organ, float(seg.lesion_probability[box][lesion].mean()))
    m = found.measurement
    if m.long_axis_mm < min_long_axis_mm or m.short_axis_mm < NEW_LESION_MIN_AXIS_RATIO * m.long_axis_mm:
        return None
    return found


def _ball(semi_axes_vox: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """A ball (ellipsoid in voxels) of these semi-axes, as a 0/1 kernel (at least its centre voxel)."""
    n = np.ceil(semi_axes_vox).astype(int)
    kk, jj, ii = np.mgrid[-n[0] : n[0] + 1, -n[1] : n[1] + 1, -n[2] : n[2] + 1]
    r = np.maximum(semi_axes_vox, 0.5)
    return np.asarray((kk / r[0]) ** 2 + (jj / r[1]) ** 2 + (ii / r[2]) ** 2 <= 1.0, dtype=np.float32)


def _vec(a: np.ndarray) -> tuple[float, float, float]:
    return (float(a[0]), float(a[1]), float(a[2]))
