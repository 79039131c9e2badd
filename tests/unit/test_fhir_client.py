"""The FHIR client's retry, error and token rules, one unit at a time (httpx's in-memory transport).

The same behaviours are shown against the real test EHR in tests/integration/test_ehr_fhir.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from adapters.fhir_client import FhirClient, RetryPolicy, SmartBackendAuth
from core.errors import ConcurrentEditError, ExternalRequestError, ExternalServiceError

FAST = RetryPolicy(attempts=3, backoff_s=0.001, max_backoff_s=0.01)
BASE = "http://ehr.test/fhir"


def run(
    handler: Callable[[httpx.Request], httpx.Response], coro: Callable[[FhirClient], Any], **kw: Any
) -> Any:
    async def go() -> Any:
        async with FhirClient(BASE, retry=FAST, transport=httpx.MockTransport(handler), **kw) as ehr:
            return await coro(ehr), ehr.round_trips

    return asyncio.run(go())


def outcome(code: str, text: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }


def test_retries_5xx_then_succeeds() -> None:
    answers = [503, 429, 200]

    def handler(req: httpx.Request) -> httpx.Response:
        status = answers.pop(0)
        body = {"resourceType": "Patient", "id": "p1"} if status == 200 else outcome("transient", "busy")
        return httpx.Response(status, json=body, headers={"Retry-After": "0"})

    (res, _), trips = run(handler, lambda ehr: ehr.read("Patient", "p1"))
    assert res["id"] == "p1" and trips == 3


def test_gives_up_after_attempts_with_a_retryable_error() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json=outcome("transient", "down"))

    with pytest.raises(ExternalServiceError, match=r"answered 503 to GET Patient 3 times"):
        run(handler, lambda ehr: ehr.read("Patient", "p1"))


def test_transport_error_is_retryable_and_names_no_identifier() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    with pytest.raises(ExternalServiceError) as err:
        run(handler, lambda ehr: ehr.read("Patient", "secret-id-123"))
    assert "secret-id-123" not in str(err.value) and "ConnectError" in str(err.value)


def test_4xx_is_not_retried_and_carries_the_outcome() -> None:
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(req)
        return httpx.Response(400, json=outcome("invalid", "Observation.status: bad code"))

    with pytest.raises(ExternalRequestError, match=r"HTTP 400 \(invalid: Observation.status: bad code\)"):
        run(handler, lambda ehr: ehr.create({"resourceType": "Observation"}))
    assert len(calls) == 1


def test_412_is_a_concurrent_edit() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        assert req.headers["If-Match"] == 'W/"1"'
        return httpx.Response(412, json=outcome("conflict", "version"))

    with pytest.raises(ConcurrentEditError):
        run(handler, lambda ehr: ehr.update({"resourceType": "DiagnosticReport", "id": "d"}, 'W/"1"'))


def test_search_follows_next_links() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        page = int(req.url.params.get("page", "1"))
        link = [{"relation": "next", "url": f"{BASE}/Observation?page={page + 1}"}] if page < 3 else []
        return httpx.Response(
            200,
            json={
                "resourceType": "Bundle",
                "type": "searchset",
                "link": link,
                "entry": [{"resource": {"resourceType": "Observation", "id": f"o{page}"}}],
            },
        )

    rows, trips = run(handler, lambda ehr: ehr.search("Observation", {"page": "1"}))
    assert [r["resource"]["id"] for r in rows] == ["o1", "o2", "o3"] and trips == 3


def test_transaction_entry_failure_is_reported() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "resourceType": "Bundle",
                "type": "transaction-response",
                "entry": [{"response": {"status": "201 Created"}}, {"response": {"status": "400"}}],
            },
        )

    with pytest.raises(ExternalRequestError, match="entry 1"):
        run(handler, lambda ehr: ehr.transaction({"resourceType": "Bundle", "type": "transaction"}))


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, Any]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, key.public_key()


def test_smart_backend_token_is_signed_cached_and_renewed_on_401(rsa_key: tuple[bytes, Any]) -> None:
    pem, public = rsa_key
    tokens: list[str] = []
    rejected: set[str] = set()

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/.well-known/smart-configuration"):
            return httpx.Response(200, json={"token_endpoint": "http://ehr.test/auth/token"})
        if req.url.path == "/auth/token":
            form = dict(x.split("=", 1) for x in req.content.decode().split("&"))
            claims = jwt.decode(
                form["client_assertion"], public, algorithms=["RS384"], audience="http://ehr.test/auth/token"
            )
            assert claims["iss"] == claims["sub"] == "interval" and form["grant_type"] == "client_credentials"
            tokens.append(f"tok{len(tokens)}")
            return httpx.Response(200, json={"access_token": tokens[-1], "expires_in": 300})
        auth = req.headers.get("Authorization", "")
        if auth.removeprefix("Bearer ") in rejected or not auth:
            return httpx.Response(401, json=outcome("login", "expired"))
        return httpx.Response(200, json={"resourceType": "Patient", "id": "p"})

    smart = SmartBackendAuth(client_id="interval", private_key_pem=pem)

    async def three_reads(ehr: FhirClient) -> None:
        await ehr.read("Patient", "p")
        await ehr.read("Patient", "p")  # cached token
        rejected.add(tokens[-1])  # the EHR revokes it
        await ehr.read("Patient", "p")  # one 401, a new token, then 200

    run(handler, three_reads, auth=smart)
    assert tokens == ["tok0", "tok1"]


def test_retry_after_is_honoured_and_capped() -> None:
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=2.0)
    assert policy.delay(0, "1") == 1.0
    assert policy.delay(0, "3600") == 2.0
    assert policy.delay(2, None) == 2.0
    assert policy.delay(0, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.5
    assert json.dumps(policy.delay(1, None)) == "1.0"
