"""What people and the model did, as FHIR R4 ``AuditEvent`` resources (EU AI Act Art 12 record keeping).

Interval records one AuditEvent per event of these kinds (``KINDS``), in its resource store, where the FHIR API
serves them (``GET /fhir/AuditEvent?entity=...&agent=...&date=...&subtype=...``):

========================  ===================  ======  ==============================================
subtype (``AUDIT_SYSTEM``)  type (DICOM)        action  when
========================  ===================  ======  ==============================================
``ai-output``             110110 Patient Rec.  C       the analysis stored an AI-drafted report
``ai-not-used``           110100 Appl. Act.    E       the analysis of a study of a switched-off site
``report-view``           110110 Patient Rec.  R       a person opened a report page
``patient-view``          110110 Patient Rec.  R       a person opened a patient's course page
``report-edit``           110110 Patient Rec.  U       a draft was saved (web page or API)
``finding-accept``        110110 Patient Rec.  U       a radiologist accepted one AI finding
``finding-reject``        110110 Patient Rec.  U       a radiologist rejected one AI finding
``report-sign``           110110 Patient Rec.  U       a report was signed (``final``), or refused
``report-amend``          110110 Patient Rec.  U       a signed report was amended, or refused
``ai-switch-change``      110113 Security Al.  U       an admin switched AI on or off for a site
========================  ===================  ======  ==============================================

Each event also carries the FHIR ``restful-interaction`` (read, update, create) or DICOM subtype that fits, so
that generic audit tools group it. ``agent`` is the person (``who.identifier``: ``USER_SYSTEM|<user name>``, with
their role), the API client (``API_CLIENT_SYSTEM|<client id>``), or the model (``who`` = its ``Device``);
``entity`` references the report (at the version the event produced), its patient (``Patient/<id>``), the Task,
the study, or, for a finding and a switch, identifiers. ``outcome`` is ``0`` (done) or ``4`` (refused, with
``outcomeDesc`` saying why in identifiers and labels). AuditEvents hold references and codes, never names or
report text: a regulator's query returns who did what to which record, and the record itself stays where it is.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from adapters.fhir_codes import API_CLIENT_SYSTEM, USER_SYSTEM
from adapters.fhir_publish import MODEL_ID_SYSTEM
from adapters.fhir_search import parse_reference
from adapters.resource_store import format_instant
from adapters.sql_store import utc_now

__all__ = [
    "AI_SWITCH_SYSTEM",
    "AUDIT_SYSTEM",
    "KINDS",
    "AuditAgent",
    "AuditKind",
    "audit_event",
    "client_agent",
    "entity",
    "identified_entity",
    "model_agent",
    "report_entities",
    "system_agent",
    "user_agent",
]

AUDIT_SYSTEM = "http://interval.local/fhir/CodeSystem/audit-event"
AI_SWITCH_SYSTEM = (
    "http://interval.local/fhir/ai-switch-change"  # entity identifier: a switch change's number
)
ROLE_SYSTEM = "http://interval.local/fhir/CodeSystem/user-role"
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_RESTFUL = "http://hl7.org/fhir/restful-interaction"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
_ROLE_TYPE = "http://terminology.hl7.org/CodeSystem/extra-security-role-type"
_SERVER_SYSTEM = "http://interval.local/fhir/server"

Outcome = Literal["0", "4"]  # success; minor failure (refused)


@dataclass(frozen=True)
class AuditKind:
    code: str
    display: str
    type_code: str  # DICOM audit event ID (CID 400)
    type_display: str
    action: Literal["C", "R", "U", "E"]
    also: tuple[tuple[str, str, str], ...]  # further subtype codings (system, code, display)


def _kind(
    code: str,
    display: str,
    type_: tuple[str, str],
    action: Literal["C", "R", "U", "E"],
    *also: tuple[str, str, str],
) -> AuditKind:
    return AuditKind(code, display, type_[0], type_[1], action, also)


_PATIENT_RECORD = ("110110", "Patient Record")
_READ = (_RESTFUL, "read", "read")
_UPDATE = (_RESTFUL, "update", "update")
KINDS: dict[str, AuditKind] = {
    k.code: k
    for k in (
        _kind("ai-output", "AI output stored", _PATIENT_RECORD, "C", (_RESTFUL, "create", "create")),
        _kind("ai-not-used", "AI not used (switched off)", ("110100", "Application Activity"), "E"),
        _kind("report-view", "Report viewed", _PATIENT_RECORD, "R", _READ),
        _kind("patient-view", "Patient course viewed", _PATIENT_RECORD, "R", _READ),
        _kind("report-edit", "Report draft edited", _PATIENT_RECORD, "U", _UPDATE),
        _kind("finding-accept", "AI finding accepted", _PATIENT_RECORD, "U", _UPDATE),
        _kind("finding-reject", "AI finding rejected", _PATIENT_RECORD, "U", _UPDATE),
        _kind("report-sign", "Report signed", _PATIENT_RECORD, "U", _UPDATE),
        _kind("report-amend", "Signed report amended", _PATIENT_RECORD, "U", _UPDATE),
        _kind(
            "ai-switch-change",
            "AI switch changed",
            ("110113", "Security Alert"),
            "U",
            (_DCM, "110131", "Software Configuration"),
        ),
    )
}


@dataclass(frozen=True)
class AuditAgent:
    """Who did it: ``who`` is a FHIR Reference (a reference or an identifier), never a name."""

    who: dict[str, Any]
    type_code: str  # extra-security-role-type (humanuser, dataprocessor) or DICOM 110150 Application
    requestor: bool
    role: str | None = None  # the person's Interval role

    def to_fhir(self) -> dict[str, Any]:
        system = _DCM if self.type_code == "110150" else _ROLE_TYPE
        agent: dict[str, Any] = {
            "type": {"coding": [{"system": system, "code": self.type_code}]},
            "who": self.who,
            "requestor": self.requestor,
        }
        if self.role is not None:
            agent["role"] = [{"coding": [{"system": ROLE_SYSTEM, "code": self.role}]}]
        return agent


def user_agent(username: str, role: str) -> AuditAgent:
    """A person signed in to Interval (web page or a user token), by user name and role."""
    return AuditAgent({"identifier": {"system": USER_SYSTEM, "value": username}}, "humanuser", True, role)


def client_agent(client_id: str) -> AuditAgent:
    """A system calling the FHIR API with its own token (an EHR integration)."""
    return AuditAgent(
        {"identifier": {"system": API_CLIENT_SYSTEM, "value": client_id}}, "dataprocessor", True
    )


def model_agent(device_ref: str | None, model_version: str) -> AuditAgent:
    """The model that produced the output: its Device (a reference, or a Bundle fullUrl) when known."""
    who: dict[str, Any] = (
        {"reference": device_ref}
        if device_ref is not None
        else {"identifier": {"system": MODEL_ID_SYSTEM, "value": model_version}}
    )
    return AuditAgent(who, "110150", False)


def system_agent() -> AuditAgent:
    """Interval itself, acting on a rule (the AI switch), not on anyone's request."""
    return AuditAgent({"identifier": {"system": _SERVER_SYSTEM, "value": "interval"}}, "110150", False)


_ROLES = {
    "patient": ("1", "Patient", "1", "Person"),
    "report": ("3", "Report", "2", "System Object"),
    "resource": ("4", "Domain Resource", "2", "System Object"),
    "job": ("20", "Job", "2", "System Object"),
    "security": ("13", "Security Resource", "2", "System Object"),
}
EntityRole = Literal["patient", "report", "resource", "job", "security"]


def entity(reference: str, role: EntityRole) -> dict[str, Any]:
    """An entity by reference (``Type/id``, ``Type/id/_history/n`` or a Bundle fullUrl)."""
    return _entity({"reference": reference}, role)


def identified_entity(
    system: str, value: str, role: EntityRole, detail: Sequence[tuple[str, str]] = ()
) -> dict[str, Any]:
    """An entity that is not a FHIR resource here (an AI finding's track UID, a switch change), by identifier;
    ``detail`` (name, value) pairs are codes and numbers, never free text."""
    out = _entity({"identifier": {"system": system, "value": value}}, role)
    if detail:
        out["detail"] = [{"type": name, "valueString": text} for name, text in detail]
    return out


def _entity(what: dict[str, Any], role: EntityRole) -> dict[str, Any]:
    role_code, role_display, type_code, type_display = _ROLES[role]
    return {
        "what": what,
        "type": {"system": _ENTITY_TYPE, "code": type_code, "display": type_display},
        "role": {"system": _OBJECT_ROLE, "code": role_code, "display": role_display},
    }


def report_entities(report: dict[str, Any], version: int | str | None = None) -> list[dict[str, Any]]:
    """The report (at ``version`` when given) and its patient, as entities."""
    ref = f"DiagnosticReport/{report['id']}" + (f"/_history/{version}" if version is not None else "")
    out = [entity(ref, "report")]
    subject = parse_reference((report.get("subject") or {}).get("reference"))
    if subject is not None and subject[0] == "Patient":
        out.append(entity(f"Patient/{subject[1]}", "patient"))
    return out


def audit_event(
    kind: str,
    agent: AuditAgent,
    entities: Sequence[dict[str, Any]],
    *,
    outcome: Outcome = "0",
    outcome_desc: str | None = None,
    recorded: dt.datetime | None = None,
) -> dict[str, Any]:
    """The AuditEvent of one event of ``kind`` (a ``KINDS`` code). ``outcome_desc`` says why a refused action
    was refused, in identifiers and finding labels only."""
    k = KINDS[kind]
    when = recorded or utc_now()
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "type": {"system": _DCM, "code": k.type_code, "display": k.type_display},
        "subtype": [
            {"system": AUDIT_SYSTEM, "code": k.code, "display": k.display},
            *({"system": s, "code": c, "display": d} for s, c, d in k.also),
        ],
        "action": k.action,
        "recorded": format_instant(when),
        "outcome": outcome,
        "agent": [agent.to_fhir()],
        "source": {
            "observer": {"identifier": {"system": _SERVER_SYSTEM, "value": "interval"}},
            "type": [{"system": _SOURCE_TYPE, "code": "4", "display": "Application Server"}],
        },
        "entity": list(entities),
    }
    if outcome_desc:
        event["outcomeDesc"] = outcome_desc
    return event
