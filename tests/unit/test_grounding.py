"""The grounding verifier catches every kind of injected error and accepts the deterministic wording."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from core.grounding import Origin, split_sentences, verify_draft
from core.recist import NonTargetResponse, RecistResult, Response
from core.report import Change, LesionFact, ReportFacts, ReportText, render_report
from core.types import Organ, RecistRole

D0, D1 = dt.date(2025, 1, 10), dt.date(2025, 4, 2)


def _fact(label, organ, change, cur, prior, role=RecistRole.TARGET, side=None):
    return LesionFact(
        f"uid-{label}", label, organ, side, role, change, *cur, *prior, D0 if prior[0] else None
    )


LESIONS = (
    _fact("L1", Organ.LIVER, Change.INCREASED, (31.4, 22.0), (24.2, 17.1)),
    _fact("L2", Organ.LUNG, Change.DECREASED, (12.2, 9.0), (18.0, 14.0), side="right"),
    _fact("L3", Organ.LYMPH_NODE, Change.STABLE, (21.0, 15.2), (20.5, 14.8)),
    _fact("L4", Organ.LUNG, Change.NEW, (14.0, 11.0), (None, None), role=RecistRole.NEW, side="left"),
)
RECIST = RecistResult(
    category=Response.PD,
    target_response=Response.SD,
    non_target_response=NonTargetResponse.NONE,
    baseline_sum_mm=57.0,
    nadir_sum_mm=57.0,
    current_sum_mm=58.8,
    change_from_baseline_pct=3.2,
    change_from_nadir_pct=3.2,
    change_from_nadir_mm=1.8,
    new_lesions=("uid-L4",),
    trace=("New lesion L4: progressive disease.",),
)
FACTS = ReportFacts(D1, "1.2.3", (D0,), LESIONS, RECIST, prior_impression="Liver metastasis.")
REFERENCE = render_report(FACTS)


def _swap(text: str, old: str, new: str) -> str:
    assert old in text, (old, text)
    return text.replace(old, new, 1)


def test_the_deterministic_report_passes_unchanged():
    verified = verify_draft(REFERENCE, FACTS)
    assert verified.text == REFERENCE
    assert verified.accepted_fraction == 1.0 and not verified.flagged


def test_model_phrasing_with_the_right_facts_passes():
    draft = ReportText(
        comparison=f"Compared with CT of {D0.isoformat()}.",
        findings=(
            "The hepatic lesion L1 has enlarged to 31 x 22 mm from 24 x 17 mm. "
            "Right lung nodule L2 is smaller at 1.2 cm. "
            "Nodal lesion L3 is unchanged, 15 mm short axis. "
            "There is a new left lung lesion L4 measuring 14 x 11 mm."
        ),
        impression="New left lung lesion L4. Progressive disease (RECIST 1.1 PD).",
    )
    verified = verify_draft(draft, FACTS)
    assert [s.problems for s in verified.flagged] == []
    assert verified.accepted_fraction == 1.0


@pytest.mark.parametrize(
    ("section", "old", "new", "why"),
    [
        ("findings", "now 31 x 22 mm", "now 35 x 22 mm", "35 mm is not a measurement"),
        ("findings", "Right lung lesion L2", "Left lung lesion L2", "says left"),
        ("findings", "L2 (target) has decreased", "L2 (target) has increased", "says increased"),
        ("findings", "Liver lesion L1", "Lung lesion L1", "says lung"),
        ("findings", "on 2025-01-10", "on 2024-12-01", "date 2024-12-01"),
        (
            "impression",
            "RECIST 1.1: progressive disease (PD).",
            "RECIST 1.1: stable disease (SD).",
            "states SD",
        ),
        ("impression", "+3% from baseline", "+30% from baseline", "30% is not the measured change"),
    ],
)
def test_each_injected_error_is_caught_and_replaced(section, old, new, why):
    bad = dataclasses.replace(REFERENCE, **{section: _swap(getattr(REFERENCE, section), old, new)})
    verified = verify_draft(bad, FACTS)
    flagged = [s for s in verified.flagged if s.origin is Origin.REPLACED]
    assert len(flagged) == 1 and new.split()[0] in flagged[0].drafted
    assert any(why in p for p in flagged[0].problems), flagged[0].problems
    assert verified.text == REFERENCE  # the deterministic sentence stands in its place


def test_an_invented_lesion_is_removed():
    bad = dataclasses.replace(REFERENCE, findings=REFERENCE.findings + " Liver lesion L9 measures 12 x 8 mm.")
    verified = verify_draft(bad, FACTS)
    (removed,) = verified.flagged
    assert removed.origin is Origin.REMOVED and "L9" in removed.problems[0]
    assert "L9" not in verified.text.findings


def test_a_missing_new_lesion_and_a_missing_category_are_added():
    findings = " ".join(s for s in split_sentences(REFERENCE.findings) if "L4" not in s)
    draft = ReportText(REFERENCE.comparison, findings, "Mixed response of the liver and lung lesions.")
    verified = verify_draft(draft, FACTS)
    added = [s for s in verified.sentences if s.origin is Origin.ADDED]
    assert {p for s in added for p in s.problems} == {
        "new lesion L4 was not mentioned",
        "the RECIST category was not stated",
    }
    assert "L4" in verified.text.findings and "progressive disease (PD)" in verified.text.impression


def test_equivocal_wording_is_not_read_as_progression():
    small = dataclasses.replace(LESIONS[3], equivocal=True, long_axis_mm=6.0, short_axis_mm=5.0)
    recist = dataclasses.replace(RECIST, category=Response.SD, new_lesions=())
    facts = dataclasses.replace(FACTS, lesions=(*LESIONS[:3], small), recist=recist)
    reference = render_report(facts)
    assert "not counted as progression" in reference.impression
    assert not verify_draft(reference, facts).flagged


def _random_facts(rng):
    organs = [Organ.LIVER, Organ.LUNG, Organ.LYMPH_NODE]
    lesions = []
    for n in range(rng.randint(1, 6)):
        organ = rng.choice(organs)
        side = rng.choice(["left", "right"]) if organ is Organ.LUNG else None
        change = rng.choice([Change.INCREASED, Change.DECREASED, Change.STABLE, Change.NEW, Change.RESOLVED])
        prior = (None, None) if change is Change.NEW else (rng.uniform(10, 60), rng.uniform(5, 30))
        if change is Change.RESOLVED:
            cur = (0.0, 0.0) if organ is not Organ.LYMPH_NODE else (rng.uniform(5, 9), rng.uniform(4, 8))
        else:
            cur = (rng.uniform(8, 70), rng.uniform(5, 35))
        role = (
            RecistRole.NEW if change is Change.NEW else rng.choice([RecistRole.TARGET, RecistRole.NON_TARGET])
        )
        lesions.append(_fact(f"L{n + 1}", organ, change, cur, prior, role=role, side=side))
    category = rng.choice([Response.PD, Response.PR, Response.SD, Response.CR])
    recist = dataclasses.replace(
        RECIST,
        category=category,
        current_sum_mm=rng.uniform(10, 150),
        baseline_sum_mm=rng.uniform(10, 150),
        nadir_sum_mm=rng.uniform(10, 150),
        change_from_baseline_pct=rng.uniform(-90, 90),
    )
    return ReportFacts(D1, "1.2.3", (D0,), tuple(lesions), recist)


def test_two_hundred_random_fact_sets_deterministic_passes_and_a_wrong_number_is_caught():
    import random
    import re

    rng = random.Random(2026)
    caught = 0
    for _ in range(200):
        facts = _random_facts(rng)
        reference = render_report(facts)
        assert not verify_draft(reference, facts).flagged, reference
        # inject: one millimetre figure of the findings moved to a value that is none of this lesion's
        # measurements (the verifier checks values against the lesion, not which of its values goes where)
        m = next(re.finditer(r"(\d+) x (\d+) mm", reference.findings))
        sentence = next(s for s in split_sentences(reference.findings) if m.group(0) in s)
        label = re.search(r"\bL\d+\b", sentence).group(0)
        lesion = next(f for f in facts.lesions if f.label == label)
        own = {
            round(v)
            for v in (
                lesion.long_axis_mm,
                lesion.short_axis_mm,
                lesion.prior_long_axis_mm,
                lesion.prior_short_axis_mm,
            )
            if v is not None
        }
        bad_value = next(v for v in range(int(m.group(1)) + 7, 500) if all(abs(v - o) > 1 for o in own))
        bad = dataclasses.replace(
            reference, findings=reference.findings.replace(m.group(0), f"{bad_value} x {m.group(2)} mm", 1)
        )
        verified = verify_draft(bad, facts)
        caught += any(f"{bad_value} mm" in p for s in verified.flagged for p in s.problems)
        assert all(f"{bad_value} x {m.group(2)} mm" not in s for s in split_sentences(verified.text.findings))
    assert caught == 200
