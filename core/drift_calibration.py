"""Reference windows from validation studies, with a decision rule calibrated to a false-alarm rate.

``build_reference`` splits a unit's validation studies in two (seeded, deterministic):

- the **fit** half becomes the reference the monitor compares windows with;
- the **calibration** half plays a stable stream: ``null_studies`` studies drawn from it at random, run
  through the same sliding windows, tests and score as in production. From these windows come each
  signal's null distance (mean and SD, which standardise the concordance score), and then the rule:
  for per-window levels lambda on a grid, ``alpha = lambda / 2`` (Holm test) and ``score_threshold`` =
  the null score's ``1 - lambda / 2`` quantile; the sequential rule (persistence, resolution) runs on the
  simulated stream and counts the alerts it raises. The most sensitive level whose count stays at or under
  ``target_per_1000`` alerts per 1000 studies is kept.

The two halves are independent samples of the same scanner, so a calibration window differs from the
reference as a new study would, plus the calibration half's own sampling error: the false-alarm estimate
errs on the safe side. What was chosen, and the rate it achieved, is kept in ``Reference.calibration``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import sliding_window_view

from core.drift import (
    DecisionRule,
    MonitorState,
    Reference,
    SignalReference,
    Transition,
    advance,
    categorical_batch,
    category_codes,
    ks_batch,
)
from core.drift_signals import CATALOGUE, SignalKind, StudySignals, Unit
from core.errors import InputError

__all__ = ["MIN_VALIDATION_STUDIES", "build_reference", "false_alarms_per_1000"]

MIN_VALIDATION_STUDIES = 40
LEVELS = tuple(float(x) for x in np.logspace(-7, -1, 25))


def build_reference(
    unit: Unit,
    validation: Sequence[StudySignals],
    *,
    rule: DecisionRule | None = None,
    target_per_1000: float = 0.25,
    signals: Collection[str] | None = None,
    weights: Mapping[str, float] | None = None,
    null_studies: int = 40_000,
    seed: int = 0,
) -> Reference:
    """A calibrated reference for ``unit`` from its validation studies (at least ``MIN_VALIDATION_STUDIES``).

    ``signals`` limits what is monitored (default: every catalogue signal the validation studies carry in at
    least half of each half); ``weights`` weighs signals in the concordance score (default 1).
    """
    rule = rule or DecisionRule()
    studies = [s for s in validation if s.unit == unit]
    if len(studies) < MIN_VALIDATION_STUDIES:
        raise InputError(
            f"a reference for {unit} needs at least {MIN_VALIDATION_STUDIES} validation studies of that unit, "
            f"got {len(studies)}; record more studies before setting the reference"
        )
    if target_per_1000 <= 0 or null_studies < 1000:
        raise ValueError("target_per_1000 must be > 0 and null_studies >= 1000")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(studies))
    half = len(studies) // 2
    fit = [studies[i] for i in order[:half]]
    cal = [studies[i] for i in order[half:]]
    wanted = list(CATALOGUE) if signals is None else [s for s in CATALOGUE if s in set(signals)]
    stream = rng.integers(0, len(cal), size=null_studies + rule.window - 1)
    windows = sliding_window_view(stream, rule.window)

    refs: dict[str, SignalReference] = {}
    null_d: dict[str, npt.NDArray[np.float64]] = {}
    null_p: dict[str, npt.NDArray[np.float64]] = {}
    for name in wanted:
        fit_vals = [s.value(name) for s in fit]
        cal_vals = [s.value(name) for s in cal]
        if (
            sum(v is not None for v in fit_vals) < half / 2
            or sum(v is not None for v in cal_vals) < len(cal) / 2
        ):
            continue
        weight = float((weights or {}).get(name, 1.0))
        if CATALOGUE[name].kind is SignalKind.NUMERIC:
            ref = SignalReference(
                name, values=tuple(sorted(float(v) for v in fit_vals if v is not None)), weight=weight
            )
            cal_arr = np.array([np.nan if v is None else float(v) for v in cal_vals])
            d, p, n = ks_batch(np.asarray(ref.values), cal_arr[windows])
        else:
            counts: dict[str, int] = {}
            for v in fit_vals:
                if v is not None:
                    counts[str(v)] = counts.get(str(v), 0) + 1
            ref = SignalReference(name, counts=counts, weight=weight)
            codes = category_codes(ref, [None if v is None else str(v) for v in cal_vals])
            d, p, n = categorical_batch(ref, codes[windows])
        tested = n >= rule.values_to_test
        d_t = d[tested]
        floor = 0.5 / rule.window  # a constant signal: one odd study is then worth z = 2
        mean = float(d_t.mean()) if d_t.size else 0.0
        sd = max(float(d_t.std()) if d_t.size else 0.0, floor)
        refs[name] = replace(ref, null_mean=mean, null_sd=sd)
        null_d[name] = np.where(tested, d, np.nan)
        null_p[name] = np.where(tested, p, np.nan)
    if not refs:
        raise InputError(f"no signal of {unit} has enough values in its validation studies to be monitored")

    names = list(refs)
    z = np.stack([(null_d[s] - refs[s].null_mean) / refs[s].null_sd for s in names], axis=1)
    w = np.array([refs[s].weight for s in names])
    tested = ~np.isnan(z)
    z0 = np.where(tested, z, 0.0)
    score = (z0 @ w) / np.sqrt(np.maximum((tested * w**2).sum(axis=1), 1e-12))
    p = np.stack([null_p[s] for s in names], axis=1)
    m = tested.sum(axis=1)
    min_adjusted = np.minimum(1.0, np.nanmin(np.where(tested, p, np.inf), axis=1) * m)

    chosen, achieved = LEVELS[0], math.inf
    results: list[tuple[float, float]] = []
    for level in LEVELS:
        threshold = float(np.quantile(score, 1.0 - level / 2))
        positive = (min_adjusted < level / 2) | (score > threshold)
        rate = false_alarms_per_1000(positive, replace(rule, alpha=level / 2, score_threshold=threshold))
        results.append((level, rate))
        if rate <= target_per_1000:
            chosen, achieved = level, rate
    threshold = float(np.quantile(score, 1.0 - chosen / 2))
    final_rule = replace(rule, alpha=chosen / 2, score_threshold=threshold)
    if math.isinf(achieved):
        achieved = results[0][1]
    return Reference(
        unit=unit,
        rule=final_rule,
        signals=refs,
        n_studies=len(fit),
        calibration={
            "validation_studies": len(studies),
            "reference_studies": len(fit),
            "calibration_studies": len(cal),
            "null_studies": null_studies,
            "target_false_alarms_per_1000": target_per_1000,
            "estimated_false_alarms_per_1000": round(achieved, 4),
            "window_level": chosen,
            "seed": seed,
        },
    )


def false_alarms_per_1000(positive: npt.NDArray[np.bool_], rule: DecisionRule) -> float:
    """Alerts the sequential rule raises on a stream of window outcomes, per 1000 windows (studies)."""
    state, raised = MonitorState(), 0
    for flag in positive.tolist():
        state, transition = advance(state, bool(flag), rule)
        raised += transition is Transition.RAISE
    return 1000.0 * raised / max(len(positive), 1)
