"""The FHIR API as an EHR sees it: FastAPI's TestClient, SQLite in a temp dir, a fake analyzer.

The analyzer here is a stand-in returning a small fixed transaction Bundle (or raising); the real
pipeline behind the same contract is exercised by the integration tests.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from fhir.resources.R4B.operationoutcome import OperationOutcome

from adapters.fhir_codes import DICOM_UID, PATIENT_ID_SYSTEM
from adapters.fhir_search import InvalidSearchError
from adapters.fhir_validation import InvalidResourceError
from adapters.resource_store import ResourceStore, VersionConflict
from adapters.settings import Settings
from core.errors import ExternalServiceError
from service.app import create_app
from service.auth import Client, mint_token
from service.jobs import TASK_CODE_SYSTEM, AnalysisRequest, InProcessRunner

STUDY = "1.2.826.0.1.3680043.8.498.1"
FHIR = "application/fhir+json"
ALL_SCOPES = "system/Task.cr system/Task.s system/*.read system/DiagnosticReport.u"


class FakeAnalyzer:
    """Returns a fixed Bundle: a report, one tumor size Observation, its BodyStructure, a Provenance."""

    model_version = "fake-1.0"

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.requests: list[AnalysisRequest] = []

    def __call__(self, request: AnalysisRequest) -> dict[str, Any]:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        subject = {"reference": request.patient_ref}
        dr, obs, bs = (f"urn:uuid:0000000{i}-0000-4000-8000-000000000000" for i in (1, 2, 3))
        track = {"system": DICOM_UID, "value": "urn:oid:2.25.1234"}
        return {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": bs,
                    "resource": {"resourceType": "BodyStructure", "identifier": [track], "patient": subject},
                    "request": {
                        "method": "POST",
                        "url": "BodyStructure",
                        "ifNoneExist": "identifier=urn:dicom:uid|urn:oid:2.25.1234",
                    },
                },
                {
                    "fullUrl": obs,
                    "resource": {
                        "resourceType": "Observation",
                        "status": "preliminary",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "21889-1"}]},
                        "subject": subject,
                        "focus": [{"reference": bs}],
                        "effectiveDateTime": "2024-03-01",
                        "valueQuantity": {"value": 21.5, "unit": "mm"},
                    },
                    "request": {"method": "POST", "url": "Observation"},
                },
                {
                    "fullUrl": dr,
                    "resource": {
                        "resourceType": "DiagnosticReport",
                        "status": "preliminary",
                        "code": {"coding": [{"system": "http://loinc.org", "code": "18782-3"}]},
                        "subject": subject,
                        "effectiveDateTime": "2024-03-01",
                        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{request.study_uid}"}],
                        "result": [{"reference": obs}],
                        "conclusion": "Stable disease.",
                    },
                    "request": {"method": "POST", "url": "DiagnosticReport"},
                },
                {
                    "resource": {
                        "resourceType": "Provenance",
                        "target": [{"reference": dr}],
                        "recorded": "2024-03-01T12:00:00Z",
                        "agent": [{"who": {"display": "Interval fake-1.0"}}],
                    },
                    "request": {"method": "POST", "url": "Provenance"},
                },
            ],
        }


def task_body(study_uid: str = STUDY, patient: str = "p1") -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": "analyze"}]},
        "focus": {
            "type": "ImagingStudy",
            "identifier": {"system": DICOM_UID, "value": f"urn:oid:{study_uid}"},
        },
        "for": {
            "reference": f"Patient/{patient}",
            "identifier": {"system": PATIENT_ID_SYSTEM, "value": f"MRN-{patient}"},
        },
    }


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(environment="test", database_url=f"sqlite:///{tmp_path / 'interval.db'}")


@pytest.fixture
def analyzer() -> FakeAnalyzer:
    return FakeAnalyzer()


@pytest.fixture
def client(settings: Settings, analyzer: FakeAnalyzer) -> Iterator[TestClient]:
    with TestClient(create_app(settings, analyzer=analyzer)) as test_client:
        yield test_client


def auth(settings: Settings, scopes: str = ALL_SCOPES, **claims: Any) -> dict[str, str]:
    token = mint_token(settings.api_token_secret, "ehr-1", scopes, issuer=settings.api_token_issuer)
    if claims:
        payload = jwt.decode(token, options={"verify_signature": False}) | claims
        token = jwt.encode(payload, settings.api_token_secret, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


def join(client: TestClient) -> None:
    runner = client.app.state.runner  # type: ignore[attr-defined]
    assert isinstance(runner, InProcessRunner)
    assert runner.join(timeout=30), "analysis did not finish"


def assert_outcome(response: Any, status: int, diagnostics: str = "") -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(FHIR)
    outcome = OperationOutcome.model_validate(response.json())
    text = outcome.issue[0].diagnostics or ""
    assert diagnostics in text
    assert "Traceback" not in response.text
    return text


def post_task(client: TestClient, settings: Settings, body: dict[str, Any] | None = None) -> Any:
    return client.post("/fhir/Task", json=body or task_body(), headers=auth(settings))


# --- metadata and auth --------------------------------------------------------------------------


def test_metadata_is_an_r4_capability_statement_listing_what_is_served(client: TestClient) -> None:
    response = client.get("/fhir/metadata")  # no token needed
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(FHIR)
    statement = CapabilityStatement.model_validate(response.json())
    assert statement.fhirVersion == "4.0.1" and statement.kind == "instance"
    rest = statement.rest[0]
    assert rest.security.service[0].coding[0].code == "SMART-on-FHIR"
    assert not rest.security.extension  # no token URL configured: no oauth-uris
    served = {r.type: {i.code for i in r.interaction} for r in rest.resource}
    assert served["Task"] == {"create", "read", "vread", "search-type"}
    assert served["DiagnosticReport"] == {"read", "vread", "search-type", "update"}
    assert set(served) == {
        "Task",
        "DiagnosticReport",
        "Observation",
        "BodyStructure",
        "Provenance",
        "AuditEvent",
        "DocumentReference",
    }
    assert served["DocumentReference"] == {
        "read",
        "vread",
        "search-type",
    }  # the model card, written by Interval
    assert served["AuditEvent"] == {"read", "vread", "search-type"}  # written by Interval only
    audit = next(r for r in rest.resource if r.type == "AuditEvent")
    assert {"entity", "agent", "date", "subtype", "patient"} <= {p.name for p in audit.searchParam}
    dr = next(r for r in rest.resource if r.type == "DiagnosticReport")
    assert {p.name for p in dr.searchParam} == {
        "patient",
        "subject",
        "status",
        "date",
        "identifier",
        "code",
        "_id",
    }


def test_metadata_advertises_the_token_endpoint_when_configured(tmp_path: Path) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'a.db'}", api_token_url="https://auth.example/token"
    )
    with TestClient(create_app(settings, analyzer=FakeAnalyzer())) as test_client:
        security = test_client.get("/fhir/metadata").json()["rest"][0]["security"]
    assert security["extension"][0]["extension"] == [
        {"url": "token", "valueUri": "https://auth.example/token"}
    ]


@pytest.mark.parametrize(
    ("headers", "diagnostics"),
    [
        ({}, "bearer token is required"),
        ({"Authorization": "Bearer not-a-jwt"}, "not a well-formed JWT"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "bearer token is required"),
    ],
)
def test_requests_without_a_usable_token_get_401(
    client: TestClient, headers: dict[str, str], diagnostics: str
) -> None:
    response = client.get("/fhir/Task/abc", headers=headers)
    assert_outcome(response, 401, diagnostics)
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_expired_foreign_or_forged_tokens_get_401(client: TestClient, settings: Settings) -> None:
    expired = auth(settings, exp=int(time.time()) - 3600)
    assert_outcome(client.get("/fhir/Task?status=failed", headers=expired), 401, "expired")
    foreign = auth(settings, iss="someone-else")
    assert_outcome(client.get("/fhir/Task?status=failed", headers=foreign), 401, "issuer")
    forged = mint_token("x" * 40, "ehr-1", ALL_SCOPES, issuer=settings.api_token_issuer)
    response = client.get("/fhir/Task?status=failed", headers={"Authorization": f"Bearer {forged}"})
    assert_outcome(response, 401, "signature")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_a_token_without_the_scope_gets_403_naming_it(client: TestClient, settings: Settings) -> None:
    response = client.post(
        "/fhir/Task", json=task_body(), headers=auth(settings, "system/DiagnosticReport.rs")
    )
    assert_outcome(response, 403, "system/Task.c")
    read_only = auth(settings, "system/DiagnosticReport.read")
    assert_outcome(client.get("/fhir/Observation?patient=p1", headers=read_only), 403, "system/Observation.s")


def test_rs256_tokens_are_accepted_with_a_configured_public_key(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "public.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'a.db'}", api_token_public_key=pem)
    claims = {"sub": "smart-client", "iss": settings.api_token_issuer, "exp": int(time.time()) + 60}
    token = jwt.encode({**claims, "scope": "system/Task.rs"}, key, algorithm="RS384")
    with TestClient(create_app(settings, analyzer=FakeAnalyzer())) as test_client:
        ok = test_client.get("/fhir/Task", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200, ok.text
        # the public key must not double as an HMAC secret (algorithm confusion)
        wrong = jwt.encode({**claims, "scope": "system/*.*"}, "y" * 64, algorithm="HS384")
        assert_outcome(
            test_client.get("/fhir/Task", headers={"Authorization": f"Bearer {wrong}"}), 401, "algorithm"
        )


@pytest.mark.parametrize(
    ("scope", "resource_type", "action", "allowed"),
    [
        ("system/Task.read", "Task", "r", True),
        ("system/Task.read", "Task", "s", True),
        ("system/Task.read", "Task", "c", False),
        ("system/Task.write", "Task", "c", True),
        ("system/Task.write", "Task", "u", True),
        ("system/*.read", "DiagnosticReport", "s", True),
        ("system/DiagnosticReport.rs", "DiagnosticReport", "s", True),
        ("system/DiagnosticReport.rs", "DiagnosticReport", "u", False),
        ("system/*.cruds", "Observation", "u", True),
        ("system/Task.c", "DiagnosticReport", "c", False),
        ("patient/Task.read", "Task", "r", False),
        ("system/Task.rs?status=completed", "Task", "r", False),
        ("system/Task.sr", "Task", "r", False),  # v2 letters come in cruds order
    ],
)
def test_smart_scopes(scope: str, resource_type: str, action: str, allowed: bool) -> None:
    assert Client("c", frozenset({scope})).allows(resource_type, action) is allowed


def test_production_refuses_the_development_token_secret() -> None:
    with pytest.raises(ValueError, match="development default"):
        Settings(environment="production")
    assert Settings(environment="production", api_token_secret="s" * 40).environment == "production"


# --- Task: validation, analysis, idempotency, retry -----------------------------------------------


@pytest.mark.parametrize(
    ("change", "element"),
    [
        (lambda t: t.pop("status"), "Task.status"),
        (lambda t: t.update(status="draft"), "Task.status"),
        (lambda t: t.update(intent="plan"), "Task.intent"),
        (lambda t: t["code"]["coding"][0].update(code="segment"), "Task.code.coding"),
        (lambda t: t.pop("focus"), "Task.focus"),
        (lambda t: t["focus"]["identifier"].update(value="urn:oid:not-a-uid"), "Task.focus.identifier.value"),
        (lambda t: t["for"].update(reference="Group/7"), "Task.for.reference"),
        (lambda t: t.update(authoredOn="yesterday"), "Task.authoredOn"),
        (lambda t: t.update(unknownElement=1), "Task.unknownElement"),
        (lambda t: t.update(resourceType="Patient"), "resourceType"),
    ],
)
def test_an_invalid_task_gets_400_naming_the_element(
    client: TestClient, settings: Settings, change: Any, element: str
) -> None:
    body = task_body()
    change(body)
    text = assert_outcome(post_task(client, settings, body), 400, element)
    assert "MRN-p1" not in text  # diagnostics never echo the submitted values


def test_a_body_that_is_not_a_json_resource_is_refused(client: TestClient, settings: Settings) -> None:
    headers = auth(settings)
    assert_outcome(
        client.post("/fhir/Task", content=b"{not json", headers={**headers, "Content-Type": FHIR}),
        400,
        "JSON",
    )
    assert_outcome(client.post("/fhir/Task", content=b"[1]", headers={**headers, "Content-Type": FHIR}), 400)
    nan = b'{"resourceType": "Task", "priority": NaN}'
    assert_outcome(
        client.post("/fhir/Task", content=nan, headers={**headers, "Content-Type": FHIR}), 400, "NaN"
    )
    xml = client.post(
        "/fhir/Task", content=b"<Task/>", headers={**headers, "Content-Type": "application/xml"}
    )
    assert_outcome(xml, 415)


def test_a_task_is_analysed_and_completed_with_its_report(
    client: TestClient, settings: Settings, analyzer: FakeAnalyzer
) -> None:
    response = post_task(client, settings)
    assert response.status_code == 201, response.text
    task = response.json()
    assert task["status"] == "requested" and response.headers["etag"] == 'W/"1"'
    assert response.headers["location"].endswith(f"/fhir/Task/{task['id']}/_history/1")
    join(client)
    assert analyzer.requests == [AnalysisRequest(task["id"], STUDY, "MRN-p1", "Patient/p1")]

    done = client.get(f"/fhir/Task/{task['id']}", headers=auth(settings))
    assert done.status_code == 200 and done.json()["status"] == "completed"
    assert (
        done.headers["etag"] == f'W/"{done.json()["meta"]["versionId"]}"' and "last-modified" in done.headers
    )
    output = done.json()["output"]
    assert output[0]["type"]["text"] == "DiagnosticReport"
    report_ref = output[0]["valueReference"]["reference"]
    assert re.fullmatch(r"DiagnosticReport/[0-9a-f]{32}", report_ref)

    report = client.get(f"/fhir/{report_ref}", headers=auth(settings))
    assert report.status_code == 200 and report.json()["status"] == "preliminary"
    assert report.headers["etag"] == 'W/"1"'
    # references inside the Bundle now name stored resources
    obs_ref = report.json()["result"][0]["reference"]
    observation = client.get(f"/fhir/{obs_ref}", headers=auth(settings)).json()
    assert observation["focus"][0]["reference"].startswith("BodyStructure/")
    provenance = client.get("/fhir/Provenance", params={"target": report_ref}, headers=auth(settings)).json()
    assert provenance["total"] == 1
    by_patient = client.get("/fhir/Provenance", params={"patient": "p1"}, headers=auth(settings)).json()
    assert by_patient["total"] == 1
    tasks = client.get(
        "/fhir/Task", params={"status": "completed", "patient": "Patient/p1"}, headers=auth(settings)
    )
    assert tasks.json()["total"] == 1


def test_the_same_study_twice_is_one_task(
    client: TestClient, settings: Settings, analyzer: FakeAnalyzer
) -> None:
    first = post_task(client, settings)
    join(client)
    again = post_task(client, settings)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert (
        again.headers["location"].split("/_history/")[0] == first.headers["location"].split("/_history/")[0]
    )
    join(client)
    assert len(analyzer.requests) == 1
    other = post_task(client, settings, task_body(study_uid="1.2.3.4"))
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    by_key = client.get(
        "/fhir/Task", params={"identifier": f"{STUDY}:fake-1.0"}, headers=auth(settings)
    ).json()
    assert [e["resource"]["id"] for e in by_key["entry"]] == [first.json()["id"]]


def test_a_failed_analysis_is_recorded_and_retried_by_posting_again(
    client: TestClient, settings: Settings, analyzer: FakeAnalyzer
) -> None:
    from core.errors import IntervalError

    analyzer.error = IntervalError("EHR unreachable")
    task_id = post_task(client, settings).json()["id"]
    join(client)
    failed = client.get(f"/fhir/Task/{task_id}", headers=auth(settings)).json()
    assert failed["status"] == "failed"
    assert failed["statusReason"]["text"] == "EHR unreachable"
    assert "output" not in failed
    assert client.get("/fhir/DiagnosticReport", headers=auth(settings)).json()["total"] == 0

    analyzer.error = None
    retry = post_task(client, settings)
    assert retry.status_code == 200 and retry.json()["id"] == task_id
    assert retry.json()["status"] == "requested" and "statusReason" not in retry.json()
    join(client)
    done = client.get(f"/fhir/Task/{task_id}", headers=auth(settings)).json()
    assert done["status"] == "completed" and done["output"]
    store: ResourceStore = client.app.state.store  # type: ignore[attr-defined]
    job = store.job(f"{STUDY}:fake-1.0")
    assert job is not None and job.attempts == 2 and job.task_id == task_id


def test_an_unexpected_error_fails_the_task_with_a_reference_only(
    client: TestClient, settings: Settings, analyzer: FakeAnalyzer, caplog: pytest.LogCaptureFixture
) -> None:
    analyzer.error = KeyError("MRN-p1 secret detail")
    with caplog.at_level(logging.ERROR, logger="interval.service.jobs"):
        task_id = post_task(client, settings).json()["id"]
        join(client)
    reason = client.get(f"/fhir/Task/{task_id}", headers=auth(settings)).json()["statusReason"]["text"]
    match = re.fullmatch(r"internal error, reference ([0-9a-f-]{36})", reason)
    assert match, reason
    assert any(match.group(1) in r.getMessage() and r.exc_info for r in caplog.records)


def test_a_runner_that_cannot_queue_leaves_a_failed_task_to_retry(settings: Settings) -> None:
    class DownRunner:
        model_version = "celery-1"

        def submit(self, request: AnalysisRequest) -> None:
            raise ExternalServiceError("the analysis queue (redis) is unreachable")

    with TestClient(create_app(settings, runner=DownRunner())) as test_client:
        response = post_task(test_client, settings)
    assert response.status_code == 201
    assert response.json()["status"] == "failed"
    assert "unreachable" in response.json()["statusReason"]["text"]


def test_an_analyzer_returning_two_reports_fails_the_task(
    client: TestClient, settings: Settings, analyzer: FakeAnalyzer
) -> None:
    bundle = analyzer(AnalysisRequest("t", STUDY, "p1", "Patient/p1"))
    bundle["entry"].append({**bundle["entry"][2], "fullUrl": "urn:uuid:00000009-0000-4000-8000-000000000000"})

    class TwoReports(FakeAnalyzer):
        def __call__(self, request: AnalysisRequest) -> dict[str, Any]:
            return bundle

    with TestClient(create_app(settings, analyzer=TwoReports())) as test_client:
        task_id = post_task(test_client, settings).json()["id"]
        join(test_client)
        task = test_client.get(f"/fhir/Task/{task_id}", headers=auth(settings)).json()
    assert task["status"] == "failed" and "2 DiagnosticReports" in task["statusReason"]["text"]


def test_tasks_left_pending_by_a_restart_are_resumed(settings: Settings, analyzer: FakeAnalyzer) -> None:
    store = ResourceStore(settings.database_url)
    body = task_body()
    pending, _ = store.enqueue_task(f"{STUDY}:fake-1.0", {**body, "status": "in-progress"})
    with TestClient(create_app(settings, store=store, analyzer=analyzer)) as test_client:
        join(test_client)
        task = test_client.get(f"/fhir/Task/{pending['id']}", headers=auth(settings)).json()
    assert task["status"] == "completed"
    assert [r.task_id for r in analyzer.requests] == [pending["id"]]


# --- reading and searching -----------------------------------------------------------------------


def completed_report(
    client: TestClient, settings: Settings, study_uid: str = STUDY, patient: str = "p1"
) -> dict[str, Any]:
    task_id = post_task(client, settings, task_body(study_uid, patient)).json()["id"]
    join(client)
    task = client.get(f"/fhir/Task/{task_id}", headers=auth(settings)).json()
    ref = task["output"][0]["valueReference"]["reference"]
    report: dict[str, Any] = client.get(f"/fhir/{ref}", headers=auth(settings)).json()
    return report


def test_search_reports_by_patient_status_date_and_sort(client: TestClient, settings: Settings) -> None:
    first = completed_report(client, settings, "1.2.3.1", "p1")
    second = completed_report(client, settings, "1.2.3.2", "p1")
    completed_report(client, settings, "1.2.3.3", "p2")
    store: ResourceStore = client.app.state.store  # type: ignore[attr-defined]
    second["effectiveDateTime"] = "2024-06-15T10:00:00+02:00"
    second["status"] = "final"
    store.update(second)

    def ids(**params: str) -> list[str]:
        response = client.get("/fhir/DiagnosticReport", params=params, headers=auth(settings))
        assert response.status_code == 200, response.text
        bundle = Bundle.model_validate(response.json())
        assert bundle.type == "searchset" and bundle.total == len(bundle.entry or [])
        return [e.resource.id for e in bundle.entry or []]

    assert set(ids(patient="p1")) == {first["id"], second["id"]}
    assert set(ids(subject="Patient/p1")) == {first["id"], second["id"]}
    assert ids(patient="p1", status="final") == [second["id"]]
    assert set(ids(patient="p1", status="final,preliminary")) == {first["id"], second["id"]}
    assert ids(patient="p1", date="2024-06") == [second["id"]]
    assert ids(patient="p1", date="lt2024-06-01") == [first["id"]]
    assert ids(patient="p1", date="ge2024-06-15T08:00:00Z") == [second["id"]]
    assert ids(patient="p1", date="gt2024-06-15T08:00:00Z") == []
    assert ids(patient="p1", _sort="-date") == [second["id"], first["id"]]
    assert ids(patient="p1", _sort="date") == [first["id"], second["id"]]
    assert ids(identifier=f"{DICOM_UID}|urn:oid:1.2.3.1") == [first["id"]]
    assert ids(identifier="urn:oid:1.2.3.3", patient="p1") == []
    assert ids(_id=f"{first['id']},{second['id']}", _sort="-_lastUpdated") == [second["id"], first["id"]]


def test_search_pages_with_next_links(client: TestClient, settings: Settings) -> None:
    for i in range(3):
        completed_report(client, settings, f"1.2.4.{i}", "p1")
    page = client.get(
        "/fhir/DiagnosticReport", params={"patient": "p1", "_count": "2"}, headers=auth(settings)
    ).json()
    assert page["total"] == 3 and len(page["entry"]) == 2
    links = {link["relation"]: link["url"] for link in page["link"]}
    assert links["self"].startswith("http://127.0.0.1:8000/fhir/DiagnosticReport?")
    path = links["next"].removeprefix("http://127.0.0.1:8000")
    rest = client.get(path, headers=auth(settings)).json()
    assert len(rest["entry"]) == 1 and "next" not in {link["relation"] for link in rest["link"]}
    seen = {e["resource"]["id"] for e in page["entry"] + rest["entry"]}
    assert len(seen) == 3


@pytest.mark.parametrize(
    "query",
    [
        {"name": "x"},
        {"patient:missing": "true"},
        {"date": "2024-13-01"},
        {"date": "ap2024"},
        {"_count": "-1"},
        {"_sort": "status"},
        {"_offset": "1000000000000"},
        {"status": ""},
    ],
)
def test_unsupported_searches_get_400(client: TestClient, settings: Settings, query: dict[str, str]) -> None:
    assert_outcome(client.get("/fhir/DiagnosticReport", params=query, headers=auth(settings)), 400)


def test_unknown_ids_routes_and_methods(client: TestClient, settings: Settings) -> None:
    assert_outcome(
        client.get("/fhir/DiagnosticReport/nope", headers=auth(settings)), 404, "DiagnosticReport/nope"
    )
    assert_outcome(client.get("/fhir/Task/%00%01", headers=auth(settings)), 404)
    assert_outcome(client.get("/fhir/Patient/1", headers=auth(settings)), 404)
    deleted = client.delete("/fhir/DiagnosticReport/x", headers=auth(settings))
    assert_outcome(deleted, 405)
    assert deleted.headers["allow"] == "GET, PUT"


def test_versions_can_be_read_back(client: TestClient, settings: Settings) -> None:
    report = completed_report(client, settings)
    first = client.get(f"/fhir/DiagnosticReport/{report['id']}/_history/1", headers=auth(settings))
    assert first.status_code == 200 and first.json()["meta"]["versionId"] == "1"
    assert_outcome(
        client.get(f"/fhir/DiagnosticReport/{report['id']}/_history/7", headers=auth(settings)), 404
    )


# --- updating a report ---------------------------------------------------------------------------


def test_report_updates_need_the_current_version(client: TestClient, settings: Settings) -> None:
    report = completed_report(client, settings)
    url = f"/fhir/DiagnosticReport/{report['id']}"
    edited = {**report, "conclusion": "Partial response."}
    headers = {**auth(settings), "Content-Type": FHIR}

    assert_outcome(client.put(url, content=json.dumps(edited), headers=headers), 428, "If-Match")
    ok = client.put(url, content=json.dumps(edited), headers={**headers, "If-Match": 'W/"1"'})
    assert ok.status_code == 200, ok.text
    assert ok.headers["etag"] == 'W/"2"' and ok.json()["conclusion"] == "Partial response."
    stale = client.put(url, content=json.dumps(edited), headers={**headers, "If-Match": 'W/"1"'})
    assert_outcome(stale, 412, "version 2")
    assert stale.headers["etag"] == 'W/"2"'

    moved = {**edited, "subject": {"reference": "Patient/someone-else"}}
    assert_outcome(
        client.put(url, json=moved, headers={**auth(settings), "If-Match": 'W/"2"'}), 400, "subject"
    )
    bad_status = {**edited, "status": "signed"}
    assert_outcome(
        client.put(url, json=bad_status, headers={**auth(settings), "If-Match": 'W/"2"'}), 400, "status"
    )
    assert_outcome(
        client.put(
            url, json=edited, headers={**auth(settings, "system/DiagnosticReport.rs"), "If-Match": 'W/"2"'}
        ),
        403,
        "system/DiagnosticReport.u",
    )
    assert client.get(url, headers=auth(settings)).json()["meta"]["versionId"] == "2"


# --- the store on its own -----------------------------------------------------------------------


def test_store_transactions_reuse_conditional_creates_and_are_atomic(tmp_path: Path) -> None:
    store = ResourceStore(f"sqlite:///{tmp_path / 's.db'}")
    analyzer = FakeAnalyzer()
    bundle = analyzer(AnalysisRequest("t1", STUDY, "p1", "Patient/p1"))
    first = store.apply_transaction(bundle)
    second = store.apply_transaction(bundle)
    body_structure = "urn:uuid:00000003-0000-4000-8000-000000000000"
    assert first[body_structure] == second[body_structure]  # the same lesion track, reused
    report = "urn:uuid:00000001-0000-4000-8000-000000000000"
    assert first[report] != second[report]
    assert store.search("BodyStructure", {"patient": "p1"})[1] == 1

    broken = json.loads(json.dumps(bundle))
    broken["entry"][1]["resource"]["status"] = 7
    with pytest.raises(InvalidResourceError, match=r"Bundle.entry\[1\]"):
        store.apply_transaction(broken)
    assert store.search("DiagnosticReport", {})[1] == 2  # nothing of the broken Bundle was stored


def test_store_update_checks_the_version(tmp_path: Path) -> None:
    store = ResourceStore(f"sqlite:///{tmp_path / 's.db'}")
    created = store.create({"resourceType": "BodyStructure", "patient": {"reference": "Patient/p1"}})
    assert created["meta"]["versionId"] == "1" and re.fullmatch(r"[0-9a-f]{32}", created["id"])
    updated = store.update({**created, "description": "liver"}, if_match='W/"1"')
    assert updated["meta"]["versionId"] == "2"
    with pytest.raises(VersionConflict):
        store.update({**created, "description": "lung"}, if_match='W/"1"')
    with pytest.raises(InvalidSearchError, match="does not support"):
        store.search("BodyStructure", {"status": "active"})


def test_openapi_describes_routes_params_and_bearer_auth(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    search = schema["paths"]["/fhir/DiagnosticReport"]["get"]
    assert {"patient", "status", "date", "_sort", "_count"} <= {p["name"] for p in search["parameters"]}
    assert search["security"] == [{"bearer": []}]
    put = schema["paths"]["/fhir/DiagnosticReport/{id}"]["put"]
    assert {"400", "401", "403", "404", "412", "428"} <= set(put["responses"])
    # FastAPI's validation 422s are gone (they are FHIR 400s); the one 422 left is the sign-off refusal
    with_422 = [
        (route, method)
        for route, path in schema["paths"].items()
        for method, op in path.items()
        if "422" in op["responses"]
    ]
    assert with_422 == [("/fhir/DiagnosticReport/{id}", "put")]
    assert client.get("/docs").status_code == 200
