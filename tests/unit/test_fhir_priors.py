"""Prior findings as FHIR: the generator's Bundle validates, round-trips, and bad input is refused."""

from __future__ import annotations

import copy
import json

import pytest

from adapters.fhir_priors import load_priors, parse_priors_bundle, priors_to_bundle
from core.errors import InvalidPriorsError, PatientMismatchError
from core.types import RecistRole


def test_generated_bundle_round_trips(small_patient):
    raw = json.loads((small_patient.folder / "priors.json").read_text())
    pid, tps = parse_priors_bundle(raw, small_patient.patient_id)
    assert pid == small_patient.patient_id
    assert len(tps) == len(small_patient.time_points)
    assert [tp.study_date for tp in tps] == sorted(tp.study_date for tp in tps)
    truth0 = json.loads((small_patient.folder / "t0" / "truth.json").read_text())
    present = {les["track_id"]: les for les in truth0["lesions"] if les["present"]}
    got = {f.track_id: f for f in tps[0].findings}
    assert set(got) == set(present)
    for tid, f in got.items():
        assert f.long_axis_mm == pytest.approx(present[tid]["long_axis_mm"], abs=0.06)
        assert f.organ.value == present[tid]["organ"]
        assert f.centroid_lps_mm == pytest.approx(present[tid]["center_lps_mm"], abs=0.06)
        assert f.role in (RecistRole.TARGET, RecistRole.NON_TARGET)
    assert tps[0].study_uid == truth0["study_uid"]
    assert "FINDINGS" in tps[0].report_text
    # writing what was read gives the same resources back
    again = priors_to_bundle(pid, tps)
    assert parse_priors_bundle(again, pid)[1] == tps


def test_mcode_tumor_size_shape(small_patient):
    raw = json.loads((small_patient.folder / "priors.json").read_text())
    obs = [e["resource"] for e in raw["entry"] if e["resource"]["resourceType"] == "Observation"]
    assert obs
    for o in obs:
        assert o["code"]["coding"][0]["code"] == "21889-1"
        codes = [c["code"]["coding"][0]["code"] for c in o["component"]]
        assert codes == ["33728-7", "33729-5"]
        assert all(c["valueQuantity"]["code"] == "mm" for c in o["component"])
        assert o["focus"][0]["reference"].startswith("urn:uuid:")


def test_invalid_resource_is_refused_without_echoing_content(small_patient):
    raw = json.loads((small_patient.folder / "priors.json").read_text())
    bad = copy.deepcopy(raw)
    for e in bad["entry"]:
        if e["resource"]["resourceType"] == "Observation":
            e["resource"]["status"] = "SECRET-VALUE-42"
            break
    with pytest.raises(InvalidPriorsError, match="does not validate") as exc:
        parse_priors_bundle(bad)
    assert "SECRET-VALUE-42" not in str(exc.value)
    bad = copy.deepcopy(raw)
    for e in bad["entry"]:
        if e["resource"]["resourceType"] == "Observation":
            e["resource"]["component"][0]["valueQuantity"]["value"] = "SECRET-VALUE-42"
            break
    with pytest.raises(InvalidPriorsError, match="valueQuantity") as exc:
        parse_priors_bundle(bad)
    assert "SECRET-VALUE-42" not in str(exc.value)


def test_not_a_bundle_and_not_json(tmp_path):
    with pytest.raises(InvalidPriorsError, match="must be a FHIR Bundle"):
        parse_priors_bundle({"resourceType": "Patient"})
    p = tmp_path / "priors.json"
    p.write_text("{not json")
    with pytest.raises(InvalidPriorsError, match="not JSON"):
        load_priors(p)
    with pytest.raises(InvalidPriorsError, match="does not exist"):
        load_priors(tmp_path / "missing.json")


def test_priors_of_another_patient_are_refused(small_patient):
    raw = json.loads((small_patient.folder / "priors.json").read_text())
    with pytest.raises(PatientMismatchError):
        parse_priors_bundle(raw, "SOMEONE-ELSE")


def test_tumor_size_in_cm_is_converted(small_patient):
    raw = json.loads((small_patient.folder / "priors.json").read_text())
    for e in raw["entry"]:
        r = e["resource"]
        if r["resourceType"] == "Observation":
            for c in r["component"]:
                c["valueQuantity"] = {
                    **c["valueQuantity"],
                    "value": c["valueQuantity"]["value"] / 10,
                    "unit": "cm",
                    "code": "cm",
                }
    _, tps_cm = parse_priors_bundle(raw)
    _, tps_mm = parse_priors_bundle(json.loads((small_patient.folder / "priors.json").read_text()))
    for a, b in zip(tps_cm[0].findings, tps_mm[0].findings, strict=True):
        assert a.long_axis_mm == pytest.approx(b.long_axis_mm, abs=1e-6)
