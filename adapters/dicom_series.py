"""Read a CT study from a folder of DICOM files into a ``Volume``.

``read_study`` scans every file's header, gives each series a verdict under ``SeriesRules``
(``adapters.dicom_rules``: CT, axial, not a localizer, in HU; the thinnest, then the most slices; applied in
``adapters.dicom_selection``), builds the
volume of the preferred usable series and says what it tolerated (``IngestReport``). ``load_study`` does the
same and logs the report. Classic single-frame and enhanced multi-frame CT are read the same way, frame by frame
(``adapters.dicom_frames``); any transfer syntax with an installed decoder is read.

Checks before a volume is made: one image size, pixel spacing and orientation; slices sorted along the normal;
exact copies at one position kept once, different images at one position refused; steps within
``spacing_tolerance`` of the median (else missing slices: refused); no gantry tilt (refused, or resampled with
``gantry_tilt="resample"``). Values below -1024 HU (padding outside the field of view, e.g. -2000 stored) are
set to -1024 HU, air. Every refusal is an ``InputError`` whose message names the series and files (relative to
the folder), never patient data.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter, OrderedDict, defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from scipy import ndimage

from adapters.dicom_frames import (
    READ_ERRORS,
    Frame,
    decode_frames,
    functional_group_value,
    quiet_pydicom,
    read_header,
)
from adapters.dicom_rules import Reason, SeriesRules, SeriesVerdict
from adapters.dicom_selection import (
    SAME_POSITION_MM,
    Candidate,
    assess_all,
    assess_series,
    gantry_tilt_deg,
    labels,
    preference_key,
    unit_normal,
    why_not_chosen,
)
from core.errors import InputError, InvalidVolumeError, NoSeriesFoundError, UnreadableDicomError
from core.types import AcquisitionInfo, Volume

__all__ = [
    "DEFAULT_RULES",
    "FolderScan",
    "IngestReport",
    "IngestedStudy",
    "assess_folder",
    "load_study",
    "read_study",
    "scan_folder",
    "series_source_headers",
]

log = logging.getLogger("interval.adapters.ingest")

DEFAULT_RULES = SeriesRules()
AIR_HU = -1024.0
SPACING_NOTE = 0.01  # spacing irregularities above this fraction of the spacing are noted


@dataclass(frozen=True, slots=True)
class FolderScan:
    """Every DICOM file's header (no pixels), grouped by SeriesInstanceUID (any modality; "" when missing)."""

    series: dict[str, list[tuple[Path, Dataset]]]
    unreadable: list[Path]
    modalities: set[str]
    forced: frozenset[Path] = frozenset()  # files read without a Part 10 meta header


@dataclass(frozen=True, slots=True)
class IngestReport:
    """How a study was read: the verdict on every series and what was tolerated in the chosen one.
    Identifiers, counts and file names relative to the folder only: safe to log."""

    folder: str
    series_uid: str
    verdicts: tuple[SeriesVerdict, ...]
    notes: tuple[str, ...]
    unreadable_files: int

    def summary(self) -> str:
        chosen = next((v for v in self.verdicts if v.reason == Reason.SELECTED), None)
        parts = [f"study folder {self.folder!r}: " + (chosen.line() if chosen else "no series selected")]
        parts += [f"note: {n}" for n in self.notes]
        parts += [f"{v.reason}: {v.line()}" for v in self.verdicts if v.reason != Reason.SELECTED]
        if self.unreadable_files:
            parts.append(f"{self.unreadable_files} file(s) are not DICOM")
        return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class IngestedStudy:
    volume: Volume
    report: IngestReport


_SCANS: OrderedDict[Path, tuple[tuple[tuple[str, int, int], ...], FolderScan]] = OrderedDict()
_SCANS_KEPT = 2  # a worker reads a study, then writes its SEG and SR from the same headers


def scan_folder(folder: Path) -> FolderScan:
    """Read every file's header (no pixels) and group DICOM files by series.

    The last scans are kept in the process and given again while no file of the folder was added, removed or
    rewritten (name, size and modification time of each): the headers a worker read to load a study are the ones it
    writes the study's SEG from, not read twice. The header datasets are shared: read them, do not change them."""
    if not folder.is_dir():
        raise NoSeriesFoundError(f"study folder {folder.name!r} does not exist or is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    stamp = tuple((str(p), (st := p.stat()).st_size, st.st_mtime_ns) for p in paths)
    where = folder.resolve()
    kept = _SCANS.get(where)
    if kept is not None and kept[0] == stamp:
        _SCANS.move_to_end(where)
        return _copy(kept[1])
    scan = _scan(paths)
    _SCANS[where] = (stamp, scan)
    while len(_SCANS) > _SCANS_KEPT:
        _SCANS.popitem(last=False)
    return _copy(scan)


def _copy(scan: FolderScan) -> FolderScan:
    """The scan with its own lists and set (a caller may change them; the kept one stays as read)."""
    series = {uid: list(files) for uid, files in scan.series.items()}
    return FolderScan(series, list(scan.unreadable), set(scan.modalities), scan.forced)


def _scan(paths: list[Path]) -> FolderScan:
    series: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    unreadable: list[Path] = []
    modalities: set[str] = set()
    forced: set[Path] = set()
    with quiet_pydicom():
        for path in paths:
            if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
                continue
            read = read_header(path)
            if read is None:
                unreadable.append(path)
                continue
            ds, was_forced = read
            if was_forced:
                forced.add(path)
            modalities.add(str(ds.get("Modality", "") or "") or "?")
            series[str(ds.get("SeriesInstanceUID", "") or "")].append((path, ds))
    return FolderScan(dict(series), unreadable, modalities, frozenset(forced))


def _rel(folder: Path, paths: list[Path]) -> str:
    names = [str(p.relative_to(folder)) if p.is_relative_to(folder) else p.name for p in paths[:3]]
    more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    return ", ".join(names) + more


@dataclass(frozen=True, slots=True)
class _Grid:
    directions: npt.NDArray[np.float64]  # columns: i, j, k directions (LPS)
    slots: list[list[Frame]]  # frames at each slice position, in k order
    spacing_mm: float
    offsets_mm: npt.NDArray[np.float64] | None  # in-plane shift of each slot (gantry tilt being resampled)
    notes: list[str]


def _grid(folder: Path, cand: Candidate, rules: SeriesRules) -> _Grid:
    """Sort the frames along the normal and check that they make one orthogonal, evenly spaced grid."""
    uid = cand.series_uid
    frames = list(cand.frames)
    ref_iop = Counter(tuple(round(v, 3) for v in f.orientation or ()) for f in frames).most_common(1)[0][0]
    ref = next(f for f in frames if tuple(round(v, 3) for v in f.orientation or ()) == ref_iop)
    iop = np.asarray(ref.orientation, dtype=float)
    row_dir, col_dir = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    normal = unit_normal(tuple(iop))
    shapes = {(f.rows, f.columns) for f in frames}
    if len(shapes) > 1:
        raise InvalidVolumeError(f"series {uid} mixes image sizes {sorted(shapes)}")
    spacings = {tuple(round(v, 4) for v in f.pixel_spacing_mm or ()) for f in frames}
    if len(spacings) > 1:
        raise InvalidVolumeError(f"series {uid} mixes pixel spacings {sorted(spacings)}")
    turned = [f for f in frames if not np.allclose(np.asarray(f.orientation, float), iop, atol=1e-3)]
    if turned:
        raise InvalidVolumeError(
            f"series {uid} mixes slice orientations: {len(turned)} of {len(frames)} image(s) differ "
            f"({labels(folder, turned)}); export the axial images as their own series"
        )
    positions = np.array([f.position_lps_mm for f in frames], dtype=float)
    dist = positions @ normal
    order = np.argsort(dist, kind="stable")
    slots: list[list[Frame]] = []
    slot_dist: list[float] = []
    slot_pos: list[npt.NDArray[np.float64]] = []
    for idx in order:
        if slots and dist[idx] - slot_dist[-1] < SAME_POSITION_MM:
            slots[-1].append(frames[idx])
            continue
        slots.append([frames[idx]])
        slot_dist.append(float(dist[idx]))
        slot_pos.append(positions[idx])
    notes: list[str] = []
    steps = np.diff(slot_dist)
    offsets: npt.NDArray[np.float64] | None = None
    tilt = gantry_tilt_deg(list(cand.headers.values()))
    if len(slots) > 1:
        rel = np.asarray(slot_pos) - slot_pos[0]
        in_plane = rel - np.outer(rel @ normal, normal)
        sheared = float(np.abs(in_plane).max()) > 0.01 * float(np.median(steps)) + 1e-3
    else:
        in_plane, sheared = np.zeros((1, 3)), False
    if abs(tilt) > 0.01 or sheared:
        told = f"the header states {tilt:g} degrees" if abs(tilt) > 0.01 else "no tilt in the header"
        what = (
            f"slices shifted in-plane by up to {float(np.abs(in_plane).max()):.1f} mm across the series, {told}"
            if sheared
            else told
        )
        if rules.gantry_tilt == "refuse":
            raise InvalidVolumeError(
                f"series {uid} is acquired with gantry tilt ({what}); resample it to an orthogonal grid before "
                "analysis, or set INTERVAL_GANTRY_TILT=resample"
            )
        if sheared:
            offsets = in_plane
            notes.append(f"gantry tilt resampled to an orthogonal grid ({what}; linear interpolation)")
        else:
            notes.append(f"gantry tilt: {what}, but the slice positions form an orthogonal grid: read as is")
    if len(slots) == 1:
        spacing = ref.spacing_between_slices_mm or ref.slice_thickness_mm
        if not spacing or spacing <= 0:
            raise InvalidVolumeError(
                f"series {uid} has a single slice position and no Slice Thickness or Spacing Between Slices: "
                "the slice spacing is unknown"
            )
    else:
        spacing = float(np.median(steps))
        deviation = np.abs(steps - spacing)
        if float(deviation.max()) > rules.spacing_tolerance * spacing:
            gaps = np.flatnonzero(steps > 1.5 * spacing)
            where = ""
            if gaps.size:
                first = int(gaps[0])
                where = (
                    f"; {gaps.size} gap(s) where slices are missing, the first between "
                    f"{slots[first][0].label(folder)} and {slots[first + 1][0].label(folder)} "
                    f"({steps[first]:.2f} mm)"
                )
            raise InvalidVolumeError(
                f"series {uid} has uneven slice spacing (median {spacing:.2f} mm, steps from "
                f"{float(steps.min()):.2f} to {float(steps.max()):.2f} mm, more than the "
                f"{rules.spacing_tolerance:.0%} tolerated{where}); the series is incomplete (missing slices) or "
                "mixes reconstructions"
            )
        if float(deviation.max()) > SPACING_NOTE * spacing:
            notes.append(
                f"slice spacing varies by up to {float(deviation.max()):.3f} mm around the median {spacing:.3f} mm "
                f"(within the {rules.spacing_tolerance:.0%} tolerance); the median is used"
            )
    directions = np.stack([row_dir, col_dir, normal], axis=1)
    return _Grid(directions, slots, float(spacing), offsets, notes)


def _pixels(
    folder: Path, cand: Candidate, grid: _Grid, forced: frozenset[Path], rules: SeriesRules
) -> tuple[npt.NDArray[np.float32], list[str]]:
    """Decode every file once (and drop it after its last frame is used), rescale each frame with its own slope
    and intercept, keep one image per slot."""
    uid = cand.series_uid
    uses = Counter(f.path for slot in grid.slots for f in slot)
    decoded: dict[Path, npt.NDArray[np.generic]] = {}
    bad: dict[Path, BaseException] = {}
    first = grid.slots[0][0]
    voxels = np.empty((len(grid.slots), first.rows, first.columns), dtype=np.float32)
    copies = 0
    for k, slot in enumerate(grid.slots):
        images: list[npt.NDArray[np.float32]] = []
        for f in slot:
            if f.path not in decoded and f.path not in bad:
                try:
                    decoded[f.path] = decode_frames(f.path, f.path in forced)
                except READ_ERRORS as exc:
                    bad[f.path] = exc
            if f.path in bad:
                continue
            stored = decoded[f.path][f.frame_index or 0]
            if stored.shape != (f.rows, f.columns):
                bad[f.path] = ValueError(
                    f"decoded frame of {stored.shape}, header says {(f.rows, f.columns)}"
                )
                continue
            if (
                len(slot) == 1 and f.rescale_slope == 1.0
            ):  # the common case: straight into the volume, one pass
                image = voxels[k]
                np.add(stored, np.float32(f.rescale_intercept), out=image, casting="unsafe")
            else:  # float64 arithmetic only where a slope needs it
                if f.rescale_slope != 1.0:
                    image = (stored.astype(np.float64) * f.rescale_slope).astype(np.float32)
                else:
                    image = stored.astype(np.float32)
                if f.rescale_intercept != 0.0:
                    image += np.float32(f.rescale_intercept)
            images.append(image)
            uses[f.path] -= 1
            if uses[f.path] == 0:
                del decoded[f.path]
        if bad:
            continue
        for other, f in zip(images[1:], slot[1:], strict=True):
            if not np.array_equal(other, images[0]):
                raise InvalidVolumeError(
                    f"series {uid} has different images at the same slice position ({slot[0].label(folder)} and "
                    f"{f.label(folder)}): two acquisitions or phases are mixed in one series (duplicate slice "
                    "positions); remove one of them"
                )
        copies += len(slot) - 1
        if images[0].base is not voxels:  # not already written in place
            voxels[k] = images[0]
    if bad:
        syntaxes = sorted({_transfer_syntax(cand.headers[p]) for p in bad})
        error = next(iter(bad.values()))
        detail = (str(error).splitlines() or [""])[0][:240]
        raise UnreadableDicomError(
            f"{len(bad)} file(s) of series {uid} have unreadable pixel data ({_rel(folder, list(bad))}; "
            f"transfer syntax {', '.join(syntaxes)}): {type(error).__name__}: {detail}. The files may be truncated, "
            "or their compression needs a decoder that is not installed (pylibjpeg, pylibjpeg-libjpeg, "
            "pylibjpeg-openjpeg, pyjpegls)"
        )
    notes = (
        [f"kept one image of {copies} identical duplicate(s) at the same slice position"] if copies else []
    )
    if rules.require_hu:
        np.maximum(voxels, AIR_HU, out=voxels)
    if grid.offsets_mm is not None:
        ps = grid.slots[0][0].pixel_spacing_mm or (1.0, 1.0)
        fill = AIR_HU if rules.require_hu else float(voxels.min())
        row_dir, col_dir = grid.directions[:, 0], grid.directions[:, 1]
        for k, off in enumerate(grid.offsets_mm):
            shift = (float(off @ col_dir) / ps[0], float(off @ row_dir) / ps[1])
            if abs(shift[0]) > 1e-3 or abs(shift[1]) > 1e-3:
                voxels[k] = ndimage.shift(voxels[k], shift, order=1, mode="constant", cval=fill)
    return voxels, notes


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return f"{uid.name} ({uid})" if uid else "unknown (no meta header)"


def _date(ds: Dataset, uid: str) -> dt.date:
    for keyword in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
        raw = str(ds.get(keyword, "") or "").strip()
        try:
            return dt.datetime.strptime(raw, "%Y%m%d").date()
        except ValueError:
            continue
    raise InvalidVolumeError(
        f"series {uid} has no valid StudyDate (nor Series, Acquisition or Content Date); a follow-up cannot be "
        "ordered in time"
    )


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def _acquisition(ds: Dataset, cand: Candidate, first: Frame, notes: tuple[str, ...]) -> AcquisitionInfo:
    kvp = ds.get("KVP")
    if kvp in (None, ""):
        kvp = functional_group_value(ds, "CTXRayDetailsSequence", "KVP")
    kernel = ds.get("ConvolutionKernel")
    if kernel in (None, ""):
        kernel = functional_group_value(ds, "CTReconstructionSequence", "ConvolutionKernel")
    try:
        kvp_value = float(kvp) if kvp not in (None, "") else None
    except (TypeError, ValueError):
        kvp_value = None
    return AcquisitionInfo(
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_uid=cand.series_uid,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        study_date=_date(ds, cand.series_uid),
        manufacturer=str(ds.get("Manufacturer", "") or ""),
        model_name=str(ds.get("ManufacturerModelName", "") or ""),
        kernel=_text(kernel),
        kvp=kvp_value,
        slice_thickness_mm=first.slice_thickness_mm,
        station_name=str(ds.get("StationName", "") or ""),
        accession_number=str(ds.get("AccessionNumber", "") or ""),
        ingest_notes=notes,
    )


def _build(folder: Path, cand: Candidate, scan: FolderScan, rules: SeriesRules) -> Volume:
    study_uid = str(next(iter(cand.headers.values())).get("StudyInstanceUID", "") or "") or None
    try:
        grid = _grid(folder, cand, rules)
        voxels, pixel_notes = _pixels(folder, cand, grid, scan.forced, rules)
        first = grid.slots[0][0]
        notes = (*cand.notes, *grid.notes, *pixel_notes)
        info = _acquisition(cand.headers[first.path], cand, first, notes)
    except InputError as exc:
        if exc.study_uid is None and study_uid:
            exc.study_uid = study_uid
        raise
    ps = first.pixel_spacing_mm or (1.0, 1.0)
    origin = tuple(float(v) for v in first.position_lps_mm or (0.0, 0.0, 0.0))
    return Volume(
        voxels_hu=voxels,
        spacing_kji_mm=(grid.spacing_mm, float(ps[0]), float(ps[1])),
        origin_lps_mm=(origin[0], origin[1], origin[2]),
        direction_lps=tuple((float(r[0]), float(r[1]), float(r[2])) for r in grid.directions),
        acquisition=info,
    )


def _listing(verdicts: list[SeriesVerdict], limit: int = 6) -> str:
    lines = [v.line() for v in verdicts[:limit]]
    if len(verdicts) > limit:
        lines.append(f"and {len(verdicts) - limit} more series")
    return "; ".join(lines)


def _no_series(
    folder: Path, scan: FolderScan, verdicts: list[SeriesVerdict], rules: SeriesRules
) -> NoSeriesFoundError:
    wanted = " or ".join(rules.modalities)
    hint = f"; {len(scan.unreadable)} file(s) are not readable DICOM" if scan.unreadable else ""
    if not any(v.reason not in (Reason.MODALITY,) for v in verdicts):
        found = ", ".join(sorted(m for m in scan.modalities if m)) or "no DICOM files"
        listing = f": {_listing(verdicts)}" if verdicts else ""
        return NoSeriesFoundError(f"no {wanted} series in {folder.name!r} (found: {found}{hint}){listing}")
    return NoSeriesFoundError(
        f"no usable axial {wanted} series in {folder.name!r}{hint}: {_listing(verdicts)}"
    )


def read_study(folder: Path, rules: SeriesRules = DEFAULT_RULES) -> IngestedStudy:
    """Select the series of ``folder`` under ``rules`` and build its volume (HU, LPS geometry, acquisition
    facts and ingest notes), with the verdict on every series."""
    with quiet_pydicom():
        return _read_study(folder, rules)


def assess_folder(folder: Path, rules: SeriesRules = DEFAULT_RULES) -> list[SeriesVerdict]:
    """The verdict on every series of ``folder`` from the headers alone (no pixel is read); each series that
    could be read gets ``Reason.NOT_CHOSEN`` with detail "usable"."""
    with quiet_pydicom():
        scan = scan_folder(folder)
        verdicts, candidates = assess_all(folder, scan.series, rules)
    usable = [
        SeriesVerdict(c.series_uid, c.modality, c.files, Reason.NOT_CHOSEN, "usable") for c in candidates
    ]
    return verdicts + usable


def _read_study(folder: Path, rules: SeriesRules) -> IngestedStudy:
    scan = scan_folder(folder)
    verdicts, candidates = assess_all(folder, scan.series, rules)
    if not candidates:
        raise _no_series(folder, scan, verdicts, rules)
    candidates.sort(key=lambda c: preference_key(rules, c))
    failures: list[tuple[Candidate, InputError]] = []
    for index, cand in enumerate(candidates):
        try:
            volume = _build(folder, cand, scan, rules)
        except InputError as exc:
            failures.append((cand, exc))
            continue
        verdicts += [
            SeriesVerdict(c.series_uid, c.modality, c.files, Reason.INVALID_VOLUME, str(e))
            for c, e in failures
        ]
        verdicts.append(
            SeriesVerdict(
                cand.series_uid, cand.modality, cand.files, Reason.SELECTED, f"{volume.shape[0]} slices"
            )
        )
        verdicts += [
            SeriesVerdict(
                c.series_uid, c.modality, c.files, Reason.NOT_CHOSEN, why_not_chosen(rules, c, cand)
            )
            for c in candidates[index + 1 :]
        ]
        notes = list(volume.acquisition.ingest_notes) if volume.acquisition else []
        if failures:
            fallback = f"the preferred series {failures[0][0].series_uid} is unusable ({failures[0][1]}); read series {cand.series_uid} instead"
            notes.insert(0, fallback)
            assert volume.acquisition is not None
            volume = replace(volume, acquisition=replace(volume.acquisition, ingest_notes=tuple(notes)))
        report = IngestReport(
            folder.name, cand.series_uid, tuple(verdicts), tuple(notes), len(scan.unreadable)
        )
        return IngestedStudy(volume, report)
    _, first_exc = failures[0]
    if len(failures) == 1:
        raise first_exc
    others = "; ".join(f"series {c.series_uid}: {e}" for c, e in failures[1:])
    raise type(first_exc)(
        f"{first_exc.message}; the other candidate series are unusable too: {others}",
        study_uid=first_exc.study_uid,
    )


def load_study(folder: Path, rules: SeriesRules = DEFAULT_RULES) -> Volume:
    """Select the CT series of ``folder`` and build its volume (HU, LPS geometry, acquisition facts); the
    verdict on every series is logged (identifiers only)."""
    study = read_study(folder, rules)
    acq = study.volume.acquisition
    log.info(
        "ingest: %s", study.report.summary(), extra={"study_uid": acq.study_uid if acq is not None else None}
    )
    return study.volume


def series_source_headers(folder: Path, series_uid: str, rules: SeriesRules = DEFAULT_RULES) -> list[Dataset]:
    """The headers of the images of ``series_uid`` that a volume is built from, in slice order: non-image objects
    and localizers left out, one file per slice position (duplicates were identical, or the study was refused).
    A SEG or SR references these."""
    with quiet_pydicom():
        items = scan_folder(folder).series.get(series_uid, [])
        out = assess_series(folder, series_uid, items, rules) if items else None
    if out is None or isinstance(out, SeriesVerdict):
        return []
    orientation = out.frames[0].orientation or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    normal = unit_normal(orientation)
    headers: list[Dataset] = []
    last: float | None = None
    seen: set[Path] = set()
    for frame in sorted(out.frames, key=lambda f: float(np.asarray(f.position_lps_mm) @ normal)):
        dist = float(np.asarray(frame.position_lps_mm) @ normal)
        if frame.path in seen or (last is not None and dist - last < SAME_POSITION_MM):
            continue
        seen.add(frame.path)
        last = dist
        headers.append(out.headers[frame.path])
    return headers
