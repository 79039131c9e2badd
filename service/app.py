"""Interval's FHIR-facing API (FastAPI): what EHR systems call.

Run it with ``uvicorn service.app:create_app --factory``. Routes live under ``/fhir`` and speak
``application/fhir+json`` (``application/json`` is accepted too); every error is an
``OperationOutcome`` with the status that fits (``service.outcome``). Routes only parse input, call
the store or the runner, and map results: the work happens in ``adapters.resource_store`` and ``service.jobs``.

Interactions (``service.capability.SERVED``): Task create/read/vread/search (create is idempotent per
StudyInstanceUID + model version); DiagnosticReport read/vread/search/update (If-Match required);
Observation, BodyStructure, Provenance, AuditEvent and DocumentReference (the model card)
read/vread/search. ``GET /fhir/metadata`` needs no token; everything else needs a bearer JWT with the SMART
scope of the interaction (``service.auth``).

Human oversight (``service.signoff``): an update that makes a report ``final``/``amended`` or changes a signed
one needs a radiologist's user-level token (403 otherwise) and every AI finding reviewed (422 otherwise); every
update, signature and refusal is recorded as an AuditEvent. The per-site AI switch has its own small JSON API
(``service.ai_switch``).

The web pages for radiologists and clinicians (``service.web``: sessions, not bearer tokens) are mounted on
the same app, outside ``/fhir``.
"""

import datetime as dt
import email.utils
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from enum import Enum
from importlib import metadata
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import PlainTextResponse
from starlette.routing import Match, Route

from adapters.ai_switch import AiSwitchStore
from adapters.evidence import report_text
from adapters.fhir_audit import audit_event, report_entities
from adapters.fhir_model_card import (
    DOCUMENT_TYPE_SYSTEM,
    MODEL_CARD,
    MissingModelCard,
    ModelCard,
    publish_model_card,
)
from adapters.fhir_priors import REQUIRED_STATUS
from adapters.fhir_search import COMMON_PARAMS, SEARCH_PARAMS, Query, parse_query
from adapters.fhir_validation import (
    InvalidResourceError,
    check_json_safe,
    is_fhir_id,
    require_code,
    validate_resource,
)
from adapters.resource_store import ResourceNotFoundError, ResourceStore, format_instant, parse_etag
from adapters.settings import Settings
from adapters.sql_store import utc_now
from adapters.telemetry import StoreCollector, metrics_text, redis_queue_depths
from core.errors import IntervalError, OversightError
from core.oversight import SIGNED_STATUSES, changes_signature
from service import ai_switch
from service.auth import Client, ForbiddenError, TokenVerifier, require
from service.capability import SERVED, Served, capability_statement
from service.drift_api import mount_drift
from service.jobs import (
    TASK_KEY_SYSTEM,
    AnalysisRequest,
    Analyzer,
    InProcessRunner,
    TaskRunner,
    UnconfiguredAnalyzer,
    check_new_task,
    job_key,
    mark_failed,
    resume_pending,
)
from service.openapi_docs import (
    body_doc,
    bundle_schema,
    report_schema,
    resource_schema,
    responses,
    search_parameters,
    task_schema,
)
from service.outcome import (
    FHIR_JSON,
    FHIRResponse,
    PreconditionRequiredError,
    UnsupportedMediaTypeError,
    operation_outcome,
    outcome_for,
)
from service.signoff import (
    agent_of,
    record_refusal,
    record_signature,
    require_reviewed,
    require_signer,
    signature_kind,
    signer,
)
from service.users import UserStore
from service.web import mount_web
from service.web_context import WebPages, now_instant

__all__ = ["create_app"]

log = logging.getLogger("interval.service")

_ETAG_PATTERN = r'^(W/)?"[0-9]{1,9}"$'
_JSON_MEDIA = ("application/fhir+json", "application/json", "application/json+fhir")
REPORT_STATUSES = frozenset(REQUIRED_STATUS["DiagnosticReport"])  # the one value set, kept with the reader


def _software_version() -> str:
    try:
        return metadata.version("interval")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def create_app(
    settings: Settings | None = None,
    store: ResourceStore | None = None,
    runner: TaskRunner | None = None,
    analyzer: Analyzer | None = None,
    users: UserStore | None = None,
    switches: AiSwitchStore | None = None,
    model_card: ModelCard | MissingModelCard | None = None,
) -> FastAPI:
    """The FHIR API and the web pages. Without ``store`` it opens ``settings.database_url``; without
    ``runner`` it runs ``analyzer`` in-process (and, with no analyzer either, records every Task as failed,
    saying why); without ``users`` the web accounts, and without ``switches`` the AI switch, live in the
    store's database. ``model_card`` is the card of the model the settings choose (``workers.serve`` finds it):
    shown at ``/model-card`` and published to the store as a DocumentReference when the app starts."""
    settings = settings if settings is not None else Settings()
    store = store if store is not None else ResourceStore(settings.database_url)
    owns_switches = switches is None
    ai_switches = switches if switches is not None else AiSwitchStore(store.database_url)
    owns_runner = runner is None
    task_runner: TaskRunner = (
        runner if runner is not None else InProcessRunner(store, analyzer or UnconfiguredAnalyzer())
    )
    base = settings.public_base_url.rstrip("/")
    started = format_instant(utc_now())
    capability = capability_statement(settings, _software_version(), started)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if isinstance(model_card, ModelCard):
            try:
                app.state.model_card_published = await run_in_threadpool(
                    publish_model_card, store, model_card
                )
            except IntervalError as exc:  # the API still serves; the page says the card is not in the store
                log.error("the model card of %s was not published: %s", model_card.model_version, exc)
        if owns_runner:
            resumed = await run_in_threadpool(resume_pending, store, task_runner)
            if resumed:
                log.info("resumed %d pending analyses", resumed)
        yield
        if owns_runner and isinstance(task_runner, InProcessRunner):
            task_runner.shutdown(wait=False)
        app.state.web.close()
        if owns_switches:
            ai_switches.close()

    app = FastAPI(
        title="Interval FHIR API",
        version=_software_version(),
        description=__doc__,
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
        default_response_class=FHIRResponse,
    )
    app.state.settings = settings
    app.state.store = store
    app.state.runner = task_runner
    app.state.switches = ai_switches
    app.state.model_card = model_card
    app.state.model_card_published = None
    app.state.token_verifier = TokenVerifier.from_settings(settings)
    _install_error_handlers(app)

    task_statuses = ("requested", "in-progress", "completed", "failed")

    def task_counts() -> dict[str, int]:
        return {
            status: store.search("Task", {"status": status, "_count": "0"})[1] for status in task_statuses
        }

    broker = getattr(settings, "broker_url", None)
    collector = StoreCollector(
        task_counts,
        redis_queue_depths(broker, ("imaging", "default")) if broker and not owns_runner else None,
    )

    @app.get(
        "/metrics",
        summary="Prometheus metrics (analyses by outcome and reason, step durations, Tasks, queue depth)",
        tags=["operations"],
        include_in_schema=False,
    )
    def read_metrics() -> PlainTextResponse:
        return PlainTextResponse(
            metrics_text(collector), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    @app.get(
        "/fhir/metadata",
        summary="CapabilityStatement of this server (no token needed)",
        tags=["conformance"],
        response_model=None,
        responses=responses({200: resource_schema("CapabilityStatement")}),
    )
    def read_metadata() -> FHIRResponse:
        return FHIRResponse(capability)

    @app.post(
        "/fhir/Task",
        status_code=201,
        summary="Order an analysis (idempotent per StudyInstanceUID and model version)",
        tags=["Task"],
        response_model=None,
        responses=responses(
            {201: resource_schema("Task"), 200: resource_schema("Task")}, 400, 401, 403, 415, versioned=True
        ),
        openapi_extra=body_doc(
            task_schema(),
            "A Task with code analyze, focus = the ImagingStudy (identifier urn:dicom:uid), for = the Patient.",
        ),
    )
    def create_task(
        _client: Annotated[Client, Depends(require("Task", "c"))],
        body: Annotated[dict[str, Any], Depends(_fhir_body)],
    ) -> FHIRResponse:
        validate_resource(body, "Task")
        request = check_new_task(body)
        key = job_key(request.study_uid, task_runner.model_version)
        stored, outcome = store.enqueue_task(key, _new_task(body, key))
        if outcome != "existing":
            try:
                task_runner.submit(replace(AnalysisRequest.from_fhir(stored), task_id=stored["id"]))
            except IntervalError as exc:
                log.warning("Task/%s could not be queued: %s", stored["id"], exc.reason)
                stored = mark_failed(store, stored["id"], str(exc))
        return _resource_response(stored, base, 201 if outcome == "created" else 200, location=True)

    for served in SERVED:
        _add_read_routes(app, store, base, served)

    @app.put(
        "/fhir/DiagnosticReport/{id}",
        summary="Update a report; If-Match must name the version read",
        tags=["DiagnosticReport"],
        response_model=None,
        responses=responses(
            {200: resource_schema("DiagnosticReport")}, 400, 401, 403, 404, 412, 415, 422, 428, versioned=True
        ),
        openapi_extra=body_doc(
            report_schema(),
            "The DiagnosticReport as read, with the changes applied. Making it final or amended, or changing a "
            "signed report, takes a radiologist's user-level token and every AI finding reviewed (422 otherwise).",
        ),
    )
    def update_report(
        id: str,
        client: Annotated[Client, Depends(require("DiagnosticReport", "u"))],
        body: Annotated[dict[str, Any], Depends(_fhir_body)],
        if_match: Annotated[
            str | None,
            Header(
                alias="If-Match",
                pattern=_ETAG_PATTERN,
                description='W/"versionId" of the version the change was made to (its ETag)',
            ),
        ] = None,
    ) -> FHIRResponse:
        if if_match is None:
            raise PreconditionRequiredError(
                'If-Match is required: send W/"versionId" of the version you read (its ETag)'
            )
        existing = store.read("DiagnosticReport", id)
        web: WebPages = app.state.web
        if existing is None or not _visible(web, client, existing):
            raise ResourceNotFoundError(_not_found("DiagnosticReport", id))
        validate_resource(body, "DiagnosticReport")
        if body.get("id") != id:
            raise InvalidResourceError("DiagnosticReport.id", "must equal the id in the URL")
        require_code(body.get("status"), "DiagnosticReport.status", REPORT_STATUSES)
        if body.get("subject") != existing.get("subject"):
            raise InvalidResourceError(
                "DiagnosticReport.subject", "cannot be changed by an update (a report stays with its patient)"
            )
        read_version = parse_etag(if_match)
        old, new = str(existing.get("status")), str(body["status"])
        agent = agent_of(client)
        if not changes_signature(old, new):
            edit = audit_event("report-edit", agent, report_entities(body, read_version + 1))
            stored = store.update(body, if_match=if_match, also_create=[edit])
            return _resource_response(stored, base, 200)
        kind = signature_kind(old)
        try:
            user = require_signer(
                client, "a DiagnosticReport becomes final or amended, and a signed one changes,"
            )
            if old not in SIGNED_STATUSES:  # the first signature; the page reviews drafts only, too
                require_reviewed(web, web.wrap(existing, with_analysis=True))
        except ForbiddenError:
            who = f"a {client.user.role.value}" if client.user else "a system client"
            record_refusal(
                store, kind, agent, existing, f"refused: only a radiologist signs; the caller is {who}"
            )
            raise
        except OversightError as exc:
            record_refusal(store, kind, agent, existing, f"refused: {exc}")
            raise
        now = now_instant()
        signed_body = {**body, "resultsInterpreter": [signer(user)], "issued": now}
        signed_event = audit_event(kind, agent, report_entities(body, read_version + 1))
        stored = store.update(signed_body, if_match=if_match, also_create=[signed_event])
        if new in SIGNED_STATUSES:
            record_signature(
                web,
                web.wrap(stored, with_analysis=False),
                user,
                read_version=read_version,
                text=report_text(stored),
                now=now,
                ehr_status="signed through the API: not sent to the EHR",
            )
        return _resource_response(stored, base, 200)

    app.include_router(ai_switch.api_router)
    app.state.users = mount_web(app, settings, store, users).users
    mount_drift(app, collector)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _add_read_routes(app: FastAPI, store: ResourceStore, base: str, served: Served) -> None:
    rtype = served.type
    tags: list[str | Enum] = [rtype]
    params = (*SEARCH_PARAMS.get(rtype, ()), *COMMON_PARAMS)

    def read(
        id: str, request: Request, client: Annotated[Client, Depends(require(rtype, "r"))]
    ) -> FHIRResponse:
        resource = store.read(rtype, id)
        if resource is None or not _visible(request.app.state.web, client, resource):
            raise ResourceNotFoundError(_not_found(rtype, id))
        return _resource_response(resource, base, 200)

    def vread(
        id: str, vid: str, request: Request, client: Annotated[Client, Depends(require(rtype, "r"))]
    ) -> FHIRResponse:
        resource = (
            store.read(rtype, id, int(vid)) if vid.isascii() and vid.isdigit() and len(vid) <= 9 else None
        )
        if resource is None or not _visible(request.app.state.web, client, resource):
            raise ResourceNotFoundError(f"{_not_found(rtype, id)} (at that version)")
        return _resource_response(resource, base, 200)

    def search(request: Request, _client: Annotated[Client, Depends(require(rtype, "s"))]) -> FHIRResponse:
        items = request.query_params.multi_items()
        query = parse_query(rtype, items)
        found, total = store.run_query(query)
        return FHIRResponse(_searchset(rtype, base, items, query, found, total))

    read.__name__, vread.__name__, search.__name__ = f"read_{rtype}", f"vread_{rtype}", f"search_{rtype}"
    ok = resource_schema(rtype)
    app.add_api_route(
        f"/fhir/{rtype}/{{id}}",
        read,
        methods=["GET"],
        summary=f"Read a {rtype}",
        tags=tags,
        response_model=None,
        responses=responses({200: ok}, 401, 403, 404, versioned=True),
    )
    app.add_api_route(
        f"/fhir/{rtype}/{{id}}/_history/{{vid}}",
        vread,
        methods=["GET"],
        summary=f"Read one version of a {rtype}",
        tags=tags,
        response_model=None,
        responses=responses({200: ok}, 401, 403, 404, versioned=True),
    )
    app.add_api_route(
        f"/fhir/{rtype}",
        search,
        methods=["GET"],
        summary=f"Search {rtype} (strict: unknown parameters are refused with 400)",
        tags=tags,
        response_model=None,
        responses=responses({200: bundle_schema(rtype)}, 400, 401, 403),
        openapi_extra={"parameters": search_parameters(params)},
    )


async def _fhir_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object; 415 for another media type, 400 for anything but JSON."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media not in _JSON_MEDIA:
        raise UnsupportedMediaTypeError(f"send the resource as {FHIR_JSON} (or application/json)")
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidResourceError("(body)", "not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidResourceError("(body)", "expected a JSON object holding a FHIR resource")
    rtype = data.get("resourceType")
    check_json_safe(
        data, rtype if isinstance(rtype, str) and is_fhir_id(rtype) and rtype[:1].isupper() else "(body)"
    )
    return data


def _new_task(body: dict[str, Any], key: str) -> dict[str, Any]:
    """The Task as stored: the client's, with the server's id, timestamps and idempotency key."""
    now = format_instant(utc_now())
    task = {k: v for k, v in body.items() if k != "id"}
    task.setdefault("authoredOn", now)
    task["lastModified"] = now
    identifiers = [
        i
        for i in task.get("identifier") or []
        if not (isinstance(i, dict) and i.get("system") == TASK_KEY_SYSTEM)
    ]
    task["identifier"] = [*identifiers, {"system": TASK_KEY_SYSTEM, "value": key}]
    return task


def _visible(web: WebPages, client: Client, resource: dict[str, Any]) -> bool:
    """Whether the caller may see ``resource``: a system client sees everything it has the scope for; a person
    (a user-level token) only what their sites may read (``User.can_read_site``), as on the web pages."""
    if _is_model_card(resource):  # the model's documentation: no site, no patient
        return True
    return client.user is None or client.user.can_read_site(web.site_of(resource))


def _is_model_card(resource: dict[str, Any]) -> bool:
    codings = (resource.get("type") or {}).get("coding") or []
    return resource.get("resourceType") == "DocumentReference" and any(
        c.get("system") == DOCUMENT_TYPE_SYSTEM and c.get("code") == MODEL_CARD for c in codings
    )


def _not_found(rtype: str, rid: str) -> str:
    return f"{rtype}/{rid} is not known" if is_fhir_id(rid) else f"no {rtype} has that id"


def _version_headers(resource: dict[str, Any]) -> dict[str, str]:
    meta = resource.get("meta") or {}
    headers = {"ETag": f'W/"{meta.get("versionId")}"'}
    try:
        updated = dt.datetime.fromisoformat(str(meta.get("lastUpdated")).replace("Z", "+00:00"))
        headers["Last-Modified"] = email.utils.format_datetime(updated.astimezone(dt.UTC), usegmt=True)
    except ValueError:
        pass  # a resource written without lastUpdated has no Last-Modified to give
    return headers


def _resource_response(
    resource: dict[str, Any], base: str, status: int, *, location: bool = False
) -> FHIRResponse:
    headers = _version_headers(resource)
    if location:
        version = (resource.get("meta") or {}).get("versionId")
        headers["Location"] = f"{base}/fhir/{resource['resourceType']}/{resource['id']}/_history/{version}"
    return FHIRResponse(resource, status_code=status, headers=headers)


def _searchset(
    rtype: str,
    base: str,
    items: list[tuple[str, str]],
    query: Query,
    found: list[dict[str, Any]],
    total: int,
) -> dict[str, Any]:
    criteria = [(k, v) for k, v in items if k not in ("_sort", "_count", "_offset")]

    def link(relation: str, offset: int) -> dict[str, str]:
        paging = [(k, v) for k, v in replace(query, offset=offset).result_params()]
        return {"relation": relation, "url": f"{base}/fhir/{rtype}?{urlencode([*criteria, *paging])}"}

    links = [link("self", query.offset)]
    if query.count and query.offset + query.count < total:
        links.append(link("next", query.offset + query.count))
    if query.count and query.offset > 0:
        links.append(link("previous", max(0, query.offset - query.count)))
    return {
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": [
            {"fullUrl": f"{base}/fhir/{rtype}/{r['id']}", "resource": r, "search": {"mode": "match"}}
            for r in found
        ],
    }


def _install_error_handlers(app: FastAPI) -> None:
    def answer(exc: BaseException, extra_headers: dict[str, str] | None = None) -> FHIRResponse:
        status, outcome, headers = outcome_for(exc)
        return FHIRResponse(outcome, status_code=status, headers={**headers, **(extra_headers or {})})

    @app.exception_handler(IntervalError)
    async def interval_error(_: Request, exc: IntervalError) -> FHIRResponse:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> FHIRResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "(request)"
        outcome = operation_outcome(400, f"{where}: {first.get('msg', 'invalid')}")
        return FHIRResponse(outcome, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> FHIRResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(_allowed_methods(app, request))
        detail = {404: "no such route: FHIR interactions live under /fhir", 405: "method not allowed here"}
        outcome = operation_outcome(exc.status_code, detail.get(exc.status_code, str(exc.detail)))
        return FHIRResponse(outcome, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> FHIRResponse:
        return answer(exc)


def _allowed_methods(app: FastAPI, request: Request) -> list[str]:
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.methods:
            match, _ = route.matches(request.scope)
            if match != Match.NONE:
                methods |= route.methods
    return sorted(methods)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema without its validation 422 responses: validation errors here are FHIR 400s."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            answers = operation.get("responses", {})
            if answers.get("422", {}).get("description") == "Validation Error":
                answers.pop("422")  # FastAPI's own; an oversight refusal's 422 is documented and kept
            for parameter in operation.get("parameters", []):
                if parameter.get("in") == "header" and parameter.get("name", "").lower() == "if-match":
                    parameter["required"] = True  # missing: 428, as RFC 6585 has it
                    parameter["schema"] = {"type": "string", "pattern": _ETAG_PATTERN}
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    if "schemas" in schema.get("components", {}) and not components:
        schema["components"].pop("schemas")
    app.openapi_schema = schema
    return schema
