"""Output signals of the real segmentation model, per vendor profile: the pool the drift stream draws from.

    OMP_NUM_THREADS=1 python -m benchmarks.drift.pool --per-vendor 24 --out benchmarks/drift/model_pool.json

Running the model on every study of the simulated stream (~2000 studies, ~10 s each on one CPU thread) would
take hours, so the stream (``benchmarks.drift.stream``) takes each study's *output* signals from this pool of
real runs on studies of the same vendor profile. For each profile (the four seen in training and the unseen
``uih``), ``--per-vendor`` new patients are generated at the model's matrix (192) and analysed as in production:
``MonaiSegmenter`` (the committed weights) then ``core.lesions.extract_lesions`` with the default filter, and
``core.drift_signals.output_signals``. A simulated radiologist rejects each detected lesion that lies on no true
lesion (``fixtures.synth.evaluation.instance_at``): ``rejected_fraction``. The image signals are recorded twice,
from the model's organ labels and from the generator's truth, to show what the stream's use of truth labels
changes. Patients use seeds of their own (5000 + profile), disjoint from the stream's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

from core.drift_signals import image_signals, output_signals
from core.lesions import LesionFilter, extract_lesions
from fixtures.synth.cohort import render_study
from fixtures.synth.evaluation import instance_at

PROFILES = ("ge", "siemens", "philips", "canon", "uih")
POOL_SEED = 5000


def run_pool(per_vendor: int, profiles: tuple[str, ...] = PROFILES) -> dict[str, Any]:
    from models.segmentation.inference import MonaiSegmenter  # torch: imported when the pool is built

    segmenter = MonaiSegmenter()
    keep = LesionFilter()
    pool: dict[str, list[dict[str, Any]]] = {}
    started = time.perf_counter()
    for p, profile in enumerate(profiles):
        rows: list[dict[str, Any]] = []
        for index in range(per_vendor):
            study = render_study(POOL_SEED + PROFILES.index(profile), index, profile)
            volume = study.volume
            seg = segmenter.segment(volume)
            lesions = extract_lesions(volume, seg, keep)
            false_positive = sum(
                instance_at(study.instances, volume.lps_to_kji(d.centroid_lps_mm)) == 0 for d in lesions
            )
            output = output_signals(lesions, None)
            if lesions:
                output["rejected_fraction"] = round(false_positive / len(lesions), 4)
            rows.append(
                {
                    "index": index,
                    "true_lesions": study.lesion_count,
                    "false_positives": false_positive,
                    "output": output,
                    "image_model_labels": image_signals(volume, seg.labels),
                    "image_truth_labels": image_signals(volume, study.labels),
                }
            )
            print(
                f"{profile} {index + 1}/{per_vendor}: {output} ({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        pool[profile] = rows
        print(f"profile {p + 1}/{len(profiles)} done", flush=True)
    return {
        "what": "output signals of the committed segmenter on generated studies (matrix 192), per vendor profile",
        "command": f"python -m benchmarks.drift.pool --per-vendor {per_vendor}",
        "model_version": segmenter.model_version,
        "machine": f"{platform.machine()} {platform.python_version()}, CPU, torch 1 thread",
        "seconds": round(time.perf_counter() - started, 1),
        "seed": POOL_SEED,
        "per_vendor": per_vendor,
        "pool": pool,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-vendor", type=int, default=24)
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("model_pool.json"))
    ap.add_argument("--merge", action="store_true", help="add these profiles to an existing --out file")
    args = ap.parse_args()
    result = run_pool(args.per_vendor, tuple(args.profiles.split(",")))
    if args.merge and args.out.is_file():
        previous = json.loads(args.out.read_text())
        if (
            previous.get("model_version") != result["model_version"]
            or previous["per_vendor"] != args.per_vendor
        ):
            raise SystemExit(f"{args.out} holds another model or pool size; write a new file instead")
        result["pool"] = {**previous["pool"], **result["pool"]}
        result["seconds"] = round(previous["seconds"] + result["seconds"], 1)
        result["command"] = f"python -m benchmarks.drift.pool --per-vendor {args.per_vendor}"
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
