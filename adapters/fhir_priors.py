"""Prior findings as the EHR holds them: FHIR R4 Bundle <-> ``PriorTimePoint``.

One Bundle per patient: Patient, ImagingStudy and DiagnosticReport per prior study, mCODE
TumorSize Observations (LOINC 21889-1 with components 33728-7 and 33729-5, ``focus`` -> the
Tumor BodyStructure, which carries the lesion's durable track id as a DICOM UID identifier).
Resources are validated with ``fhir.resources`` (R4B models, wire-compatible with R4 for these
resources); a Bundle that does not validate raises ``InvalidPriorsError`` naming the failing
element, never echoing its content (it may hold PHI).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError

from adapters import fhir_codes as C
from core.errors import InvalidPriorsError, PatientMismatchError
from core.text_priors import findings_from_text
from core.types import Organ, PriorFinding, PriorTimePoint

__all__ = [
    "check_patient",
    "load_priors",
    "parse_priors_bundle",
    "priors_to_bundle",
    "tumor_size",
    "tumor_structure",
]

_NS = uuid.UUID("6b1f8f0e-8f43-4f8e-9a55-3c1f3cf0a5d1")


def _urn(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NS, '/'.join(parts))}"


def _coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}]}


def priors_to_bundle(patient_id: str, time_points: Iterable[PriorTimePoint]) -> dict[str, Any]:
    """A ``collection`` Bundle of the given prior studies, as an EHR would return them."""
    pat_url = _urn("Patient", patient_id)
    entries: list[dict[str, Any]] = [
        {
            "fullUrl": pat_url,
            "resource": {
                "resourceType": "Patient",
                "id": str(uuid.uuid5(_NS, patient_id)),
                "identifier": [{"system": C.PATIENT_ID_SYSTEM, "value": patient_id}],
            },
        }
    ]
    tumors: dict[str, str] = {}
    for tp in time_points:
        date = tp.study_date.isoformat()
        is_url = _urn("ImagingStudy", tp.study_uid)
        entries.append(
            {
                "fullUrl": is_url,
                "resource": {
                    "resourceType": "ImagingStudy",
                    "status": "available",
                    "subject": {"reference": pat_url},
                    "started": date,
                    "identifier": [{"system": C.DICOM_UID, "value": f"urn:oid:{tp.study_uid}"}],
                    "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
                },
            }
        )
        obs_urls: list[str] = []
        for f in tp.findings:
            if f.track_id not in tumors:
                tumors[f.track_id] = _urn("BodyStructure", f.track_id)
                entries.append({"fullUrl": tumors[f.track_id], "resource": tumor_structure(f, pat_url)})
            obs_url = _urn("Observation", tp.study_uid, f.track_id)
            obs = tumor_size(f, pat_url, date, tumors[f.track_id], is_url)
            entries.append({"fullUrl": obs_url, "resource": obs})
            obs_urls.append(obs_url)
        report: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "status": "final",
            "category": [_coding(C.LOINC, C.RADIOLOGY_CATEGORY, "Radiology")],
            "code": _coding(C.LOINC, C.RADIOLOGY_REPORT, "Radiology Study observation (narrative)"),
            "subject": {"reference": pat_url},
            "effectiveDateTime": date,
            "imagingStudy": [{"reference": is_url}],
            "result": [{"reference": u} for u in obs_urls],
        }
        if tp.report_text:
            report["presentedForm"] = [
                {
                    "contentType": "text/plain; charset=utf-8",
                    "data": base64.b64encode(tp.report_text.encode()).decode(),
                }
            ]
        entries.append({"fullUrl": _urn("DiagnosticReport", tp.study_uid), "resource": report})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def tumor_structure(f: PriorFinding, patient_ref: str) -> dict[str, Any]:
    """mCODE Tumor BodyStructure of a lesion track; its DICOM UID identifier is the track UID."""
    code, display = C.ORGAN_SNOMED[f.organ]
    bs: dict[str, Any] = {
        "resourceType": "BodyStructure",
        "meta": {"profile": [C.PROFILE_TUMOR]},
        "identifier": [{"system": C.DICOM_UID, "value": f"urn:oid:{f.track_id}"}],
        "location": _coding(C.SNOMED, code, display),
        "patient": {"reference": patient_ref},
        "morphology": _coding(
            C.SNOMED, "367651003", "Malignant neoplasm of primary, secondary, or uncertain origin"
        ),
    }
    if f.label:
        bs["identifier"].append({"system": C.LABEL_SYSTEM, "value": f.label})
    if f.laterality:
        lc, ld = C.LATERALITY_SNOMED[f.laterality]
        bs["locationQualifier"] = [_coding(C.SNOMED, lc, ld)]
    return bs


def tumor_size(
    f: PriorFinding, patient_ref: str, date: str, focus_ref: str, study_ref: str
) -> dict[str, Any]:
    """mCODE TumorSize Observation (LOINC 21889-1; longest and other dimension in mm)."""
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "meta": {"profile": [C.PROFILE_TUMOR_SIZE]},
        "status": "final",
        "category": [_coding(C.OBS_CATEGORY, "imaging", "Imaging")],
        "code": _coding(C.LOINC, C.TUMOR_SIZE, "Size Tumor"),
        "subject": {"reference": patient_ref},
        "effectiveDateTime": date,
        "focus": [{"reference": focus_ref}],
        "derivedFrom": [{"reference": study_ref}],
        "component": [
            {
                "code": _coding(C.LOINC, C.LONGEST_DIM, "Size.maximum dimension in Tumor"),
                "valueQuantity": _mm(f.long_axis_mm),
            },
            {
                "code": _coding(C.LOINC, C.OTHER_DIM, "Size additional dimension in Tumor"),
                "valueQuantity": _mm(f.short_axis_mm),
            },
        ],
    }
    ext: list[dict[str, Any]] = []
    if f.centroid_lps_mm is not None:
        ext.append(
            {
                "url": C.EXT_CENTROID,
                "extension": [
                    {"url": axis, "valueDecimal": round(v, 1)}
                    for axis, v in zip("xyz", f.centroid_lps_mm, strict=True)
                ],
            }
        )
    if f.role is not None:
        ext.append({"url": C.EXT_ROLE, "valueCode": f.role.value})
    if ext:
        obs["extension"] = ext
    return obs


def _mm(v: float) -> dict[str, Any]:
    return {"value": round(float(v), 1), "unit": "mm", "system": C.UCUM, "code": "mm"}


def load_priors(path: Path, patient_id: str | None = None) -> tuple[str, list[PriorTimePoint]]:
    """Read and validate a priors Bundle file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidPriorsError(f"priors file {path.name!r} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidPriorsError(
            f"priors file {path.name!r} is not JSON ({type(e).__name__} at position "
            f"{getattr(e, 'pos', '?')}); expected a FHIR R4 Bundle"
        ) from None
    return parse_priors_bundle(raw, patient_id)


def _validation_summary(e: ValidationError) -> str:
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{loc or 'Bundle'}: {first.get('type', 'invalid')}{more}"


def parse_priors_bundle(raw: Any, patient_id: str | None = None) -> tuple[str, list[PriorTimePoint]]:
    """Validate a FHIR Bundle (dict) and return (patient id, prior time points, oldest first).

    When ``patient_id`` is given, a Bundle about anyone else raises ``PatientMismatchError``.
    """
    if not isinstance(raw, dict) or raw.get("resourceType") != "Bundle":
        got = raw.get("resourceType") if isinstance(raw, dict) else type(raw).__name__
        raise InvalidPriorsError(f"priors must be a FHIR Bundle, got {got!r}")
    try:
        bundle = Bundle.model_validate(raw)
    except ValidationError as e:
        raise InvalidPriorsError(
            f"priors Bundle does not validate as FHIR R4: {_validation_summary(e)}"
        ) from None
    _check_required_codes(bundle)
    by_ref: dict[str, Any] = {}
    for entry in bundle.entry or []:
        res = entry.resource
        if res is None:
            continue
        if entry.fullUrl:
            by_ref[str(entry.fullUrl)] = res
        if getattr(res, "id", None):
            by_ref[f"{res.get_resource_type()}/{res.id}"] = res
    resources: list[Any] = [e.resource for e in bundle.entry or [] if e.resource is not None]
    patients = [r for r in resources if r.get_resource_type() == "Patient"]
    if len(patients) != 1:
        raise InvalidPriorsError(f"priors Bundle must hold exactly one Patient, found {len(patients)}")
    patient: Any = patients[0]
    pid = next((str(i.value) for i in patient.identifier or [] if i.value), patient.id or "")
    if patient_id is not None:
        check_patient(pid, patient_id)
    tps: list[PriorTimePoint] = []
    for rep in (r for r in resources if r.get_resource_type() == "DiagnosticReport"):
        if rep.status in _USABLE_STATUS:  # cancelled / entered-in-error reports are not priors
            tps.append(_time_point(rep, by_ref))
    tps.sort(key=lambda t: t.study_date)
    return pid, tps


# Required bindings that fhir.resources does not enforce (it checks datatypes, not value sets).
REQUIRED_STATUS = {
    "Observation": {
        "registered",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "cancelled",
        "entered-in-error",
        "unknown",
    },
    "DiagnosticReport": {
        "registered",
        "partial",
        "preliminary",
        "final",
        "amended",
        "corrected",
        "appended",
        "cancelled",
        "entered-in-error",
        "unknown",
    },
    "ImagingStudy": {"registered", "available", "cancelled", "entered-in-error", "unknown"},
}
_USABLE_STATUS = {"final", "amended", "corrected", "appended", "preliminary"}


def _check_required_codes(bundle: Bundle) -> None:
    for n, entry in enumerate(bundle.entry or []):
        res = entry.resource
        if res is None:
            continue
        res_any: Any = res
        allowed = REQUIRED_STATUS.get(res.get_resource_type())
        if allowed is not None and getattr(res_any, "status", None) not in allowed:
            raise InvalidPriorsError(
                f"priors Bundle does not validate as FHIR R4: entry[{n}] {res.get_resource_type()}.status "
                "is not a code of its required value set"
            )


def when_key(value: Any) -> str:
    return str(value)[:10]


def check_patient(bundle_patient_id: str, study_patient_id: str) -> None:
    """Refuse priors about anyone but the study's patient (the message names no identifier)."""
    if bundle_patient_id != study_patient_id:
        raise PatientMismatchError(
            "priors Bundle is about a different patient than the study (patient identifiers differ); "
            "check that the right priors file was given"
        )


def _date_of(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value)[:10])


def _time_point(rep: Any, by_ref: dict[str, Any]) -> PriorTimePoint:
    when = rep.effectiveDateTime or (rep.effectivePeriod.start if rep.effectivePeriod else None) or rep.issued
    if when is None:
        raise InvalidPriorsError("a prior DiagnosticReport has no effective date; cannot order the priors")
    study_uid = ""
    for ref in rep.imagingStudy or []:
        study = by_ref.get(str(ref.reference))
        for ident in (study.identifier or []) if study is not None else []:
            if ident.system == C.DICOM_UID and ident.value:
                study_uid = str(ident.value).removeprefix("urn:oid:")
    findings: list[PriorFinding] = []
    for ref in rep.result or []:
        obs = by_ref.get(str(ref.reference))
        if obs is None or obs.get_resource_type() != "Observation" or obs.status not in _USABLE_STATUS:
            continue
        finding = _finding(obs, by_ref)
        if finding is not None:
            findings.append(finding)
    text = ""
    for att in rep.presentedForm or []:
        if att.data:  # fhir.resources decodes base64Binary to bytes on validation
            raw = att.data if isinstance(att.data, bytes) else base64.b64decode(att.data)
            text = raw.decode("utf-8", errors="replace")
            break
    if not text and rep.conclusion:
        text = str(rep.conclusion)
    if not findings and text:  # a report with prose only: read the measurements from it
        findings = list(findings_from_text(text, rep.id or when_key(when)))
    return PriorTimePoint(
        _date_of(when), study_uid, tuple(findings), report_text=text, report_id=rep.id or ""
    )


def _code_of(concept: Any, system: str) -> str | None:
    for coding in (concept.coding or []) if concept is not None else []:
        if coding.system == system:
            return str(coding.code)
    return None


def _finding(obs: Any, by_ref: dict[str, Any]) -> PriorFinding | None:
    if _code_of(obs.code, C.LOINC) != C.TUMOR_SIZE:
        return None
    long_mm = short_mm = None
    for comp in obs.component or []:
        code = _code_of(comp.code, C.LOINC)
        q = comp.valueQuantity
        if q is None or q.value is None:
            continue
        value = float(q.value) * {"mm": 1.0, "cm": 10.0}.get(str(q.code or q.unit or "mm"), float("nan"))
        if value != value:
            raise InvalidPriorsError(
                f"TumorSize component {code} has unit {q.code or q.unit!r}; expected mm or cm"
            )
        if code == C.LONGEST_DIM:
            long_mm = value
        elif code == C.OTHER_DIM:
            short_mm = value
    if long_mm is None:
        raise InvalidPriorsError("a TumorSize Observation has no longest-dimension component (LOINC 33728-7)")
    focus = next((by_ref.get(str(f.reference)) for f in obs.focus or []), None)
    if focus is None or focus.get_resource_type() != "BodyStructure":
        raise InvalidPriorsError("a TumorSize Observation has no focus BodyStructure in the Bundle")
    track_id = label = ""
    for ident in focus.identifier or []:
        if ident.system == C.DICOM_UID:
            track_id = str(ident.value).removeprefix("urn:oid:")
        elif ident.system == C.LABEL_SYSTEM:
            label = str(ident.value)
    if not track_id:
        track_id = focus.id or str(obs.focus[0].reference)
    organ = C.SNOMED_ORGAN.get(_code_of(focus.location, C.SNOMED) or "", Organ.OTHER)
    side = next(
        (C.SNOMED_LATERALITY.get(_code_of(q, C.SNOMED) or "") for q in focus.locationQualifier or []), None
    )
    centroid = None
    role = None
    for ext in obs.extension or []:
        if ext.url == C.EXT_CENTROID:
            parts = {e.url: float(e.valueDecimal) for e in ext.extension or [] if e.valueDecimal is not None}
            if set(parts) == {"x", "y", "z"}:
                centroid = (parts["x"], parts["y"], parts["z"])
        elif ext.url == C.EXT_ROLE and ext.valueCode in C.ROLE_CODES:
            role = C.ROLE_CODES[str(ext.valueCode)]
    return PriorFinding(
        track_id=track_id,
        organ=organ,
        long_axis_mm=long_mm,
        short_axis_mm=short_mm if short_mm is not None else 0.0,
        centroid_lps_mm=centroid,
        role=role,
        laterality=side,
        label=label,
    )
