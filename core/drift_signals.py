"""What the drift monitor watches: per study, numbers and header values that describe the input and the output.

Each analysed study yields one ``StudySignals``: where it came from (site and station: the *unit* that is
monitored), and values of the signals in ``CATALOGUE``:

- **header** (from DICOM tags): Manufacturer, model, ConvolutionKernel, kVp (categorical), pixel and slice
  spacing, SliceThickness (numeric);
- **image** (from the voxels and the model's organ labels): HU of body, fat, liver and lung, the SD inside
  the liver and a high-frequency noise estimate;
- **output** (from the result): lesion count and volume, confidence, the share of low-confidence lesions,
  sentences the grounding verifier replaced, and the share of findings a radiologist rejected (recorded
  later, when the review happens).

A signal that does not apply to a study (no lesion: no confidence) is absent, not zero. Nothing here names a
patient: a study is known by its StudyInstanceUID only.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from core.lesions import mask_box
from core.types import AcquisitionInfo, DetectedLesion, LabelId, Volume

if TYPE_CHECKING:
    from core.pipeline import StudyResult

__all__ = [
    "CATALOGUE",
    "LOW_CONFIDENCE",
    "SignalGroup",
    "SignalKind",
    "SignalSpec",
    "StudySignals",
    "Unit",
    "header_signals",
    "image_signals",
    "output_signals",
    "signals_of_result",
]

LOW_CONFIDENCE = 0.8  # the pipeline's own bar for calling a new lesion unequivocal


class SignalKind(enum.StrEnum):
    NUMERIC = "numeric"
    CATEGORICAL = "categorical"


class SignalGroup(enum.StrEnum):
    HEADER = "header"
    IMAGE = "image"
    OUTPUT = "output"


@dataclass(frozen=True, slots=True)
class SignalSpec:
    name: str
    kind: SignalKind
    group: SignalGroup
    description: str


_N, _C = SignalKind.NUMERIC, SignalKind.CATEGORICAL
_H, _I, _O = SignalGroup.HEADER, SignalGroup.IMAGE, SignalGroup.OUTPUT
CATALOGUE: dict[str, SignalSpec] = {
    s.name: s
    for s in (
        SignalSpec("manufacturer", _C, _H, "DICOM Manufacturer"),
        SignalSpec("model_name", _C, _H, "DICOM ManufacturerModelName"),
        SignalSpec("kernel", _C, _H, "DICOM ConvolutionKernel"),
        SignalSpec("kvp", _C, _H, "DICOM KVP (kV)"),
        SignalSpec("pixel_spacing_mm", _N, _H, "in-plane pixel spacing, mean of rows and columns (mm)"),
        SignalSpec("slice_spacing_mm", _N, _H, "distance between slices (mm)"),
        SignalSpec("slice_thickness_mm", _N, _H, "DICOM SliceThickness (mm)"),
        SignalSpec("body_hu_median", _N, _I, "median HU of the body (voxels above -500 HU, lungs excluded)"),
        SignalSpec("fat_hu_median", _N, _I, "median HU of fat (body voxels from -200 to -30 HU)"),
        SignalSpec("liver_hu_median", _N, _I, "median HU inside the eroded liver mask"),
        SignalSpec("liver_hu_sd", _N, _I, "SD of HU inside the eroded liver mask (noise and texture)"),
        SignalSpec(
            "noise_hu",
            _N,
            _I,
            "high-frequency noise: robust SD of the in-plane 3x3 residual in the liver (HU)",
        ),
        SignalSpec("lung_hu_median", _N, _I, "median HU inside the eroded lung mask"),
        SignalSpec("lesion_count", _N, _O, "lesions detected"),
        SignalSpec("lesion_volume_ml", _N, _O, "total volume of the detected lesions (ml)"),
        SignalSpec("lesion_confidence_mean", _N, _O, "mean lesion probability (studies with lesions)"),
        SignalSpec("low_confidence_fraction", _N, _O, "share of lesions under 0.8 probability"),
        SignalSpec("verifier_replacements", _N, _O, "sentences the grounding verifier replaced or added"),
        SignalSpec("rejected_fraction", _N, _O, "share of findings a radiologist rejected (after review)"),
    )
}


@dataclass(frozen=True, slots=True, order=True)
class Unit:
    """What is monitored: one scanner (DICOM StationName) at one site."""

    site: str
    station: str

    def __post_init__(self) -> None:
        if not self.site or not self.station:
            raise ValueError(
                f"a monitored unit needs a site and a station, got {self.site!r}/{self.station!r}"
            )

    def __str__(self) -> str:
        return f"{self.site}/{self.station}"


@dataclass(frozen=True, slots=True)
class StudySignals:
    """The signals of one study. ``numeric`` and ``categorical`` hold only names from ``CATALOGUE``."""

    study_uid: str
    unit: Unit
    scanner: str  # Manufacturer and model as the header says, for people reading an alert
    numeric: Mapping[str, float] = field(default_factory=dict)
    categorical: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.study_uid:
            raise ValueError("StudySignals needs the StudyInstanceUID")
        for name, value in self.numeric.items():
            spec = CATALOGUE.get(name)
            if spec is None or spec.kind is not SignalKind.NUMERIC:
                raise ValueError(f"{name!r} is not a numeric drift signal (see core.drift_signals.CATALOGUE)")
            if not math.isfinite(value):
                raise ValueError(f"signal {name} of study {self.study_uid} is not finite: {value!r}")
        for name in self.categorical:
            spec = CATALOGUE.get(name)
            if spec is None or spec.kind is not SignalKind.CATEGORICAL:
                raise ValueError(
                    f"{name!r} is not a categorical drift signal (see core.drift_signals.CATALOGUE)"
                )

    def value(self, name: str) -> float | str | None:
        return self.numeric.get(name, self.categorical.get(name))

    def with_values(self, **values: float | str | None) -> StudySignals:
        """A copy with some values replaced (None removes one)."""
        numeric, categorical = dict(self.numeric), dict(self.categorical)
        for name, value in values.items():
            target = numeric if CATALOGUE[name].kind is SignalKind.NUMERIC else categorical
            target.pop(name, None)
            if value is not None:
                target[name] = value  # type: ignore[assignment]
        return StudySignals(self.study_uid, self.unit, self.scanner, numeric, categorical)

    def to_json(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "site": self.unit.site,
            "station": self.unit.station,
            "scanner": self.scanner,
            "numeric": dict(self.numeric),
            "categorical": dict(self.categorical),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StudySignals:
        return cls(
            study_uid=str(data["study_uid"]),
            unit=Unit(str(data["site"]), str(data["station"])),
            scanner=str(data.get("scanner", "")),
            numeric={str(k): float(v) for k, v in (data.get("numeric") or {}).items()},
            categorical={str(k): str(v) for k, v in (data.get("categorical") or {}).items()},
        )


def header_signals(
    acquisition: AcquisitionInfo, spacing_kji_mm: tuple[float, float, float]
) -> tuple[dict[str, float], dict[str, str]]:
    """Numeric and categorical signals read from the header (empty tags are left out)."""
    numeric = {
        "pixel_spacing_mm": round((spacing_kji_mm[1] + spacing_kji_mm[2]) / 2.0, 4),
        "slice_spacing_mm": round(spacing_kji_mm[0], 4),
    }
    if acquisition.slice_thickness_mm is not None:
        numeric["slice_thickness_mm"] = float(acquisition.slice_thickness_mm)
    categorical = {
        "manufacturer": acquisition.manufacturer.strip(),
        "model_name": acquisition.model_name.strip(),
        "kernel": acquisition.kernel.strip(),
        "kvp": "" if acquisition.kvp is None else f"{acquisition.kvp:g}",
    }
    return numeric, {k: v for k, v in categorical.items() if v}


def image_signals(
    volume: Volume, labels: npt.NDArray[np.uint8], max_voxels: int = 400_000
) -> dict[str, float]:
    """HU and noise statistics from the voxels and the organ label map (``core.types.LabelId``).

    Organ statistics use masks eroded by two voxels in-plane (no partial volume at the edge). At most
    ``max_voxels`` voxels are sampled per statistic (a fixed stride: the result does not depend on chance).
    """
    hu = volume.voxels_hu
    if labels.shape != hu.shape:
        raise ValueError(f"labels of shape {labels.shape} do not fit a volume of shape {hu.shape}")
    out: dict[str, float] = {}
    # body and fat medians from every ``step``-th row and column: a sample of at least 4 x max_voxels voxels
    # (all of them up to ~1.6 M voxels, e.g. a 192 x 192 x 40 series), not two passes over a 512 series
    step = max(1, math.isqrt(hu.size // (4 * max_voxels)))
    hu_s, lab_s = hu[:, ::step, ::step], labels[:, ::step, ::step]
    body = (hu_s > -500.0) & (lab_s != LabelId.LUNG)
    if body.any():
        body_hu = hu_s[body]
        out["body_hu_median"] = _median(body_hu, max_voxels)
        fat = body_hu[(body_hu >= -200.0) & (body_hu <= -30.0)]
        if fat.size:
            out["fat_hu_median"] = _median(fat, max_voxels)
    boxes = _organ_boxes(lab_s, step, labels.shape)
    liver_box, liver = _eroded_in_box(labels, LabelId.LIVER, boxes)
    if np.count_nonzero(liver) >= 200:
        values = _sample(hu[liver_box][liver], max_voxels)
        out["liver_hu_median"] = float(np.median(values))
        out["liver_hu_sd"] = float(np.std(values))
        inner = mask_box(liver)
        assert inner is not None  # at least 200 voxels
        box = tuple(slice(o.start + i.start, o.start + i.stop) for o, i in zip(liver_box, inner, strict=True))
        local = ndimage.uniform_filter(hu[box].astype(np.float64), size=(1, 3, 3), mode="nearest")
        residual = _sample((hu[box] - local)[liver[inner]], max_voxels)
        # MAD -> SD for a Gaussian; the 3x3 mean removes 1/9 of white noise's variance
        mad = float(np.median(np.abs(residual - np.median(residual))))
        out["noise_hu"] = 1.4826 * mad * math.sqrt(9.0 / 8.0)
    lung_box, lung_core = _eroded_in_box(labels, LabelId.LUNG, boxes)
    if np.count_nonzero(lung_core) >= 200:
        out["lung_hu_median"] = _median(hu[lung_box][lung_core], max_voxels)
    return {k: round(v, 3) for k, v in out.items()}


def output_signals(
    lesions: Sequence[DetectedLesion],
    verifier_replacements: int | None,
    low_confidence: float = LOW_CONFIDENCE,
) -> dict[str, float]:
    """What the model and the drafter produced: counts, volume, confidence, replaced sentences."""
    out: dict[str, float] = {
        "lesion_count": float(len(lesions)),
        "lesion_volume_ml": round(sum(d.measurement.volume_ml for d in lesions), 3),
    }
    if lesions:
        probs = [d.probability for d in lesions]
        out["lesion_confidence_mean"] = round(float(np.mean(probs)), 4)
        out["low_confidence_fraction"] = round(sum(p < low_confidence for p in probs) / len(probs), 4)
    if verifier_replacements is not None:
        out["verifier_replacements"] = float(verifier_replacements)
    return out


def signals_of_result(result: StudyResult, unit: Unit) -> StudySignals:
    """The signals of an analysed study (``core.pipeline.StudyResult``, whose ``image_signals`` the
    pipeline computed while the volume was at hand)."""
    acq = result.acquisition
    numeric, categorical = header_signals(acq, result.spacing_kji_mm)
    numeric.update(result.image_signals)
    detected = [t.detected for t in result.lesions if t.detected is not None]
    numeric.update(output_signals(detected, len(result.draft.flagged) if result.draft is not None else None))
    scanner = (
        " ".join(p for p in (acq.manufacturer.strip(), acq.model_name.strip()) if p) or "unknown scanner"
    )
    return StudySignals(acq.study_uid, unit, scanner, numeric, categorical)


_INPLANE = np.ones((1, 5, 5), dtype=bool)  # erosion by two voxels in-plane


def _organ_boxes(
    sampled: npt.NDArray[np.uint8], step: int, shape: tuple[int, ...]
) -> list[tuple[slice, ...] | None]:
    """Each label's bounding box, found on the label map sampled every ``step``-th row and column and widened by
    ``step``: it holds every voxel that survives the in-plane erosion by two (such a voxel has a 5 x 5 block of its
    label around it, so a sampled voxel of the label within two rows and columns), with that voxel's block, so
    eroding inside it gives what eroding inside the exact box gives. One pass over a sixteenth of a 512 series."""
    out: list[tuple[slice, ...] | None] = []
    for found in ndimage.find_objects(sampled):
        if found is None:
            out.append(None)
            continue
        k, j, i = found
        out.append(
            (
                k,
                slice(max(j.start * step - step, 0), min((j.stop - 1) * step + 1 + step, shape[1])),
                slice(max(i.start * step - step, 0), min((i.stop - 1) * step + 1 + step, shape[2])),
            )
        )
    return out


def _eroded_in_box(
    labels: npt.NDArray[np.uint8], label: int, boxes: list[tuple[slice, ...] | None]
) -> tuple[tuple[slice, ...], npt.NDArray[np.bool_]]:
    """The voxels of ``label`` eroded by ``_INPLANE``, computed in the label's bounding box (``boxes`` from
    ``_organ_boxes``, widened by the structure's reach, so the result is the same as eroding the whole volume):
    the box and the eroded mask inside it."""
    found = boxes[label - 1] if label <= len(boxes) else None
    if found is None:
        return tuple(slice(0, 0) for _ in labels.shape), np.zeros((0,) * labels.ndim, dtype=bool)
    reach = (0, 2, 2)
    box = tuple(
        slice(max(s.start - r, 0), min(s.stop + r, n))
        for s, r, n in zip(found, reach, labels.shape, strict=True)
    )
    # binary erosion by the box (outside the array counts as background) is a minimum filter with 0 outside,
    # which scipy runs axis by axis: half the time of ``binary_erosion`` on a 512 series' lung
    inside = (labels[box] == label).view(np.uint8)
    eroded: npt.NDArray[np.bool_] = ndimage.minimum_filter(
        inside, size=_INPLANE.shape, mode="constant", cval=0
    ).view(np.bool_)
    return box, eroded


def _sample(values: npt.NDArray[np.float32], max_voxels: int) -> npt.NDArray[np.float32]:
    step = max(1, values.size // max_voxels)
    return values[::step]


def _median(values: npt.NDArray[np.float32], max_voxels: int) -> float:
    return float(np.median(_sample(values, max_voxels)))
