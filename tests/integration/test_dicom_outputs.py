"""DICOM SEG and TID 1500 SR of an analysis: dciodvfy finds no error; highdicom reads them back with the
same lesions, measurements and tracking UIDs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from adapters.dicom_seg import lesion_instances, write_lesion_seg
from adapters.dicom_series import scan_folder
from adapters.dicom_sr import sr_tracking_uid, write_measurement_report
from adapters.image_folder import FolderImageSource
from adapters.prior_bundle import BundlePriorStore
from core.pipeline import StudyResult, analyze_study
from fixtures.synth.cohort import PatientTruth
from fixtures.synth.evaluation import TruthSegmenter

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def analysed(small_patient: PatientTruth) -> tuple[StudyResult, list[pydicom.Dataset]]:
    folder = small_patient.folder
    study = folder / small_patient.time_points[-1] / "dicom"
    result = analyze_study(
        str(study),
        images=FolderImageSource([folder]),
        priors=BundlePriorStore(folder / "priors.json"),
        segmenter=TruthSegmenter(folder),
    )
    headers = [ds for _, ds in scan_folder(study).series[result.acquisition.series_uid]]
    assert any(t.detected is not None for t in result.lesions)
    return result, headers


def _dciodvfy(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy is missing: run `make setup` (scripts/install-services installs dicom3tools)")
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_seg_is_valid_and_reads_back(
    analysed: tuple[StudyResult, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    result, headers = analysed
    path = write_lesion_seg(result, headers, tmp_path / "seg.dcm")
    assert _dciodvfy(path) == []
    seg = hd.seg.segread(path)
    assert seg.StudyInstanceUID == result.acquisition.study_uid
    assert seg.FrameOfReferenceUID == result.acquisition.frame_of_reference_uid
    assert "Interval" in {e.Manufacturer for e in seg.ContributingEquipmentSequence}
    measured = [t for t in result.lesions if t.detected is not None]
    assert seg.number_of_segments == len(measured)
    masks = lesion_instances(result)
    normal = np.asarray(result.direction_lps)[:, 2]
    ordered = sorted(headers, key=lambda d: float(np.asarray(d.ImagePositionPatient, float) @ normal))
    source_uids = [h.SOPInstanceUID for h in ordered]
    for n, t in enumerate(measured, start=1):
        desc = seg.get_segment_description(n)
        assert desc.tracking_uid == sr_tracking_uid(t.track_id) and desc.tracking_id == t.label
        frames = seg.get_pixels_by_source_instance(
            source_uids, segment_numbers=[n], assert_missing_frames_are_empty=True
        )
        assert np.array_equal(frames[..., 0] > 0, masks[t.track_id])


def test_sr_is_valid_and_round_trips(
    analysed: tuple[StudyResult, list[pydicom.Dataset]], tmp_path: Path
) -> None:
    result, headers = analysed
    path = write_measurement_report(result, headers[:1], tmp_path / "sr.dcm", time_point_order=2)
    assert _dciodvfy(path) == []
    sr = hd.sr.srread(path)
    groups = {g.tracking_uid: g for g in sr.content.get_planar_roi_measurement_groups()}
    for t in (t for t in result.lesions if t.detected is not None):
        g = groups[sr_tracking_uid(t.track_id)]
        assert g.get_measurements(name=codes.SCT.LongAxis)[0].value == pytest.approx(
            t.detected.measurement.long_axis_mm, abs=0.06
        )
