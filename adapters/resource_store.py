"""FHIR resources Interval serves, kept in SQL (SQLAlchemy 2: SQLite by default, PostgreSQL in production).

Tables:

- ``fhir_resource``: the current version of each resource (type, id, versionId, lastUpdated, JSON) with
  the columns searches filter on (status, the date range ``[date_lo, date_hi)`` in naive UTC);
- ``fhir_resource_version``: every version's JSON, for ``vread`` and for what changed between a draft
  and the signed report;
- ``fhir_search_index``: one row per token or reference a resource is found by
  (identifier, code, patient/subject, focus, target), extracted on write (``search_params.extract``);
- ``analysis_job``: idempotency key (StudyInstanceUID + model version) -> Task id, attempts.

Every write validates the resource (``fhir.resources``), and runs in one database transaction.
The store is safe to share between threads: each call opens its own session; SQLite writes are
serialised in-process (SQLite has one writer anyway) so concurrent callers wait instead of failing.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qsl

from sqlalchemy import (
    JSON,
    ColumnElement,
    DateTime,
    Index,
    Integer,
    String,
    Text,
    and_,
    delete,
    exists,
    func,
    or_,
    select,
    text,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column

from adapters.fhir_search import (
    MAX_TOKEN_CHARS,
    DateFilter,
    IdFilter,
    InvalidSearchError,
    Query,
    SearchParam,
    TokenFilter,
    extract,
    parse_query,
)
from adapters.fhir_validation import InvalidResourceError, is_fhir_id, validate_resource
from adapters.sql_store import SqlStore, utc_now
from core.errors import IntervalError

__all__ = [
    "EnqueueOutcome",
    "Job",
    "ResourceNotFoundError",
    "ResourceStore",
    "VersionConflict",
    "format_instant",
    "parse_etag",
]

EnqueueOutcome = Literal["created", "existing", "requeued"]
SearchParams = Mapping[str, str | Sequence[str]] | Iterable[tuple[str, str]]
_ETAG = re.compile(r'(?:W/)?"?([0-9]{1,9})"?')
_IDENTIFIER_ONLY = (SearchParam("identifier", "token", "conditional create"),)


class VersionConflict(IntervalError):
    """An update named a version (If-Match) that is no longer the current one."""

    reason = "version_conflict"

    def __init__(self, message: str, *, current_version: int) -> None:
        super().__init__(message)
        self.current_version = current_version


class ResourceNotFoundError(IntervalError):
    reason = "not_found"


@dataclass(frozen=True)
class Job:
    """One analysis trigger: the Task that carries it and how often it was queued."""

    key: str
    task_id: str
    attempts: int
    created: dt.datetime
    updated: dt.datetime


class _Base(DeclarativeBase):
    pass


class _Resource(_Base):
    __tablename__ = "fhir_resource"
    rtype: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer)
    last_updated: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    status: Mapped[str | None] = mapped_column(Text, nullable=True)
    date_lo: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    date_hi: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    __table_args__ = (
        Index("ix_fhir_resource_status", "rtype", "status"),
        Index("ix_fhir_resource_date", "rtype", "date_lo"),
    )


class _Version(_Base):
    __tablename__ = "fhir_resource_version"
    rtype: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    version_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_updated: Mapped[dt.datetime] = mapped_column(DateTime)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)


class _Token(_Base):
    __tablename__ = "fhir_search_index"
    pk: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rtype: Mapped[str] = mapped_column(String(64))
    res_id: Mapped[str] = mapped_column(String(64))
    param: Mapped[str] = mapped_column(String(64))
    system: Mapped[str] = mapped_column(Text)
    value: Mapped[str] = mapped_column(Text)
    __table_args__ = (
        Index("ix_fhir_search_value", "rtype", "param", "value"),
        Index("ix_fhir_search_resource", "rtype", "res_id"),
    )


class _Job(_Base):
    __tablename__ = "analysis_job"
    key: Mapped[str] = mapped_column(String(512), primary_key=True)
    task_id: Mapped[str] = mapped_column(String(64), index=True)
    attempts: Mapped[int] = mapped_column(Integer)
    created: Mapped[dt.datetime] = mapped_column(DateTime)
    updated: Mapped[dt.datetime] = mapped_column(DateTime)


def format_instant(moment: dt.datetime) -> str:
    """A FHIR instant (``2024-05-01T12:00:00.123456Z``) from a naive-UTC datetime."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_etag(value: str) -> int:
    """The version an ETag / If-Match value names: ``W/"3"``, ``"3"`` or ``3``."""
    match = _ETAG.fullmatch(value.strip())
    if not match:
        raise InvalidResourceError("If-Match", 'expected a weak ETag such as W/"3"')
    return int(match.group(1))


class ResourceStore(SqlStore):
    """FHIR resources with versions, search columns and the analysis job table."""

    def __init__(self, database_url: str) -> None:
        # one writer at a time on SQLite; PostgreSQL orders writers with row locks instead (SqlStore)
        super().__init__(database_url, _Base.metadata)
        self.database_url = database_url

    # --- resources ------------------------------------------------------------------------------

    def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Store a new resource under a fresh id (uuid4 hex); returns it with ``id`` and ``meta`` set."""
        with self._tx() as s:
            return self._insert(s, copy.deepcopy(resource), uuid.uuid4().hex)

    def read(self, resource_type: str, resource_id: str, version: int | None = None) -> dict[str, Any] | None:
        """The current version (or version ``version``) of a resource, or None."""
        if not is_fhir_id(resource_id):
            return None
        with self._tx() as s:
            row: _Resource | _Version | None
            if version is None:
                row = s.get(_Resource, (resource_type, resource_id))
            else:
                row = s.get(_Version, (resource_type, resource_id, version))
            return copy.deepcopy(row.body) if row is not None else None

    def update(
        self,
        resource: dict[str, Any],
        if_match: str | None = None,
        *,
        also_create: Sequence[dict[str, Any]] = (),
    ) -> dict[str, Any]:
        """Replace the current version of an existing resource (``resource["id"]``).

        With ``if_match`` (``W/"n"``) the update only happens when ``n`` is still the current
        version, else ``VersionConflict``; an unknown id raises ``ResourceNotFoundError``.
        ``also_create`` are new resources stored in the same transaction (the AuditEvent of the change:
        no change without its record, no record of a change that did not happen).
        """
        rtype, rid = str(resource.get("resourceType")), resource.get("id")
        if not is_fhir_id(rid):
            raise InvalidResourceError(f"{rtype}.id", "an update needs the resource's id")
        expected = parse_etag(if_match) if if_match is not None else None
        with self._tx() as s:
            row = s.get(_Resource, (rtype, rid), with_for_update=True)
            if row is None:
                raise ResourceNotFoundError(f"{rtype}/{rid} does not exist")
            if expected is not None and expected != row.version_id:
                raise VersionConflict(
                    f"{rtype}/{rid} is at version {row.version_id}, not {expected}: read it again and "
                    "re-apply the change",
                    current_version=row.version_id,
                )
            stored = self._replace(s, row, copy.deepcopy(resource))
            for extra in also_create:
                self._insert(s, copy.deepcopy(extra), uuid.uuid4().hex)
            return stored

    def search(self, resource_type: str, params: SearchParams) -> tuple[list[dict[str, Any]], int]:
        """Resources matching FHIR search ``params`` (one page) and the total number of matches."""
        return self.run_query(parse_query(resource_type, _items(params)))

    def run_query(self, query: Query) -> tuple[list[dict[str, Any]], int]:
        """Like ``search`` for an already parsed ``Query``."""
        with self._tx() as s:
            where = self._where(query)
            total = s.scalar(select(func.count()).select_from(_Resource).where(*where)) or 0
            if query.count == 0:
                return [], total
            stmt = select(_Resource.body).where(*where)
            if query.sort in ("date", "-date"):
                column = _Resource.date_lo.desc() if query.sort == "-date" else _Resource.date_lo.asc()
                stmt = stmt.order_by(_Resource.date_lo.is_(None), column)
            elif query.sort == "-_lastUpdated":
                stmt = stmt.order_by(_Resource.last_updated.desc())
            else:
                stmt = stmt.order_by(_Resource.last_updated.asc())
            stmt = stmt.order_by(_Resource.id).limit(query.count).offset(query.offset)
            return [copy.deepcopy(body) for body in s.scalars(stmt)], total

    def apply_transaction(self, bundle: dict[str, Any]) -> dict[str, str]:
        """Apply a FHIR transaction Bundle atomically; returns each entry's fullUrl -> ``Type/id``.

        Entries are ``POST`` (optionally conditional: ``ifNoneExist: identifier=system|value`` reuses
        the one existing match) or ``PUT Type/id`` (create or update, honouring ``ifMatch``). Every
        ``reference`` to another entry's fullUrl (``urn:uuid:...``) is rewritten to ``Type/id``.
        """
        if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
            raise InvalidResourceError("Bundle", "expected a Bundle resource")
        if bundle.get("type") != "transaction":
            raise InvalidResourceError("Bundle.type", "expected a transaction Bundle")
        entries = bundle.get("entry") or []
        if not isinstance(entries, list):
            raise InvalidResourceError("Bundle.entry", "expected a list of entries")
        with self._tx() as s:
            plans, targets = self._plan(s, entries)
            for plan in plans:
                if plan.reuse:
                    continue
                resource = _rewrite_references(plan.resource, targets, plan.element)
                resource["id"] = plan.resource_id
                if plan.method == "POST":
                    self._insert(s, resource, plan.resource_id, element=plan.element)
                    continue
                row = s.get(_Resource, (plan.resource_type, plan.resource_id), with_for_update=True)
                if plan.if_match is not None and (row is None or row.version_id != plan.if_match):
                    raise VersionConflict(
                        f"{plan.element}: {plan.resource_type}/{plan.resource_id} is not at version "
                        f"{plan.if_match}",
                        current_version=row.version_id if row is not None else 0,
                    )
                if row is None:
                    self._insert(s, resource, plan.resource_id, element=plan.element)
                else:
                    self._replace(s, row, resource, element=plan.element)
        return targets

    # --- analysis jobs --------------------------------------------------------------------------

    def job(self, key: str) -> Job | None:
        with self._tx() as s:
            row = s.get(_Job, key)
            return _job(row) if row is not None else None

    def job_for_task(self, task_id: str) -> Job | None:
        with self._tx() as s:
            row = s.scalars(select(_Job).where(_Job.task_id == task_id)).first()
            return _job(row) if row is not None else None

    def enqueue_task(self, key: str, task: dict[str, Any]) -> tuple[dict[str, Any], EnqueueOutcome]:
        """The Task for idempotency ``key``: stores ``task`` when the key is new (``created``),
        returns the existing Task (``existing``), or re-queues a ``failed`` one (status back to
        ``requested``, attempts + 1: ``requeued``). Safe against concurrent callers."""
        for _ in range(3):
            try:
                with self._tx() as s:
                    return self._enqueue(s, key, task)
            except IntegrityError:
                continue  # another caller inserted the same key first: read theirs
        raise IntervalError(f"analysis job {key} could not be recorded (concurrent inserts); retry")

    def _enqueue(self, s: Session, key: str, task: dict[str, Any]) -> tuple[dict[str, Any], EnqueueOutcome]:
        now = utc_now()
        job = s.get(_Job, key, with_for_update=True)
        existing = s.get(_Resource, ("Task", job.task_id), with_for_update=True) if job else None
        if job is None or existing is None:
            stored = self._insert(s, copy.deepcopy(task), uuid.uuid4().hex)
            if job is None:
                s.add(_Job(key=key, task_id=stored["id"], attempts=1, created=now, updated=now))
            else:
                job.task_id, job.attempts, job.updated = stored["id"], job.attempts + 1, now
            s.flush()
            return stored, "created"
        if existing.body.get("status") != "failed":
            return copy.deepcopy(existing.body), "existing"
        requeued = copy.deepcopy(existing.body)
        for stale in ("statusReason", "output", "executionPeriod", "businessStatus"):
            requeued.pop(stale, None)
        requeued["status"] = "requested"
        requeued["lastModified"] = format_instant(now)
        job.attempts += 1
        job.updated = now
        return self._replace(s, existing, requeued), "requeued"

    # --- internals ------------------------------------------------------------------------------

    def _insert(self, s: Session, resource: dict[str, Any], rid: str, *, element: str = "") -> dict[str, Any]:
        rtype = str(resource.get("resourceType"))
        if s.get(_Resource, (rtype, rid)) is not None:
            raise InvalidResourceError(f"{element or rtype}.id", f"{rtype}/{rid} already exists")
        row = _Resource(rtype=rtype, id=rid, version_id=0)
        s.add(row)
        return self._write(s, row, resource, element)

    def _replace(
        self, s: Session, row: _Resource, resource: dict[str, Any], *, element: str = ""
    ) -> dict[str, Any]:
        if resource.get("resourceType") != row.rtype:
            raise InvalidResourceError(f"{element or row.rtype}.resourceType", f"expected {row.rtype}")
        s.execute(delete(_Token).where(_Token.rtype == row.rtype, _Token.res_id == row.id))
        return self._write(s, row, resource, element)

    def _write(self, s: Session, row: _Resource, resource: dict[str, Any], element: str) -> dict[str, Any]:
        now = utc_now()
        version = row.version_id + 1
        resource["id"] = row.id
        meta = resource.get("meta")
        meta = meta if isinstance(meta, dict) else {}
        resource["meta"] = {**meta, "versionId": str(version), "lastUpdated": format_instant(now)}
        try:
            validate_resource(resource, row.rtype)
        except InvalidResourceError as exc:
            if not element:
                raise
            raise InvalidResourceError(f"{element}.resource: {exc.element}", exc.problem) from None
        found = extract(resource)
        for param, system, value in found.tokens:
            if len(system) > MAX_TOKEN_CHARS or len(value) > MAX_TOKEN_CHARS:
                raise InvalidResourceError(
                    f"{element or row.rtype} {param}",
                    f"systems and values are limited to {MAX_TOKEN_CHARS} characters",
                )
        row.version_id = version
        row.last_updated = now
        row.status = found.status
        row.date_lo, row.date_hi = found.date if found.date else (None, None)
        row.body = resource
        s.add(_Version(rtype=row.rtype, id=row.id, version_id=version, last_updated=now, body=resource))
        s.add_all(
            _Token(rtype=row.rtype, res_id=row.id, param=p, system=sys, value=v) for p, sys, v in found.tokens
        )
        s.flush()
        return copy.deepcopy(resource)

    def _where(self, query: Query) -> list[ColumnElement[bool]]:
        where: list[ColumnElement[bool]] = [_Resource.rtype == query.resource_type]
        for f in query.filters:
            if isinstance(f, IdFilter):
                where.append(_Resource.id.in_(f.ids))
            elif isinstance(f, DateFilter):
                where.append(_date_clause(f))
            elif f.param == "status":
                where.append(_Resource.status.in_([v for _, v in f.alternatives if v is not None]))
            elif query.resource_type == "Provenance" and f.param == "patient":
                where.append(_provenance_patient(f))
            else:
                where.append(_token_exists(f))
        return where

    def _plan(self, s: Session, entries: list[Any]) -> tuple[list[_Plan], dict[str, str]]:
        plans: list[_Plan] = []
        targets: dict[str, str] = {}
        planned_conditions: dict[tuple[str, str], str] = {}
        for i, entry in enumerate(entries):
            el = f"Bundle.entry[{i}]"
            if not isinstance(entry, dict):
                raise InvalidResourceError(el, "expected an object")
            resource, request = entry.get("resource"), entry.get("request")
            if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
                raise InvalidResourceError(f"{el}.resource", "expected a FHIR resource")
            if not isinstance(request, dict):
                raise InvalidResourceError(f"{el}.request", "a transaction entry needs a request")
            rtype, method, url = resource["resourceType"], request.get("method"), request.get("url")
            reuse = False
            if_match: int | None = None
            if method == "POST":
                if url != rtype:
                    raise InvalidResourceError(f"{el}.request.url", f"a POST of a {rtype} goes to {rtype}")
                rid = uuid.uuid4().hex
                condition = request.get("ifNoneExist")
                if condition is not None:
                    if not isinstance(condition, str):
                        raise InvalidResourceError(
                            f"{el}.request.ifNoneExist", "expected identifier=system|value"
                        )
                    found = planned_conditions.get((rtype, condition)) or self._match(s, rtype, condition, el)
                    if found is not None:
                        rid, reuse = found, True
                    planned_conditions[(rtype, condition)] = rid
            elif method == "PUT":
                if not isinstance(url, str) or url.count("/") != 1 or url.split("/")[0] != rtype:
                    raise InvalidResourceError(f"{el}.request.url", f"a PUT of a {rtype} goes to {rtype}/id")
                rid = url.split("/")[1]
                if not is_fhir_id(rid) or resource.get("id", rid) != rid:
                    raise InvalidResourceError(
                        f"{el}.request.url", "the id must be valid and match resource.id"
                    )
                if request.get("ifMatch") is not None:
                    if_match = parse_etag(str(request["ifMatch"]))
            else:
                raise InvalidResourceError(f"{el}.request.method", "only POST and PUT are supported")
            full_url = entry.get("fullUrl")
            if full_url is not None:
                if not isinstance(full_url, str) or full_url in targets:
                    raise InvalidResourceError(f"{el}.fullUrl", "must be a string, unique in the Bundle")
                targets[full_url] = f"{rtype}/{rid}"
            plans.append(_Plan(el, method, rtype, rid, resource, reuse, if_match))
        return plans, targets

    def _match(self, s: Session, rtype: str, condition: str, el: str) -> str | None:
        try:
            query = parse_query(rtype, parse_qsl(condition, keep_blank_values=True), params=_IDENTIFIER_ONLY)
        except InvalidSearchError as exc:
            raise InvalidResourceError(f"{el}.request.ifNoneExist", str(exc)) from None
        if not query.filters:
            raise InvalidResourceError(f"{el}.request.ifNoneExist", "expected identifier=system|value")
        if s.get_bind().dialect.name == "postgresql":
            # two processes creating the same resource conditionally: the second waits for the first's commit,
            # then finds it (the lock is released with the transaction)
            s.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"{rtype}?{condition}"})
        ids = list(s.scalars(select(_Resource.id).where(*self._where(query)).limit(2)))
        if len(ids) > 1:
            raise InvalidResourceError(f"{el}.request.ifNoneExist", f"matches more than one {rtype}")
        return ids[0] if ids else None


@dataclass(frozen=True)
class _Plan:
    element: str
    method: str
    resource_type: str
    resource_id: str
    resource: dict[str, Any]
    reuse: bool
    if_match: int | None


def _items(params: SearchParams) -> list[tuple[str, str]]:
    if isinstance(params, Mapping):
        items: list[tuple[str, str]] = []
        for name, value in params.items():
            values = [value] if isinstance(value, str) else list(value)
            items.extend((name, v) for v in values)
        return items
    return list(params)


def _job(row: _Job) -> Job:
    return Job(row.key, row.task_id, row.attempts, row.created, row.updated)


def _date_clause(f: DateFilter) -> ColumnElement[bool]:
    lo, hi = _Resource.date_lo, _Resource.date_hi
    if f.prefix == "eq":
        return and_(lo >= f.lo, hi <= f.hi)
    if f.prefix == "ge":
        return hi > f.lo
    if f.prefix == "gt":
        return hi > f.hi
    if f.prefix == "le":
        return lo < f.hi
    return lo < f.lo  # lt


def _token_match(token: type[_Token] | Any, f: TokenFilter) -> ColumnElement[bool]:
    options: list[ColumnElement[bool]] = []
    for system, value in f.alternatives:
        parts: list[ColumnElement[bool]] = []
        if system is not None:
            parts.append(token.system == system)
        if value is not None:
            parts.append(token.value == value)
        options.append(and_(*parts))
    return or_(*options)


def _token_exists(f: TokenFilter) -> ColumnElement[bool]:
    return exists(
        select(_Token.pk).where(
            _Token.rtype == _Resource.rtype,
            _Token.res_id == _Resource.id,
            _Token.param == f.param,
            _token_match(_Token, f),
        )
    )


def _provenance_patient(f: TokenFilter) -> ColumnElement[bool]:
    """Provenance whose target is the patient, or a stored resource whose patient is the patient."""
    target, owner = aliased(_Token), aliased(_Token)
    direct = exists(
        select(target.pk).where(
            target.rtype == _Resource.rtype,
            target.res_id == _Resource.id,
            target.param == "target",
            _token_match(target, f),
        )
    )
    via = exists(
        select(target.pk)
        .join(
            owner, and_(owner.rtype == target.system, owner.res_id == target.value, owner.param == "patient")
        )
        .where(
            target.rtype == _Resource.rtype,
            target.res_id == _Resource.id,
            target.param == "target",
            _token_match(owner, f),
        )
    )
    return or_(direct, via)


def _rewrite_references(resource: dict[str, Any], targets: dict[str, str], element: str) -> dict[str, Any]:
    """A deep copy of ``resource`` whose references to Bundle entries name the stored ``Type/id``."""

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: walk(v) for k, v in node.items()}
            ref = out.get("reference")
            if isinstance(ref, str):
                if ref in targets:
                    out["reference"] = targets[ref]
                elif ref.startswith("urn:uuid:") or ref.startswith("urn:oid:"):
                    raise InvalidResourceError(
                        f"{element}.resource", "a reference names a urn that is not an entry of this Bundle"
                    )
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    result: dict[str, Any] = walk(resource)
    return result
