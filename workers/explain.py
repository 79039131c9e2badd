"""``interval explain``: occlusion saliency of one lesion, drawn on its key slice (and kept for the web page).

The lesion is named as the reader sees it: ``L2`` of a stored analysis (``--artifacts DIR``: the report the web
page shows; ``--report FILE``: a ``report.json`` of ``interval analyze``), or, with neither, ``L<n>`` of this
study's own detections, largest first. The study is segmented again (the saliency needs the network anyway) and
the reported lesion is the detection nearest its recorded centre.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters.artifacts import save_saliency, study_dir
from adapters.dicom_series import load_study
from adapters.evidence_images import key_slice_png
from adapters.settings import Settings
from core.errors import InputError
from core.lesions import extract_lesions
from core.types import DetectedLesion
from models.segmentation.inference import segmenter_from_settings
from models.segmentation.saliency import LesionSaliency, occlusion_saliency

__all__ = ["Explanation", "explain_lesion"]

_MATCH_MM = 10.0


@dataclass(frozen=True)
class Explanation:
    label: str
    lesion: DetectedLesion
    saliency: LesionSaliency
    seconds: float
    png: Path
    stored_in: Path | None


def explain_lesion(
    study: Path,
    lesion: str,
    out: Path,
    settings: Settings,
    *,
    report: Path | None = None,
    artifacts: Path | None = None,
) -> Explanation:
    volume = load_study(study)
    acq = volume.acquisition
    assert acq is not None  # load_study records it
    stored: Path | None = None
    if artifacts is not None:
        stored = study_dir(artifacts, acq.study_uid) / "report.json"
        if report is None:
            if not stored.is_file():
                raise InputError(
                    f"no stored analysis of this study under {artifacts} (expected {stored.parent.name}/report.json); "
                    "analyse it first or leave out --artifacts",
                    study_uid=acq.study_uid,
                )
            report = stored
    segmenter = segmenter_from_settings(settings, tta=False)
    seg = segmenter.segment(volume)
    found = extract_lesions(volume, seg, settings.analysis().lesion_filter)
    target = _find(found, lesion, report, acq.study_uid)
    assert target.box_kji is not None
    t0 = time.perf_counter()
    sal = occlusion_saliency(segmenter, volume, target.box_kji)
    seconds = time.perf_counter() - t0
    overlay = sal.overlay(volume.shape)
    drawn = {
        "organ": target.organ.value,
        "current": {
            "slice_index": target.measurement.slice_index,
            "long_axis_endpoints_kji": [list(e) for e in target.measurement.long_axis_endpoints_kji],
        },
    }
    png = key_slice_png(volume, drawn, labels=seg.labels, saliency=overlay)
    if png is None:
        raise InputError(f"lesion {lesion} cannot be drawn on this study", study_uid=acq.study_uid)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(png)
    kept = save_saliency(artifacts, acq.study_uid, overlay) if stored is not None and artifacts else None
    return Explanation(lesion, target, sal, seconds, out, kept)


def _find(found: list[DetectedLesion], name: str, report: Path | None, study_uid: str) -> DetectedLesion:
    if report is None:
        n = int(name[1:]) if name[:1].upper() == "L" and name[1:].isdigit() else 0
        hit = next((d for d in found if d.lesion_id == n), None)
        if hit is None:
            raise InputError(
                f"no lesion {name!r} on this study: the model finds {len(found)} (L1..L{len(found)}, largest "
                "first); name a lesion of an analysis with --report or --artifacts",
                study_uid=study_uid,
            )
        return hit
    rows: list[dict[str, Any]] = json.loads(report.read_text()).get("lesions", [])
    row = next((r for r in rows if name in (r.get("label"), r.get("track_id"))), None)
    if row is None or not row.get("current"):
        labels = ", ".join(str(r.get("label")) for r in rows if r.get("current")) or "none"
        raise InputError(
            f"{report.name} has no lesion {name!r} seen on this study (lesions measured: {labels})",
            study_uid=study_uid,
        )
    centre = np.asarray(row["current"]["centroid_lps_mm"], dtype=float)
    best = min(
        found, key=lambda d: float(np.linalg.norm(np.subtract(d.centroid_lps_mm, centre))), default=None
    )
    if best is None or float(np.linalg.norm(np.subtract(best.centroid_lps_mm, centre))) > _MATCH_MM:
        raise InputError(
            f"lesion {name} of {report.name} is not found again by the current model within {_MATCH_MM:g} mm "
            "(another model or settings?)",
            study_uid=study_uid,
        )
    return best
