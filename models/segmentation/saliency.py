"""Occlusion-sensitivity saliency of one lesion: which parts of the image around it the finding rests on.

For a lesion (its box), patches of the CT around it are occluded one at a time and the network is run again;
the saliency of a voxel is how much the lesion's score (its mean lesion probability over the voxels the
un-occluded network calls lesion) drops, averaged over the patches that cover it. Positive: the region
supports the finding; near zero: the model does not look there; negative: the region argues against it.
GradCAM was tried on this kind of network and does not localise; occlusion does.

A patch is occluded by filling it with the density of the lesion's surroundings (the median HU of the
occluded region outside the lesion: liver around a liver lesion, lung around a nodule), then encoded as the
model expects: under the patch the lesion turns into the tissue around it. Two fills were tried first on the
demo patient's 20-23 mm liver lesions and left them unexplained (mean drop inside the lesion <= 0): the
patch's own mean HU (inside a uniform lesion it changes nothing) and the median HU of the whole crop (44-80
HU: close to the lesions' ~50 HU, not the liver's ~100). MONAI's
``OcclusionSensitivity`` (1.6.1) can be given a lesion-score wrapper as its "classifier", but its occlusions
act on the encoded channels (``gaussian`` darkens both windows towards air, ``mean_patch`` averages the two
windows together) and its callable mode raises; so the loop is written here, ~40 lines.

Cost is kept low for one CPU thread: only a box around the lesion (``margin_mm``) is occluded, with coarse
patches (``patch_mm`` wide every ``stride_mm``), and the network sees a crop of the lesion's neighbourhood
(``context_vox`` working voxels beyond the occluded box, at most the model's patch), occluded copies in
batches. The demo study's 10-23 mm lesions: 64-150 network calls, 2-9 s each on one CPU thread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from core.types import BoxKji, LabelId, Volume
from models.segmentation.inference import (
    MonaiSegmenter,
    encode_windows,
    native_to_working_box,
    sample_trilinear,
)

__all__ = ["LesionSaliency", "occlusion_saliency"]


@dataclass(frozen=True)
class LesionSaliency:
    """Saliency on the native voxels of ``box_kji``: the drop of the lesion's score when the region around each
    voxel is occluded (probability units). ``baseline`` is the un-occluded score."""

    box_kji: BoxKji
    drop: npt.NDArray[np.float32]
    baseline: float
    occlusions: int
    fill_hu: float  # what an occluded patch was filled with
    patch_vox: tuple[int, int, int]  # working-grid voxels per patch

    def overlay(self, shape: tuple[int, int, int]) -> npt.NDArray[np.float32]:
        """A whole-volume map in [0, 1] for drawing (``adapters.evidence_images``): positive drops scaled by
        the largest, zero elsewhere."""
        out = np.zeros(shape, np.float32)
        top = float(self.drop.max())
        if top > 0:
            out[tuple(slice(a, b) for a, b in self.box_kji)] = np.clip(self.drop / top, 0.0, 1.0)
        return out


def occlusion_saliency(
    segmenter: MonaiSegmenter,
    volume: Volume,
    lesion_box_kji: BoxKji,
    *,
    margin_mm: float = 8.0,
    patch_mm: float = 12.0,
    stride_mm: float = 8.0,
    context_vox: int = 16,
    batch: int = 8,
) -> LesionSaliency:
    """Occlusion saliency of the lesion in ``lesion_box_kji`` (native voxels, stop exclusive)."""
    hu = segmenter.working_hu(volume)
    work = tuple(int(n) for n in hu.shape)
    spacing = [s * n / w for s, n, w in zip(volume.spacing_kji_mm, volume.shape, work, strict=True)]
    lesion_w = native_to_working_box(lesion_box_kji, volume.shape, work)
    pad = [math.ceil(margin_mm / s) for s in spacing]
    region = [(max(0, a - p), min(n, b + p)) for (a, b), p, n in zip(lesion_w, pad, work, strict=True)]
    window = _crop_window(region, work, segmenter.roi_kji, context_vox)
    crop = _padded(hu, window)  # HU; outside the volume: air, as the sliding window's zero padding
    lo = [w[0] for w in window]
    region_c = [(a - o, b - o) for (a, b), o in zip(region, lo, strict=True)]
    lesion_c = tuple(slice(a - o, b - o) for (a, b), o in zip(lesion_w, lo, strict=True))
    windows_hu = segmenter.contract.input_windows_hu

    def probabilities(hus: torch.Tensor) -> torch.Tensor:
        x = torch.stack([encode_windows(h, windows_hu) for h in hus]).to(segmenter.device)
        with torch.inference_mode():
            return segmenter.label_probabilities(x).float().cpu()

    p = probabilities(crop[None])[0]
    p0 = p[LabelId.LESION]
    target = torch.zeros_like(p0, dtype=torch.bool)
    target[lesion_c] = p.argmax(0)[lesion_c] == LabelId.LESION
    if not target.any():  # the crop alone does not show the lesion: score its box
        target[lesion_c] = True
    baseline = float(p0[target].mean())

    patch = tuple(max(1, round(patch_mm / s)) for s in spacing)
    stride = tuple(max(1, round(stride_mm / s)) for s in spacing)
    centres = [_centres(a, b, st) for (a, b), st in zip(region_c, stride, strict=True)]
    boxes: list[tuple[slice, ...]] = [
        tuple(
            slice(max(0, c - q // 2), min(n, c - q // 2 + q))
            for c, q, n in zip(cs, patch, crop.shape, strict=True)
        )
        for cs in _product(centres)
    ]
    around = torch.zeros_like(target)
    around[tuple(slice(a, b) for a, b in region_c)] = True
    around &= ~target & (_padded(torch.ones_like(hu), window) > 0)  # within the volume, not the lesion
    fill = float(crop[around].median()) if around.any() else float(crop.median())
    total = torch.zeros_like(p0)
    count = torch.zeros_like(p0)
    for i in range(0, len(boxes), batch):
        chunk = boxes[i : i + batch]
        occluded = crop.repeat(len(chunk), 1, 1, 1)
        for b, box in enumerate(chunk):
            occluded[b][box] = fill
        for box, q in zip(chunk, probabilities(occluded)[:, LabelId.LESION], strict=True):
            total[box] += baseline - float(q[target].mean())
            count[box] += 1
    drop_c = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    native_box = _native_box(region, volume.shape, work)
    coords = [
        (np.arange(a, b) + 0.5) * (w / n) - 0.5 - o
        for (a, b), n, w, o in zip(native_box, volume.shape, work, lo, strict=True)
    ]
    drop = sample_trilinear(drop_c[None].float(), coords)[0]
    return LesionSaliency(
        box_kji=native_box,
        drop=drop.astype(np.float32),
        baseline=baseline,
        occlusions=len(boxes),
        fill_hu=fill,
        patch_vox=(patch[0], patch[1], patch[2]),
    )


def _crop_window(
    region: list[tuple[int, int]], work: tuple[int, ...], roi: tuple[int, ...], context: int
) -> list[tuple[int, int]]:
    """The crop the network sees: the region plus context, rounded up to a multiple of 16 (the UNet halves it
    three times), at most the model's patch; it may extend past the volume (padded)."""
    out = []
    for (a, b), n, r in zip(region, work, roi, strict=True):
        size = min(r, 16 * math.ceil((b - a + 2 * context) / 16))
        size = max(size, min(r, 16))
        centre = (a + b) / 2
        start = round(centre - size / 2)
        start = min(max(start, 0), max(0, n - size)) if n >= size else (n - size) // 2
        out.append((start, start + size))
    return out


def _padded(hu: torch.Tensor, window: list[tuple[int, int]]) -> torch.Tensor:
    out = torch.full([b - a for a, b in window], -1000.0)
    src = tuple(slice(max(0, a), min(n, b)) for (a, b), n in zip(window, hu.shape, strict=True))
    dst = tuple(slice(s.start - a, s.stop - a) for s, (a, _) in zip(src, window, strict=True))
    out[dst] = hu[src]
    return out


def _native_box(region: list[tuple[int, int]], native: tuple[int, int, int], work: tuple[int, ...]) -> BoxKji:
    """The native voxels whose centres fall in the working-grid region."""
    out = []
    for (a, b), n, w in zip(region, native, work, strict=True):
        lo = max(0, math.ceil((a + 0.5) * n / w - 0.5))
        hi = min(n, math.floor((b - 0.5) * n / w - 0.5) + 1)
        out.append((lo, max(hi, lo + 1)))
    return (out[0], out[1], out[2])


def _centres(a: int, b: int, stride: int) -> list[int]:
    """Patch centres every ``stride`` voxels across [a, b), the last one at the far edge."""
    out = list(range(a, b, stride))
    if out[-1] < b - 1 - stride // 2:
        out.append(b - 1)
    return out


def _product(axes: list[list[int]]) -> list[tuple[int, ...]]:
    return [(a, b, c) for a in axes[0] for b in axes[1] for c in axes[2]]
