"""The measured lesions as a DICOM Comprehensive 3D SR (TID 1500 Measurement Report, highdicom).

One measurement group per lesion: Tracking Identifier (the label) and Tracking Unique Identifier
(the track's UID: the same across every time point, also the mCODE Tumor BodyStructure
identifier), finding site, the long axis as a 3D polyline in the study's frame of reference, long
and short axis (mm) and volume (ml), the time point, and the algorithm (model version).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from adapters import fhir_codes as C
from core.pipeline import StudyResult
from core.types import kji_to_lps

__all__ = ["sr_tracking_uid", "write_measurement_report"]

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_NS = uuid.UUID("8d0e3c52-6a3b-4c61-9d2e-5f1b7a9e0c44")
_VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume")
_CT_PROCEDURE = hd.sr.CodedConcept("25045-6", "LN", "CT unspecified body region")


def sr_tracking_uid(track_id: str) -> str:
    """The track id when it is a DICOM UID; otherwise (text-derived tracks) a UID derived from it."""
    if len(track_id) <= 64 and _UID.fullmatch(track_id):
        return track_id
    return f"2.25.{uuid.uuid5(_NS, track_id).int}"


def _laterality(side: str | None) -> hd.sr.CodedConcept | None:
    if side is None:
        return None
    code, meaning = C.LATERALITY_SNOMED[side]
    return hd.sr.CodedConcept(code, "SCT", meaning)


def write_measurement_report(
    result: StudyResult, evidence: Sequence[Dataset], out_path: Path, time_point_order: int | None = None
) -> Path:
    """Write the SR for ``result``; ``evidence`` are source image headers of the analyzed series."""
    acq = result.acquisition
    groups = []
    algorithm = hd.sr.AlgorithmIdentification(name="Interval lesion segmenter", version=result.model_version)
    time_point = hd.sr.TimePointContext(
        time_point=acq.study_date.isoformat(),
        time_point_type=hd.sr.CodedConcept("262068006", "SCT", "Baseline")
        if result.recist is None
        else hd.sr.CodedConcept("255235001", "SCT", "Follow-up"),
        time_point_order=time_point_order,
    )
    for t in result.lesions:
        if t.detected is None:
            continue
        m = t.detected.measurement
        ends = kji_to_lps(
            np.asarray(m.long_axis_endpoints_kji, dtype=float),
            result.spacing_kji_mm,
            result.origin_lps_mm,
            result.direction_lps,
        )
        code, meaning = C.ORGAN_SNOMED[t.organ]
        groups.append(
            hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=sr_tracking_uid(t.track_id), identifier=t.label
                ),
                referenced_region=hd.sr.ImageRegion3D(
                    graphic_type=hd.sr.GraphicTypeValues3D.POLYLINE,
                    graphic_data=ends.astype(np.float64),
                    frame_of_reference_uid=acq.frame_of_reference_uid,
                ),
                time_point_context=time_point,
                finding_type=codes.SCT.Lesion,
                algorithm_id=algorithm,
                finding_sites=[
                    hd.sr.FindingSite(hd.sr.CodedConcept(code, "SCT", meaning), _laterality(t.laterality))
                ],
                measurements=[
                    hd.sr.Measurement(codes.SCT.LongAxis, round(m.long_axis_mm, 1), codes.UCUM.Millimeter),
                    hd.sr.Measurement(codes.SCT.ShortAxis, round(m.short_axis_mm, 1), codes.UCUM.Millimeter),
                    hd.sr.Measurement(_VOLUME, round(m.volume_ml, 2), hd.sr.CodedConcept("ml", "UCUM", "ml")),
                ],
            )
        )
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=f"2.25.{uuid.uuid5(_NS, result.model_version).int}",
            name="Interval",
            model_name=result.model_version,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=_CT_PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report,
        series_instance_uid=f"2.25.{uuid.uuid5(_NS, acq.series_uid + '/sr-series').int}",
        series_number=9001,
        sop_instance_uid=f"2.25.{uuid.uuid5(_NS, acq.series_uid + '/sr/' + result.model_version).int}",
        instance_number=1,
        manufacturer="Interval",
        is_complete=True,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(out_path)
    return out_path
