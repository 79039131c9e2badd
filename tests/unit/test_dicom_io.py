"""DICOM written by the cohort generator reads back with the right geometry; bad input is refused
with a clear, PHI-free error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from adapters.dicom_series import load_study
from core.errors import InvalidVolumeError, NoSeriesFoundError, UnreadableDicomError


def _copy_series(patient, tmp_path: Path, t: str = "t0") -> Path:
    dst = tmp_path / "study"
    shutil.copytree(patient.folder / t / "dicom", dst)
    return dst


def test_generated_series_reads_back_with_spacing_origin_and_orientation(small_patient):
    tp = small_patient.folder / "t0"
    vol = load_study(tp / "dicom")
    truth = json.loads((tp / "truth.json").read_text())
    labels = np.load(tp / "truth_labels.npz")
    assert vol.shape == tuple(truth["shape_kji"])
    assert vol.spacing_kji_mm == pytest.approx(tuple(truth["spacing_kji_mm"]), abs=1e-4)
    assert vol.origin_lps_mm == pytest.approx(tuple(truth["origin_lps_mm"]), abs=1e-3)
    assert np.allclose(vol.direction_lps, np.eye(3))
    # orientation: every lesion's true LPS centre falls on its own instance in the label map
    present = [les for les in truth["lesions"] if les["present"] and les["voxels"] > 0]
    assert present
    for les in present:
        k, j, i = np.rint(vol.lps_to_kji(les["center_lps_mm"])).astype(int)
        assert labels["instances"][k, j, i] == les["instance"], les["label"]
    # HU: air outside the body, soft tissue in the body wall
    assert vol.voxels_hu[:, 0, 0].mean() == pytest.approx(-1000, abs=80)
    assert vol.acquisition is not None
    assert vol.acquisition.manufacturer == "GE MEDICAL SYSTEMS"
    assert vol.acquisition.study_uid == truth["study_uid"]


def test_uids_are_stable_per_patient_and_study(small_patient, tmp_path):
    from fixtures.synth.cohort import make_patient
    from tests.conftest import SMALL

    again = make_patient(tmp_path, 0, SMALL)
    for t in small_patient.time_points:
        a = json.loads((small_patient.folder / t / "truth.json").read_text())
        b = json.loads((again.folder / t / "truth.json").read_text())
        assert a["study_uid"] == b["study_uid"]
        assert [les["track_id"] for les in a["lesions"]] == [les["track_id"] for les in b["lesions"]]
    first = sorted((small_patient.folder / "t0" / "dicom").iterdir())[0]
    ds = pydicom.dcmread(first)
    assert len(ds.SOPInstanceUID) <= 64 and len(ds.StudyInstanceUID) <= 64


def test_folder_without_dicom_names_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(NoSeriesFoundError, match="no CT series") as e:
        load_study(tmp_path)
    assert "not readable DICOM" in str(e.value)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(NoSeriesFoundError, match="does not exist"):
        load_study(tmp_path / "nope")


def test_missing_slices_are_refused(small_patient, tmp_path):
    d = _copy_series(small_patient, tmp_path)
    files = sorted(d.iterdir())
    for f in files[10:13]:
        f.unlink()
    with pytest.raises(InvalidVolumeError, match="missing slices"):
        load_study(d)


def test_identical_duplicate_is_kept_once_and_noted(small_patient, tmp_path):
    d = _copy_series(small_patient, tmp_path)
    n = len(list(d.iterdir()))
    ds = pydicom.dcmread(sorted(d.iterdir())[5])
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"  # the same image sent twice under a new UID
    ds.save_as(d / "dup.dcm")
    vol = load_study(d)
    assert vol.shape[0] == n
    assert vol.acquisition is not None
    assert any("identical duplicate" in note for note in vol.acquisition.ingest_notes)


def test_conflicting_duplicate_positions_are_refused(small_patient, tmp_path):
    d = _copy_series(small_patient, tmp_path)
    ds = pydicom.dcmread(sorted(d.iterdir())[5])
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.PixelData = (ds.pixel_array + 50).astype(np.uint16).tobytes()  # another image at the same position
    ds.save_as(d / "dup.dcm")
    with pytest.raises(InvalidVolumeError, match="duplicate slice positions") as e:
        load_study(d)
    assert "dup.dcm" in str(e.value)


def _rewrite(folder: Path, change) -> None:
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        change(ds)
        ds.save_as(f)


def test_gantry_tilt_is_refused(small_patient, tmp_path):
    d = _copy_series(small_patient, tmp_path)
    _rewrite(d, lambda ds: setattr(ds, "GantryDetectorTilt", "15"))  # the header says the gantry was tilted
    with pytest.raises(InvalidVolumeError, match="gantry tilt"):
        load_study(d)


def test_sheared_positions_are_refused_as_tilt(small_patient, tmp_path):
    d = _copy_series(small_patient, tmp_path)

    def shear(ds):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.25 * z, z]  # rows shift with z: a tilted gantry's geometry

    _rewrite(d, shear)
    with pytest.raises(InvalidVolumeError, match="gantry tilt"):
        load_study(d)


def test_multiframe_without_functional_groups_is_refused_with_advice(small_patient, tmp_path):
    d = _copy_series(small_patient, tmp_path)

    def enhanced(ds):
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
        ds.NumberOfFrames = 2

    _rewrite(d, enhanced)
    with pytest.raises(NoSeriesFoundError, match="Per-frame Functional Groups: enhanced multi-frame"):
        load_study(d)


def test_truncated_pixel_data_names_the_files_not_the_patient(small_patient, tmp_path):
    d = _copy_series(small_patient, tmp_path)
    victim = sorted(d.iterdir())[7]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 3000])
    with pytest.raises(UnreadableDicomError) as e:
        load_study(d)
    assert victim.name in str(e.value)
    assert "SYNTHETIC" not in str(e.value) and "PATIENT" not in str(e.value)
