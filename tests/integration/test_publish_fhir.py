"""A finished analysis is published to a real FHIR server (Medplum's router) and read back.

The pipeline runs for real (DICOM folder -> measurement -> priors over FHIR -> RECIST -> report) with the
generator's label maps as the segmenter (``TruthSegmenter``), so that what the EHR receives can be checked
exactly against the ground truth; the model itself is measured in tests/integration/test_segmenter.py.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.R4B import get_fhir_model_class

from adapters import fhir_codes as C
from adapters.artifacts import load_artifacts
from adapters.fhir_client import FhirClient, RetryPolicy
from adapters.fhir_publish import AIAST, publish_report, report_bundle, sign_report
from adapters.image_folder import FolderImageSource
from core.errors import ConcurrentEditError
from core.report import ReportText
from fixtures.ehr import seed
from fixtures.services import FhirStandin
from fixtures.synth.cohort import CohortOptions, PatientTruth, make_patient
from fixtures.synth.evaluation import TruthSegmenter
from service.jobs import AnalysisRequest
from workers.analysis import EhrConnection, PipelineAnalyzer

pytestmark = pytest.mark.integration

FAST = RetryPolicy(attempts=4, backoff_s=0.05, max_backoff_s=0.2, connect_timeout_s=1.0)
THREE = CohortOptions(seed=57, matrix=96, min_time_points=3, max_time_points=3, vendors=("siemens",))


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> PatientTruth:
    """Three time points; the EHR knows only the first when the test starts."""
    for index in range(8):  # the first patient of this seed whose follow-ups hold measurable lesions
        p = make_patient(tmp_path_factory.mktemp(f"three{index}"), index, THREE)
        truths = [json.loads((p.folder / t / "truth.json").read_text()) for t in p.time_points]
        if all(t["recist"] is not None for t in truths[1:]) and all(t["lesions"] for t in truths):
            return p
    raise AssertionError("no suitable patient in the first 8 of seed 57")


def _study_uid(p: PatientTruth, t: int) -> str:
    return str(json.loads((p.folder / p.time_points[t] / "truth.json").read_text())["study_uid"])


def _search(server: FhirStandin, rtype: str, **params: str) -> list[dict[str, Any]]:
    bundle = httpx.get(f"{server.base_url}/{rtype}", params={**params, "_count": "500"}, timeout=10).json()
    return [
        e["resource"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"
    ]


def _validate(resource: dict[str, Any]) -> None:
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)


def test_analysis_publishes_and_the_next_follow_up_links_the_same_tracks(
    fhir_server: FhirStandin, patient: PatientTruth, tmp_path: Path
) -> None:
    fhir_server.control.wipe()
    patient_ref = seed(fhir_server.base_url, patient.folder, time_points=1)
    analyzer = PipelineAnalyzer(
        images=FolderImageSource([patient.folder]),
        segmenter=TruthSegmenter(patient.folder),
        ehr=EhrConnection(fhir_server.base_url, retry=FAST),
        artifacts_dir=tmp_path / "artifacts",
    )
    baseline_tracks = {
        b["identifier"][0]["value"]: b["id"]
        for b in _search(fhir_server, "BodyStructure", patient=patient_ref)
    }

    # -- first follow-up ---------------------------------------------------------------------------------
    local = analyzer(AnalysisRequest("task-1", _study_uid(patient, 1), "", None))
    get_fhir_model_class("Bundle").model_validate(local)  # everything Interval emits validates
    result1 = analyzer.last_result
    assert result1 is not None and result1.recist is not None
    truth1 = json.loads((patient.folder / patient.time_points[1] / "truth.json").read_text())
    assert result1.recist.category.value == truth1["recist"]["category"]
    saved, seg = load_artifacts(tmp_path / "artifacts", _study_uid(patient, 1))
    assert saved["recist"]["category"] == truth1["recist"]["category"]
    assert seg is not None and seg["labels"].shape == result1.volume_shape

    reports = _search(fhir_server, "DiagnosticReport", subject=patient_ref, status="preliminary")
    assert len(reports) == 1
    report = reports[0]
    _validate(report)
    assert AIAST in report["meta"]["security"]
    assert report["imagingStudy"] and report["presentedForm"][0]["contentType"].startswith("text/plain")
    text = base64.b64decode(report["presentedForm"][0]["data"]).decode()
    assert text == result1.report.as_text() and report["conclusion"] == result1.report.impression
    observations = [httpx.get(f"{fhir_server.base_url}/{r['reference']}").json() for r in report["result"]]
    sizes = [o for o in observations if o["code"]["coding"][0]["code"] == C.TUMOR_SIZE]
    measured = [t for t in result1.lesions if t.detected is not None]
    assert len(sizes) == len(measured)
    status = [o for o in observations if o["code"]["coding"][0]["code"] == "97509-4"]
    assert (
        len(status) == 1
        and status[0]["valueCodeableConcept"]["text"] == f"RECIST 1.1: {truth1['recist']['category']}"
    )
    for o in observations:
        _validate(o)
    provenance = _search(fhir_server, "Provenance", target=f"DiagnosticReport/{report['id']}")
    assert len(provenance) == 1
    device = httpx.get(f"{fhir_server.base_url}/{provenance[0]['agent'][0]['who']['reference']}").json()
    assert device["resourceType"] == "Device" and device["version"][0]["value"] == analyzer.model_version

    tracks_after_1 = {
        b["identifier"][0]["value"]: b["id"]
        for b in _search(fhir_server, "BodyStructure", patient=patient_ref)
    }
    # existing tracks were referenced, not re-created; new lesions got new BodyStructures
    assert {k: v for k, v in tracks_after_1.items() if k in baseline_tracks} == baseline_tracks
    new1 = {t.track_id for t in result1.lesions if t.prior is None and t.detected is not None}
    assert set(tracks_after_1) == set(baseline_tracks) | {f"urn:oid:{u}" for u in new1}

    # -- publishing the same analysis again changes nothing (a retried job, a duplicate trigger) --------
    async def republish() -> bool:
        async with FhirClient(fhir_server.base_url, retry=FAST) as ehr:
            again = report_bundle(result1, patient_ref=patient_ref, tracks={}, issued=dt.datetime.now(dt.UTC))
            return (await publish_report(ehr, again)).already_published

    assert asyncio.run(republish())
    assert len(_search(fhir_server, "DiagnosticReport", subject=patient_ref)) == 1 + 1  # baseline + this

    # -- second follow-up: its priors include the first follow-up's published findings ------------------
    analyzer(AnalysisRequest("task-2", _study_uid(patient, 2), "", None))
    result2 = analyzer.last_result
    assert result2 is not None and len(result2.prior_dates) == 2
    truth2 = json.loads((patient.folder / patient.time_points[2] / "truth.json").read_text())
    assert result2.recist is not None and result2.recist.category.value == truth2["recist"]["category"]
    report2 = next(
        r
        for r in _search(fhir_server, "DiagnosticReport", subject=patient_ref, status="preliminary")
        if r["id"] != report["id"]
    )
    focus2 = {}
    for ref in report2["result"]:
        obs = httpx.get(f"{fhir_server.base_url}/{ref['reference']}").json()
        if obs["code"]["coding"][0]["code"] == C.TUMOR_SIZE:
            bs = httpx.get(f"{fhir_server.base_url}/{obs['focus'][0]['reference']}").json()
            focus2[bs["identifier"][0]["value"]] = bs["id"]
    linked = {k: v for k, v in focus2.items() if k in tracks_after_1}
    assert linked, "the second follow-up matched none of the first follow-up's tracks"
    assert all(tracks_after_1[k] == v for k, v in linked.items())  # the same BodyStructure, by id


def test_sign_then_amend_with_etags(fhir_server: FhirStandin, patient: PatientTruth, tmp_path: Path) -> None:
    fhir_server.control.wipe()
    seed(fhir_server.base_url, patient.folder, time_points=1)
    analyzer = PipelineAnalyzer(
        images=FolderImageSource([patient.folder]),
        segmenter=TruthSegmenter(patient.folder),
        ehr=EhrConnection(fhir_server.base_url, retry=FAST),
    )
    analyzer(AnalysisRequest("task-s", _study_uid(patient, 1), "", None))
    (report,) = _search(fhir_server, "DiagnosticReport", status="preliminary")
    ref = f"DiagnosticReport/{report['id']}"
    stale = f'W/"{report["meta"]["versionId"]}"'
    edited = ReportText("Prior CT.", "Edited findings.", "Edited impression.")

    async def flow() -> None:
        async with FhirClient(fhir_server.base_url, retry=FAST) as ehr:
            signed, etag = await sign_report(
                ehr,
                ref,
                practitioner_ref="Practitioner/rad-1",
                practitioner_display="Dr A",
                text=edited,
                if_match=stale,
            )
            assert signed["status"] == "final" and etag
            # a second reader who opened the draft before the signature cannot overwrite it
            with pytest.raises(ConcurrentEditError):
                await sign_report(
                    ehr,
                    ref,
                    practitioner_ref="Practitioner/rad-2",
                    practitioner_display="Dr B",
                    if_match=stale,
                )
            amended, _ = await sign_report(
                ehr, ref, practitioner_ref="Practitioner/rad-1", practitioner_display="Dr A", if_match=etag
            )
            assert amended["status"] == "amended"

    asyncio.run(flow())
    final = httpx.get(f"{fhir_server.base_url}/{ref}").json()
    assert final["status"] == "amended" and final["conclusion"] == "Edited impression."
    _validate(final)
    provenance = _search(fhir_server, "Provenance", target=ref)
    by_rad = [
        p for p in provenance if any(a["who"].get("reference") == "Practitioner/rad-1" for a in p["agent"])
    ]
    assert len(by_rad) == 2  # signed, then amended; the refused attempt left nothing
    assert len(provenance) == 3  # and the model's, at creation
