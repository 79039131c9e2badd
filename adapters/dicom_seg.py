"""The measured lesions as a DICOM Segmentation (highdicom): one segment per lesion, in the source study.

Each segment carries the lesion's label (Tracking ID) and its track UID (Tracking UID, the same in the
TID 1500 SR and in the mCODE Tumor BodyStructure identifier), the finding site, and the algorithm
(Interval, model version). The instance is a derived object of the analysed CT series: same study, new
series, frame of reference of the CT; contributing equipment names Interval (IHE AI Results).

A lesion's voxels are the connected component of the lesion label that holds its centroid (the
component nearest to it when the centroid falls outside, e.g. a ring-shaped lesion).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage

from adapters import fhir_codes as C
from adapters.dicom_sr import sr_tracking_uid
from core.errors import AnalysisError
from core.pipeline import StudyResult
from core.types import LabelId, lps_to_kji

__all__ = ["lesion_instances", "write_lesion_seg"]

_NS = uuid.UUID("3f9a6c1e-0b7d-4e55-8c1a-2d4e6f8a9b10")
_MANUFACTURER = "Interval"


def lesion_instances(result: StudyResult) -> dict[str, np.ndarray]:
    """track id -> boolean mask ([k, j, i]) of each detected lesion."""
    seg = result.segmentation
    if seg is None:
        raise AnalysisError("the result holds no segmentation; a SEG cannot be written")
    components, n = ndimage.label(seg.labels == int(LabelId.LESION))
    masks: dict[str, np.ndarray] = {}
    if n == 0:
        return masks
    index = np.arange(1, n + 1)
    centers = np.asarray(ndimage.center_of_mass(np.ones_like(components), components, index))
    for t in result.lesions:
        if t.detected is None:
            continue
        kji = lps_to_kji(
            np.asarray(t.detected.centroid_lps_mm, dtype=float)[None, :],
            result.spacing_kji_mm,
            result.origin_lps_mm,
            result.direction_lps,
        )[0]
        k, j, i = (int(np.rint(v)) for v in kji)
        inside = (
            0 <= k < components.shape[0] and 0 <= j < components.shape[1] and 0 <= i < components.shape[2]
        )
        label = int(components[k, j, i]) if inside else 0
        if label == 0:
            label = int(index[np.argmin(np.linalg.norm(centers - kji, axis=1))])
        masks[t.track_id] = components == label
    return masks


def write_lesion_seg(result: StudyResult, source_images: Sequence[Dataset], out_path: Path) -> Path:
    """Write the SEG; ``source_images`` are the analysed series' datasets (any order, headers suffice)."""
    acq = result.acquisition
    normal = np.asarray(result.direction_lps, dtype=float)[:, 2]
    ordered = sorted(source_images, key=lambda d: float(np.asarray(d.ImagePositionPatient, float) @ normal))
    if len(ordered) != result.volume_shape[0]:
        raise AnalysisError(
            f"{len(ordered)} source images for a volume of {result.volume_shape[0]} slices",
            study_uid=acq.study_uid,
        )
    masks = lesion_instances(result)
    tracked = [t for t in result.lesions if t.detected is not None and t.track_id in masks]
    if not tracked:
        raise AnalysisError("no detected lesion: there is nothing to segment", study_uid=acq.study_uid)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="Interval lesion segmenter",
        family=codes.cid7162.ArtificialIntelligence,
        version=result.model_version,
    )
    descriptions = []
    pixels = np.zeros((*result.volume_shape, len(tracked)), dtype=np.uint8)
    for n, t in enumerate(tracked, start=1):
        code, meaning = C.ORGAN_SNOMED[t.organ]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=n,
                segment_label=f"{t.label} {meaning}"[:64],
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Lesion,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=sr_tracking_uid(t.track_id),
                tracking_id=t.label,
                anatomic_regions=[hd.sr.CodedConcept(code, "SCT", meaning)],
            )
        )
        pixels[..., n - 1] = masks[t.track_id]
    equipment = hd.ContributingEquipment(
        manufacturer=_MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name="Interval",
        software_versions=result.model_version,
        contribution_datetime=dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0),
        contribution_description="lesion segmentation",
    )
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=f"2.25.{uuid.uuid5(_NS, acq.series_uid + '/seg-series').int}",
        series_number=9002,
        sop_instance_uid=f"2.25.{uuid.uuid5(_NS, acq.series_uid + '/seg/' + result.model_version).int}",
        instance_number=1,
        manufacturer=_MANUFACTURER,
        manufacturer_model_name="Interval",
        software_versions=result.model_version,
        device_serial_number="0",
        content_label="LESIONS",
        content_description="Lesions measured by Interval",
        contributing_equipment=[equipment],
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(out_path)
    return out_path
