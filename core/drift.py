"""Drift detection: is what a scanner sends (and what the model answers) still like its reference?

For each monitored unit (a scanner at a site, ``core.drift_signals.Unit``) a ``Reference`` holds the signals
of validation studies. Every new study adds itself to a sliding window of the unit's last ``rule.window``
studies, and the window is compared with the reference, signal by signal:

- **numeric** signals: two-sample Kolmogorov-Smirnov distance D and its p-value (Stephens' small-sample
  form of the Kolmogorov distribution);
- **categorical** header fields (Manufacturer, kernel, kVp, ...): the number of window studies whose value
  the reference never showed, against the Good-Turing chance of an unseen value (binomial tail), with the
  total-variation distance between window and reference frequencies as the distance.

The p-values of one window are corrected together (Holm step-down, family-wise level ``rule.alpha``). The
per-signal distances are also standardised by their spread under no drift (``z``: distance minus its null
mean, over its null SD) and combined into one **concordance score**, a weighted sum scaled to unit variance
for independent signals, in the spirit of CheXstray's multi-modal concordance: it needs no ground truth
and sees many small shifts that no single test calls. A window is *positive* when a corrected test rejects
or the score exceeds ``rule.score_threshold``; an alert is raised after ``rule.persistence`` positive windows
in a row and resolved after ``rule.resolve_after`` negative ones. ``core.drift_calibration`` sets ``alpha``
and ``score_threshold`` so that stable data raises a chosen number of false alerts per 1000 studies.

Everything is pure (numpy, scipy): the store, the metrics and the pages live in ``adapters`` and ``service``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special, stats

from core.drift_signals import CATALOGUE, SignalKind, StudySignals, Unit

__all__ = [
    "AlertDraft",
    "DecisionRule",
    "MonitorState",
    "Reference",
    "SignalFinding",
    "SignalReference",
    "SignalTest",
    "Transition",
    "WindowEvaluation",
    "advance",
    "categorical_batch",
    "describe_alert",
    "evaluate_window",
    "holm_adjust",
    "ks_batch",
]

F64 = npt.NDArray[np.float64]
NOVEL, MISSING = -1, -2  # codes of categorical values in ``categorical_batch``


@dataclass(frozen=True, slots=True)
class DecisionRule:
    """When a window is positive and when positives make an alert (values per unit, in its reference)."""

    window: int = 12  # studies compared with the reference at each step
    persistence: int = 3  # positive windows in a row that raise an alert
    alpha: float = 1e-3  # family-wise level of the Holm test across signals, per window
    score_threshold: float = math.inf  # concordance score above which a window is positive
    min_values: int = (
        0  # a signal is tested when the window holds this many of its values (0: half the window)
    )
    resolve_after: int = 0  # negative windows in a row that resolve an alert (0: one window's length)

    def __post_init__(self) -> None:
        if self.window < 2 or self.persistence < 1 or not 0 < self.alpha < 1:
            raise ValueError("a decision rule needs window >= 2, persistence >= 1 and 0 < alpha < 1")
        if not 0 <= self.min_values <= self.window:
            raise ValueError(f"min_values must lie in 0..window ({self.window}), got {self.min_values}")
        if self.resolve_after < 0:
            raise ValueError("resolve_after must be >= 0")

    @property
    def negatives_to_resolve(self) -> int:
        return self.resolve_after or self.window

    @property
    def values_to_test(self) -> int:
        return self.min_values or max(1, self.window // 2)


@dataclass(frozen=True, slots=True)
class SignalReference:
    """One signal's reference: sorted values (numeric) or value counts (categorical), and how far a window
    of the rule's size lies from it when nothing changed (``null_mean`` and ``null_sd`` of the distance)."""

    name: str
    values: tuple[float, ...] = ()
    counts: Mapping[str, int] = field(default_factory=dict)
    null_mean: float = 0.0
    null_sd: float = 1.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        spec = CATALOGUE.get(self.name)
        if spec is None:
            raise ValueError(f"{self.name!r} is not a drift signal (see core.drift_signals.CATALOGUE)")
        if spec.kind is SignalKind.NUMERIC and (not self.values or self.counts):
            raise ValueError(f"numeric signal {self.name} needs reference values and no counts")
        if spec.kind is SignalKind.CATEGORICAL and (not self.counts or self.values):
            raise ValueError(f"categorical signal {self.name} needs reference counts and no values")
        if self.null_sd <= 0 or self.weight <= 0:
            raise ValueError(f"signal {self.name}: null_sd and weight must be > 0")

    @property
    def kind(self) -> SignalKind:
        return CATALOGUE[self.name].kind

    @property
    def n(self) -> int:
        return len(self.values) if self.kind is SignalKind.NUMERIC else sum(self.counts.values())

    def novel_chance(self) -> float:
        """Good-Turing: the chance that the next study shows a value the reference never had (values seen
        once, over all), with half a value added so that a constant field is not certain forever."""
        singletons = sum(1 for c in self.counts.values() if c == 1)
        return (singletons + 0.5) / (self.n + 1.0)

    def summary(self) -> str:
        if self.kind is SignalKind.NUMERIC:
            lo, mid, hi = np.percentile(self.values, [5, 50, 95])
            return f"median {mid:.4g} (5-95%: {lo:.4g} to {hi:.4g})"
        return ", ".join(f"{v} x{c}" for v, c in sorted(self.counts.items(), key=lambda kv: -kv[1]))


@dataclass(frozen=True, slots=True)
class Reference:
    """What a unit's studies looked like during validation, and the rule that compares new ones with it."""

    unit: Unit
    rule: DecisionRule
    signals: Mapping[str, SignalReference]
    n_studies: int
    calibration: Mapping[str, Any] = field(default_factory=dict)  # how the rule was set (for people)

    def __post_init__(self) -> None:
        if not self.signals:
            raise ValueError(f"the reference of {self.unit} monitors no signal")
        for name, s in self.signals.items():
            if name != s.name:
                raise ValueError(f"reference signal keyed {name!r} is named {s.name!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "site": self.unit.site,
            "station": self.unit.station,
            "rule": asdict(self.rule),
            "n_studies": self.n_studies,
            "calibration": dict(self.calibration),
            "signals": {
                name: {
                    "values": list(s.values),
                    "counts": dict(s.counts),
                    "null_mean": s.null_mean,
                    "null_sd": s.null_sd,
                    "weight": s.weight,
                }
                for name, s in self.signals.items()
            },
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Reference:
        rule = dict(data["rule"])
        if rule.get("score_threshold") is None:
            rule["score_threshold"] = math.inf
        return cls(
            unit=Unit(str(data["site"]), str(data["station"])),
            rule=DecisionRule(**rule),
            n_studies=int(data["n_studies"]),
            calibration=dict(data.get("calibration") or {}),
            signals={
                name: SignalReference(
                    name,
                    values=tuple(float(v) for v in s.get("values") or ()),
                    counts={str(k): int(v) for k, v in (s.get("counts") or {}).items()},
                    null_mean=float(s["null_mean"]),
                    null_sd=float(s["null_sd"]),
                    weight=float(s.get("weight", 1.0)),
                )
                for name, s in data["signals"].items()
            },
        )


# --- tests on batches of windows (one row per window; calibration runs thousands at once) -------------------


def ks_batch(reference_sorted: F64, windows: F64) -> tuple[F64, F64, npt.NDArray[np.int64]]:
    """Two-sample KS distance and p-value of each row of ``windows`` (NaN: no value) against the sorted
    reference. Returns (D, p, values per row); rows without values get NaN."""
    m = reference_sorted.size
    x = np.sort(windows, axis=1)  # NaN last
    n = np.count_nonzero(~np.isnan(x), axis=1)
    j = np.arange(1, x.shape[1] + 1, dtype=float)[None, :]
    valid = j <= n[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        n_col = n[:, None].astype(float)
        right = np.searchsorted(reference_sorted, x, side="right") / m
        left = np.searchsorted(reference_sorted, x, side="left") / m
        gap = np.maximum(j / n_col - right, left - (j - 1.0) / n_col)
        d = np.where(valid, gap, -np.inf).max(axis=1)
        d = np.where(n > 0, d, np.nan)
        en = np.sqrt(n * m / (n + m))
        p = special.kolmogorov((en + 0.12 + 0.11 / en) * d)
    return d, np.where(n > 0, np.clip(p, 0.0, 1.0), np.nan), n


def categorical_batch(
    reference: SignalReference, codes: npt.NDArray[np.int64]
) -> tuple[F64, F64, npt.NDArray[np.int64]]:
    """Novel-value test and total-variation distance of each row of ``codes`` (index into the reference's
    sorted categories, ``NOVEL`` for a value it never had, ``MISSING`` for none). Returns (TV, p, n)."""
    cats = sorted(reference.counts)
    ref_freq = np.array([reference.counts[c] for c in cats] + [0], dtype=float) / reference.n
    present = codes != MISSING
    n = np.count_nonzero(present, axis=1)
    novel = np.count_nonzero(codes == NOVEL, axis=1)
    bins = np.where(codes == NOVEL, len(cats), codes)
    onehot = (bins[:, :, None] == np.arange(len(cats) + 1)[None, None, :]) & present[:, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        freq = onehot.sum(axis=1) / n[:, None]
        tv = 0.5 * np.abs(freq - ref_freq[None, :]).sum(axis=1)
    p = stats.binom.sf(novel - 1, n, reference.novel_chance())
    return np.where(n > 0, tv, np.nan), np.where(n > 0, p, np.nan), n


def category_codes(reference: SignalReference, values: Sequence[str | None]) -> npt.NDArray[np.int64]:
    index = {c: i for i, c in enumerate(sorted(reference.counts))}
    return np.array([MISSING if v is None else index.get(v, NOVEL) for v in values], dtype=np.int64)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the order given."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


# --- one window ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignalTest:
    name: str
    n: int  # the window's values of this signal
    distance: float  # KS D (numeric) or total variation (categorical), 0..1
    p_value: float
    p_adjusted: float  # Holm, across the signals tested in this window
    z: float  # (distance - null mean) / null SD
    window_summary: str


@dataclass(frozen=True, slots=True)
class WindowEvaluation:
    tests: tuple[SignalTest, ...]  # the signals tested, most significant first
    score: float  # concordance score (NaN when nothing was tested)
    positive: bool
    significant: tuple[str, ...]  # signals whose adjusted p-value is under alpha

    def to_json(self) -> dict[str, Any]:
        return {
            "score": None if math.isnan(self.score) else round(self.score, 4),
            "positive": self.positive,
            "significant": list(self.significant),
            "tests": [
                {
                    "signal": t.name,
                    "n": t.n,
                    "distance": round(t.distance, 4),
                    "p_value": float(f"{t.p_value:.4g}"),
                    "p_adjusted": float(f"{t.p_adjusted:.4g}"),
                    "z": round(t.z, 3),
                    "window": t.window_summary,
                }
                for t in self.tests
            ],
        }


def evaluate_window(reference: Reference, window: Sequence[StudySignals]) -> WindowEvaluation:
    """Compare the window's studies with the reference; positive by the rule's test or score."""
    rule = reference.rule
    raw: list[tuple[str, int, float, float, float, str]] = []
    for name, ref in reference.signals.items():
        values = [s.value(name) for s in window]
        if ref.kind is SignalKind.NUMERIC:
            row = np.array([[np.nan if v is None else float(v) for v in values]])
            d, p, n = ks_batch(np.asarray(ref.values, dtype=float), row)
            present = row[~np.isnan(row)]
            summary = f"median {np.median(present):.4g}" if present.size else "no values"
        else:
            texts = [None if v is None else str(v) for v in values]
            d, p, n = categorical_batch(ref, category_codes(ref, texts)[None, :])
            new = sorted({t for t in texts if t is not None and t not in ref.counts})
            summary = ("never in reference: " + ", ".join(new)) if new else "values seen in reference"
        if int(n[0]) < rule.values_to_test:
            continue
        z = (float(d[0]) - ref.null_mean) / ref.null_sd
        raw.append((name, int(n[0]), float(d[0]), float(p[0]), z, summary))
    if not raw:
        return WindowEvaluation((), math.nan, False, ())
    adjusted = holm_adjust([r[3] for r in raw])
    tests = sorted(
        (SignalTest(nm, n, d, p, pa, z, s) for (nm, n, d, p, z, s), pa in zip(raw, adjusted, strict=True)),
        key=lambda t: (t.p_adjusted, -t.z),
    )
    weights = np.array([reference.signals[t.name].weight for t in tests])
    score = float(np.dot(weights, [t.z for t in tests]) / np.sqrt(np.sum(weights**2)))
    significant = tuple(t.name for t in tests if t.p_adjusted < rule.alpha)
    return WindowEvaluation(
        tuple(tests), score, bool(significant) or score > rule.score_threshold, significant
    )


# --- the sequential rule -------------------------------------------------------------------------------------


class Transition(enum.StrEnum):
    RAISE = "raise"
    RESOLVE = "resolve"


@dataclass(frozen=True, slots=True)
class MonitorState:
    """Where a unit stands between studies: runs of positive and negative windows, and an open alert."""

    positive_run: int = 0
    negative_run: int = 0
    alert_open: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> MonitorState:
        return cls(**dict(data)) if data else cls()


def advance(
    state: MonitorState, positive: bool, rule: DecisionRule
) -> tuple[MonitorState, Transition | None]:
    """The next state after one window, and whether it raises or resolves an alert."""
    if positive:
        state = replace(state, positive_run=state.positive_run + 1, negative_run=0)
        if not state.alert_open and state.positive_run >= rule.persistence:
            return replace(state, alert_open=True), Transition.RAISE
        return state, None
    state = replace(state, positive_run=0, negative_run=state.negative_run + 1)
    if state.alert_open and state.negative_run >= rule.negatives_to_resolve:
        return replace(state, alert_open=False), Transition.RESOLVE
    return state, None


# --- what an alert says --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignalFinding:
    signal: str
    group: str  # header / image / output
    p_adjusted: float
    z: float
    window: str  # what the window shows
    reference: str  # what the reference showed


@dataclass(frozen=True, slots=True)
class AlertDraft:
    """An alert before it is stored: the unit, the signals that moved, the studies of the window."""

    unit: Unit
    signals: tuple[SignalFinding, ...]
    study_uids: tuple[str, ...]  # the window's studies, oldest first
    scanners: tuple[str, ...]  # Manufacturer and model as the window's headers said
    score: float

    def summary(self) -> str:
        names = ", ".join(f.signal for f in self.signals) or "combined score"
        return f"drift at {self.unit}: {names} (score {self.score:.1f}, {len(self.study_uids)} studies)"


def describe_alert(
    reference: Reference,
    window: Sequence[StudySignals],
    evaluation: WindowEvaluation,
    top: int = 3,
    z_min: float = 3.0,
) -> AlertDraft:
    """Name the signals that moved: those the corrected test calls and those at least ``z_min`` null SDs from
    their usual distance; when none is either (the score alone), the ``top`` largest z."""
    tests = [t for t in evaluation.tests if t.name in evaluation.significant or t.z >= z_min]
    if not tests:
        tests = sorted(evaluation.tests, key=lambda t: -t.z)[:top]
    findings = tuple(
        SignalFinding(
            t.name,
            CATALOGUE[t.name].group.value,
            t.p_adjusted,
            t.z,
            t.window_summary,
            reference.signals[t.name].summary(),
        )
        for t in tests
    )
    scanners = tuple(dict.fromkeys(s.scanner for s in window))
    return AlertDraft(
        reference.unit, findings, tuple(s.study_uid for s in window), scanners, evaluation.score
    )
