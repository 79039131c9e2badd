"""Human oversight rules on their own: the AI switch decision, the sign-off rule, explicit review of findings;
the switch's SQL store; and the analysis honouring the switch (no model runs for a switched-off site)."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from adapters.ai_switch import AiSwitchStore
from adapters.fhir_audit import KINDS, audit_event, report_entities, user_agent
from adapters.fhir_publish import AI_NOT_USED, AI_OUTCOME_SYSTEM, AIAST, OBSERVATION_ID_SYSTEM, SITE_EXTENSION
from adapters.fhir_search import InvalidSearchError, extract, parse_query
from adapters.fhir_validation import validate_resource
from adapters.resource_store import ResourceStore
from adapters.settings import Settings
from core.errors import FindingsNotReviewedError
from core.oversight import (
    AiSwitch,
    changes_signature,
    check_review_complete,
    decide_ai_use,
    pending_findings,
    site_of_station,
)
from core.report import ReportText
from core.types import AcquisitionInfo, Segmentation, Volume
from service.app import create_app
from service.auth import mint_token
from service.jobs import TASK_CODE_ANALYZE, TASK_CODE_SYSTEM, AnalysisRequest, InProcessRunner
from service.users import FeedbackRecord, UserStore
from workers.analysis import PipelineAnalyzer

NOW = dt.datetime(2026, 11, 27, 9, 30)


def _switch(site: str = "north", on: bool = False) -> AiSwitch:
    return AiSwitch(site, on, "carol", NOW, "scanner replaced, model not validated on it")


# --- core rules ---------------------------------------------------------------------------------------


def test_a_site_switched_off_gets_no_ai_and_says_why() -> None:
    off = decide_ai_use("north", _switch())
    assert not off.ai_used and off.switch is not None
    assert "AI not used" in off.explanation() and "site north" in off.explanation()
    assert decide_ai_use("north", _switch(on=True)).ai_used
    assert decide_ai_use("north", None).ai_used  # never set: AI is used
    assert decide_ai_use(None, None).ai_used  # a study without a site
    with pytest.raises(ValueError, match="site north"):
        decide_ai_use("south", _switch())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"reason": "  "}, "needs a reason"),
        ({"reason": "x" * 501}, "500 characters"),
        ({"site": "*"}, "per site"),
        ({"site": ""}, "printable"),
        ({"changed_by": ""}, "names the admin"),
        ({"changed_at": NOW.replace(tzinfo=dt.UTC)}, "naive UTC"),
    ],
)
def test_a_switch_setting_checks_its_fields(change: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {
        "site": "north",
        "ai_enabled": False,
        "changed_by": "carol",
        "changed_at": NOW,
        "reason": "ok",
    }
    with pytest.raises(ValueError, match=message):
        AiSwitch(**{**fields, **change})


def test_site_of_a_station_is_mapped_or_its_own() -> None:
    assert site_of_station("GECT02", {"GECT02": "north"}) == "north"
    assert site_of_station("SIEM01", {"GECT02": "north"}) == "SIEM01"
    assert site_of_station("", {"": "north"}) is None


@pytest.mark.parametrize(
    ("old", "new", "signs"),
    [
        ("preliminary", "preliminary", False),
        ("preliminary", "final", True),
        ("preliminary", "amended", True),
        ("final", "amended", True),
        ("final", "final", True),  # a signed report changed in place
        ("final", "entered-in-error", True),
        ("preliminary", "cancelled", False),
    ],
)
def test_what_needs_a_radiologists_signature(old: str, new: str, signs: bool) -> None:
    assert changes_signature(old, new) is signs


def test_every_ai_finding_needs_an_explicit_verdict_before_signing() -> None:
    findings = {"2.25.1": "L1", "2.25.2": "L2", "2.25.3": "L3"}
    assert pending_findings(findings, {}) == ["L1", "L2", "L3"]
    assert pending_findings(findings, {"2.25.1": "accepted", "2.25.3": "rejected"}) == ["L2"]
    with pytest.raises(FindingsNotReviewedError, match="not reviewed: L2") as refused:
        check_review_complete("r1", findings, {"2.25.1": "accepted", "2.25.3": "rejected", "2.25.2": "maybe"})
    assert refused.value.pending == ("L2",) and refused.value.reason == "findings_not_reviewed"
    check_review_complete("r1", findings, dict.fromkeys(findings, "accepted"))
    check_review_complete("r1", {}, {})  # no AI finding: nothing to review


# --- the switch store ---------------------------------------------------------------------------------


def test_the_switch_store_keeps_every_change_and_the_latest_wins(tmp_path: Path) -> None:
    store = AiSwitchStore(f"sqlite:///{tmp_path / 's.db'}")
    assert store.current("north") is None and store.states() == {}
    first = store.set("north", False, "carol", "new scanner  not yet validated")
    store.set("south", False, "carol", "drift alarm")
    second = store.set("north", True, "dave", "validated on the new scanner")
    assert first.reason == "new scanner not yet validated" and first.change_id < second.change_id
    current = store.current("north")
    assert current is not None and current.ai_enabled and current.changed_by == "dave"
    assert {site: s.ai_enabled for site, s in store.states().items()} == {"north": True, "south": False}
    assert [h.changed_by for h in store.history("north")] == ["dave", "carol"]
    assert len(store.history()) == 3
    with pytest.raises(ValueError, match="needs a reason"):
        store.set("north", False, "carol", "")
    store.close()


# --- AuditEvents --------------------------------------------------------------------------------------


def test_audit_events_validate_and_are_found_by_their_search_parameters() -> None:
    report = {"id": "r1", "subject": {"reference": "Patient/p9"}}
    event = audit_event("report-sign", user_agent("alice", "radiologist"), report_entities(report, 3))
    validate_resource(event, "AuditEvent")
    tokens = set(extract({**event, "id": "a1"}).tokens)
    assert ("entity", "DiagnosticReport", "r1") in tokens  # versioned reference, indexed unversioned
    assert ("patient", "Patient", "p9") in tokens
    assert ("agent:identifier", "http://interval.local/fhir/user", "alice") in tokens
    assert ("subtype", "http://interval.local/fhir/CodeSystem/audit-event", "report-sign") in tokens
    assert ("action", "", "U") in tokens and ("outcome", "", "0") in tokens
    query = parse_query("AuditEvent", [("agent:identifier", "alice"), ("entity", "DiagnosticReport/r1")])
    assert [f.param for f in query.filters] == ["agent:identifier", "entity"]  # type: ignore[union-attr]
    with pytest.raises(InvalidSearchError, match="only :identifier"):
        parse_query("AuditEvent", [("agent:missing", "true")])
    assert set(KINDS) >= {"ai-output", "report-view", "report-edit", "report-sign", "ai-switch-change"}


# --- the analysis honours the switch ------------------------------------------------------------------


class _OneStudy:
    def __init__(self, station: str, study_uid: str = "1.2.3.4") -> None:
        acq = AcquisitionInfo(
            study_uid,
            f"{study_uid}.1",
            f"{study_uid}.2",
            "MRN-7731",
            dt.date(2024, 3, 4),
            station_name=station,
        )
        self.volume = Volume(np.full((6, 16, 16), -1000.0), (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), acquisition=acq)
        self.loads = 0

    def load_study(self, ref: str) -> Volume:
        self.loads += 1
        return self.volume

    def find_study(self, study_uid: str) -> Volume | None:
        return None


class _CountingSegmenter:
    model_version = "test-1"

    def __init__(self) -> None:
        self.calls = 0

    def segment(self, volume: Volume) -> Segmentation:
        self.calls += 1
        return Segmentation(np.zeros(volume.shape, np.uint8), np.zeros(volume.shape))


class _Switches:
    def __init__(self, *switches: AiSwitch) -> None:
        self.by_site = {s.site: s for s in switches}

    def current(self, site: str) -> AiSwitch | None:
        return self.by_site.get(site)


def _analyzer(images: _OneStudy, segmenter: _CountingSegmenter, *switches: AiSwitch) -> PipelineAnalyzer:
    return PipelineAnalyzer(
        images=images,
        segmenter=segmenter,
        ehr=None,
        switches=_Switches(*switches),
        station_sites={"CT01": "north"},
    )


REQUEST = AnalysisRequest("t1", "1.2.3.4", "MRN-7731", "Patient/p1")


def test_the_analysis_of_a_switched_off_site_runs_no_model_and_returns_ai_not_used() -> None:
    images, segmenter = _OneStudy("CT01"), _CountingSegmenter()
    bundle = _analyzer(images, segmenter, _switch("north"))(REQUEST)
    assert segmenter.calls == 0 and images.loads == 1
    tag = bundle["meta"]["tag"][0]
    assert (tag["system"], tag["code"]) == (AI_OUTCOME_SYSTEM, AI_NOT_USED) and "site north" in tag["display"]
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["ImagingStudy"]  # no report, no observation: no AI output at all
    study = bundle["entry"][0]["resource"]
    assert study["extension"] == [{"url": SITE_EXTENSION, "valueString": "CT01"}]
    assert study["subject"] == {"reference": "Patient/p1"}


def test_the_analysis_of_other_sites_runs_the_model_once_per_study_read() -> None:
    images, segmenter = _OneStudy("CT02"), _CountingSegmenter()  # CT02 is its own site, not north
    bundle = _analyzer(images, segmenter, _switch("north"))(REQUEST)
    assert segmenter.calls == 1 and images.loads == 1  # the study read once, for the switch and the model
    assert "meta" not in bundle
    assert [
        e["resource"]["status"]
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "DiagnosticReport"
    ] == ["preliminary"]
    on_again = _analyzer(_OneStudy("CT01"), segmenter, _switch("north", on=True))(REQUEST)
    assert segmenter.calls == 2 and "meta" not in on_again


# --- the service: sign-off, explicit review, the switch, the audit trail (TestClient, SQLite) -------------

PASSWORD = "correct-horse-battery"
PATIENT = "pat-7731"
L1, L2 = "2.25.11", "2.25.12"
DRAFT = ReportText(
    "CT of 2024-01-02.", "Liver lesion L1 is stable. Lung lesion L2 is new.", "Stable disease."
)


@dataclass
class Site:
    client: TestClient
    settings: Settings
    store: ResourceStore
    users: UserStore
    switches: AiSwitchStore
    report_id: str
    segmenter: _CountingSegmenter
    images: dict[str, _OneStudy]


class _Studies:
    """Studies by UID (each a ``_OneStudy``), for the API's analyzer."""

    def __init__(self, studies: dict[str, _OneStudy]) -> None:
        self.studies = studies

    def load_study(self, ref: str) -> Volume:
        return self.studies[ref].load_study(ref)

    def find_study(self, study_uid: str) -> Volume | None:
        return None


def _seed_report(store: ResourceStore, artifacts: Path) -> str:
    study = store.create(
        {
            "resourceType": "ImagingStudy",
            "extension": [{"url": SITE_EXTENSION, "valueString": "CT01"}],
            "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}],
            "status": "available",
            "subject": {"reference": f"Patient/{PATIENT}"},
        }
    )
    observations = [
        store.create(
            {
                "resourceType": "Observation",
                "meta": {"security": [AIAST]},
                "identifier": [{"system": OBSERVATION_ID_SYSTEM, "value": f"1.2.3.4/m1/{track}"}],
                "status": "preliminary",
                "code": {"text": "tumor size"},
                "subject": {"reference": f"Patient/{PATIENT}"},
            }
        )
        for track in (L1, L2)
    ]
    report = store.create(
        {
            "resourceType": "DiagnosticReport",
            "meta": {"security": [AIAST]},
            "extension": [{"url": SITE_EXTENSION, "valueString": "CT01"}],
            "status": "preliminary",
            "code": {"text": "CT follow-up"},
            "subject": {"reference": f"Patient/{PATIENT}"},
            "effectiveDateTime": "2024-03-04",
            "imagingStudy": [{"reference": f"ImagingStudy/{study['id']}"}],
            "result": [{"reference": f"Observation/{o['id']}"} for o in observations],
            "conclusion": DRAFT.impression,
            "presentedForm": [
                {"contentType": "text/plain", "data": base64.b64encode(DRAFT.as_text().encode()).decode()}
            ],
        }
    )
    lesion = {"organ": "liver", "change": "stable", "status": "absent", "current": None, "prior": None}
    analysis = {
        "study": {"study_uid": "1.2.3.4", "study_date": "2024-03-04"},
        "model_version": "m1",
        "lesions": [{**lesion, "track_id": L1, "label": "L1"}, {**lesion, "track_id": L2, "label": "L2"}],
        "history": [],
        "alignments": {},
        "recist": None,
        "warnings": [],
        "report": {"author": "deterministic"},
    }
    (artifacts / "1.2.3.4").mkdir(parents=True)
    (artifacts / "1.2.3.4" / "report.json").write_text(json.dumps(analysis))
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
    switches = AiSwitchStore(settings.database_url)
    users.add_user("rad", PASSWORD, role="radiologist", sites=["north"], display_name="Dr Rad")
    users.add_user("far", PASSWORD, role="radiologist", sites=["south"], display_name="Dr Far")
    users.add_user("clin", PASSWORD, role="clinician", sites=["north"], display_name="Dr Clin")
    users.add_user("carol", PASSWORD, role="admin", sites=["*"], display_name="Carol Admin")
    report_id = _seed_report(store, settings.artifacts_dir)
    segmenter = _CountingSegmenter()
    images = {uid: _OneStudy("CT01", uid) for uid in ("1.2.3.5", "1.2.3.6")}
    analyzer = PipelineAnalyzer(
        images=_Studies(images),
        segmenter=segmenter,
        ehr=None,
        switches=switches,
        station_sites=settings.web_station_sites,
    )
    app = create_app(settings, store=store, analyzer=analyzer, users=users, switches=switches)
    with TestClient(app) as client:
        yield Site(client, settings, store, users, switches, report_id, segmenter, images)
    switches.close()
    users.close()


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def _login(client: TestClient, username: str) -> None:
    client.cookies.clear()  # whoever was signed in before
    page = client.get("/login")
    r = client.post(
        "/login",
        data={"username": username, "password": PASSWORD, "csrf_token": _csrf(page.text)},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text


def _form(site: Site) -> dict[str, str]:
    page = site.client.get(f"/reports/{site.report_id}")
    version = re.search(r'name="version" value="(\d+)"', page.text)
    assert version is not None
    return {"csrf_token": _csrf(page.text), "version": version.group(1)}


def _token(site: Site, sub: str, scopes: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(site.settings.api_token_secret, sub, scopes)}"}


AUDITOR = "system/AuditEvent.rs"


def _audit(site: Site, **params: str) -> list[dict[str, Any]]:
    r = site.client.get("/fhir/AuditEvent", params=params, headers=_token(site, "auditor", AUDITOR))
    assert r.status_code == 200, r.text
    assert r.json()["total"] == len(r.json().get("entry", []))
    return [e["resource"] for e in r.json().get("entry", [])]


def _subtypes(events: list[dict[str, Any]]) -> list[str]:
    return [e["subtype"][0]["code"] for e in events]


def test_signing_waits_for_a_verdict_on_every_ai_finding_and_each_step_is_audited(
    site: Site, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _login(site.client, "rad")
    page = site.client.get(f"/reports/{site.report_id}")
    assert page.status_code == 200 and 'data-testid="pending"' in page.text and "L1, L2" in page.text
    edit = {"comparison": DRAFT.comparison, "findings": "Liver lesion L1 is stable.", "impression": "SD."}

    refused = site.client.post(f"/reports/{site.report_id}/sign", data={**_form(site), **edit})
    assert (
        refused.status_code == 409
        and "Not signed." in refused.text
        and "not reviewed: L1, L2" in refused.text
    )
    assert "Liver lesion L1 is stable.</textarea>" in refused.text  # the radiologist's text is kept
    assert site.store.read("DiagnosticReport", site.report_id)["status"] == "preliminary"

    accept = site.client.post(
        f"/reports/{site.report_id}/findings/{L1}", data={**_form(site), "decision": "accept"}
    )
    assert accept.status_code == 200 and "Finding accepted." in accept.text
    still = site.client.post(f"/reports/{site.report_id}/sign", data={**_form(site), **edit})
    assert still.status_code == 409 and "not reviewed: L2" in still.text and "L1, L2" not in still.text
    reject = site.client.post(
        f"/reports/{site.report_id}/findings/{L2}", data={**_form(site), "decision": "reject"}
    )
    assert reject.status_code == 200 and "Finding rejected" in reject.text
    assert (
        site.client.post(f"/reports/{site.report_id}/save", data={**_form(site), **edit}).status_code == 200
    )
    signed = site.client.post(f"/reports/{site.report_id}/sign", data={**_form(site), **edit})
    assert signed.status_code == 200 and "Report signed." in signed.text
    stored = site.store.read("DiagnosticReport", site.report_id)
    assert stored["status"] == "final" and stored["resultsInterpreter"][0]["identifier"]["value"] == "rad"

    report = f"DiagnosticReport/{site.report_id}"
    events = _audit(site, entity=report, _sort="_lastUpdated")
    changes = [s for s in _subtypes(events) if s != "report-view"]
    assert changes == [
        "report-sign",
        "finding-accept",
        "report-sign",
        "finding-reject",
        "report-edit",
        "report-sign",
    ]
    assert _subtypes(events).count("report-view") == 11  # every report page served (forms and redirects)
    signs = _audit(site, entity=report, subtype="report-sign", _sort="_lastUpdated")
    assert [e["outcome"] for e in signs] == ["4", "4", "0"]
    assert "not reviewed: L2" in signs[1]["outcomeDesc"]
    assert signs[2]["entity"][0]["what"]["reference"] == f"{report}/_history/{stored['meta']['versionId']}"
    assert _audit(site, entity=report, outcome="4") == signs[:2]
    verdicts = _audit(site, **{"entity:identifier": f"urn:dicom:uid|urn:oid:{L2}"})
    assert _subtypes(verdicts) == ["finding-reject"]
    by_rad = _audit(site, **{"agent:identifier": "http://interval.local/fhir/user|rad"})
    assert len(by_rad) == len(events) and not _audit(site, **{"agent:identifier": "far"})
    assert len(_audit(site, patient=PATIENT, date=f"ge{dt.date.today().isoformat()}")) == len(events)
    # references and codes only: no names, no report text, no patient identifier value
    dumped = json.dumps(_audit(site))
    for phi in ("Dr Rad", "Liver lesion", "MRN-7731", DRAFT.impression):
        assert phi not in dumped
    # and nothing of the patient in Interval's own log lines
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("interval")]
    assert not [m for m in ours if PATIENT in m or "MRN-7731" in m or "Dr Rad" in m]


def test_the_api_makes_a_report_final_only_for_a_radiologist_who_reviewed_every_finding(site: Site) -> None:
    url = f"/fhir/DiagnosticReport/{site.report_id}"
    ehr = _token(site, "ehr-1", "system/DiagnosticReport.rus")
    current = site.client.get(url, headers=ehr).json()

    def put(body: dict[str, Any], headers: dict[str, str]) -> Any:
        etag = f'W/"{site.store.read("DiagnosticReport", site.report_id)["meta"]["versionId"]}"'
        return site.client.put(url, json=body, headers={**headers, "If-Match": etag})

    edited = put(
        {**current, "conclusion": "Stable disease, edited by the EHR."}, ehr
    )  # a draft edit: allowed
    assert edited.status_code == 200, edited.text
    final = {**edited.json(), "status": "final"}
    refused = put(final, ehr)
    assert refused.status_code == 403 and refused.json()["resourceType"] == "OperationOutcome"
    assert "only by a radiologist" in refused.json()["issue"][0]["diagnostics"]
    clinician = put(final, _token(site, "clin", "user/DiagnosticReport.ru"))
    assert clinician.status_code == 403 and "clinician" in clinician.json()["issue"][0]["diagnostics"]
    assert put(final, _token(site, "far", "user/DiagnosticReport.ru")).status_code == 404  # another site's
    assert put(final, _token(site, "ghost", "user/DiagnosticReport.ru")).status_code == 401
    rad = _token(site, "rad", "user/DiagnosticReport.ru")
    pending = put(final, rad)
    assert pending.status_code == 422
    assert pending.json()["issue"][0]["code"] == "business-rule"
    assert "not reviewed: L1, L2" in pending.json()["issue"][0]["diagnostics"]
    assert site.store.read("DiagnosticReport", site.report_id)["status"] == "preliminary"
    for track, label, decision in ((L1, "L1", "accepted"), (L2, "L2", "rejected")):
        site.users.record_feedback(
            FeedbackRecord(site.report_id, track, label, decision, "rad", "", dt.datetime(2026, 1, 1))
        )
    signed = put(final, rad)
    assert signed.status_code == 200, signed.text
    assert signed.json()["status"] == "final"
    assert signed.json()["resultsInterpreter"] == [
        {"identifier": {"system": "http://interval.local/fhir/user", "value": "rad"}, "display": "Dr Rad"}
    ]
    provenance, _ = site.store.search("Provenance", {"target": url.removeprefix("/fhir/")})
    assert [p["agent"][1]["who"]["identifier"]["value"] for p in provenance] == ["rad"]
    assert [e.action for e in site.users.events(site.report_id)] == ["signed"]
    # a signed report is not changed by a system client, even keeping the status
    tampered = put({**signed.json(), "conclusion": "Changed after signing."}, ehr)
    assert tampered.status_code == 403
    assert (
        site.store.read("DiagnosticReport", site.report_id)["conclusion"]
        == "Stable disease, edited by the EHR."
    )
    amended = put({**signed.json(), "status": "amended", "conclusion": "Amended by the radiologist."}, rad)
    assert amended.status_code == 200 and amended.json()["status"] == "amended"
    assert [e.action for e in site.users.events(site.report_id)] == ["signed", "amended"]
    # a person's token reads single resources only
    assert site.client.get("/fhir/DiagnosticReport", headers=rad).status_code == 403
    events = _audit(site, entity=url.removeprefix("/fhir/"), _sort="_lastUpdated")
    summary = [
        (e["subtype"][0]["code"], e["outcome"], e["agent"][0]["who"]["identifier"]["value"]) for e in events
    ]
    assert summary == [
        ("report-edit", "0", "ehr-1"),
        ("report-sign", "4", "ehr-1"),
        ("report-sign", "4", "clin"),
        ("report-sign", "4", "rad"),
        ("report-sign", "0", "rad"),
        ("report-amend", "4", "ehr-1"),
        ("report-amend", "0", "rad"),
    ]


def test_admins_switch_ai_per_site_on_the_page_and_through_the_api(site: Site) -> None:
    _login(site.client, "clin")
    assert site.client.get("/admin/ai").status_code == 403
    _login(site.client, "carol")
    page = site.client.get("/admin/ai")
    assert page.status_code == 200 and 'data-site="north"' in page.text
    no_reason = {"csrf_token": _csrf(page.text), "site": "north", "state": "off", "reason": " "}
    refused = site.client.post("/admin/ai", data=no_reason)
    assert refused.status_code == 400 and "needs a reason" in refused.text
    assert site.switches.current("north") is None
    off = site.client.post("/admin/ai", data={**no_reason, "reason": "new scanner, not validated"})
    assert off.status_code == 200 and "AI switch changed." in off.text
    switch = site.switches.current("north")
    assert switch is not None and not switch.ai_enabled and switch.changed_by == "carol"

    listing = site.client.get("/api/ai-switches", headers=_token(site, "ehr-1", "system/AiSwitch.rs"))
    assert listing.status_code == 200
    assert [(s["site"], s["aiEnabled"], s["changedBy"]) for s in listing.json()["sites"]] == [
        ("north", False, "carol")
    ]
    on = {"aiEnabled": True, "reason": "validated on the new scanner"}
    system = site.client.put(
        "/api/ai-switches/north", json=on, headers=_token(site, "ehr-1", "system/AiSwitch.cruds")
    )
    assert system.status_code == 403 and "person's name" in system.json()["issue"][0]["diagnostics"]
    radiologist = site.client.put(
        "/api/ai-switches/north", json=on, headers=_token(site, "rad", "user/AiSwitch.u")
    )
    assert radiologist.status_code == 403 and "only admins" in radiologist.json()["issue"][0]["diagnostics"]
    admin = _token(site, "carol", "user/AiSwitch.u")
    assert (
        site.client.put("/api/ai-switches/north", json={"aiEnabled": True}, headers=admin).status_code == 400
    )
    done = site.client.put("/api/ai-switches/north", json=on, headers=admin)
    assert done.status_code == 200 and done.json()["aiEnabled"] and done.json()["changedBy"] == "carol"
    assert site.switches.current("north").ai_enabled  # type: ignore[union-attr]

    events = _audit(site, subtype="ai-switch-change", _sort="_lastUpdated")
    assert [e["agent"][0]["who"]["identifier"]["value"] for e in events] == ["carol", "carol"]
    details = [{d["type"]: d["valueString"] for d in e["entity"][0]["detail"]} for e in events]
    assert details == [{"site": "north", "aiEnabled": "false"}, {"site": "north", "aiEnabled": "true"}]
    assert "not validated" not in json.dumps(events)  # the reason stays in the switch history


def _order(site: Site, study_uid: str) -> dict[str, Any]:
    task = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": TASK_CODE_ANALYZE}]},
        "focus": {"identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}},
        "for": {"reference": f"Patient/{PATIENT}"},
    }
    headers = _token(site, "ehr-1", "system/Task.crs")
    created = site.client.post("/fhir/Task", json=task, headers=headers)
    assert created.status_code == 201, created.text
    runner = site.client.app.state.runner  # type: ignore[attr-defined]
    assert isinstance(runner, InProcessRunner) and runner.join(timeout=30)
    done: dict[str, Any] = site.client.get(f"/fhir/Task/{created.json()['id']}", headers=headers).json()
    return done


def test_a_study_of_a_switched_off_site_completes_ai_not_used_and_is_listed_without_ai(site: Site) -> None:
    site.switches.set("north", False, "carol", "drift alarm under investigation")
    task = _order(site, "1.2.3.5")
    assert task["status"] == "completed" and site.segmenter.calls == 0
    coding = task["businessStatus"]["coding"][0]
    assert (coding["system"], coding["code"]) == (AI_OUTCOME_SYSTEM, AI_NOT_USED)
    assert "AI is switched off for site north" in task["businessStatus"]["text"]
    kinds = [o["type"].get("text") or o["type"]["coding"][0]["code"] for o in task["output"]]
    assert kinds == [AI_NOT_USED, "ImagingStudy"]
    assert task["extension"] == [{"url": SITE_EXTENSION, "valueString": "CT01"}]
    assert site.store.search("DiagnosticReport", {})[1] == 1  # only the seeded one: no AI output
    auditor = _token(site, "auditor", "system/Task.rs")
    found = site.client.get("/fhir/Task", params={"business-status": AI_NOT_USED}, headers=auditor).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [task["id"]]
    assert _subtypes(_audit(site, entity=f"Task/{task['id']}")) == ["ai-not-used"]

    _login(site.client, "rad")
    worklist = site.client.get("/worklist").text
    assert 'data-testid="ai-not-used"' in worklist and f'data-task="{task["id"]}"' in worklist
    assert "AI is switched off for site north" in worklist
    _login(site.client, "far")  # another site's radiologist does not see it
    assert f'data-task="{task["id"]}"' not in site.client.get("/worklist").text

    site.switches.set("north", True, "carol", "cleared")
    again = _order(site, "1.2.3.6")
    assert again["status"] == "completed" and site.segmenter.calls == 1
    report = again["output"][0]["valueReference"]["reference"]
    output = _audit(site, entity=report)
    assert _subtypes(output) == ["ai-output"]
    assert output[0]["agent"][0]["who"]["reference"].startswith("Device/")
    assert {e["what"]["reference"] for e in output[0]["entity"]} == {
        report,
        f"Task/{again['id']}",
        f"Patient/{PATIENT}",
    }


def test_audit_events_are_read_only_and_need_their_scope(site: Site) -> None:
    posted = site.client.post(
        "/fhir/AuditEvent", json={"resourceType": "AuditEvent"}, headers=_token(site, "x", "system/*.cruds")
    )
    assert posted.status_code == 405
    assert site.client.get("/fhir/AuditEvent", headers=_token(site, "x", "system/Task.rs")).status_code == 403
