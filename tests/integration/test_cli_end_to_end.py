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
        if les["organ"] == "lymph_node" and les["short_axis_mm"] < 10.0:
            # a normal node: absent, or measured within the tolerance every other lesion gets (the demo's own
            # judge, ``compare_with_truth``, accepts the same); the model of 2026-11-28 measures this 8.6 mm
            # short axis at 10.4 mm
            assert got["current"] is None or measurement_ok(
                got["current"]["short_axis_mm"], les["short_axis_mm"]
            )
            continue
        if not les["present"]:
            assert got["status"] == "absent"
            continue
        assert got["current"] is not None, les["label"]
        key = "short_axis_mm" if les["organ"] == "lymph_node" else "long_axis_mm"
        assert measurement_ok(got["current"][key], les[key]), (les["label"], got["current"][key], les[key])
    # every lesion the model measured carries its TTA spread (three flips + the un-augmented view)
    detected = [les for les in report["lesions"] if les["current"] is not None and not les["guided"]]
    assert detected and all(les["current"]["tta"]["views"] == 4 for les in detected)
    md = (out / "report.md").read_text()
    assert "## Impression" in md and truth["recist"]["category"] in md and "flips 4/4" in md
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

    # a reader asks why L-something is a lesion: the saliency is drawn and kept with the stored analysis
    import numpy as np

    artifacts = tmp_path / "artifacts"
    stored = artifacts / report["study"]["study_uid"]
    stored.mkdir(parents=True)
    (stored / "report.json").write_text(json.dumps(report))
    np.savez(stored / "segmentation.npz", labels=np.zeros(report["study"]["shape_kji"], np.uint8))
    label = detected[0]["label"]
    proc = _interval(
        "explain",
        str(follow / "dicom"),
        "--lesion",
        label,
        "--artifacts",
        str(artifacts),
        "--out",
        str(tmp_path / "why.png"),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "why.png").read_bytes()[:4] == b"\x89PNG" and "saliency kept in" in proc.stdout
    with np.load(stored / "segmentation.npz") as z:
        saliency = z["saliency"]
    k = detected[0]["current"]["slice_index"]
    assert saliency.max() == 1.0 and saliency[k].max() > 0


def test_demo_command_exits_zero_and_agrees_with_truth(tmp_path):
    proc = _interval("demo", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "demo report matches the ground truth" in proc.stdout
