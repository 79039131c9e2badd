"""Which series of a study Interval analyses, and what it tolerates in that series.

``SeriesRules`` is the one place these choices live; ``adapters.settings.Settings.series_rules`` builds it
from the environment and ``adapters.dicom_series.read_study`` applies it. Every series of a study gets a
``SeriesVerdict``: chosen, or the reason it was not (a stable code plus one readable line, no PHI), so that
a log or a job record can say why a study was read the way it was.

The rules, in the order they are applied (README "DICOM ingest" says the same for users):

1. Modality and SOP class: CT Image, Enhanced CT Image or Legacy Converted Enhanced CT Image storage.
   Anything else in the folder (SR, PR, KO, SEG, RT objects, secondary captures such as dose pages, other
   modalities) is ignored with its SOP class named.
2. Localizers (Image Type LOCALIZER or SCOUT) are dropped, also when they sit inside the axial series.
3. Derived secondary images (reformats, MPR, MIP: Image Type DERIVED\\SECONDARY) and the projection types in
   ``exclude_image_types`` are not analysed (``exclude_derived_secondary``).
4. Values must be Hounsfield units: a Rescale Type other than HU (a perfusion map, "US") is refused.
5. Axial: the slice normal within ``max_obliquity_deg`` of the patient's head-feet axis.
6. At least ``min_slices`` distinct slice positions.
7. Among the series left: the thinnest slices, then the most slices (``prefer="thinnest"``), or the most
   slices first (``prefer="most_slices"``). When the preferred series does not make a valid volume (gaps,
   conflicting duplicates), the next one is tried and the reason recorded.

Within the chosen series (``adapters.dicom_series``): slices are sorted by position along the normal (file
order, instance numbers, head-first or feet-first do not matter); exact copies at one position are kept once
(noted); different images at one position are refused; steps that differ from the median by at most
``spacing_tolerance`` (relative) are accepted (noted when over 1 %), larger ones are missing slices and
refused; gantry tilt (header tilt or sheared positions) is refused, or with ``gantry_tilt="resample"`` each
slice is shifted in-plane onto an orthogonal grid (linear interpolation, noted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydicom.uid import UID

__all__ = [
    "CT_IMAGE_SOP_CLASSES",
    "MR_IMAGE_SOP_CLASSES",
    "Reason",
    "SeriesRules",
    "SeriesVerdict",
    "obliquity_deg",
    "sop_class_name",
]

CT_IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
        "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
    }
)
MR_IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
        "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    }
)
IMAGE_SOP_CLASSES = {"CT": CT_IMAGE_SOP_CLASSES, "MR": MR_IMAGE_SOP_CLASSES}


class Reason:
    """Stable codes of ``SeriesVerdict.reason`` (for logs, job records and the robustness summary)."""

    SELECTED = "selected"
    NOT_CHOSEN = "not_chosen"  # usable, but another series was preferred
    MODALITY = "modality"  # not CT (MR, SR, PR, KO, SEG, RT..., or no Modality)
    NOT_AN_IMAGE = "not_an_image"  # CT modality but not a CT image SOP class (secondary capture, raw data)
    LOCALIZER = "localizer"
    DERIVED = "derived"  # derived secondary / projection images
    NOT_HU = "not_hu"
    NOT_GRAYSCALE = "not_grayscale"
    NO_GEOMETRY = "no_geometry"  # no position/orientation/pixel spacing
    NOT_AXIAL = "not_axial"
    TOO_FEW_SLICES = "too_few_slices"
    INVALID_VOLUME = "invalid_volume"  # the slices do not make a volume (gaps, duplicates, tilt, mixed sizes)
    UNREADABLE = "unreadable"  # pixel data that cannot be decoded


@dataclass(frozen=True, slots=True)
class SeriesRules:
    """How a series is chosen and what is tolerated in it. Defaults are Interval's production rules.

    ``modalities`` and ``require_hu`` exist for tests of the reader (MR decodes through the same path);
    Interval measures in Hounsfield units, so ``Settings`` exposes neither.
    """

    prefer: Literal["thinnest", "most_slices"] = "thinnest"
    max_obliquity_deg: float = 12.0
    min_slices: int = 3
    exclude_derived_secondary: bool = True
    exclude_image_types: tuple[str, ...] = (
        "MIP",
        "MINIP",
        "MINIMUM IP",
        "MAXIMUM IP",
        "PROJECTION IMAGE",
        "VOLUME RENDERING",
        "VOLUME_RENDERING",
        "SURFACE RENDERING",
    )
    spacing_tolerance: float = 0.1
    gantry_tilt: Literal["refuse", "resample"] = "refuse"
    modalities: tuple[str, ...] = ("CT",)
    require_hu: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_obliquity_deg <= 90.0:
            raise ValueError(f"max_obliquity_deg must be in [0, 90] degrees, got {self.max_obliquity_deg}")
        if self.min_slices < 1:
            raise ValueError(f"min_slices must be >= 1, got {self.min_slices}")
        if not 0.0 < self.spacing_tolerance < 0.5:
            raise ValueError(
                f"spacing_tolerance is a fraction of the slice spacing in (0, 0.5), got {self.spacing_tolerance}"
            )
        unknown = set(self.modalities) - set(IMAGE_SOP_CLASSES)
        if not self.modalities or unknown:
            raise ValueError(f"modalities must be among {sorted(IMAGE_SOP_CLASSES)}, got {self.modalities}")
        if self.prefer not in ("thinnest", "most_slices"):
            raise ValueError(f"prefer must be 'thinnest' or 'most_slices', got {self.prefer!r}")
        if self.gantry_tilt not in ("refuse", "resample"):
            raise ValueError(f"gantry_tilt must be 'refuse' or 'resample', got {self.gantry_tilt!r}")

    def accepts_sop_class(self, modality: str, sop_class_uid: str) -> bool:
        return modality in self.modalities and sop_class_uid in IMAGE_SOP_CLASSES[modality]

    def image_type_exclusion(self, image_type: tuple[str, ...]) -> str | None:
        """Why images of this Image Type / Frame Type are not analysed (localizers aside), or None."""
        values = [v.strip().upper() for v in image_type]
        if self.exclude_derived_secondary and values[:2] == ["DERIVED", "SECONDARY"]:
            return "derived secondary images (a reformat, MPR or MIP); Interval reads the original reconstruction"
        excluded = {v.upper() for v in self.exclude_image_types}
        hit = [v for v in values[2:] if v in excluded]
        if hit:
            return f"{hit[0]} images (a projection or rendering, not slices)"
        return None


def is_localizer(image_type: tuple[str, ...]) -> bool:
    values = {v.strip().upper() for v in image_type}
    return bool(values & {"LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM"})


@dataclass(frozen=True, slots=True)
class SeriesVerdict:
    """What became of one series of the study: ``reason`` is a ``Reason`` code; ``detail`` is one line that
    names the problem with identifiers and counts only (no patient data)."""

    series_uid: str
    modality: str
    files: int
    reason: str
    detail: str = ""

    def line(self) -> str:
        text = f"series {self.series_uid or '(no SeriesInstanceUID)'} ({self.modality or '?'}, {self.files} file(s)): "
        return text + (self.detail or self.reason)


def obliquity_deg(orientation: tuple[float, ...]) -> float:
    """Angle in degrees between the slice normal of an Image Orientation (Patient) and the LPS z axis."""
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row, col)
    norm = float(np.linalg.norm(normal))
    if norm < 1e-6:
        return 90.0
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])) / norm)))


def sop_class_name(uid: str) -> str:
    """The SOP class's name when pydicom knows it, else the UID itself."""
    if not uid:
        return "no SOP Class UID"
    name = UID(uid).name
    return name if name and name != uid else uid
