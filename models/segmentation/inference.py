"""Sliding-window inference of the committed segmenter (a ``core.ports.Segmenter``).

The model is loaded once per process and reused; torch runs on one thread (on two shared cores
two threads ran 3-13x slower). Input is the CT in HU on its native grid; output labels and the
lesion probability are returned on that same grid.

The network was trained on the synthetic cohort's grid (1.9-2.3 mm pixels, 2-5 mm slices). A finer
series (a 512 matrix has 0.6-0.8 mm pixels; thin-slice reconstructions 0.6-1.25 mm slices) is first
averaged down (area interpolation: the same as reconstructing with larger pixels, which also keeps the
noise level the model learned) to the working spacing ``WORKING_SPACING_KJI_MM`` along each axis that is
finer than 3/4 of it. Run on a 0.7 mm grid instead, the model saw lesions three times larger and noise
it never met, and reported 174 "lesions" on a study with 3 (benchmarks/pipeline, before this step).

Back on the native grid, no full-volume resampling of every class is done (that is where MONAI Deploy's
standard operators spend most of their time): organ labels are upsampled by nearest neighbour, and only
two channels are interpolated trilinearly, inside the boxes around lesion candidates: the lesion
probability and the lesion margin (lesion minus the best other class). A native voxel is lesion where the
interpolated margin is positive, which is the argmax decision made on a smooth boundary, so diameters are
measured with sub-voxel edges instead of the working grid's 2 mm steps.

The network may be the built-in one or a user's own (a MONAI bundle or a TorchScript file,
``models.segmentation.loading``); its contract (``models.segmentation.contract``) gives the input windows, the
meaning of each output channel and the working spacing, so everything above applies to either.

Test-time augmentation (``tta``, ``core.ports.AugmentingSegmenter``): for each detected lesion, one window of
the network's patch size centred on the lesion is run flipped (left-right, anterior-posterior, ...), all flips
in one batch; the result is flipped back and brought to the native grid inside the lesion's box.
``core.confidence`` turns these views into the lesion's spread. Only lesion windows are run, not the whole
volume again, and the un-augmented segmentation is left as it was: the measurements and the model version do
not change with TTA on or off.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from monai.inferers.utils import sliding_window_inference
from scipy import ndimage

from adapters.settings import Settings
from core.edges import EdgeRefinement, refine_lesion_edges
from core.errors import ModelError
from core.types import BoxKji, LabelId, Segmentation, Volume
from models.segmentation.contract import BUILTIN_CONTRACT, ModelContract, ModelSource, source_from_settings
from models.segmentation.loading import LoadedModel, load_model
from models.segmentation.memory import keep_freed_memory

__all__ = [
    "DEFAULT_WEIGHTS",
    "OVERLAP",
    "ROI_KJI",
    "TTA_FLIPS",
    "WORKING_SPACING_KJI_MM",
    "MonaiSegmenter",
    "encode_windows",
    "parse_flips",
    "sample_trilinear",
    "segmenter_from_settings",
    "to_segmentation",
    "working_shape",
]

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "segmenter.pt"
ROI_KJI = BUILTIN_CONTRACT.roi_kji  # the training patch
OVERLAP = 0.25
WORKING_SPACING_KJI_MM = BUILTIN_CONTRACT.spacing_kji_mm
SW_BATCH = 4  # sliding windows per network call: on one CPU thread a batch of 3-4 costs ~1/3 per window
# image axes (k, j, i) each flip reverses; names for an axial series (columns run left-right, rows
# anterior-posterior). "si" is allowed for models trained with it; the built-in one was not (it then
# reports lesions the size of the body).
TTA_FLIPS: dict[str, tuple[int, ...]] = {"lr": (2,), "ap": (1,), "lr+ap": (1, 2), "si": (0,)}
DEFAULT_EDGES = EdgeRefinement()  # clear-contrast lesion edges placed by the image (core.edges); None: off
_FINER = 0.75  # an axis is resampled when its spacing is under this fraction of the working spacing
_CANDIDATE_MARGIN = -0.5  # working-grid voxels with lesion - best other class above this are refined
_BOX_PAD = 2  # working-grid voxels around each candidate box (the trilinear support and a margin)
_T = TypeVar("_T", bound=np.generic)


def parse_flips(names: Sequence[str]) -> tuple[str, ...]:
    """Validated TTA flip names (``TTA_FLIPS``), in the given order, without repeats."""
    unknown = [n for n in names if n not in TTA_FLIPS]
    if unknown:
        raise ModelError(f"unknown TTA flip(s) {unknown}; choose from {', '.join(TTA_FLIPS)}")
    return tuple(dict.fromkeys(names))


def encode_windows(hu: torch.Tensor, windows: Sequence[tuple[float, float]]) -> torch.Tensor:
    """HU ``[k, j, i]`` -> ``[len(windows), k, j, i]``: each channel ``clip((HU - low) / (high - low), 0, 1)``
    (the built-in's two windows are ``network.encode_hu``)."""
    return torch.stack([((hu - lo) / (hi - lo)).clamp(0.0, 1.0) for lo, hi in windows]).float()


def working_shape(
    shape: tuple[int, int, int],
    spacing_kji_mm: tuple[float, float, float],
    working_spacing_kji_mm: tuple[float, float, float] = WORKING_SPACING_KJI_MM,
) -> tuple[int, int, int]:
    """The grid the network runs on: each axis finer than 3/4 of the working spacing is coarsened to it."""
    out = []
    for n, s, w in zip(shape, spacing_kji_mm, working_spacing_kji_mm, strict=True):
        out.append(max(1, round(n * s / w)) if s < _FINER * w else n)
    k, j, i = out
    return (k, j, i)


class MonaiSegmenter:
    """Organ + lesion segmenter (a ``core.ports.Segmenter`` and ``AugmentingSegmenter``).

    ``MonaiSegmenter(weights)`` runs the built-in UNet from a weights file written by
    ``models.segmentation.train``; ``MonaiSegmenter(source=ModelSource(...))`` a MONAI bundle or TorchScript
    file. ``tta`` names the flips ``augmented_views`` runs (``TTA_FLIPS``; empty: no TTA)."""

    def __init__(
        self,
        weights: Path = DEFAULT_WEIGHTS,
        device: str | None = None,
        overlap: float = OVERLAP,
        roi_kji: tuple[int, ...] | None = None,
        *,
        source: ModelSource | None = None,
        tta: Sequence[str] = (),
        sw_batch_size: int = SW_BATCH,
        edges: EdgeRefinement | None = DEFAULT_EDGES,
    ) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        keep_freed_memory()  # large blocks reused, not faulted in afresh by every network call (memory.py)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model: LoadedModel = load_model(source or ModelSource("builtin", weights), self.device)
        self.net = self.model.net
        self.contract: ModelContract = self.model.contract
        self.overlap = overlap
        self.roi_kji = tuple(roi_kji) if roi_kji is not None else self.contract.roi_kji
        self.sw_batch_size = sw_batch_size
        self.tta = parse_flips(tta)
        self.edges = edges
        self._version = self.model.version
        # Interval label <- sum of the model's channels that mean it ("other" counts as background)
        names = [label.name.lower() for label in LabelId]
        to_label = np.zeros((len(LabelId), len(self.contract.output_classes)), np.float32)
        for c, name in enumerate(self.contract.output_classes):
            to_label[names.index(name) if name in names else LabelId.BACKGROUND, c] = 1.0
        self._identity = self.contract.output_classes == tuple(names)
        self._to_label = torch.from_numpy(to_label).to(self.device)

    @property
    def model_version(self) -> str:
        return self._version

    @property
    def augmentations(self) -> tuple[str, ...]:
        return self.tta

    def working_hu(self, volume: Volume) -> torch.Tensor:
        """The CT in HU ``[k, j, i]`` on the working grid (``working_shape``), on the CPU."""
        hu = torch.from_numpy(np.ascontiguousarray(volume.voxels_hu, dtype=np.float32))
        shape = working_shape(volume.shape, volume.spacing_kji_mm, self.contract.spacing_kji_mm)
        if shape != volume.shape:
            hu = F.interpolate(hu[None, None], size=shape, mode="area")[0, 0]
        return hu

    def working_input(self, volume: Volume) -> torch.Tensor:
        """The encoded network input ``[C, k, j, i]`` on the working grid."""
        return encode_windows(self.working_hu(volume), self.contract.input_windows_hu).to(self.device)

    def class_probabilities(self, out: torch.Tensor) -> torch.Tensor:
        """Network output ``[B, C_model, ...]`` -> probabilities of Interval's labels ``[B, 4, ...]``."""
        p = torch.softmax(out, dim=1) if self.contract.output == "logits" else out
        if self._identity:
            return p
        return torch.einsum("lc,bc...->bl...", self._to_label, p)

    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        """Label probabilities ``[B, 4, ...]`` of an encoded batch, by sliding window (a single window when
        ``x`` is one patch)."""
        out = sliding_window_inference(
            x,
            roi_size=self.roi_kji,
            sw_batch_size=self.sw_batch_size,
            predictor=self.label_probabilities,
            overlap=self.overlap,
            mode="gaussian",
        )
        assert isinstance(out, torch.Tensor)
        return out

    def label_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """One network call on an encoded batch ``[B, C, ...]``: probabilities of Interval's labels
        ``[B, 4, ...]``."""
        y: Any = self.net(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        return self.class_probabilities(y)

    @torch.inference_mode()
    def probabilities(self, volume: Volume) -> np.ndarray:
        """Class probabilities ``[4, k, j, i]`` (float32, ``LabelId`` order) on the working grid
        (``working_shape``; the native grid when the series is not finer than the working spacing)."""
        x = self.working_input(volume)[None]
        return self._predict(x)[0].float().cpu().numpy()

    def segment(self, volume: Volume, lesion_logit_bias: float = 0.0) -> Segmentation:
        """Labels and lesion probability on the volume's grid; ``lesion_logit_bias`` (a site calibration)
        is added to the lesion logit before the decision. Clear-contrast lesion edges are then placed by the image
        (``core.edges``) unless ``edges`` is None."""
        seg = to_segmentation(self.probabilities(volume), volume.shape, lesion_logit_bias)
        return (
            seg
            if self.edges is None
            else refine_lesion_edges(volume.voxels_hu, seg, volume.spacing_kji_mm, self.edges, in_place=True)
        )  # ``seg`` is this call's own

    def lesion_window(self, work_shape: tuple[int, ...], work_box: Sequence[tuple[int, int]]) -> list[slice]:
        """The patch-sized window of the working grid centred on a box (the whole axis when shorter)."""
        out = []
        for (a, b), n, r in zip(work_box, work_shape, self.roi_kji, strict=True):
            size = min(r, n)
            start = int(np.clip(round((a + b) / 2 - size / 2), 0, n - size))
            out.append(slice(start, start + size))
        return out

    @torch.inference_mode()
    def augmented_views(self, volume: Volume, boxes_kji: Sequence[BoxKji]) -> list[list[Segmentation]]:
        """For each native box, its segmentation under each flip of ``tta`` (see the module docstring)."""
        if not self.tta:
            return [[] for _ in boxes_kji]
        x = self.working_input(volume)
        work = tuple(int(n) for n in x.shape[1:])
        out: list[list[Segmentation]] = []
        for box in boxes_kji:
            window = self.lesion_window(work, native_to_working_box(box, volume.shape, work))
            crop = x[(slice(None), *window)]
            batch = torch.stack([torch.flip(crop, [a + 1 for a in TTA_FLIPS[f]]) for f in self.tta])
            prob = self._predict(batch)
            views = []
            for f, p in zip(self.tta, prob, strict=True):
                back = torch.flip(p, [a + 1 for a in TTA_FLIPS[f]]).float().cpu().numpy()
                view = _native_in_box(back, [w.start for w in window], work, volume.shape, box)
                if (
                    self.edges is not None
                ):  # as ``segment`` draws the lesion, so the spread compares like with like
                    hu = volume.voxels_hu[tuple(slice(a, b) for a, b in box)]
                    view = refine_lesion_edges(hu, view, volume.spacing_kji_mm, self.edges, in_place=True)
                views.append(view)
            out.append(views)
        return out


def to_segmentation(
    prob: npt.NDArray[np.float32], native: tuple[int, int, int], lesion_logit_bias: float = 0.0
) -> Segmentation:
    """Class probabilities on the working grid -> ``Segmentation`` on the native grid. A logit bias ``b`` on the
    lesion class multiplies its probability by ``exp(b)`` before renormalising (softmax of shifted logits)."""
    if lesion_logit_bias:
        prob = prob.copy()
        prob[LabelId.LESION] *= np.float32(np.exp(lesion_logit_bias))
        prob /= prob.sum(axis=0, keepdims=True)
    if prob.shape[1:] == native:
        labels = np.argmax(prob, axis=0).astype(np.uint8)
        return Segmentation(labels=labels, lesion_probability=prob[LabelId.LESION].astype(np.float32))
    return _to_native(prob, native)


def segmenter_from_settings(settings: Settings, *, tta: bool = True) -> MonaiSegmenter:
    """The segmenter the settings choose, loaded once (``tta=False``: without test-time augmentation, for
    uses that only need the label map)."""
    edges = (
        EdgeRefinement(keep=settings.analysis().lesion_filter) if settings.segmenter_edge_refinement else None
    )
    return MonaiSegmenter(
        source=source_from_settings(settings), tta=settings.segmenter_tta if tta else (), edges=edges
    )


def native_to_working_box(
    box: Sequence[tuple[int, int]], native: Sequence[int], work: Sequence[int]
) -> list[tuple[int, int]]:
    """The working-grid voxels whose extent covers the native box's voxel centres."""
    out = []
    for (a, b), n, w in zip(box, native, work, strict=True):
        lo = int(np.floor((a + 0.5) * w / n))
        hi = int(np.floor((b - 0.5) * w / n)) + 1
        out.append((max(0, lo), min(w, max(hi, lo + 1))))
    return out


def _native_in_box(
    prob: npt.NDArray[np.float32],
    crop_lo: Sequence[int],
    work: Sequence[int],
    native: Sequence[int],
    box: BoxKji,
) -> Segmentation:
    """Labels and lesion probability of the native voxels in ``box`` from class probabilities on a crop of
    the working grid starting at ``crop_lo``: organs by nearest neighbour, the lesion where the trilinearly
    interpolated margin (lesion minus best other class) is positive, as ``_to_native`` does."""
    lesion = LabelId.LESION
    organ, best_other = _organ_and_best_other(prob)
    margin = prob[lesion] - best_other
    coords = [
        (np.arange(a, b) + 0.5) * (w / n) - 0.5 - c
        for (a, b), n, w, c in zip(box, native, work, crop_lo, strict=True)
    ]
    nearest = [
        np.clip(np.rint(c), 0, s - 1).astype(np.intp) for c, s in zip(coords, organ.shape, strict=True)
    ]
    labels = organ[np.ix_(*nearest)]
    stack = torch.from_numpy(np.stack([prob[lesion], margin]).astype(np.float32))
    p_lesion, m = sample_trilinear(stack, coords)
    labels[m > 0] = lesion
    return Segmentation(labels=np.ascontiguousarray(labels), lesion_probability=p_lesion.astype(np.float32))


def sample_trilinear(stack: torch.Tensor, coords: Sequence[npt.NDArray[Any]]) -> npt.NDArray[np.float32]:
    """Trilinear samples of ``stack`` ``[C, k, j, i]`` at the grid of voxel coordinates ``coords`` (one array
    per axis), border values outside: ``[C, len(ck), len(cj), len(ci)]``."""
    grid = torch.stack(
        torch.meshgrid(*[torch.from_numpy(c.astype(np.float32)) for c in coords], indexing="ij")[::-1],
        dim=-1,
    )  # [k, j, i, (x=i, y=j, z=k)] in voxel units
    size = torch.tensor(stack.shape[1:][::-1], dtype=torch.float32)
    norm = (grid * 2 + 1) / size - 1  # align_corners=False normalisation
    out = F.grid_sample(stack[None], norm[None], mode="bilinear", padding_mode="border", align_corners=False)
    result: npt.NDArray[np.float32] = out[0].numpy()
    return result


def _nearest_index(n_native: int, n_work: int) -> npt.NDArray[np.intp]:
    """Working-grid index of each native index (voxel centres, as ``align_corners=False``)."""
    centres = (np.arange(n_native) + 0.5) * (n_work / n_native) - 0.5
    index: npt.NDArray[np.intp] = np.clip(np.rint(centres), 0, n_work - 1).astype(np.intp)
    return index


def _take_nearest(work: npt.NDArray[_T], index: list[npt.NDArray[np.intp]]) -> npt.NDArray[_T]:
    """``work[np.ix_(*index)]`` of a 3-D ``work``: slice by slice along the first axis, each gathered along its
    last axis first (the element-by-element gather runs on the smallest array), then its rows copied straight
    into the result. No full-size intermediate is made: on a 512 series a fresh 44 MB array cost more in page
    faults than the copy itself."""
    k_index, j_index, i_index = index
    out = np.empty((len(k_index), len(j_index), len(i_index)), dtype=work.dtype)
    identity_i = len(i_index) == work.shape[2] and bool(np.all(i_index == np.arange(len(i_index))))
    for k, kk in enumerate(k_index):
        plane = work[kk] if identity_i else np.take(work[kk], i_index, axis=1, mode="clip")
        np.take(plane, j_index, axis=0, out=out[k], mode="clip")  # indices are in range: no buffering
    return out


def _organ_and_best_other(
    prob: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """Per voxel of ``prob`` ``[C, ...]``: the most probable class other than the lesion (the first on a tie,
    as ``argmax``) and its probability. A running comparison over the few classes, not ``argmax`` and ``max``
    along the class axis (numpy reduces that axis voxel by voxel: ten times slower on a working grid)."""
    others = [c for c in range(prob.shape[0]) if c != LabelId.LESION]
    best = prob[others[0]].copy()
    organ = np.full(best.shape, others[0], dtype=np.uint8)
    for c in others[1:]:
        organ[prob[c] > best] = c
        np.maximum(best, prob[c], out=best)
    return organ, best


def _to_native(prob: npt.NDArray[np.float32], native: tuple[int, int, int]) -> Segmentation:
    lesion = LabelId.LESION
    organ, best_other = _organ_and_best_other(prob)
    index = [_nearest_index(n, w) for n, w in zip(native, prob.shape[1:], strict=True)]
    labels = _take_nearest(organ, index)
    lesion_prob = _take_nearest(prob[lesion].astype(np.float32, copy=False), index)
    margin = prob[lesion] - best_other
    candidates, n = ndimage.label(margin > _CANDIDATE_MARGIN)
    for box in ndimage.find_objects(candidates) if n else []:
        if box is None:
            continue
        _refine_box(box, prob[lesion], margin, native, labels, lesion_prob)
    return Segmentation(labels=labels, lesion_probability=lesion_prob)


def _refine_box(
    box: tuple[slice, ...],
    p_lesion: npt.NDArray[np.float32],
    margin: npt.NDArray[np.float32],
    native: tuple[int, int, int],
    labels: npt.NDArray[np.uint8],
    lesion_prob: npt.NDArray[np.float32],
) -> None:
    """Trilinear lesion probability and margin inside one candidate box, written into the native arrays."""
    work = p_lesion.shape
    lo = [max(0, s.start - _BOX_PAD) for s in box]
    hi = [min(w, s.stop + _BOX_PAD) for s, w in zip(box, work, strict=True)]
    # native voxels whose centres map inside [lo, hi - 1] of the working grid
    n_lo = [int(np.ceil((a + 0.5) * n / w - 0.5)) for a, n, w in zip(lo, native, work, strict=True)]
    n_hi = [int(np.floor((b - 0.5) * n / w - 0.5)) + 1 for b, n, w in zip(hi, native, work, strict=True)]
    n_lo = [max(0, v) for v in n_lo]
    n_hi = [min(n, v) for v, n in zip(n_hi, native, strict=True)]
    if any(b <= a for a, b in zip(n_lo, n_hi, strict=True)):
        return
    # sample positions (working-grid coordinates of native centres) relative to the crop
    coords = [
        (np.arange(a, b) + 0.5) * (w / n) - 0.5 - c
        for a, b, n, w, c in zip(n_lo, n_hi, native, work, lo, strict=True)
    ]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    stack = torch.from_numpy(np.stack([p_lesion[crop], margin[crop]]).astype(np.float32))
    out = sample_trilinear(stack, coords)
    target = tuple(slice(a, b) for a, b in zip(n_lo, n_hi, strict=True))
    labels[target][out[1] > 0] = LabelId.LESION  # labels hold organs only until here
    lesion_prob[target] = out[0]
