"""The web pages: radiologists review evidence, edit and sign drafts; clinicians see change over time.

Server-rendered HTML (Jinja2, autoescaped: report text from a model, a prior report or a person is always
shown as text, never as markup), no JavaScript, no external assets; images are PNGs drawn on the server
(``adapters.evidence``). ``mount_web`` adds the pages to the FHIR API's app (``service.app.create_app``).

The pages, by what they own:

- ``service.web_session``: ``/login``, ``/logout``; sessions, CSRF, the origin of a form, roles.
- ``service.web_review``: ``/worklist`` and ``/reports/{id}``, the draft editor with its evidence images;
  accepting and rejecting findings, saving with a version check, signing and amending (here and at the EHR),
  sending a signature again.
- ``service.web_patients``: ``/patients/{id}``, the clinician's read-only summary and course chart.
- ``service.ai_switch``: ``/admin/ai``, where admins switch AI off (and on) per site, with a reason.
- ``service.web_model_card``: ``/model-card``, the card and instructions for use of the model in use (everyone).
- ``service.web_context``: what they share (``WebPages``: stores, images, templates, caches; the reports).
- ``service.web_ehr``: the EHR as the pages see it (a patient's history, sending a signature).

Safety: argon2id passwords; a login is a random token in an HttpOnly, SameSite=Strict cookie (Secure when
``web_cookie_secure``, required in production); every form carries a CSRF token bound to the session (the
login form a signed double-submit token); a POST from another origin is refused; only radiologists change
reports (others get a 403 page); a user reads the reports of their sites only. The site of a report is its
``adapters.fhir_publish.SITE_EXTENSION`` (recorded by the analysis), mapped by ``web_station_sites``.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from adapters.fhir_publish import EHR_REPORT_SYSTEM
from adapters.resource_store import ResourceStore
from adapters.settings import Settings
from service import ai_switch, web_model_card, web_patients, web_review, web_session
from service.users import UserStore
from service.web_context import HERE, LoginRequired, PageError, StudyImages, WebPages
from service.web_ehr import USER_SYSTEM
from service.web_session import SESSION_COOKIE

__all__ = ["EHR_REPORT_SYSTEM", "USER_SYSTEM", "StudyImages", "WebPages", "mount_web", "router"]

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)
router.include_router(web_session.router)
router.include_router(web_review.router)
router.include_router(web_patients.router)
router.include_router(ai_switch.page_router)
router.include_router(web_model_card.router)


def mount_web(
    app: FastAPI,
    settings: Settings,
    store: ResourceStore,
    users: UserStore | None = None,
    images: StudyImages | None = None,
) -> WebPages:
    """Add the pages, their static files and their error pages to ``app``."""
    web = WebPages(settings, store, users, images)
    app.state.web = web
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    @app.exception_handler(LoginRequired)
    async def login_required(_: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(f"/login?next={quote(exc.next_url, safe='/')}", 303)

    @app.exception_handler(PageError)
    async def page_error(request: Request, exc: PageError) -> Response:
        session = await run_in_threadpool(web.users.session, request.cookies.get(SESSION_COOKIE))
        return web.html(
            "error.html",
            exc.status,
            title=exc.title,
            message=exc.message,
            user=session.user if session else None,
            csrf=session.csrf_token if session else "",
        )

    return web
