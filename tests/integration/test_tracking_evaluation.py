"""`interval evaluate-tracking` in a subprocess on small generated cohorts (repositioned patients, 3 time points):
the whole pipeline per follow-up (priors, prior images, alignment, matching, RECIST), scored against the truth."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixtures.synth.cohort import CohortOptions, make_cohort

pytestmark = pytest.mark.slow

CALIBRATIONS = Path(__file__).resolve().parents[2] / "models" / "weights" / "calibrations" / "all-vendors"


def _evaluate(cohort: Path, out: Path, *args: str, **env: str) -> dict:
    exe = Path(sys.executable).parent / "interval"
    command = [str(exe), "evaluate-tracking", str(cohort), "--out", str(out), *args]
    full = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160", **env}
    done = subprocess.run(command, capture_output=True, text=True, env=full, cwd=out.parent, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def truth_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """With the truth masks standing in for the model, what is left is Interval's own geometry, alignment,
    matching and RECIST."""
    folder = tmp_path_factory.mktemp("tracking")
    cohort = folder / "cohort"
    make_cohort(
        cohort, 3, CohortOptions(seed=4141, vendors=("ge", "canon"), min_time_points=3, max_time_points=3)
    )
    return _evaluate(cohort, folder / "truth.json", "--segmenter", "truth")


def test_ground_truth_masks_give_exact_links_and_new_lesions(truth_run):
    overall = truth_run["summary"]["all"]
    assert overall["recist_agreement"]["total"] == 6  # 3 patients x 2 follow-ups, all scored
    assert overall["track_links"]["total"] > 0
    assert overall["track_links"]["rate"] == 1.0, truth_run["rows"]
    if overall["new_lesion_recall"]["total"]:
        assert overall["new_lesion_recall"]["rate"] == 1.0, truth_run["rows"]
    # all but the one node of the xfail below; the pixel-edge measurement before the sub-pixel outline also read
    # a sum 31.4% under baseline as 29.3% under it (SD for PR): 4/6
    assert overall["recist_agreement"]["agree"] >= 5, truth_run["rows"]


@pytest.mark.xfail(
    strict=True,
    reason=(
        "known limit (issue 4): a lesion a few pixels across is measured to about 0.3 pixel (SD; core.geometry's "
        "sub-pixel outline, no mean bias), and one here lands on a RECIST threshold: a new node of 9.34 mm short "
        "axis is a 24-pixel raster at 2.08 mm pixels that reads 10.7 mm (PD for SD). The generator samples pixel "
        "centres, so neither the mask nor the image holds what would tell it from a 10.7 mm node"
    ),
)
def test_ground_truth_masks_give_the_true_recist_category(truth_run):
    overall = truth_run["summary"]["all"]
    assert overall["recist_agreement"]["rate"] == 1.0, truth_run["rows"]


def test_the_model_run_applies_the_site_calibrations_as_the_service_does(tmp_path):
    cohort = tmp_path / "cohort"
    make_cohort(cohort, 1, CohortOptions(seed=4142, vendors=("ge",), min_time_points=2, max_time_points=2))
    sites = tmp_path / "calibrations"
    sites.mkdir()
    shutil.copy(CALIBRATIONS / "ge-medical-systems-revolution-ct.json", sites)
    calibrated = _evaluate(
        cohort, tmp_path / "calibrated.json", "--segmenter", "model", INTERVAL_CALIBRATION_DIR=str(sites)
    )
    # the follow-up and its prior were both segmented under the GE calibration
    assert sum(calibrated["calibrations_applied"].values()) >= 2, calibrated["calibrations_applied"]
    assert all("Revolution CT" in scanner for scanner in calibrated["calibrations_applied"])
    # the analysis settings are the service's, from the environment, and the figures say which looks ran
    assert calibrated["second_look_settings"] == {"guided": True, "contrast": True, "faint": True}
    plain = _evaluate(
        cohort,
        tmp_path / "plain.json",
        "--segmenter",
        "model",
        "--no-calibrated",
        INTERVAL_CALIBRATION_DIR=str(sites),
        INTERVAL_FAINT_SEARCH="false",
    )
    assert plain["second_look_settings"] == {"guided": True, "contrast": True, "faint": False}
    assert plain["calibrations_applied"] == {}
    assert plain["calibration_dir"] is None
    assert plain["model_version"] == calibrated["model_version"]
    assert plain["summary"]["all"]["recist_agreement"]["total"] == 1


def test_second_look_nulls_counts_answers_at_lesion_free_positions(tmp_path):
    cohort = tmp_path / "cohort"
    make_cohort(cohort, 1, CohortOptions(seed=4143, vendors=("uih",), min_time_points=2, max_time_points=2))
    exe = Path(sys.executable).parent / "interval"
    out = tmp_path / "nulls.json"
    command = [
        str(exe),
        "second-look-nulls",
        str(cohort),
        "--organ",
        "liver",
        "--organ",
        "lung",
        "--per-study",
        "4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["studies"] == 1 and result["model_version"].startswith("interval-seg-unet-")
    liver, lung = result["answers"]["liver"], result["answers"]["lung"]
    assert liver["positions"] == lung["positions"] == 4, result["answers"]
    assert liver["faint"] == 0 and liver["contrast"] == 0, (
        liver
    )  # this study's lesion-free liver answers nothing
    assert lung["faint"] == 0, lung  # the ball look is liver-only
    assert 0 <= lung["contrast"] <= 4, lung
    # an organ the looks do not search is refused with a message, not a stack trace
    bad = subprocess.run(
        [*command, "--organ", "kidney"], capture_output=True, text=True, env=env, timeout=600
    )
    assert bad.returncode != 0 and "liver or lung" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
