"""Which series of a study is read: each series' verdict under ``SeriesRules`` from its headers alone, and the
usable candidates in order of preference (``adapters.dicom_rules`` states the rules)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from adapters.dicom_frames import Frame, frames_of, functional_group_value
from adapters.dicom_rules import (
    Reason,
    SeriesRules,
    SeriesVerdict,
    is_localizer,
    obliquity_deg,
    sop_class_name,
)

__all__ = [
    "SAME_POSITION_MM",
    "Candidate",
    "assess_all",
    "assess_series",
    "gantry_tilt_deg",
    "labels",
    "preference_key",
    "unit_normal",
    "why_not_chosen",
]

SAME_POSITION_MM = 0.01  # frames closer than this along the normal are at one position


@dataclass(frozen=True, slots=True)
class Candidate:
    """A series that passed every rule: its image frames (localizers, non-images and excluded types removed),
    their headers, what was dropped (``notes``), and what the preference orders by."""

    series_uid: str
    modality: str
    files: int
    frames: tuple[Frame, ...]
    headers: dict[Path, Dataset]
    notes: tuple[str, ...]
    thickness_mm: float
    positions: int


def labels(folder: Path, frames: list[Frame]) -> str:
    """Up to three frames named by file (relative to the folder) and frame number."""
    more = f" and {len(frames) - 3} more" if len(frames) > 3 else ""
    return ", ".join(f.label(folder) for f in frames[:3]) + more


def _names(values: list[str]) -> str:
    counts = Counter(values)
    return ", ".join(f"{n} {name}" for name, n in counts.most_common())


def unit_normal(orientation: tuple[float, ...]) -> npt.NDArray[np.float64]:
    n = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:6], float))
    out: npt.NDArray[np.float64] = n / max(float(np.linalg.norm(n)), 1e-12)
    return out


def _distinct_positions(frames: list[Frame], normal: npt.NDArray[np.float64]) -> int:
    dist = sorted(float(np.asarray(f.position_lps_mm) @ normal) for f in frames if f.position_lps_mm)
    return 0 if not dist else 1 + int(np.sum(np.diff(dist) >= SAME_POSITION_MM))


def assess_series(
    folder: Path, uid: str, items: list[tuple[Path, Dataset]], rules: SeriesRules
) -> Candidate | SeriesVerdict:
    """A usable candidate, or the verdict that says why the series is not one."""
    modality = Counter(str(ds.get("Modality", "") or "") for _, ds in items).most_common(1)[0][0]

    def verdict(reason: str, detail: str) -> SeriesVerdict:
        return SeriesVerdict(uid, modality, len(items), reason, detail)

    wanted = "/".join(rules.modalities)
    images = [
        (p, ds)
        for p, ds in items
        if rules.accepts_sop_class(str(ds.get("Modality", "") or ""), str(ds.get("SOPClassUID", "") or ""))
    ]
    image_paths = {p for p, _ in images}
    others = [sop_class_name(_sop_class(ds)) for p, ds in items if p not in image_paths]
    if not images:
        if modality not in rules.modalities:
            shown = f"modality {modality}" if modality else "no Modality"
            return verdict(Reason.MODALITY, f"{shown} ({_names(others)}); Interval analyses {wanted} images")
        return verdict(
            Reason.NOT_AN_IMAGE,
            f"{_names(others)}: not {wanted} images (a secondary capture such as a dose page, raw data or a "
            "non-image object)",
        )
    notes: list[str] = []
    if others:
        notes.append(
            f"ignored {len(others)} object(s) in the series that are not {wanted} images ({_names(others)})"
        )
    colour = sorted(
        {
            str(ds.get("PhotometricInterpretation", "") or "?")
            for _, ds in images
            if int(ds.get("SamplesPerPixel", 1) or 1) != 1
            or str(ds.get("PhotometricInterpretation", "MONOCHROME2")) not in ("MONOCHROME1", "MONOCHROME2")
        }
    )
    if colour:
        return verdict(
            Reason.NOT_GRAYSCALE, f"not grayscale images (Photometric Interpretation {', '.join(colour)})"
        )
    frames = [f for p, ds in images for f in frames_of(p, ds)]
    localizers = [f for f in frames if is_localizer(f.image_type)]
    frames = [f for f in frames if not is_localizer(f.image_type)]
    if not frames:
        return verdict(Reason.LOCALIZER, f"localizer (scout) images only ({len(localizers)})")
    if localizers:
        notes.append(
            f"dropped {len(localizers)} localizer image(s) from the series ({labels(folder, localizers)})"
        )
    excluded = [(f, why) for f in frames if (why := rules.image_type_exclusion(f.image_type)) is not None]
    if excluded:
        frames = [f for f in frames if rules.image_type_exclusion(f.image_type) is None]
        if not frames:
            return verdict(Reason.DERIVED, excluded[0][1])
        notes.append(f"dropped {len(excluded)} image(s) of another kind: {excluded[0][1]}")
    if rules.require_hu:
        other_units = sorted({f.rescale_type for f in frames if f.rescale_type not in ("", "HU")})
        if other_units:
            return verdict(
                Reason.NOT_HU,
                f"values are not Hounsfield units (Rescale Type {', '.join(other_units)}: a derived map such as "
                "perfusion); Interval measures HU",
            )
    missing = [
        f for f in frames if f.position_lps_mm is None or f.orientation is None or f.pixel_spacing_mm is None
    ]
    if missing:
        multi = any(f.frame_index is not None for f in missing)
        why = (
            " (a multi-frame file without Per-frame Functional Groups: enhanced multi-frame images need them)"
            if multi
            else ""
        )
        return verdict(
            Reason.NO_GEOMETRY,
            f"{len(missing)} image(s) lack Image Position/Orientation (Patient) or Pixel Spacing{why} "
            f"({labels(folder, missing)}); a volume cannot be placed",
        )
    orientation = Counter(tuple(round(v, 3) for v in f.orientation or ()) for f in frames).most_common(1)[0][
        0
    ]
    angle = obliquity_deg(orientation)
    if angle > rules.max_obliquity_deg:
        tilt = gantry_tilt_deg(list(ds for _, ds in images))
        told = f"; the header states a gantry tilt of {tilt:g} degrees" if abs(tilt) > 0.01 else ""
        return verdict(
            Reason.NOT_AXIAL,
            f"not axial: the slice normal is {angle:.1f} degrees from the head-feet axis (at most "
            f"{rules.max_obliquity_deg:g} allowed){told}",
        )
    positions = _distinct_positions(frames, unit_normal(orientation))
    if positions < rules.min_slices:
        return verdict(
            Reason.TOO_FEW_SLICES,
            f"{positions} slice position(s); at least {rules.min_slices} are needed for a volume",
        )
    thick = [f.slice_thickness_mm for f in frames if f.slice_thickness_mm]
    return Candidate(
        series_uid=uid,
        modality=modality,
        files=len(items),
        frames=tuple(frames),
        headers={p: ds for p, ds in images},
        notes=tuple(notes),
        thickness_mm=float(np.median(thick)) if thick else float("inf"),
        positions=positions,
    )


def _sop_class(ds: Dataset) -> str:
    uid = ds.get("SOPClassUID") or getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
    return str(uid or "")


def gantry_tilt_deg(headers: list[Dataset]) -> float:
    tilts = []
    for ds in headers:
        raw = ds.get("GantryDetectorTilt")
        if raw is None:
            raw = functional_group_value(ds, "CTAcquisitionDetailsSequence", "GantryDetectorTilt")
        try:
            tilts.append(float(raw) if raw not in (None, "") else 0.0)
        except (TypeError, ValueError):
            tilts.append(0.0)
    return max(tilts, key=abs) if tilts else 0.0


def preference_key(rules: SeriesRules, c: Candidate) -> tuple[float, float, str]:
    if rules.prefer == "most_slices":
        return (-c.positions, c.thickness_mm, c.series_uid)
    return (c.thickness_mm, -c.positions, c.series_uid)


def why_not_chosen(rules: SeriesRules, c: Candidate, chosen: Candidate) -> str:
    def thick(x: Candidate) -> str:
        return f"{x.thickness_mm:g} mm" if np.isfinite(x.thickness_mm) else "unknown"

    return (
        f"usable, not preferred ({rules.prefer}): {c.positions} slices of {thick(c)}, the chosen series has "
        f"{chosen.positions} of {thick(chosen)}"
    )


def assess_all(
    folder: Path, series: dict[str, list[tuple[Path, Dataset]]], rules: SeriesRules
) -> tuple[list[SeriesVerdict], list[Candidate]]:
    """The verdict on every series that cannot be read, and the usable candidates (in no order)."""
    verdicts: list[SeriesVerdict] = []
    candidates: list[Candidate] = []
    for uid, items in series.items():
        out = assess_series(folder, uid, items, rules)
        if isinstance(out, SeriesVerdict):
            verdicts.append(out)
        else:
            candidates.append(out)
    return verdicts, candidates
