"""Interval's EHR client against a real FHIR server (Medplum's FHIR router, tools/fhir-standin).

Priors fetched over FHIR equal the generator's ground truth; the number of round trips does not grow with
the number of prior studies; 503s are retried; a dead EHR is a clear, retryable error; SMART Backend
Services tokens are obtained, cached and used.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from adapters.ehr_priors import EhrPriorStore, PatientNotInEhrError, fetch_snapshot
from adapters.fhir_client import FhirClient, RetryPolicy, SmartBackendAuth
from adapters.fhir_priors import load_priors, priors_to_bundle
from core.errors import ExternalRequestError, ExternalServiceError, InvalidPriorsError
from core.types import PriorTimePoint
from fixtures.ehr import post_bundle, seed, seed_patient
from fixtures.services import FhirStandin, free_port
from fixtures.synth.cohort import PatientTruth

pytestmark = pytest.mark.integration

FAST = RetryPolicy(attempts=4, backoff_s=0.05, max_backoff_s=0.2, connect_timeout_s=1.0, read_timeout_s=10.0)
FAR_FUTURE = dt.date(2999, 1, 1)


def _comparable(tps: list[PriorTimePoint]) -> list[PriorTimePoint]:
    return [dataclasses.replace(tp, report_id="") for tp in tps]


def test_priors_from_the_ehr_equal_the_ground_truth(
    fhir_server: FhirStandin, small_patient: PatientTruth
) -> None:
    fhir_server.control.wipe()
    seed(fhir_server.base_url, small_patient.folder)
    pid, truth = load_priors(small_patient.folder / "priors.json")
    assert truth and any(tp.findings for tp in truth)
    store = EhrPriorStore(fhir_server.base_url, retry=FAST)
    got = store.prior_time_points(pid, before=FAR_FUTURE)
    assert _comparable(got) == _comparable(truth)
    assert store.snapshot is not None
    tracks = {f.track_id for tp in truth for f in tp.findings}
    assert set(store.snapshot.tracks) == tracks  # every track UID maps to the EHR's BodyStructure
    assert all(ref.startswith("BodyStructure/") for ref in store.snapshot.tracks.values())
    # the date filter is the PriorStore's contract
    cut = truth[-1].study_date
    assert [tp.study_date for tp in store.prior_time_points(pid, before=cut)] == [
        tp.study_date for tp in truth[:-1]
    ]


def _copies(tp: PriorTimePoint, n: int) -> list[PriorTimePoint]:
    return [
        dataclasses.replace(
            tp, study_date=tp.study_date + dt.timedelta(days=30 * i), study_uid=f"{tp.study_uid}.{i + 1}"
        )
        for i in range(n)
    ]


def test_round_trips_do_not_grow_with_the_number_of_priors(
    fhir_server: FhirStandin, small_patient: PatientTruth, tmp_path: Path
) -> None:
    _, truth = load_priors(small_patient.folder / "priors.json")
    with_findings = next(tp for tp in truth if tp.findings)
    figures = {}

    async def measure(n: int) -> dict[str, int]:
        pid = f"RT-{n}"
        async with FhirClient(fhir_server.base_url, retry=FAST) as ehr:
            await post_bundle(ehr, priors_to_bundle(pid, _copies(with_findings, n)), pid)
            fhir_server.reset()
            before = ehr.round_trips
            snap = await fetch_snapshot(ehr, pid)
        assert len(snap.time_points) == n
        assert sum(len(tp.findings) for tp in snap.time_points) == n * len(with_findings.findings)
        return {
            "priors": n,
            "client_round_trips": ehr.round_trips - before,
            "server_requests": int(fhir_server.stats()["requests"]),
        }

    for n in (1, 10):
        figures[n] = asyncio.run(measure(n))
    (tmp_path / "round_trips.json").write_text(json.dumps(figures))
    print("round trips:", figures)
    assert figures[1]["client_round_trips"] == figures[10]["client_round_trips"] <= 5
    assert figures[1]["server_requests"] == figures[10]["server_requests"] == figures[1]["client_round_trips"]


def test_ehr_503_then_200_is_retried_and_completes(
    fhir_server: FhirStandin, small_patient: PatientTruth
) -> None:
    fhir_server.control.wipe()
    seed(fhir_server.base_url, small_patient.folder)
    pid, truth = load_priors(small_patient.folder / "priors.json")
    fhir_server.reset()
    fhir_server.fail(503, 2)
    store = EhrPriorStore(fhir_server.base_url, retry=FAST)
    got = store.prior_time_points(pid, before=FAR_FUTURE)
    assert len(got) == len(truth)
    assert store.snapshot is not None
    stats = fhir_server.stats()
    assert stats["requests"] == store.snapshot.round_trips  # the two 503s were answered and counted
    assert store.snapshot.round_trips == 5 + 2


def test_ehr_down_is_a_retryable_error_without_identifiers() -> None:
    dead = f"http://127.0.0.1:{free_port()}/fhir/R4"
    store = EhrPriorStore(dead, retry=FAST)
    with pytest.raises(ExternalServiceError) as err:
        store.prior_time_points("SYN-SECRET-42", before=FAR_FUTURE)
    assert "did not answer" in str(err.value) and "SYN-SECRET-42" not in str(err.value)


def test_unknown_patient_is_a_clear_input_error(fhir_server: FhirStandin) -> None:
    with pytest.raises(PatientNotInEhrError, match="holds 0 patients"):
        EhrPriorStore(fhir_server.base_url, retry=FAST).prior_time_points("NOBODY", before=FAR_FUTURE)


def test_smart_backend_services_token_is_obtained_cached_and_used(
    smart_fhir_server: FhirStandin, smart_client: Any, small_patient: PatientTruth
) -> None:
    client_id, key = smart_client.client_id, smart_client.private_key_pem
    auth = SmartBackendAuth(client_id=client_id, private_key_pem=key, scope="system/*.rs system/*.cu")

    async def go() -> tuple[int, int]:
        async with FhirClient(smart_fhir_server.base_url, auth=auth, retry=FAST) as ehr:
            await seed_patient(ehr, small_patient.folder)
            pid, _ = load_priors(small_patient.folder / "priors.json")
            first = await fetch_snapshot(ehr, pid)
            second = await fetch_snapshot(ehr, pid)
            return len(first.time_points), len(second.time_points)

    n1, n2 = asyncio.run(go())
    assert n1 == n2 > 0
    assert smart_fhir_server.stats()["tokens_issued"] == 1  # discovered once, cached for every request
    # without a token the EHR refuses: the auth is real
    with pytest.raises(ExternalRequestError, match="HTTP 401"):
        EhrPriorStore(smart_fhir_server.base_url, retry=FAST).prior_time_points("x", before=FAR_FUTURE)


def test_text_only_prior_is_read_from_its_text_and_an_invalid_resource_is_refused(
    fhir_server: FhirStandin,
) -> None:
    """The stand-in stores what it is given (no validation): Interval validates what it reads."""
    fhir_server.control.wipe()
    text = "FINDINGS: Liver segment 7 lesion measures 23 x 17 mm. IMPRESSION: Hepatic metastasis."
    prior = PriorTimePoint(dt.date(2025, 3, 1), "1.2.3.4", (), report_text=text)
    pid = "TEXT-1"

    async def seed_one(bundle: dict[str, Any]) -> None:
        async with FhirClient(fhir_server.base_url, retry=FAST) as ehr:
            await post_bundle(ehr, bundle, pid)

    asyncio.run(seed_one(priors_to_bundle(pid, [prior])))
    (tp,) = EhrPriorStore(fhir_server.base_url, retry=FAST).prior_time_points(pid, before=FAR_FUTURE)
    assert [(f.source, f.long_axis_mm) for f in tp.findings] == [("text", 23.0)]

    bad = priors_to_bundle("BAD-1", [dataclasses.replace(prior, study_uid="1.2.3.5")])
    for entry in bad["entry"]:
        if entry["resource"]["resourceType"] == "DiagnosticReport":
            entry["resource"]["status"] = "signed-off"  # not a code of the required value set
    pid = "BAD-1"
    asyncio.run(seed_one(bad))
    with pytest.raises(InvalidPriorsError, match=r"DiagnosticReport.status is not a code"):
        EhrPriorStore(fhir_server.base_url, retry=FAST).prior_time_points(pid, before=FAR_FUTURE)
