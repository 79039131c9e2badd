"""The drift monitor's edges on SQLite: the store's step per study, the analysis hook, the JSON resource, the
Prometheus gauges and the dashboard page (FastAPI TestClient). PostgreSQL and a real analysis are in
tests/integration/test_drift.py."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from adapters.drift_recorder import DriftRecorder, unit_of
from adapters.drift_store import DriftStore
from adapters.image_folder import FolderImageSource
from adapters.prior_bundle import NoPriors
from adapters.resource_store import ResourceStore
from adapters.settings import Settings
from adapters.telemetry import DRIFT_RECORD_FAILURES
from core.drift import DecisionRule, Reference
from core.drift_calibration import build_reference
from core.drift_signals import Unit
from core.pipeline import analyze_study
from fixtures.synth.evaluation import TruthSegmenter
from service.app import create_app
from service.auth import mint_token
from service.users import UserStore
from tests.unit.drift_data import UNIT, stream

SECRET = "drift-unit-test-secret-of-at-least-32-bytes"
PASSWORD = "correct-horse-battery"


@pytest.fixture(scope="module")
def reference() -> Reference:
    return build_reference(
        UNIT, stream(1, 100), rule=DecisionRule(window=10, persistence=2), null_studies=10_000
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[DriftStore]:
    drift = DriftStore(f"sqlite:///{tmp_path / 'interval.db'}")
    yield drift
    drift.close()


def _swap(store: DriftStore, reference: Reference) -> list:
    """Reference set, 30 stable studies, then studies of a noisier scanner of another make until an alert."""
    store.set_reference(reference)
    outcomes = [store.record(s) for s in stream(2, 30, start=100)]
    outcomes += [store.record(s) for s in stream(3, 15, start=200, manufacturer="UIH", noise_hu=10.0)]
    return outcomes


def test_without_a_reference_studies_are_kept_but_not_compared(store):
    outcomes = [store.record(s) for s in stream(2, 15)]
    assert all(o.evaluation is None and o.raised is None for o in outcomes)
    (unit,) = store.units()
    assert unit.unit == UNIT and not unit.has_reference and unit.studies_since_reference == 15
    assert [s.study_uid for s in store.studies(UNIT)] == [s.study_uid for s in stream(2, 15)]


def test_a_swap_raises_one_alert_naming_site_signals_and_studies(store, reference):
    outcomes = _swap(store, reference)
    assert [o.raised for o in outcomes[:30]] == [None] * 30  # the stable part raises nothing
    evaluated = [o for o in outcomes if o.evaluation is not None]
    assert len(evaluated) == len(outcomes) - reference.rule.window + 1
    raised = [(n, o.raised) for n, o in enumerate(outcomes) if o.raised is not None]
    assert len(raised) == 1
    position, alert = raised[0]
    assert 30 < position <= 30 + reference.rule.window  # within a window of the swap
    assert (alert.unit, alert.status) == (UNIT, "active")
    assert "manufacturer" in {s["signal"] for s in alert.signals}  # the first to tell, after a few studies
    manufacturer = next(s for s in alert.signals if s["signal"] == "manufacturer")
    assert manufacturer["window"] == "never in reference: UIH" and manufacturer["group"] == "header"
    window_uids = [s.study_uid for s in (stream(2, 30, start=100) + stream(3, 15, start=200))][: position + 1]
    assert alert.study_uids == window_uids[-reference.rule.window :]
    assert alert.opened_by_study == window_uids[-1]
    assert "UIH Revolution CT" in alert.scanners
    (unit,) = store.units()
    assert unit.active_alerts == 1 and unit.state.alert_open and unit.score is not None
    assert unit.last_evaluation is not None and "noise_hu" in unit.last_evaluation["significant"]  # by now
    assert [a.id for a in store.alerts(status="active")] == [alert.id]
    assert store.alert(alert.id) == alert


def test_a_study_recorded_again_advances_nothing(store, reference):
    store.set_reference(reference)
    studies = stream(2, 12, start=100)
    for s in studies:
        store.record(s)
    before = store.units()[0]
    again = store.record(studies[-1].with_values(noise_hu=40.0))
    assert again.duplicate and again.evaluation is None
    after = store.units()[0]
    assert (after.state, after.score, after.studies_since_reference) == (
        before.state,
        before.score,
        before.studies_since_reference,
    )
    assert store.studies(UNIT)[-1].numeric["noise_hu"] == 40.0  # the values are replaced


def test_a_new_reference_resolves_the_active_alert_and_restarts_the_window(store, reference):
    _swap(store, reference)
    (active,) = store.alerts(status="active")
    resolved = store.set_reference(reference)
    assert resolved == (active.id,)
    alert = store.alert(active.id)
    assert alert is not None and alert.status == "resolved" and "new reference" in alert.resolution
    (unit,) = store.units()
    assert unit.studies_since_reference == 0 and not unit.state.alert_open and unit.score is None


def test_a_review_adds_the_rejected_share_to_a_recorded_study(store):
    (s,) = stream(2, 1)
    store.record(s)
    assert store.record_review(s.study_uid, 0.5)
    assert store.studies(UNIT)[0].numeric["rejected_fraction"] == 0.5
    assert not store.record_review("1.2.3.999", 0.5)
    with pytest.raises(ValueError, match="must lie in 0"):
        store.record_review(s.study_uid, 2.0)


def test_an_analysed_study_records_its_signals_through_the_hook(demo_patient, store):
    result = analyze_study(
        str(demo_patient.folder / "t0" / "dicom"),
        images=FolderImageSource(),
        priors=NoPriors(),
        segmenter=TruthSegmenter(demo_patient.folder),
    )
    assert {"liver_hu_median", "noise_hu", "lung_hu_median"} <= set(result.image_signals)
    station = result.acquisition.station_name
    outcome = DriftRecorder(store, {station: "north"}).record_result(result)
    assert outcome is not None and outcome.unit == Unit("north", station)
    (recorded,) = store.studies(Unit("north", station))
    assert recorded.study_uid == result.acquisition.study_uid
    assert recorded.categorical["manufacturer"] == result.acquisition.manufacturer
    assert recorded.numeric["lesion_count"] == sum(t.detected is not None for t in result.lesions)
    assert 90 < recorded.numeric["liver_hu_median"] < 120  # portal venous liver, as generated


class _BrokenStore:
    def record(self, signals):
        raise OperationalError("INSERT INTO drift_study", {}, Exception("disk I/O error"))


def test_a_store_failure_is_counted_and_does_not_fail_the_analysis(demo_patient, caplog):
    result = analyze_study(
        str(demo_patient.folder / "t0" / "dicom"),
        images=FolderImageSource(),
        priors=NoPriors(),
        segmenter=TruthSegmenter(demo_patient.folder),
    )
    before = DRIFT_RECORD_FAILURES._value.get()
    assert DriftRecorder(_BrokenStore()).record_result(result) is None  # type: ignore[arg-type]
    assert DRIFT_RECORD_FAILURES._value.get() == before + 1
    assert result.acquisition.study_uid in caplog.text


def test_a_study_without_station_name_is_known_by_its_scanner(demo_patient):
    acq = FolderImageSource().load_study(str(demo_patient.folder / "t0" / "dicom")).acquisition
    assert acq is not None
    from dataclasses import replace

    assert unit_of(replace(acq, station_name=""), {}) == Unit(
        f"{acq.manufacturer} {acq.model_name}", f"{acq.manufacturer} {acq.model_name}"
    )
    assert unit_of(acq, {acq.station_name: "east"}).site == "east"


# --- the API, the metrics and the page ----------------------------------------------------------------------


@pytest.fixture
def app(tmp_path: Path, reference: Reference) -> Iterator[TestClient]:
    settings = Settings(
        environment="test",
        database_url=f"sqlite:///{tmp_path / 'interval.db'}",
        api_token_secret=SECRET,
        artifacts_dir=tmp_path / "artifacts",
    )
    users = UserStore(settings.database_url)
    users.add_user("admin", PASSWORD, role="admin", sites=["*"])
    users.add_user("clin", PASSWORD, role="clinician", sites=["north"])
    users.add_user("far", PASSWORD, role="radiologist", sites=["south"])
    drift = DriftStore(settings.database_url)
    _swap(drift, reference)
    drift.close()
    with TestClient(create_app(settings, store=ResourceStore(settings.database_url), users=users)) as client:
        yield client
    users.close()


def _bearer(scope: str = "system/DriftMonitor.rs") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, 'ops-1', scope)}"}


def test_the_api_lists_the_alert_with_its_signals_and_studies(app):
    r = app.get("/api/drift/alerts", params={"status": "active"}, headers=_bearer())
    assert r.status_code == 200, r.text
    (alert,) = r.json()["alerts"]
    assert (alert["site"], alert["station"], alert["status"]) == ("north", "CT-N1", "active")
    assert "manufacturer" in {s["signal"] for s in alert["signals"]}
    assert len(alert["study_uids"]) == 10 and all(u.startswith("1.2.826.") for u in alert["study_uids"])
    one = app.get(f"/api/drift/alerts/{alert['id']}", headers=_bearer())
    assert one.json() == alert
    assert app.get("/api/drift/alerts", params={"status": "resolved"}, headers=_bearer()).json() == {
        "alerts": []
    }
    (unit,) = app.get("/api/drift/units", headers=_bearer()).json()["units"]
    assert unit["alert_open"] and unit["active_alerts"] == 1 and unit["score"] is not None
    detail = app.get("/api/drift/units/north/CT-N1", headers=_bearer("system/*.read")).json()
    assert detail["reference"]["studies"] == 50
    assert {s["signal"] for s in detail["reference"]["signals"]} >= {"noise_hu", "manufacturer"}
    assert len(detail["recent_studies"]) == 45


def test_the_api_needs_its_scope_and_answers_unknown_things_with_404(app):
    r = app.get("/api/drift/alerts", headers=_bearer("system/Task.rs"))
    assert r.status_code == 403 and "system/DriftMonitor.s" in r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert app.get("/api/drift/alerts").status_code == 401
    assert app.get("/api/drift/alerts/nope", headers=_bearer()).status_code == 404
    assert app.get("/api/drift/units/south/CT-S1", headers=_bearer()).status_code == 404
    assert app.get("/api/drift/alerts", params={"status": "open"}, headers=_bearer()).status_code == 400


def test_metrics_expose_the_score_and_the_active_alert(app):
    text = app.get("/metrics").text
    assert 'interval_drift_alerts_active{site="north",station="CT-N1"} 1.0' in text
    assert re.search(r'interval_drift_score\{site="north",station="CT-N1"\} [0-9.e+-]+', text)
    assert 'interval_drift_signal_z{signal="noise_hu",site="north",station="CT-N1"}' in text


def _login(client: TestClient, username: str) -> None:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token
    r = client.post(
        "/login",
        data={"username": username, "password": PASSWORD, "csrf_token": token.group(1), "next": "/"},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text


def test_the_dashboard_shows_scanners_and_alerts_to_those_who_may_see_them(app):
    assert app.get("/drift", follow_redirects=False).status_code == 303  # to the login page
    _login(app, "admin")
    page = app.get("/drift")
    assert page.status_code == 200
    assert 'data-testid="drift-alert"' in page.text and "never in reference: UIH" in page.text
    assert "north" in page.text and "CT-N1" in page.text and "manufacturer" in page.text
    unit = app.get("/drift/north/CT-N1")
    assert unit.status_code == 200 and 'data-testid="drift-tests"' in unit.text
    app.cookies.clear()
    _login(app, "far")  # a radiologist of another site
    page = app.get("/drift")
    assert page.status_code == 200 and "CT-N1" not in page.text
    assert app.get("/drift/north/CT-N1").status_code == 404
    app.cookies.clear()
    _login(app, "clin")
    assert app.get("/drift").status_code == 403


def test_the_command_line_sets_a_reference_from_signals_and_reports_status(tmp_path):
    from typer.testing import CliRunner

    from workers.cli import app as cli

    url = f"sqlite:///{tmp_path / 'interval.db'}"
    signals = tmp_path / "validation.jsonl"
    signals.write_text("\n".join(json.dumps(s.to_json()) for s in stream(1, 80)) + "\n")
    env = {"INTERVAL_DATABASE_URL": url}
    runner = CliRunner()
    done = runner.invoke(
        cli,
        ["drift", "reference", "north", "CT-N1", "--from", str(signals), "--signals", "image,header"],
        env=env,
    )
    assert done.exit_code == 0, done.output
    assert "reference of north/CT-N1 set: 40 reference + 40 calibration studies" in done.output
    drift = DriftStore(url)
    try:
        reference = drift.reference(UNIT)
        assert reference is not None and "lesion_count" not in reference.signals  # output left out as asked
        assert {"noise_hu", "manufacturer"} <= set(reference.signals)
    finally:
        drift.close()
    status = runner.invoke(cli, ["drift", "status"], env=env)
    assert status.exit_code == 0 and "CT-N1" in status.output
    few = runner.invoke(cli, ["drift", "reference", "south", "CT-S1", "--from", str(signals)], env=env)
    assert few.exit_code == 2 and "at least 40 validation studies" in few.output
    bad = runner.invoke(
        cli, ["drift", "reference", "north", "CT-N1", "--from", str(signals), "--signals", "age"], env=env
    )
    assert bad.exit_code == 2 and "unknown signal or group 'age'" in bad.output


def test_a_radiologists_rejection_reaches_the_studys_drift_record(tmp_path):
    import datetime as dt

    from service.users import FeedbackRecord
    from service.web_context import StoredReport, WebPages

    settings = Settings(environment="test", database_url=f"sqlite:///{tmp_path / 'interval.db'}")
    store = ResourceStore(settings.database_url)
    web = WebPages(settings, store)
    try:
        (s,) = stream(2, 1)
        web.drift.record(s)
        analysis = {
            "lesions": [
                {"track_id": "t1", "current": {"probability": 0.9}},
                {"track_id": "t2", "current": {"probability": 0.7}},
                {"track_id": "t3", "current": None},  # a prior lesion not seen now: no AI finding
            ]
        }
        report = StoredReport(
            {"id": "r1", "resourceType": "DiagnosticReport"}, "north", s.study_uid, analysis, None
        )
        now = dt.datetime(2024, 3, 4, 10, 0)
        web.users.record_feedback(FeedbackRecord("r1", "t2", "L2", "rejected", "rad", "vessel", now))
        web.users.record_feedback(FeedbackRecord("r1", "t1", "L1", "accepted", "rad", "", now))
        web.record_review(report)
        assert web.drift.studies(UNIT)[0].numeric["rejected_fraction"] == 0.5
    finally:
        web.close()
        store.close()
