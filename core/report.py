"""Report facts and their deterministic wording (Comparison / Findings / Impression).

The wording here is the reference the language-model drafter is checked against: every number in
it comes from the facts, rounded to whole millimetres as radiologists report diameters.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

from core.irecist import IRecistState
from core.recist import RecistResult, is_unequivocal_new
from core.types import Organ, PriorTimePoint, RecistRole

__all__ = [
    "Change",
    "LesionFact",
    "ReportFacts",
    "ReportText",
    "classify_change",
    "finding_sentence",
    "lesion_site",
    "prior_report_text",
    "render_report",
]

STABLE_FRACTION = 0.10
STABLE_MM = 2.0


class Change(enum.StrEnum):
    NEW = "new"
    RESOLVED = "resolved"
    INCREASED = "increased"
    DECREASED = "decreased"
    STABLE = "stable"
    NOT_ASSESSED = "not assessed"
    BASELINE = "baseline"


@dataclass(frozen=True, slots=True)
class LesionFact:
    track_id: str
    label: str
    organ: Organ
    laterality: str | None
    role: RecistRole | None
    change: Change
    long_axis_mm: float | None  # current; None when not seen
    short_axis_mm: float | None
    prior_long_axis_mm: float | None
    prior_short_axis_mm: float | None
    prior_date: dt.date | None
    confidence: float | None = None  # model probability for detected lesions
    equivocal: bool = False  # a new finding too small or uncertain to call progression
    guided: bool = False  # seen only on a second look at the prior lesion's aligned position

    def diameter_mm(self) -> float | None:
        return self.short_axis_mm if self.organ.is_nodal else self.long_axis_mm

    def prior_diameter_mm(self) -> float | None:
        return self.prior_short_axis_mm if self.organ.is_nodal else self.prior_long_axis_mm


@dataclass(frozen=True, slots=True)
class ReportFacts:
    study_date: dt.date
    study_uid: str
    comparison_dates: tuple[dt.date, ...]
    lesions: tuple[LesionFact, ...]
    recist: RecistResult | None
    prior_impression: str = ""
    irecist: IRecistState | None = None
    notes: tuple[str, ...] = ()  # splits and merges


@dataclass(frozen=True, slots=True)
class ReportText:
    comparison: str
    findings: str
    impression: str

    def as_markdown(self) -> str:
        return (
            f"## Comparison\n\n{self.comparison}\n\n## Findings\n\n{self.findings}\n\n"
            f"## Impression\n\n{self.impression}\n"
        )

    def as_text(self) -> str:
        """Plain text with one heading per section (the FHIR presentedForm and the prior report text)."""
        return f"COMPARISON: {self.comparison}\nFINDINGS: {self.findings}\nIMPRESSION: {self.impression}"

    @classmethod
    def from_text(cls, text: str) -> ReportText:
        """Inverse of ``as_text``; lines after a heading belong to that section."""
        parts = {"COMPARISON": "", "FINDINGS": "", "IMPRESSION": ""}
        current: str | None = None
        for line in text.splitlines():
            head, sep, rest = line.partition(":")
            if sep and head.strip().upper() in parts:
                current = head.strip().upper()
                parts[current] = rest.strip()
            elif current is not None:
                parts[current] = f"{parts[current]}\n{line}".strip()
        return cls(parts["COMPARISON"], parts["FINDINGS"], parts["IMPRESSION"])


def classify_change(prior_mm: float | None, current_mm: float | None, organ: Organ) -> Change:
    """Direction of change of one lesion between two time points (RECIST diameter).

    Stable within 10% or 2 mm, the usual reading tolerance of a diameter; a node is resolved when
    its short axis is under 10 mm.
    """
    if prior_mm is None and current_mm is None:
        return Change.NOT_ASSESSED
    if prior_mm is None or prior_mm == 0:
        return Change.NEW
    if current_mm is None:
        return Change.NOT_ASSESSED
    if current_mm == 0 or (organ.is_nodal and current_mm < 10.0 <= prior_mm):
        return Change.RESOLVED
    delta = current_mm - prior_mm
    if abs(delta) < STABLE_MM or abs(delta) <= STABLE_FRACTION * prior_mm:
        return Change.STABLE
    return Change.INCREASED if delta > 0 else Change.DECREASED


def lesion_site(organ: Organ, laterality: str | None) -> str:
    names = {
        Organ.LIVER: "liver",
        Organ.LUNG: "lung",
        Organ.LYMPH_NODE: "lymph node",
        Organ.ADRENAL: "adrenal gland",
        Organ.OTHER: "soft tissue",
    }
    base = names[organ]
    return f"{laterality} {base}" if laterality else base


def _mm(x: float) -> str:
    return f"{round(x):d} mm"


def _dims(long_mm: float, short_mm: float) -> str:
    return f"{round(long_mm):d} x {round(short_mm):d} mm"


def _date(d: dt.date) -> str:
    return d.isoformat()


def finding_sentence(f: LesionFact) -> str:
    site = lesion_site(f.organ, f.laterality)
    kind = "" if f.organ.is_nodal else " lesion"
    name = f"{site.capitalize()}{kind} {f.label}".strip()
    role = (
        {RecistRole.TARGET: " (target)", RecistRole.NON_TARGET: " (non-target)"}.get(f.role, "")
        if f.role
        else ""
    )
    cur = (
        _dims(f.long_axis_mm, f.short_axis_mm)
        if f.long_axis_mm is not None and f.short_axis_mm is not None
        else None
    )
    prior = (
        _dims(f.prior_long_axis_mm, f.prior_short_axis_mm)
        if f.prior_long_axis_mm is not None and f.prior_short_axis_mm is not None
        else None
    )
    when = f" on {_date(f.prior_date)}" if f.prior_date else ""
    if f.change is Change.NEW and f.equivocal:
        small = (
            f.long_axis_mm is not None
            and f.short_axis_mm is not None
            and not is_unequivocal_new(
                f.organ, f.long_axis_mm, f.short_axis_mm, min_axis_ratio=0.0
            )  # size only
        )
        return f"{'Small new' if small else 'New'} {site}{kind} {f.label} measures {cur}, equivocal; attention on follow-up."
    if f.change is Change.NEW:
        return f"New {site}{kind} {f.label} measures {cur}."
    if f.change is Change.RESOLVED:
        if f.organ.is_nodal and f.short_axis_mm:
            return f"{name}{role} now measures {cur}, normal in size (previously {prior}{when})."
        return f"{name}{role} has resolved (previously {prior}{when})."
    if f.change is Change.NOT_ASSESSED:
        return f"{name}{role} could not be assessed on this study (previously {prior}{when})."
    if f.change is Change.BASELINE:
        return f"{name}{role} measures {cur}."
    verb = {Change.INCREASED: "has increased", Change.DECREASED: "has decreased", Change.STABLE: "is stable"}[
        f.change
    ]
    faint = " (faint; seen on a second look at its prior position)" if f.guided else ""
    return f"{name}{role} {verb}, now {cur}{faint} (previously {prior}{when})."


def render_report(facts: ReportFacts) -> ReportText:
    if facts.comparison_dates:
        comparison = "CT of " + ", ".join(_date(d) for d in facts.comparison_dates) + "."
    else:
        comparison = "None available."
    order = {Organ.LUNG: 0, Organ.LYMPH_NODE: 1, Organ.LIVER: 2, Organ.ADRENAL: 3, Organ.OTHER: 4}
    ordered = sorted(facts.lesions, key=lambda f: (order[f.organ], f.label))
    lines = [finding_sentence(f) for f in ordered] or ["No measurable lesion is identified."]
    lines += list(facts.notes)
    findings = " ".join(lines)
    r = facts.recist
    impression_parts: list[str] = []
    if r is None:
        n_t = sum(1 for f in facts.lesions if f.role is RecistRole.TARGET)
        impression_parts.append(
            f"Baseline study: {len(facts.lesions)} lesion(s), {n_t} selected as RECIST 1.1 target(s)."
        )
    else:
        new = [f for f in facts.lesions if f.change is Change.NEW and not f.equivocal]
        if new:
            impression_parts.append(
                "New "
                + ", ".join(f"{lesion_site(f.organ, f.laterality)} lesion {f.label}" for f in new)
                + "."
            )
        doubtful = [f.label for f in facts.lesions if f.change is Change.NEW and f.equivocal]
        if doubtful:
            impression_parts.append(
                f"Equivocal new finding(s) {', '.join(doubtful)}, not counted as progression; "
                "follow-up advised."
            )
        if r.current_sum_mm is not None and r.change_from_baseline_pct is not None:
            impression_parts.append(
                f"Sum of target diameters {_mm(r.current_sum_mm)}, {r.change_from_baseline_pct:+.0f}% from baseline "
                f"({_mm(r.baseline_sum_mm)}) and {_mm(r.nadir_sum_mm)} at nadir."
            )
        impression_parts.append(f"RECIST 1.1: {r.category.label} ({r.category.value}).")
        if facts.irecist is not None:
            impression_parts.append(f"iRECIST: {facts.irecist.response.value}.")
    return ReportText(comparison=comparison, findings=findings, impression=" ".join(impression_parts))


def prior_report_text(tp: PriorTimePoint, previous: PriorTimePoint | None) -> str:
    """A plain prior report as the EHR would hold it (used by the synthetic cohort)."""
    prev = {f.track_id: f for f in previous.findings} if previous else {}
    facts = []
    for f in tp.findings:
        p = prev.get(f.track_id)
        facts.append(
            LesionFact(
                track_id=f.track_id,
                label=f.label,
                organ=f.organ,
                laterality=f.laterality,
                role=f.role,
                change=classify_change(p.recist_diameter_mm() if p else None, f.recist_diameter_mm(), f.organ)
                if previous
                else Change.BASELINE,
                long_axis_mm=f.long_axis_mm,
                short_axis_mm=f.short_axis_mm,
                prior_long_axis_mm=p.long_axis_mm if p else None,
                prior_short_axis_mm=p.short_axis_mm if p else None,
                prior_date=previous.study_date if previous else None,
            )
        )
    text = render_report(
        ReportFacts(
            tp.study_date, tp.study_uid, (previous.study_date,) if previous else (), tuple(facts), None
        )
    )
    return f"COMPARISON: {text.comparison}\nFINDINGS: {text.findings}"
