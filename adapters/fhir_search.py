"""The search parameters Interval's FHIR API serves: what each indexes, and how a query is parsed.

One table (``SEARCH_PARAMS``) feeds three readers: the store's index (``extract``), the query parser
(``parse_query``), and the CapabilityStatement / OpenAPI description. Handling is strict: a parameter
or modifier that is not listed raises ``InvalidSearchError`` rather than being ignored, so a client
never mistakes an unfiltered result for a filtered one.

Dates are ranges: ``2024-03`` is the whole month. A resource's date and a query's date are both
turned into half-open UTC intervals ``[lo, hi)``; ``eq`` means the resource's range lies within the
query's, ``ge``/``gt``/``le``/``lt`` mean the resource's range reaches that side of it (FHIR R4,
search §3.1.1.3). A time without an offset is read as UTC.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from core.errors import InputError

__all__ = [
    "COMMON_PARAMS",
    "MAX_COUNT",
    "MAX_OFFSET",
    "RESULT_PARAMS",
    "SEARCH_PARAMS",
    "SORT_KEYS",
    "DateFilter",
    "Extracted",
    "IdFilter",
    "InvalidSearchError",
    "Query",
    "SearchParam",
    "TokenFilter",
    "date_range",
    "extract",
    "parse_query",
    "parse_reference",
]

ParamType = Literal["token", "reference", "date"]
DEFAULT_COUNT = 50
MAX_COUNT = 500
MAX_OFFSET = 100_000_000
MAX_TOKEN_CHARS = 1024
SORT_KEYS = ("date", "-date", "_lastUpdated", "-_lastUpdated")
RESULT_PARAMS = ("_sort", "_count", "_offset")
_DATE_PREFIXES = ("eq", "ge", "le", "gt", "lt")


class InvalidSearchError(InputError):
    """A search the API does not serve: unknown parameter or modifier, malformed value."""

    reason = "invalid_search"


@dataclass(frozen=True)
class SearchParam:
    name: str
    type: ParamType
    documentation: str
    # the reference's resource type when a bare id is given (``patient=123`` means ``Patient/123``)
    default_target: str | None = None
    # a reference parameter that also takes ``:identifier`` (``agent:identifier=system|value``): the referenced
    # thing by its identifier, for agents and entities that are not resources here (a user, a finding)
    by_identifier: bool = False


_ID = SearchParam("_id", "token", "The resource's logical id (comma-separated ids: any of them).")
COMMON_PARAMS = (_ID,)


def _patient(path: str) -> SearchParam:
    return SearchParam(
        "patient", "reference", f"The patient ({path}), as Patient/id or id.", default_target="Patient"
    )


def _status(values: str) -> SearchParam:
    return SearchParam("status", "token", f"Status code, comma-separated for any of them ({values}).")


_IDENTIFIER = SearchParam("identifier", "token", "An identifier, as system|value or value.")

SEARCH_PARAMS: dict[str, tuple[SearchParam, ...]] = {
    "Task": (
        _status("requested, in-progress, completed, failed, ..."),
        _patient("Task.for"),
        SearchParam("focus", "reference", "The study the Task is about (Task.focus), as ImagingStudy/id."),
        _IDENTIFIER,
        SearchParam("code", "token", "Task.code, as system|code or code."),
        SearchParam("authored-on", "date", "Task.authoredOn with prefix eq, ge, gt, le or lt."),
        SearchParam(
            "business-status",
            "token",
            "Task.businessStatus, as system|code or code (ai-not-used: the site's AI switch was off).",
        ),
    ),
    "DiagnosticReport": (
        _patient("DiagnosticReport.subject"),
        SearchParam("subject", "reference", "DiagnosticReport.subject, as Type/id or id."),
        _status("registered, preliminary, final, amended, ..."),
        SearchParam(
            "date",
            "date",
            "Clinically relevant time (effective[x], else issued) with prefix eq, ge, gt, le or lt; "
            "YYYY, YYYY-MM, YYYY-MM-DD or a full dateTime.",
        ),
        _IDENTIFIER,
        SearchParam("code", "token", "DiagnosticReport.code, as system|code or code."),
    ),
    "Observation": (
        _patient("Observation.subject"),
        SearchParam("subject", "reference", "Observation.subject, as Type/id or id."),
        _status("preliminary, final, amended, ..."),
        SearchParam("focus", "reference", "What the observation is about (Observation.focus), as Type/id."),
        SearchParam("code", "token", "Observation.code, as system|code or code (LOINC 21889-1: tumor size)."),
        SearchParam(
            "date", "date", "Observation.effective[x] (else issued) with prefix eq, ge, gt, le or lt."
        ),
    ),
    "BodyStructure": (
        _patient("BodyStructure.patient"),
        SearchParam(
            "identifier", "token", "An identifier (a lesion's tracking UID: urn:dicom:uid|urn:oid:...)."
        ),
    ),
    "Provenance": (
        SearchParam(
            "target", "reference", "A resource the Provenance is about (Provenance.target), as Type/id."
        ),
        SearchParam(
            "patient",
            "reference",
            "The patient a target belongs to: Provenance whose target is the patient or one of the "
            "patient's stored resources.",
            default_target="Patient",
        ),
    ),
    "DocumentReference": (
        _IDENTIFIER,
        _status("current, superseded"),
        SearchParam(
            "type",
            "token",
            "DocumentReference.type, as system|code or code "
            "(http://interval.local/fhir/CodeSystem/document-type|model-card: the model card).",
        ),
        SearchParam("category", "token", "DocumentReference.category, as system|code or code."),
        SearchParam(
            "subject", "reference", "What the document is about (DocumentReference.subject), as Device/id."
        ),
        SearchParam("date", "date", "DocumentReference.date with prefix eq, ge, gt, le or lt."),
    ),
    "AuditEvent": (
        SearchParam(
            "entity",
            "reference",
            "What the event was about (AuditEvent.entity.what), as Type/id (DiagnosticReport/id, Task/id); "
            "entity:identifier=system|value for a finding (urn:dicom:uid|urn:oid:<track UID>) or a switch change.",
            by_identifier=True,
        ),
        SearchParam(
            "agent",
            "reference",
            "Who did it (AuditEvent.agent.who), as Type/id (Device/id: the model); agent:identifier=system|value "
            "for a person (http://interval.local/fhir/user|<user name>) or an API client "
            "(http://interval.local/fhir/api-client|<client id>), or agent:identifier=<value>.",
            by_identifier=True,
        ),
        _patient("AuditEvent.entity.what of type Patient"),
        SearchParam("date", "date", "AuditEvent.recorded with prefix eq, ge, gt, le or lt."),
        SearchParam(
            "subtype",
            "token",
            "AuditEvent.subtype, as system|code or code (report-view, report-edit, finding-accept, finding-reject, "
            "report-sign, report-amend, ai-output, ai-not-used, patient-view, ai-switch-change).",
        ),
        SearchParam(
            "type", "token", "AuditEvent.type (DICOM 110110 Patient Record, 110113 Security Alert, ...)."
        ),
        SearchParam("action", "token", "AuditEvent.action: C, R, U or E."),
        SearchParam("outcome", "token", "AuditEvent.outcome: 0 (done) or 4 (refused)."),
    ),
}


# --- what a stored resource is found by -------------------------------------------------------------


@dataclass(frozen=True)
class Extracted:
    """The search columns of one resource. Reference tokens are (param, target type, target id)."""

    status: str | None
    date: tuple[dt.datetime, dt.datetime] | None
    tokens: list[tuple[str, str, str]] = field(default_factory=list)


def extract(resource: dict[str, Any]) -> Extracted:
    """Index values of ``resource``; identifiers are indexed for every type (conditional create)."""
    rtype = str(resource.get("resourceType"))
    tokens: list[tuple[str, str, str]] = []
    for ident in _as_list(resource.get("identifier")):
        if isinstance(ident, dict) and isinstance(ident.get("value"), str):
            tokens.append(("identifier", _str(ident.get("system")), ident["value"]))

    def refs(param: str, value: Any, *, patient: bool = False, by_identifier: bool = False) -> None:
        for ref in _as_list(value):
            if not isinstance(ref, dict):
                continue
            ident = ref.get("identifier")
            if by_identifier and isinstance(ident, dict) and isinstance(ident.get("value"), str):
                tokens.append((f"{param}:identifier", _str(ident.get("system")), ident["value"]))
            target = parse_reference(ref.get("reference"))
            if target is None:
                continue
            tokens.append((param, *target))
            if patient and target[0] == "Patient":
                tokens.append(("patient", *target))

    def codings(param: str, value: Any) -> None:
        for coding in _as_list(value):
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                tokens.append((param, _str(coding.get("system")), coding["code"]))

    def codes(param: str, concept: Any) -> None:
        if isinstance(concept, dict):
            codings(param, concept.get("coding"))

    date: tuple[dt.datetime, dt.datetime] | None = None
    if rtype == "Task":
        refs("patient", resource.get("for"))
        refs("focus", resource.get("focus"))
        codes("code", resource.get("code"))
        codes("business-status", resource.get("businessStatus"))
        date = _date_of(resource.get("authoredOn"))
    elif rtype in ("DiagnosticReport", "Observation"):
        refs("subject", resource.get("subject"), patient=True)
        codes("code", resource.get("code"))
        if rtype == "Observation":
            refs("focus", resource.get("focus"))
        date = _effective(resource)
    elif rtype == "BodyStructure":
        refs("patient", resource.get("patient"))
    elif rtype == "Provenance":
        refs("target", resource.get("target"))
        date = _date_of(resource.get("recorded"))
    elif rtype == "DocumentReference":
        codes("type", resource.get("type"))
        for concept in _as_list(resource.get("category")):
            codes("category", concept)
        refs("subject", resource.get("subject"))
        date = _date_of(resource.get("date"))
    elif rtype == "AuditEvent":
        whats = [e.get("what") for e in _as_list(resource.get("entity")) if isinstance(e, dict)]
        refs("entity", whats, patient=True, by_identifier=True)
        refs(
            "agent",
            [a.get("who") for a in _as_list(resource.get("agent")) if isinstance(a, dict)],
            by_identifier=True,
        )
        codings("subtype", resource.get("subtype"))
        codings("type", resource.get("type"))
        for param in ("action", "outcome"):
            if isinstance(resource.get(param), str):
                tokens.append((param, "", resource[param]))
        date = _date_of(resource.get("recorded"))
    status = resource.get("status")
    return Extracted(status if isinstance(status, str) else None, date, tokens)


def _effective(resource: dict[str, Any]) -> tuple[dt.datetime, dt.datetime] | None:
    for key in ("effectiveDateTime", "effectiveInstant"):
        if key in resource:
            return _date_of(resource[key])
    period = resource.get("effectivePeriod")
    if isinstance(period, dict):
        start = _date_of(period.get("start"))
        end = _date_of(period.get("end"))
        if start or end:
            return (start[0] if start else dt.datetime.min, end[1] if end else dt.datetime.max)
    return _date_of(resource.get("issued"))


def _date_of(value: Any) -> tuple[dt.datetime, dt.datetime] | None:
    if not isinstance(value, str):
        return None
    try:
        return date_range(value)
    except ValueError:
        return None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return value if isinstance(value, list) else [value]


def _str(value: Any) -> str:
    return value if isinstance(value, str) else ""


_ID_VALUE = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_REF = re.compile(r"(?:.*/)?([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?")


def parse_reference(reference: Any) -> tuple[str, str] | None:
    """``(type, id)`` of a literal reference (relative or absolute); None for contained/urn/other."""
    if not isinstance(reference, str) or reference.startswith(("#", "urn:")):
        return None
    match = _REF.fullmatch(reference)
    return (match.group(1), match.group(2)) if match else None


# --- dates ------------------------------------------------------------------------------------------

_DATE = re.compile(
    r"(?P<y>[0-9]{4})(?:-(?P<m>[0-9]{2})(?:-(?P<d>[0-9]{2})"
    r"(?:T(?P<H>[0-9]{2}):(?P<M>[0-9]{2})(?::(?P<S>[0-9]{2})(?P<f>\.[0-9]{1,9})?)?"
    r"(?P<tz>Z|[+-][0-9]{2}:[0-9]{2})?)?)?)?"
)


def date_range(text: str) -> tuple[dt.datetime, dt.datetime]:
    """The half-open UTC interval ``[lo, hi)`` (naive datetimes) a FHIR date/dateTime/instant covers."""
    match = _DATE.fullmatch(text.strip())
    if not match:
        raise ValueError("expected YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm[:ss[.fff]][Z|+hh:mm]")
    g = match.groupdict()
    year, month, day = int(g["y"]), int(g["m"] or 1), int(g["d"] or 1)
    try:
        if g["m"] is None:
            lo = dt.datetime(year, 1, 1)
            hi = _shift(lambda: dt.datetime(year + 1, 1, 1))
        elif g["d"] is None:
            lo = dt.datetime(year, month, 1)
            hi = _shift(lambda: dt.datetime(year + month // 12, month % 12 + 1, 1))
        elif g["H"] is None:
            lo = dt.datetime(year, month, day)
            hi = _shift(lambda: lo + dt.timedelta(days=1))
        else:
            frac = g["f"] or ""
            micro = int((frac[1:] + "000000")[:6]) if frac else 0
            local = dt.datetime(year, month, day, int(g["H"]), int(g["M"]), int(g["S"] or 0), micro)
            tz = g["tz"]
            offset = dt.timedelta(0)
            if tz and tz != "Z":
                sign = 1 if tz[0] == "+" else -1
                offset = sign * dt.timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
            lo = _shift(
                lambda: local - offset,
                default=dt.datetime.max if offset < dt.timedelta(0) else dt.datetime.min,
            )
            step = dt.timedelta(microseconds=1) if frac else dt.timedelta(seconds=1 if g["S"] else 60)
            hi = _shift(lambda: lo + step)
    except ValueError as exc:
        raise ValueError(f"not a calendar date ({exc})") from None
    return lo, hi


def _shift(make: Any, default: dt.datetime = dt.datetime.max) -> dt.datetime:
    try:
        value: dt.datetime = make()
    except (OverflowError, ValueError):  # beyond year 1..9999
        return default
    return value


# --- queries ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenFilter:
    """Any of ``alternatives`` matches. ``system`` None: any system; "": no system. ``value`` None: any."""

    param: str
    alternatives: tuple[tuple[str | None, str | None], ...]


@dataclass(frozen=True)
class DateFilter:
    prefix: str
    lo: dt.datetime
    hi: dt.datetime


@dataclass(frozen=True)
class IdFilter:
    ids: tuple[str, ...]


Filter = TokenFilter | DateFilter | IdFilter


@dataclass(frozen=True)
class Query:
    resource_type: str
    filters: tuple[Filter, ...] = ()
    sort: str = "_lastUpdated"
    count: int = DEFAULT_COUNT
    offset: int = 0

    def result_params(self) -> list[tuple[str, str]]:
        """The paging parameters, for a Bundle's ``self``/``next`` links."""
        return [("_sort", self.sort), ("_count", str(self.count)), ("_offset", str(self.offset))]


def parse_query(
    resource_type: str, items: Iterable[tuple[str, str]], *, params: Iterable[SearchParam] | None = None
) -> Query:
    """A ``Query`` from URL parameters; anything not served raises ``InvalidSearchError``."""
    served = SEARCH_PARAMS.get(resource_type, ()) if params is None else tuple(params)
    allowed = {p.name: p for p in (*COMMON_PARAMS, *served)}
    filters: list[Filter] = []
    result: dict[str, str] = {}
    for name, value in items:
        if "\x00" in name or "\x00" in value:
            raise InvalidSearchError("search parameters may not contain the NUL character")
        if name in RESULT_PARAMS:
            if name in result:
                raise InvalidSearchError(f"{name} was given more than once")
            result[name] = value
            continue
        base, _, modifier = name.partition(":")
        param = allowed.get(base)
        if param is None:
            names = ", ".join([*sorted(allowed), *RESULT_PARAMS])
            raise InvalidSearchError(
                f"{resource_type} search does not support the parameter {_shown(base)}; it serves {names}"
            )
        if modifier == "identifier" and param.by_identifier:
            param = SearchParam(name, "token", param.documentation)
        elif modifier:
            supported = " (only :identifier is)" if param.by_identifier else ""
            raise InvalidSearchError(
                f"{base}: modifiers such as :{_shown(modifier)} are not supported{supported}"
            )
        if not value:
            raise InvalidSearchError(f"{base}: a value is required")
        filters.append(_parse_value(param, value))
    sort = result.get("_sort", "_lastUpdated")
    if sort not in SORT_KEYS:
        raise InvalidSearchError(f"_sort must be one of {', '.join(SORT_KEYS)}")
    count = min(_int(result, "_count", DEFAULT_COUNT), MAX_COUNT)  # a larger page is served as MAX_COUNT
    offset = _int(result, "_offset", 0)
    if offset > MAX_OFFSET:
        raise InvalidSearchError(f"_offset must be {MAX_OFFSET} at most")
    return Query(resource_type, tuple(filters), sort, count, offset)


def _int(result: dict[str, str], name: str, default: int) -> int:
    text = result.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit():
        raise InvalidSearchError(f"{name} must be a whole number (0 or more)")
    return int(text) if len(text) <= 18 else 10**18


def _parse_value(param: SearchParam, value: str) -> Filter:
    if param.type == "date":
        prefix = value[:2] if value[:2].isalpha() else "eq"
        if prefix not in _DATE_PREFIXES:
            raise InvalidSearchError(f"{param.name}: the prefix must be one of {', '.join(_DATE_PREFIXES)}")
        text = value[2:] if value[:2].isalpha() else value
        # a '+' offset arrives as a space when the client did not percent-encode it
        text = re.sub(r" (\d{2}:\d{2})$", r"+\1", text)
        try:
            lo, hi = date_range(text)
        except ValueError as exc:
            raise InvalidSearchError(f"{param.name}: {exc}") from None
        return DateFilter(prefix, lo, hi)
    if len(value) > MAX_TOKEN_CHARS:
        raise InvalidSearchError(f"{param.name}: values are limited to {MAX_TOKEN_CHARS} characters")
    if re.search(r"(?<!\\)(\\\\)*\\\Z", value):
        raise InvalidSearchError(f"{param.name}: a value may not end in an unescaped backslash")
    parts = list(_split(value, ",", keep_escapes=True))
    if param.name == "_id":
        ids = tuple(_unescape(p) for p in parts)
        if not all(_ID_VALUE.fullmatch(i) for i in ids):
            raise InvalidSearchError("_id: expected ids (letters, digits, '-', '.'), comma-separated")
        return IdFilter(ids)
    if param.type == "reference":
        parts = [_unescape(p) for p in parts]
        alternatives: list[tuple[str | None, str | None]] = []
        for part in parts:
            target = parse_reference(part)
            if target is not None:
                alternatives.append(target)
            elif _ID_VALUE.fullmatch(part):
                alternatives.append((param.default_target, part))
            else:
                raise InvalidSearchError(
                    f"{param.name}: expected Type/id or id (id: letters, digits, '-', '.')"
                )
        return TokenFilter(param.name, tuple(alternatives))
    token: list[tuple[str | None, str | None]] = []
    for part in parts:
        pieces = list(_split(part, "|"))
        if len(pieces) == 1:
            token.append((None, pieces[0]))
        elif len(pieces) == 2:
            system, code = pieces
            token.append((system, code or None))
        else:
            raise InvalidSearchError(f"{param.name}: expected system|value, |value, system| or value")
    return TokenFilter(param.name, tuple(token))


def _split(text: str, sep: str, *, keep_escapes: bool = False) -> Iterator[str]:
    """Split on ``sep`` except where escaped with a backslash (FHIR search escaping: ``\\,`` ``\\|``)."""
    current = ""
    escaped = False
    for char in text:
        if escaped:
            current += "\\" + char if keep_escapes else char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == sep:
            yield current
            current = ""
        else:
            current += char
    yield current


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text, flags=re.DOTALL)


def _shown(name: str) -> str:
    """A parameter name fit to repeat in a message (never a value: values may hold PHI)."""
    return repr(name) if re.fullmatch(r"[A-Za-z0-9_\-.]{1,64}", name) else "(unprintable)"
