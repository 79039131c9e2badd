"""A simulated stream of studies through the drift monitor: does a scanner swap raise an alert, and how often
does a stable stream raise a false one?

    OMP_NUM_THREADS=1 python -m benchmarks.drift.stream --out benchmarks/drift/result.json

Four sites, one scanner each, of the profiles seen in training: north (ge), south (siemens), east (philips),
west (canon). Each study is a new synthetic patient (``fixtures.synth.cohort.render_study``: the cohort's
anatomy, lesions, pose and vendor physics), scanned at the site its position in the stream draws at random.

- **Validation** (seed 21): 120 studies per site; ``core.drift_calibration.build_reference`` makes each site's
  reference (60) and calibrates its rule on the other 60 for 0.25 false alerts per 1000 studies.
- **Swap stream** (seed 22): 300 studies from the stable sites, then 120 more in which one site's scanner
  is replaced by the unseen ``uih`` profile (Manufacturer, model, kernel, kVp, FOV, slice thickness, noise,
  sharpness, HU offset all change). Run four times, each site swapping once; the delay is counted in that
  site's studies after the swap (and in studies of the whole stream).
- **Stable stream** (seed 23): 1000 studies, no change: every alert is false.

Every stream runs through the production path: ``adapters.drift_store.DriftStore`` (SQLite) records each
study, evaluates the window and raises alerts. Two monitor configurations: **all signals**, and **no
header** (image and output signals only: a swap the headers do not tell, e.g. a reconstruction change or
anonymised headers).

What is simulated, and how:

- *Header and image signals* are computed for every study from its generated volume (``header_signals``,
  ``image_signals``), at a 96 x 96 matrix instead of the model's 192 to keep generation at ~0.3 s a study:
  the image statistics at 96 and 192 agree within ~2% (the noise and blur of the profiles scale with the
  pixel), the pixel spacing is twice as large. The organ masks are the generator's truth labels, standing in
  for the model's organ labels (``model_pool.json`` records both on 150 studies at 192).
- *Output signals* (lesion count, volume, confidence, low-confidence share, rejected share) are those of
  the real model (``models/weights/segmenter.pt``) on other studies of the same profile: each study draws
  one of the runs in ``benchmarks/drift/model_pool.json`` (30 per profile, ``benchmarks.drift.pool``), since
  the model costs ~10 s a study on one CPU thread. Reference, calibration and streams draw from the same
  pool. ``rejected_fraction`` is a simulated radiologist who rejects every detected lesion on no true
  lesion. ``verifier_replacements`` is absent: the stream uses the deterministic wording.

Generated signals are cached as JSON lines under ``--cache`` (default ``out/drift-stream``): a second run
only replays the monitor.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters.drift_store import DriftStore
from core.drift import DecisionRule
from core.drift_calibration import build_reference
from core.drift_signals import CATALOGUE, SignalGroup, StudySignals, Unit, header_signals, image_signals
from fixtures.synth.cohort import render_study

SITES: dict[str, tuple[str, str]] = {
    "north": ("ge", "CT-N1"),
    "south": ("siemens", "CT-S1"),
    "east": ("philips", "CT-E1"),
    "west": ("canon", "CT-W1"),
}
UNSEEN = "uih"
VALIDATION_SEED, SWAP_SEED, STABLE_SEED = 21, 22, 23
NO_HEADER = tuple(n for n, s in CATALOGUE.items() if s.group is not SignalGroup.HEADER)


@dataclass(frozen=True)
class Options:
    matrix: int = 96
    validation_per_site: int = 120
    before_swap: int = 300
    after_swap: int = 120
    stable: int = 1000
    window: int = DecisionRule().window
    persistence: int = DecisionRule().persistence
    target_per_1000: float = 0.25


class Generator:
    """Signals of generated studies, cached by (seed, index, profile) in a JSON-lines file per seed."""

    def __init__(self, cache: Path, pool: dict[str, list[dict[str, Any]]], matrix: int) -> None:
        self.cache, self.pool, self.matrix = cache, pool, matrix
        cache.mkdir(parents=True, exist_ok=True)
        self.known: dict[str, dict[str, Any]] = {}
        for path in cache.glob(f"signals-m{matrix}-*.jsonl"):
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self.known[row["key"]] = row
        self.generated = 0
        self.cached = 0
        self.seconds = 0.0

    def study(self, seed: int, index: int, site: str, profile: str) -> StudySignals:
        key = f"{seed}/{index}/{profile}"
        row = self.known.get(key)
        self.cached += row is not None
        if row is None:
            started = time.perf_counter()
            scan = render_study(seed, index, profile, matrix=self.matrix, station_name=SITES[site][1])
            acq = scan.volume.acquisition
            assert acq is not None
            numeric, categorical = header_signals(acq, scan.volume.spacing_kji_mm)
            numeric.update(image_signals(scan.volume, scan.labels))
            row = {
                "key": key,
                "study_uid": acq.study_uid,
                "scanner": f"{acq.manufacturer} {acq.model_name}",
                "numeric": numeric,
                "categorical": categorical,
            }
            with (self.cache / f"signals-m{self.matrix}-{seed}.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            self.known[key] = row
            self.generated += 1
            self.seconds += time.perf_counter() - started
        runs = self.pool[profile]
        output = runs[int(np.random.default_rng([seed, index, 7]).integers(len(runs)))]["output"]
        return StudySignals(
            row["study_uid"],
            Unit(site, SITES[site][1]),
            row["scanner"],
            {**row["numeric"], **output},
            row["categorical"],
        )


def site_sequence(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng([seed, 99])
    names = list(SITES)
    return [names[int(i)] for i in rng.integers(0, len(names), size=n)]


def run_stream(
    references: Iterable[Any], studies: Sequence[StudySignals]
) -> tuple[list[dict[str, Any]], list[float | None], float]:
    """Feed ``studies`` to a fresh store with ``references``; the alerts raised (position, unit, signals) and
    the score after each study (None before a full window)."""
    with tempfile.TemporaryDirectory(prefix="interval-drift-") as tmp:
        store = DriftStore(f"sqlite:///{tmp}/drift.db")
        try:
            for ref in references:
                store.set_reference(ref)
            alerts: list[dict[str, Any]] = []
            scores: list[float | None] = []
            started = time.perf_counter()
            for position, study in enumerate(studies):
                outcome = store.record(study)
                ev = outcome.evaluation
                scores.append(None if ev is None or math.isnan(ev.score) else round(ev.score, 3))
                if outcome.raised is not None:
                    alerts.append(
                        {
                            "position": position,
                            "site": study.unit.site,
                            "signals": [s["signal"] for s in outcome.raised.signals],
                            "score": round(outcome.raised.score, 2),
                            "window_scanners": outcome.raised.scanners,
                        }
                    )
            seconds = time.perf_counter() - started
        finally:
            store.close()
    return alerts, scores, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("result.json"))
    ap.add_argument("--pool", type=Path, default=Path(__file__).with_name("model_pool.json"))
    ap.add_argument("--cache", type=Path, default=Path("out/drift-stream"))
    ap.add_argument("--chart", type=Path, default=Path(__file__).with_name("stream.png"))
    ap.add_argument("--stable", type=int, default=Options.stable)
    args = ap.parse_args()
    opts = Options(stable=args.stable)
    pool_file = json.loads(args.pool.read_text())
    gen = Generator(args.cache, pool_file["pool"], opts.matrix)
    started = time.perf_counter()

    validation = [
        gen.study(VALIDATION_SEED, n * 1000 + i, site, profile)
        for n, (site, (profile, _)) in enumerate(SITES.items())
        for i in range(opts.validation_per_site)
    ]
    rule = DecisionRule(window=opts.window, persistence=opts.persistence)
    configs: dict[str, tuple[str, ...] | None] = {"all_signals": None, "no_header": NO_HEADER}
    refs = {
        name: [
            build_reference(
                Unit(site, station),
                validation,
                rule=rule,
                target_per_1000=opts.target_per_1000,
                signals=signals,
            )
            for site, (_, station) in SITES.items()
        ]
        for name, signals in configs.items()
    }

    order = site_sequence(SWAP_SEED, opts.before_swap + opts.after_swap)
    before = [gen.study(SWAP_SEED, i, order[i], SITES[order[i]][0]) for i in range(opts.before_swap)]
    after_stable = {
        i: gen.study(SWAP_SEED, i, order[i], SITES[order[i]][0]) for i in range(opts.before_swap, len(order))
    }
    after_swapped = {
        i: gen.study(SWAP_SEED, i, order[i], UNSEEN) for i in range(opts.before_swap, len(order))
    }
    stable_order = site_sequence(STABLE_SEED, opts.stable)
    stable = [
        gen.study(STABLE_SEED, i, stable_order[i], SITES[stable_order[i]][0]) for i in range(opts.stable)
    ]
    generation_s = time.perf_counter() - started

    result: dict[str, Any] = {
        "what": "drift monitor on a simulated stream: scanner swap to an unseen vendor profile, and a stable stream",
        "command": "OMP_NUM_THREADS=1 python -m benchmarks.drift.stream",
        "machine": f"{platform.machine()} Python {platform.python_version()}, 2 shared cores",
        "options": opts.__dict__,
        "sites": {site: {"profile": p, "station": s} for site, (p, s) in SITES.items()},
        "model_pool": {"model_version": pool_file["model_version"], "per_profile": pool_file["per_vendor"]},
        "generated_studies": gen.generated,  # rendered in this run (the rest came from --cache)
        "cached_studies": gen.cached,
        "generation_seconds": round(gen.seconds, 1),
        "configurations": {},
    }
    chart_scores: dict[str, list[float | None]] = {}
    for name, references in refs.items():
        cfg: dict[str, Any] = {
            "signals": sorted(references[0].signals),
            "references": {
                str(r.unit): {
                    "alpha": float(f"{r.rule.alpha:.3g}"),
                    "score_threshold": round(r.rule.score_threshold, 2),
                    **{k: r.calibration[k] for k in ("estimated_false_alarms_per_1000", "reference_studies")},
                }
                for r in references
            },
            "swaps": [],
        }
        stable_studies_seen = 0
        false_alarms: list[dict[str, Any]] = []
        monitor_s = 0.0
        for swap_site in SITES:
            stream = list(before) + [
                after_swapped[i] if order[i] == swap_site else after_stable[i]
                for i in range(opts.before_swap, len(order))
            ]
            alerts, scores, seconds = run_stream(references, stream)
            monitor_s += seconds
            site_positions = [i for i in range(opts.before_swap, len(order)) if order[i] == swap_site]
            hit = next(
                (a for a in alerts if a["site"] == swap_site and a["position"] >= opts.before_swap), None
            )
            false = [a for a in alerts if a is not hit]
            delay_site = None if hit is None else site_positions.index(hit["position"]) + 1
            cfg["swaps"].append(
                {
                    "site": swap_site,
                    "swapped_studies_after_swap": len(site_positions),
                    "detected": hit is not None,
                    "delay_site_studies": delay_site,
                    "delay_stream_studies": None if hit is None else hit["position"] - opts.before_swap + 1,
                    "alert_signals": None if hit is None else hit["signals"],
                    "false_alarms": false,
                }
            )
            stable_studies_seen += len(stream) - len(site_positions)
            false_alarms += [{**a, "stream": f"swap at {swap_site}"} for a in false]
            if name == "no_header" and swap_site == "north":
                chart_scores = {"north": [s if order[i] == "north" else None for i, s in enumerate(scores)]}
        alerts, _, seconds = run_stream(references, stable)
        monitor_s += seconds
        false_alarms += [{**a, "stream": "stable"} for a in alerts]
        delays = [s["delay_site_studies"] for s in cfg["swaps"]]
        cfg["stable_stream"] = {"studies": len(stable), "false_alarms": len(alerts), "alerts": alerts}
        cfg["summary"] = {
            "swaps_detected": sum(d is not None for d in delays),
            "max_delay_site_studies": max((d for d in delays if d is not None), default=None),
            "max_delay_stream_studies": max(
                (s["delay_stream_studies"] for s in cfg["swaps"] if s["detected"]), default=None
            ),
            "false_alarms_stable_stream": len(alerts),
            "stable_studies_in_swap_streams": stable_studies_seen,
            "false_alarms_all": len(false_alarms),
            "stable_studies_all": stable_studies_seen + len(stable),
            "monitor_ms_per_study": round(1000 * monitor_s / (len(SITES) * len(order) + len(stable)), 2),
        }
        cfg["false_alarms"] = false_alarms
        result["configurations"][name] = cfg
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    result["stream_generation_seconds"] = round(generation_s, 1)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if chart_scores:
        north = result["configurations"]["no_header"]["swaps"][0]
        alert_at = None if not north["detected"] else opts.before_swap + north["delay_stream_studies"] - 1
        _chart(
            args.chart,
            chart_scores["north"],
            refs["no_header"][0].rule.score_threshold,
            opts.before_swap,
            alert_at,
        )
    for name, cfg in result["configurations"].items():
        print(name, json.dumps(cfg["summary"]))
        for s in cfg["swaps"]:
            print(
                f"  swap at {s['site']}: delay {s['delay_site_studies']} site studies "
                f"({s['delay_stream_studies']} stream studies), signals {s['alert_signals']}"
            )
    print(f"wrote {args.out}")


def _chart(
    path: Path, scores: list[float | None], threshold: float, swap_at: int, alert_at: int | None
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [i for i, s in enumerate(scores) if s is not None]
    ys = [s for s in scores if s is not None]
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    ax.plot(xs, ys, lw=1, color="#1f4e79", label="north: concordance score (image + output signals)")
    ax.axhline(threshold, color="#b3261e", ls="--", lw=1, label=f"threshold {threshold:.1f}")
    ax.axvline(swap_at, color="#555", ls=":", lw=1, label="scanner swapped to uih")
    if alert_at is not None:
        ax.plot([alert_at], [scores[alert_at]], "o", color="#b3261e", label="alert raised")
    ax.set_xlabel("position in the stream (all four sites)")
    ax.set_ylabel("score (north's window)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
