"""Lesion edges placed by the image where the image is unambiguous: half of the lesion's contrast.

A segmentation network draws a small lesion's edge where its training made the edge most likely, and on a
series unlike most of its training (5 mm slices, 2.2 mm pixels) that can be a voxel or two inside the edge a
reader sees: a 12.5 mm lung nodule of 0 HU in -850 HU lung drawn 6.6 mm wide (held-out Philips, third-leg
model). Where a lesion stands out of what surrounds it by many times the noise, the image itself says where
its edge is: a blurred step crosses half its height at the edge (the same rule ``core.lesions.contrast_search``
grows by, and the full-width-at-half-maximum convention of nodule volumetry).

``refine_lesion_edges`` moves each lesion's edge to that half-contrast level, within ``band_voxels`` of the
model's edge in plane and one slice above and below, and only where the contrast is at least ``min_cnr``
times the noise of the lesion's surroundings (a hypodense liver metastasis at 3x the noise is left as the model
drew it: its half-contrast edge would follow the noise). The edge moves only into the tissue the model labels
the lesion's own (not into the chest wall a nodule touches), never into touch with another lesion, and not along a
vessel thinner than three voxels (opened away in plane). Voxels the refinement adds are marked in
``Segmentation.refined`` so the lesion's probability stays the model's own (``core.lesions.extract_lesions``
averages over the model's voxels only); voxels it removes take the label of the lesion's surroundings.

Grid-agnostic: the input may be a whole volume or a box of one (the TTA views), with HU on the same grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from core.geometry import measure_mask
from core.lesions import CONNECTIVITY, LesionFilter, lesion_box, robust_sd
from core.types import LabelId, Segmentation

__all__ = ["EdgeRefinement", "refine_lesion_edges"]

_IN_PLANE = np.ones((1, 3, 3), dtype=bool)
_ACROSS = np.ones((3, 1, 1), dtype=bool)
_CROSS = ndimage.generate_binary_structure(2, 1)[None]  # in plane, 4-connected


@dataclass(frozen=True, slots=True)
class EdgeRefinement:
    """How far the image may move a lesion's edge, and how clear the contrast must be for it to."""

    band_voxels: int = 2  # in plane, outward from the model's edge; one slice across
    # the surroundings: from this many to this many voxels outside the model's lesion, in plane
    ring_voxels: tuple[int, int] = (2, 4)
    min_cnr: float = 6.0  # |lesion level - surroundings level| / surroundings' robust noise SD
    min_ring_voxels: int = 12
    # what is refined: components the site's lesion filter reports as the model drew them
    keep: LesionFilter = field(default_factory=LesionFilter)


def refine_lesion_edges(
    hu: npt.NDArray[np.floating],
    seg: Segmentation,
    spacing_kji_mm: tuple[float, float, float],
    params: EdgeRefinement = EdgeRefinement(),
    *,
    in_place: bool = False,
) -> Segmentation:
    """``seg`` with each clear-contrast lesion's edge at half its contrast (see the module docstring).

    Only components that ``params.keep`` reports as drawn by the model are refined: a speck under the lesion floor is
    not grown into a finding by the image. A refined lesion does not grow into touch with another lesion.
    ``in_place``: ``seg.labels`` itself is changed (for a caller that made ``seg`` and holds no other reference to
    it), not a copy: no second label map of a 512 x 512 series is allocated."""
    if hu.shape != seg.labels.shape:
        raise ValueError(f"HU of shape {hu.shape} for a segmentation of shape {seg.labels.shape}")
    margin = params.band_voxels + params.ring_voxels[1] + 1
    # everything below happens inside the lesions' bounding box and the margin a refinement looks into: a
    # 512 x 512 series is large, its lesions are not
    region = lesion_box(seg.labels, margin=(1, margin, margin))
    if region is None:
        return seg
    comps, _ = ndimage.label(seg.labels[region] == LabelId.LESION, structure=CONNECTIVITY)
    voxel_ml = float(np.prod(spacing_kji_mm)) / 1000.0
    keep = params.keep
    labels = seg.labels  # copied at the first change unless ``in_place``
    added = np.zeros(labels.shape, dtype=bool) if seg.refined is None else seg.refined.copy()
    labels_r, added_r, hu_r, prob_r = (
        labels[region],
        added[region],
        hu[region],
        seg.lesion_probability[region],
    )
    changed = False
    for idx, box in enumerate(ndimage.find_objects(comps), start=1):
        if box is None:
            continue
        own_box = comps[box] == idx
        if (
            np.count_nonzero(own_box) * voxel_ml < keep.min_volume_ml
            or float(prob_r[box][own_box].mean()) < keep.min_probability
            or _shorter_than(own_box, spacing_kji_mm, keep.min_long_axis_mm)
        ):
            continue
        pad = (
            slice(max(box[0].start - 1, 0), box[0].stop + 1),
            *(slice(max(s.start - margin, 0), s.stop + margin) for s in box[1:]),
        )
        own = comps[pad] == idx
        # every other lesion voxel as drawn so far (refined ones included), and a voxel around it: no merging
        others = ndimage.binary_dilation((labels_r[pad] == LabelId.LESION) & ~own, CONNECTIVITY)
        tissue = _surroundings_label(
            labels_r[pad], own
        )  # the tissue the lesion sits in, as the model labels it
        grown = _refined_mask(
            hu_r[pad].astype(np.float32, copy=False), own, others, labels_r[pad] == tissue, params
        )
        if grown is None:
            continue
        gained, lost = grown & ~own, own & ~grown
        if not gained.any() and not lost.any():
            continue
        if not changed and not in_place:
            labels = seg.labels.copy()
            labels_r = labels[region]
        changed = True
        local = labels_r[pad]
        local[lost] = tissue
        local[gained] = LabelId.LESION
        added_r[pad] |= gained
        added_r[pad] &= ~lost
    if not changed:
        return seg
    return Segmentation(labels=labels, lesion_probability=seg.lesion_probability, refined=added)


def _shorter_than(
    mask: npt.NDArray[np.bool_], spacing_kji_mm: tuple[float, float, float], floor_mm: float
) -> bool:
    """Whether the lesion's long axis is under ``floor_mm``; measured only when its in-plane extent does not already
    show it is longer (the outline the measurement takes lies within a pixel of the voxels' edges)."""
    _, sy, sx = spacing_kji_mm
    extent = max(mask.shape[1] * sy, mask.shape[2] * sx)
    if extent - max(sy, sx) >= floor_mm:
        return False
    return measure_mask(mask, spacing_kji_mm).long_axis_mm < floor_mm


def _refined_mask(
    hu: npt.NDArray[np.float32],
    own: npt.NDArray[np.bool_],
    others: npt.NDArray[np.bool_],
    organ: npt.NDArray[np.bool_],
    params: EdgeRefinement,
) -> npt.NDArray[np.bool_] | None:
    """One lesion's mask with its edge at half contrast, or None when the contrast is not clear enough."""
    inner, outer = params.ring_voxels
    near = ndimage.binary_dilation(own, _IN_PLANE, iterations=inner)
    far = ndimage.binary_dilation(own, _IN_PLANE, iterations=outer)
    ring = far & ~near & ~others & organ
    if np.count_nonzero(ring) < params.min_ring_voxels:
        return None
    core = ndimage.binary_erosion(own, _IN_PLANE)
    if np.count_nonzero(core) < 3:
        core = own
    level_in = float(np.median(hu[core]))
    around = hu[ring]
    level_out = float(np.median(around))
    noise = max(robust_sd(around, level_out), 1.0)
    contrast = level_in - level_out
    if abs(contrast) < params.min_cnr * noise:
        return None
    sign = 1.0 if contrast > 0 else -1.0
    passes = sign * (hu - (level_out + contrast / 2.0)) > 0.0
    allowed = ndimage.binary_dilation(
        ndimage.binary_dilation(own, _ACROSS), _IN_PLANE, iterations=params.band_voxels
    )
    # the edge moves within the lesion's own tissue only: not into the chest wall a lung nodule touches, which is
    # as dense as the nodule
    candidate = passes & allowed & ~others & (own | organ)
    # a vessel or septum the edge ran along is thinner than three voxels: opened away, slice by slice
    candidate = ndimage.binary_opening(candidate, _CROSS) | core
    parts, _ = ndimage.label(candidate, structure=CONNECTIVITY)
    touching = np.unique(parts[core])
    grown: npt.NDArray[np.bool_] = np.isin(parts, touching[touching > 0])
    return grown


def _surroundings_label(labels: npt.NDArray[np.uint8], own: npt.NDArray[np.bool_]) -> int:
    """The most common non-lesion label just outside the lesion (background when there is none)."""
    shell = ndimage.binary_dilation(own, _IN_PLANE, iterations=2) & ~own
    values = labels[shell]
    values = values[values != LabelId.LESION]
    if values.size == 0:
        return int(LabelId.BACKGROUND)
    return int(np.bincount(values).argmax())
