"""``PriorStore`` over an EHR's FHIR API: a patient's prior imaging findings in a constant number of requests.

After the Patient lookup (a read instead when the caller already has the Patient reference), four searches
run concurrently, each returning every matching row at once (``_count``) and following ``next`` links if
the EHR pages:

- ``DiagnosticReport?subject=..&category=radiology|imaging`` (R4 defines no search parameter from a
  DiagnosticReport to its ImagingStudy, so no ``_include`` for it:)
- ``ImagingStudy?subject=..``
- ``Observation?subject=..&code=LOINC|21889-1&_include=Observation:focus`` (mCODE TumorSize + Tumor
  BodyStructures, whose DICOM UID identifier is the lesion's track)
- ``Condition?subject=..`` (the cancer diagnoses, for context)

So the number of round trips does not grow with the number of prior studies. The rows are assembled into
one collection Bundle and read by ``adapters.fhir_priors.parse_priors_bundle``: the same validation (every
resource with ``fhir.resources``) and the same mapping as a Bundle file. A prior with report text only is
read from its text, and those findings are marked ``source="text"``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from adapters import fhir_codes as C
from adapters.fhir_client import FhirClient, RetryPolicy, SmartBackendAuth
from adapters.fhir_priors import check_patient, parse_priors_bundle
from core.errors import InputError
from core.types import PriorTimePoint

__all__ = ["EhrPriorStore", "EhrSnapshot", "PatientNotInEhrError", "fetch_snapshot"]

_PAGE = "1000"
_IMAGING_CATEGORIES = f"{C.LOINC}|{C.RADIOLOGY_CATEGORY},{C.V2_0074}|RAD"


class PatientNotInEhrError(InputError):
    reason = "patient_not_in_ehr"


@dataclass(frozen=True)
class EhrSnapshot:
    """What the EHR holds about one patient's imaging history, read at one moment."""

    patient_ref: str  # "Patient/<EHR id>"
    patient_id: str  # the identifier value Interval knows the patient by
    time_points: tuple[PriorTimePoint, ...]  # oldest first
    tracks: dict[str, str]  # lesion track UID -> "BodyStructure/<EHR id>"
    conditions: tuple[str, ...]  # display text of the patient's Conditions
    round_trips: int


async def find_patient(ehr: FhirClient, patient_id: str) -> dict[str, Any]:
    """The Patient resource with this identifier (system ``PATIENT_ID_SYSTEM``)."""
    rows = await ehr.search("Patient", {"identifier": f"{C.PATIENT_ID_SYSTEM}|{patient_id}"})
    found = {
        r["resource"].get("id"): r["resource"] for r in rows if r["resource"].get("resourceType") == "Patient"
    }
    if len(found) != 1:
        raise PatientNotInEhrError(
            f"the EHR holds {len(found)} patients with the study's patient identifier (expected exactly 1); "
            "check the patient's registration in the EHR"
        )
    patient: dict[str, Any] = found.popitem()[1]
    return patient


async def _read_patient(ehr: FhirClient, patient_ref: str) -> dict[str, Any]:
    resource, _ = await ehr.read("Patient", patient_ref.split("/", 1)[1])
    return resource


async def fetch_snapshot(ehr: FhirClient, patient_id: str, patient_ref: str | None = None) -> EhrSnapshot:
    start = ehr.round_trips
    if patient_ref is None:
        patient = await find_patient(ehr, patient_id)
        patient_ref = f"Patient/{patient['id']}"
        patient_task = asyncio.sleep(0, patient)
    else:
        patient_task = _read_patient(ehr, patient_ref)
    subject = {"subject": patient_ref, "_count": _PAGE}
    patient, reports, studies, observations, conditions = await asyncio.gather(
        patient_task,
        ehr.search("DiagnosticReport", {**subject, "category": _IMAGING_CATEGORIES}),
        ehr.search("ImagingStudy", subject),
        ehr.search(
            "Observation",
            {**subject, "code": f"{C.LOINC}|{C.TUMOR_SIZE}", "_include": "Observation:focus"},
        ),
        ehr.search("Condition", subject),
    )
    seen: dict[str, dict[str, Any]] = {}
    seen[patient_ref] = patient
    for row in [*reports, *studies, *observations, *conditions]:
        res = row["resource"]
        seen.setdefault(f"{res.get('resourceType')}/{res.get('id')}", res)
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": f"{ehr.base_url}/{key}", "resource": res} for key, res in seen.items()],
    }
    pid, time_points = parse_priors_bundle(bundle)
    check_patient(pid, patient_id)
    tracks: dict[str, str] = {}
    for key, res in seen.items():
        if res.get("resourceType") == "BodyStructure":
            for ident in res.get("identifier", []):
                if ident.get("system") == C.DICOM_UID and ident.get("value"):
                    tracks[str(ident["value"]).removeprefix("urn:oid:")] = key
    condition_text = tuple(
        str(res.get("code", {}).get("text") or _first_display(res.get("code", {})))
        for res in seen.values()
        if res.get("resourceType") == "Condition"
    )
    return EhrSnapshot(
        patient_ref=patient_ref,
        patient_id=pid,
        time_points=tuple(time_points),
        tracks=tracks,
        conditions=condition_text,
        round_trips=ehr.round_trips - start,
    )


def _first_display(concept: dict[str, Any]) -> str:
    return next((str(c.get("display")) for c in concept.get("coding", []) if c.get("display")), "")


@dataclass
class EhrPriorStore:
    """The pipeline's ``PriorStore`` port over FHIR HTTP. Keeps the last snapshot for the publisher."""

    base_url: str
    auth: SmartBackendAuth | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    patient_ref: str | None = None  # when the trigger (a FHIR Task) already names the Patient
    snapshot: EhrSnapshot | None = None

    async def fetch(self, patient_id: str) -> EhrSnapshot:
        async with FhirClient(self.base_url, auth=self.auth, retry=self.retry) as ehr:
            self.snapshot = await fetch_snapshot(ehr, patient_id, self.patient_ref)
        return self.snapshot

    def prior_time_points(self, patient_id: str, before: dt.date) -> list[PriorTimePoint]:
        snap = self.snapshot
        if snap is None or snap.patient_id != patient_id:
            snap = asyncio.run(self.fetch(patient_id))
        return [tp for tp in snap.time_points if tp.study_date < before]
