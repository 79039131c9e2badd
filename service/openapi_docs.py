"""OpenAPI descriptions of the FHIR routes: parameters, bodies and responses, for /docs and test drivers.

The schemas describe the part of each resource this API reads (Task) or returns; they are narrower
than FHIR where a wider value would be refused anyway (a StudyInstanceUID is digits and dots), so a
client generated from them sends what the API accepts.
"""

from __future__ import annotations

from typing import Any

from adapters.fhir_codes import DICOM_UID, PATIENT_ID_SYSTEM
from adapters.fhir_search import MAX_OFFSET, MAX_TOKEN_CHARS, SORT_KEYS, SearchParam
from service.jobs import TASK_CODE_ANALYZE, TASK_CODE_SYSTEM
from service.outcome import FHIR_JSON

__all__ = [
    "body_doc",
    "bundle_schema",
    "report_schema",
    "resource_schema",
    "responses",
    "search_parameters",
    "task_schema",
]

_ID = r"[A-Za-z0-9\-.]{1,64}"
_REF_ITEM = rf"([A-Z][A-Za-z]+/)?{_ID}"
_TOKEN_PART = r"([^|,\\\u0000]|\\[^\u0000])*"
_TOKEN_ITEM = rf"{_TOKEN_PART}(\|{_TOKEN_PART})?"
_DAY = r"(0[1-9]|1[0-9]|2[0-8])"  # 29-31 are accepted too where the month has them
_TIME = r"T([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?(Z|[+-](0[0-9]|1[0-3]):[0-5][0-9])?"
# FHIR strings need one character that is not "other" whitespace ([ \r\n\t\S] in fhir.resources); no NUL
_VISIBLE = r"[^\u0000\u000b\u000c\u001c-\u001f\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_TEXT = rf"^[^\u0000]*{_VISIBLE}[^\u0000]*$"
_DATE = rf"^(eq|ge|gt|le|lt)?[1-9][0-9]{{3}}(-(0[1-9]|1[0-2])(-{_DAY}({_TIME})?)?)?$"

OPERATION_OUTCOME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["resourceType", "issue"],
    "properties": {
        "resourceType": {"type": "string", "enum": ["OperationOutcome"]},
        "issue": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["severity", "code"],
                "properties": {
                    "severity": {"type": "string"},
                    "code": {"type": "string"},
                    "diagnostics": {"type": "string"},
                    "expression": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}

_DESCRIPTIONS = {
    200: "Success",
    201: "Created",
    400: "Invalid request or resource (OperationOutcome; diagnostics names the failing element)",
    401: "Missing, invalid or expired bearer token",
    403: "The token lacks the SMART scope this interaction needs, or the authority (a radiologist signs)",
    404: "No such resource",
    409: "Conflict with a concurrent change",
    412: "If-Match names a version that is no longer current",
    415: "The body is not application/fhir+json or application/json",
    422: "A human-oversight rule refuses it (e.g. AI findings not yet accepted or rejected)",
    428: "If-Match is required",
    503: "A service Interval depends on is unavailable",
}

_VERSION_HEADERS = {
    "ETag": {"description": 'The version, W/"versionId"', "schema": {"type": "string"}},
    "Last-Modified": {"description": "meta.lastUpdated as an HTTP date", "schema": {"type": "string"}},
}


def resource_schema(resource_type: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["resourceType"],
        "properties": {
            "resourceType": {"type": "string", "enum": [resource_type]},
            "id": {"type": "string"},
            "meta": {"type": "object"},
        },
    }


def bundle_schema(resource_type: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["resourceType", "type", "total"],
        "properties": {
            "resourceType": {"type": "string", "enum": ["Bundle"]},
            "type": {"type": "string", "enum": ["searchset"]},
            "total": {"type": "integer", "minimum": 0},
            "link": {"type": "array", "items": {"type": "object"}},
            "entry": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"fullUrl": {"type": "string"}, "resource": resource_schema(resource_type)},
                },
            },
        },
    }


def responses(ok: dict[int, dict[str, Any]], *errors: int, versioned: bool = False) -> dict[int | str, Any]:
    """Response documentation: ``ok`` status -> body schema, plus OperationOutcome ``errors``."""
    out: dict[int | str, Any] = {}
    for status, schema in ok.items():
        doc: dict[str, Any] = {
            "description": _DESCRIPTIONS[status],
            "content": {FHIR_JSON: {"schema": schema}},
        }
        if versioned:
            doc["headers"] = dict(_VERSION_HEADERS)
            if status == 201 or (status == 200 and 201 in ok):
                doc["headers"]["Location"] = {
                    "description": "[base]/Task/id/_history/versionId",
                    "schema": {"type": "string"},
                }
        out[status] = doc
    for status in errors:
        out[status] = {
            "description": _DESCRIPTIONS[status],
            "content": {FHIR_JSON: {"schema": OPERATION_OUTCOME_SCHEMA}},
        }
    return out


def body_doc(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {FHIR_JSON: {"schema": schema}, "application/json": {"schema": schema}},
        }
    }


def search_parameters(params: tuple[SearchParam, ...]) -> list[dict[str, Any]]:
    """OpenAPI query parameters of a search route (the type's parameters, _id and the result parameters)."""
    out: list[dict[str, Any]] = []
    for p in params:
        if p.type == "date":
            out.append(
                {
                    "name": p.name,
                    "in": "query",
                    "required": False,
                    "description": p.documentation + " Repeat the parameter for a range (ge...&le...).",
                    "schema": {"type": "array", "items": {"type": "string", "pattern": _DATE}},
                    "style": "form",
                    "explode": True,
                }
            )
            continue
        item = _REF_ITEM if p.type == "reference" else _ID if p.name == "_id" else _TOKEN_ITEM
        forms = [(p.name, item)] + ([(f"{p.name}:identifier", _TOKEN_ITEM)] if p.by_identifier else [])
        for name, pattern in forms:
            out.append(
                {
                    "name": name,
                    "in": "query",
                    "required": False,
                    "description": p.documentation,
                    "schema": {
                        "type": "string",
                        "minLength": 1,
                        "maxLength": MAX_TOKEN_CHARS,
                        "pattern": f"^{pattern}(,{pattern})*$",
                    },
                }
            )
    out.append(
        _query(
            "_sort",
            "Sort order: date, -date, _lastUpdated (default) or -_lastUpdated.",
            {"type": "string", "enum": list(SORT_KEYS)},
        )
    )
    out.append(
        _query(
            "_count",
            "Page size (default 50; more than 500 is served as 500; 0: total only).",
            {"type": "integer", "minimum": 0},
        )
    )
    out.append(
        _query(
            "_offset",
            "Matches to skip (the next link carries it).",
            {"type": "integer", "minimum": 0, "maximum": MAX_OFFSET},
        )
    )
    return out


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema}


def task_schema() -> dict[str, Any]:
    """The Task elements this API reads; anything else must be valid FHIR R4 and is kept as sent."""
    coding = {
        "type": "object",
        "required": ["system", "code"],
        "properties": {
            "system": {"type": "string", "enum": [TASK_CODE_SYSTEM]},
            "code": {"type": "string", "enum": [TASK_CODE_ANALYZE]},
            "display": {"type": "string", "pattern": _TEXT},
        },
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "description": "An analysis order. Either Task.focus.identifier (urn:dicom:uid) gives the study.",
        "required": ["resourceType", "status", "intent", "code", "focus", "for"],
        "properties": {
            "resourceType": {"type": "string", "enum": ["Task"]},
            "status": {"type": "string", "enum": ["requested"]},
            "intent": {"type": "string", "enum": ["order"]},
            "code": {
                "type": "object",
                "required": ["coding"],
                "properties": {"coding": {"type": "array", "minItems": 1, "maxItems": 1, "items": coding}},
                "additionalProperties": False,
            },
            "focus": {
                "type": "object",
                "required": ["identifier"],
                "properties": {
                    "reference": {"type": "string", "pattern": f"^ImagingStudy/{_ID}$"},
                    "type": {"type": "string", "enum": ["ImagingStudy"]},
                    "identifier": {
                        "type": "object",
                        "required": ["system", "value"],
                        "properties": {
                            "system": {"type": "string", "enum": [DICOM_UID]},
                            "value": {
                                "type": "string",
                                "pattern": r"^urn:oid:[0-2](\.(0|[1-9][0-9]{0,8})){1,6}$",
                            },
                        },
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
            "for": {
                "type": "object",
                "required": ["reference"],
                "properties": {
                    "reference": {"type": "string", "pattern": f"^Patient/{_ID}$"},
                    "type": {"type": "string", "enum": ["Patient"]},
                    "identifier": {
                        "type": "object",
                        "description": f"With system {PATIENT_ID_SYSTEM}, the value is the patient id the "
                        "analysis uses (else the reference's id).",
                        "properties": {
                            "system": {"type": "string", "pattern": r"^\S+$"},
                            "value": {"type": "string", "pattern": _TEXT},
                        },
                        "additionalProperties": False,
                    },
                },
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    }


def report_schema() -> dict[str, Any]:
    """The DiagnosticReport a PUT carries: the version read, with the changes applied."""
    return {
        "type": "object",
        "required": ["resourceType", "id", "status", "code"],
        "properties": {
            "resourceType": {"type": "string", "enum": ["DiagnosticReport"]},
            "id": {"type": "string", "pattern": f"^{_ID}$"},
            "status": {
                "type": "string",
                "enum": ["registered", "partial", "preliminary", "final", "amended", "corrected", "appended"],
            },
            "code": {
                "type": "object",
                "required": ["text"],
                "properties": {"text": {"type": "string", "pattern": _TEXT}},
                "additionalProperties": False,
            },
            "conclusion": {"type": "string", "pattern": _TEXT},
            "subject": {
                "type": "object",
                "properties": {"reference": {"type": "string", "pattern": f"^Patient/{_ID}$"}},
                "additionalProperties": False,
            },
        },
        "additionalProperties": False,
    }
