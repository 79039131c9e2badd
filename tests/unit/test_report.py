from __future__ import annotations

import datetime as dt

from core.recist import CurrentStatus, TrackObservation, assess_response
from core.report import Change, LesionFact, ReportFacts, classify_change, render_report
from core.types import Organ, PriorFinding, RecistRole

D0, D1 = dt.date(2025, 1, 10), dt.date(2025, 4, 2)


def fact(label, organ, change, cur, prior, role=RecistRole.TARGET, side=None):
    return LesionFact(
        f"uid-{label}",
        label,
        organ,
        side,
        role,
        change,
        cur[0] if cur else None,
        cur[1] if cur else None,
        prior[0] if prior else None,
        prior[1] if prior else None,
        D0 if prior else None,
    )


def test_equivocal_new_finding_is_reported_but_not_called_progression():
    f = LesionFact(
        "uid-L4",
        "L4",
        Organ.LUNG,
        "left",
        RecistRole.NEW,
        Change.NEW,
        6.2,
        5.1,
        None,
        None,
        None,
        equivocal=True,
    )
    text = render_report(ReportFacts(D1, "1.2.3", (D0,), (f,), None))
    assert "Small new left lung lesion L4 measures 6 x 5 mm, equivocal" in text.findings


def test_change_classes_use_10_percent_or_2_mm():
    assert classify_change(20.0, 21.5, Organ.LIVER) is Change.STABLE  # +1.5 mm
    assert classify_change(40.0, 43.9, Organ.LIVER) is Change.STABLE  # +9.75%
    assert classify_change(40.0, 45.0, Organ.LIVER) is Change.INCREASED
    assert classify_change(20.0, 15.0, Organ.LUNG) is Change.DECREASED
    assert classify_change(20.0, 0.0, Organ.LIVER) is Change.RESOLVED
    assert classify_change(16.0, 9.0, Organ.LYMPH_NODE) is Change.RESOLVED  # node back under 10 mm
    assert classify_change(None, 12.0, Organ.LIVER) is Change.NEW
    assert classify_change(12.0, None, Organ.LIVER) is Change.NOT_ASSESSED


def test_report_states_every_lesion_its_numbers_and_the_category():
    base = [
        PriorFinding("uid-L1", Organ.LIVER, 30.0, 20.0),
        PriorFinding("uid-L2", Organ.LYMPH_NODE, 24.0, 16.0),
    ]
    roles = {"uid-L1": RecistRole.TARGET, "uid-L2": RecistRole.TARGET}
    current = {
        "uid-L1": TrackObservation(CurrentStatus.MEASURED, 18.0, 12.0),
        "uid-L2": TrackObservation(CurrentStatus.ABSENT),
    }
    recist = assess_response(
        base, roles, current, new_lesions=["uid-L3"], labels={"uid-L1": "L1", "uid-L2": "L2", "uid-L3": "L3"}
    )
    facts = ReportFacts(
        D1,
        "1.2.3",
        (D0,),
        (
            fact("L1", Organ.LIVER, Change.DECREASED, (18.0, 12.0), (30.0, 20.0)),
            fact("L2", Organ.LYMPH_NODE, Change.RESOLVED, (0.0, 0.0), (24.0, 16.0)),
            fact("L3", Organ.LUNG, Change.NEW, (9.6, 7.2), None, role=RecistRole.NEW, side="right"),
        ),
        recist,
    )
    text = render_report(facts)
    assert text.comparison == "CT of 2025-01-10."
    assert (
        "Liver lesion L1 (target) has decreased, now 18 x 12 mm (previously 30 x 20 mm on 2025-01-10)."
        in text.findings
    )
    assert "Lymph node L2 (target) has resolved" in text.findings
    assert "New right lung lesion L3 measures 10 x 7 mm." in text.findings
    assert recist.target_response is not None and recist.target_response.value == "PR"
    assert recist.category.value == "PD"  # the new lesion
    assert text.impression.startswith("New right lung lesion L3.")
    assert "Sum of target diameters 18 mm, -61% from baseline (46 mm)" in text.impression
    assert "RECIST 1.1: progressive disease (PD)." in text.impression
    assert any("New lesion(s) L3" in line for line in recist.trace)
    assert "uid-" not in " ".join(recist.trace)  # the trace names lesions by label
