"""The outgoing JSON of one analysis (``report.json``) and its Markdown twin (``report.md``)."""

from __future__ import annotations

from typing import Any

from core.pipeline import StudyResult, TrackedLesion
from core.types import LesionSpread, PriorFinding, PriorTimePoint

__all__ = ["SCHEMA_VERSION", "result_to_json", "result_to_markdown", "result_to_time_point"]

SCHEMA_VERSION = "interval.report/1"


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)


def _spread(s: LesionSpread | None) -> dict[str, Any] | None:
    """Test-time-augmentation spread: (low, high) over the un-augmented result and each augmentation."""
    if s is None:
        return None
    return {
        "augmentations": list(s.augmentations),
        "views": s.views,
        "detected_in": s.detected_in,
        "agreement": round(s.agreement, 3),
        "probability": [round(v, 3) for v in s.probability_range],
        "long_axis_mm": [round(v, 1) for v in s.long_axis_mm_range],
        "volume_ml": [round(v, 2) for v in s.volume_ml_range],
    }


def _lesion(t: TrackedLesion) -> dict[str, Any]:
    det = t.detected
    m = det.measurement if det else None
    return {
        "track_id": t.track_id,
        "label": t.label,
        "organ": t.organ.value,
        "laterality": t.laterality,
        "recist_role": t.role.value if t.role else None,
        "status": t.status.value,
        "change": t.change.value,
        "current": None
        if m is None or det is None
        else {
            "long_axis_mm": _r(m.long_axis_mm),
            "short_axis_mm": _r(m.short_axis_mm),
            "volume_ml": _r(m.volume_ml, 2),
            "slice_index": m.slice_index,
            "long_axis_endpoints_kji": [
                list(map(lambda v: round(v, 2), e)) for e in m.long_axis_endpoints_kji
            ],
            "centroid_lps_mm": [round(c, 1) for c in det.centroid_lps_mm],
            "probability": round(det.probability, 3),
            "box_kji": [list(b) for b in det.box_kji] if det.box_kji else None,
            "tta": _spread(det.spread),
        },
        "prior": None
        if t.prior is None
        else {
            "date": t.prior_date.isoformat() if t.prior_date else None,
            "long_axis_mm": _r(t.prior.long_axis_mm),
            "short_axis_mm": _r(t.prior.short_axis_mm),
            "source": t.prior.source,
            "remeasured_long_axis_mm": _r(t.prior_remeasured[0]) if t.prior_remeasured else None,
            "remeasured_short_axis_mm": _r(t.prior_remeasured[1]) if t.prior_remeasured else None,
        },
        "match_distance_mm": _r(t.match_distance_mm),
        "match_method": t.match_method,
        "equivocal": t.equivocal,
        "guided": t.guided,
    }


def result_to_json(result: StudyResult) -> dict[str, Any]:
    a = result.acquisition
    r = result.recist
    return {
        "schema": SCHEMA_VERSION,
        "study": {
            "study_uid": a.study_uid,
            "series_uid": a.series_uid,
            "study_date": a.study_date.isoformat(),
            "accession_number": a.accession_number,
            "manufacturer": a.manufacturer,
            "model_name": a.model_name,
            "kernel": a.kernel,
            "kvp": a.kvp,
            "slice_thickness_mm": a.slice_thickness_mm,
            "station_name": a.station_name,
            "shape_kji": list(result.volume_shape),
            "spacing_kji_mm": [round(s, 4) for s in result.spacing_kji_mm],
        },
        "model_version": result.model_version,
        "prior_dates": [d.isoformat() for d in result.prior_dates],
        "alignments": {
            uid: {
                "translation_lps_mm": [round(v, 1) for v in al.translation_lps_mm],
                "score": round(al.score, 3),
                "method": al.method,
            }
            for uid, al in result.alignments.items()
        },
        "lesions": [_lesion(t) for t in result.lesions],
        "recist": None
        if r is None
        else {
            "category": r.category.value,
            "category_label": r.category.label,
            "target_response": r.target_response.value if r.target_response else None,
            "non_target_response": r.non_target_response.value,
            "baseline_sum_mm": _r(r.baseline_sum_mm),
            "nadir_sum_mm": _r(r.nadir_sum_mm),
            "current_sum_mm": _r(r.current_sum_mm),
            "change_from_baseline_pct": _r(r.change_from_baseline_pct),
            "change_from_nadir_pct": _r(r.change_from_nadir_pct),
            "change_from_nadir_mm": _r(r.change_from_nadir_mm),
            "new_lesions": list(r.new_lesions),
            "trace": list(r.trace),
        },
        "irecist": None
        if result.irecist is None
        else {"response": result.irecist.response.value, "trace": list(result.irecist.trace)},
        "history": [
            {
                "study_date": a.study_date.isoformat(),
                "study_uid": a.study_uid,
                "target_sum_mm": _r(a.target_sum_mm),
                "recist": a.recist.category.value if a.recist else None,
                "irecist": a.irecist.response.value if a.irecist else None,
            }
            for a in result.history
        ],
        "report": {
            "comparison": result.report.comparison,
            "findings": result.report.findings,
            "impression": result.report.impression,
            "author": "deterministic",
        },
        "warnings": list(result.warnings),
        "step_seconds": result.step_seconds,
    }


def result_to_markdown(result: StudyResult) -> str:
    a = result.acquisition
    lines = [
        f"# CT follow-up report — study of {a.study_date.isoformat()}",
        "",
        "_Preliminary: drafted by Interval, to be reviewed and signed by a radiologist._",
        "",
        result.report.as_markdown(),
    ]
    if result.recist is not None:
        lines += ["## RECIST 1.1 reasoning", ""] + [f"- {s}" for s in result.recist.trace] + [""]
    lines += [
        "## Lesions",
        "",
        "| lesion | site | role | prior | current | change | confidence |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in result.lesions:
        m = t.detected.measurement if t.detected else None
        prior = f"{t.prior.long_axis_mm:.0f} x {t.prior.short_axis_mm:.0f} mm" if t.prior else "—"
        cur = f"{m.long_axis_mm:.0f} x {m.short_axis_mm:.0f} mm" if m else t.status.value
        site = t.organ.value.replace("_", " ") + (f" ({t.laterality})" if t.laterality else "")
        lines.append(
            f"| {t.label} | {site} | {t.role.value if t.role else '—'} | {prior} | {cur} | {t.change.value} "
            f"| {_confidence_text(t)} |"
        )
    if result.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in result.warnings]
    lines += [
        "",
        f"Model: `{result.model_version}`. Scanner: {a.manufacturer} {a.model_name}, kernel {a.kernel}.",
    ]
    return "\n".join(lines) + "\n"


def _confidence_text(t: TrackedLesion) -> str:
    """``p 0.93; flips 4/4, 21-24 mm``: the lesion probability and, with TTA, how many views found it and the
    range of its long axis."""
    det = t.detected
    if det is None:
        return "—"
    text = f"p {det.probability:.2f}"
    s = det.spread
    if s is not None:
        lo, hi = s.long_axis_mm_range
        text += f"; flips {s.detected_in}/{s.views}, {lo:.0f}-{hi:.0f} mm"
    return text


def result_to_time_point(result: StudyResult) -> PriorTimePoint:
    """This study's findings as the EHR will hold them (the next study's prior)."""
    findings = tuple(
        PriorFinding(
            track_id=t.track_id,
            organ=t.organ,
            long_axis_mm=round(t.detected.measurement.long_axis_mm, 1),
            short_axis_mm=round(t.detected.measurement.short_axis_mm, 1),
            centroid_lps_mm=(
                round(t.detected.centroid_lps_mm[0], 1),
                round(t.detected.centroid_lps_mm[1], 1),
                round(t.detected.centroid_lps_mm[2], 1),
            ),
            role=t.role,
            laterality=t.laterality,
            label=t.label,
        )
        for t in result.lesions
        if t.detected is not None
    )
    return PriorTimePoint(
        study_date=result.acquisition.study_date,
        study_uid=result.acquisition.study_uid,
        findings=findings,
        report_text=result.report.as_text(),
    )
