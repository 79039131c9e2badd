"""Hard examples for a further training leg: where the current model errs on its own training cohort.

    python -m models.segmentation.mining --cohort data/train --cohort data/train-more \
        --weights models/weights/segmenter.pt --out models/weights/hard_examples.json

Every time point of the cohort is segmented as at inference (``MonaiSegmenter.probabilities``, argmax) and
compared with its truth:

- each lesion instance gets its Dice, counted inside the instance's box padded by ``PAD`` voxels, so that a
  missed lesion reads 0 and an under-segmented one its overlap;
- each predicted lesion component of at least ``MIN_FP_VOXELS`` voxels that touches no true lesion is a false
  positive, kept as its most probable voxel.

``models.segmentation.train --hard-examples FILE`` then draws lesion patches with weight
``LESION_FLOOR + (1 - Dice)`` (a missed lesion about four times as often as a well-segmented one) and centres
a share of patches on the false positives (hard negatives), as lesion detection pipelines do. The file
records the weights it was mined with, so a leg trained on it says which model's errors it learned from; a
rerun with the same weights and ``--out`` keeps what is mined already and adds the rest (an interrupted run, or
a cohort added).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from adapters.dicom_series import load_study
from core.types import LabelId

__all__ = ["LESION_FLOOR", "MIN_FP_VOXELS", "PAD", "CaseErrors", "case_errors", "lesion_weights"]

PAD = 3  # voxels around a true lesion's box in which its Dice is counted
MIN_FP_VOXELS = 4  # smaller false components are noise the lesion filter drops anyway
LESION_FLOOR = 0.25  # a perfectly segmented lesion keeps this weight: nothing learned is forgotten


@dataclass(frozen=True, slots=True)
class CaseErrors:
    """One time point's errors: Dice of each lesion instance (by instance number) and false positives."""

    lesion_dice: dict[int, float]
    false_positives: list[tuple[int, int, int]]  # (k, j, i) of each false component's most probable voxel

    def to_json(self) -> dict[str, object]:
        return {
            "lesions": [{"instance": i, "dice": round(d, 3)} for i, d in sorted(self.lesion_dice.items())],
            "false_positives": [list(p) for p in self.false_positives],
        }


def case_errors(
    predicted: npt.NDArray[np.uint8],
    lesion_probability: npt.NDArray[np.float32],
    instances: npt.NDArray[np.integer],
) -> CaseErrors:
    """Compare a predicted label map (with its lesion probability) with a true lesion instance map."""
    pred = predicted == LabelId.LESION
    dice: dict[int, float] = {}
    boxes = ndimage.find_objects(instances.astype(np.int32))
    for number, box in enumerate(boxes, start=1):
        if box is None:
            continue
        padded = tuple(
            slice(max(0, s.start - PAD), min(n, s.stop + PAD))
            for s, n in zip(box, instances.shape, strict=True)
        )
        truth = instances[padded] == number
        p = pred[padded]
        dice[number] = float(
            2 * np.count_nonzero(p & truth) / (np.count_nonzero(p) + np.count_nonzero(truth))
        )
    components, n = ndimage.label(pred)
    touches = np.zeros(n + 1, bool)
    touches[np.unique(components[(instances > 0) & pred])] = True
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    kept = [c for c in range(1, n + 1) if not touches[c] and sizes[c] >= MIN_FP_VOXELS]
    peaks = ndimage.maximum_position(lesion_probability, components, kept) if kept else []
    false = [(int(k), int(j), int(i)) for k, j, i in peaks]
    return CaseErrors(dice, false)


def lesion_weights(dice: list[float]) -> npt.NDArray[np.float64]:
    """Draw weights of lesions with these Dice values: ``LESION_FLOOR + (1 - Dice)``."""
    return LESION_FLOOR + (1.0 - np.clip(np.asarray(dice, np.float64), 0.0, 1.0))


def _time_points(cohorts: list[Path]) -> list[Path]:
    return [t for c in cohorts for p in sorted(c.glob("*/patient.json")) for t in sorted(p.parent.glob("t*"))]


def main() -> None:
    from models.segmentation.inference import MonaiSegmenter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cohort", type=Path, action="append", required=True, help="repeatable")
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    digest = hashlib.sha256(args.weights.read_bytes()).hexdigest()[:12]
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    # a rerun with the same weights keeps the time points already mined (an interrupted run, a cohort added)
    cases: dict[str, dict[str, Any]] = (
        previous.get("cases", {}) if previous.get("weights_sha256") == digest else {}
    )
    elapsed = float(previous.get("summary", {}).get("elapsed_s", 0)) if cases else 0.0
    cohorts = list(dict.fromkeys([*(previous.get("cohorts", []) if cases else []), *map(str, args.cohort)]))
    segmenter = MonaiSegmenter(args.weights)
    t0 = time.time()

    def write() -> None:
        record = {
            "weights": str(args.weights),
            "weights_sha256": digest,
            "cohorts": cohorts,
            "rule": {"pad_voxels": PAD, "min_fp_voxels": MIN_FP_VOXELS, "lesion_floor": LESION_FLOOR},
            "summary": _summary(cases, elapsed + time.time() - t0),
            "cases": cases,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1))

    for tp in _time_points(args.cohort):
        key = f"{tp.parent.name}/{tp.name}"
        if key in cases or not (tp / "dicom").is_dir():
            continue
        volume = load_study(tp / "dicom")
        prob = segmenter.probabilities(volume)
        if prob.shape[1:] != volume.shape:
            raise SystemExit(
                f"{tp}: the cohort's grid is not the model's working grid; mine on a training cohort"
            )
        instances = np.load(tp / "truth_labels.npz")["instances"]
        errors = case_errors(np.argmax(prob, axis=0).astype(np.uint8), prob[LabelId.LESION], instances)
        cases[key] = errors.to_json()
        print(f"{key}: {len(errors.lesion_dice)} lesions, {len(errors.false_positives)} FP", flush=True)
        if len(cases) % 20 == 0:
            write()
    write()
    print(json.dumps(_summary(cases, elapsed + time.time() - t0)), flush=True)


def _summary(cases: dict[str, dict[str, Any]], elapsed_s: float) -> dict[str, object]:
    d = np.asarray([lesion["dice"] for c in cases.values() for lesion in c["lesions"]], np.float64)
    return {
        "time_points": len(cases),
        "lesions": int(d.size),
        "missed (Dice < 0.1)": int((d < 0.1).sum()),
        "median_dice": round(float(np.median(d)), 3) if d.size else None,
        "false_positives": sum(len(c["false_positives"]) for c in cases.values()),
        "elapsed_s": round(elapsed_s),
    }


if __name__ == "__main__":
    main()
