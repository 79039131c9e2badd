"""The drift monitor on PostgreSQL: a scanner's reference from generated validation studies, a stream of its
studies (one of them a real analysis through ``PipelineAnalyzer``'s hook), then the scanner replaced by the unseen
``uih`` profile; the alert comes back from the API, the metrics and the dashboard.

Signals of the streamed studies are computed by the same functions as in production (``header_signals``,
``image_signals``) on volumes rendered in memory (``render_study``, matrix 96, the generator's organ labels);
the analysed study is written as DICOM, read back and segmented by ``TruthSegmenter``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from adapters.drift_recorder import DriftRecorder
from adapters.drift_store import DriftStore
from adapters.image_folder import FolderImageSource
from adapters.resource_store import ResourceStore
from adapters.settings import Settings
from core.drift import DecisionRule
from core.drift_calibration import build_reference
from core.drift_signals import StudySignals, Unit, header_signals, image_signals
from fixtures.services import Postgres
from fixtures.synth.cohort import CohortOptions, make_patient, render_study
from fixtures.synth.evaluation import TruthSegmenter
from service.app import create_app
from service.auth import mint_token
from service.jobs import AnalysisRequest
from workers.analysis import PipelineAnalyzer

pytestmark = pytest.mark.integration

SECRET = "integration-test-secret-of-at-least-32-bytes"
STATION = "GECT02"  # what make_patient writes for patient index 1 of the ge profile
MATRIX = 96


def _signals(seed: int, index: int, profile: str, unit: Unit) -> StudySignals:
    scan = render_study(seed, index, profile, matrix=MATRIX, station_name=unit.station)
    acq = scan.volume.acquisition
    assert acq is not None
    numeric, categorical = header_signals(acq, scan.volume.spacing_kji_mm)
    numeric.update(image_signals(scan.volume, scan.labels))
    numeric["lesion_count"] = float(scan.lesion_count)
    return StudySignals(acq.study_uid, unit, f"{acq.manufacturer} {acq.model_name}", numeric, categorical)


@pytest.fixture
def drift(postgres_db: Postgres) -> Iterator[DriftStore]:
    store = DriftStore(postgres_db.url)
    yield store
    store.close()


def test_a_scanner_swap_is_alerted_over_postgres_and_read_back_from_the_api(postgres_db, drift, tmp_path):
    site = f"site-{uuid.uuid4().hex[:8]}"  # the session's database is shared with other tests
    unit = Unit(site, STATION)
    validation = [_signals(81, i, "ge", unit) for i in range(48)]
    reference = build_reference(
        unit, validation, rule=DecisionRule(window=10, persistence=2), null_studies=10_000
    )
    drift.set_reference(reference)
    assert drift.reference(unit) == reference

    for s in (_signals(82, i, "ge", unit) for i in range(12)):
        assert drift.record(s).raised is None

    patient = make_patient(
        tmp_path, 1, CohortOptions(seed=83, matrix=MATRIX, vendors=("ge",), max_time_points=2)
    )
    study_uid = (
        FolderImageSource([patient.folder]).load_study(str(patient.folder / "t0" / "dicom")).acquisition
    )
    assert study_uid is not None and study_uid.station_name == STATION
    analyzer = PipelineAnalyzer(
        images=FolderImageSource([patient.folder]),
        segmenter=TruthSegmenter(patient.folder),
        ehr=None,
        drift=DriftRecorder(DriftStore(postgres_db.url), {STATION: site}),
    )
    try:
        analyzer(AnalysisRequest("drift-task-1", study_uid.study_uid, patient.patient_id, "Patient/p1"))
    finally:
        assert analyzer.drift is not None
        analyzer.drift.store.close()
    analysed = drift.studies(unit)[-1]
    assert analysed.study_uid == study_uid.study_uid
    assert analysed.categorical["manufacturer"] == "GE MEDICAL SYSTEMS" and "noise_hu" in analysed.numeric
    (status,) = [u for u in drift.units() if u.unit == unit]
    assert status.studies_since_reference == 13 and status.score is not None and not status.state.alert_open

    swapped = [_signals(84, i, "uih", unit) for i in range(12)]
    raised = [(n, o.raised) for n, o in enumerate(drift.record(s) for s in swapped) if o.raised is not None]
    assert len(raised) == 1 and raised[0][0] < 10
    alert = raised[0][1]
    assert alert is not None

    settings = Settings(database_url=postgres_db.url, api_token_secret=SECRET, artifacts_dir=tmp_path / "art")
    token = mint_token(SECRET, "ops", "system/DriftMonitor.rs")
    with TestClient(create_app(settings, store=ResourceStore(postgres_db.url))) as client:
        r = client.get(
            "/api/drift/alerts", params={"site": site}, headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 200, r.text
        (body,) = r.json()["alerts"]
        assert (body["id"], body["site"], body["station"], body["status"]) == (
            alert.id,
            site,
            STATION,
            "active",
        )
        moved = {s["signal"] for s in body["signals"]}
        assert {"manufacturer", "kernel"} <= moved  # the headers tell first
        unit_now = client.get(
            f"/api/drift/units/{site}/{STATION}", headers={"Authorization": f"Bearer {token}"}
        )
        assert "noise_hu" in unit_now.json()["last_evaluation"]["significant"]  # the images by the end
        assert body["study_uids"][-1] == swapped[raised[0][0]].study_uid
        assert set(body["study_uids"]) & {s.study_uid for s in swapped}
        assert "UIH uCT 760" in body["scanners"]
        metrics = client.get("/metrics").text
        assert re.search(
            rf'interval_drift_alerts_active\{{site="{site}",station="{STATION}"\}} 1\.0', metrics
        )
