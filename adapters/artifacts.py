"""Per-study artifacts kept for the people who read the report: the result and the label map it rests on.

``<root>/<StudyInstanceUID>/report.json``  the analysis (``adapters.report_json.result_to_json``)
``<root>/<StudyInstanceUID>/draft.json``  per sentence: model text, replaced or added, and why
``<root>/<StudyInstanceUID>/segmentation.npz``  ``labels`` (uint8, [k, j, i]) and ``lesion_probability``
(float16), with the volume's geometry, so evidence images (key slice + contour) can be drawn later
without running the model again.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from adapters.report_json import result_to_json
from core.errors import InputError
from core.pipeline import StudyResult

__all__ = ["load_artifacts", "save_artifacts", "study_dir"]

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
            spacing_kji_mm=np.asarray(result.spacing_kji_mm),
            origin_lps_mm=np.asarray(result.origin_lps_mm),
            direction_lps=np.asarray(result.direction_lps),
        )
        os.replace(tmp, folder / "segmentation.npz")
    return folder


def load_artifacts(root: Path, study_uid: str) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """(report.json, segmentation arrays or None); ``FileNotFoundError`` when the study was not analysed."""
    folder = study_dir(root, study_uid)
    report = json.loads((folder / "report.json").read_text())
    seg_path = folder / "segmentation.npz"
    if not seg_path.exists():
        return report, None
    with np.load(seg_path) as z:
        return report, {k: z[k] for k in z.files}
