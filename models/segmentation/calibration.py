"""Per-site recalibration of the segmenter, fitted on a handful of labelled studies of one scanner.

A scanner the model never saw differs from its training data mostly in noise and texture (reconstruction
kernel), a little in HU calibration, and the model's lesion decision shifts with them. A ``SiteCalibration``
undoes the first two on the input and re-centres the third on the output:

1. **HU offset**: the training cohort's median liver HU minus the site's (``models/weights/reference_intensity.json``
   holds the reference, measured on the training cohort by ``python -m models.segmentation.calibration reference``);
2. **noise harmonisation**: in-plane Gaussian smoothing, the smallest sigma that brings the site's liver noise
   (robust spread of the high-pass image) down to the training cohort's median (a sharp kernel made soft);
3. **lesion logit bias**: added to the lesion logit before the decision.

Each is applied only when it helps on the site's labelled studies: the input adjustments (none; the HU offset; the
offset and the noise harmonisation) are each combined with every bias (``choose``), and the fit keeps the combination
that finds the most lesions with at most ``max_fp_per_study`` false positives (or, where the model as trained makes
more, no more than it does), then the fewest false positives, then the smallest median diameter error (the bias moves
the lesion's edge: where detection ties, it fits the site's lesion size), then the smallest change. With nothing to
gain it keeps the model as trained (an identity calibration, still recorded).

``interval calibrate COHORT`` fits one per scanner (Manufacturer / ManufacturerModelName / StationName) found in
the labelled studies and writes it to ``INTERVAL_CALIBRATION_DIR``; ``CalibratedSegmenter`` applies it to every
study whose header names that scanner (station first, then any station of that manufacturer and model). The
model version is unchanged: a calibration is a site setting, logged with each study it is applied to.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from adapters.dicom_series import load_study
from adapters.settings import Settings
from core.errors import ModelError
from core.lesions import LesionFilter
from core.types import AcquisitionInfo, BoxKji, LabelId, Segmentation, Volume
from models.segmentation.inference import MonaiSegmenter, segmenter_from_settings, to_segmentation
from models.segmentation.validation import TARGETS, cohort_studies, score_study

__all__ = [
    "REFERENCE",
    "CalibratedSegmenter",
    "CalibrationRegistry",
    "SiteCalibration",
    "apply_intensity",
    "calibrated_segmenter",
    "choose",
    "fit_site",
    "intensity_stats",
]

log = logging.getLogger(__name__)

REFERENCE = Path(__file__).resolve().parent.parent / "weights" / "reference_intensity.json"
SIGMAS_MM = (0.0, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
BIASES = tuple(round(b, 2) for b in np.arange(-3.0, 3.01, 0.25))


@dataclass(frozen=True)
class SiteCalibration:
    manufacturer: str
    model_name: str
    station_name: str | None  # None: every station of this manufacturer and model
    hu_offset: float = 0.0
    smooth_sigma_mm: float = 0.0
    lesion_logit_bias: float = 0.0
    model_version: str = ""
    fitted: dict[str, Any] = field(default_factory=dict)  # studies, date, figures before and after

    @property
    def scanner(self) -> str:
        return f"{self.manufacturer} / {self.model_name} / {self.station_name or '*'}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SiteCalibration:
        try:
            return cls(
                manufacturer=str(d["manufacturer"]),
                model_name=str(d["model_name"]),
                station_name=None if d.get("station_name") is None else str(d["station_name"]),
                hu_offset=float(d["hu_offset"]),
                smooth_sigma_mm=float(d["smooth_sigma_mm"]),
                lesion_logit_bias=float(d["lesion_logit_bias"]),
                model_version=str(d.get("model_version", "")),
                fitted=dict(d.get("fitted") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"a site calibration lacks or mistypes {e}") from None


class CalibrationRegistry:
    """The calibrations of this deployment, looked up by scanner identity."""

    def __init__(self, calibrations: list[SiteCalibration]) -> None:
        self.calibrations = calibrations

    @classmethod
    def load(cls, folder: Path | None) -> CalibrationRegistry:
        if folder is None or not folder.is_dir():
            return cls([])
        found = []
        for path in sorted(folder.glob("*.json")):
            try:
                found.append(SiteCalibration.from_json(json.loads(path.read_text())))
            except (json.JSONDecodeError, ModelError) as e:
                raise ModelError(f"site calibration {path.name}: {e}") from None
        return cls(found)

    def lookup(self, acq: AcquisitionInfo | None, model_version: str) -> SiteCalibration | None:
        if acq is None:
            return None
        same = [
            c
            for c in self.calibrations
            if c.manufacturer == acq.manufacturer
            and c.model_name == acq.model_name
            and (not c.model_version or c.model_version == model_version)
        ]
        exact = [c for c in same if c.station_name == acq.station_name]
        anywhere = [c for c in same if c.station_name is None]
        return exact[0] if exact else (anywhere[0] if anywhere else None)


def calibrated_segmenter(
    settings: Settings, *, tta: bool = True, calibrated: bool = True
) -> CalibratedSegmenter:
    """The segmenter the settings choose (``segmenter_from_settings``) with the site calibrations of
    ``calibration_dir`` (none with ``calibrated=False``): the one the workers, ``validate`` and ``audit`` use."""
    return CalibratedSegmenter(
        segmenter_from_settings(settings, tta=tta),
        CalibrationRegistry.load(settings.calibration_dir if calibrated else None),
    )


def apply_intensity(volume: Volume, cal: SiteCalibration) -> Volume:
    """The volume with the calibration's HU offset and in-plane smoothing applied (a copy)."""
    hu = volume.voxels_hu.astype(np.float32) + np.float32(cal.hu_offset)
    if cal.smooth_sigma_mm > 0:
        _, sy, sx = volume.spacing_kji_mm
        hu = ndimage.gaussian_filter(hu, sigma=(0.0, cal.smooth_sigma_mm / sy, cal.smooth_sigma_mm / sx))
    return replace(volume, voxels_hu=hu)


class CalibratedSegmenter:
    """A ``MonaiSegmenter`` that applies the calibration of the study's scanner, when there is one."""

    def __init__(self, inner: MonaiSegmenter, registry: CalibrationRegistry) -> None:
        self.inner, self.registry = inner, registry
        self.applied: Counter[str] = Counter()  # studies per calibration (scanner), for logs and validation

    @property
    def model_version(self) -> str:
        return self.inner.model_version

    def segment(self, volume: Volume) -> Segmentation:
        cal = self.registry.lookup(volume.acquisition, self.inner.model_version)
        if cal is None:
            return self.inner.segment(volume)
        self.applied[cal.scanner] += 1
        log.info("site calibration for %s applied", cal.scanner)
        return self.inner.segment(apply_intensity(volume, cal), lesion_logit_bias=cal.lesion_logit_bias)

    @property
    def augmentations(self) -> tuple[str, ...]:
        return self.inner.augmentations

    def augmented_views(self, volume: Volume, boxes_kji: Sequence[BoxKji]) -> list[list[Segmentation]]:
        """Test-time augmentation on the same calibrated input the segmentation saw."""
        cal = self.registry.lookup(volume.acquisition, self.inner.model_version)
        return self.inner.augmented_views(apply_intensity(volume, cal) if cal else volume, boxes_kji)


def intensity_stats(volume: Volume, labels: np.ndarray) -> tuple[float, float]:
    """(median liver HU, liver noise HU): noise is the robust spread of the image minus its 1-voxel in-plane
    Gaussian, inside the liver eroded by two voxels (edges and vessels weigh little in a median)."""
    liver = ndimage.binary_erosion(labels == LabelId.LIVER, structure=np.ones((1, 5, 5), bool))
    if liver.sum() < 100:
        raise ModelError("too little liver in a calibration study to measure its intensity")
    hu = volume.voxels_hu.astype(np.float32)
    high = hu - ndimage.gaussian_filter(hu, sigma=(0.0, 1.0, 1.0))
    values = high[liver]
    spread = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    return float(np.median(hu[liver])), spread


def _load_labelled(cohort: Path) -> list[tuple[Volume, dict[str, Any], np.ndarray, np.ndarray]]:
    out = []
    for _, folder in cohort_studies(cohort):
        volume = load_study(folder / "dicom")
        with np.load(folder / "truth_labels.npz") as z:
            labels, instances = z["labels"], z["instances"]
        out.append((volume, json.loads((folder / "truth.json").read_text()), labels, instances))
    return out


def _score(
    probs: list[np.ndarray], studies: list[Any], bias: float, keep: LesionFilter
) -> tuple[int, int, float, float]:
    """(found, total, false positives per study, median absolute RECIST diameter error in mm over the lesions
    found and measured; 0 when none) with ``bias`` on the lesion logit."""
    found = total = fps = 0
    errors: list[float] = []
    for prob, (volume, truth, _, instances) in zip(probs, studies, strict=True):
        seg = to_segmentation(prob, volume.shape, bias)
        fp, _, _, records = score_study(volume, seg, truth, instances, keep)
        fps += fp
        found += sum(r.found for r in records)
        total += len(records)
        errors += [abs(r.measured_mm - r.diameter_mm) for r in records if r.measured_mm is not None]
    return found, total, fps / max(len(studies), 1), float(np.median(errors)) if errors else 0.0


Scored = tuple[int, float, SiteCalibration, tuple[int, int, float, float]]  # simplicity, bias, option, score


def choose(scored: Sequence[Scored], max_fp_per_study: float) -> Scored:
    """The calibration to keep of those tried (``(simplicity, bias, option, (found, total, FP per study, median
    diameter error))``, the model as trained among them at simplicity 0 and bias 0): the most lesions found with
    false positives within ``max_fp_per_study`` or no more than the model as trained makes, then the fewest false
    positives, then the closest diameters (to 0.1 mm: the bias moves the lesion's edge), then the smallest change."""
    identity = next(e for e in scored if e[0] == 0 and e[1] == 0.0)
    allowed_fp = max(max_fp_per_study, identity[3][2])

    def rank(entry: Scored) -> tuple[float, ...]:
        simplicity, bias, _, (found, _, fp, error) = entry
        return (found, -fp, -round(error, 1), -abs(bias), -simplicity)

    return max((e for e in scored if e[3][2] <= allowed_fp), key=rank)


def fit_site(
    studies: list[tuple[Volume, dict[str, Any], np.ndarray, np.ndarray]],
    segmenter: MonaiSegmenter,
    reference: dict[str, Any],
    keep: LesionFilter | None = None,
    max_fp_per_study: float = TARGETS["false_positives_per_study"],
) -> SiteCalibration:
    """Fit one scanner's calibration on its labelled studies (all from that scanner)."""
    keep = keep or LesionFilter()
    acq = studies[0][0].acquisition
    if acq is None:
        raise ModelError("calibration studies carry no scanner identity")
    stats = [intensity_stats(v, labels) for v, _, labels, _ in studies]
    offset = float(reference["liver_median_hu"]) - float(np.median([m for m, _ in stats]))
    target_noise = float(reference["liver_noise_hu"])
    sigma = SIGMAS_MM[-1]
    for candidate in SIGMAS_MM:
        trial = SiteCalibration(acq.manufacturer, acq.model_name, None, 0.0, candidate)
        noise = np.median([intensity_stats(apply_intensity(v, trial), lab)[1] for v, _, lab, _ in studies])
        if noise <= target_noise * 1.05:
            sigma = candidate
            break
    name = (acq.manufacturer, acq.model_name, None)
    # the input adjustments tried, simplest first: none, the HU offset, the offset and the noise harmonisation
    options = [
        SiteCalibration(*name),
        SiteCalibration(*name, hu_offset=round(offset, 1)),
        SiteCalibration(*name, hu_offset=round(offset, 1), smooth_sigma_mm=sigma),
    ]
    scored: list[Scored] = []
    for simplicity, option in enumerate(options):
        probs = [segmenter.probabilities(apply_intensity(v, option)) for v, _, _, _ in studies]
        scored += [(simplicity, bias, option, _score(probs, studies, bias, keep)) for bias in BIASES]
    before = next(score for simplicity, bias, _, score in scored if simplicity == 0 and bias == 0.0)
    _, bias, option, after = choose(scored, max_fp_per_study)
    chosen = replace(option, lesion_logit_bias=bias)
    stations = sorted({v.acquisition.station_name for v, _, _, _ in studies if v.acquisition})
    return replace(
        chosen,
        station_name=stations[0] if len(stations) == 1 else None,
        model_version=segmenter.model_version,
        fitted={
            "studies": len(studies),
            "date": dt.date.today().isoformat(),
            "reference": {k: reference[k] for k in ("liver_median_hu", "liver_noise_hu")},
            "site_liver_median_hu": round(float(np.median([m for m, _ in stats])), 1),
            "site_liver_noise_hu": round(float(np.median([n for _, n in stats])), 1),
            "noise_matched_sigma_mm": sigma,
            "before": _fit_figures(before),
            "after": _fit_figures(after),
        },
    )


def _fit_figures(score: tuple[int, int, float, float]) -> dict[str, Any]:
    found, total, fp, error = score
    return {
        "found": found,
        "total": total,
        "false_positives_per_study": round(fp, 3),
        "median_abs_diameter_error_mm": round(error, 2),
    }


def fit_cohort(
    cohort: Path, segmenter: MonaiSegmenter, reference_path: Path = REFERENCE, per_station: bool = False
) -> list[SiteCalibration]:
    """One calibration per scanner model (Manufacturer + ManufacturerModelName) in a labelled cohort, or per
    station with ``per_station``; a calibration fitted on one station names it, else it covers every station."""
    if not reference_path.is_file():
        raise ModelError(f"the reference intensity file {reference_path.name} is missing")
    reference = json.loads(reference_path.read_text())
    by_scanner: dict[tuple[str, str, str], list[Any]] = defaultdict(list)
    for study in _load_labelled(cohort):
        acq = study[0].acquisition
        key = (
            (acq.manufacturer, acq.model_name, acq.station_name if per_station else "")
            if acq
            else ("", "", "")
        )
        by_scanner[key].append(study)
    if not by_scanner:
        raise ModelError(f"no labelled study in {cohort}")
    return [fit_site(studies, segmenter, reference) for _, studies in sorted(by_scanner.items())]


def file_name(cal: SiteCalibration) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", cal.scanner).strip("-").lower() + ".json"


def reference_stats(cohort: Path) -> dict[str, Any]:
    """The training cohort's intensity reference (median over its studies)."""
    stats = []
    for _, folder in cohort_studies(cohort):
        with np.load(folder / "truth_labels.npz") as z:
            stats.append(intensity_stats(load_study(folder / "dicom"), z["labels"]))
    return {
        "liver_median_hu": round(float(np.median([m for m, _ in stats])), 1),
        "liver_noise_hu": round(float(np.median([n for _, n in stats])), 2),
        "studies": len(stats),
        "cohort": str(cohort),
    }


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Measure the intensity reference on the training cohort.")
    ap.add_argument("command", choices=["reference"])
    ap.add_argument("cohort", type=Path)
    ap.add_argument("--out", type=Path, default=REFERENCE)
    args = ap.parse_args()
    ref = reference_stats(args.cohort)
    args.out.write_text(json.dumps(ref, indent=1) + "\n")
    print(json.dumps(ref, indent=1))


if __name__ == "__main__":
    main()
