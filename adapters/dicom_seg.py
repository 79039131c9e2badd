"""The measured lesions as a DICOM Segmentation (highdicom): one segment per lesion, in the source study.

Each segment carries the lesion's label (Tracking ID) and its track UID (Tracking UID, the same in the
TID 1500 SR and in the mCODE Tumor BodyStructure identifier), the finding site, and the algorithm
(Interval, model version). The instance is a derived object of the analysed CT series: same study, new
series, frame of reference of the CT; contributing equipment names Interval (IHE AI Results).

A lesion's voxels are the connected component of the lesion label (26-connected, as ``core.lesions`` measures
it) that holds its centroid (the component nearest to it when the centroid falls outside, e.g. a ring-shaped
lesion). Disjoint lesions go to highdicom as one label map of segment numbers, not one full-volume plane stack
per lesion: on a 512x512x120 series with 7 lesions that is 31 MB instead of 220 MB, and the SEG took 0.9 s
instead of 4.2 s (``benchmarks/imaging``).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from scipy import ndimage

from adapters import fhir_codes as C
from adapters.dicom_sr import sr_tracking_uid
from core.errors import AnalysisError
from core.lesions import CONNECTIVITY, mask_box
from core.pipeline import StudyResult
from core.types import LabelId, lps_to_kji

__all__ = ["lesion_instances", "load_writer_tables", "write_lesion_seg"]

_NS = uuid.UUID("3f9a6c1e-0b7d-4e55-8c1a-2d4e6f8a9b10")
_MANUFACTURER = "Interval"


def load_writer_tables() -> None:
    """Load the tables of the DICOM standard that highdicom reads on its first SEG or SR of a process (which
    attributes each module and IOD holds: a 0.2 s JSON parse on the benchmark machine, cached for the process's
    life). A worker process calls this once at start, with its imports, so that its first study does not pay
    it; later calls cost nothing. The tables are the same either way: nothing written changes."""
    try:  # a private highdicom module (0.28): if a release moves it, the tables load on the first SEG as before
        from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map
    except ImportError:
        logging.getLogger(__name__).warning(
            "highdicom's standard tables could not be preloaded; loaded on use"
        )
        return
    get_module_attribute_map()
    get_iod_module_map()


def lesion_instances(result: StudyResult) -> dict[str, np.ndarray]:
    """track id -> boolean mask ([k, j, i]) of each detected lesion."""
    components, chosen = _track_components(result)
    out = {}
    for track_id, label in chosen.items():
        mask = np.zeros(components.shape, dtype=bool)
        mask[components.box] = components.inside == label
        out[track_id] = mask
    return out


@dataclass(frozen=True, slots=True)
class _Components:
    """The lesion label's connected components on a volume of ``shape``, labelled ``1..n`` inside ``box`` (the
    bounding box of all lesion voxels; 0 elsewhere), so that no full-volume label array is made."""

    shape: tuple[int, int, int]
    box: tuple[slice, ...]
    inside: np.ndarray
    n: int

    def at(self, k: int, j: int, i: int) -> int:
        """The component at voxel ``(k, j, i)`` (0: background or outside the volume)."""
        local = [v - s.start for v, s in zip((k, j, i), self.box, strict=True)]
        if all(0 <= v < n for v, n in zip(local, self.inside.shape, strict=True)):
            return int(self.inside[local[0], local[1], local[2]])
        return 0

    def centers(self) -> np.ndarray:
        """Centre ``(k, j, i)`` of components ``1..n``, each computed inside its bounding box only."""
        centers = np.full((self.n, 3), np.inf)
        origin = np.array([s.start for s in self.box], dtype=float)
        for index, box in enumerate(ndimage.find_objects(self.inside), start=1):
            if box is not None:
                offset = np.array([s.start for s in box], dtype=float) + origin
                centers[index - 1] = np.argwhere(self.inside[box] == index).mean(axis=0) + offset
        return centers


def _track_components(result: StudyResult) -> tuple[_Components, dict[str, int]]:
    """The lesion label's connected components (26-connected, as ``core.lesions.extract_lesions`` measures
    them) and, per detected track, the component that holds its centroid (else the nearest component)."""
    seg = result.segmentation
    if seg is None:
        raise AnalysisError("the result holds no segmentation; a SEG cannot be written")
    lesion = seg.labels == int(LabelId.LESION)
    shape = (int(lesion.shape[0]), int(lesion.shape[1]), int(lesion.shape[2]))
    box = mask_box(lesion)
    chosen: dict[str, int] = {}
    if box is None:
        return _Components(shape, tuple(slice(0, 0) for _ in shape), np.zeros((0, 0, 0), np.int32), 0), chosen
    inside, n = ndimage.label(lesion[box], structure=CONNECTIVITY, output=np.int32)
    components = _Components(shape, box, inside, int(n))
    centers: np.ndarray | None = None
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
        label = components.at(k, j, i)
        if label == 0:
            centers = components.centers() if centers is None else centers
            label = int(np.argmin(np.linalg.norm(centers - kji, axis=1))) + 1
        chosen[t.track_id] = label
    return components, chosen


def _segment_pixels(components: _Components, labels: list[int]) -> np.ndarray:
    """Segment ``n`` (1-based) is component ``labels[n - 1]``: a label map of segment numbers (``[k, j, i]``)
    when the segments are disjoint, else one binary plane stack per segment (``[k, j, i, n]``)."""
    if len(set(labels)) == len(labels) and len(labels) < 2**16:
        lut = np.zeros(components.n + 1, dtype=np.uint8 if len(labels) < 256 else np.uint16)
        lut[labels] = np.arange(1, len(labels) + 1)
        label_map = np.zeros(components.shape, dtype=lut.dtype)
        label_map[components.box] = lut[components.inside]
        return label_map
    planes = np.zeros((*components.shape, len(labels)), dtype=np.uint8)
    for n, label in enumerate(labels):
        planes[components.box][..., n] = components.inside == label
    return planes


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
    components, chosen = _track_components(result)
    tracked = [t for t in result.lesions if t.detected is not None and t.track_id in chosen]
    if not tracked:
        raise AnalysisError("no detected lesion: there is nothing to segment", study_uid=acq.study_uid)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="Interval lesion segmenter",
        family=codes.cid7162.ArtificialIntelligence,
        version=result.model_version,
    )
    descriptions = []
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
        pixel_array=_segment_pixels(components, [chosen[t.track_id] for t in tracked]),
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
