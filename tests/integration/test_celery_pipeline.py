"""The distributed pipeline: real Celery workers (subprocesses, stopped by PID), real Redis, PostgreSQL and the FHIR
stand-in. A study posted to the API is analysed by a worker and reported once, in the EHR and in Interval's store,
whatever happens to the workers (kill -9 mid-analysis), to Redis (restarted with a task in flight) or to the
trigger (the same study announced twice).

Workers get their settings from INTERVAL_* as in production, plus two test hooks: the ground-truth label maps as
the segmenter (INTERVAL_TEST_SEGMENTER, so that an analysis takes a fraction of a second) and a delay around the
analysis (INTERVAL_TEST_ANALYSIS_DELAY_S, so that a kill lands before or after the report reached the EHR). The
visibility timeout and the task time limit are seconds here, hours in production.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import pytest
import redis as redis_lib
from fastapi.testclient import TestClient

from adapters.fhir_codes import DICOM_UID, PATIENT_ID_SYSTEM
from adapters.fhir_publish import REPORT_ID_SYSTEM, report_identifier
from adapters.resource_store import ResourceStore
from adapters.settings import Settings
from fixtures.ehr import seed
from fixtures.services import REPO_ROOT, FhirStandin, Postgres, RedisServer
from fixtures.synth.cohort import CohortOptions, PatientTruth, make_patient
from service.app import create_app
from service.auth import mint_token
from service.jobs import TASK_CODE_SYSTEM, AnalysisRequest
from workers.celery_app import (
    ANALYZE,
    INGEST,
    TRUTH_MODEL_VERSION,
    CeleryRunner,
    api_model_version,
    create_celery,
)

pytestmark = pytest.mark.integration

COHORT = CohortOptions(seed=31, matrix=64, min_time_points=2, max_time_points=2, vendors=("ge", "philips"))
KILLS = 10
MODEL = TRUTH_MODEL_VERSION
TIME_LIMIT_S = 20.0  # a live step ends (or is killed) within this; 30 min in production
VISIBILITY_S = 22.0  # a killed worker's task is delivered again after this; 1 h in production
DELAY_S = 1.0  # test hook: slept before and after each analysis
SCOPES = "system/Task.cr system/Task.s system/*.read"
_T = TypeVar("_T")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[PatientTruth]]:
    """Ten two-time-point patients (64 x 64): the EHR knows each one's baseline, a Task orders the follow-up."""
    root = tmp_path_factory.mktemp("celery-cohort")
    return root, [make_patient(root, i, COHORT) for i in range(KILLS)]


def _study_uid(p: PatientTruth) -> str:
    return str(json.loads((p.folder / p.time_points[-1] / "truth.json").read_text())["study_uid"])


@dataclass
class Worker:
    """``interval worker`` in its own process group: ``kill9`` ends the main process and its pool at once."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pool_pids(self) -> list[int]:
        try:
            return [int(p) for p in Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()]
        except OSError:
            return []

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Warm shutdown (SIGTERM: running tasks finish), then SIGKILL of the group after 15 s."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill9()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # a pool process that outlived its parent

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Pipeline:
    """One test's services: its own PostgreSQL database and Redis db, the API (TestClient) with a CeleryRunner,
    and the workers it started."""

    env: dict[str, str]
    store: ResourceStore
    client: TestClient
    runner: CountingRunner
    ehr: FhirStandin
    broker_url: str
    folder: Path
    workers: list[Worker] = field(default_factory=list)

    def start_worker(self, *, delay_s: float = 0.0, concurrency: int = 1, **env: str) -> Worker:
        n = len(self.workers)
        log_path = self.folder / f"worker{n}.log"
        env = {**self.env, "INTERVAL_TEST_ANALYSIS_DELAY_S": str(delay_s), **env}
        command = [sys.executable, "-m", "workers.cli", "worker", "-Q", "imaging,default"]
        command += ["-c", str(concurrency), "-n", f"w{n}-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "info"]
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(proc, log_path)
        self.workers.append(worker)
        return worker

    def post(self, patient: PatientTruth, patient_ref: str) -> httpx.Response:
        token = mint_token(self.env["INTERVAL_API_TOKEN_SECRET"], "ehr-1", SCOPES, issuer="interval")
        body = {
            "resourceType": "Task",
            "status": "requested",
            "intent": "order",
            "code": {"coding": [{"system": TASK_CODE_SYSTEM, "code": "analyze"}]},
            "focus": {
                "type": "ImagingStudy",
                "identifier": {"system": DICOM_UID, "value": f"urn:oid:{_study_uid(patient)}"},
            },
            "for": {
                "reference": patient_ref,
                "identifier": {"system": PATIENT_ID_SYSTEM, "value": patient.patient_id},
            },
        }
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
        return self.client.post("/fhir/Task", json=body, headers=headers)

    def tasks(self) -> list[dict[str, Any]]:
        found, _ = self.store.search("Task", {"_count": "500"})
        return found

    def store_reports(self, study_uid: str) -> int:
        ident = f"{REPORT_ID_SYSTEM}|{report_identifier(study_uid, MODEL)}"
        return self.store.search("DiagnosticReport", {"identifier": ident, "_count": "0"})[1]

    def ehr_reports(self, study_uid: str) -> int:
        ident = f"{REPORT_ID_SYSTEM}|{report_identifier(study_uid, MODEL)}"
        bundle = httpx.get(
            f"{self.ehr.base_url}/DiagnosticReport", params={"identifier": ident, "_count": "50"}, timeout=10
        ).json()
        return sum(1 for e in bundle.get("entry", []) if e.get("search", {}).get("mode", "match") == "match")

    def wait_completed(self, task_ids: list[str], timeout_s: float) -> None:
        def done() -> bool:
            status = {t["id"]: t["status"] for t in self.tasks()}
            failed = [status[i] for i in task_ids if status.get(i) == "failed"]
            assert not failed, self._diagnosis("a Task failed")
            return all(status.get(i) == "completed" for i in task_ids)

        wait_for(done, timeout_s, "every Task completed", self._diagnosis)

    def _diagnosis(self, what: str = "") -> str:
        rows = [
            f"Task/{t['id']}: {t['status']} {t.get('businessStatus', {}).get('text', '')} "
            f"{t.get('statusReason', {}).get('text', '')}"
            for t in self.tasks()
        ]
        logs = [
            f"--- worker {i} (pid {w.pid}, rc {w.proc.poll()}):\n{w.log()[-3000:]}"
            for i, w in enumerate(self.workers)
        ]
        return "\n".join([what, *rows, *logs])


class CountingRunner(CeleryRunner):
    """The CeleryRunner the API uses, counting the submissions it receives."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.submitted: list[str] = []

    def submit(self, request: AnalysisRequest) -> None:
        self.submitted.append(request.task_id)
        super().submit(request)


def wait_for(
    probe: Callable[[], _T | None], timeout_s: float, what: str, diagnosis: Callable[[str], str] | None = None
) -> _T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(diagnosis(f"not within {timeout_s:.0f} s: {what}") if diagnosis else what)


def _database(pg: Postgres) -> str:
    """A database of its own in the session's cluster (other tests keep theirs)."""
    name = f"celery_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg.url.rsplit("/", 1)[0] + f"/{name}"


_redis_dbs = iter(range(5, 16))


@pytest.fixture
def pipeline(
    redis: RedisServer,
    postgres_db: Postgres,
    fhir_server: FhirStandin,
    cohort: tuple[Path, list[PatientTruth]],
    tmp_path: Path,
) -> Iterator[Pipeline]:
    root, _ = cohort
    broker_url = redis.db_url(next(_redis_dbs))
    with redis_lib.Redis.from_url(broker_url) as r:
        r.flushdb()
    database_url = _database(postgres_db)
    fhir_server.control.wipe()
    secret = "celery-pipeline-test-secret-0123456789abcdef"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("INTERVAL_")},
        "OMP_NUM_THREADS": "1",
        "INTERVAL_ENVIRONMENT": "test",
        "INTERVAL_API_TOKEN_SECRET": secret,
        "INTERVAL_BROKER_URL": broker_url,
        "INTERVAL_DATABASE_URL": database_url,
        "INTERVAL_EHR_BASE_URL": fhir_server.base_url,
        "INTERVAL_EHR_RETRY_ATTEMPTS": "3",
        "INTERVAL_EHR_BACKOFF_S": "0.05",
        "INTERVAL_EHR_TIMEOUT_S": "10",
        "INTERVAL_IMAGE_ROOTS": json.dumps([str(root)]),
        "INTERVAL_ARTIFACTS_DIR": str(tmp_path / "artifacts"),
        "INTERVAL_TEST_SEGMENTER": f"truth:{root}",
        "INTERVAL_TASK_TIME_LIMIT_S": str(TIME_LIMIT_S),
        "INTERVAL_VISIBILITY_TIMEOUT_S": str(VISIBILITY_S),
        "INTERVAL_TASK_RETRY_BACKOFF_S": "0.2",
        "INTERVAL_TASK_RETRY_BACKOFF_MAX_S": "1",
        "INTERVAL_UNACKED_RESTORE_INTERVAL_S": "0.5",
    }
    settings = Settings(
        environment="test",
        api_token_secret=secret,
        broker_url=broker_url,
        database_url=database_url,
        task_time_limit_s=TIME_LIMIT_S,
        visibility_timeout_s=VISIBILITY_S,
        task_retry_backoff_max_s=1,
    )
    store = ResourceStore(database_url)
    runner = CountingRunner(store, create_celery(settings), MODEL)
    with TestClient(create_app(settings, store=store, runner=runner)) as client:
        p = Pipeline(env, store, client, runner, fhir_server, broker_url, tmp_path)
        try:
            yield p
        finally:
            for worker in p.workers:
                worker.stop()
            store.close()


def _seed(pipeline: Pipeline, patients: list[PatientTruth]) -> list[str]:
    return [seed(pipeline.ehr.base_url, p.folder, time_points=1) for p in patients]


def test_a_posted_study_is_analysed_by_a_worker_and_reported_once(
    pipeline: Pipeline, cohort: tuple[Path, list[PatientTruth]]
) -> None:
    patient = cohort[1][0]
    (patient_ref,) = _seed(pipeline, [patient])
    posted = pipeline.post(patient, patient_ref)
    assert posted.status_code == 201, posted.text
    task_id = posted.json()["id"]
    worker = pipeline.start_worker()
    pipeline.wait_completed([task_id], 60)

    task = pipeline.store.read("Task", task_id)
    assert task is not None and "businessStatus" not in task and "statusReason" not in task
    report_ref = task["output"][0]["valueReference"]["reference"]
    report = pipeline.store.read("DiagnosticReport", report_ref.split("/")[1])
    assert report is not None and report["status"] == "preliminary"
    study = _study_uid(patient)
    assert report["identifier"][0]["value"] == report_identifier(study, MODEL)
    assert pipeline.store_reports(study) == 1 and pipeline.ehr_reports(study) == 1
    assert worker.alive()
    worker.stop()
    assert worker.proc.returncode == 0
    log = worker.log()
    assert f"Task/{task_id} study {study}: analyze done" in log
    assert patient.patient_id not in log  # the patient's identifier stays out of the logs


def _step(task: dict[str, Any]) -> str | None:
    codings = (task.get("businessStatus") or {}).get("coding") or [{}]
    code = codings[0].get("code")
    return code if isinstance(code, str) else None


def _broker_backlog(broker_url: str) -> int:
    """Messages queued or delivered and not yet acknowledged (kombu's Redis keys)."""
    with redis_lib.Redis.from_url(broker_url) as r:
        return int(r.llen("default")) + int(r.llen("imaging")) + int(r.hlen("unacked"))


def test_the_same_study_announced_twice_is_reported_once(
    pipeline: Pipeline, cohort: tuple[Path, list[PatientTruth]]
) -> None:
    patient = cohort[1][1]
    (patient_ref,) = _seed(pipeline, [patient])
    first, again = pipeline.post(patient, patient_ref), pipeline.post(patient, patient_ref)
    assert (first.status_code, again.status_code) == (201, 200)
    task_id = first.json()["id"]
    assert again.json()["id"] == task_id
    assert pipeline.runner.submitted == [task_id]  # the API joined the queued job instead of queuing another
    # past the API (a PACS notification, an operator's retry): two more chains for the same Task
    request = AnalysisRequest.from_fhir(first.json())
    pipeline.runner.submit(request)
    pipeline.runner.submit(request)
    assert _broker_backlog(pipeline.broker_url) == 3

    worker = pipeline.start_worker(concurrency=2)
    pipeline.wait_completed([task_id], 60)
    wait_for(lambda: _broker_backlog(pipeline.broker_url) == 0, 30, "every chain ended", pipeline._diagnosis)

    study = _study_uid(patient)
    assert pipeline.store_reports(study) == 1 and pipeline.ehr_reports(study) == 1
    log = worker.log()
    assert log.count(": analyze done") == 1, (
        pipeline._diagnosis()
    )  # one chain analysed; the others did nothing
    assert log.count("already finished") >= 2
    # a Task that is already completed is not queued again
    pipeline.runner.submit(request)
    assert _broker_backlog(pipeline.broker_url) == 0


def test_an_unreachable_ehr_is_retried_then_fails_the_task_which_can_be_posted_again(
    pipeline: Pipeline, cohort: tuple[Path, list[PatientTruth]]
) -> None:
    patient = cohort[1][4]
    (patient_ref,) = _seed(pipeline, [patient])
    pipeline.ehr.control.fail(503, count=100_000)
    task_id = pipeline.post(patient, patient_ref).json()["id"]
    worker = pipeline.start_worker(INTERVAL_TASK_MAX_RETRIES="2")

    def failed() -> dict[str, Any] | None:
        task = pipeline.store.read("Task", task_id)
        return task if task is not None and task["status"] == "failed" else None

    task = wait_for(failed, 60, "the Task failed", pipeline._diagnosis)
    assert task["statusReason"]["text"].startswith("the EHR answered 503"), task["statusReason"]
    assert worker.log().count(": analyze met ExternalServiceError; retry") == 2  # then no third retry

    pipeline.ehr.control.reset()  # the EHR is back: the same Task posted again is analysed
    again = pipeline.post(patient, patient_ref)
    assert (
        again.status_code == 200 and again.json()["id"] == task_id and again.json()["status"] == "requested"
    )
    pipeline.wait_completed([task_id], 60)
    study = _study_uid(patient)
    assert pipeline.store_reports(study) == 1 and pipeline.ehr_reports(study) == 1
    assert pipeline.runner.submitted == [task_id, task_id]


def test_a_redis_restart_with_tasks_in_flight_loses_nothing(
    pipeline: Pipeline, cohort: tuple[Path, list[PatientTruth]], redis: RedisServer
) -> None:
    patients = cohort[1][2:4]
    refs = _seed(pipeline, patients)
    task_ids = [pipeline.post(p, ref).json()["id"] for p, ref in zip(patients, refs, strict=True)]
    worker = pipeline.start_worker(delay_s=1.5)
    wait_for(
        lambda: any(_step(t) == "analyze" for t in pipeline.tasks()),
        30,
        "an analysis started",
        pipeline._diagnosis,
    )
    # one analysis running, the other Task's chain still in Redis
    redis.stop()
    time.sleep(1.0)
    redis.start()
    back, back_at = time.monotonic(), dt.datetime.now()
    pipeline.wait_completed(task_ids, 60)
    recovered_s = time.monotonic() - back
    assert worker.alive(), pipeline._diagnosis("the worker exited")
    for patient in patients:
        study = _study_uid(patient)
        assert pipeline.store_reports(study) == 1 and pipeline.ehr_reports(study) == 1
    # an acknowledgement lost with the old connection: the task is delivered again and does nothing
    wait_for(
        lambda: _broker_backlog(pipeline.broker_url) == 0,
        VISIBILITY_S + 20,
        "the broker drained",
        pipeline._diagnosis,
    )
    drained_s = time.monotonic() - back
    log = worker.log()
    assert worker.alive() and log.count(": analyze done") == 2
    connected = [
        dt.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
        for line in log.splitlines()
        if "INFO/MainProcess] Connected to redis" in line
    ]
    assert len(connected) == 2  # at start, and after the restart: the same worker process reconnected
    print(
        f"\nredis restart: worker reconnected {(connected[-1] - back_at).total_seconds():.1f} s after Redis was "
        f"back; both Tasks completed at {recovered_s:.1f} s, the broker drained at {drained_s:.1f} s"
    )


def test_workers_killed_mid_analysis_lose_no_study_and_report_none_twice(
    pipeline: Pipeline, cohort: tuple[Path, list[PatientTruth]]
) -> None:
    patients = cohort[1]
    refs = _seed(pipeline, patients)
    studies = {
        pipeline.post(p, ref).json()["id"]: _study_uid(p) for p, ref in zip(patients, refs, strict=True)
    }
    started = time.monotonic()
    worker = pipeline.start_worker(delay_s=DELAY_S)
    seen: set[tuple[str, str]] = set()
    kills: list[dict[str, Any]] = []

    def new_analysis() -> dict[str, Any] | None:
        for t in pipeline.tasks():
            if (
                t["status"] == "in-progress"
                and _step(t) == "analyze"
                and (t["id"], t["meta"]["versionId"]) not in seen
            ):
                return t
        return None

    for i in range(KILLS):
        task = wait_for(new_analysis, 45, f"analysis #{i + 1} started", pipeline._diagnosis)
        seen.add((task["id"], task["meta"]["versionId"]))
        study = studies[task["id"]]
        if i % 2:  # after the report reached the EHR, before it is stored (the worker sleeps DELAY_S)
            with contextlib.suppress(AssertionError):
                wait_for(lambda: pipeline.ehr_reports(study), 10 + 2 * DELAY_S, "published")  # noqa: B023
        else:  # before: the worker sleeps DELAY_S before the analysis
            time.sleep(0.1)
        in_ehr = pipeline.ehr_reports(study) > 0
        whole = i % 3 != 2  # else only the pool process running the task: the worker itself re-queues it
        if whole:
            worker.kill9()
        else:
            for pid in worker.pool_pids():
                os.kill(pid, signal.SIGKILL)
        current = pipeline.store.read("Task", task["id"])
        kills.append(
            {
                "whole_worker": whole,
                "in_ehr": in_ehr,
                "interrupted": current is not None and current["status"] != "completed",
            }
        )
        if whole and i < KILLS - 1:
            worker = pipeline.start_worker(delay_s=DELAY_S)
    if whole:  # the last kill took the whole worker: the one that finishes has no delay
        pipeline.start_worker(concurrency=2)
    pipeline.wait_completed(list(studies), 90)
    elapsed_s = time.monotonic() - started

    lost = [i for i, t in ((t["id"], t) for t in pipeline.tasks()) if t["status"] != "completed"]
    duplicates = {s: (pipeline.ehr_reports(s), pipeline.store_reports(s)) for s in studies.values()}
    duplicates = {s: n for s, n in duplicates.items() if n != (1, 1)}
    interrupted = sum(k["interrupted"] for k in kills)
    after_publish = sum(k["in_ehr"] and k["interrupted"] for k in kills)
    print(
        f"\nkill -9: {len(kills)} kills ({sum(k['whole_worker'] for k in kills)} whole workers, "
        f"{sum(not k['whole_worker'] for k in kills)} pool processes), {interrupted} mid-analysis "
        f"({after_publish} after the EHR had the report); {len(studies)} studies, {len(lost)} lost, "
        f"{len(duplicates)} reported twice; {elapsed_s:.0f} s"
    )
    assert not lost and not duplicates, (lost, duplicates)
    assert interrupted >= KILLS - 2, kills  # the kills did land in analyses (timing on a loaded machine)
    assert after_publish >= 2, kills  # and some after the report had reached the EHR


def test_the_api_keys_tasks_with_the_model_version_the_imaging_workers_load() -> None:
    """The API (no torch) and the workers (the model) must name the same version, or every Task is refused."""
    from models.segmentation.inference import MonaiSegmenter

    settings = Settings(environment="test")
    assert api_model_version(settings) == MonaiSegmenter(settings.segmenter_weights).model_version


def test_flower_shows_the_workers_and_every_pipeline_task(
    pipeline: Pipeline, cohort: tuple[Path, list[PatientTruth]]
) -> None:
    """`interval flower` on the pipeline's broker: it asks for its password, lists the running worker, and
    shows the study's ingest and analysis tasks as they finish (workers publish task events)."""
    from fixtures.services import free_port

    port = free_port()
    env = {**pipeline.env, "INTERVAL_FLOWER_BASIC_AUTH": "ops:flower-test-password"}
    log_path = pipeline.folder / "flower.log"
    with log_path.open("wb") as out:
        flower = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "flower", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    auth = ("ops", "flower-test-password")
    try:
        worker = pipeline.start_worker(concurrency=1)

        def workers() -> dict[str, Any] | None:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{base}/api/workers", params={"refresh": "1"}, auth=auth, timeout=10)
                if r.status_code == 200 and r.json():
                    return dict(r.json())
            return None

        seen = wait_for(workers, 60, "Flower lists the worker", lambda m: m + "\n" + log_path.read_text())
        (name,) = seen
        assert name.startswith("w0-")
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401  # no password, no data

        patient = cohort[1][0]
        (patient_ref,) = _seed(pipeline, [patient])
        posted = pipeline.post(patient, patient_ref)
        assert posted.status_code == 201, posted.text
        pipeline.wait_completed([posted.json()["id"]], 60)

        def finished() -> dict[str, str] | None:
            r = httpx.get(f"{base}/api/tasks", auth=auth, timeout=10)
            states = {t["name"]: t["state"] for t in r.json().values() if t.get("name")}
            return states if states.get(ANALYZE) == "SUCCESS" and states.get(INGEST) == "SUCCESS" else None

        wait_for(finished, 30, "Flower shows the ingest and analyze tasks succeeded")
        listed = httpx.get(f"{base}/api/tasks", auth=auth, timeout=10).text
        assert patient.patient_id not in listed  # task arguments are ids and URIs
        assert worker.alive()
    finally:
        flower.terminate()
        try:
            flower.wait(timeout=15)
        except subprocess.TimeoutExpired:
            flower.kill()
