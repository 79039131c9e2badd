"""Test-time-augmentation spread of each detected lesion: how much its detection, size and probability
change when the model sees the study flipped (``core.types.LesionSpread``).

The model side (``core.ports.AugmentingSegmenter``) returns, for a box around each lesion, the segmentation
under each augmentation; everything here is counting and measuring, with no model. The lesion's own result
(un-augmented) is the first view, so a lesion every view finds the same way has ranges of zero width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from core.geometry import measure_mask
from core.ports import AugmentingSegmenter
from core.types import BoxKji, DetectedLesion, LabelId, LesionSpread, Segmentation, Volume

__all__ = ["add_spreads", "lesion_mask", "lesion_spread", "spread_box"]

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # as core.lesions.extract_lesions


def spread_box(box: BoxKji, shape: tuple[int, int, int]) -> BoxKji:
    """The lesion's box grown by half its size on every side (at least 3 voxels), within the volume: room
    for a view that draws the lesion larger."""
    out = []
    for (a, b), n in zip(box, shape, strict=True):
        pad = max(3, (b - a + 1) // 2)
        out.append((max(0, a - pad), min(n, b + pad)))
    return (out[0], out[1], out[2])


def _slices(box: BoxKji) -> tuple[slice, slice, slice]:
    return (slice(*box[0]), slice(*box[1]), slice(*box[2]))


def lesion_mask(seg: Segmentation, lesion: DetectedLesion, around: BoxKji) -> npt.NDArray[np.bool_]:
    """The lesion's own voxels within ``around`` (which contains its box): the lesion component that fills
    most of the lesion's box."""
    assert lesion.box_kji is not None
    crop = seg.labels[_slices(around)] == LabelId.LESION
    comps, n = ndimage.label(crop, structure=_CONNECTIVITY)
    inner = tuple(slice(a - o[0], b - o[0]) for (a, b), o in zip(lesion.box_kji, around, strict=True))
    counts = np.bincount(comps[inner].ravel(), minlength=n + 1)
    counts[0] = 0
    mask: npt.NDArray[np.bool_] = comps == int(np.argmax(counts))
    return mask if counts.max() > 0 else np.zeros_like(crop)


def _view_measure(
    view: Segmentation,
    base: npt.NDArray[np.bool_],
    spacing_kji_mm: tuple[float, float, float],
    drawn: npt.NDArray[np.bool_],
) -> tuple[bool, float, float, float]:
    """(found, mean probability over ``drawn``, long axis mm, volume ml) of the lesion as this view draws it:
    the view's lesion components that overlap ``base``."""
    probability = float(view.lesion_probability[drawn].mean()) if drawn.any() else 0.0
    lesion = view.labels == LabelId.LESION
    comps, _ = ndimage.label(lesion, structure=_CONNECTIVITY)
    hits = np.unique(comps[base & lesion])
    hits = hits[hits > 0]
    if hits.size == 0:
        return False, probability, 0.0, 0.0
    m = measure_mask(np.isin(comps, hits), spacing_kji_mm)
    return True, probability, m.long_axis_mm, m.volume_ml


def lesion_spread(
    lesion: DetectedLesion,
    base_mask: npt.NDArray[np.bool_],
    views: Sequence[Segmentation],
    spacing_kji_mm: tuple[float, float, float],
    augmentations: Sequence[str] = (),
    model_mask: npt.NDArray[np.bool_] | None = None,
) -> LesionSpread:
    """The spread of one lesion over its own result and ``views`` (box-shaped, aligned with ``base_mask``). A view's
    probability is averaged over ``model_mask`` (the lesion's voxels the model drew, without those the edge
    refinement added, as the lesion's own probability is; ``base_mask`` when None)."""
    drawn = base_mask if model_mask is None else model_mask
    found, probs, longs, vols = (
        [True],
        [lesion.probability],
        [lesion.measurement.long_axis_mm],
        [lesion.measurement.volume_ml],
    )
    for view in views:
        if view.labels.shape != base_mask.shape:
            raise ValueError(f"view of shape {view.labels.shape} for a lesion box of shape {base_mask.shape}")
        f, p, la, v = _view_measure(view, base_mask, spacing_kji_mm, drawn)
        found.append(f)
        probs.append(p)
        longs.append(la)
        vols.append(v)
    return LesionSpread(
        views=len(found),
        detected_in=sum(found),
        probability_range=(min(probs), max(probs)),
        long_axis_mm_range=(min(longs), max(longs)),
        volume_ml_range=(min(vols), max(vols)),
        augmentations=tuple(augmentations),
    )


def add_spreads(
    volume: Volume, seg: Segmentation, lesions: Sequence[DetectedLesion], segmenter: AugmentingSegmenter
) -> list[DetectedLesion]:
    """``lesions`` with their spread under the segmenter's augmentations (unchanged when it has none)."""
    names = segmenter.augmentations
    todo = [d for d in lesions if d.box_kji is not None]
    if not names or not todo:
        return list(lesions)
    boxes = [spread_box(d.box_kji, volume.shape) for d in todo if d.box_kji is not None]
    views = segmenter.augmented_views(volume, boxes)
    if len(views) != len(boxes):
        raise ValueError(f"the segmenter returned views for {len(views)} of {len(boxes)} lesion boxes")
    spreads = {}
    for d, box, v in zip(todo, boxes, views, strict=True):
        base = lesion_mask(seg, d, box)
        drawn = base if seg.refined is None else base & ~seg.refined[_slices(box)]
        spreads[d.lesion_id] = lesion_spread(
            d, base, v, volume.spacing_kji_mm, names, drawn if drawn.any() else base
        )
    return [replace(d, spread=spreads.get(d.lesion_id)) for d in lesions]
