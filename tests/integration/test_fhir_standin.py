"""The test services themselves: the FHIR stand-in behaves like a FHIR server (ETag, If-Match, failures on demand,
SMART Backend Services auth), and the throwaway PostgreSQL accepts SQLAlchemy connections."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from fixtures.services import FhirStandin, Postgres

from .conftest import SmartClient

pytestmark = pytest.mark.integration

FHIR_JSON = "application/fhir+json"


def _client(server: FhirStandin, token: str | None = None) -> httpx.Client:
    headers = {"Accept": FHIR_JSON, "Content-Type": FHIR_JSON}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=server.base_url, headers=headers, trust_env=False, timeout=10)


def _patient(mrn: str) -> dict[str, Any]:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:interval:mrn", "value": mrn}]}


def _version(response: httpx.Response) -> str:
    return str(response.json()["meta"]["versionId"])


def test_create_then_read_returns_the_version_as_etag(fhir_server: FhirStandin) -> None:
    with _client(fhir_server) as client:
        created = client.post("/Patient", json=_patient("MRN-1"))
        assert created.status_code == 201
        assert created.headers["content-type"].startswith(FHIR_JSON)
        patient_id = created.json()["id"]
        assert created.headers["etag"] == f'W/"{_version(created)}"'
        assert created.headers["location"].startswith(
            f"{fhir_server.base_url}/Patient/{patient_id}/_history/"
        )

        read = client.get(f"/Patient/{patient_id}")
        assert read.status_code == 200
        assert read.headers["content-type"].startswith(FHIR_JSON)
        assert read.headers["etag"] == created.headers["etag"]
        assert read.json()["identifier"][0]["value"] == "MRN-1"

        found = client.get("/Patient", params={"identifier": "urn:interval:mrn|MRN-1"}).json()
        assert [e["resource"]["id"] for e in found["entry"]] == [patient_id]


def test_update_with_a_stale_if_match_is_refused_with_412(fhir_server: FhirStandin) -> None:
    with _client(fhir_server) as client:
        created = client.post("/Patient", json=_patient("MRN-2"))
        stale_etag = created.headers["etag"]
        patient = created.json()

        updated = client.put(
            f"/Patient/{patient['id']}",
            json={**patient, "gender": "female"},
            headers={"If-Match": stale_etag},
        )
        assert updated.status_code == 200
        assert updated.headers["etag"] != stale_etag

        conflict = client.put(
            f"/Patient/{patient['id']}", json={**patient, "gender": "male"}, headers={"If-Match": stale_etag}
        )
        assert conflict.status_code == 412
        assert conflict.json()["resourceType"] == "OperationOutcome"
        current = client.get(f"/Patient/{patient['id']}")
        assert current.json()["gender"] == "female"
        assert current.headers["etag"] == updated.headers["etag"]


def test_injected_failures_then_success_and_request_counting(fhir_server: FhirStandin) -> None:
    fhir_server.control.reset()
    with _client(fhir_server) as client:
        patient_id = client.post("/Patient", json=_patient("MRN-3")).json()["id"]
        fhir_server.control.fail(503, 2)
        for _ in range(2):
            failed = client.get(f"/Patient/{patient_id}")
            assert failed.status_code == 503
            assert failed.headers["retry-after"] == "0"
            assert failed.json()["resourceType"] == "OperationOutcome"
        assert client.get(f"/Patient/{patient_id}").status_code == 200

    stats = fhir_server.control.stats()
    assert stats["requests"] == 4  # one create, two failures, one read; control calls are not counted
    fhir_server.control.reset()
    assert fhir_server.stats()["requests"] == 0


def test_restart_on_the_same_port_keeps_the_data(fhir_server: FhirStandin) -> None:
    with _client(fhir_server) as client:
        created = client.post("/Patient", json=_patient("MRN-4"))
    port, pid = fhir_server.port, fhir_server.pid

    fhir_server.stop()
    assert fhir_server.pid is None
    with _client(fhir_server) as client, pytest.raises(httpx.ConnectError):
        client.get("/metadata")

    fhir_server.start()
    assert (fhir_server.port, fhir_server.running) == (port, True)
    assert fhir_server.pid != pid
    with _client(fhir_server) as client:
        read = client.get(f"/Patient/{created.json()['id']}")
    assert read.status_code == 200
    assert read.headers["etag"] == created.headers["etag"]


def _assertion(smart_client: SmartClient, audience: str, **overrides: Any) -> str:
    now = int(time.time())
    claims = {
        "iss": smart_client.client_id,
        "sub": smart_client.client_id,
        "aud": audience,
        "exp": now + 240,
        "jti": str(uuid.uuid4()),
        **overrides,
    }
    return jwt.encode(claims, smart_client.private_key_pem, algorithm="RS384", headers={"kid": "test-key"})


def _token_request(server: FhirStandin, assertion: str) -> httpx.Response:
    form = {
        "grant_type": "client_credentials",
        "scope": "system/Patient.rs system/DiagnosticReport.cruds",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": assertion,
    }
    return httpx.post(server.token_url, data=form, trust_env=False, timeout=10)


def test_smart_backend_services_token_flow(smart_fhir_server: FhirStandin, smart_client: SmartClient) -> None:
    server = smart_fhir_server
    with _client(server) as anonymous:
        refused = anonymous.get("/Patient")
        assert refused.status_code == 401
        assert refused.json()["resourceType"] == "OperationOutcome"
        configuration = anonymous.get("/.well-known/smart-configuration").json()
    assert configuration["token_endpoint"] == server.token_url
    assert "private_key_jwt" in configuration["token_endpoint_auth_methods_supported"]

    assertion = _assertion(smart_client, server.token_url)
    granted = _token_request(server, assertion)
    assert granted.status_code == 200, granted.text
    token = granted.json()
    assert token["token_type"] == "bearer"
    assert token["expires_in"] == 300
    assert token["scope"] == "system/Patient.rs system/DiagnosticReport.cruds"

    with _client(server, token["access_token"]) as client:
        assert client.post("/Patient", json=_patient("MRN-5")).status_code == 201
        assert client.get("/Patient").json()["total"] == 1
    with _client(server, "not-a-token") as forged:
        assert forged.get("/Patient").status_code == 401

    replay = _token_request(server, assertion)
    assert replay.status_code in (400, 401)
    assert replay.json()["error"] == "invalid_client"
    assert "jti" in replay.json()["error_description"]
    assert server.control.stats()["tokens_issued"] == 1


def test_smart_rejects_bad_assertions(smart_fhir_server: FhirStandin, smart_client: SmartClient) -> None:
    server = smart_fhir_server
    now = int(time.time())
    bad_claims: dict[str, dict[str, Any]] = {
        "wrong aud": {"aud": "http://127.0.0.1:1/auth/token"},
        "wrong iss": {"iss": "someone-else"},
        "expired": {"exp": now - 60},
        "exp too far ahead": {"exp": now + 3600},
    }
    assertions = {
        name: _assertion(smart_client, server.token_url, **claims) for name, claims in bad_claims.items()
    }
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other_pem = other_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    impostor = SmartClient(smart_client.client_id, other_pem, smart_client.public_key_path)
    assertions["signed with another key"] = _assertion(impostor, server.token_url)
    assertions["HS256"] = jwt.encode(
        {
            "iss": smart_client.client_id,
            "sub": smart_client.client_id,
            "aud": server.token_url,
            "exp": now + 60,
            "jti": str(uuid.uuid4()),
        },
        "a-shared-secret-that-is-long-enough-for-hs256",
        algorithm="HS256",
    )

    for name, assertion in assertions.items():
        rejected = _token_request(server, assertion)
        assert rejected.status_code == 401, name
        assert rejected.json()["error"] == "invalid_client", name
    assert server.stats()["tokens_issued"] == 0


def test_postgres_answers_select_1(postgres_db: Postgres) -> None:
    engine = sa.create_engine(postgres_db.url)
    try:
        with engine.connect() as connection:
            assert connection.execute(sa.text("select 1")).scalar_one() == 1
            assert connection.execute(sa.text("select current_database()")).scalar_one() == "interval"
    finally:
        engine.dispose()
