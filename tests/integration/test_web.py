"""The web pages in a real browser (Debian's Chromium driven by Playwright) against the real stack.

uvicorn serves Interval on PostgreSQL; the EHR is the FHIR stand-in, seeded with a generated patient's two
prior studies (the latest prior report carrying an XSS payload in its text); the follow-up is analysed for
real by ``PipelineAnalyzer`` with the generator's label maps (``TruthSegmenter``), published to the EHR and
its artifacts kept for the evidence images. Then people use the pages: two radiologists edit the same draft
(the second save is refused), one reviews the evidence, rejects a finding, edits and signs; a clinician sees
the course and cannot sign; a radiologist of another site sees nothing. Sending a signature to the EHR again
(after it refused or lost its reply) is driven without the browser (TestClient, SQLite), against the same
FHIR stand-in.

Screenshots of every step land in ``out/test-artifacts/web/`` (gitignored).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pydicom
import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from adapters import fhir_codes as C
from adapters.ai_switch import AiSwitchStore
from adapters.evidence import report_text
from adapters.fhir_client import FhirClient, RetryPolicy
from adapters.fhir_publish import EHR_REPORT_SYSTEM, OBSERVATION_ID_SYSTEM, SITE_EXTENSION, sign_report
from adapters.image_folder import FolderImageSource
from adapters.resource_store import ResourceStore
from adapters.settings import Settings
from core.report import ReportText
from fixtures.ehr import seed
from fixtures.services import FhirStandin, Postgres, free_port, serve_app
from fixtures.synth.cohort import CohortOptions, PatientTruth, make_patient
from fixtures.synth.evaluation import TruthSegmenter
from service.app import create_app
from service.auth import mint_token
from service.jobs import TASK_CODE_ANALYZE, TASK_CODE_SYSTEM
from service.users import UserStore
from service.web import USER_SYSTEM
from workers.analysis import EhrConnection, PipelineAnalyzer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "out" / "test-artifacts" / "web"
SECRET = "web-integration-test-secret-of-32-bytes+"
PASSWORD = "correct-horse-battery"
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
FAST = RetryPolicy(attempts=3, backoff_s=0.05, max_backoff_s=0.2, connect_timeout_s=1.0, read_timeout_s=10.0)
CHROMIUM = Path(
    "/usr/bin/chromium"
)  # Debian's package (scripts/install-services); never `playwright install`
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]


@dataclass
class Stack:
    url: str
    ehr_url: str
    patient: PatientTruth
    report_id: str  # in Interval's store
    ehr_report: str  # "DiagnosticReport/<id>" at the EHR
    api_token: str
    analysis: dict[str, Any]  # the follow-up's report.json (artifacts)
    artifacts_dir: Path


def _study_uid(p: PatientTruth, t: int) -> str:
    return str(json.loads((p.folder / p.time_points[t] / "truth.json").read_text())["study_uid"])


def _own_database(db: Postgres, name: str) -> str:
    with psycopg.connect(db.dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return db.url.rsplit("/", 1)[0] + f"/{name}"


def _poison_latest_prior(ehr_url: str, patient_ref: str) -> None:
    """Append the XSS payload to the text of the patient's latest prior report at the EHR."""
    found = httpx.get(f"{ehr_url}/DiagnosticReport", params={"subject": patient_ref, "_count": "50"}).json()
    reports = sorted((e["resource"] for e in found["entry"]), key=lambda r: r["effectiveDateTime"])
    latest = reports[-1]
    text = base64.b64decode(latest["presentedForm"][0]["data"]).decode() + f" Note: {XSS}"
    latest["presentedForm"][0]["data"] = base64.b64encode(text.encode()).decode()
    r = httpx.put(f"{ehr_url}/DiagnosticReport/{latest['id']}", json=latest)
    assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def stack(
    fhir_server: FhirStandin, postgres_db: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    # seed 72: four lesions, one of them a new lymph node (progression), two prior studies
    opts = CohortOptions(seed=72, matrix=96, min_time_points=3, max_time_points=3, vendors=("ge",))
    patient = make_patient(tmp_path_factory.mktemp("web"), 1, opts)
    fhir_server.control.wipe()
    patient_ref = seed(fhir_server.base_url, patient.folder, time_points=2)
    _poison_latest_prior(fhir_server.base_url, patient_ref)
    station = str(
        pydicom.dcmread(
            next((patient.folder / "t2" / "dicom").iterdir()), stop_before_pixels=True
        ).StationName
    )
    port = free_port()
    settings = Settings(
        database_url=_own_database(postgres_db, "interval_web"),
        api_token_secret=SECRET,
        public_base_url=f"http://127.0.0.1:{port}",
        ehr_base_url=fhir_server.base_url,
        ehr_retry_attempts=3,
        ehr_backoff_s=0.05,
        image_roots=[patient.folder],
        artifacts_dir=tmp_path_factory.mktemp("artifacts"),
        web_station_sites={station: "north"},
    )
    users = UserStore(settings.database_url)
    users.add_user("one", PASSWORD, role="radiologist", sites=["north"], display_name="Dr One")
    users.add_user("two", PASSWORD, role="radiologist", sites=["north"], display_name="Dr Two")
    users.add_user("clin", PASSWORD, role="clinician", sites=["north"], display_name="Dr Clinic")
    users.add_user("far", PASSWORD, role="radiologist", sites=["south"], display_name="Dr Far")
    users.add_user("boss", PASSWORD, role="admin", sites=["*"], display_name="Site Admin")
    switches = AiSwitchStore(settings.database_url)
    analyzer = PipelineAnalyzer(
        images=FolderImageSource([patient.folder]),
        segmenter=TruthSegmenter(patient.folder),
        ehr=EhrConnection(fhir_server.base_url, retry=FAST),
        artifacts_dir=settings.artifacts_dir,
        switches=switches,
        station_sites=settings.web_station_sites,
    )
    app = create_app(settings, analyzer=analyzer, users=users)
    serving = contextlib.ExitStack()
    url = serving.enter_context(serve_app(app, port))
    token = mint_token(SECRET, "ehr", "system/Task.crs system/DiagnosticReport.rs system/Observation.rs")
    headers = {"Authorization": f"Bearer {token}"}
    try:
        pid = json.loads((patient.folder / "patient.json").read_text())["patient_id"]
        task = {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": TASK_CODE_ANALYZE}]},
            "focus": {"identifier": {"system": C.DICOM_UID, "value": f"urn:oid:{_study_uid(patient, 2)}"}},
            "for": {"identifier": {"system": C.PATIENT_ID_SYSTEM, "value": pid}},
        }
        created = httpx.post(f"{url}/fhir/Task", json=task, headers=headers).json()
        deadline = time.monotonic() + 120
        while (done := httpx.get(f"{url}/fhir/Task/{created['id']}", headers=headers).json())[
            "status"
        ] not in (
            "completed",
            "failed",
        ):
            assert time.monotonic() < deadline, "the analysis did not finish"
            time.sleep(0.25)
        assert done["status"] == "completed", done.get("statusReason")
        report_id = done["output"][0]["valueReference"]["reference"].split("/")[1]
        report = httpx.get(f"{url}/fhir/DiagnosticReport/{report_id}", headers=headers).json()
        ehr_value = next(i["value"] for i in report["identifier"] if i["system"].endswith("/ehr-report"))
        ehr_report = "/".join(ehr_value.rsplit("/", 2)[-2:])
        SHOTS.mkdir(parents=True, exist_ok=True)
        analysis = json.loads((settings.artifacts_dir / _study_uid(patient, 2) / "report.json").read_text())
        yield Stack(
            url, fhir_server.base_url, patient, report_id, ehr_report, token, analysis, settings.artifacts_dir
        )
    finally:
        serving.close()
        users.close()
        switches.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        raise RuntimeError(
            f"{CHROMIUM} is missing: install the `chromium` package (scripts/install-services)"
        )
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        yield ctx
    finally:
        ctx.close()


def _login(page: Page, stack: Stack, username: str, then: str = "/") -> None:
    page.goto(f"{stack.url}/login?next={then}")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_load_state("load")
    expect(page.get_by_test_id("who")).to_be_visible()


def _shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _png_loaded(page: Page, selector: str) -> None:
    """The <img> finished loading a real PNG (decoded by the browser, served as image/png)."""
    img = page.locator(selector).first
    img.scroll_into_view_if_needed()
    page.wait_for_function(
        "el => el.complete && el.naturalWidth > 0", arg=img.element_handle(), timeout=20_000
    )
    response = page.request.get(str(img.evaluate("el => el.src")))
    assert response.status == 200 and response.headers["content-type"] == "image/png"
    assert response.body()[:8] == b"\x89PNG\r\n\x1a\n"


def _report(stack: Stack) -> dict[str, Any]:
    r = httpx.get(
        f"{stack.url}/fhir/DiagnosticReport/{stack.report_id}",
        headers={"Authorization": f"Bearer {stack.api_token}"},
    )
    assert r.status_code == 200
    return dict(r.json())


def _text(report: dict[str, Any]) -> ReportText:
    return ReportText.from_text(base64.b64decode(report["presentedForm"][0]["data"]).decode())


def test_two_radiologists_edit_one_draft_and_the_second_save_is_refused(
    stack: Stack, browser: Browser
) -> None:
    contexts = [browser.new_context(viewport={"width": 1400, "height": 1000}) for _ in range(2)]
    try:
        first, second = (ctx.new_page() for ctx in contexts)
        _login(first, stack, "one", f"/reports/{stack.report_id}")
        _login(second, stack, "two", f"/reports/{stack.report_id}")
        first.get_by_test_id("comparison").fill(
            "CT of the chest and abdomen, compared with the prior studies."
        )
        first.get_by_test_id("save").click()
        expect(first.get_by_test_id("notice")).to_have_text("Draft saved.")
        mine = "Comparison as Dr Two would word it."
        second.get_by_test_id("comparison").fill(mine)
        second.get_by_test_id("save").click()
        conflict = second.get_by_test_id("conflict")
        expect(conflict).to_contain_text("changed by Dr One")
        expect(conflict).to_contain_text("NOT saved")
        expect(second.get_by_test_id("comparison")).to_have_value(mine)  # nothing lost
        expect(second.get_by_test_id("current-text")).to_contain_text("compared with the prior studies")
        _shot(second, "01-second-save-refused")
    finally:
        for ctx in contexts:
            ctx.close()
    assert _text(_report(stack)).comparison.startswith("CT of the chest and abdomen")


def test_radiologist_reviews_evidence_rejects_a_finding_edits_and_signs(
    stack: Stack, context: BrowserContext
) -> None:
    page = context.new_page()
    _login(page, stack, "one")
    # the worklist: this draft, urgent (a new lesion)
    row = page.get_by_test_id("worklist").locator("tbody tr").first
    expect(row).to_contain_text("new lesion")
    _shot(page, "02-worklist")
    row.get_by_role("link", name="Review").click()
    expect(page.get_by_test_id("status")).to_have_text("preliminary")
    # origins of the sentences, evidence of each finding
    expect(page.get_by_test_id("sentence").first).to_contain_text("edited by a radiologist")  # Dr One's
    expect(page.locator("li.origin-deterministic").first).to_contain_text("deterministic wording")
    assert page.locator("li.origin-deterministic").count() >= 3
    findings = page.get_by_test_id("finding")
    assert findings.count() == 4
    _png_loaded(page, "[data-testid=finding][data-label=L1] [data-testid=current-image]")
    _png_loaded(page, "[data-testid=finding][data-label=L1] [data-testid=prior-image]")
    _png_loaded(page, "[data-testid=finding][data-label=L4] [data-testid=prior-image]")  # new: same place
    expect(findings.first.get_by_test_id("saliency")).to_contain_text("saliency not available")
    expect(findings.first.get_by_test_id("confidence")).to_contain_text("100% lesion probability")
    # the prior report (with the payload) is text
    expect(page.get_by_test_id("prior-text")).to_contain_text("<script>window.__xss=1</script>")
    assert page.evaluate("typeof window.__xss") == "undefined"
    _shot(page, "03-draft-with-evidence")
    # reject L3: it leaves the text and the report's results, and is kept as feedback
    l3 = page.locator("[data-testid=finding][data-label=L3]")
    l3.locator("input[name=reason]").fill("artefact, not a lesion")
    l3.get_by_test_id("reject").click()
    expect(page.get_by_test_id("notice")).to_contain_text("Finding rejected")
    expect(page.locator("[data-testid=finding][data-label=L3] [data-testid=verdict]")).to_contain_text(
        "rejected"
    )
    findings_text = page.get_by_test_id("findings").input_value()
    assert "L3" not in findings_text and "L1" in findings_text
    # signing before every AI finding has a verdict is refused, naming the ones left
    expect(page.get_by_test_id("pending")).to_contain_text("L1, L2, L4")
    page.get_by_test_id("sign").click()
    expect(page.get_by_test_id("conflict")).to_contain_text("Not signed.")
    expect(page.get_by_test_id("conflict")).to_contain_text("not reviewed: L1, L2, L4")
    expect(page.get_by_test_id("status")).to_have_text("preliminary")
    _shot(page, "04a-sign-refused-findings-pending")
    for label in ("L1", "L2", "L4"):
        page.locator(f"[data-testid=finding][data-label={label}]").get_by_test_id("accept").click()
        expect(page.get_by_test_id("notice")).to_have_text("Finding accepted.")
    expect(page.get_by_test_id("pending")).to_have_count(0)
    # edit a sentence and sign
    edited = findings_text.replace("Liver lesion L1", "Segment VII liver lesion L1", 1)
    assert edited != findings_text
    page.get_by_test_id("findings").fill(edited + " Clinical correlation recommended.")
    _shot(page, "04-edited")
    page.get_by_test_id("sign").click()
    expect(page.get_by_test_id("notice")).to_have_text("Report signed.")
    expect(page.get_by_test_id("status")).to_have_text("final")
    expect(page.get_by_test_id("ehr-status").last).to_have_text("sent")
    expect(page.locator("li.origin-edited", has_text="Segment VII liver lesion L1")).to_have_count(1)
    _shot(page, "05-signed")

    # Interval's FHIR API: final, the edited text, L3's observation out of the results
    report = _report(stack)
    assert report["status"] == "final" and report["resultsInterpreter"][0]["display"] == "Dr One"
    text = _text(report)
    assert (
        "Segment VII liver lesion L1" in text.findings
        and "Clinical correlation recommended." in text.findings
    )
    assert "L3" not in text.findings
    # the EHR: final, same text, signed by a Practitioner, L3 entered-in-error, a Provenance by the radiologist
    at_ehr = httpx.get(f"{stack.ehr_url}/{stack.ehr_report}").json()
    assert at_ehr["status"] == "final" and _text(at_ehr) == text
    practitioner = at_ehr["resultsInterpreter"][0]["reference"]
    assert practitioner.startswith("Practitioner/") and at_ehr["resultsInterpreter"][0]["display"] == "Dr One"
    provenance = httpx.get(f"{stack.ehr_url}/Provenance", params={"target": stack.ehr_report}).json()
    assert any(
        a["who"].get("reference") == practitioner for e in provenance["entry"] for a in e["resource"]["agent"]
    )
    analysis = stack.analysis
    l3_track = next(les["track_id"] for les in analysis["lesions"] if les["label"] == "L3")
    ident = f"{analysis['study']['study_uid']}/{analysis['model_version']}/{l3_track}"
    obs = httpx.get(f"{stack.ehr_url}/Observation", params={"identifier": f"{OBSERVATION_ID_SYSTEM}|{ident}"})
    assert [e["resource"]["status"] for e in obs.json()["entry"]] == ["entered-in-error"]

    # the audit trail in PostgreSQL, through the FHIR API: the AI output, the verdicts, the refused and the
    # accepted signature, each by whom
    def audit(**params: str) -> list[dict[str, Any]]:
        auditor = mint_token(SECRET, "auditor", "system/AuditEvent.rs")
        r = httpx.get(
            f"{stack.url}/fhir/AuditEvent",
            params={**params, "_sort": "_lastUpdated"},
            headers={"Authorization": f"Bearer {auditor}"},
        )
        assert r.status_code == 200, r.text
        return [e["resource"] for e in r.json().get("entry", [])]

    report_ref = f"DiagnosticReport/{stack.report_id}"
    ai_output = audit(entity=report_ref, subtype="ai-output")
    assert len(ai_output) == 1 and ai_output[0]["agent"][0]["who"]["reference"].startswith("Device/")
    signs = audit(entity=report_ref, subtype="report-sign")
    assert [(e["outcome"], e["agent"][0]["who"]["identifier"]["value"]) for e in signs] == [
        ("4", "one"),
        ("0", "one"),
    ]
    assert "not reviewed: L1, L2, L4" in signs[0]["outcomeDesc"]
    verdicts = audit(entity=report_ref, **{"agent:identifier": f"{USER_SYSTEM}|one"})
    kinds = [e["subtype"][0]["code"] for e in verdicts]
    assert kinds.count("finding-accept") == 3 and kinds.count("finding-reject") == 1
    assert "report-view" in kinds and "report-edit" in kinds  # Dr One's save in the first test
    l3 = audit(**{"entity:identifier": f"urn:dicom:uid|urn:oid:{l3_track}"})
    assert [e["subtype"][0]["code"] for e in l3] == ["finding-reject"]
    assert "Dr One" not in json.dumps(audit(entity=report_ref))


def test_clinician_sees_the_course_and_cannot_sign(stack: Stack, context: BrowserContext) -> None:
    page = context.new_page()
    _login(page, stack, "clin")
    page.get_by_test_id("patients").locator("tbody a").first.click()
    _png_loaded(page, "[data-testid=chart]")
    expect(page.get_by_test_id("response")).to_contain_text("progressive disease")
    expect(page.get_by_test_id("trace")).to_contain_text("new lesions yes")
    expect(page.locator("img.thumb").first).to_be_visible()
    # the prior report with the payload, shown as text, inert
    expect(page.get_by_test_id("ehr-report-text").first).to_contain_text('onerror="window.__xss=2"')
    assert page.evaluate("typeof window.__xss") == "undefined"
    _shot(page, "06-clinician-course")
    # no sign button on the report, and a forged sign request is refused
    page.goto(f"{stack.url}/reports/{stack.report_id}")
    expect(page.get_by_test_id("sign")).to_have_count(0)
    csrf = page.locator("input[name=csrf_token]").first.get_attribute("value")
    response = page.request.post(
        f"{stack.url}/reports/{stack.report_id}/sign",
        form={"csrf_token": csrf or "", "version": "99", "impression": "x"},
    )
    assert response.status == 403 and "Only radiologists can sign" in response.text()
    page.set_content(response.text())  # the page the clinician would see
    _shot(page, "07-clinician-sign-refused")
    assert _report(stack)["status"] == "final"


def test_a_radiologist_of_another_site_sees_nothing(stack: Stack, context: BrowserContext) -> None:
    page = context.new_page()
    _login(page, stack, "far")
    expect(page.locator("main")).to_contain_text("Nothing here")
    response = page.request.get(f"{stack.url}/reports/{stack.report_id}")
    assert response.status == 404
    assert page.request.get(f"{stack.url}/reports/{stack.report_id}/evidence/x/current.png").status == 404
    _shot(page, "08-other-site")


def test_report_text_from_the_model_is_escaped_too(stack: Stack) -> None:
    """Nothing from a report reaches the page unescaped: checked on the raw HTML as well."""
    with httpx.Client(base_url=stack.url) as client:
        login = client.get("/login")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', login.text)
        assert csrf is not None
        client.post("/login", data={"username": "clin", "password": PASSWORD, "csrf_token": csrf.group(1)})
        html = client.get(f"/patients/{_report(stack)['subject']['reference'].split('/')[1]}").text
    assert "<script>window.__xss" not in html and "&lt;script&gt;window.__xss=1&lt;/script&gt;" in html


def test_an_admin_switches_ai_off_for_the_site_and_the_next_study_is_read_without_ai(
    stack: Stack, context: BrowserContext, browser: Browser
) -> None:
    page = context.new_page()
    _login(page, stack, "boss")
    page.get_by_test_id("admin-ai").click()
    expect(page.locator("[data-site=north] [data-testid=state]")).to_have_text("on")
    page.get_by_test_id("site").fill("north")
    page.get_by_test_id("off").check()
    page.get_by_test_id("reason").fill("scanner upgrade, model not validated on it yet")
    page.get_by_test_id("apply").click()
    expect(page.get_by_test_id("notice")).to_have_text("AI switch changed.")
    expect(page.locator("[data-site=north] [data-testid=state]")).to_have_text("off")
    _shot(page, "09-ai-switched-off")
    headers = {"Authorization": f"Bearer {stack.api_token}"}
    try:
        # the EHR orders the analysis of another study of this site (the first prior, not analysed here yet)
        pid = json.loads((stack.patient.folder / "patient.json").read_text())["patient_id"]
        task = {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": TASK_CODE_ANALYZE}]},
            "focus": {
                "identifier": {"system": C.DICOM_UID, "value": f"urn:oid:{_study_uid(stack.patient, 1)}"}
            },
            "for": {"identifier": {"system": C.PATIENT_ID_SYSTEM, "value": pid}},
        }
        reports_before = httpx.get(f"{stack.url}/fhir/DiagnosticReport", headers=headers).json()["total"]
        created = httpx.post(f"{stack.url}/fhir/Task", json=task, headers=headers).json()
        deadline = time.monotonic() + 60
        while (done := httpx.get(f"{stack.url}/fhir/Task/{created['id']}", headers=headers).json())[
            "status"
        ] not in ("completed", "failed"):
            assert time.monotonic() < deadline, "the analysis did not finish"
            time.sleep(0.25)
        assert done["status"] == "completed", done.get("statusReason")
        assert done["businessStatus"]["coding"][0]["code"] == "ai-not-used"
        assert "AI is switched off for site north" in done["businessStatus"]["text"]
        assert (
            httpx.get(f"{stack.url}/fhir/DiagnosticReport", headers=headers).json()["total"] == reports_before
        )
        assert not (stack.artifacts_dir / _study_uid(stack.patient, 1)).exists()  # no segmentation was kept
        # the radiologist's worklist says so
        own = browser.new_context(viewport={"width": 1400, "height": 1000})
        try:
            reader = own.new_page()
            _login(reader, stack, "one", "/worklist")
            row = reader.get_by_test_id("ai-not-used").locator(f"tr[data-task='{done['id']}']")
            expect(row).to_contain_text("AI not used")
            expect(row).to_contain_text("north")
            _shot(reader, "10-worklist-ai-not-used")
        finally:
            own.close()
    finally:
        page.goto(f"{stack.url}/admin/ai")
        page.get_by_test_id("site").fill("north")
        page.get_by_test_id("on").check()
        page.get_by_test_id("reason").fill("validated on the upgraded scanner")
        page.get_by_test_id("apply").click()
        expect(page.locator("[data-site=north] [data-testid=state]")).to_have_text("on")
    auditor = {"Authorization": f"Bearer {mint_token(SECRET, 'auditor', 'system/AuditEvent.rs')}"}
    changes = httpx.get(
        f"{stack.url}/fhir/AuditEvent", params={"subtype": "ai-switch-change"}, headers=auditor
    ).json()
    assert changes["total"] == 2
    no_ai = httpx.get(
        f"{stack.url}/fhir/AuditEvent", params={"entity": f"Task/{done['id']}"}, headers=auditor
    ).json()
    assert [e["resource"]["subtype"][0]["code"] for e in no_ai["entry"]] == ["ai-not-used"]


# --- sending a signature again ----------------------------------------------------------------------


@dataclass
class SignedWhileDown:
    """A report signed in Interval while the EHR refused every request: recorded as failed, send-again shown."""

    client: TestClient
    store: ResourceStore
    ehr_url: str
    report_id: str
    ehr_report: str  # "DiagnosticReport/<id>" at the EHR, still preliminary there
    page: str  # the report page after signing


def _ehr_provenances(ehr_url: str, ehr_report: str) -> int:
    found = httpx.get(f"{ehr_url}/Provenance", params={"target": ehr_report}).json()
    return len(found.get("entry") or [])


@pytest.fixture
def signed_while_down(fhir_server: FhirStandin, tmp_path: Path) -> Iterator[SignedWhileDown]:
    fhir_server.reset()
    ehr_url = fhir_server.base_url
    patient = httpx.post(f"{ehr_url}/Patient", json={"resourceType": "Patient"}).json()
    draft = ReportText("CT of 2024-01-02.", "Liver lesion L1 is stable.", "RECIST 1.1: stable disease (SD).")
    form = [{"contentType": "text/plain", "data": base64.b64encode(draft.as_text().encode()).decode()}]
    at_ehr = httpx.post(
        f"{ehr_url}/DiagnosticReport",
        json={
            "resourceType": "DiagnosticReport",
            "status": "preliminary",
            "code": {"text": "CT follow-up"},
            "subject": {"reference": f"Patient/{patient['id']}"},
            "presentedForm": form,
        },
    ).json()
    ehr_report = f"DiagnosticReport/{at_ehr['id']}"
    settings = Settings(
        environment="test",
        database_url=f"sqlite:///{tmp_path / 'interval.db'}",
        artifacts_dir=tmp_path / "artifacts",
        ehr_base_url=ehr_url,
        ehr_retry_attempts=1,
        web_station_sites={"CT01": "north"},
    )
    store = ResourceStore(settings.database_url)
    users = UserStore(settings.database_url)
    users.add_user("rad", PASSWORD, role="radiologist", sites=["north"], display_name="Dr Rad")
    report_id = store.create(
        {
            "resourceType": "DiagnosticReport",
            "extension": [{"url": SITE_EXTENSION, "valueString": "CT01"}],
            "identifier": [{"system": EHR_REPORT_SYSTEM, "value": f"{ehr_url}/{ehr_report}"}],
            "status": "preliminary",
            "code": {"text": "CT follow-up"},
            "subject": {"reference": f"Patient/{patient['id']}"},
            "effectiveDateTime": "2024-03-04",
            "conclusion": draft.impression,
            "presentedForm": form,
        }
    )["id"]
    try:
        with TestClient(create_app(settings, store=store, users=users)) as client:
            login = client.get("/login")
            client.post(
                "/login", data={"username": "rad", "password": PASSWORD, "csrf_token": _csrf(login.text)}
            )
            editor = client.get(f"/reports/{report_id}").text
            version = re.search(r'name="version" value="(\d+)"', editor)
            assert version is not None
            signed = {
                "csrf_token": _csrf(editor),
                "version": version.group(1),
                "comparison": draft.comparison,
                "findings": "Segment VII liver lesion L1 is stable.",
                "impression": draft.impression,
            }
            fhir_server.control.fail(503, count=50)
            page = client.post(f"/reports/{report_id}/sign", data=signed)
            fhir_server.reset()
            assert page.status_code == 200 and "Report signed." in page.text
            assert 'data-testid="ehr-status">failed:' in page.text
            assert "Send the signature to the EHR again" in page.text
            assert httpx.get(f"{ehr_url}/{ehr_report}").json()["status"] == "preliminary"
            yield SignedWhileDown(client, store, ehr_url, str(report_id), ehr_report, page.text)
    finally:
        fhir_server.reset()
        users.close()


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def test_sending_again_signs_the_report_the_ehr_did_not_get(signed_while_down: SignedWhileDown) -> None:
    s = signed_while_down
    page = s.client.post(f"/reports/{s.report_id}/resend", data={"csrf_token": _csrf(s.page)})
    assert page.status_code == 200
    assert 'data-testid="ehr-status">sent</span>' in page.text
    assert "Send the signature to the EHR again" not in page.text
    at_ehr = httpx.get(f"{s.ehr_url}/{s.ehr_report}").json()
    assert at_ehr["status"] == "final" and at_ehr["resultsInterpreter"][0]["display"] == "Dr Rad"
    assert _text(at_ehr).findings == "Segment VII liver lesion L1 is stable."
    assert _ehr_provenances(s.ehr_url, s.ehr_report) == 1


def test_sending_again_writes_nothing_when_the_ehr_took_the_signature_but_its_reply_was_lost(
    signed_while_down: SignedWhileDown,
) -> None:
    s = signed_while_down
    # the first signature did reach the EHR (its reply never came back): the EHR holds it as sign_report
    # writes it, signed by the same radiologist with the text signed in Interval
    signed_text = report_text(s.store.read("DiagnosticReport", s.report_id))
    practitioner = httpx.post(
        f"{s.ehr_url}/Practitioner",
        json={"resourceType": "Practitioner", "identifier": [{"system": USER_SYSTEM, "value": "rad"}]},
    ).json()

    async def arrive() -> None:
        async with FhirClient(s.ehr_url, retry=FAST) as ehr:
            await sign_report(
                ehr,
                s.ehr_report,
                practitioner_ref=f"Practitioner/{practitioner['id']}",
                practitioner_display="Dr Rad",
                text=signed_text,
            )

    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API may keep an event loop running in this thread
        pool.submit(asyncio.run, arrive()).result()
    before = httpx.get(f"{s.ehr_url}/{s.ehr_report}").json()
    assert before["status"] == "final"
    provenances = _ehr_provenances(s.ehr_url, s.ehr_report)

    page = s.client.post(f"/reports/{s.report_id}/resend", data={"csrf_token": _csrf(s.page)})
    after = httpx.get(f"{s.ehr_url}/{s.ehr_report}").json()
    assert after["status"] == "final"  # not "amended" by its own signature
    assert after["meta"]["versionId"] == before["meta"]["versionId"]
    assert _ehr_provenances(s.ehr_url, s.ehr_report) == provenances
    assert page.status_code == 200
    assert 'data-testid="ehr-status">sent (the EHR already had this signature)</span>' in page.text
    assert "Send the signature to the EHR again" not in page.text


def test_sending_again_an_amendment_that_kept_the_text_still_amends(
    signed_while_down: SignedWhileDown, fhir_server: FhirStandin
) -> None:
    s = signed_while_down
    s.client.post(f"/reports/{s.report_id}/resend", data={"csrf_token": _csrf(s.page)})
    assert httpx.get(f"{s.ehr_url}/{s.ehr_report}").json()["status"] == "final"
    # amended without changing the text while the EHR is down: the EHR holds the same text, but as "final"
    editor = s.client.get(f"/reports/{s.report_id}").text
    version = re.search(r'name="version" value="(\d+)"', editor)
    assert version is not None
    text = report_text(s.store.read("DiagnosticReport", s.report_id))
    same = {"comparison": text.comparison, "findings": text.findings, "impression": text.impression}
    fhir_server.control.fail(503, count=50)
    page = s.client.post(
        f"/reports/{s.report_id}/sign",
        data={"csrf_token": _csrf(editor), "version": version.group(1), **same},
    )
    fhir_server.reset()
    assert "Report amended." in page.text and 'data-testid="ehr-status">failed:' in page.text
    again = s.client.post(f"/reports/{s.report_id}/resend", data={"csrf_token": _csrf(page.text)})
    assert 'data-testid="ehr-status">sent</span>' in again.text
    at_ehr = httpx.get(f"{s.ehr_url}/{s.ehr_report}").json()
    assert at_ehr["status"] == "amended" and _text(at_ehr) == text
