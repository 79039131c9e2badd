"""TID 1500 SR round trip: every lesion's track UID and measurements read back."""

from __future__ import annotations

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes

from adapters.dicom_sr import sr_tracking_uid, write_measurement_report
from adapters.image_folder import FolderImageSource
from adapters.prior_bundle import BundlePriorStore
from core.pipeline import analyze_study
from fixtures.synth.evaluation import TruthSegmenter


def test_measurement_report_round_trips_track_uids_and_axes(demo_patient, tmp_path):
    folder = demo_patient.folder
    study = folder / demo_patient.time_points[-1] / "dicom"
    result = analyze_study(
        str(study),
        images=FolderImageSource([folder]),
        priors=BundlePriorStore(folder / "priors.json"),
        segmenter=TruthSegmenter(folder),
    )
    evidence = [pydicom.dcmread(sorted(study.iterdir())[0], stop_before_pixels=True)]
    path = write_measurement_report(result, evidence, tmp_path / "sr.dcm", time_point_order=2)
    sr = hd.sr.srread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.StudyInstanceUID == result.acquisition.study_uid
    groups = sr.content.get_planar_roi_measurement_groups()
    measured = [t for t in result.lesions if t.detected is not None]
    assert len(groups) == len(measured)
    by_uid = {g.tracking_uid: g for g in groups}
    for t in measured:
        g = by_uid[sr_tracking_uid(t.track_id)]
        assert g.tracking_identifier == t.label
        long_axis = g.get_measurements(name=codes.SCT.LongAxis)[0]
        assert long_axis.value == pytest.approx(t.detected.measurement.long_axis_mm, abs=0.06)
        region = g.roi
        assert (
            region is not None and region.frame_of_reference_uid == result.acquisition.frame_of_reference_uid
        )


def test_text_derived_track_ids_become_stable_uids():
    uid = sr_tracking_uid("text:L3")
    assert pydicom.uid.UID(uid).is_valid and uid == sr_tracking_uid("text:L3")
    assert sr_tracking_uid("1.2.3.4") == "1.2.3.4"
