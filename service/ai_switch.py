"""The per-site AI switch as admins set it: a web page (``/admin/ai``) and an API (``/api/ai-switches``).

Only an admin changes a switch, always with a reason; each change is kept (``adapters.ai_switch``: who, when,
why) and recorded as an AuditEvent (``ai-switch-change``, entity = the change's number, detail = site and
state; the reason stays in the switch history). The analysis reads the switch per study (``workers.analysis``):
a site switched off gets "AI not used" for every study analysed from then on.

API (JSON, errors as OperationOutcome):

- ``GET /api/ai-switches``: every site's current setting and the latest changes. A system token with
  ``system/AiSwitch.rs`` (or ``.read``), or a user token.
- ``PUT /api/ai-switches/{site}`` with ``{"aiEnabled": false, "reason": "..."}``: a user-level token
  (``user/AiSwitch.u``) whose ``sub`` is an admin's user name: the change is made in that admin's name.

``AiSwitch`` is Interval's own scope name (no FHIR resource type): the switch is not a FHIR resource.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from adapters.ai_switch import AiSwitchStore
from adapters.fhir_audit import AI_SWITCH_SYSTEM, audit_event, identified_entity, user_agent
from adapters.fhir_validation import InvalidResourceError
from adapters.resource_store import ResourceStore, format_instant
from core.oversight import MAX_REASON_CHARS, AiSwitch
from service.auth import Client, ForbiddenError, require
from service.outcome import FHIRResponse
from service.users import ALL_SITES, Role, User, WebSession
from service.web_context import Form, PageError, Web, WebPages
from service.web_session import check_form, require_session

__all__ = ["SwitchChange", "api_router", "change_switch", "page_router"]

page_router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)
api_router = APIRouter(tags=["AI switch"])


class SwitchChange(BaseModel):
    """What an admin sends to switch AI on or off for a site."""

    model_config = ConfigDict(extra="forbid")

    aiEnabled: bool
    reason: str = Field(min_length=1, max_length=MAX_REASON_CHARS)


def change_switch(
    switches: AiSwitchStore, store: ResourceStore, admin: User, site: str, ai_enabled: bool, reason: str
) -> AiSwitch:
    """Record ``admin``'s change of ``site``'s switch, and its AuditEvent; ``InvalidResourceError`` (400) for a
    site or reason the switch refuses, ``ForbiddenError`` for anyone but an admin."""
    if admin.role is not Role.ADMIN:
        raise ForbiddenError(
            f"only admins switch AI on or off; {admin.username} is a {admin.role.value}",
            scope="user/AiSwitch.u",
        )
    try:
        changed = switches.set(site, ai_enabled, admin.username, reason)
    except ValueError as exc:
        raise InvalidResourceError("AiSwitch", str(exc)) from None
    detail = (("site", changed.site), ("aiEnabled", "true" if changed.ai_enabled else "false"))
    store.create(
        audit_event(
            "ai-switch-change",
            user_agent(admin.username, admin.role.value),
            [identified_entity(AI_SWITCH_SYSTEM, str(changed.change_id), "security", detail)],
            recorded=changed.changed_at,
        )
    )
    return changed


def _json(switch: AiSwitch) -> dict[str, Any]:
    return {
        "site": switch.site,
        "aiEnabled": switch.ai_enabled,
        "changedBy": switch.changed_by,
        "changedAt": format_instant(switch.changed_at),
        "reason": switch.reason,
        "change": switch.change_id,
    }


def _switches(request: Request) -> AiSwitchStore:
    switches: AiSwitchStore = request.app.state.switches
    return switches


Switches = Annotated[AiSwitchStore, Depends(_switches)]


# --- API --------------------------------------------------------------------------------------------


@api_router.get(
    "/api/ai-switches", summary="Each site's AI switch and the latest changes", response_model=None
)
def read_switches(
    switches: Switches, _client: Annotated[Client, Depends(require("AiSwitch", "r"))]
) -> FHIRResponse:
    return FHIRResponse(
        {
            "sites": [_json(s) for s in switches.states().values()],
            "history": [_json(s) for s in switches.history(limit=50)],
        }
    )


@api_router.put(
    "/api/ai-switches/{site}",
    summary="Switch AI on or off for a site (an admin's user-level token; a reason is required)",
    response_model=None,
)
def put_switch(
    site: str,
    change: SwitchChange,
    request: Request,
    switches: Switches,
    client: Annotated[Client, Depends(require("AiSwitch", "u"))],
) -> FHIRResponse:
    if client.user is None:
        raise ForbiddenError(
            "the AI switch is changed in a person's name: use a user-level token (user/AiSwitch.u) of an admin",
            scope="user/AiSwitch.u",
        )
    store: ResourceStore = request.app.state.store
    return FHIRResponse(
        _json(change_switch(switches, store, client.user, site, change.aiEnabled, change.reason))
    )


# --- the admin page ---------------------------------------------------------------------------------


def _known_sites(web: WebPages, switches: AiSwitchStore) -> list[str]:
    sites = set(web.settings.web_station_sites.values()) | set(switches.states()) | web.users.sites()
    return sorted(sites - {ALL_SITES})


def _require_admin(session: WebSession) -> None:
    if session.user.role is not Role.ADMIN:
        raise PageError(
            403,
            "Not allowed",
            f"Only admins switch AI on or off. You are signed in as {session.user.display_name} "
            f"({session.user.role.value}).",
        )


def _admin_page(
    web: WebPages,
    session: WebSession,
    switches: AiSwitchStore,
    *,
    status: int = 200,
    notice: str | None = None,
    error: str | None = None,
) -> Response:
    states = switches.states()
    rows = [{"site": site, "switch": states.get(site)} for site in _known_sites(web, switches)]
    return web.page(
        "ai_switch.html",
        session,
        status,
        rows=rows,
        history=switches.history(limit=50),
        notice=notice,
        error=error,
        max_reason=MAX_REASON_CHARS,
    )


@page_router.get("/admin/ai")
def admin_page(request: Request, web: Web, switches: Switches, done: str = "") -> Response:
    session = require_session(web, request)
    _require_admin(session)
    return _admin_page(web, session, switches, notice="AI switch changed." if done else None)


@page_router.post("/admin/ai")
def admin_change(request: Request, web: Web, form: Form, switches: Switches) -> Response:
    session = require_session(web, request)
    _require_admin(session)
    check_form(web, request, session, form)
    state = form.get("state")
    if state not in ("on", "off"):
        raise PageError(400, "Form refused", "Choose whether AI is on or off for the site.")
    try:
        change_switch(
            switches, web.store, session.user, form.get("site", ""), state == "on", form.get("reason", "")
        )
    except InvalidResourceError as exc:
        return _admin_page(web, session, switches, status=400, error=exc.problem)
    return RedirectResponse("/admin/ai?done=1", 303)
