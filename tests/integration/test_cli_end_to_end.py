"""The real command line, in a subprocess, with the committed model on a generated patient."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.synth.demo import measurement_ok

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "120"}


def _interval(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "interval"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


def test_analyze_writes_a_report_that_matches_the_truth(demo_patient, tmp_path):
    follow = demo_patient.folder / demo_patient.time_points[-1]
    out = tmp_path / "out"
    proc = _interval(
        "analyze",
        str(follow / "dicom"),
        "--priors",
        str(demo_patient.folder / "priors.json"),
        "--out",
        str(out),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    truth = json.loads((follow / "truth.json").read_text())
    assert report["recist"]["category"] == truth["recist"]["category"]
    assert report["recist"]["trace"]
    by_track = {les["track_id"]: les for les in report["lesions"]}
    for les in truth["lesions"]:
        got = by_track[les["track_id"]]
        if les["organ"] == "lymph_node" and les["short_axis_mm"] < 10.0:  # a normal node: absent or < 10 mm
            assert got["current"] is None or got["current"]["short_axis_mm"] < 10.0
            continue
        if not les["present"]:
            assert got["status"] == "absent"
            continue
        assert got["current"] is not None, les["label"]
        key = "short_axis_mm" if les["organ"] == "lymph_node" else "long_axis_mm"
        assert measurement_ok(got["current"][key], les[key]), (les["label"], got["current"][key], les[key])
    md = (out / "report.md").read_text()
    assert "## Impression" in md and truth["recist"]["category"] in md
    assert "Traceback" not in proc.stderr
    assert (out / "history.png").exists() and (out / "history.svg").exists()
    # the same track ids travel as mCODE Tumor BodyStructure identifiers and DICOM Tracking UIDs
    from adapters.dicom_sr import sr_tracking_uid
    from adapters.fhir_priors import parse_priors_bundle

    _, tps = parse_priors_bundle(json.loads((out / "findings.fhir.json").read_text()))
    measured = {les["track_id"] for les in report["lesions"] if les["current"] is not None}
    assert {f.track_id for f in tps[0].findings} == measured
    import highdicom as hd

    sr = hd.sr.srread(out / "measurements.sr.dcm")
    assert {g.tracking_uid for g in sr.content.get_planar_roi_measurement_groups()} == {
        sr_tracking_uid(t) for t in measured
    }


def test_demo_command_exits_zero_and_agrees_with_truth(tmp_path):
    proc = _interval("demo", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "demo report matches the ground truth" in proc.stdout
