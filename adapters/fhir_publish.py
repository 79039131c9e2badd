"""A finished analysis as FHIR R4 for the EHR: one transaction Bundle; then sign (``final``) and amend.

The transaction holds, for one study:

- ``Device``: the model that produced the content (name + version), created once per version;
- ``ImagingStudy``: the analysed study (conditional create on its StudyInstanceUID);
- ``BodyStructure`` (mCODE Tumor) per lesion track: tracks the EHR already holds are referenced, new ones
  are created conditionally on their track UID, so a second follow-up links to the same BodyStructures;
- ``Observation`` (mCODE TumorSize) per measured lesion, and one mCODE-style disease status Observation
  (LOINC 97509-4) carrying the RECIST 1.1 category and its rule trace;
- ``DiagnosticReport``: category radiology/imaging, status ``preliminary``, ``meta.security`` AIAST
  (AI-asserted content), ``conclusion`` + ``presentedForm``, ``imagingStudy``, ``result``;
- ``Provenance``: the Device as author/assembler of every resource above.

The site that acquired the study travels on the ImagingStudy and the DiagnosticReport as the extension
``SITE_EXTENSION`` (valueString): by default the DICOM StationName (the acquisition facts carry no
InstitutionName yet); the web pages map it to a site name and let only that site's users read the report.

Every resource Interval creates carries an identifier derived from (study, model version, track), and is
created with ``ifNoneExist``: publishing the same analysis twice does not duplicate anything.

When the study's site has AI switched off, the analysis publishes nothing: ``ai_not_used_bundle`` holds the
ImagingStudy only, for Interval's own store, tagged ``AI_OUTCOME_SYSTEM|ai-not-used``.

Signing (``sign_report``) updates the report with ``If-Match`` to ``final`` (``amended`` when it was final
already) with the radiologist as ``resultsInterpreter`` and adds a Provenance naming the radiologist.
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapters import fhir_codes as C
from adapters.fhir_client import FhirClient
from adapters.fhir_priors import tumor_size, tumor_structure
from adapters.report_json import result_to_time_point
from core.errors import ExternalRequestError
from core.oversight import AiDecision
from core.pipeline import StudyResult
from core.recist import Response
from core.report import ReportText
from core.types import AcquisitionInfo

__all__ = [
    "AIAST",
    "AI_NOT_USED",
    "AI_OUTCOME_SYSTEM",
    "EHR_REPORT_SYSTEM",
    "MODEL_ID_SYSTEM",
    "OBSERVATION_ID_SYSTEM",
    "SITE_EXTENSION",
    "PublishedReport",
    "ai_not_used_bundle",
    "model_device",
    "model_device_entry",
    "publish_report",
    "report_bundle",
    "report_identifier",
    "sign_report",
]

_NS = uuid.UUID("0d7c9a52-5e0b-4b5e-9a3c-8f2a54a1c0de")
AIAST = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
_DATA_OP = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
_DISEASE_STATUS = "97509-4"  # Cancer disease progression (mCODE CancerDiseaseStatus)
# mCODE ConditionStatusTrendVS, per RECIST category
_STATUS_SNOMED: dict[Response, tuple[str, str]] = {
    Response.CR: ("260415000", "Not detected (qualifier)"),
    Response.PR: ("268910001", "Patient's condition improved (finding)"),
    Response.SD: ("359746009", "Patient's condition stable (finding)"),
    Response.NON_CR_NON_PD: ("359746009", "Patient's condition stable (finding)"),
    Response.PD: ("271299001", "Patient's condition worsened (finding)"),
    Response.NE: ("709137006", "Patient condition undetermined (situation)"),
}
REPORT_ID_SYSTEM = "http://interval.local/fhir/report-id"
OBSERVATION_ID_SYSTEM = "http://interval.local/fhir/observation-id"
MODEL_ID_SYSTEM = "http://interval.local/fhir/model"
# on Interval's copy of a report: where the EHR holds the published one (base URL + "/DiagnosticReport/<id>")
EHR_REPORT_SYSTEM = "http://interval.local/fhir/ehr-report"
SITE_EXTENSION = "http://interval.local/fhir/StructureDefinition/acquisition-site"
# Task.businessStatus (and the analysis Bundle's tag) when a study's site has AI switched off
AI_OUTCOME_SYSTEM = "http://interval.local/fhir/CodeSystem/ai-outcome"
AI_NOT_USED = "ai-not-used"


def _urn(*parts: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_NS, '/'.join(parts))}"


def _cc(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}]}


def report_identifier(study_uid: str, model_version: str) -> str:
    """The report's durable identifier: one per study and model version (the idempotency key)."""
    return str(uuid.uuid5(_NS, f"report/{study_uid}/{model_version}"))


def _conditional(full_url: str, resource: dict[str, Any], system: str, value: str) -> dict[str, Any]:
    return {
        "fullUrl": full_url,
        "resource": resource,
        "request": {
            "method": "POST",
            "url": resource["resourceType"],
            "ifNoneExist": f"identifier={system}|{value}",
        },
    }


def model_device(model_version: str) -> dict[str, Any]:
    """The model as a FHIR ``Device``: one per model version, found by ``MODEL_ID_SYSTEM|<version>``."""
    return {
        "resourceType": "Device",
        "identifier": [{"system": MODEL_ID_SYSTEM, "value": model_version}],
        "deviceName": [{"name": "Interval lesion segmentation and RECIST", "type": "model-name"}],
        "version": [{"value": model_version}],
        "type": _cc(C.SNOMED, "706689003", "Application program software"),
    }


def model_device_entry(full_url: str, model_version: str) -> dict[str, Any]:
    """The transaction entry that creates the model's Device unless one with its version exists."""
    return _conditional(full_url, model_device(model_version), MODEL_ID_SYSTEM, model_version)


def report_bundle(
    result: StudyResult,
    *,
    patient_ref: str,
    tracks: Mapping[str, str],
    issued: dt.datetime,
    text: ReportText | None = None,
    site: str | None = None,
) -> dict[str, Any]:
    """The transaction Bundle that publishes ``result`` (status ``preliminary``); ``site`` (default: the
    study's StationName) is recorded on the ImagingStudy and the report as ``SITE_EXTENSION``."""
    acq = result.acquisition
    site = site if site is not None else acq.station_name
    site_ext = [{"url": SITE_EXTENSION, "valueString": site}] if site else []
    version = result.model_version
    date = acq.study_date.isoformat()
    security = {"security": [AIAST]}
    entries: list[dict[str, Any]] = []

    device_url = _urn("Device", version)
    entries.append(model_device_entry(device_url, version))

    study_url = _urn("ImagingStudy", acq.study_uid)
    entries.append(_study_entry(study_url, acq, {"reference": patient_ref}, site_ext))

    current = result_to_time_point(result)
    focus: dict[str, str] = {}
    created: list[str] = []
    for f in current.findings:
        if f.track_id in tracks:
            focus[f.track_id] = tracks[f.track_id]
            continue
        url = _urn("BodyStructure", f.track_id)
        focus[f.track_id] = url
        entries.append(
            _conditional(url, tumor_structure(f, patient_ref), C.DICOM_UID, f"urn:oid:{f.track_id}")
        )
        created.append(url)

    results: list[str] = []
    for f in current.findings:
        url = _urn("Observation", acq.study_uid, version, f.track_id)
        obs = tumor_size(f, patient_ref, date, focus[f.track_id], study_url)
        obs_id = f"{acq.study_uid}/{version}/{f.track_id}"
        obs["meta"] = {**obs["meta"], **security}
        obs["status"] = "preliminary"
        obs["identifier"] = [{"system": OBSERVATION_ID_SYSTEM, "value": obs_id}]
        entries.append(_conditional(url, obs, OBSERVATION_ID_SYSTEM, obs_id))
        results.append(url)

    if result.recist is not None:
        r = result.recist
        code, display = _STATUS_SNOMED[r.category]
        url = _urn("Observation", acq.study_uid, version, "recist")
        obs_id = f"{acq.study_uid}/{version}/recist"
        status_obs: dict[str, Any] = {
            "resourceType": "Observation",
            "meta": security,
            "identifier": [{"system": OBSERVATION_ID_SYSTEM, "value": obs_id}],
            "status": "preliminary",
            "category": [_cc(C.OBS_CATEGORY, "imaging", "Imaging")],
            "code": _cc(C.LOINC, _DISEASE_STATUS, "Cancer disease progression"),
            "subject": {"reference": patient_ref},
            "effectiveDateTime": date,
            "valueCodeableConcept": {
                **_cc(C.SNOMED, code, display),
                "text": f"RECIST 1.1: {r.category.value}",
            },
            "method": {"text": "RECIST 1.1"},
            "derivedFrom": [{"reference": study_url}, *({"reference": u} for u in results)],
            "note": [{"text": line} for line in r.trace],
        }
        entries.append(_conditional(url, status_obs, OBSERVATION_ID_SYSTEM, obs_id))
        results.append(url)

    words = text or result.report
    report_id = report_identifier(acq.study_uid, version)
    report_url = _urn("DiagnosticReport", report_id)
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "meta": security,
        **({"extension": site_ext} if site_ext else {}),
        "identifier": [{"system": REPORT_ID_SYSTEM, "value": report_id}],
        "status": "preliminary",
        "category": [
            _cc(C.LOINC, C.RADIOLOGY_CATEGORY, "Radiology"),
            _cc(C.V2_0074, "RAD", "Radiology"),
        ],
        "code": _cc(C.LOINC, C.RADIOLOGY_REPORT, "Radiology Study observation (narrative)"),
        "subject": {"reference": patient_ref},
        "effectiveDateTime": date,
        "issued": issued.isoformat(),
        "imagingStudy": [{"reference": study_url}],
        "result": [{"reference": u} for u in results],
        "conclusion": words.impression,
        "presentedForm": [_text_attachment(words.as_text(), issued)],
    }
    if result.recist is not None:
        code, display = _STATUS_SNOMED[result.recist.category]
        report["conclusionCode"] = [_cc(C.SNOMED, code, display)]
    entries.append(_conditional(report_url, report, REPORT_ID_SYSTEM, report_id))

    prov_id = f"{report_id}/created"
    provenance = {
        "resourceType": "Provenance",
        "target": [{"reference": u} for u in [report_url, *results, *created]],
        "recorded": issued.isoformat(),
        "activity": _cc(_DATA_OP, "CREATE", "create"),
        "agent": [
            {
                "type": _cc(_PARTICIPANT, "assembler", "Assembler"),
                "who": {"reference": device_url, "display": f"Interval model {version}"},
            }
        ],
        "entity": [{"role": "source", "what": {"reference": study_url}}],
    }
    entries.append(
        {
            "fullUrl": _urn("Provenance", prov_id),
            "resource": provenance,
            "request": {"method": "POST", "url": "Provenance"},
        }
    )
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _study_entry(
    url: str, acq: AcquisitionInfo, subject: dict[str, Any], site_ext: list[dict[str, Any]]
) -> dict[str, Any]:
    """The ImagingStudy, created conditionally on its StudyInstanceUID, with the acquisition site."""
    dcm = "http://dicom.nema.org/resources/ontology/DCM"
    study = {
        "resourceType": "ImagingStudy",
        **({"extension": site_ext} if site_ext else {}),
        "identifier": [{"system": C.DICOM_UID, "value": f"urn:oid:{acq.study_uid}"}],
        "status": "available",
        "subject": subject,
        "started": acq.study_date.isoformat(),
        "modality": [{"system": dcm, "code": "CT"}],
        "series": [{"uid": acq.series_uid, "modality": {"system": dcm, "code": "CT"}}],
    }
    return _conditional(url, study, C.DICOM_UID, f"urn:oid:{acq.study_uid}")


def ai_not_used_bundle(acq: AcquisitionInfo, subject: dict[str, Any], decision: AiDecision) -> dict[str, Any]:
    """What an analysis stores when the study's site has AI switched off: the ImagingStudy (with its site) and
    no DiagnosticReport, in a transaction Bundle tagged ``AI_OUTCOME_SYSTEM|ai-not-used`` whose tag display
    says why (``service.jobs.complete_task`` completes the Task with that state). ``subject`` is the Task's
    patient (a reference, or an identifier when the Task named none)."""
    site_ext = [{"url": SITE_EXTENSION, "valueString": acq.station_name}] if acq.station_name else []
    entry = _study_entry(_urn("ImagingStudy", acq.study_uid), acq, subject, site_ext)
    tag = {"system": AI_OUTCOME_SYSTEM, "code": AI_NOT_USED, "display": decision.explanation()}
    return {"resourceType": "Bundle", "type": "transaction", "meta": {"tag": [tag]}, "entry": [entry]}


def _text_attachment(text: str, when: dt.datetime) -> dict[str, Any]:
    return {
        "contentType": "text/plain; charset=utf-8",
        "language": "en",
        "data": base64.b64encode(text.encode()).decode(),
        "title": "Radiology report",
        "creation": when.isoformat(),
    }


@dataclass(frozen=True)
class PublishedReport:
    report_ref: str  # "DiagnosticReport/<EHR id>"
    locations: dict[str, str]  # fullUrl in the Bundle -> "Type/id" at the EHR
    already_published: bool = False


async def publish_report(ehr: FhirClient, bundle: dict[str, Any]) -> PublishedReport:
    """Publish ``report_bundle``'s transaction; map every fullUrl to the EHR's ``Type/id``.

    Idempotent: when the EHR already holds this report (its identifier), nothing is written again.
    """
    report = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport")
    ident = report["resource"]["identifier"][0]
    found = await ehr.search("DiagnosticReport", {"identifier": f"{ident['system']}|{ident['value']}"})
    if found:
        ref = f"DiagnosticReport/{found[0]['resource']['id']}"
        return PublishedReport(ref, {report["fullUrl"]: ref}, already_published=True)
    response, existing = await ehr.conditional_transaction(bundle)
    locations: dict[str, str] = dict(existing)
    report_ref = ""
    for req, resp in zip(bundle["entry"], response.get("entry", []), strict=True):
        found_ref = locations.get(req["fullUrl"]) or _location(resp)
        if found_ref is None:
            continue
        ref = locations[req["fullUrl"]] = found_ref
        if req["resource"]["resourceType"] == "DiagnosticReport":
            report_ref = ref
    if not report_ref:
        raise ExternalRequestError("the EHR's transaction response does not locate the DiagnosticReport")
    return PublishedReport(report_ref, locations)


def _location(entry: dict[str, Any]) -> str | None:
    loc = entry.get("response", {}).get("location")
    if isinstance(loc, str) and loc:
        parts = loc.split("/_history")[0].rstrip("/").split("/")
        if len(parts) >= 2:
            return f"{parts[-2]}/{parts[-1]}"
    res = entry.get("resource")
    if isinstance(res, dict) and res.get("id"):
        return f"{res['resourceType']}/{res['id']}"
    return None


async def sign_report(
    ehr: FhirClient,
    report_ref: str,
    *,
    practitioner_ref: str,
    practitioner_display: str,
    text: ReportText | None = None,
    if_match: str | None = None,
    when: dt.datetime | None = None,
) -> tuple[dict[str, Any], str | None]:
    """Sign a preliminary report (-> ``final``) or amend a signed one (-> ``amended``).

    ``if_match`` is the ETag of the version the radiologist edited; when another change got there first the
    EHR answers 412 and ``ConcurrentEditError`` is raised: nothing is overwritten.
    """
    when = when or dt.datetime.now(dt.UTC)
    rtype, rid = report_ref.split("/", 1)
    report, etag = await ehr.read(rtype, rid)
    previous = report.get("status")
    if previous not in {"preliminary", "final", "amended", "corrected"}:
        raise ExternalRequestError(f"a report with status {previous!r} cannot be signed or amended")
    status = "final" if previous == "preliminary" else "amended"
    report["status"] = status
    report["issued"] = when.isoformat()
    report["resultsInterpreter"] = [{"reference": practitioner_ref, "display": practitioner_display}]
    if text is not None:
        report["conclusion"] = text.impression
        report["presentedForm"] = [_text_attachment(text.as_text(), when)]
    old_version = report.get("meta", {}).get("versionId")
    updated, new_etag = await ehr.update(report, if_match or etag)
    activity = (
        _cc("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "LA", "legal authenticator")
        if status == "final"
        else _cc(_DATA_OP, "UPDATE", "revise")
    )
    provenance: dict[str, Any] = {
        "resourceType": "Provenance",
        # unversioned, so that ``Provenance?target=DiagnosticReport/x`` finds it on every server; the version
        # it revises is the entity
        "target": [{"reference": report_ref}],
        "recorded": when.isoformat(),
        "activity": activity,
        "agent": [
            {
                "type": _cc(_PARTICIPANT, "author", "Author"),
                "who": {"reference": practitioner_ref, "display": practitioner_display},
            },
            {
                "type": _cc(_PARTICIPANT, "legal", "Legal Authenticator"),
                "who": {"reference": practitioner_ref, "display": practitioner_display},
            },
        ],
    }
    if old_version:
        provenance["entity"] = [
            {"role": "revision", "what": {"reference": f"{report_ref}/_history/{old_version}"}}
        ]
    await ehr.create(provenance)
    return updated, new_etag
