"""Every file shipped with pydicom (its test files) and pydicom-data (real GE, Siemens, Philips, Toshiba, Hitachi
headers; compressed transfer syntaxes; enhanced multi-frame CT and MR), each alone in a folder, through the
loader: it returns a valid ``Volume`` or raises an Interval error whose message names the problem, carries no
patient data, and never anything else.

Two rule sets: Interval's production rules, and reader rules (one slice is enough, MR and non-HU values
allowed, any orientation) under which every CT and MR image goes through decoding, rescale and geometry.
The outcome of every file is compared with ``dicom_robustness.json`` (committed), so that a change in what is
read or refused shows up in review; regenerate it with ``INTERVAL_WRITE_DICOM_ROBUSTNESS=1``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from data_store import DataStore
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from adapters.dicom_frames import READ_ERRORS, native_frames, quiet_pydicom
from adapters.dicom_rules import Reason, SeriesRules
from adapters.dicom_series import assess_folder, read_study
from core.errors import InputError, IntervalError, InvalidVolumeError, NoSeriesFoundError

ROOTS = {
    "pydicom": Path(pydicom.data.__file__).parent / "test_files",
    "pydicom-data": DataStore().data_path,
}
SUMMARY = Path(__file__).with_name("dicom_robustness.json")
# what an InvalidVolumeError / UnreadableDicomError message names, as a short code for the summary
PROBLEMS = [
    ("no valid StudyDate", "no_study_date"),
    ("gantry tilt", "gantry_tilt"),
    ("missing", "missing_slices"),
    ("duplicate slice positions", "duplicate_positions"),
    ("slice spacing is unknown", "unknown_slice_spacing"),
    ("unreadable pixel data", "undecodable_pixels"),
    ("not readable DICOM", "not_dicom"),
    ("found: no DICOM files", "no_dicom_files"),  # a DICOMDIR, skipped by name
]
PRODUCTION = SeriesRules()
READER = SeriesRules(
    min_slices=1,
    modalities=("CT", "MR"),
    require_hu=False,
    exclude_derived_secondary=False,
    max_obliquity_deg=90,
)


def _files() -> list[tuple[str, Path]]:
    out = []
    for name, root in ROOTS.items():
        out += [(f"{name}/{p.relative_to(root)}", p) for p in sorted(root.rglob("*")) if p.is_file()]
    return out


def _phi(path: Path) -> list[str]:
    """Patient name, ID and birth date of a file (when it has any worth searching for)."""
    with quiet_pydicom():
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            values = [str(ds.get(k, "") or "") for k in ("PatientName", "PatientID", "PatientBirthDate")]
        except Exception:  # noqa: BLE001 - a file pydicom cannot parse has no PHI to search for
            return []
    return [v for v in values if len(v) >= 4 and v.strip("0^ ")]


def _outcome(folder: Path, rules: SeriesRules, phi: list[str]) -> str:
    """ "loaded ..." or "refused <error reason> [<series verdicts>]"; raises AssertionError on a broken promise."""
    try:
        study = read_study(folder, rules)
    except IntervalError as exc:
        assert isinstance(exc, InputError), f"{type(exc).__name__} is not an input error: {exc}"
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message
        assert not [v for v in phi if v in message], f"patient data in the message: {message}"
        codes = sorted({v.reason for v in assess_folder(folder, rules) if v.reason != Reason.NOT_CHOSEN})
        codes += [code for words, code in PROBLEMS if words in message and not codes]
        return f"refused {exc.reason} [{', '.join(codes)}]"
    vol = study.volume
    assert vol.voxels_hu.dtype == np.float32 and vol.voxels_hu.ndim == 3 and vol.voxels_hu.size > 0
    assert np.isfinite(vol.voxels_hu).all()
    d = np.asarray(vol.direction_lps)
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-3) and np.linalg.det(d) > 0
    assert all(s > 0 for s in vol.spacing_kji_mm)
    assert not [v for v in phi if v in study.report.summary()], "patient data in the ingest report"
    return f"loaded {'x'.join(str(n) for n in vol.shape)}"


def test_every_pydicom_and_pydicom_data_file_is_read_or_refused_by_name(tmp_path):
    files = _files()
    assert len(files) > 200, "pydicom-data is not installed (pip install -c constraints.txt -e '.[dev]')"
    outcomes: dict[str, dict[str, str]] = {}
    crashes: list[str] = []
    for i, (name, path) in enumerate(files):
        folder = tmp_path / f"f{i}"
        folder.mkdir()
        shutil.copy(path, folder / path.name)
        phi = _phi(path)
        row = {}
        for label, rules in (("production", PRODUCTION), ("reader", READER)):
            try:
                row[label] = _outcome(folder, rules, phi)
            except Exception as exc:  # noqa: BLE001 - the point of this test: collect every unexplained failure
                crashes.append(f"{name} ({label} rules): {type(exc).__name__}: {str(exc)[:300]}")
        outcomes[name] = row
        shutil.rmtree(folder)
    assert not crashes, f"{len(crashes)} unexplained failure(s):\n" + "\n".join(crashes)
    summary = {
        "files": len(files),
        **{
            label: {
                "loaded": sum(r[label].startswith("loaded") for r in outcomes.values()),
                "refused": dict(
                    sorted(
                        Counter(r[label] for r in outcomes.values() if r[label].startswith("refused")).items()
                    )
                ),
            }
            for label in ("production", "reader")
        },
        "outcomes": outcomes,
    }
    if os.environ.get("INTERVAL_WRITE_DICOM_ROBUSTNESS"):
        SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")
    committed = json.loads(SUMMARY.read_text())
    changed = [
        f"{n}: {committed['outcomes'].get(n)} -> {o}"
        for n, o in outcomes.items()
        if committed["outcomes"].get(n) != o
    ]
    changed += [f"{n}: no longer shipped" for n in committed["outcomes"] if n not in outcomes]
    assert not changed, (
        f"{len(changed)} outcome(s) differ from {SUMMARY.name} (check them, then regenerate with "
        "INTERVAL_WRITE_DICOM_ROBUSTNESS=1):\n" + "\n".join(changed[:40])
    )
    print(json.dumps({k: v for k, v in summary.items() if k != "outcomes"}, indent=1))


def _alone(tmp_path: Path, *names: str, root: str = "pydicom") -> Path:
    folder = tmp_path / "study"
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(ROOTS[root] / name, folder / Path(name).name)
    return folder


def _hu(path: Path, frame: int | None = None) -> np.ndarray:
    with quiet_pydicom():
        ds = pydicom.dcmread(path)
        px = ds.pixel_array if frame is None else ds.pixel_array[frame]
    return px.astype(np.float32) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def test_a_real_ge_series_written_feet_first_reads_in_position_order(tmp_path):
    src = ROOTS["pydicom"] / "dicomdirtests/98892001/CT5N"
    folder = _alone(tmp_path, *(str(p.relative_to(ROOTS["pydicom"])) for p in sorted(src.iterdir())))
    vol = read_study(folder).volume
    assert vol.shape == (5, 16, 16)
    assert vol.spacing_kji_mm == pytest.approx((2.5, 0.488281, 0.488281))
    assert vol.origin_lps_mm[2] == pytest.approx(-1.2375)  # the lowest slice; files run from z = 8.76 down
    by_z = sorted(src.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    for k, path in enumerate(by_z):
        assert np.array_equal(vol.voxels_hu[k], np.maximum(_hu(path), -1024)), path.name


def test_a_real_ge_series_with_a_gap_and_its_localizers_are_refused_by_name(tmp_path):
    src = ROOTS["pydicom"] / "dicomdirtests/77654033/CT2"
    folder = _alone(tmp_path, *(str(p.relative_to(ROOTS["pydicom"])) for p in sorted(src.iterdir())))
    with pytest.raises(
        InvalidVolumeError, match=r"gap.*where slices are missing, the first between 17106 and 17136"
    ):
        read_study(folder)
    scouts = _alone(tmp_path / "s", "dicomdirtests/98892001/CT2N/6293", "dicomdirtests/98892001/CT2N/6924")
    with pytest.raises(NoSeriesFoundError, match=r"localizer \(scout\) images only \(2\)"):
        read_study(scouts)


def test_real_enhanced_ct_perfusion_map_is_refused_as_not_hu_and_its_frames_read_right(tmp_path):
    folder = _alone(tmp_path, "eCT_Supplemental.dcm", root="pydicom-data")
    with pytest.raises(NoSeriesFoundError, match=r"not Hounsfield units \(Rescale Type US"):
        read_study(folder)
    vol = read_study(folder, READER).volume
    # frame 2 (In-Stack Position 1, z = -149) comes first along the normal of IOP (-1,0,0 / 0,1,0), which is -z
    assert vol.shape == (2, 512, 512)
    assert vol.spacing_kji_mm == pytest.approx((10.0, 0.388672, 0.388672))
    assert vol.origin_lps_mm == pytest.approx((99.5, -301.5, -149.0))
    assert np.allclose(np.asarray(vol.direction_lps)[:, 2], (0, 0, -1))
    with quiet_pydicom():
        stored = pydicom.dcmread(folder / "eCT_Supplemental.dcm").pixel_array.astype(np.float32)
    assert np.array_equal(vol.voxels_hu[0], stored[1] - 1024)  # shared Pixel Value Transformation applied
    assert np.array_equal(vol.voxels_hu[1], stored[0] - 1024)


def test_real_tilted_toshiba_slice_is_refused_naming_angle_and_tilt(tmp_path):
    folder = _alone(tmp_path, "J2K_pixelrep_mismatch.dcm")
    with pytest.raises(
        NoSeriesFoundError, match=r"22\.0 degrees from the head-feet axis.*gantry tilt of -22"
    ):
        read_study(folder, SeriesRules(min_slices=1))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
    ],
)
def test_real_compressed_and_big_endian_files_decode_to_the_same_values(tmp_path, name):
    reference = read_study(_alone(tmp_path / "ref", "MR_small.dcm"), READER).volume
    vol = read_study(_alone(tmp_path / "x", name), READER).volume
    assert np.array_equal(vol.voxels_hu, reference.voxels_hu)


def test_real_siemens_jpeg_lossless_ct_and_lossy_jpeg_2000_ct_decode(tmp_path):
    vol = read_study(_alone(tmp_path / "a", "bad_sequence.dcm", root="pydicom-data"), READER).volume
    assert vol.shape == (1, 512, 512)
    assert np.array_equal(vol.voxels_hu[0], _hu(ROOTS["pydicom-data"] / "bad_sequence.dcm"))
    lossy = _alone(tmp_path / "b", "693_J2KI.dcm")
    with pytest.raises(
        InvalidVolumeError, match="no valid StudyDate"
    ):  # decoded, then refused for its header
        read_study(lossy, READER)


def test_real_12_bit_jpeg_extended_pixels_decode_in_a_ct_header(tmp_path):
    """No CT in the test data uses lossy JPEG (1.2.840.10008.1.2.4.51); an NM file's 12-bit JPEG stream, given
    a CT header, shows the decoder is installed and used."""
    folder = tmp_path / "study"
    folder.mkdir()
    with quiet_pydicom():
        ds = pydicom.dcmread(ROOTS["pydicom"] / "JPGExtended.dcm")
    ds.Modality = "CT"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness, ds.StudyDate = [1, 1], 5, "20260105"
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    for keyword in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        if keyword in ds:
            del ds[keyword]
    ds.save_as(folder / "ct.dcm")
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.51"
    vol = read_study(folder, SeriesRules(min_slices=1)).volume
    assert np.array_equal(vol.voxels_hu[0], np.maximum(_hu(folder / "ct.dcm"), -1024))


def test_native_frames_read_from_the_buffer_are_what_pixel_array_decodes():
    """The fast path for uncompressed little-endian 16-bit pixels gives pydicom's values, dtype and shape, on every
    file of the corpus it takes (and on crafted high bits above Bits Stored, unsigned and signed)."""
    taken = 0
    for _, path in _files():
        try:
            with quiet_pydicom():
                ds = pydicom.dcmread(path)
        except READ_ERRORS:
            continue
        fast = native_frames(ds)
        if fast is None:
            continue
        with quiet_pydicom():
            ref = np.asarray(ds.pixel_array)
        ref = ref[np.newaxis] if ref.ndim == 2 else ref
        assert fast.dtype == ref.dtype and fast.shape == ref.shape and np.array_equal(fast, ref), path.name
        taken += 1
    assert taken >= 40  # CT and MR files of pydicom and pydicom-data (50 when written)
    for signed, values in ((0, [0x0FFF, 0x1FFF, 0xF001, 5]), (1, [0x0FFF, 0x0800, 0xF001, 0x1005])):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored = 2, 2, 1, 16, 12
        ds.HighBit, ds.PixelRepresentation, ds.PhotometricInterpretation = 11, signed, "MONOCHROME2"
        ds.PixelData = np.array(values, dtype=np.uint16).tobytes()
        assert np.array_equal(native_frames(ds), ds.pixel_array[np.newaxis])
