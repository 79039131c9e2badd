"""Interval's FHIR API as an EHR uses it: a real HTTP server (uvicorn) on PostgreSQL, a real FHIR client
(fhirpy), the real test EHR (Medplum's router) behind it, and schemathesis against its OpenAPI.

The analysis runs for real on DICOM files with the generator's label maps as the segmenter
(``TruthSegmenter``), so these tests are about the API and the EHR, not the model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B import get_fhir_model_class
from fhirpy import SyncFHIRClient

from adapters import fhir_codes as C
from adapters.fhir_client import RetryPolicy
from adapters.image_folder import FolderImageSource
from adapters.settings import Settings
from fixtures.ehr import seed
from fixtures.services import FhirStandin, Postgres, free_port, serve_app
from fixtures.synth.cohort import CohortOptions, PatientTruth, make_patient
from fixtures.synth.evaluation import TruthSegmenter
from service.app import create_app
from service.auth import mint_token
from service.jobs import TASK_CODE_ANALYZE, TASK_CODE_SYSTEM
from service.users import UserStore
from workers.analysis import EhrConnection, PipelineAnalyzer

pytestmark = pytest.mark.integration

SECRET = "integration-test-secret-of-at-least-32-bytes"
EHR_SCOPES = "system/Task.cr system/Task.s system/DiagnosticReport.rs system/Observation.rs system/BodyStructure.rs system/Provenance.rs"
FAST = RetryPolicy(attempts=3, backoff_s=0.05, max_backoff_s=0.2, connect_timeout_s=1.0, read_timeout_s=10.0)


@dataclass
class Api:
    url: str
    token: str
    patient: PatientTruth

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}", "Accept": "application/fhir+json"}


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> PatientTruth:
    opts = CohortOptions(seed=58, matrix=96, min_time_points=3, max_time_points=3, vendors=("ge",))
    return make_patient(tmp_path_factory.mktemp("api"), 1, opts)


@pytest.fixture(scope="module")
def api(fhir_server: FhirStandin, postgres_db: Postgres, patient: PatientTruth) -> Iterator[Api]:
    fhir_server.control.wipe()
    seed(fhir_server.base_url, patient.folder, time_points=1)
    port = free_port()
    settings = Settings(
        database_url=postgres_db.url,
        api_token_secret=SECRET,
        public_base_url=f"http://127.0.0.1:{port}",
    )
    analyzer = PipelineAnalyzer(
        images=FolderImageSource([patient.folder]),
        segmenter=TruthSegmenter(patient.folder),
        ehr=EhrConnection(fhir_server.base_url, retry=FAST),
    )
    with serve_app(create_app(settings, analyzer=analyzer), port) as url:
        yield Api(url, mint_token(SECRET, "ehr-1", EHR_SCOPES), patient)


def _study_uid(p: PatientTruth, t: int) -> str:
    return str(json.loads((p.folder / p.time_points[t] / "truth.json").read_text())["study_uid"])


def _task(study_uid: str, patient_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": TASK_CODE_ANALYZE}]},
        "focus": {
            "type": "ImagingStudy",
            "identifier": {"system": C.DICOM_UID, "value": f"urn:oid:{study_uid}"},
        },
        "for": {"type": "Patient", "identifier": {"system": C.PATIENT_ID_SYSTEM, "value": patient_id}},
    }


def _poll(client: SyncFHIRClient, task_id: str, until: set[str], timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        task = client.reference("Task", task_id).to_resource()
        if task["status"] in until:
            return task
        assert time.monotonic() < deadline, f"Task stayed {task['status']}"
        time.sleep(0.25)


def test_an_ehr_client_orders_an_analysis_and_reads_the_report(api: Api) -> None:
    client = SyncFHIRClient(f"{api.url}/fhir", authorization=f"Bearer {api.token}")
    pid = json.loads((api.patient.folder / "patient.json").read_text())["patient_id"]
    task = client.resource("Task", **_task(_study_uid(api.patient, 1), pid))
    task.save()
    assert task["id"] and task["status"] in {"requested", "in-progress", "completed"}
    done = _poll(client, task["id"], {"completed", "failed"})
    assert done["status"] == "completed", done.get("statusReason")
    report_ref = done["output"][0]["valueReference"]["reference"]
    report = client.reference(*report_ref.split("/")).to_resource()
    assert report["status"] == "preliminary"
    assert any(s["code"] == "AIAST" for s in report["meta"]["security"])
    get_fhir_model_class("DiagnosticReport").model_validate(report.serialize())
    found = client.resources("DiagnosticReport").search(status="preliminary").sort("-date").fetch_all()
    assert [r["id"] for r in found] == [report["id"]]
    # every resource Interval serves validates
    for ref in report["result"]:
        obs = client.reference(*ref["reference"].split("/")).to_resource()
        get_fhir_model_class("Observation").model_validate(obs.serialize())
    # the same study ordered again returns the same Task
    again = client.resource("Task", **_task(_study_uid(api.patient, 1), pid))
    again.save()
    assert again["id"] == task["id"]


def test_only_a_radiologist_makes_a_report_final_and_every_attempt_is_audited(
    api: Api, postgres_db: Postgres
) -> None:
    """A system client cannot sign; a radiologist's token cannot sign AI findings nobody reviewed (this API's
    analyzer keeps no analysis record, so they cannot be reviewed here); both refusals are AuditEvents."""
    client = SyncFHIRClient(f"{api.url}/fhir", authorization=f"Bearer {api.token}")
    report = client.resources("DiagnosticReport").search(status="preliminary").first()
    assert report is not None, "run after the analysis test"
    url = f"{api.url}/fhir/DiagnosticReport/{report['id']}"
    body = {**report.serialize(), "status": "final"}
    if_match = {"If-Match": f'W/"{report["meta"]["versionId"]}"'}
    system = mint_token(SECRET, "ehr-2", "system/DiagnosticReport.rus")
    refused = httpx.put(url, json=body, headers={**api.headers(system), **if_match})
    assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"
    assert "only by a radiologist" in refused.json()["issue"][0]["diagnostics"]
    users = UserStore(postgres_db.url)
    try:
        if users.get("rad-api") is None:
            users.add_user("rad-api", "correct-horse-battery", role="radiologist", sites=["*"])
    finally:
        users.close()
    radiologist = mint_token(SECRET, "rad-api", "user/DiagnosticReport.ru")
    unreviewed = httpx.put(url, json=body, headers={**api.headers(radiologist), **if_match})
    assert unreviewed.status_code == 422, unreviewed.text
    assert unreviewed.json()["issue"][0]["code"] == "business-rule"
    assert "cannot be reviewed" in unreviewed.json()["issue"][0]["diagnostics"]
    assert client.reference("DiagnosticReport", report["id"]).to_resource()["status"] == "preliminary"

    auditor = SyncFHIRClient(
        f"{api.url}/fhir", authorization=f"Bearer {mint_token(SECRET, 'auditor', 'system/AuditEvent.rs')}"
    )
    ref = f"DiagnosticReport/{report['id']}"
    signs = auditor.resources("AuditEvent").search(entity=ref, subtype="report-sign").sort("date").fetch_all()
    agents = [(e["outcome"], e["agent"][0]["who"]["identifier"]["value"]) for e in signs]
    assert agents == [("4", "ehr-2"), ("4", "rad-api")]
    assert len(auditor.resources("AuditEvent").search(entity=ref, subtype="ai-output").fetch_all()) == 1
    for event in signs:
        get_fhir_model_class("AuditEvent").model_validate(event.serialize())


def test_scope_and_validation_errors_are_operation_outcomes(api: Api) -> None:
    weak = mint_token(SECRET, "viewer", "system/DiagnosticReport.rs")
    pid = "x"
    r = httpx.post(
        f"{api.url}/fhir/Task", json=_task(_study_uid(api.patient, 1), pid), headers=api.headers(weak)
    )
    assert r.status_code == 403 and r.json()["resourceType"] == "OperationOutcome"
    assert r.headers["content-type"].startswith("application/fhir+json")
    bad = {**_task(_study_uid(api.patient, 1), pid), "status": "not-a-status"}
    r = httpx.post(f"{api.url}/fhir/Task", json=bad, headers=api.headers())
    assert r.status_code == 400 and "Task.status" in r.json()["issue"][0]["diagnostics"]
    r = httpx.get(f"{api.url}/fhir/DiagnosticReport", headers={"Accept": "application/fhir+json"})
    assert r.status_code == 401 and r.json()["resourceType"] == "OperationOutcome"


def test_ehr_down_fails_the_task_with_a_reason_and_a_repost_retries_it(
    api: Api, fhir_server: FhirStandin
) -> None:
    client = SyncFHIRClient(f"{api.url}/fhir", authorization=f"Bearer {api.token}")
    pid = json.loads((api.patient.folder / "patient.json").read_text())["patient_id"]
    order = _task(_study_uid(api.patient, 2), pid)
    fhir_server.stop()
    try:
        task = client.resource("Task", **order)
        task.save()
        failed = _poll(client, task["id"], {"completed", "failed"})
    finally:
        fhir_server.start()
    assert failed["status"] == "failed"
    reason = failed["statusReason"]["text"]
    assert "EHR" in reason and "retried" in reason and pid not in reason
    # nothing was published while the EHR was down; re-posting the same order re-queues the same Task
    again = client.resource("Task", **order)
    again.save()
    assert again["id"] == task["id"]
    done = _poll(client, task["id"], {"completed", "failed"})
    assert done["status"] == "completed", done.get("statusReason")
    reports = httpx.get(
        f"{fhir_server.base_url}/DiagnosticReport", params={"status": "preliminary", "_count": "100"}
    ).json()
    assert reports.get("total", len(reports.get("entry", []))) == 2  # one per follow-up, none twice


def test_schemathesis_finds_no_server_error(api: Api, tmp_path: Path) -> None:
    """Property-based requests from the OpenAPI document, with a valid token: no 5xx, declared statuses."""
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{api.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {mint_token(SECRET, 'fuzz', 'system/*.cruds')}",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        os.environ.get("INTERVAL_SCHEMATHESIS_EXAMPLES", "25"),
        "--seed",
        "1",
        "--no-color",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    (tmp_path / "schemathesis.txt").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    print(run.stdout[-1500:])
    assert "No issues found" in run.stdout or " passed" in run.stdout, run.stdout[-2000:]


def test_metrics_count_outcomes_by_reason_and_tasks_by_status(api: Api) -> None:
    def samples() -> dict[str, float]:
        out = {}
        for line in httpx.get(f"{api.url}/metrics").text.splitlines():
            if line.startswith("interval_") and " " in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    failed_key = 'interval_analyses_total{outcome="failed",reason="no_ct_series"}'
    before = samples()
    client = SyncFHIRClient(f"{api.url}/fhir", authorization=f"Bearer {api.token}")
    task = client.resource("Task", **_task("1.2.826.0.1.999.1", "SOMEONE"))  # a study nobody holds
    task.save()
    failed = _poll(client, task["id"], {"completed", "failed"})
    assert (
        failed["status"] == "failed"
        and "not in the configured image folders" in failed["statusReason"]["text"]
    )
    after = samples()
    assert after[failed_key] == before.get(failed_key, 0.0) + 1
    assert after['interval_tasks{status="failed"}'] >= 1
    assert "# TYPE interval_step_seconds histogram" in httpx.get(f"{api.url}/metrics").text
