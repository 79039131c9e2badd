"""Per-study artifacts kept for the people who read the report: the result and the label map it rests on.

``<root>/<StudyInstanceUID>/report.json``  the analysis (``adapters.report_json.result_to_json``)
``<root>/<StudyInstanceUID>/draft.json``  per sentence: model text, replaced or added, and why
``<root>/<StudyInstanceUID>/segmentation.npz``  ``labels`` (uint8, [k, j, i]), ``lesion_probability``
(float16) and ``refined_voxels`` (flat indices of the lesion voxels the edge refinement added, ``core.edges``),
with the volume's geometry, so evidence images (key slice + contour) can be drawn later without running the model
again; and ``saliency`` (float16, [0, 1]) once a lesion was explained
(``interval explain --artifacts``), which the key images overlay.

``ReusingSegmenter`` puts those label maps to a second use: a prior study that this site analysed before (same
series, same geometry, same model version) is not segmented again when a follow-up is compared with it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from adapters.report_json import result_to_json
from core.errors import InputError
from core.pipeline import StudyResult
from core.ports import AugmentingSegmenter, Segmenter
from core.types import BoxKji, Segmentation, Volume

__all__ = ["ReusingSegmenter", "load_artifacts", "save_artifacts", "save_saliency", "study_dir"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def study_dir(root: Path, study_uid: str) -> Path:
    if len(study_uid) > 64 or not _UID.match(study_uid):
        raise InputError("not a DICOM UID (digits and dots, at most 64 characters)", study_uid=None)
    return root / study_uid


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_artifacts(result: StudyResult, root: Path) -> Path:
    folder = study_dir(root, result.acquisition.study_uid)
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write(folder / "report.json", json.dumps(result_to_json(result), indent=1).encode())
    if result.draft is not None:  # which sentences are model text, which were replaced or added, and why
        sentences = [
            {
                "section": c.section,
                "text": c.text,
                "origin": c.origin.value,
                "drafted": c.drafted,
                "problems": list(c.problems),
            }
            for c in result.draft.sentences
        ]
        _atomic_write(folder / "draft.json", json.dumps({"sentences": sentences}, indent=1).encode())
    seg = result.segmentation
    if seg is not None:
        tmp = folder / ".segmentation.tmp.npz"
        np.savez_compressed(
            tmp,
            labels=seg.labels.astype(np.uint8),
            lesion_probability=seg.lesion_probability.astype(np.float16),
            # the lesion voxels the image-based edge refinement added (core.edges), as flat indices: a few
            # hundred numbers, not a second volume to compress
            refined_voxels=np.flatnonzero(seg.refined)
            if seg.refined is not None
            else np.zeros(0, dtype=np.int64),
            spacing_kji_mm=np.asarray(result.spacing_kji_mm),
            origin_lps_mm=np.asarray(result.origin_lps_mm),
            direction_lps=np.asarray(result.direction_lps),
        )
        os.replace(tmp, folder / "segmentation.npz")
    return folder


def save_saliency(root: Path, study_uid: str, overlay: np.ndarray) -> Path:
    """Add a saliency overlay (volume-shaped, [0, 1]) to a stored analysis's ``segmentation.npz``; where one is
    stored already (another lesion explained before), the larger value of the two is kept."""
    folder = study_dir(root, study_uid)
    path = folder / "segmentation.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if arrays["labels"].shape != overlay.shape:
        raise InputError(
            f"the stored label map has shape {arrays['labels'].shape}, the saliency {overlay.shape}: "
            "not the same series",
            study_uid=study_uid,
        )
    old = arrays.get("saliency")
    new = overlay.astype(np.float16)
    arrays["saliency"] = np.maximum(old, new) if old is not None and old.shape == new.shape else new
    tmp = folder / ".segmentation.tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_artifacts(root: Path, study_uid: str) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """(report.json, segmentation arrays or None); ``FileNotFoundError`` when the study was not analysed."""
    folder = study_dir(root, study_uid)
    report = json.loads((folder / "report.json").read_text())
    seg_path = folder / "segmentation.npz"
    if not seg_path.exists():
        return report, None
    with np.load(seg_path) as z:
        return report, {k: z[k] for k in z.files}


def _refined(voxels: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray | None:
    """The stored edge-refinement voxels as a mask (None when none were stored, or in a file from before they were
    kept, or when they do not fit the volume)."""
    if voxels is None or voxels.size == 0:
        return None
    index = voxels.astype(np.int64)
    if index.min() < 0 or index.max() >= int(np.prod(shape)):
        return None
    mask = np.zeros(shape, dtype=bool)
    mask.flat[index] = True
    return mask


class ReusingSegmenter:
    """A ``Segmenter`` that returns the stored label map of a study analysed before by the same model.

    The stored one is used only when ``report.json`` names the same model version and series and the stored
    geometry (shape, spacing, origin, direction) equals the volume's; anything else, or an unreadable file,
    falls through to the model. ``reused`` counts the hits (for logs and tests)."""

    def __init__(self, inner: Segmenter, root: Path) -> None:
        self.inner, self.root = inner, root
        self.reused = 0

    @property
    def model_version(self) -> str:
        return self.inner.model_version

    @property
    def augmentations(self) -> tuple[str, ...]:
        return self.inner.augmentations if isinstance(self.inner, AugmentingSegmenter) else ()

    def augmented_views(self, volume: Volume, boxes_kji: Sequence[BoxKji]) -> list[list[Segmentation]]:
        """The inner model's test-time augmentation (never stored: only the current study needs it)."""
        if not isinstance(self.inner, AugmentingSegmenter):
            return [[] for _ in boxes_kji]
        return self.inner.augmented_views(volume, boxes_kji)

    def segment(self, volume: Volume) -> Segmentation:
        stored = self._stored(volume)
        if stored is not None:
            self.reused += 1
            return stored
        return self.inner.segment(volume)

    def _stored(self, volume: Volume) -> Segmentation | None:
        acq = volume.acquisition
        if acq is None:
            return None
        try:
            report, arrays = load_artifacts(self.root, acq.study_uid)
        except (FileNotFoundError, InputError, ValueError, OSError):
            return None
        if arrays is None or report.get("model_version") != self.inner.model_version:
            return None
        if (report.get("study") or {}).get("series_uid") != acq.series_uid:
            return None
        same = (
            arrays["labels"].shape == volume.shape
            and np.allclose(arrays["spacing_kji_mm"], volume.spacing_kji_mm, atol=1e-4)
            and np.allclose(arrays["origin_lps_mm"], volume.origin_lps_mm, atol=1e-3)
            and np.allclose(arrays["direction_lps"], volume.direction_lps, atol=1e-5)
        )
        if not same:
            return None
        return Segmentation(
            labels=arrays["labels"].astype(np.uint8),
            lesion_probability=arrays["lesion_probability"].astype(np.float32),
            refined=_refined(arrays.get("refined_voxels"), volume.shape),
        )
