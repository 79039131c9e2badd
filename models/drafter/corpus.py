"""Training and evaluation corpus for the drafter: (facts, prior report) -> report, in varied phrasing.

Fact sets are drawn at random but consistently (RECIST category from the sums and new lesions, as RECIST
1.1 rules); each is written in one of several reporting styles (synonyms, sentence orders, date formats,
prior reports written differently). Every target text passes ``core.grounding.verify_draft`` unchanged:
the model learns only grounded wording. Seeds separate training from held-out sets.

    python -m models.drafter.corpus --out data/drafter --train 1200 --test 200
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import random
from pathlib import Path
from typing import Any

from core.grounding import verify_draft
from core.recist import NonTargetResponse, RecistResult, Response
from core.report import Change, LesionFact, ReportFacts, ReportText, lesion_site, render_report
from core.types import Organ, RecistRole
from models.drafter.prompt import facts_prompt

__all__ = ["Example", "make_examples", "random_facts", "styled_report"]

_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]


def random_facts(rng: random.Random) -> ReportFacts:
    """A plausible follow-up: 1-4 lesions, their changes, and the RECIST category those imply."""
    prior_date = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randint(0, 500))
    study_date = prior_date + dt.timedelta(days=rng.choice([42, 56, 63, 84, 90, 120]))
    lesions: list[LesionFact] = []
    organs = [Organ.LIVER, Organ.LUNG, Organ.LYMPH_NODE]
    for n in range(rng.randint(1, 4)):
        organ = rng.choice(organs)
        side = rng.choice(["left", "right"]) if organ is Organ.LUNG else None
        change = rng.choices(
            [Change.INCREASED, Change.DECREASED, Change.STABLE, Change.NEW, Change.RESOLVED], [3, 3, 3, 2, 1]
        )[0]
        prior = (None, None) if change is Change.NEW else (rng.uniform(11, 55), 0.0)
        if prior[0] is not None:
            prior = (prior[0], prior[0] * rng.uniform(0.55, 0.9))
        if change is Change.INCREASED and prior[0]:
            cur = (prior[0] * rng.uniform(1.2, 1.6), prior[1] * rng.uniform(1.15, 1.5))
        elif change is Change.DECREASED and prior[0]:
            cur = (prior[0] * rng.uniform(0.4, 0.8), prior[1] * rng.uniform(0.4, 0.8))
        elif change is Change.STABLE and prior[0]:
            cur = (prior[0] * rng.uniform(0.97, 1.03), prior[1] * rng.uniform(0.97, 1.03))
        elif change is Change.RESOLVED:
            cur = (0.0, 0.0)
        else:
            long_mm = rng.uniform(10, 25)
            cur = (long_mm, long_mm * rng.uniform(0.6, 0.9))
        if organ is Organ.LYMPH_NODE and change is Change.RESOLVED:
            organ = Organ.LIVER  # a node 'resolves' to a normal size, worded differently: keep it simple
        role = (
            RecistRole.NEW if change is Change.NEW else rng.choice([RecistRole.TARGET, RecistRole.NON_TARGET])
        )
        lesions.append(
            LesionFact(
                f"uid-{n}",
                f"L{n + 1}",
                organ,
                side,
                role,
                change,
                round(cur[0], 1),
                round(cur[1], 1),
                None if prior[0] is None else round(prior[0], 1),
                None if prior[1] is None else round(prior[1], 1),
                None if prior[0] is None else prior_date,
            )
        )
    targets = [f for f in lesions if f.role is RecistRole.TARGET]
    baseline = sum(f.prior_diameter_mm() or 0.0 for f in targets)
    current = sum(f.diameter_mm() or 0.0 for f in targets)
    pct = 100.0 * (current - baseline) / baseline if baseline else 0.0
    new = [f for f in lesions if f.change is Change.NEW]
    if new or (baseline and pct >= 20 and current - baseline >= 5):
        category = Response.PD
    elif targets and current == 0:
        category = Response.CR
    elif baseline and pct <= -30:
        category = Response.PR
    else:
        category = Response.SD
    recist = RecistResult(
        category=category,
        target_response=category,
        non_target_response=NonTargetResponse.NON_CR_NON_PD,
        baseline_sum_mm=baseline,
        nadir_sum_mm=baseline,
        current_sum_mm=current,
        change_from_baseline_pct=pct,
        change_from_nadir_pct=pct,
        change_from_nadir_mm=current - baseline,
        new_lesions=tuple(f.track_id for f in new),
        trace=(),
    )
    facts = ReportFacts(study_date, "1.2.3", (prior_date,), tuple(lesions), recist)
    return dataclasses.replace(facts, prior_impression=_prior_report(rng, facts))


def _prior_report(rng: random.Random, facts: ReportFacts) -> str:
    parts = []
    for f in facts.lesions:
        if f.prior_long_axis_mm is None:
            continue
        site = lesion_site(f.organ, f.laterality)
        parts.append(
            rng.choice(
                [
                    f"{site.capitalize()} lesion {f.label} {round(f.prior_long_axis_mm):d} x {round(f.prior_short_axis_mm or 0):d} mm.",
                    f"{f.label}: {site}, {round(f.prior_long_axis_mm):d} mm.",
                ]
            )
        )
    lead = rng.choice(["Metastatic disease.", "Known metastases, baseline for RECIST.", "Findings as below."])
    return " ".join([lead, *parts]) if parts else lead


def _date(rng: random.Random, d: dt.date, style: int) -> str:
    return d.isoformat() if style == 0 else f"{d.day} {_MONTHS[d.month - 1]} {d.year}"


def _sentence(rng: random.Random, f: LesionFact, date_style: int) -> str:
    site = lesion_site(f.organ, f.laterality)
    noun = "node" if f.organ is Organ.LYMPH_NODE else "lesion"
    site_noun = site if f.organ is Organ.LYMPH_NODE else f"{site} {noun}"
    cur = f"{round(f.long_axis_mm or 0):d} x {round(f.short_axis_mm or 0):d} mm"
    prior = f"{round(f.prior_long_axis_mm or 0):d} x {round(f.prior_short_axis_mm or 0):d} mm"
    when = _date(rng, f.prior_date, date_style) if f.prior_date else ""
    options: list[str]
    if f.change is Change.INCREASED:
        options = [
            f"{site_noun.capitalize()} {f.label} has increased, now {cur} (previously {prior} on {when}).",
            f"{f.label} in the {site} has grown to {cur} from {prior}.",
            f"Interval enlargement of {site_noun} {f.label}, now {cur} (was {prior}).",
            f"The {site_noun} {f.label} is larger, measuring {cur} compared with {prior} on {when}.",
        ]
    elif f.change is Change.DECREASED:
        options = [
            f"{site_noun.capitalize()} {f.label} has decreased, now {cur} (previously {prior} on {when}).",
            f"{f.label} in the {site} is smaller at {cur}, previously {prior}.",
            f"Interval decrease in size of {site_noun} {f.label}, now {cur} from {prior}.",
            f"The {site_noun} {f.label} has reduced to {cur} (was {prior} on {when}).",
        ]
    elif f.change is Change.STABLE:
        options = [
            f"{site_noun.capitalize()} {f.label} is stable at {cur} (previously {prior}).",
            f"{f.label} in the {site} is unchanged, {cur}.",
            f"The {site_noun} {f.label} measures {cur}, stable since {when}.",
        ]
    elif f.change is Change.NEW:
        options = [
            f"New {site_noun} {f.label} measures {cur}.",
            f"There is a new {cur} {noun} in the {site} ({f.label}).",
            f"A new {site_noun}, {f.label}, measures {cur}.",
        ]
    else:  # resolved
        options = [
            f"{site_noun.capitalize()} {f.label} has resolved (previously {prior}).",
            f"{f.label} in the {site} is no longer seen (previously {prior} on {when}).",
        ]
    return rng.choice(options)


def styled_report(rng: random.Random, facts: ReportFacts) -> ReportText:
    """One of several reporting styles for ``facts``; every sentence is grounded in them."""
    date_style = rng.randint(0, 1)
    dates = ", ".join(_date(rng, d, date_style) for d in facts.comparison_dates)
    comparison = rng.choice(
        [f"CT of {dates}.", f"Comparison is made with the CT of {dates}.", f"Prior CT {dates}."]
    )
    lesions = list(facts.lesions)
    if rng.random() < 0.5:
        order = {Organ.LUNG: 0, Organ.LYMPH_NODE: 1, Organ.LIVER: 2}
        lesions.sort(key=lambda f: (order.get(f.organ, 3), f.label))
    findings = " ".join(_sentence(rng, f, date_style) for f in lesions)
    r = facts.recist
    assert r is not None
    parts = []
    new = [f for f in facts.lesions if f.change is Change.NEW and not f.equivocal]
    if new:
        names = ", ".join(f"{lesion_site(f.organ, f.laterality)} lesion {f.label}" for f in new)
        parts.append(rng.choice([f"New {names}.", f"Interval development of new {names}."]))
    if r.current_sum_mm is not None and r.change_from_baseline_pct is not None and r.baseline_sum_mm:
        parts.append(
            rng.choice(
                [
                    f"Sum of target diameters {round(r.current_sum_mm):d} mm, {r.change_from_baseline_pct:+.0f}% from baseline ({round(r.baseline_sum_mm):d} mm).",
                    f"Target lesion sum {round(r.current_sum_mm):d} mm versus {round(r.baseline_sum_mm):d} mm at baseline ({r.change_from_baseline_pct:+.0f}%).",
                ]
            )
        )
    category = rng.choice(
        [
            f"RECIST 1.1: {r.category.label} ({r.category.value}).",
            f"Overall response by RECIST 1.1 is {r.category.label} ({r.category.value}).",
            f"Findings are consistent with {r.category.label} ({r.category.value}) by RECIST 1.1.",
        ]
    )
    parts.insert(0 if rng.random() < 0.3 else len(parts), category)
    return ReportText(comparison, findings, " ".join(parts))


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    target: str

    def as_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "target": self.target}


def make_examples(n: int, seed: int) -> tuple[list[Example], list[ReportFacts]]:
    """``n`` examples whose targets pass the verifier unchanged (those that would not are redrawn)."""
    rng = random.Random(seed)
    examples: list[Example] = []
    facts_out: list[ReportFacts] = []
    while len(examples) < n:
        facts = random_facts(rng)
        text = styled_report(rng, facts) if rng.random() < 0.85 else render_report(facts)
        if verify_draft(text, facts).flagged:
            continue
        examples.append(Example(facts_prompt(facts), text.as_text()))
        facts_out.append(facts)
    return examples, facts_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/drafter"))
    ap.add_argument("--train", type=int, default=1200)
    ap.add_argument("--test", type=int, default=200)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", args.train, args.seed), ("test", args.test, args.seed + 1000)):
        examples, _ = make_examples(n, seed)
        with (args.out / f"{name}.jsonl").open("w") as f:
            for ex in examples:
                f.write(json.dumps(ex.as_json()) + "\n")
        print(f"{name}: {n} examples -> {args.out / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()
