"""The web pages without a browser (FastAPI TestClient, SQLite): login, CSRF, roles, sites, escaping, versions.

The browser tests against the real stack are ``tests/integration/test_web.py``.
"""

from __future__ import annotations

import base64
import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from adapters.evidence import report_text, text_diff
from adapters.fhir_publish import SITE_EXTENSION
from adapters.resource_store import ResourceStore
from adapters.settings import Settings
from core.report import ReportText
from service.app import create_app
from service.users import UserStore
from service.web import EHR_REPORT_SYSTEM

PASSWORD = "correct-horse-battery"
XSS = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'


@dataclass
class Site:
    client: TestClient
    store: ResourceStore
    users: UserStore
    report_id: str


def _report(store: ResourceStore, station: str, findings: str) -> str:
    study = store.create(
        {
            "resourceType": "ImagingStudy",
            "extension": [{"url": SITE_EXTENSION, "valueString": station}],
            "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}],
            "status": "available",
            "subject": {"reference": "Patient/p1"},
        }
    )
    text = ReportText("CT of 2024-01-02.", findings, "RECIST 1.1: stable disease (SD).")
    report = store.create(
        {
            "resourceType": "DiagnosticReport",
            "extension": [{"url": SITE_EXTENSION, "valueString": station}],
            "status": "preliminary",
            "code": {"text": "CT follow-up"},
            "subject": {"reference": "Patient/p1"},
            "effectiveDateTime": "2024-03-04",
            "imagingStudy": [{"reference": f"ImagingStudy/{study['id']}"}],
            "conclusion": text.impression,
            "presentedForm": [
                {"contentType": "text/plain", "data": base64.b64encode(text.as_text().encode()).decode()}
            ],
        }
    )
    return str(report["id"])


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    settings = Settings(
        environment="test",
        database_url=f"sqlite:///{tmp_path / 'interval.db'}",
        artifacts_dir=tmp_path / "artifacts",
        web_station_sites={"CT01": "north"},
    )
    store = ResourceStore(settings.database_url)
    users = UserStore(settings.database_url)
    users.add_user("rad", PASSWORD, role="radiologist", sites=["north"], display_name="Dr Rad")
    users.add_user("clin", PASSWORD, role="clinician", sites=["north"], display_name="Dr Clin")
    users.add_user("far", PASSWORD, role="radiologist", sites=["south"])
    report_id = _report(store, "CT01", f"Liver lesion L1 is stable. {XSS}")
    with TestClient(create_app(settings, store=store, users=users)) as client:
        yield Site(client, store, users, report_id)


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def _artifacts(folder: Path, text: ReportText) -> None:
    """A study's report.json and a drafter's per-sentence record (draft.json) for study 1.2.3.4."""
    study = folder / "1.2.3.4"
    study.mkdir(parents=True)
    analysis = {
        "study": {
            "study_uid": "1.2.3.4",
            "study_date": "2024-03-04",
            "manufacturer": "GE",
            "model_name": "CT",
        },
        "model_version": "m1",
        "prior_dates": ["2024-01-02"],
        "alignments": {},
        "lesions": [],
        "history": [
            {"study_date": "2024-01-02", "study_uid": "1.2.9", "target_sum_mm": 30.0, "recist": None}
        ],
        "recist": {
            "category": "SD",
            "category_label": "stable disease",
            "target_response": "SD",
            "non_target_response": "none",
            "baseline_sum_mm": 30.0,
            "nadir_sum_mm": 30.0,
            "current_sum_mm": 30.0,
            "change_from_baseline_pct": 0.0,
            "change_from_nadir_pct": 0.0,
            "change_from_nadir_mm": 0.0,
            "new_lesions": [],
            "trace": ["Target SD."],
        },
        "warnings": [],
        "report": {"author": "deterministic"},
    }
    (study / "report.json").write_text(json.dumps(analysis))
    sentences = [
        {"section": "comparison", "text": text.comparison, "origin": "model", "drafted": "", "problems": []},
        {
            "section": "impression",
            "text": text.impression,
            "origin": "replaced",
            "drafted": "RECIST 1.1: partial response (PR).",
            "problems": ["states PR; the assessment is SD"],
        },
        {
            "section": "findings",
            "text": "",
            "origin": "removed",
            "drafted": "L9 grew.",
            "problems": ["names L9"],
        },
    ]
    (study / "draft.json").write_text(json.dumps({"sentences": sentences}))


def _login(client: TestClient, username: str) -> str:
    page = client.get("/login")
    r = client.post(
        "/login",
        data={"username": username, "password": PASSWORD, "csrf_token": _csrf(page.text), "next": "/"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    return r.headers["set-cookie"]


def _form(site: Site) -> dict[str, Any]:
    page = site.client.get(f"/reports/{site.report_id}")
    version = re.search(r'name="version" value="(\d+)"', page.text)
    return {"csrf_token": _csrf(page.text), "version": version.group(1) if version else ""}


def test_login_sets_a_strict_httponly_session_cookie_and_refuses_forged_forms(site: Site) -> None:
    r = site.client.get("/worklist", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=/worklist")
    page = site.client.get("/login")
    forged = site.client.post("/login", data={"username": "rad", "password": PASSWORD, "csrf_token": "x"})
    assert forged.status_code == 403
    wrong = site.client.post(
        "/login", data={"username": "rad", "password": "wrong-password", "csrf_token": _csrf(page.text)}
    )
    assert wrong.status_code == 401 and "not right" in wrong.text
    cookie = _login(site.client, "rad").lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
    assert site.client.get("/worklist").status_code == 200


def test_production_refuses_session_cookies_without_secure(tmp_path: Path) -> None:
    settings = Settings(
        environment="production", api_token_secret="s" * 40, database_url=f"sqlite:///{tmp_path / 'p.db'}"
    )
    with pytest.raises(ValueError, match="WEB_COOKIE_SECURE"):
        create_app(settings)


def test_a_form_without_the_session_csrf_token_or_from_another_origin_is_refused(site: Site) -> None:
    _login(site.client, "rad")
    form = _form(site)
    edit = {**form, "comparison": "a", "findings": "b", "impression": "c"}
    assert (
        site.client.post(f"/reports/{site.report_id}/save", data={**edit, "csrf_token": "bad"}).status_code
        == 403
    )
    foreign = site.client.post(
        f"/reports/{site.report_id}/save", data=edit, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    assert site.store.read("DiagnosticReport", site.report_id)["meta"]["versionId"] == "1"


def test_a_clinician_cannot_sign(site: Site) -> None:
    _login(site.client, "clin")
    page = site.client.get(f"/reports/{site.report_id}")
    assert page.status_code == 200 and 'data-testid="sign"' not in page.text
    r = site.client.post(
        f"/reports/{site.report_id}/sign",
        data={"csrf_token": _csrf(page.text), "version": "1", "impression": "Signed by a clinician."},
    )
    assert r.status_code == 403 and "Only radiologists can sign" in r.text
    assert site.store.read("DiagnosticReport", site.report_id)["status"] == "preliminary"
    assert site.client.get("/worklist", follow_redirects=False).headers["location"] == "/patients"


def test_another_sites_report_is_not_found(site: Site) -> None:
    _login(site.client, "far")
    assert site.client.get(f"/reports/{site.report_id}").status_code == 404
    assert site.report_id not in site.client.get("/worklist").text
    assert site.client.get("/patients/p1").status_code == 404


def test_report_text_is_escaped(site: Site) -> None:
    _login(site.client, "rad")
    page = site.client.get(f"/reports/{site.report_id}").text
    assert "<script>window.__xss" not in page and "<img src=x" not in page
    assert "&lt;script&gt;window.__xss=1&lt;/script&gt;" in page
    headers = site.client.get(f"/reports/{site.report_id}").headers
    assert "default-src 'none'" in headers["content-security-policy"]


def test_a_stale_version_is_refused_and_the_text_kept(site: Site) -> None:
    _login(site.client, "rad")
    form = _form(site)
    first = {**form, "comparison": "CT of 2024-01-02.", "findings": "First edit.", "impression": "Stable."}
    assert site.client.post(f"/reports/{site.report_id}/save", data=first).status_code == 200  # redirected
    second = {**form, "comparison": "CT of 2024-01-02.", "findings": "Second edit.", "impression": "Stable."}
    r = site.client.post(f"/reports/{site.report_id}/save", data=second)
    assert r.status_code == 409
    assert "changed by Dr Rad" in r.text and "NOT saved" in r.text and "Second edit." in r.text
    assert report_text(site.store.read("DiagnosticReport", site.report_id)).findings == "First edit."


def test_signing_makes_the_report_final_with_provenance_and_keeps_the_diff(site: Site) -> None:
    _login(site.client, "rad")
    form = {**_form(site), "comparison": "CT of 2024-01-02.", "findings": "Edited.", "impression": "Stable."}
    r = site.client.post(f"/reports/{site.report_id}/sign", data=form)
    assert r.status_code == 200 and "Report signed." in r.text
    stored = site.store.read("DiagnosticReport", site.report_id)
    assert stored["status"] == "final" and report_text(stored).findings == "Edited."
    assert stored["resultsInterpreter"][0]["display"] == "Dr Rad"
    provenance, _ = site.store.search("Provenance", {"target": f"DiagnosticReport/{site.report_id}"})
    assert [p["agent"][0]["who"]["display"] for p in provenance] == ["Dr Rad"]
    signed = [e for e in site.users.events(site.report_id) if e.action == "signed"]
    assert len(signed) == 1 and "+  Edited." in signed[0].diff and signed[0].ehr_status == "no EHR configured"
    # amending a signed report
    form = {**_form(site), "comparison": "CT of 2024-01-02.", "findings": "Amended.", "impression": "Stable."}
    assert "Report amended." in site.client.post(f"/reports/{site.report_id}/sign", data=form).text
    assert site.store.read("DiagnosticReport", site.report_id)["status"] == "amended"


def test_text_diff_lists_changed_sentences() -> None:
    draft = ReportText("A.", "B one. B two.", "C.")
    diff = text_diff(draft, ReportText("A.", "B one. B three.", "C."))
    assert "-  B two." in diff and "+  B three." in diff and "B one." in diff


@pytest.mark.parametrize(
    "target", ["//evil.example/x", "https://evil.example", "/\\evil", "/\t/evil.example"]
)
def test_login_only_returns_to_a_path_of_this_site(site: Site, target: str) -> None:
    page = site.client.get("/login")
    r = site.client.post(
        "/login",
        data={"username": "rad", "password": PASSWORD, "csrf_token": _csrf(page.text), "next": target},
        follow_redirects=False,
    )
    assert r.status_code == 303 and r.headers["location"] == "/worklist"


def test_model_text_and_verifier_replacements_are_marked(site: Site, tmp_path: Path) -> None:
    stored = site.store.read("DiagnosticReport", site.report_id)
    _artifacts(tmp_path / "artifacts", report_text(stored))
    _login(site.client, "rad")
    page = site.client.get(f"/reports/{site.report_id}").text
    assert '<span class="badge origin-model" title="where this sentence comes from">model text</span>' in page
    assert (
        "replaced by the verifier</span>" in page
        and "the model wrote: <q>RECIST 1.1: partial response" in page
    )
    assert "removed by the verifier: the model wrote &#34;L9 grew.&#34;" in page
    assert "stable disease (SD)" in page  # the analysis' response, from report.json


def test_a_signature_the_ehr_did_not_take_is_recorded_and_can_be_sent_again(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on: the EHR is down
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/fhir"
    settings = Settings(
        environment="test",
        database_url=f"sqlite:///{tmp_path / 'interval.db'}",
        ehr_base_url=dead,
        ehr_retry_attempts=1,
        web_station_sites={"CT01": "north"},
    )
    store = ResourceStore(settings.database_url)
    users = UserStore(settings.database_url)
    users.add_user("rad", PASSWORD, role="radiologist", sites=["north"])
    report_id = _report(store, "CT01", "Liver lesion L1 is stable.")
    report = store.read("DiagnosticReport", report_id)
    report["identifier"] = [{"system": EHR_REPORT_SYSTEM, "value": f"{dead}/DiagnosticReport/abc"}]
    store.update(report)
    with TestClient(create_app(settings, store=store, users=users)) as client:
        site = Site(client, store, users, report_id)
        _login(client, "rad")
        form = {**_form(site), "comparison": "CT.", "findings": "Stable.", "impression": "Stable disease."}
        page = client.post(f"/reports/{report_id}/sign", data=form)
        assert page.status_code == 200 and "Report signed." in page.text
        assert 'EHR: <span data-testid="ehr-status">failed: the EHR did not answer' in page.text
        assert "Send the signature to the EHR again" in page.text
        assert store.read("DiagnosticReport", report_id)["status"] == "final"  # signed here all the same
        again = client.post(f"/reports/{report_id}/resend", data={"csrf_token": _csrf(page.text)})
        assert again.status_code == 200 and "failed: the EHR did not answer" in again.text


def test_a_finding_shows_its_tta_confidence_and_whether_its_saliency_was_computed(
    site: Site, tmp_path: Path
) -> None:
    stored = site.store.read("DiagnosticReport", site.report_id)
    _artifacts(tmp_path / "artifacts", report_text(stored))
    study = tmp_path / "artifacts" / "1.2.3.4"
    analysis = json.loads((study / "report.json").read_text())

    def lesion(label: str, k: int) -> dict:
        return {
            "track_id": f"2.25.{k}",
            "label": label,
            "organ": "liver",
            "laterality": None,
            "recist_role": "target",
            "status": "measured",
            "change": "baseline",
            "current": {
                "long_axis_mm": 22.0,
                "short_axis_mm": 15.0,
                "volume_ml": 3.1,
                "slice_index": k,
                "long_axis_endpoints_kji": [[k, 10.0, 10.0], [k, 10.0, 20.0]],
                "centroid_lps_mm": [10.0, 10.0, 10.0],
                "probability": 0.93,
                "tta": {
                    "views": 4,
                    "detected_in": 3,
                    "long_axis_mm": [0.0, 24.0],
                    "probability": [0.2, 0.95],
                },
            },
            "prior": None,
        }

    analysis["lesions"] = [lesion("L1", 2), lesion("L2", 5)]
    (study / "report.json").write_text(json.dumps(analysis))
    saliency = np.zeros((8, 16, 16), np.float16)
    saliency[2, 4:8, 4:8] = 1.0  # L1 was explained, L2 was not
    np.savez(study / "segmentation.npz", labels=np.zeros((8, 16, 16), np.uint8), saliency=saliency)
    _login(site.client, "rad")
    page = site.client.get(f"/reports/{site.report_id}").text
    assert "93% lesion probability · found in 3 of 4 flipped views, long axis 0–24 mm" in page
    l1, l2 = page.split('id="finding-L1"')[1].split('id="finding-L2"')
    assert "occlusion saliency shown on the key slice" in l1
    assert "saliency not available (not computed for this lesion" in l2 and "--lesion L2" in l2
