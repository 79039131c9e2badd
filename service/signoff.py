"""Signing a report, wherever it happens (the web editor or ``PUT /fhir/DiagnosticReport``): the rules and the
record.

Rules (``core.oversight``): only a radiologist, signed in or acting through a user-level token, makes a report
``final`` or ``amended`` or changes a signed one (``require_signer``); and only once every AI finding of the report
has been accepted or rejected explicitly (``require_reviewed``). The AI findings are the lesions of the study's
analysis record, the ones the report page offers to accept or reject; a report that carries AI content
(``meta.security`` AIAST) whose analysis record is missing cannot be reviewed here, and is not signed here.

The record (``record_signature``): the Observations of the report become ``final``, a Provenance names the
radiologist as author and legal authenticator (the version signed as its entity), and the report's history keeps
the draft, the signed text and their diff (``service.users.ReportEvent``). The AuditEvent of the signature is
written with the report's update itself (``ResourceStore.update(also_create=...)``).
"""

from __future__ import annotations

from typing import Any

from adapters.evidence import text_diff
from adapters.fhir_audit import AuditAgent, audit_event, client_agent, report_entities, user_agent
from adapters.fhir_codes import USER_SYSTEM
from adapters.fhir_publish import AIAST
from adapters.resource_store import ResourceStore
from adapters.sql_store import utc_now
from core.errors import OversightError
from core.oversight import SIGNED_STATUSES, check_review_complete
from core.report import ReportText
from service.auth import Client, ForbiddenError
from service.users import ReportEvent, User
from service.web_context import StoredReport, WebPages

__all__ = [
    "agent_of",
    "ai_findings",
    "record_refusal",
    "record_signature",
    "require_reviewed",
    "require_signer",
    "set_status",
    "signature_kind",
    "signer",
]

_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"


def ai_findings(report: StoredReport) -> dict[str, str]:
    """The report's AI findings, track id -> label, in the analysis' order (the findings the page reviews)."""
    return {
        str(lesion["track_id"]): str(lesion.get("label") or lesion["track_id"])
        for lesion in (report.analysis or {}).get("lesions", [])
        if lesion.get("track_id")
    }


def _ai_asserted(resource: dict[str, Any]) -> bool:
    return any(
        s.get("code") == AIAST["code"] and s.get("system") == AIAST["system"]
        for s in (resource.get("meta") or {}).get("security") or []
    )


def require_reviewed(web: WebPages, report: StoredReport) -> None:
    """Refuse to sign ``report`` (it must be wrapped with its analysis) until a radiologist has accepted or
    rejected each of its AI findings: ``FindingsNotReviewedError`` lists the pending ones."""
    if report.analysis is None and _ai_asserted(report.resource) and report.resource.get("result"):
        raise OversightError(
            f"DiagnosticReport/{report.id} holds AI findings, but the analysis record of its study is missing: "
            "its findings cannot be reviewed one by one here, so it is not signed here (sign it in the EHR, "
            "or analyse the study again)"
        )
    verdicts = {track: f.decision for track, f in web.users.feedback(report.id).items()}
    check_review_complete(report.id, ai_findings(report), verdicts)


def require_signer(client: Client, what: str) -> User:
    """The radiologist a user-level token acts for; ``ForbiddenError`` (403) for a system client or anyone
    else. ``what`` completes "... only by a radiologist: ..."."""
    user = client.user
    if user is None or not user.can_sign:
        who = f"user {user.username} ({user.role.value})" if user is not None else "a system client"
        raise ForbiddenError(
            f"{what} only by a radiologist's signature; this token acts for {who}: use a user-level token "
            "(scope user/DiagnosticReport.u) of a radiologist of the report's site, or sign on the report page",
            scope="user/DiagnosticReport.u",
        )
    return user


def signature_kind(old_status: str) -> str:
    """The AuditEvent subtype of a signature: a first one signs, a later one amends."""
    return "report-amend" if old_status in SIGNED_STATUSES else "report-sign"


def agent_of(client: Client) -> AuditAgent:
    """The audit agent of an API call: the person a user-level token acts for, else the client itself."""
    if client.user is not None:
        return user_agent(client.user.username, client.user.role.value)
    return client_agent(client.client_id)


def signer(user: User) -> dict[str, Any]:
    """The radiologist as a FHIR Reference (``resultsInterpreter``, Provenance agents)."""
    return {"identifier": {"system": USER_SYSTEM, "value": user.username}, "display": user.display_name}


def record_refusal(
    store: ResourceStore, kind: str, agent: AuditAgent, report: dict[str, Any], why: str
) -> None:
    """The AuditEvent of an action refused by an oversight rule (outcome 4); ``why`` holds no PHI."""
    store.create(audit_event(kind, agent, report_entities(report), outcome="4", outcome_desc=why))


def set_status(store: ResourceStore, resource: dict[str, Any], status: str) -> None:
    """Give a stored resource (an Observation of the report) ``status``, unless it has it already."""
    if resource.get("status") != status:
        store.update({**resource, "status": status}, if_match=f'W/"{resource["meta"]["versionId"]}"')


def record_signature(
    web: WebPages,
    signed: StoredReport,
    user: User,
    *,
    read_version: int,
    text: ReportText,
    now: str,
    ehr_status: str,
) -> None:
    """What a signature leaves besides the report itself (see the module docstring). ``signed`` is the report
    as stored after the signature, wrapped with its analysis; ``read_version`` the version the radiologist
    signed off from."""
    for obs in web.results(signed):
        set_status(web.store, obs, "final")
    final = signed.status == "final"
    activity = (
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            "code": "LA",
            "display": "legal authenticator",
        }
        if final
        else {
            "system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation",
            "code": "UPDATE",
            "display": "revise",
        }
    )
    who = signer(user)
    web.store.create(
        {
            "resourceType": "Provenance",
            "target": [{"reference": f"DiagnosticReport/{signed.id}"}],
            "recorded": now,
            "activity": {"coding": [activity]},
            "agent": [
                {
                    "type": {"coding": [{"system": _PARTICIPANT, "code": "author", "display": "Author"}]},
                    "who": who,
                },
                {
                    "type": {
                        "coding": [
                            {"system": _PARTICIPANT, "code": "legal", "display": "Legal Authenticator"}
                        ]
                    },
                    "who": who,
                },
            ],
            "entity": [
                {
                    "role": "revision",
                    "what": {"reference": f"DiagnosticReport/{signed.id}/_history/{read_version}"},
                }
            ],
        }
    )
    draft = web.draft_text(signed)
    web.users.record_event(
        ReportEvent(
            signed.id,
            signed.version,
            user.username,
            user.display_name,
            "signed" if final else "amended",
            utc_now(),
            draft_text=draft.as_text(),
            signed_text=text.as_text(),
            diff=text_diff(draft, text),
            ehr_status=ehr_status,
        )
    )
