"""Prior reports with prose only: measurements read from the text, marked text-derived."""

from __future__ import annotations

import json

import pytest

from adapters.fhir_priors import parse_priors_bundle
from core.text_priors import findings_from_text
from core.types import Organ


def test_sentences_give_site_side_size_and_label_not_the_previous_measurement():
    text = (
        "FINDINGS: Liver lesion L1 (target) has decreased, now 21 x 17 mm (previously 33 x 33 mm on 2024-06-03). "
        "New right lung lesion L6 measures 12 x 10 mm. Lymph node L5 (non-target) has resolved (previously 18 x 12 mm). "
        "There is a 2.3 cm nodule in the left lower lobe. Sum of target diameters 71 mm."
    )
    found = {f.track_id: f for f in findings_from_text(text, "r1")}
    assert set(found) == {"text:L1", "text:L6", "text:r1:3"}
    assert (found["text:L1"].organ, found["text:L1"].long_axis_mm, found["text:L1"].short_axis_mm) == (
        Organ.LIVER,
        21.0,
        17.0,
    )
    assert found["text:L6"].laterality == "right" and found["text:L6"].organ is Organ.LUNG
    assert found["text:r1:3"].long_axis_mm == pytest.approx(23.0) and found["text:r1:3"].laterality == "left"
    assert all(f.source == "text" and f.centroid_lps_mm is None for f in found.values())


def test_bundle_without_structured_findings_falls_back_to_the_report_text(small_patient):
    raw = json.loads((small_patient.folder / "priors.json").read_text())
    prose_only = dict(
        raw,
        entry=[
            e for e in raw["entry"] if e["resource"]["resourceType"] not in ("Observation", "BodyStructure")
        ],
    )
    for e in prose_only["entry"]:
        e["resource"].pop("result", None)
    _, tps = parse_priors_bundle(prose_only)
    _, structured = parse_priors_bundle(raw)
    for text_tp, obs_tp in zip(tps, structured, strict=True):
        by_label = {f.label: f for f in text_tp.findings}
        for f in obs_tp.findings:
            got = by_label[f.label]  # every reported lesion is read back from the prose
            assert got.source == "text" and got.organ is f.organ
            assert got.long_axis_mm == pytest.approx(round(f.long_axis_mm), abs=0.51)
