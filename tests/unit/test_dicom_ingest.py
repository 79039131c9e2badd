"""DICOM ingest rules on small synthetic series written here with pydicom (8x8 to 16x16 pixels, a few slices):
series selection, slice order, spacing, duplicates, non-image objects, localizers, gantry tilt, enhanced
multi-frame CT and compressed transfer syntaxes. Each case is either read correctly or refused by name."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydantic import ValidationError
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from adapters.dicom_rules import Reason, SeriesRules
from adapters.dicom_series import assess_folder, load_study, read_study
from adapters.settings import Settings
from core.errors import InvalidVolumeError, NoSeriesFoundError
from core.types import Volume

STUDY = "1.2.826.0.1.3680043.8.498.1"
PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-4711"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _stored(k: int, shape: tuple[int, int]) -> np.ndarray:
    """A slice whose values say which slice it is (k * 100) and where each pixel is (row * 10 + column)."""
    rows, cols = shape
    j, i = np.mgrid[0:rows, 0:cols]
    return (1024 + 100 * k + 10 * j + i).astype(np.uint16)


def _ct(
    path: Path,
    series: str,
    position: tuple[float, float, float],
    pixels: np.ndarray,
    *,
    orientation: tuple[float, ...] = AXIAL,
    thickness: float = 2.0,
    sop: str | None = None,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    instance: int = 1,
    **extra: object,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop or f"{series}.{abs(hash((path.name, position))) % 10**8}")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.ImageType = list(image_type)
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19610203"
    ds.StudyDate = "20260105"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = STUDY + ".9"
    ds.Manufacturer = "SYNTH"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.3f}" for v in position]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = ["0.8", "0.7"]
    ds.SliceThickness = f"{thickness:g}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def _write_series(
    folder: Path,
    series: str = STUDY + ".2",
    n: int = 6,
    spacing: float = 2.0,
    origin: tuple[float, float, float] = (-3.0, -4.0, 10.0),
    shape: tuple[int, int] = (8, 8),
    descending: bool = False,
    **kw: object,
) -> np.ndarray:
    """Slices along the normal of ``orientation`` (+z when axial), or written in descending order (feet-first
    style: IM0001 is the last slice); returns the expected HU volume in ascending order along the normal."""
    folder.mkdir(parents=True, exist_ok=True)
    iop = np.asarray(kw.get("orientation", AXIAL), dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    for k in range(n):
        x, y, z = np.asarray(origin) + k * spacing * normal
        name = f"IM{(n - k if descending else k + 1):04d}.dcm"
        ds = _ct(folder / name, series, (x, y, z), _stored(k, shape), instance=k + 1, **kw)
        ds.save_as(folder / name, enforce_file_format=True)
    return np.stack([_stored(k, shape).astype(np.float32) - 1024 for k in range(n)])


def _check_geometry(vol: Volume, folder: Path) -> None:
    """Every file's first pixel lands, by the volume's geometry, on the voxel that holds the file's values."""
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        if "ImagePositionPatient" not in ds or ds.SOPClassUID != CTImageStorage:
            continue
        k, j, i = np.rint(vol.lps_to_kji([float(v) for v in ds.ImagePositionPatient])).astype(int)
        assert (j, i) == (0, 0)
        hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(vol.voxels_hu[k], hu), f.name


def test_feet_first_descending_files_read_in_position_order(tmp_path):
    expected = _write_series(tmp_path / "s", descending=True)
    vol = load_study(tmp_path / "s")
    assert np.array_equal(vol.voxels_hu, expected)
    assert vol.origin_lps_mm == pytest.approx((-3.0, -4.0, 10.0))
    assert vol.spacing_kji_mm == pytest.approx((2.0, 0.8, 0.7))
    assert np.allclose(vol.direction_lps, np.eye(3))
    _check_geometry(vol, tmp_path / "s")


def test_flipped_orientation_keeps_lps_geometry(tmp_path):
    # rows run to the patient's right, columns anterior: the normal points to the feet
    _write_series(tmp_path / "s", orientation=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    vol = load_study(tmp_path / "s")
    assert np.allclose(np.asarray(vol.direction_lps)[:, 2], (0, 0, 1))  # (-x) x (-y) = +z
    assert np.allclose(np.asarray(vol.direction_lps)[:, 0], (-1, 0, 0))
    _check_geometry(vol, tmp_path / "s")


def test_small_spacing_irregularity_is_accepted_with_a_note(tmp_path):
    folder = tmp_path / "s"
    _write_series(folder, n=6, spacing=2.0)
    f = sorted(folder.iterdir())[3]
    ds = pydicom.dcmread(f)
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.1  # 5 % of the spacing
    ds.save_as(f)
    study = read_study(folder)
    assert study.volume.shape[0] == 6
    assert study.volume.spacing_kji_mm[0] == pytest.approx(2.0)
    assert any("slice spacing varies" in n for n in study.report.notes)


def test_a_gap_is_refused_naming_where_slices_are_missing(tmp_path):
    folder = tmp_path / "s"
    _write_series(folder, n=8)
    (folder / "IM0004.dcm").unlink()
    with pytest.raises(InvalidVolumeError, match="missing") as e:
        load_study(folder)
    assert "IM0003.dcm and IM0005.dcm" in str(e.value)
    assert PATIENT_NAME not in str(e.value) and PATIENT_ID not in str(e.value)


def test_a_larger_tolerance_is_a_setting(tmp_path):
    folder = tmp_path / "s"
    _write_series(folder, n=6)
    f = sorted(folder.iterdir())[3]
    ds = pydicom.dcmread(f)
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.5  # 25 %
    ds.save_as(f)
    with pytest.raises(InvalidVolumeError, match="uneven slice spacing"):
        load_study(folder)
    rules = Settings(slice_spacing_tolerance=0.3).series_rules()
    assert load_study(folder, rules).shape[0] == 6


def test_non_image_objects_and_secondary_captures_are_ignored_with_reasons(tmp_path):
    folder = tmp_path / "s"
    series = STUDY + ".2"
    expected = _write_series(folder, series=series)
    for name, sop, modality, in_series in [
        ("sr.dcm", "1.2.840.10008.5.1.4.1.1.88.22", "SR", False),  # Enhanced SR
        ("ko.dcm", "1.2.840.10008.5.1.4.1.1.88.59", "KO", False),  # Key Object Selection
        ("pr.dcm", "1.2.840.10008.5.1.4.1.1.11.1", "PR", False),  # Grayscale Softcopy Presentation State
        ("dose.dcm", "1.2.840.10008.5.1.4.1.1.7", "CT", True),  # a dose page: secondary capture, modality CT
    ]:
        ds = _ct(
            folder / name,
            series if in_series else f"{STUDY}.{len(name)}{ord(name[0])}",
            (0, 0, 0),
            _stored(0, (8, 8)),
        )
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop
        ds.Modality = modality
        ds.save_as(folder / name)
    study = read_study(folder)
    assert np.array_equal(study.volume.voxels_hu, expected)
    reasons = sorted(v.reason for v in study.report.verdicts if v.reason != Reason.SELECTED)
    assert reasons == [Reason.MODALITY] * 3
    assert any("Key Object Selection" in v.detail for v in study.report.verdicts)
    assert any("Secondary Capture" in n for n in study.report.notes)


def test_a_localizer_inside_the_axial_series_is_dropped_with_a_note(tmp_path):
    folder = tmp_path / "s"
    series = STUDY + ".2"
    expected = _write_series(folder, series=series)
    scout = _ct(
        folder / "scout.dcm",
        series,
        (0.0, -100.0, 200.0),
        _stored(0, (8, 8)),
        orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    scout.save_as(folder / "scout.dcm")
    study = read_study(folder)
    assert np.array_equal(study.volume.voxels_hu, expected)
    assert any("dropped 1 localizer" in n and "scout.dcm" in n for n in study.report.notes)


def test_selection_prefers_the_thinnest_then_follows_the_setting(tmp_path):
    folder = tmp_path / "study"
    _write_series(folder / "thin", series=STUDY + ".10", n=6, spacing=1.0, thickness=1.0)
    _write_series(folder / "thick", series=STUDY + ".20", n=9, spacing=5.0, thickness=5.0)
    _write_series(
        folder / "scout", series=STUDY + ".30", n=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
    )
    _write_series(folder / "mpr", series=STUDY + ".40", n=4, image_type=("DERIVED", "SECONDARY", "MPR"))
    study = read_study(folder)
    assert study.report.series_uid == STUDY + ".10"
    by_uid = {v.series_uid: v for v in study.report.verdicts}
    assert by_uid[STUDY + ".20"].reason == Reason.NOT_CHOSEN
    assert "9 slices of 5 mm, the chosen series has 6 of 1 mm" in by_uid[STUDY + ".20"].detail
    assert by_uid[STUDY + ".30"].reason == Reason.LOCALIZER
    assert by_uid[STUDY + ".40"].reason == Reason.DERIVED
    most = Settings(series_prefer="most_slices").series_rules()
    assert read_study(folder, most).report.series_uid == STUDY + ".20"
    keep_mpr = SeriesRules(exclude_derived_secondary=False)
    assert {v.series_uid: v.reason for v in assess_folder(folder, keep_mpr)}[
        STUDY + ".40"
    ] == Reason.NOT_CHOSEN


def test_an_incomplete_preferred_series_falls_back_to_the_next_with_a_note(tmp_path):
    folder = tmp_path / "study"
    _write_series(folder / "thin", series=STUDY + ".10", n=8, spacing=1.0, thickness=1.0)
    (folder / "thin" / "IM0004.dcm").unlink()
    _write_series(folder / "thick", series=STUDY + ".20", n=5, spacing=5.0, thickness=5.0)
    study = read_study(folder)
    assert study.report.series_uid == STUDY + ".20"
    assert study.volume.acquisition is not None
    assert "preferred series " + STUDY + ".10 is unusable" in study.volume.acquisition.ingest_notes[0]
    assert {v.series_uid: v.reason for v in study.report.verdicts}[STUDY + ".10"] == Reason.INVALID_VOLUME


def test_an_oblique_series_is_refused_naming_its_angle(tmp_path):
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    _write_series(tmp_path / "s", orientation=(1.0, 0.0, 0.0, 0.0, c, -s))
    with pytest.raises(NoSeriesFoundError, match=r"not axial: the slice normal is 30\.0 degrees"):
        load_study(tmp_path / "s")
    assert load_study(tmp_path / "s", SeriesRules(max_obliquity_deg=35)).shape[0] == 6


def test_mr_is_refused_naming_the_modality(tmp_path):
    folder = tmp_path / "s"
    _write_series(folder)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        ds.save_as(f)
    with pytest.raises(
        NoSeriesFoundError, match=r"no CT series .*found: MR.*modality MR \(6 MR Image Storage\)"
    ):
        load_study(folder)


def test_values_that_are_not_hounsfield_units_are_refused(tmp_path):
    _write_series(tmp_path / "s", RescaleType="US")
    with pytest.raises(NoSeriesFoundError, match="not Hounsfield units"):
        load_study(tmp_path / "s")


def test_padding_below_air_is_set_to_air(tmp_path):
    folder = tmp_path / "s"
    _write_series(folder)
    f = sorted(folder.iterdir())[2]
    ds = pydicom.dcmread(f)
    px = ds.pixel_array.copy()
    px[0, 0] = 0  # -1024 HU after rescale with intercept -2048 below
    ds.PixelData = px.tobytes()
    ds.RescaleIntercept = "-2048"
    ds.save_as(f)
    vol = load_study(folder)
    assert vol.voxels_hu[2, 0, 0] == -1024.0
    assert vol.voxels_hu.min() == -1024.0


def _shear(folder: Path, mm_per_slice: float) -> None:
    """Tilted-gantry geometry: each slice's position moves along y with z, the image content with it."""
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + mm_per_slice * (ds.InstanceNumber - 1), z]
        ds.save_as(f)


def test_gantry_tilt_is_refused_by_default_and_resampled_when_configured(tmp_path):
    folder = tmp_path / "s"
    n, shape = 5, (12, 12)
    folder.mkdir()
    for k in range(n):  # one bright voxel at a fixed patient position: row 6 at y = -4 + 6 * 0.8
        px = np.full(shape, 1024, np.uint16)
        px[6 - k, 4] = 1524
        _ct(folder / f"IM{k + 1:04d}.dcm", STUDY + ".2", (0.0, -4.0, 2.0 * k), px, instance=k + 1).save_as(
            folder / f"IM{k + 1:04d}.dcm"
        )
    _shear(folder, 0.8)  # one row per slice: the dot stays put in the patient, moves up in the image
    with pytest.raises(InvalidVolumeError, match=r"gantry tilt.*INTERVAL_GANTRY_TILT=resample"):
        load_study(folder)
    study = read_study(folder, Settings(gantry_tilt="resample").series_rules())
    vol = study.volume
    assert any("gantry tilt resampled" in n for n in study.report.notes)
    for k in range(n):
        assert np.unravel_index(np.argmax(vol.voxels_hu[k]), shape) == (6, 4)
        assert vol.voxels_hu[k].max() == pytest.approx(500.0)


def test_files_without_a_part10_header_are_read(tmp_path):
    folder = tmp_path / "s"
    expected = _write_series(folder)
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        del ds.file_meta
        ds.preamble = None
        ds.save_as(f, implicit_vr=True, little_endian=True, enforce_file_format=False)
        with pytest.raises(pydicom.errors.InvalidDicomError):
            pydicom.dcmread(f)
    assert np.array_equal(load_study(folder).voxels_hu, expected)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda u: u.name)
def test_compressed_series_read_the_same_values(tmp_path, syntax):
    folder = tmp_path / "s"
    expected = _write_series(folder, shape=(64, 64))  # JPEG 2000's default 6 resolutions need >= 32 pixels
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.compress(syntax)
        ds.save_as(f)
        assert pydicom.dcmread(f).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(load_study(folder).voxels_hu, expected)


def _enhanced(path: Path, n: int, *, per_frame_rescale: bool) -> np.ndarray:
    """An Enhanced CT object: frames written in descending z, geometry and rescale in functional groups.
    Returns the expected HU volume in ascending z."""
    shape = (8, 10)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(STUDY + ".77.1")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.PatientName, ds.PatientID, ds.StudyDate = PATIENT_NAME, PATIENT_ID, "20260105"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = STUDY, STUDY + ".77", STUDY + ".9"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.NumberOfFrames = n

    def item(**attrs: object) -> Sequence:
        d = Dataset()
        for key, value in attrs.items():
            setattr(d, key, value)
        return Sequence([d])

    shared = Dataset()
    shared.PlaneOrientationSequence = item(ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
    shared.PixelMeasuresSequence = item(PixelSpacing=[0.8, 0.7], SliceThickness=3.0)
    shared.CTImageFrameTypeSequence = item(FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"])
    shared.CTXRayDetailsSequence = item(KVP=120)
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = item(
            RescaleSlope=1, RescaleIntercept=-1024, RescaleType="HU"
        )
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames, expected = [], []
    per_frame = []
    for f in range(n):
        k = n - 1 - f  # frame 0 is the most cranial
        slope = 2.0 if per_frame_rescale and k % 2 else 1.0
        stored = _stored(k, shape)
        frames.append(stored)
        fg = Dataset()
        fg.PlanePositionSequence = item(ImagePositionPatient=[-3.0, -4.0, 10.0 + 3.0 * k])
        if per_frame_rescale:
            fg.PixelValueTransformationSequence = item(
                RescaleSlope=slope, RescaleIntercept=-1024, RescaleType="HU"
            )
        per_frame.append(fg)
        expected.append((k, stored.astype(np.float32) * slope - 1024))
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack(frames).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return np.stack([img for _, img in sorted(expected, key=lambda t: t[0])])


@pytest.mark.parametrize("per_frame_rescale", [False, True], ids=["shared-rescale", "per-frame-rescale"])
def test_enhanced_multiframe_ct_reads_frames_in_position_order_with_their_rescale(
    tmp_path, per_frame_rescale
):
    folder = tmp_path / "s"
    folder.mkdir()
    expected = _enhanced(folder / "enhanced.dcm", 5, per_frame_rescale=per_frame_rescale)
    vol = load_study(folder)
    assert vol.shape == (5, 8, 10)  # [k, j, i]: frames first, then rows, then columns
    assert np.array_equal(vol.voxels_hu, np.maximum(expected, -1024))
    assert vol.spacing_kji_mm == pytest.approx((3.0, 0.8, 0.7))
    assert vol.origin_lps_mm == pytest.approx((-3.0, -4.0, 10.0))
    assert np.allclose(vol.direction_lps, np.eye(3))
    assert vol.acquisition is not None and vol.acquisition.kvp == 120.0
    assert vol.acquisition.slice_thickness_mm == 3.0


def test_the_ingest_log_line_names_series_and_reasons_but_no_patient(tmp_path, caplog):
    folder = tmp_path / "study"
    _write_series(folder / "a", series=STUDY + ".10", thickness=1.0, spacing=1.0)
    _write_series(folder / "b", series=STUDY + ".20", thickness=5.0, spacing=5.0)
    with caplog.at_level(logging.INFO, logger="interval.adapters.ingest"):
        load_study(folder)
    text = caplog.text
    assert STUDY + ".10" in text and "not_chosen" in text and STUDY + ".20" in text
    for phi in (PATIENT_NAME, "Doe", PATIENT_ID, "19610203"):
        assert phi not in text


def test_ingest_settings_are_checked_when_read():
    with pytest.raises(ValidationError, match="spacing_tolerance"):
        Settings(slice_spacing_tolerance=0.9)
    with pytest.raises(ValidationError, match="min_slices"):
        Settings(series_min_slices=0)
    assert Settings(series_max_obliquity_deg=20).series_rules().max_obliquity_deg == 20


def test_a_header_tilt_on_an_orthogonal_grid_is_read_as_is_when_resampling_is_on(tmp_path):
    expected = _write_series(tmp_path / "s", GantryDetectorTilt="12")
    with pytest.raises(InvalidVolumeError, match="the header states 12 degrees"):
        load_study(tmp_path / "s")
    study = read_study(tmp_path / "s", SeriesRules(gantry_tilt="resample"))
    assert np.array_equal(study.volume.voxels_hu, expected)
    assert any("orthogonal grid: read as is" in n for n in study.report.notes)


def test_source_headers_are_the_slices_the_volume_was_built_from(tmp_path):
    from adapters.dicom_series import series_source_headers

    folder = tmp_path / "s"
    series = STUDY + ".2"
    _write_series(folder, series=series, descending=True)
    copy = pydicom.dcmread(folder / "IM0003.dcm")
    copy.SOPInstanceUID = series + ".99"
    copy.save_as(folder / "copy.dcm")
    _ct(
        folder / "scout.dcm",
        series,
        (0, 0, 0),
        _stored(0, (8, 8)),
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    ).save_as(folder / "scout.dcm")
    headers = series_source_headers(folder, series)
    assert len(headers) == load_study(folder).shape[0] == 6
    z = [float(ds.ImagePositionPatient[2]) for ds in headers]
    assert z == sorted(z)


def test_a_folder_scanned_again_unchanged_gives_the_kept_headers_and_a_changed_one_is_read_again(
    tmp_path, monkeypatch
):
    import adapters.dicom_series as series_module

    _write_series(tmp_path / "s", n=4)
    reads: list[Path] = []
    real = series_module.read_header
    monkeypatch.setattr(series_module, "read_header", lambda p: reads.append(p) or real(p))
    first = series_module.scan_folder(tmp_path / "s")
    assert len(reads) == 4
    first.series.clear()  # a caller's copy: the kept scan is not changed by it
    again = series_module.scan_folder(tmp_path / "s")
    assert len(reads) == 4 and sum(len(v) for v in again.series.values()) == 4
    # a file rewritten (other size or time), or one added: every header read again
    _write_series(tmp_path / "s", n=5)
    rescanned = series_module.scan_folder(tmp_path / "s")
    assert len(reads) == 9 and sum(len(v) for v in rescanned.series.values()) == 5
    expected = _write_series(tmp_path / "t", n=3, series="1.2.3.999")
    assert np.array_equal(load_study(tmp_path / "t").voxels_hu, expected)
    assert series_module.scan_folder(tmp_path / "t").series.keys() == {"1.2.3.999"}
