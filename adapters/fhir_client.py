"""An EHR's FHIR R4 REST API over HTTP (httpx, async): search, read, transaction, conditional update.

What a hospital integration engineer expects of a FHIR client:

- **Timeouts** on connect and read, **retries with exponential backoff** on 429 and 5xx (``Retry-After``
  honoured, capped) and on transport errors; once the retries are spent the call raises
  ``ExternalServiceError`` (retryable later: the job is recorded, not lost).
- **4xx** raise ``ExternalRequestError`` with the server's OperationOutcome issue code and a shortened
  diagnostics text (a 412 on ``If-Match`` raises ``ConcurrentEditError``).
- **SMART Backend Services** authentication when the EHR requires it: a ``client_credentials`` grant with a
  signed JWT client assertion (RS384 or ES384), the token cached until shortly before it expires and renewed
  once on a 401.
- **Paging**: searches follow ``next`` links, so the number of round trips grows with pages, not with rows.
- ``round_trips`` counts every HTTP request sent (token requests included) for monitoring and tests.

Responses are parsed as JSON here and validated with ``fhir.resources`` by the callers that map them
(``adapters.fhir_priors``); an invalid resource raises ``InvalidPriorsError`` there.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt

from core.errors import ConcurrentEditError, ExternalRequestError, ExternalServiceError

__all__ = ["FhirClient", "RetryPolicy", "SmartBackendAuth"]

log = logging.getLogger(__name__)

FHIR_JSON = "application/fhir+json"
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # tries in all, the first included
    backoff_s: float = 0.5  # doubled after each failed try
    max_backoff_s: float = 8.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0

    def delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after is not None:
            try:
                return min(max(float(retry_after), 0.0), self.max_backoff_s)
            except ValueError:
                pass  # an HTTP date: fall back to the backoff
        return float(min(self.backoff_s * (2**attempt), self.max_backoff_s))


@dataclass
class SmartBackendAuth:
    """SMART Backend Services (``client_credentials`` + ``private_key_jwt``) token source with a cache."""

    client_id: str
    private_key_pem: bytes
    scope: str = "system/*.rs"
    token_url: str | None = None  # discovered from .well-known/smart-configuration when None
    algorithm: str = "RS384"
    key_id: str | None = None
    _token: str | None = field(default=None, init=False, repr=False)
    _expires_at: float = field(default=0.0, init=False, repr=False)
    _lock: asyncio.Lock | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_key_file(cls, client_id: str, key_path: Path, **kw: Any) -> SmartBackendAuth:
        return cls(client_id=client_id, private_key_pem=key_path.read_bytes(), **kw)

    def assertion(self, token_url: str) -> str:
        now = int(time.time())
        claims = {
            "iss": self.client_id,
            "sub": self.client_id,
            "aud": token_url,
            "exp": now + 240,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        headers = {"kid": self.key_id} if self.key_id else None
        return jwt.encode(claims, self.private_key_pem, algorithm=self.algorithm, headers=headers)

    def invalidate(self) -> None:
        self._token = None

    async def token(self, client: FhirClient) -> str:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._token is not None and time.time() < self._expires_at - 30:
                return self._token
            url = self.token_url or await client.discover_token_url()
            self.token_url = url
            form = {
                "grant_type": "client_credentials",
                "scope": self.scope,
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": self.assertion(url),
            }
            resp = await client.send("POST", url, data=form, authorize=False, accept="application/json")
            body = resp.json()
            token = body.get("access_token")
            if not isinstance(token, str) or not token:
                raise ExternalRequestError("the EHR's token endpoint answered without an access_token")
            self._token = token
            self._expires_at = time.time() + float(body.get("expires_in", 300))
            return token


class FhirClient:
    """One EHR's FHIR base URL. Use as ``async with FhirClient(url) as ehr: ...``."""

    def __init__(
        self,
        base_url: str,
        *,
        auth: SmartBackendAuth | None = None,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.auth = auth
        self.retry = retry or RetryPolicy()
        self.round_trips = 0
        self._transport = transport
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> FhirClient:
        timeout = httpx.Timeout(self.retry.read_timeout_s, connect=self.retry.connect_timeout_s)
        self._http = httpx.AsyncClient(timeout=timeout, transport=self._transport)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def url(self, path: str) -> str:
        return path if path.startswith(("http://", "https://")) else f"{self.base_url}/{path.lstrip('/')}"

    async def send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | list[str]] | None = None,
        json_body: Any = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        authorize: bool = True,
        accept: str = FHIR_JSON,
    ) -> httpx.Response:
        """One request with retries; returns a 2xx/3xx response or raises an Interval error."""
        if self._http is None:
            raise RuntimeError("FhirClient used outside 'async with'")
        url = self.url(path)
        what = f"{method} {_resource_path(url, self.base_url)}"
        renewed = False
        attempt = 0
        while True:
            hdrs = {"Accept": accept, **(headers or {})}
            if json_body is not None:
                hdrs["Content-Type"] = FHIR_JSON
            if authorize and self.auth is not None:
                hdrs["Authorization"] = f"Bearer {await self.auth.token(self)}"
            self.round_trips += 1
            try:
                resp = await self._http.request(
                    method, url, params=params, json=json_body, data=data, headers=hdrs
                )
            except httpx.TransportError as e:
                if attempt + 1 >= self.retry.attempts:
                    raise ExternalServiceError(
                        f"the EHR did not answer {what} after {attempt + 1} tries ({type(e).__name__}); "
                        "the job will be retried"
                    ) from None
                await asyncio.sleep(self.retry.delay(attempt, None))
                attempt += 1
                continue
            if resp.status_code == 401 and authorize and self.auth is not None and not renewed:
                self.auth.invalidate()  # the token was revoked or expired early: one fresh one
                renewed = True
                continue
            if resp.status_code in _RETRY_STATUS:
                if attempt + 1 >= self.retry.attempts:
                    raise ExternalServiceError(
                        f"the EHR answered {resp.status_code} to {what} {attempt + 1} times; "
                        "the job will be retried"
                    )
                log.info("EHR %s for %s; retry %d", resp.status_code, what, attempt + 1)
                await asyncio.sleep(self.retry.delay(attempt, resp.headers.get("Retry-After")))
                attempt += 1
                continue
            if resp.status_code == 412:
                raise ConcurrentEditError(
                    f"{what}: the resource was changed by someone else since it was read (HTTP 412); "
                    "reload it and apply the change again"
                )
            if resp.status_code >= 400:
                raise ExternalRequestError(f"the EHR refused {what}: HTTP {resp.status_code}{_outcome(resp)}")
            return resp

    # -- FHIR interactions ----------------------------------------------------------------------------

    async def discover_token_url(self) -> str:
        resp = await self.send(
            "GET", ".well-known/smart-configuration", authorize=False, accept="application/json"
        )
        url = resp.json().get("token_endpoint")
        if not isinstance(url, str):
            raise ExternalRequestError("the EHR's SMART configuration names no token_endpoint")
        return url

    async def read(self, resource_type: str, rid: str) -> tuple[dict[str, Any], str | None]:
        """(resource, ETag)."""
        resp = await self.send("GET", f"{resource_type}/{rid}")
        return _json(resp), resp.headers.get("ETag")

    async def search(self, resource_type: str, params: Mapping[str, str | list[str]]) -> list[dict[str, Any]]:
        """All entries of a search (match and include), following ``next`` links."""
        entries: list[dict[str, Any]] = []
        resp = await self.send("GET", resource_type, params=params)
        pages = 0
        while True:
            bundle = _json(resp)
            entries.extend(e for e in bundle.get("entry", []) if isinstance(e, dict) and "resource" in e)
            nxt = next((lk.get("url") for lk in bundle.get("link", []) if lk.get("relation") == "next"), None)
            pages += 1
            if not nxt or pages >= 100:
                return entries
            resp = await self.send("GET", nxt)

    async def transaction(self, bundle: dict[str, Any]) -> dict[str, Any]:
        """POST a transaction Bundle; returns the transaction-response Bundle (entries in request order)."""
        resp = await self.send("POST", "", json_body=bundle)
        out = _json(resp)
        for n, entry in enumerate(out.get("entry", [])):
            status = str(entry.get("response", {}).get("status", "200"))
            if status[:1] not in {"2", "3"}:
                raise ExternalRequestError(f"the EHR rejected transaction entry {n}: HTTP {status}")
        return out

    async def conditional_transaction(self, bundle: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """A transaction whose ``ifNoneExist`` entries are resolved first, in one ``batch`` of searches.

        Entries that already exist are dropped and references to them point at the existing resource; the
        rest is POSTed as a plain transaction. Some servers (Medplum) refuse transactions with conditional
        entries beyond a few entries; this way any server works, in two round trips whatever the size.
        Returns (transaction-response, fullUrl -> "Type/id" of the entries that already existed).
        """
        entries = bundle.get("entry", [])
        conditional = [e for e in entries if e.get("request", {}).get("ifNoneExist")]
        existing: dict[str, str] = {}
        if conditional:
            batch = {
                "resourceType": "Bundle",
                "type": "batch",
                "entry": [
                    {
                        "request": {
                            "method": "GET",
                            "url": f"{e['request']['url']}?{e['request']['ifNoneExist']}",
                        }
                    }
                    for e in conditional
                ],
            }
            answer = _json(await self.send("POST", "", json_body=batch))
            for entry, found in zip(conditional, answer.get("entry", []), strict=False):
                matches = [
                    m["resource"]
                    for m in (found.get("resource") or {}).get("entry", [])
                    if m.get("search", {}).get("mode", "match") == "match" and "resource" in m
                ]
                if len(matches) > 1:
                    raise ExternalRequestError(
                        f"the EHR holds {len(matches)} {entry['request']['url']} resources for one identifier "
                        "(expected at most 1); a conditional create cannot choose"
                    )
                if matches:
                    existing[entry["fullUrl"]] = f"{matches[0]['resourceType']}/{matches[0]['id']}"
        plain = []
        for e in entries:
            if e["fullUrl"] in existing:
                continue
            req = {k: v for k, v in e.get("request", {}).items() if k != "ifNoneExist"}
            plain.append({**e, "resource": _rewrite(e["resource"], existing), "request": req})
        if not plain:
            return {"resourceType": "Bundle", "type": "transaction-response", "entry": []}, existing
        out = await self.transaction({"resourceType": "Bundle", "type": "transaction", "entry": plain})
        return {**out, "entry": _realign(entries, plain, out.get("entry", []))}, existing

    async def update(
        self, resource: dict[str, Any], if_match: str | None
    ) -> tuple[dict[str, Any], str | None]:
        headers = {"If-Match": if_match} if if_match else None
        resp = await self.send(
            "PUT", f"{resource['resourceType']}/{resource['id']}", json_body=resource, headers=headers
        )
        return _json(resp), resp.headers.get("ETag")

    async def create(self, resource: dict[str, Any]) -> dict[str, Any]:
        resp = await self.send("POST", resource["resourceType"], json_body=resource)
        return _json(resp)


def _rewrite(node: Any, refs: Mapping[str, str]) -> Any:
    """A copy of ``node`` with every ``reference`` found in ``refs`` replaced."""
    if isinstance(node, dict):
        return {
            k: (refs.get(v, v) if k == "reference" and isinstance(v, str) else _rewrite(v, refs))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rewrite(v, refs) for v in node]
    return node


def _realign(
    entries: list[dict[str, Any]], plain: list[dict[str, Any]], answers: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Response entries in the order of the original request (``{}`` for the entries that existed)."""
    by_url = {e["fullUrl"]: a for e, a in zip(plain, answers, strict=False)}
    return [by_url.get(e["fullUrl"], {}) for e in entries]


def _json(resp: httpx.Response) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        raise ExternalRequestError(
            f"the EHR answered HTTP {resp.status_code} with a body that is not JSON"
        ) from None
    if not isinstance(body, dict):
        raise ExternalRequestError("the EHR answered with JSON that is not a FHIR resource")
    return body


def _outcome(resp: httpx.Response) -> str:
    """' (issue code: diagnostics)' from an OperationOutcome body, shortened; '' when there is none."""
    try:
        body = resp.json()
    except ValueError:
        return ""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    issue = (body.get("issue") or [{}])[0]
    text = str(issue.get("diagnostics") or issue.get("details", {}).get("text") or "")[:160]
    return f" ({issue.get('code', 'error')}: {text})" if text else f" ({issue.get('code', 'error')})"


def _resource_path(url: str, base: str) -> str:
    """The request's resource type/operation without ids or query (no identifiers in messages)."""
    rel = url.removeprefix(base).strip("/").split("?")[0]
    head = rel.split("/")[0] if rel else "(base)"
    return head
