"""Incoming FHIR resources: JSON that is safe to store, then structure checked with ``fhir.resources``.

Validation uses the R4B models, wire-compatible with R4 for the resources Interval serves. A failure
raises ``InvalidResourceError`` naming the failing element as a FHIRPath-like location
(``Task.code.coding[0].code``) and the problem, never echoing the submitted value: it may hold PHI.
``fhir.resources`` checks types, cardinality and primitive formats but not code value sets; callers
check the codes they rely on (``require_code``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from core.errors import InputError

__all__ = [
    "FHIR_ID",
    "InvalidResourceError",
    "check_json_safe",
    "is_fhir_id",
    "require_code",
    "validate_resource",
]

FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_TYPE_NAME = re.compile(r"[A-Z][A-Za-z]{1,63}")
_MAX_DEPTH = 64
_MAX_STRING = 1_000_000


class InvalidResourceError(InputError):
    """A resource or Bundle that cannot be accepted; ``element`` locates the first problem."""

    reason = "invalid_resource"

    def __init__(self, element: str, problem: str) -> None:
        super().__init__(f"{element}: {problem}")
        self.element = element
        self.problem = problem


def is_fhir_id(value: object) -> bool:
    return isinstance(value, str) and FHIR_ID.fullmatch(value) is not None


def check_json_safe(value: Any, root: str = "(body)") -> None:
    """Refuse what JSON allows but FHIR JSON, storage or rendering do not: null and "" values,
    NaN/Infinity, NUL, lone surrogates, nesting deeper than 64 levels."""
    stack: list[tuple[Any, str, int]] = [(value, root, 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise InvalidResourceError(where, f"nested deeper than {_MAX_DEPTH} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                _check_string(key, where)
                if child is None:
                    raise InvalidResourceError(
                        f"{where}.{key}", "null is not allowed in FHIR JSON; leave the element out"
                    )
                stack.append((child, f"{where}.{key}", depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, str):
            if not item:
                raise InvalidResourceError(
                    where, "empty strings are not allowed in FHIR JSON; leave the element out"
                )
            _check_string(item, where)
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidResourceError(where, "NaN and Infinity are not JSON numbers")


def _check_string(text: str, where: str) -> None:
    if "\x00" in text:
        raise InvalidResourceError(where, "strings may not contain the NUL character")
    if len(text) > _MAX_STRING:
        raise InvalidResourceError(where, f"strings are limited to {_MAX_STRING} characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidResourceError(
            where, "strings must be valid Unicode (a lone surrogate arrived)"
        ) from None


def validate_resource(data: Any, expected_type: str | None = None) -> dict[str, Any]:
    """``data`` itself when it is a valid FHIR R4 resource (of ``expected_type`` when given)."""
    if not isinstance(data, dict):
        raise InvalidResourceError("(body)", "expected a JSON object holding a FHIR resource")
    rtype = data.get("resourceType")
    if not isinstance(rtype, str) or not rtype:
        raise InvalidResourceError("resourceType", "missing; every FHIR resource names its type")
    if expected_type is not None and rtype != expected_type:
        shown = rtype if _TYPE_NAME.fullmatch(rtype) else "another type"
        raise InvalidResourceError("resourceType", f"expected {expected_type}, got {shown}")
    try:
        model = get_fhir_model_class(rtype)
    except ValueError:
        model = None
    if model is None or not issubclass(model, Resource):
        raise InvalidResourceError("resourceType", "not a FHIR R4 resource type")
    check_json_safe(data, rtype)
    try:
        model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        message = str(first.get("msg", "invalid")).strip().splitlines()[0][:200]
        raise InvalidResourceError(_fhirpath(rtype, first.get("loc", ())), message + more) from None
    except (ValueError, TypeError, LookupError, AttributeError) as exc:
        # fhir.resources' own validators raise these on shapes pydantic did not anticipate
        raise InvalidResourceError(rtype, f"does not validate ({type(exc).__name__})") from None
    return data


def require_code(value: Any, element: str, allowed: Collection[str]) -> str:
    """``value`` when it is one of ``allowed``, else an ``InvalidResourceError`` listing them."""
    if not isinstance(value, str) or value not in allowed:
        got = "nothing" if value is None else "another value"
        raise InvalidResourceError(element, f"must be one of {', '.join(sorted(allowed))}; got {got}")
    return value


def _fhirpath(rtype: str, loc: Iterable[Any]) -> str:
    path = rtype
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("root", "__root__"):
            continue
        else:
            name = {"resource_type": "resourceType", "for_fhir": "for"}.get(str(part), str(part))
            if name.endswith("__ext"):
                name = "_" + name[: -len("__ext")]
            path += f".{name}"
    return path
