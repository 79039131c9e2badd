"""The grounding verifier: every claim a drafted report makes is checked against the measured facts.

No machine learning here. Each sentence of a draft (from a language model, or edited by hand) is read for
claims:

- lesion labels (``L3``): each must be a lesion of the facts (an invented lesion fails);
- numbers with units (``23 mm``, ``2.3 cm``, ``23 x 17 mm``) and percentages: each must be a measurement of
  a lesion the sentence is about (current or prior, whole millimetres as reported), or a RECIST sum or
  change when the sentence names no lesion;
- dates: each must be the study date or a comparison date;
- organ/site and side: must agree with the lesions the sentence names;
- direction (increased / decreased / stable / new / resolved): must agree with each named lesion's change;
- RECIST category: must be the assessed one.

A sentence that fails is replaced by the deterministic sentence for the same lesion(s) (``render_report``
wording) or, when it names nothing that can be rebuilt, removed; both are recorded with the reasons.
Omissions are checked last: every new lesion and the RECIST category must be stated, else the
deterministic sentence is appended and flagged. The result says, sentence by sentence, what is model text,
what was replaced and why, so a radiologist can see it.

Known limit: a number is checked against the named lesion's measurements, not against its place in the
sentence, so swapping a lesion's current and prior size is not caught (the direction word usually is).
"""

from __future__ import annotations

import datetime as dt
import enum
import re
from dataclasses import dataclass

from core.recist import Response
from core.report import Change, LesionFact, ReportFacts, ReportText, finding_sentence, render_report
from core.types import Organ

__all__ = [
    "DIRECTION_WORDS",
    "ROUNDING_TOLERANCE",
    "SIDE_WORDS",
    "SITE_WORDS",
    "Origin",
    "SentenceCheck",
    "VerifiedDraft",
    "claim_problems",
    "global_numbers",
    "known_dates",
    "lesion_numbers",
    "split_sentences",
    "stated_directions",
    "sum_changes_pct",
    "verify_draft",
]


class Origin(enum.StrEnum):
    MODEL = "model"  # drafted text that passed every check
    REPLACED = "replaced"  # drafted text that failed; the deterministic sentence stands in its place
    REMOVED = "removed"  # drafted text that failed and names nothing that could be rebuilt
    ADDED = "added"  # a required statement the draft omitted, added deterministically


@dataclass(frozen=True, slots=True)
class SentenceCheck:
    section: str  # comparison / findings / impression
    text: str  # what the report now says (empty when removed)
    origin: Origin
    drafted: str = ""  # the drafted sentence, when it was replaced or removed
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class VerifiedDraft:
    text: ReportText
    sentences: tuple[SentenceCheck, ...]

    @property
    def accepted_fraction(self) -> float:
        """Sentences that passed unchanged, over every sentence checked or added: a draft that omits the
        category or a new lesion counts the added sentence against it (an empty draft scores 0)."""
        n = len(self.sentences)
        return sum(s.origin is Origin.MODEL for s in self.sentences) / n if n else 0.0

    @property
    def flagged(self) -> tuple[SentenceCheck, ...]:
        return tuple(s for s in self.sentences if s.origin is not Origin.MODEL)


_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")
_LABEL = re.compile(r"\b([LN]\d{1,3})\b")
_DIMS = re.compile(r"(\d+(?:\.\d+)?)\s*(?:x|×|by)\s*(\d+(?:\.\d+)?)\s*(mm|cm)\b", re.I)
_SIZE = re.compile(r"(?<![\d.x×])(\d+(?:\.\d+)?)\s*(mm|cm)\b", re.I)
_PCT = re.compile(r"([+-−]?\d+(?:\.\d+)?)\s*%")
_ISO = re.compile(r"\b(\d{4}-\d{2}-\d{2})\b")
_MONTHS = [
    "january",
    "february",
    "march",
    "april",
    "may",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
]
_TEXT_DATE = re.compile(r"\b(\d{1,2})\s+(" + "|".join(_MONTHS) + r")\s+(\d{4})\b", re.I)
# The words that make a claim, one entry per claim: a trailing ``*`` is a stem (any ending). The verifier's
# patterns are built from them, and so is constrained decoding (``core.draft_guide``): the two cannot drift.
SITE_WORDS: dict[Organ, tuple[str, ...]] = {
    Organ.LIVER: ("liver", "hepatic", "hepato*"),
    Organ.LUNG: ("lung", "lungs", "pulmonary", "lobe"),
    Organ.LYMPH_NODE: ("lymph", "node", "nodes", "nodal", "adenopathy"),
    Organ.ADRENAL: ("adrenal",),
}
SIDE_WORDS: dict[str, tuple[str, ...]] = {"left": ("left",), "right": ("right",)}
DIRECTION_WORDS: dict[Change, tuple[str, ...]] = {
    Change.INCREASED: (
        "increas*",
        "enlarg*",
        "grown",
        "grew",
        "larger",
        "bigger",
        "progressed",
        "progressing",
    ),
    Change.DECREASED: ("decreas*", "smaller", "reduc*", "shrunk", "shrank", "regress*"),
    Change.STABLE: ("stable", "unchanged", "no significant change"),
    Change.NEW: ("new",),
    Change.RESOLVED: (
        "resolved",
        "no longer seen",
        "no longer visible",
        "no longer identified",
        "disappeared",
    ),
}


def _words_pattern(words: tuple[str, ...]) -> re.Pattern[str]:
    """A case-blind pattern for whole words (``stem*``: the stem with any ending)."""
    alternatives = [re.escape(w[:-1]) + r"\w*" if w.endswith("*") else re.escape(w) for w in words]
    return re.compile(r"\b(" + "|".join(alternatives) + r")\b", re.I)


_SITES = {organ: _words_pattern(words) for organ, words in SITE_WORDS.items()}
_SIDES = {side: _words_pattern(words) for side, words in SIDE_WORDS.items()}
_DIRECTIONS = {change: _words_pattern(words) for change, words in DIRECTION_WORDS.items()}
_CATEGORIES: dict[Response, re.Pattern[str]] = {
    Response.CR: re.compile(r"\bcomplete response\b|\(CR\)|\bCR\b"),
    Response.PR: re.compile(r"\bpartial response\b|\bPR\b", re.I),
    Response.SD: re.compile(r"\bstable disease\b|\bSD\b", re.I),
    Response.PD: re.compile(r"\bprogressive disease\b|\bprogression\b|\bPD\b", re.I),
    Response.NE: re.compile(r"\bnot evaluable\b|\bNE\b"),
    Response.NON_CR_NON_PD: re.compile(r"non-CR/non-PD", re.I),
}
_NEGATED_PROGRESSION = re.compile(r"\bnot (counted|called|considered)( as)? progression\b", re.I)
# reported figures are rounded: diameters to whole millimetres (0.5 up) or cm to one decimal, changes to whole %
ROUNDING_TOLERANCE = 0.51


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SPLIT.split(text.strip()) if s.strip()]


def _mm_values(sentence: str) -> list[float]:
    values: list[float] = []
    rest = sentence
    for m in _DIMS.finditer(sentence):
        scale = 10.0 if m.group(3).lower() == "cm" else 1.0
        values += [float(m.group(1)) * scale, float(m.group(2)) * scale]
        rest = rest.replace(m.group(0), " ")
    for m in _SIZE.finditer(rest):
        values.append(float(m.group(1)) * (10.0 if m.group(2).lower() == "cm" else 1.0))
    return values


def _dates(sentence: str) -> list[str]:
    found = _ISO.findall(sentence)
    for day, month, year in _TEXT_DATE.findall(sentence):
        found.append(f"{year}-{_MONTHS.index(month.lower()) + 1:02d}-{int(day):02d}")
    return found


def lesion_numbers(f: LesionFact) -> list[float]:
    return [
        v
        for v in (f.long_axis_mm, f.short_axis_mm, f.prior_long_axis_mm, f.prior_short_axis_mm)
        if v is not None
    ]


def global_numbers(facts: ReportFacts) -> list[float]:
    r = facts.recist
    if r is None:
        return []
    return [v for v in (r.current_sum_mm, r.baseline_sum_mm, r.nadir_sum_mm, r.change_from_nadir_mm) if v]


def sum_changes_pct(facts: ReportFacts) -> list[float]:
    r = facts.recist
    if r is None:
        return []
    return [p for p in (r.change_from_baseline_pct, r.change_from_nadir_pct) if p is not None]


def known_dates(facts: ReportFacts) -> set[dt.date]:
    """The dates a report may state: the study's, the comparisons' and the lesions' prior dates."""
    return {facts.study_date, *facts.comparison_dates, *(f.prior_date for f in facts.lesions if f.prior_date)}


def _close(value: float, allowed: list[float]) -> bool:
    return any(abs(value - a) <= ROUNDING_TOLERANCE or abs(value - round(a)) < 1e-6 for a in allowed)


def stated_directions(sentence: str) -> set[Change]:
    """The changes a sentence states (increased / decreased / stable / new / resolved)."""
    claimed = {c for c, p in _DIRECTIONS.items() if p.search(sentence)}
    if _NEGATED_PROGRESSION.search(sentence):
        claimed.discard(Change.INCREASED)
    return claimed


def claim_problems(sentence: str, facts: ReportFacts, by_label: dict[str, LesionFact]) -> list[str]:
    problems: list[str] = []
    labels = list(dict.fromkeys(_LABEL.findall(sentence)))
    unknown = [lab for lab in labels if lab not in by_label]
    if unknown:
        problems.append(f"names lesion(s) {', '.join(unknown)} that were not measured")
    named = [by_label[lab] for lab in labels if lab in by_label]

    allowed = [v for f in named for v in lesion_numbers(f)] if named else []
    if not named:
        allowed = global_numbers(facts) + [v for f in facts.lesions for v in lesion_numbers(f)]
    for value in _mm_values(sentence):
        if not _close(value, allowed):
            problems.append(
                f"{value:g} mm is not a measurement of {'the named lesion' if named else 'this study'}"
            )
    if facts.recist is not None:
        pcts = sum_changes_pct(facts)
        for m in _PCT.findall(sentence):
            value = float(m.replace("−", "-"))
            if not any(abs(abs(value) - abs(p)) <= ROUNDING_TOLERANCE for p in pcts):
                problems.append(f"{m}% is not the measured change of the target sum")
    dates = {d.isoformat() for d in known_dates(facts)}
    for d in _dates(sentence):
        if d not in dates:
            problems.append(f"date {d} is neither this study's nor a comparison date")

    if named:
        for organ, pattern in _SITES.items():
            if pattern.search(sentence) and not any(f.organ is organ for f in named):
                problems.append(f"says {organ.value.replace('_', ' ')} but the lesion is elsewhere")
        for side, pattern in _SIDES.items():
            if pattern.search(sentence) and not any(f.laterality == side for f in named):
                problems.append(f"says {side} but the lesion is not on the {side}")
        claimed = stated_directions(sentence)
        actual = {f.change for f in named}
        for c in claimed - actual:
            if c is Change.NEW and any(f.change is Change.NEW for f in named):
                continue
            problems.append(
                f"says {c.value} but the measurement shows {', '.join(sorted(a.value for a in actual))}"
            )

    stated = {r for r, p in _CATEGORIES.items() if p.search(sentence)}
    if _NEGATED_PROGRESSION.search(sentence):
        stated.discard(Response.PD)
    if stated:
        truth = facts.recist.category if facts.recist is not None else None
        wrong = {
            r for r in stated if r is not truth and not (r is Response.SD and truth is Response.NON_CR_NON_PD)
        }
        if truth is None:
            problems.append("states a RECIST category on a baseline study")
        elif wrong:
            problems.append(
                f"states {', '.join(sorted(r.value for r in wrong))}; the assessment is {truth.value}"
            )
    return problems


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def _closest(sentence: str, candidates: list[str]) -> str:
    words = _words(sentence)
    scored = [(len(words & _words(c)) / max(len(words | _words(c)), 1), c) for c in candidates]
    best = max(scored, default=(0.0, ""))
    return best[1] if best[0] >= 0.2 else ""


def verify_draft(draft: ReportText, facts: ReportFacts) -> VerifiedDraft:
    """Check every sentence of ``draft`` against ``facts``; replace what fails; add what is missing."""
    reference = render_report(facts)
    by_label = {f.label: f for f in facts.lesions if f.label}
    trusted = {
        s
        for part in (reference.comparison, reference.findings, reference.impression)
        for s in split_sentences(part)
    }
    checks: list[SentenceCheck] = []
    out: dict[str, list[str]] = {"comparison": [], "findings": [], "impression": []}
    for section, text in (
        ("comparison", draft.comparison),
        ("findings", draft.findings),
        ("impression", draft.impression),
    ):
        for sentence in split_sentences(text):
            problems = [] if sentence in trusted else claim_problems(sentence, facts, by_label)
            if not problems:
                out[section].append(sentence)
                checks.append(SentenceCheck(section, sentence, Origin.MODEL))
                continue
            named = [by_label[lab] for lab in dict.fromkeys(_LABEL.findall(sentence)) if lab in by_label]
            replacement = " ".join(finding_sentence(f) for f in named) if named else ""
            if not replacement:  # the reference sentence of the same section that says the most alike
                replacement = _closest(sentence, split_sentences(getattr(reference, section)))
            if replacement and replacement not in out[section]:
                out[section].append(replacement)
                checks.append(SentenceCheck(section, replacement, Origin.REPLACED, sentence, tuple(problems)))
            else:
                checks.append(SentenceCheck(section, "", Origin.REMOVED, sentence, tuple(problems)))

    # omissions: every (unequivocal) new lesion and the category must be stated
    final_text = " ".join(s for part in out.values() for s in part)
    for f in facts.lesions:
        if (
            f.change is Change.NEW
            and not f.equivocal
            and not re.search(rf"\b{re.escape(f.label)}\b", final_text)
        ):
            sentence = finding_sentence(f)
            out["findings"].append(sentence)
            checks.append(
                SentenceCheck(
                    "findings", sentence, Origin.ADDED, problems=(f"new lesion {f.label} was not mentioned",)
                )
            )
    if facts.recist is not None:
        category = facts.recist.category
        if not any(_CATEGORIES[category].search(s) for s in out["impression"]):
            sentence = next(s for s in split_sentences(reference.impression) if "RECIST" in s)
            out["impression"].append(sentence)
            checks.append(
                SentenceCheck(
                    "impression", sentence, Origin.ADDED, problems=("the RECIST category was not stated",)
                )
            )
    verified = ReportText(" ".join(out["comparison"]), " ".join(out["findings"]), " ".join(out["impression"]))
    return VerifiedDraft(verified, tuple(checks))
