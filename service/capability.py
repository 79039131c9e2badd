"""What the FHIR API serves, in one table, and the CapabilityStatement that declares it.

``SERVED`` lists each resource type with its interactions; its search parameters come from
``search_params.SEARCH_PARAMS``. The routes (``service.app``) are registered from the same table, so
the CapabilityStatement cannot promise an interaction that has no route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapters.fhir_search import COMMON_PARAMS, SEARCH_PARAMS
from adapters.settings import Settings

__all__ = ["SERVED", "Served", "capability_statement"]

SMART_OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
RESTFUL_SECURITY = "http://terminology.hl7.org/CodeSystem/restful-security-service"


@dataclass(frozen=True)
class Served:
    type: str
    interactions: tuple[str, ...]  # FHIR TypeRestfulInteraction codes
    documentation: str


_READ = ("read", "vread", "search-type")
SERVED: tuple[Served, ...] = (
    Served(
        "Task",
        (*_READ, "create"),
        "Analysis orders. POST a Task (code analyze, focus = the ImagingStudy, for = the Patient); a repeat "
        "for the same study returns the same Task, and re-queues it when it failed.",
    ),
    Served(
        "DiagnosticReport",
        (*_READ, "update"),
        "Draft (preliminary) and signed imaging reports. Updates need If-Match with the current version.",
    ),
    Served("Observation", _READ, "mCODE TumorSize observations (LOINC 21889-1) measured by the analysis."),
    Served(
        "BodyStructure", _READ, "mCODE Tumor body structures; the identifier is the lesion's tracking UID."
    ),
    Served("Provenance", _READ, "Which model (and which radiologist) produced a report."),
    Served(
        "DocumentReference",
        _READ,
        "The segmentation model's card and instructions for use (type model-card), one per model version and card "
        "text, the model's Device as subject; a newer card supersedes the previous one. Written by Interval only.",
    ),
    Served(
        "AuditEvent",
        _READ,
        "The audit trail (EU AI Act Art 12): every AI output, report view, edit, finding verdict, signature and "
        "AI switch change, with the agent (user, API client or model Device), the entities (report, patient, "
        "Task) and the outcome. References and codes only, no names or report text. Written by Interval only.",
    ),
)


def capability_statement(settings: Settings, software_version: str, date: str) -> dict[str, Any]:
    """The R4 CapabilityStatement (``kind`` instance) of this server, as served at ``/fhir/metadata``."""
    security: dict[str, Any] = {
        "cors": False,
        "service": [
            {
                "coding": [{"system": RESTFUL_SECURITY, "code": "SMART-on-FHIR", "display": "SMART-on-FHIR"}],
                "text": "Bearer JWTs with SMART system scopes (system/Task.c, system/DiagnosticReport.rs, ...)",
            }
        ],
        "description": "Every interaction except metadata needs a bearer token with the matching SMART "
        "system scope (v1 read/write or v2 cruds).",
    }
    if settings.api_token_url:
        security["extension"] = [
            {"url": SMART_OAUTH_URIS, "extension": [{"url": "token", "valueUri": settings.api_token_url}]}
        ]
    resources = []
    for served in SERVED:
        params = [*SEARCH_PARAMS.get(served.type, ()), *COMMON_PARAMS]
        resource: dict[str, Any] = {
            "type": served.type,
            "documentation": served.documentation,
            "interaction": [{"code": code} for code in served.interactions],
            "versioning": "versioned-update" if "update" in served.interactions else "versioned",
            "readHistory": True,
            "updateCreate": False,
            "conditionalCreate": False,
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
            "searchParam": [
                {"name": p.name, "type": p.type, "documentation": p.documentation} for p in params
            ],
        }
        resources.append(resource)
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": date,
        "publisher": "Interval",
        "kind": "instance",
        "software": {"name": "Interval", "version": software_version},
        "implementation": {
            "description": "Interval: follow-up CT analysis with RECIST 1.1 and grounded draft reports",
            "url": f"{settings.public_base_url}/fhir",
        },
        "fhirVersion": "4.0.1",
        "format": ["json", "application/fhir+json"],
        "rest": [{"mode": "server", "security": security, "resource": resources}],
    }
