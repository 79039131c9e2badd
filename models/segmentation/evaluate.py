"""Measure the committed segmenter on held-out synthetic patients.

    python -m models.segmentation.evaluate --cohort data/test --out models/weights/metrics.json

Per study: lesion-level detection (a true lesion is found when a reported lesion overlaps it),
false positives per study, lesion Dice, RECIST-diameter error of found lesions; per follow-up: the
whole pipeline (priors from the cohort's FHIR Bundle, prior images from the patient folder) and
its RECIST category against the truth. Broken down by vendor, organ and size band.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from adapters.dicom_series import load_study
from adapters.image_folder import FolderImageSource
from adapters.prior_bundle import BundlePriorStore
from core.lesions import LesionFilter, extract_lesions
from core.pipeline import analyze_study
from core.types import LabelId, Segmentation, Volume
from fixtures.synth.demo import compare_with_truth, measurement_ok
from models.segmentation.inference import DEFAULT_WEIGHTS, MonaiSegmenter


class CachedSegmenter:
    """Segments each study once: the evaluation reuses the result in the pipeline run."""

    def __init__(self, inner: MonaiSegmenter) -> None:
        self.inner = inner
        self.cache: dict[str, Segmentation] = {}

    @property
    def model_version(self) -> str:
        return self.inner.model_version

    def segment(self, volume: Volume) -> Segmentation:
        key = volume.acquisition.study_uid if volume.acquisition else str(id(volume))
        if key not in self.cache:
            self.cache[key] = self.inner.segment(volume)
        return self.cache[key]


def _size_band(d: float) -> str:
    return "<10mm" if d < 10 else ("10-20mm" if d < 20 else ">=20mm")


def _rate(num: float, den: float) -> float | None:
    return round(num / den, 4) if den else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, required=True)
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    ap.add_argument("--out", type=Path, default=Path("models/weights/metrics.json"))
    args = ap.parse_args()
    seg = CachedSegmenter(MonaiSegmenter(args.weights))
    keep = LesionFilter()
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # key -> [found, total]
    diam_err: dict[str, list[tuple[float, float]]] = defaultdict(list)  # (truth, measured)
    fp: dict[str, list[int]] = defaultdict(list)
    dice_num = dice_den = 0.0
    recist_rows: list[dict[str, Any]] = []
    t0 = time.time()
    for patient in sorted(p for p in args.cohort.iterdir() if (p / "patient.json").exists()):
        meta = json.loads((patient / "patient.json").read_text())
        vendor = meta["vendor"]["key"]
        for tp in meta["time_points"]:
            tp_dir = patient / tp["folder"]
            truth = json.loads((tp_dir / "truth.json").read_text())
            vol = load_study(tp_dir / "dicom")
            s = seg.segment(vol)
            inst = np.load(tp_dir / "truth_labels.npz")["instances"]
            pred = s.labels == LabelId.LESION
            dice_num += 2.0 * float((pred & (inst > 0)).sum())
            dice_den += float(pred.sum() + (inst > 0).sum())
            lesions = extract_lesions(vol, s, keep)
            comps, _ = ndimage.label(pred, structure=np.ones((3, 3, 3), bool))
            kept_ids: set[int] = set()
            for les in lesions:  # map each kept lesion to its component via its centroid slice
                kji = np.rint(vol.lps_to_kji(les.centroid_lps_mm)).astype(int)
                kji = np.clip(kji, 0, np.array(vol.shape) - 1)
                cid = comps[tuple(kji)]
                if cid == 0:  # centroid outside a concave component: take the nearest voxel
                    pts = np.argwhere(comps > 0)
                    cid = comps[tuple(pts[np.argmin(((pts - kji) ** 2).sum(1))])]
                kept_ids.add(int(cid))
            kept_mask = np.isin(comps, list(kept_ids))
            n_fp = 0
            for cid in kept_ids:
                if not (inst[comps == cid] > 0).any():
                    n_fp += 1
            fp[vendor].append(n_fp)
            fp["all"].append(n_fp)
            for row in truth["lesions"]:
                if not row["present"] or row["voxels"] == 0:
                    continue
                d = row["short_axis_mm"] if row["organ"] == "lymph_node" else row["long_axis_mm"]
                hit = bool(kept_mask[inst == row["instance"]].any())
                for key in ("all", f"vendor:{vendor}", f"organ:{row['organ']}", f"size:{_size_band(d)}"):
                    found[key][1] += 1
                    found[key][0] += int(hit)
                if hit:
                    overl = comps[(inst == row["instance"]) & kept_mask]
                    cid = int(np.bincount(overl).argmax())
                    match = next(
                        (
                            les
                            for les in lesions
                            if comps[
                                tuple(
                                    np.clip(
                                        np.rint(vol.lps_to_kji(les.centroid_lps_mm)).astype(int),
                                        0,
                                        np.array(vol.shape) - 1,
                                    )
                                )
                            ]
                            == cid
                        ),
                        None,
                    )
                    if match is not None:
                        got = (
                            match.measurement.short_axis_mm
                            if row["organ"] == "lymph_node"
                            else match.measurement.long_axis_mm
                        )
                        diam_err["all"].append((d, got))
                        diam_err[f"organ:{row['organ']}"].append((d, got))
            if tp["time_point"] > 0:
                result = analyze_study(
                    str(tp_dir / "dicom"),
                    images=FolderImageSource([patient]),
                    priors=BundlePriorStore(patient / "priors.json"),
                    segmenter=seg,
                )
                agreement = compare_with_truth(result, tp_dir / "truth.json")
                recist_rows.append(
                    {
                        "patient": meta["patient_id"],
                        "time_point": tp["time_point"],
                        "vendor": vendor,
                        "truth": agreement.truth_category,
                        "predicted": agreement.category,
                        "all_lesions_within_tolerance": agreement.ok,
                        "problems": agreement.reason,
                    }
                )
            print(
                f"{meta['patient_id']} {tp['folder']} {vendor}: fp={n_fp} "
                f"found={found['all'][0]}/{found['all'][1]} ({time.time() - t0:.0f} s)",
                flush=True,
            )
    n_rec = len(recist_rows)
    agree = sum(r["truth"] == r["predicted"] for r in recist_rows)
    metrics = {
        "cohort": str(args.cohort),
        "cohort_meta": json.loads((args.cohort / "cohort.json").read_text()),
        "model_version": seg.model_version,
        "lesion_filter": {
            "min_long_axis_mm": keep.min_long_axis_mm,
            "min_volume_ml": keep.min_volume_ml,
            "min_probability": keep.min_probability,
        },
        "detection_sensitivity": {
            k: {"found": v[0], "total": v[1], "rate": _rate(v[0], v[1])} for k, v in sorted(found.items())
        },
        "false_positives_per_study": {k: round(float(np.mean(v)), 3) for k, v in sorted(fp.items())},
        "lesion_dice": round(dice_num / dice_den, 4) if dice_den else None,
        "recist_diameter_error_mm": {
            k: {
                "mean": round(float(np.mean([g - t for t, g in v])), 2),
                "mean_abs": round(float(np.mean([abs(g - t) for t, g in v])), 2),
                "within_tolerance": _rate(sum(measurement_ok(g, t) for t, g in v), len(v)),
                "n": len(v),
            }
            for k, v in sorted(diam_err.items())
        },
        "recist_agreement": {
            "agree": agree,
            "total": n_rec,
            "rate": _rate(agree, n_rec),
            "rows": recist_rows,
        },
        "seconds": round(time.time() - t0, 1),
    }
    args.out.write_text(json.dumps(metrics, indent=1))
    print(
        json.dumps(
            {
                k: metrics[k]
                for k in (
                    "detection_sensitivity",
                    "false_positives_per_study",
                    "lesion_dice",
                    "recist_agreement",
                )
            },
            indent=1,
        )[:4000]
    )


if __name__ == "__main__":
    main()
