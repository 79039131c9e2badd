"""Errors as the FHIR API answers them: an ``OperationOutcome`` with the HTTP status that fits.

``outcome_for(exc)`` maps Interval's exception tree (and the HTTP-level errors of this package) to
``(status, OperationOutcome, headers)``. Messages come from the exceptions, which carry identifiers
and never PHI; anything unexpected becomes a 500 that names a reference to the logged traceback,
never the traceback itself.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

from starlette.responses import JSONResponse

from adapters.fhir_validation import InvalidResourceError
from adapters.resource_store import ResourceNotFoundError, VersionConflict
from core.errors import ExternalServiceError, InputError, IntervalError, OversightError
from service.auth import AuthenticationError, ForbiddenError

__all__ = [
    "FHIR_JSON",
    "FHIRResponse",
    "PreconditionRequiredError",
    "UnsupportedMediaTypeError",
    "operation_outcome",
    "outcome_for",
]

log = logging.getLogger("interval.service")

FHIR_JSON = "application/fhir+json"
_FHIRPATH = re.compile(r"[A-Z][A-Za-z]*(\.[A-Za-z_]+(\[[0-9]+\])*)*")

_ISSUE_CODE = {
    400: "invalid",
    401: "login",
    403: "forbidden",
    404: "not-found",
    405: "not-supported",
    406: "not-supported",
    409: "conflict",
    412: "conflict",
    413: "too-costly",
    415: "not-supported",
    422: "business-rule",
    428: "required",
    500: "exception",
    503: "transient",
}


class UnsupportedMediaTypeError(InputError):
    reason = "unsupported_media_type"


class PreconditionRequiredError(InputError):
    """An update without ``If-Match``: refused so that no one overwrites a version they did not read."""

    reason = "precondition_required"


class FHIRResponse(JSONResponse):
    """JSON as ``application/fhir+json``; refuses NaN rather than writing invalid JSON."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def operation_outcome(status: int, diagnostics: str, expression: str | None = None) -> dict[str, Any]:
    issue: dict[str, Any] = {
        "severity": "error" if status >= 400 else "information",
        "code": _ISSUE_CODE.get(status, "processing"),
        "diagnostics": diagnostics,
    }
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def outcome_for(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, OperationOutcome and extra headers answering ``exc``."""
    headers: dict[str, str] = {}
    expression: str | None = None
    if isinstance(exc, AuthenticationError):
        status = 401
        headers["WWW-Authenticate"] = exc.www_authenticate()
    elif isinstance(exc, ForbiddenError):
        status = 403
        headers["WWW-Authenticate"] = exc.www_authenticate()
    elif isinstance(exc, UnsupportedMediaTypeError):
        status = 415
    elif isinstance(exc, PreconditionRequiredError):
        status = 428
    elif isinstance(exc, InputError):
        status = 400
        if isinstance(exc, InvalidResourceError) and _FHIRPATH.fullmatch(exc.element):
            expression = exc.element
    elif isinstance(exc, ResourceNotFoundError):
        status = 404
    elif isinstance(exc, VersionConflict):
        status = 412
        headers["ETag"] = f'W/"{exc.current_version}"'
    elif isinstance(exc, ExternalServiceError):
        status = 503
    elif isinstance(exc, OversightError):
        status = 422
    elif isinstance(exc, IntervalError):
        status = 500
    else:
        reference = uuid.uuid4()
        log.error("internal error, reference %s", reference, exc_info=exc)
        return 500, operation_outcome(500, f"internal error, reference {reference}"), headers
    return status, operation_outcome(status, str(exc), expression), headers
