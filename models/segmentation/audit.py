"""Subgroup audit: does the segmenter serve some patients worse than others?

For each attribute (sex, age band, body size, vendor) and each of its values, on the per-study records of a
validation run (``models.segmentation.validation``): lesion sensitivity (all lesions and >= 10 mm), false
positives per study and median absolute RECIST-diameter error, each with a 95% bootstrap confidence interval,
and the gap to the rest of the cohort with its own interval. Resampling is by patient (a patient's studies and
lesions are not independent). A subgroup is **flagged** when its gap is worse than the threshold and the gap's
interval excludes zero: a sensitivity ``SENSITIVITY_GAP`` lower, ``FP_GAP`` more false positives per study, or
``ERROR_GAP`` mm more diameter error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from models.segmentation.validation import StudyRecord

__all__ = ["ATTRIBUTES", "audit", "audit_markdown"]

ATTRIBUTES = ("sex", "age_band", "body_size", "vendor")
SENSITIVITY_GAP = 0.10
FP_GAP = 0.5
ERROR_GAP = 1.0

Metric = Callable[[Sequence[StudyRecord]], float | None]


def _sensitivity(min_mm: float) -> Metric:
    def f(studies: Sequence[StudyRecord]) -> float | None:
        hits = [les.found for s in studies for les in s.lesions if les.diameter_mm >= min_mm]
        return float(np.mean(hits)) if hits else None

    return f


def _fp(studies: Sequence[StudyRecord]) -> float | None:
    return float(np.mean([s.false_positives for s in studies])) if studies else None


def _error(studies: Sequence[StudyRecord]) -> float | None:
    errs = [
        abs(les.measured_mm - les.diameter_mm)
        for s in studies
        for les in s.lesions
        if les.measured_mm is not None
    ]
    return float(np.median(errs)) if errs else None


METRICS: dict[str, tuple[Metric, float, int]] = {  # name -> (metric, gap threshold, worse direction)
    "sensitivity": (_sensitivity(0.0), SENSITIVITY_GAP, -1),
    "sensitivity_ge10mm": (_sensitivity(10.0), SENSITIVITY_GAP, -1),
    "false_positives_per_study": (_fp, FP_GAP, 1),
    "median_abs_diameter_error_mm": (_error, ERROR_GAP, 1),
}


def _by_patient(records: Sequence[StudyRecord]) -> dict[str, list[StudyRecord]]:
    out: dict[str, list[StudyRecord]] = {}
    for r in records:
        out.setdefault(r.patient, []).append(r)
    return out


def _resample(patients: list[list[StudyRecord]], rng: np.random.Generator) -> list[StudyRecord]:
    picks = rng.integers(0, len(patients), len(patients))
    return [s for i in picks for s in patients[i]]


def _ci(values: list[float]) -> list[float] | None:
    return (
        [round(float(np.percentile(values, 2.5)), 3), round(float(np.percentile(values, 97.5)), 3)]
        if values
        else None
    )


def audit(records: Sequence[StudyRecord], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per attribute and value: metrics with CIs, gaps to the rest with CIs, and the flagged subgroups."""
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    for attr in ATTRIBUTES:
        values = sorted({r.subgroups[attr] for r in records if attr in r.subgroups})
        if len(values) < 2:
            continue
        for value in values:
            group = _by_patient([r for r in records if r.subgroups.get(attr) == value])
            rest = _by_patient([r for r in records if r.subgroups.get(attr) != value])
            g_pat, r_pat = list(group.values()), list(rest.values())
            row: dict[str, Any] = {
                "attribute": attr,
                "value": value,
                "patients": len(g_pat),
                "studies": sum(len(p) for p in g_pat),
                "lesions": sum(len(s.lesions) for p in g_pat for s in p),
                "metrics": {},
                "flags": [],
            }
            boots: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in METRICS}
            for _ in range(n_boot):
                g = _resample(g_pat, rng)
                o = _resample(r_pat, rng)
                for name, (metric, _, _) in METRICS.items():
                    a, b = metric(g), metric(o)
                    if a is not None:
                        boots[name][0].append(a)
                        if b is not None:
                            boots[name][1].append(a - b)
            for name, (metric, gap, worse) in METRICS.items():
                mine = metric([s for p in g_pat for s in p])
                others = metric([s for p in r_pat for s in p])
                diff = None if mine is None or others is None else mine - others
                diff_ci = _ci(boots[name][1])
                row["metrics"][name] = {
                    "value": None if mine is None else round(mine, 3),
                    "ci95": _ci(boots[name][0]),
                    "rest": None if others is None else round(others, 3),
                    "gap": None if diff is None else round(diff, 3),
                    "gap_ci95": diff_ci,
                }
                if diff is not None and diff_ci is not None and worse * diff >= gap:
                    excludes_zero = diff_ci[1] < 0 if worse < 0 else diff_ci[0] > 0
                    if excludes_zero:
                        row["flags"].append(name)
            rows.append(row)
    flagged = [
        {"attribute": r["attribute"], "value": r["value"], "metrics": r["flags"]} for r in rows if r["flags"]
    ]
    result = {
        "thresholds": {"sensitivity_gap": SENSITIVITY_GAP, "fp_gap": FP_GAP, "error_gap_mm": ERROR_GAP},
        "bootstrap": {"resamples": n_boot, "unit": "patient", "seed": seed},
        "rows": rows,
        "flagged": flagged,
    }
    result["markdown"] = audit_markdown(result)
    return result


def audit_markdown(result: dict[str, Any]) -> str:
    def cell(m: dict[str, Any], pct: bool) -> str:
        if m["value"] is None:
            return "-"

        def f(v: float) -> str:
            return f"{100 * v:.0f}%" if pct else f"{v:.2f}"

        ci = m["ci95"]
        return f"{f(m['value'])} [{f(ci[0])}, {f(ci[1])}]" if ci else f(m["value"])

    lines = [
        "| attribute | value | patients | lesions | sensitivity | sensitivity >= 10 mm | FP / study | "
        "median abs error (mm) | flagged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        m = r["metrics"]
        lines.append(
            f"| {r['attribute']} | {r['value']} | {r['patients']} | {r['lesions']} | "
            f"{cell(m['sensitivity'], True)} | {cell(m['sensitivity_ge10mm'], True)} | "
            f"{cell(m['false_positives_per_study'], False)} | {cell(m['median_abs_diameter_error_mm'], False)} | "
            f"{', '.join(r['flags']) or '-'} |"
        )
    t = result["thresholds"]
    lines.append("")
    lines.append(
        f"95% bootstrap intervals ({result['bootstrap']['resamples']} resamples of patients). Flagged: a gap to the "
        f"rest of at least {100 * t['sensitivity_gap']:.0f} points of sensitivity, {t['fp_gap']} FP/study or "
        f"{t['error_gap_mm']} mm of error, whose interval excludes zero."
    )
    return "\n".join(lines) + "\n"
