"""Who may call the FHIR API: bearer JWTs carrying SMART on FHIR system scopes.

A token is a JWT signed HS256 with ``settings.api_token_secret`` or, when
``settings.api_token_public_key`` names a PEM RSA public key, RS256/RS384 by the holder of the
private key (a SMART authorization server). Required claims: ``sub`` (the client id), ``iss``
(``settings.api_token_issuer``), ``exp``, and ``scope``: space-separated system scopes, v1
(``system/Task.read``, ``system/*.write``) or v2 (``system/Task.cruds`` letters). ``read`` grants
read + search, ``write`` create + update + delete, ``*`` everything. An ``aud`` claim, when present,
must be the API's base URL. Scopes with a query (``system/Task.rs?code=...``) and patient scopes grant nothing.

User-level scopes (``user/DiagnosticReport.ru``) make the token act for a person: its ``sub`` must be the user
name of an active Interval account (``service.users``), whose role and sites are read at each request (a
deactivated account or a changed role takes effect at once). They grant read and update of single resources
only (search and create stay with system clients); a resource of a site the person may not read is "not found".
A radiologist's user token is what signs a report through the API (``service.signoff``); an admin's changes the
AI switch (``service.ai_switch``).

Every route declares what it needs with ``require(resource_type, action)``. A missing, malformed or
expired token raises ``AuthenticationError`` (401, ``WWW-Authenticate: Bearer``); a token without the
scope raises ``ForbiddenError`` (403) naming the scope to ask for.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import jwt
from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from adapters.settings import Settings
from core.errors import IntervalError
from service.users import User, UserStore

__all__ = [
    "AuthenticationError",
    "Client",
    "ForbiddenError",
    "TokenVerifier",
    "mint_token",
    "require",
    "scope_grants",
]

Action = Literal["c", "r", "u", "d", "s"]
_ALL: frozenset[str] = frozenset("cruds")
_V1 = {"read": frozenset("rs"), "write": frozenset("cud"), "*": _ALL}
_SCOPE = re.compile(r"(system|user)/(\*|[A-Z][A-Za-z]{1,63})\.(read|write|\*|c?r?u?d?s?)")
_USER_ACTIONS = frozenset("ru")  # what a person's token may do: read and update single resources
_RSA_ALGORITHMS = ("RS256", "RS384")
_LEEWAY_S = 30


class AuthenticationError(IntervalError):
    """No usable bearer token: missing, malformed, badly signed, expired or from another issuer."""

    reason = "unauthenticated"

    def __init__(self, message: str, *, token_given: bool = True) -> None:
        super().__init__(message)
        self.token_given = token_given

    def www_authenticate(self) -> str:
        """The RFC 6750 challenge for the 401 response."""
        return (
            'Bearer realm="interval", error="invalid_token"'
            if self.token_given
            else 'Bearer realm="interval"'
        )


class ForbiddenError(IntervalError):
    """A valid token whose scopes do not cover the request; ``scope`` is the one to ask for."""

    reason = "forbidden"

    def __init__(self, message: str, *, scope: str) -> None:
        super().__init__(message)
        self.scope = scope

    def www_authenticate(self) -> str:
        return f'Bearer realm="interval", error="insufficient_scope", scope="{self.scope}"'


def scope_grants(scope: str) -> tuple[str, frozenset[str]] | None:
    """``(resource type or "*", actions)`` a SMART system or user scope grants, None for any other scope."""
    match = _SCOPE.fullmatch(scope)
    if match is None:
        return None
    level, resource, access = match.groups()
    actions = _V1.get(access, frozenset(access))
    if level == "user":
        actions &= _USER_ACTIONS
    return (resource, actions) if actions else None


def _user_level(scope: str) -> bool:
    return scope.startswith("user/")


@dataclass(frozen=True)
class Client:
    """An authenticated caller: the token's ``sub`` and its scopes; ``user`` is the person a user-level token
    acts for (set by ``require`` from the accounts)."""

    client_id: str
    scopes: frozenset[str]
    user: User | None = None

    @property
    def user_level(self) -> bool:
        """Whether the token acts for a person (it has ``user/`` scopes)."""
        return any(_user_level(s) for s in self.scopes)

    def allows(self, resource_type: str, action: str) -> bool:
        for scope in self.scopes:
            grant = scope_grants(scope)
            if grant is not None and grant[0] in ("*", resource_type) and action in grant[1]:
                return True
        return False


class TokenVerifier:
    """Checks bearer JWTs; the keys are read once, at start."""

    def __init__(
        self,
        secret: str,
        issuer: str,
        *,
        public_key_pem: str | None = None,
        audiences: Iterable[str] = (),
    ) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audiences = list(audiences)
        self._public_key: Any = None
        if public_key_pem is not None:
            try:
                self._public_key = jwt.algorithms.RSAAlgorithm(
                    jwt.algorithms.RSAAlgorithm.SHA256
                ).prepare_key(public_key_pem)
            except (jwt.exceptions.InvalidKeyError, ValueError, TypeError) as exc:
                raise ValueError(f"the API token public key is not a PEM RSA public key ({exc})") from None

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        pem = settings.api_token_public_key.read_text() if settings.api_token_public_key else None
        base = settings.public_base_url.rstrip("/")
        return cls(
            settings.api_token_secret,
            settings.api_token_issuer,
            public_key_pem=pem,
            audiences=(base, f"{base}/fhir"),
        )

    def verify(self, token: str) -> Client:
        """The client a token names, or ``AuthenticationError`` saying what is wrong with it."""
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise AuthenticationError("the bearer token is not a well-formed JWT") from None
        algorithm = header.get("alg")
        if algorithm == "HS256":
            key: Any = self._secret
        elif algorithm in _RSA_ALGORITHMS and self._public_key is not None:
            key = self._public_key
        else:
            accepted = "HS256" + (", RS256, RS384" if self._public_key is not None else "")
            raise AuthenticationError(f"the bearer token's algorithm is not accepted; use {accepted}")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[str(algorithm)],
                issuer=self._issuer,
                audience=self._audiences if "aud" in unverified else None,
                leeway=_LEEWAY_S,
                options={"require": ["exp", "iss", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("the bearer token has expired; request a new one") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError(
                "the bearer token was issued by another issuer than this API trusts"
            ) from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError(
                "the bearer token is meant for another audience than this API"
            ) from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"the bearer token lacks the {exc.claim} claim") from None
        except jwt.PyJWTError:
            raise AuthenticationError("the bearer token's signature or claims are not valid") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthenticationError("the bearer token's sub claim must name the client")
        scope = claims.get("scope", "")
        scopes = scope.split() if isinstance(scope, str) else [s for s in scope if isinstance(s, str)]
        return Client(subject, frozenset(scopes))


def mint_token(
    secret: str,
    client_id: str,
    scopes: str | Iterable[str],
    ttl_s: int = 3600,
    issuer: str = "interval",
) -> str:
    """An HS256 bearer token for ``client_id`` (development, tests, and trusted internal callers)."""
    now = int(time.time())
    scope = scopes if isinstance(scopes, str) else " ".join(scopes)
    claims = {"sub": client_id, "iss": issuer, "iat": now, "exp": now + ttl_s, "scope": scope}
    return jwt.encode(claims, secret, algorithm="HS256")


_bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    bearerFormat="JWT",
    description="A JWT with SMART system scopes, e.g. 'system/Task.c system/DiagnosticReport.rs'.",
)


def require(resource_type: str, action: Action) -> Callable[..., Client]:
    """A FastAPI dependency: the calling ``Client``, when its token grants ``action`` on the type."""

    def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
    ) -> Client:
        verifier: TokenVerifier = request.app.state.token_verifier
        if credentials is None:
            raise AuthenticationError(
                "a bearer token is required: Authorization: Bearer <JWT>", token_given=False
            )
        client = verifier.verify(credentials.credentials)
        if client.user_level:
            users: UserStore = request.app.state.users
            user = users.get(client.client_id)
            if user is None:
                raise AuthenticationError(
                    f"the bearer token acts for user {_shown(client.client_id)} (user/ scopes), who has no "
                    "active Interval account"
                )
            client = replace(client, user=user)
        if not client.allows(resource_type, action):
            v1 = "read" if action in ("r", "s") else "write"
            scope = f"system/{resource_type}.{action}"
            raise ForbiddenError(
                f"this request needs the scope {scope} (or system/{resource_type}.{v1}); "
                f"the token of client {_shown(client.client_id)} lacks it",
                scope=scope,
            )
        request.state.client = client
        return client

    dependency.__name__ = f"require_{resource_type}_{action}"
    return dependency


def _shown(client_id: str) -> str:
    return client_id if re.fullmatch(r"[A-Za-z0-9_\-.:@/]{1,128}", client_id) else "(unprintable id)"
