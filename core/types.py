"""Value types of the domain.

Conventions (used everywhere in Interval):

- Voxel arrays are indexed ``[k, j, i]`` = ``[slice, row, column]``.
- ``spacing_kji_mm`` gives the spacing along those axes: slice spacing, row spacing (DICOM
  PixelSpacing[0]), column spacing (PixelSpacing[1]).
- Patient coordinates are DICOM LPS in mm (``*_lps_mm``): +x to the patient's left, +y posterior,
  +z toward the head. ``direction_lps`` holds, as columns, the LPS unit vectors of increasing
  column (i), row (j) and slice (k) index.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "AcquisitionInfo",
    "BoxKji",
    "DetectedLesion",
    "FloatArray",
    "LabelId",
    "LesionSpread",
    "Measurement",
    "Organ",
    "PriorFinding",
    "PriorTimePoint",
    "RecistRole",
    "Segmentation",
    "Volume",
]

FloatArray = npt.NDArray[np.float32]
BoxKji = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (start, stop) voxel index per k, j, i


class Organ(enum.StrEnum):
    """Where a lesion lies. RECIST counts each value as one organ (both lungs are one organ, all
    lymph nodes together are one organ)."""

    LIVER = "liver"
    LUNG = "lung"
    LYMPH_NODE = "lymph_node"
    ADRENAL = "adrenal"
    OTHER = "other"

    @property
    def is_nodal(self) -> bool:
        return self is Organ.LYMPH_NODE


class LabelId(enum.IntEnum):
    """Values of the segmentation label map."""

    BACKGROUND = 0
    LIVER = 1
    LUNG = 2
    LESION = 3


class RecistRole(enum.StrEnum):
    TARGET = "target"
    NON_TARGET = "non_target"
    NEW = "new"


def _check_spacing(spacing: tuple[float, float, float], name: str) -> None:
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"{name} must be three positive finite numbers in mm, got {spacing!r}")


@dataclass(frozen=True, slots=True)
class AcquisitionInfo:
    """What the scanner tells about an acquisition: identifiers and technique, no PHI."""

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_id: str
    study_date: dt.date
    manufacturer: str = ""
    model_name: str = ""
    kernel: str = ""
    kvp: float | None = None
    slice_thickness_mm: float | None = None
    station_name: str = ""
    accession_number: str = ""
    # what the ingest tolerated or changed in the series (dropped localizers, duplicate copies, a small spacing
    # irregularity, resampled gantry tilt): one line each, identifiers only; reported with the analysis
    ingest_notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, eq=False)
class Volume:
    """A CT volume in Hounsfield units with its geometry in LPS."""

    voxels_hu: FloatArray
    spacing_kji_mm: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]
    direction_lps: tuple[tuple[float, float, float], ...] = (
        (1.0, 0.0, 0.0),
        (0.0, 1.0, 0.0),
        (0.0, 0.0, 1.0),
    )
    acquisition: AcquisitionInfo | None = None

    def __post_init__(self) -> None:
        if self.voxels_hu.ndim != 3:
            raise ValueError(f"a volume is 3-D, got shape {self.voxels_hu.shape}")
        _check_spacing(self.spacing_kji_mm, "spacing_kji_mm")
        d = np.asarray(self.direction_lps, dtype=float)
        if d.shape != (3, 3) or not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
            raise ValueError("direction_lps must be a 3x3 orthonormal matrix")

    @property
    def shape(self) -> tuple[int, int, int]:
        k, j, i = self.voxels_hu.shape
        return (k, j, i)

    def kji_to_lps(self, kji: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Map voxel indices ``[..., (k, j, i)]`` (fractional allowed) to LPS mm."""
        return kji_to_lps(
            np.asarray(kji, dtype=float), self.spacing_kji_mm, self.origin_lps_mm, self.direction_lps
        )

    def lps_to_kji(self, lps: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Inverse of ``kji_to_lps``: fractional voxel indices ``[..., (k, j, i)]``."""
        return lps_to_kji(lps, self.spacing_kji_mm, self.origin_lps_mm, self.direction_lps)

    def contains_lps(self, lps: tuple[float, float, float], margin_voxels: float = 0.5) -> bool:
        """True when an LPS point lies within the scanned grid."""
        kji = self.lps_to_kji(lps)
        return bool(all(-margin_voxels <= kji[a] <= self.shape[a] - 1 + margin_voxels for a in range(3)))


def kji_to_lps(
    kji: npt.NDArray[np.float64],
    spacing_kji_mm: tuple[float, float, float],
    origin_lps_mm: tuple[float, float, float],
    direction_lps: tuple[tuple[float, float, float], ...],
) -> npt.NDArray[np.float64]:
    """Voxel index to LPS: origin + D @ (i*sx, j*sy, k*sz); D's columns are the i, j, k directions."""
    d = np.asarray(direction_lps, dtype=float)
    ijk_mm = kji[..., ::-1] * np.asarray(spacing_kji_mm[::-1], dtype=float)
    out: npt.NDArray[np.float64] = ijk_mm @ d.T + np.asarray(origin_lps_mm, dtype=float)
    return out


def lps_to_kji(
    lps: npt.ArrayLike,
    spacing_kji_mm: tuple[float, float, float],
    origin_lps_mm: tuple[float, float, float],
    direction_lps: tuple[tuple[float, float, float], ...],
) -> npt.NDArray[np.float64]:
    """Inverse of ``kji_to_lps`` (the direction matrix is orthonormal): fractional ``[..., (k, j, i)]``."""
    d = np.asarray(direction_lps, dtype=float)
    ijk_mm = (np.asarray(lps, dtype=float) - np.asarray(origin_lps_mm, dtype=float)) @ d
    out: npt.NDArray[np.float64] = (ijk_mm / np.asarray(spacing_kji_mm[::-1], dtype=float))[..., ::-1]
    return out


@dataclass(frozen=True, slots=True, eq=False)
class Segmentation:
    """Model output on the volume's grid: labels (``LabelId``) and the lesion probability.

    ``refined`` marks the lesion voxels that the image-based edge refinement (``core.edges``) added to the
    model's own (None when nothing was refined): a lesion's probability is averaged over the model's voxels."""

    labels: npt.NDArray[np.uint8]
    lesion_probability: FloatArray
    refined: npt.NDArray[np.bool_] | None = None

    def __post_init__(self) -> None:
        if self.labels.shape != self.lesion_probability.shape:
            raise ValueError("labels and lesion_probability must have the same shape")
        if self.refined is not None and self.refined.shape != self.labels.shape:
            raise ValueError("refined must have the shape of labels")


@dataclass(frozen=True, slots=True)
class Measurement:
    """RECIST measurement of one lesion in the axial plane.

    ``long_axis_mm`` is the longest in-plane diameter over all slices; ``short_axis_mm`` is the
    longest diameter perpendicular to it on the same slice; ``slice_index`` is that slice (k);
    ``long_axis_endpoints_kji`` are the fractional voxel indices of its two ends.
    """

    long_axis_mm: float
    short_axis_mm: float
    volume_ml: float
    slice_index: int
    long_axis_endpoints_kji: tuple[tuple[float, float, float], tuple[float, float, float]]

    def __post_init__(self) -> None:
        if not (self.long_axis_mm >= 0 and self.short_axis_mm >= 0 and self.volume_ml >= 0):
            raise ValueError("diameters and volume must be non-negative")
        if self.short_axis_mm > self.long_axis_mm + 1e-6:
            raise ValueError(
                f"short axis {self.short_axis_mm:.2f} mm exceeds long axis {self.long_axis_mm:.2f} mm"
            )

    def recist_diameter_mm(self, organ: Organ) -> float:
        """The diameter RECIST sums: short axis for nodes, long axis otherwise."""
        return self.short_axis_mm if organ.is_nodal else self.long_axis_mm


@dataclass(frozen=True, slots=True)
class LesionSpread:
    """How one lesion's result varies when the model sees the study transformed (test-time augmentation:
    the input flipped, the output flipped back): a confidence the reader can weigh.

    ``views`` counts the un-augmented result and each augmentation; ``detected_in`` the views in which the
    model labels lesion voxels overlapping this lesion. Each range is (lowest, highest) over all views; a view
    that does not find the lesion counts 0 mm and 0 ml. Probability is the mean lesion probability over the
    lesion's voxels as the un-augmented result drew them.
    """

    views: int
    detected_in: int
    probability_range: tuple[float, float]
    long_axis_mm_range: tuple[float, float]
    volume_ml_range: tuple[float, float]
    augmentations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.detected_in <= self.views:
            raise ValueError(f"detected_in must be within 1..views ({self.views}), got {self.detected_in}")
        for name in ("probability_range", "long_axis_mm_range", "volume_ml_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, got {(lo, hi)}")

    @property
    def agreement(self) -> float:
        """Fraction of views that find the lesion (1.0: every flip agrees)."""
        return self.detected_in / self.views

    @property
    def long_axis_spread_mm(self) -> float:
        return self.long_axis_mm_range[1] - self.long_axis_mm_range[0]


@dataclass(frozen=True, slots=True)
class DetectedLesion:
    """A lesion the segmenter found in the current study.

    ``box_kji`` is the bounding box of its voxels in the volume; ``spread`` its variation under test-time
    augmentation, when that was computed."""

    lesion_id: int
    organ: Organ
    centroid_lps_mm: tuple[float, float, float]
    measurement: Measurement
    probability: float
    voxel_count: int
    laterality: str | None = None
    box_kji: BoxKji | None = None
    spread: LesionSpread | None = None


@dataclass(frozen=True, slots=True)
class PriorFinding:
    """One lesion reported at a prior time point (from the EHR).

    ``track_id`` is the lesion's durable identity (mCODE Tumor BodyStructure identifier, DICOM
    Tracking UID). ``centroid_lps_mm`` is in the prior study's frame, when the EHR carries it.
    ``source`` is ``"measured"`` for image measurements, ``"text"`` when read from report prose.
    """

    track_id: str
    organ: Organ
    long_axis_mm: float
    short_axis_mm: float
    centroid_lps_mm: tuple[float, float, float] | None = None
    role: RecistRole | None = None
    source: str = "measured"
    laterality: str | None = None
    label: str = ""

    def recist_diameter_mm(self) -> float:
        return self.short_axis_mm if self.organ.is_nodal else self.long_axis_mm


@dataclass(frozen=True, slots=True)
class PriorTimePoint:
    """All findings of one prior study."""

    study_date: dt.date
    study_uid: str
    findings: tuple[PriorFinding, ...]
    report_text: str = ""
    report_id: str = ""
