"""Bad input on the command line: exit code != 0, one readable line, no traceback, no PHI."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from workers.cli import app

runner = CliRunner()


def _run(args):
    result = runner.invoke(app, args, catch_exceptions=False)
    err = result.stderr
    assert "Traceback" not in err and "Traceback" not in result.stdout
    return result.exit_code, err


def test_folder_with_no_ct_series(tmp_path):
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "readme.txt").write_text("hello")
    code, err = _run(["analyze", str(tmp_path / "study"), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert "error: no CT series" in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_unreadable_files(small_patient, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(small_patient.folder / "t1" / "dicom", study)
    for f in sorted(study.iterdir())[:5]:
        f.write_bytes(f.read_bytes()[:2000])  # truncated in the pixel data
    code, err = _run(["analyze", str(study), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert "unreadable pixel data" in err
    assert "SYNTHETIC" not in err


def _analyze_with_priors(patient, priors, tmp_path):
    study = patient.folder / "t1" / "dicom"
    return _run(["analyze", str(study), "--priors", str(priors), "--out", str(tmp_path / "out"), "--quiet"])


def test_priors_that_do_not_validate(small_patient, tmp_path):
    bad = json.loads((small_patient.folder / "priors.json").read_text())
    for e in bad["entry"]:
        if e["resource"]["resourceType"] == "DiagnosticReport":
            e["resource"]["effectiveDateTime"] = "yesterday"
    p = tmp_path / "priors.json"
    p.write_text(json.dumps(bad))
    code, err = _analyze_with_priors(small_patient, p, tmp_path)
    assert code == 2
    assert "does not validate as FHIR R4" in err and "effectiveDateTime" in err


@pytest.mark.parametrize("content", ["", "[1, 2", '{"resourceType": "Patient"}'])
def test_priors_that_are_not_a_bundle(small_patient, tmp_path, content):
    p = tmp_path / "priors.json"
    p.write_text(content)
    code, err = _analyze_with_priors(small_patient, p, tmp_path)
    assert code == 2
    assert "error:" in err


def test_unknown_vendor_for_synth(tmp_path):
    code, err = _run(["synth", str(tmp_path / "c"), "--patients", "1", "--vendors", "acme"])
    assert code == 2
    assert "unknown vendor" in err


def test_history_prints_each_lesion_and_draws_the_course(small_patient, tmp_path):
    result = runner.invoke(
        app, ["history", str(small_patient.folder), "--out", str(tmp_path)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.stderr
    assert "sum of targets" in result.stdout and "RECIST 1.1" in result.stdout
    assert (tmp_path / "history.png").read_bytes().startswith(b"\x89PNG")
    assert "<svg" in (tmp_path / "history.svg").read_text()


def test_history_of_a_bundle_without_reports_is_a_clear_error(tmp_path):
    p = tmp_path / "priors.json"
    p.write_text(
        json.dumps(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"fullUrl": "urn:uuid:1", "resource": {"resourceType": "Patient", "id": "p1"}}],
            }
        )
    )
    code, err = _run(["history", str(p), "--out", str(tmp_path)])
    assert code == 2 and "no prior imaging report" in err


def test_bad_settings_are_a_configuration_error(monkeypatch):
    monkeypatch.setenv("INTERVAL_EHR_RETRY_ATTEMPTS", "0")
    code, err = _run(["token", "ehr-1"])
    assert code == 78
    assert "configuration error" in err and "INTERVAL_EHR_RETRY_ATTEMPTS" in err


def test_token_is_accepted_by_the_api(monkeypatch):
    from adapters.settings import Settings
    from service.auth import TokenVerifier

    result = runner.invoke(app, ["token", "ehr-1", "--scope", "system/Task.cr"], catch_exceptions=False)
    assert result.exit_code == 0
    client = TokenVerifier.from_settings(Settings()).verify(result.stdout.strip())
    assert client.client_id == "ehr-1" and client.allows("Task", "c") and not client.allows("Task", "u")
