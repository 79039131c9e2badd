"""Does the test-time-augmentation spread say which lesions to doubt? Measured on held-out synthetic patients.

    python -m models.segmentation.evaluate_tta --cohort data/test --out models/weights/tta_metrics.json

writes the figures as JSON and a summary beside it (``TTA_METRICS.md``).

Every lesion the model reports (after the default ``LesionFilter``) is a true positive when it overlaps a true
lesion, else a false positive. For each, its probability, its spread under the configured flips
(``MonaiSegmenter(tta=...)``) and, for true positives, its RECIST diameter error. Reported: how well each
number separates true from false positives (ROC AUC: the chance that a random true positive scores higher
than a random false positive), and whether the long-axis spread grows with the diameter error.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from adapters.dicom_series import load_study
from core.confidence import add_spreads
from core.lesions import LesionFilter, extract_lesions
from core.types import DetectedLesion
from models.segmentation.inference import DEFAULT_WEIGHTS, MonaiSegmenter


def _auc(pos: list[float], neg: list[float]) -> float | None:
    """P(score of a random positive > a random negative), ties half (the Mann-Whitney U statistic)."""
    if not pos or not neg:
        return None
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return round(float(((p > n).sum() + 0.5 * (p == n).sum()) / (p.size * n.size)), 3)


_SCORE_KEYS = (
    "probability",
    "agreement",
    "min_view_probability",
    "minus_probability_range",
    "minus_relative_long_axis_spread",
)


def _scores(d: DetectedLesion) -> dict[str, float]:
    s = d.spread
    assert s is not None
    return {
        "probability": d.probability,
        "agreement": s.agreement,
        "min_view_probability": s.probability_range[0],
        "minus_probability_range": -(s.probability_range[1] - s.probability_range[0]),
        "minus_relative_long_axis_spread": -s.long_axis_spread_mm / max(d.measurement.long_axis_mm, 1e-6),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, required=True)
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--flips", default="lr,ap,lr+ap")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    seg = MonaiSegmenter(args.weights, tta=args.flips.split(","))
    rows: list[dict[str, Any]] = []
    seconds: dict[str, list[float]] = {"segment": [], "tta": []}
    for patient in sorted(p for p in args.cohort.iterdir() if (p / "patient.json").exists()):
        meta = json.loads((patient / "patient.json").read_text())
        for tp in meta["time_points"]:
            tp_dir = patient / tp["folder"]
            vol = load_study(tp_dir / "dicom")
            truth = np.load(tp_dir / "truth_labels.npz")["instances"]
            rows_by_instance = {
                r["instance"]: r for r in json.loads((tp_dir / "truth.json").read_text())["lesions"]
            }
            t0 = time.perf_counter()
            s = seg.segment(vol)
            t1 = time.perf_counter()
            lesions = add_spreads(vol, s, extract_lesions(vol, s, LesionFilter()), seg)
            seconds["segment"].append(t1 - t0)
            seconds["tta"].append(time.perf_counter() - t1)
            for d in lesions:
                assert d.box_kji is not None
                box = tuple(slice(a, b) for a, b in d.box_kji)
                inst = truth[box][s.labels[box] == 3]
                hit = np.bincount(inst[inst > 0]).argmax() if (inst > 0).any() else 0
                row: dict[str, Any] = {
                    "study": f"{meta['patient_id']}/t{tp['time_point']}",
                    "vendor": meta["vendor"]["key"],
                    "true_positive": bool(hit),
                    "long_axis_mm": round(d.measurement.long_axis_mm, 1),
                    **{k: round(v, 4) for k, v in _scores(d).items()},
                    "long_axis_spread_mm": round(d.spread.long_axis_spread_mm, 2) if d.spread else None,
                }
                if hit and rows_by_instance.get(int(hit)):
                    row["long_axis_error_mm"] = round(
                        abs(d.measurement.long_axis_mm - rows_by_instance[int(hit)]["long_axis_mm"]), 2
                    )
                rows.append(row)
    tp_rows = [r for r in rows if r["true_positive"]]
    fp_rows = [r for r in rows if not r["true_positive"]]
    keys = [k for k in rows[0] if k in _SCORE_KEYS] if rows else []
    errs = [(r["long_axis_spread_mm"], r["long_axis_error_mm"]) for r in tp_rows if "long_axis_error_mm" in r]
    big = [e for s_, e in errs if s_ >= 3.0]
    small = [e for s_, e in errs if s_ < 3.0]
    result = {
        "model_version": seg.model_version,
        "flips": list(seg.tta),
        "studies": len(seconds["segment"]),
        "lesions": {"true_positive": len(tp_rows), "false_positive": len(fp_rows)},
        "auc_true_vs_false_positive": {
            k: _auc([r[k] for r in tp_rows], [r[k] for r in fp_rows]) for k in keys
        },
        "all_views_agree": {
            "true_positive": _rate(sum(r["agreement"] == 1.0 for r in tp_rows), len(tp_rows)),
            "false_positive": _rate(sum(r["agreement"] == 1.0 for r in fp_rows), len(fp_rows)),
        },
        "diameter_error_mm_by_spread": {
            "spread_under_3mm": {"n": len(small), "mean_abs": _mean(small)},
            "spread_3mm_or_more": {"n": len(big), "mean_abs": _mean(big)},
            "spearman": _spearman(errs),
        },
        "seconds_per_study": {k: _mean(v) for k, v in seconds.items()},
        "rows": rows,
    }
    summary = {k: v for k, v in result.items() if k != "rows"}
    print(json.dumps(summary, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        (args.out.parent / "TTA_METRICS.md").write_text(markdown(result))


def markdown(m: dict[str, Any]) -> str:
    auc = m["auc_true_vs_false_positive"]
    agree = m["all_views_agree"]
    err = m["diameter_error_mm_by_spread"]
    sec = m["seconds_per_study"]
    names = {
        "probability": "lesion probability (no TTA)",
        "min_view_probability": "lowest probability over the views",
        "minus_relative_long_axis_spread": "long-axis range / long axis (lower is better)",
        "minus_probability_range": "probability range (lower is better)",
        "agreement": "views that find the lesion",
    }
    lines = [
        "# Test-time augmentation spread on held-out synthetic patients",
        "",
        f"Model `{m['model_version']}`, flips {', '.join(m['flips'])} (4 views with the un-augmented one); "
        f"{m['studies']} studies, {m['lesions']['true_positive']} true and {m['lesions']['false_positive']} false "
        "positive lesions. Generated by `python -m models.segmentation.evaluate_tta` (figures in "
        "`tta_metrics.json`).",
        "",
        "## Telling true from false positives (ROC AUC)",
        "",
        "| score | AUC |",
        "|---|---|",
        *[f"| {names[k]} | {v} |" for k, v in auc.items()],
        "",
        f"All views find the lesion: {agree['true_positive']} of true positives, {agree['false_positive']} of false "
        "positives.",
        "",
        "## Long-axis range and diameter error (true positives)",
        "",
        f"Range under 3 mm: {err['spread_under_3mm']['n']} lesions, mean absolute error "
        f"{err['spread_under_3mm']['mean_abs']} mm; 3 mm or more: {err['spread_3mm_or_more']['n']} lesions, "
        f"{err['spread_3mm_or_more']['mean_abs']} mm (Spearman {err['spearman']}).",
        "",
        f"Time per study on one CPU thread: segmentation {sec['segment']} s, TTA {sec['tta']} s.",
    ]
    return "\n".join(lines) + "\n"


def _rate(n: int, d: int) -> float | None:
    return round(n / d, 3) if d else None


def _mean(v: list[float]) -> float | None:
    return round(float(np.mean(v)), 3) if v else None


def _spearman(pairs: list[tuple[float, float]]) -> float | None:
    if len(pairs) < 3:
        return None
    a = np.argsort(np.argsort([p[0] for p in pairs]))
    b = np.argsort(np.argsort([p[1] for p in pairs]))
    return round(float(np.corrcoef(a, b)[0, 1]), 3)


if __name__ == "__main__":
    main()
