"""Lesion-level validation of a segmenter on a labelled cohort, broken down the way a site asks about it.

A labelled cohort is Interval's synthetic cohort format (``interval synth``), which a site can also fill with its
own annotated studies: one folder per patient with ``patient.json`` (vendor, time points) and, per time point,
``dicom/`` (the CT series), ``truth_labels.npz`` (``labels`` with ``core.types.LabelId`` values and ``instances``,
one id per lesion) and ``truth.json`` (per lesion: label, organ, long and short axis, whether present).

Per study: a true lesion is **found** when a reported lesion (``core.lesions.extract_lesions`` with the
pipeline's ``LesionFilter``) overlaps it; a reported lesion overlapping no true lesion is a **false positive**;
the **diameter error** is the reported RECIST diameter (long axis; short axis for lymph nodes) minus the truth's;
lesion **Dice** pools all voxels. ``summarize`` groups by vendor, organ, size band and vendor x size band and
checks the imaging issue's targets: sensitivity >= 95% for lesions >= 10 mm, <= 0.5 false positives per study,
median absolute diameter error <= 1.5 mm, per vendor.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from adapters.dicom_series import load_study
from core.lesions import LesionFilter, extract_lesions
from core.ports import Segmenter
from core.types import LabelId, Segmentation, Volume

__all__ = [
    "TARGETS",
    "LesionRecord",
    "StudyRecord",
    "cohort_studies",
    "markdown_table",
    "score_study",
    "summarize",
    "validate_cohort",
]

TARGETS = {"sensitivity_ge10mm": 0.95, "false_positives_per_study": 0.5, "median_abs_diameter_error_mm": 1.5}


@dataclass(frozen=True)
class LesionRecord:
    organ: str
    diameter_mm: float  # RECIST diameter of the truth: long axis, short axis for lymph nodes
    found: bool
    measured_mm: float | None


@dataclass
class StudyRecord:
    patient: str
    time_point: str
    vendor: str
    scanner: str  # manufacturer / model / station, the key a site calibration is chosen by
    false_positives: int
    dice_overlap: float  # 2 |A and B|
    dice_total: float  # |A| + |B|
    lesions: list[LesionRecord] = field(default_factory=list)
    subgroups: dict[str, str] = field(default_factory=dict)  # sex, age band, body size, vendor (for audits)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> StudyRecord:
        return cls(**{**d, "lesions": [LesionRecord(**r) for r in d["lesions"]]})


def size_band(diameter_mm: float) -> str:
    return "<10mm" if diameter_mm < 10 else ("10-20mm" if diameter_mm < 20 else ">=20mm")


def cohort_studies(cohort: Path, vendors: set[str] | None = None) -> Iterator[tuple[dict[str, Any], Path]]:
    """(patient.json, time point folder) of every study in ``cohort``, in order."""
    for patient in sorted(p for p in cohort.iterdir() if (p / "patient.json").exists()):
        meta = json.loads((patient / "patient.json").read_text())
        if vendors and meta["vendor"]["key"] not in vendors:
            continue
        for tp in meta["time_points"]:
            yield meta, patient / tp["folder"]


def _component_at(comps: np.ndarray, volume: Volume, centroid_lps: tuple[float, float, float]) -> int:
    kji = np.clip(np.rint(volume.lps_to_kji(centroid_lps)).astype(int), 0, np.array(volume.shape) - 1)
    cid = int(comps[tuple(kji)])
    if cid == 0:  # centroid outside a concave component: the nearest lesion voxel
        pts = np.argwhere(comps > 0)
        cid = int(comps[tuple(pts[np.argmin(((pts - kji) ** 2).sum(1))])])
    return cid


def score_study(
    volume: Volume, seg: Segmentation, truth: dict[str, Any], instances: np.ndarray, keep: LesionFilter
) -> tuple[int, float, float, list[LesionRecord]]:
    """(false positives, Dice overlap, Dice total, one record per true lesion present) of one study."""
    pred = seg.labels == LabelId.LESION
    overlap = 2.0 * float((pred & (instances > 0)).sum())
    total = float(pred.sum() + (instances > 0).sum())
    lesions = extract_lesions(volume, seg, keep)
    comps, _ = ndimage.label(pred, structure=np.ones((3, 3, 3), bool))
    by_component = {_component_at(comps, volume, les.centroid_lps_mm): les for les in lesions}
    kept = np.isin(comps, list(by_component))
    false_positives = sum(1 for cid in by_component if not (instances[comps == cid] > 0).any())
    records = []
    for row in truth["lesions"]:
        if not row["present"] or row.get("voxels", 1) == 0:
            continue
        nodal = row["organ"] == "lymph_node"
        diameter = float(row["short_axis_mm"] if nodal else row["long_axis_mm"])
        mine = instances == row["instance"]
        hit = bool(kept[mine].any())
        measured = None
        if hit:
            les = by_component.get(int(np.bincount(comps[mine & kept]).argmax()))
            if les is not None:
                m = les.measurement
                measured = float(m.short_axis_mm if nodal else m.long_axis_mm)
        records.append(LesionRecord(row["organ"], diameter, hit, measured))
    return false_positives, overlap, total, records


def validate_cohort(
    cohort: Path,
    segmenter: Segmenter,
    keep: LesionFilter | None = None,
    vendors: set[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[StudyRecord]:
    """Segment every study of ``cohort`` and score it against its labels."""
    keep = keep or LesionFilter()
    out: list[StudyRecord] = []
    started = time.monotonic()
    for meta, folder in cohort_studies(cohort, vendors):
        volume = load_study(folder / "dicom")
        seg = segmenter.segment(volume)
        truth = json.loads((folder / "truth.json").read_text())
        instances = np.load(folder / "truth_labels.npz")["instances"]
        fp, overlap, total, lesions = score_study(volume, seg, truth, instances, keep)
        acq = volume.acquisition
        scanner = f"{acq.manufacturer} / {acq.model_name} / {acq.station_name}" if acq else "unknown"
        groups = {
            "sex": meta.get("sex"),
            "age_band": meta.get("age_band"),
            "body_size": meta.get("body_size"),
        }
        groups = {k: str(v) for k, v in groups.items() if v is not None} | {"vendor": meta["vendor"]["key"]}
        out.append(
            StudyRecord(
                meta["patient_id"],
                folder.name,
                meta["vendor"]["key"],
                scanner,
                fp,
                overlap,
                total,
                lesions,
                groups,
            )
        )
        if progress is not None:
            found = sum(r.found for r in lesions)
            progress(
                f"{meta['patient_id']} {folder.name} {meta['vendor']['key']}: {found}/{len(lesions)} found, "
                f"{fp} false positive(s) ({time.monotonic() - started:.0f} s)"
            )
    return out


def _group(found: list[bool], errors: list[float]) -> dict[str, Any]:
    n = len(found)
    return {
        "found": int(sum(found)),
        "total": n,
        "sensitivity": round(sum(found) / n, 4) if n else None,
        "n_measured": len(errors),
        "median_abs_diameter_error_mm": round(float(np.median(np.abs(errors))), 2) if errors else None,
        "mean_diameter_error_mm": round(float(np.mean(errors)), 2) if errors else None,
    }


def summarize(records: list[StudyRecord]) -> dict[str, Any]:
    """Groups (all, vendor:, organ:, size:, vendor x size) and per-vendor checks against ``TARGETS``."""
    found: dict[str, list[bool]] = defaultdict(list)
    errors: dict[str, list[float]] = defaultdict(list)
    fps: dict[str, list[int]] = defaultdict(list)
    dice: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for study in records:
        for key in ("all", f"vendor:{study.vendor}"):
            fps[key].append(study.false_positives)
            dice[key][0] += study.dice_overlap
            dice[key][1] += study.dice_total
        for les in study.lesions:
            band = size_band(les.diameter_mm)
            keys = ["all", f"vendor:{study.vendor}", f"organ:{les.organ}", f"size:{band}"]
            keys.append(f"vendor:{study.vendor} size:{'>=10mm' if les.diameter_mm >= 10 else '<10mm'}")
            for key in keys:
                found[key].append(les.found)
                if les.measured_mm is not None:
                    errors[key].append(les.measured_mm - les.diameter_mm)
    groups: dict[str, dict[str, Any]] = {}
    for key in sorted(found):
        groups[key] = _group(found[key], errors[key])
        if key in fps:
            groups[key]["studies"] = len(fps[key])
            groups[key]["false_positives_per_study"] = round(float(np.mean(fps[key])), 3)
            num, den = dice[key]
            groups[key]["lesion_dice"] = round(num / den, 4) if den else None
    per_vendor: dict[str, dict[str, Any]] = {}
    for vendor in sorted({s.vendor for s in records}):
        big = groups.get(f"vendor:{vendor} size:>=10mm", {})
        whole = groups.get(f"vendor:{vendor}", {})
        row = {
            "studies": whole.get("studies", 0),
            "sensitivity_ge10mm": big.get("sensitivity"),
            "found_ge10mm": f"{big.get('found', 0)}/{big.get('total', 0)}",
            "sensitivity_all": whole.get("sensitivity"),
            "false_positives_per_study": whole.get("false_positives_per_study"),
            "median_abs_diameter_error_mm": whole.get("median_abs_diameter_error_mm"),
            "lesion_dice": whole.get("lesion_dice"),
        }
        sens, fp, err = (
            row["sensitivity_ge10mm"],
            row["false_positives_per_study"],
            row["median_abs_diameter_error_mm"],
        )
        row["meets_targets"] = {  # nothing measured is not a target met
            "sensitivity_ge10mm": sens is not None and sens >= TARGETS["sensitivity_ge10mm"],
            "false_positives_per_study": fp is not None and fp <= TARGETS["false_positives_per_study"],
            "median_abs_diameter_error_mm": err is not None
            and err <= TARGETS["median_abs_diameter_error_mm"],
        }
        per_vendor[vendor] = row
    return {"targets": TARGETS, "per_vendor": per_vendor, "groups": groups}


def markdown_table(summary: dict[str, Any]) -> str:
    """The per-vendor table (targets marked) and the group table, as Markdown."""

    def cell(value: Any, ok: bool | None = None) -> str:
        text = "-" if value is None else str(value)
        return text if ok is None else f"{text} {'ok' if ok else 'MISSED'}"

    lines = [
        "| vendor | studies | sensitivity >= 10 mm | found | sensitivity (all) | FP / study | "
        "median abs diameter error (mm) | lesion Dice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for vendor, r in summary["per_vendor"].items():
        ok = r["meets_targets"]
        lines.append(
            f"| {vendor} | {r['studies']} | {cell(r['sensitivity_ge10mm'], ok['sensitivity_ge10mm'])} | "
            f"{r['found_ge10mm']} | {cell(r['sensitivity_all'])} | "
            f"{cell(r['false_positives_per_study'], ok['false_positives_per_study'])} | "
            f"{cell(r['median_abs_diameter_error_mm'], ok['median_abs_diameter_error_mm'])} | "
            f"{cell(r['lesion_dice'])} |"
        )
    lines += [
        "",
        "| group | found / total | sensitivity | median abs diameter error (mm) | mean error (mm) |",
        "|---|---|---|---|---|",
    ]
    for key, g in summary["groups"].items():
        lines.append(
            f"| {key} | {g['found']} / {g['total']} | {cell(g['sensitivity'])} | "
            f"{cell(g['median_abs_diameter_error_mm'])} | {cell(g['mean_diameter_error_mm'])} |"
        )
    return "\n".join(lines) + "\n"


def records_json(records: list[StudyRecord]) -> list[dict[str, Any]]:
    return [asdict(r) for r in records]
