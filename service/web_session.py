"""Who is asking: signing in and out, sessions, CSRF, the origin of a form and a person's role.

A login is a random token in an HttpOnly, SameSite=Strict cookie (Secure when ``web_cookie_secure``); the
accounts and sessions themselves are ``service.users``. Every form carries a CSRF token bound to the session
(the login form a signed double-submit token, bound to a nonce cookie); a POST from another origin is
refused; only radiologists change reports (others get a 403 page). Which sites a person reads is checked
where a report is read (``service.web_context.WebPages.report``).
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from service.users import Role, User, WebSession, csrf_matches, login_csrf_token
from service.web_context import Form, LoginRequired, PageError, Web, WebPages

__all__ = [
    "LOGIN_COOKIE",
    "SESSION_COOKIE",
    "check_form",
    "check_origin",
    "require_radiologist",
    "require_session",
    "router",
]

SESSION_COOKIE = "interval_session"
LOGIN_COOKIE = "interval_login"

router = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)


def require_session(web: WebPages, request: Request) -> WebSession:
    """The signed-in person's session; ``LoginRequired`` (a redirect that comes back here) without one."""
    session = web.users.session(request.cookies.get(SESSION_COOKIE))
    if session is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    return session


def check_form(web: WebPages, request: Request, session: WebSession, form: dict[str, str]) -> None:
    """Refuse a POST that comes from another origin or lacks the session's CSRF token."""
    check_origin(web, request)
    if not csrf_matches(session.csrf_token, form.get("csrf_token")):
        raise PageError(
            403,
            "Form refused",
            "This form did not carry a valid security token (it is old, or it came from another site). "
            "Reload the page and try again.",
        )


def check_origin(web: WebPages, request: Request) -> None:
    origin = request.headers.get("origin")
    if origin is None:  # not sent by every client on same-origin requests; the CSRF token still applies
        return
    own = {f"{request.url.scheme}://{request.url.netloc}", web.settings.public_base_url}
    if origin not in own:
        raise PageError(403, "Form refused", "This request came from another site and was refused.")


def require_radiologist(session: WebSession, what: str) -> None:
    """Refuse (403 page) a person who is not a radiologist; ``what`` completes "Only radiologists can ..."."""
    if not session.user.can_sign:
        raise PageError(
            403,
            "Not allowed",
            f"Only radiologists can {what}. You are signed in as {session.user.display_name} "
            f"({session.user.role.value}).",
        )


def _login_token(web: WebPages, nonce: str) -> str:
    key = hmac.new(web.settings.api_token_secret.encode(), b"interval-web-login", "sha256").digest()
    return login_csrf_token(key, nonce)


def _set_cookie(web: WebPages, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="strict",
        secure=web.settings.web_cookie_secure,
    )


def _safe_next(target: str | None) -> str:
    """A same-site path to go to after signing in; anything else (another host, odd characters) is "/"."""
    if (
        not target
        or not target.startswith("/")
        or target.startswith("//")
        or "\\" in target
        or not target.isprintable()
        or any(c.isspace() for c in target)
    ):
        return "/"
    return target


def _home(user: User) -> str:
    return "/patients" if user.role is Role.CLINICIAN else "/worklist"


@router.get("/login")
def login_page(request: Request, web: Web, next: str = "/") -> Response:
    session = web.users.session(request.cookies.get(SESSION_COOKIE))
    if session is not None:
        return RedirectResponse(_safe_next(next) if next != "/" else _home(session.user), 303)
    nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)
    response = web.html(
        "login.html", csrf=_login_token(web, nonce), next=_safe_next(next), error=None, user=None
    )
    _set_cookie(web, response, LOGIN_COOKIE, nonce, 3600)
    return response


@router.post("/login")
def login(request: Request, web: Web, form: Form) -> Response:
    check_origin(web, request)
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not csrf_matches(_login_token(web, nonce), form.get("csrf_token")):
        raise PageError(
            403, "Form refused", "The sign-in form has expired. Reload the page and sign in again."
        )
    user = web.users.authenticate(form.get("username", "")[:64], form.get("password", "")[:1024])
    target = _safe_next(form.get("next"))
    if user is None:
        return web.html(
            "login.html",
            401,
            csrf=_login_token(web, nonce),
            next=target,
            user=None,
            error="The user name or the password is not right.",
        )
    ttl = dt.timedelta(hours=web.settings.web_session_ttl_h)
    token, _ = web.users.start_session(user, ttl)
    response = RedirectResponse(target if target != "/" else _home(user), 303)
    _set_cookie(web, response, SESSION_COOKIE, token, int(ttl.total_seconds()))
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


@router.post("/logout")
def logout(request: Request, web: Web, form: Form) -> Response:
    session = require_session(web, request)
    check_form(web, request, session, form)
    web.users.end_session(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/login", 303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/")
def home(request: Request, web: Web) -> Response:
    return RedirectResponse(_home(require_session(web, request).user), 303)
