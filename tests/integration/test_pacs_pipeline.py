"""The PACS as trigger and destination, end to end: a follow-up CT stored into Orthanc by STOW-RS becomes a stable
study, ``interval watch-pacs`` orders its analysis from the API, a Celery worker retrieves it from Orthanc, reports
to the EHR (``preliminary``) and sends the DICOM SEG and TID 1500 SR back into the study, whose segments carry the
same track UIDs as the EHR's Tumor BodyStructures. An Orthanc that goes down during the analysis fails the Task
with a reason after the retries; posted again, it completes, and nothing is stored twice.

Real services: Orthanc (own network namespace), Redis, PostgreSQL, the FHIR stand-in, the API under uvicorn with
the CeleryRunner, one worker subprocess and the watcher subprocess. The worker's segmenter is the cohort's ground
truth (INTERVAL_TEST_SEGMENTER) and it sleeps 1 s before each analysis (INTERVAL_TEST_ANALYSIS_DELAY_S), so that
the PACS can be stopped while the analysis runs.
"""

from __future__ import annotations

import contextlib
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

import highdicom as hd
import httpx
import psycopg
import pydicom
import pytest
import redis as redis_lib

from adapters import fhir_codes as C
from adapters.dicomweb import DicomWebClient, DicomWebImageSource, StableStudy, StableStudyWatcher, tag_value
from adapters.fhir_priors import load_priors
from adapters.fhir_publish import REPORT_ID_SYSTEM, report_identifier
from adapters.resource_store import ResourceStore
from adapters.settings import Settings
from fixtures.ehr import seed
from fixtures.services import (
    REPO_ROOT,
    FhirStandin,
    OrthancServer,
    Postgres,
    RedisServer,
    free_port,
    serve_app,
)
from fixtures.synth.cohort import CohortOptions, PatientTruth, make_patient
from fixtures.synth.evaluation import TruthSegmenter
from service.app import create_app
from service.jobs import AnalysisRequest
from workers.analysis import EhrConnection, PipelineAnalyzer
from workers.celery_app import TRUTH_MODEL_VERSION, CeleryRunner, create_celery
from workers.pacs_trigger import PacsTrigger, TaskApi

pytestmark = pytest.mark.integration

COHORT = CohortOptions(
    seed=44, matrix=64, min_time_points=2, max_time_points=2, vendors=("ge",), course="progression"
)
MODEL = TRUTH_MODEL_VERSION
SECRET = "pacs-pipeline-test-secret-0123456789abcdef"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
REDIS_DB = 4
_T = TypeVar("_T")


def wait_for(probe: Callable[[], _T | None], timeout_s: float, what: Callable[[], str] | str) -> _T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what() if callable(what) else what}")


@dataclass
class Proc:
    """A subprocess in its own process group (stopped by PID: SIGTERM, then SIGKILL of the group)."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, command: list[str], env: dict[str, str], log_path: Path) -> Proc:
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(proc, log_path)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # a pool process that outlived its parent

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Stack:
    env: dict[str, str]
    api_url: str
    store: ResourceStore
    pacs: DicomWebClient
    orthanc: OrthancServer
    ehr: FhirStandin
    root: Path
    folder: Path
    worker: Proc
    watcher: Proc | None = None
    patients: list[PatientTruth] = field(default_factory=list)

    @property
    def state_path(self) -> Path:
        return self.folder / "watch-state.json"

    def start_watcher(self) -> Proc:
        command = [sys.executable, "-m", "workers.cli", "watch-pacs", "--api", self.api_url]
        command += ["--state", str(self.state_path), "--interval", "0.3"]
        self.watcher = Proc.start(command, self.env, self.folder / "watcher.log")
        wait_for(lambda: self.state_path.is_file(), 30, self.diagnosis)  # it has read its starting position
        return self.watcher

    def tasks_for(self, study_uid: str) -> list[dict[str, Any]]:
        found, _ = self.store.search("Task", {"_count": "500"})
        return [t for t in found if t["focus"]["identifier"]["value"] == f"urn:oid:{study_uid}"]

    def task_for(self, study_uid: str) -> dict[str, Any] | None:
        tasks = self.tasks_for(study_uid)
        assert len(tasks) <= 1, tasks
        return tasks[0] if tasks else None

    def wait_status(self, study_uid: str, status: str, timeout_s: float) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            task = self.task_for(study_uid)
            if task is not None and task["status"] == "failed" and status != "failed":
                raise AssertionError(self.diagnosis(f"Task failed: {task.get('statusReason')}"))
            return task if task is not None and task["status"] == status else None

        return wait_for(probe, timeout_s, lambda: self.diagnosis(f"Task of {study_uid} {status}"))

    def ehr_reports(self, study_uid: str) -> list[dict[str, Any]]:
        ident = f"{REPORT_ID_SYSTEM}|{report_identifier(study_uid, MODEL)}"
        bundle = httpx.get(
            f"{self.ehr.base_url}/DiagnosticReport", params={"identifier": ident, "_count": "50"}, timeout=10
        ).json()
        return [e["resource"] for e in bundle.get("entry", [])]

    def store_reports(self, study_uid: str) -> int:
        ident = f"{REPORT_ID_SYSTEM}|{report_identifier(study_uid, MODEL)}"
        return self.store.search("DiagnosticReport", {"identifier": ident, "_count": "0"})[1]

    def instances(self, study_uid: str, sop_class: str) -> list[dict[str, Any]]:
        """Every instance of ``sop_class`` in the study, by QIDO-RS."""
        return self.pacs.search_instances(study_uid, filters={"SOPClassUID": sop_class})

    def diagnosis(self, what: str = "") -> str:
        rows = [
            f"Task/{t['id']}: {t['status']} {t.get('statusReason', {}).get('text', '')}" for t in self._all()
        ]
        logs = [f"--- worker:\n{self.worker.log()[-4000:]}"]
        if self.watcher is not None:
            logs.append(f"--- watcher:\n{self.watcher.log()[-3000:]}")
        return "\n".join([what, *rows, *logs])

    def _all(self) -> list[dict[str, Any]]:
        with contextlib.suppress(Exception):
            return self.store.search("Task", {"_count": "500"})[0]
        return []


def _database(pg: Postgres) -> str:
    name = f"pacs_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.dsn.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return pg.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    orthanc: OrthancServer,
    redis: RedisServer,
    postgres_db: Postgres,
    fhir_server: FhirStandin,
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("pacs-pipeline")
    root = folder / "cohort"
    patients = [make_patient(root, i, COHORT) for i in range(2)]
    broker_url = redis.db_url(REDIS_DB)
    with redis_lib.Redis.from_url(broker_url) as r:
        r.flushdb()
    database_url = _database(postgres_db)
    fhir_server.control.wipe()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("INTERVAL_")},
        "OMP_NUM_THREADS": "1",
        "INTERVAL_ENVIRONMENT": "test",
        "INTERVAL_API_TOKEN_SECRET": SECRET,
        "INTERVAL_BROKER_URL": broker_url,
        "INTERVAL_DATABASE_URL": database_url,
        "INTERVAL_EHR_BASE_URL": fhir_server.base_url,
        "INTERVAL_EHR_RETRY_ATTEMPTS": "3",
        "INTERVAL_EHR_BACKOFF_S": "0.05",
        "INTERVAL_EHR_TIMEOUT_S": "10",
        "INTERVAL_PACS_DICOMWEB_URL": orthanc.dicomweb_url,
        "INTERVAL_IMAGE_CACHE_DIR": str(folder / "cache"),
        "INTERVAL_ARTIFACTS_DIR": str(folder / "artifacts"),
        "INTERVAL_TEST_SEGMENTER": f"truth:{root}",
        "INTERVAL_TEST_ANALYSIS_DELAY_S": "1.0",
        "INTERVAL_TASK_MAX_RETRIES": "1",
        "INTERVAL_TASK_RETRY_BACKOFF_S": "0.2",
        "INTERVAL_TASK_RETRY_BACKOFF_MAX_S": "1",
        "INTERVAL_TASK_TIME_LIMIT_S": "60",
        "INTERVAL_VISIBILITY_TIMEOUT_S": "90",
    }
    settings = Settings(
        environment="test",
        api_token_secret=SECRET,
        broker_url=broker_url,
        database_url=database_url,
        public_base_url=api_url,
        task_time_limit_s=60,
        visibility_timeout_s=90,
        task_retry_backoff_max_s=1,
    )
    store = ResourceStore(database_url)
    app = create_app(settings, store=store, runner=CeleryRunner(store, create_celery(settings), MODEL))
    serving = contextlib.ExitStack()
    serving.enter_context(serve_app(app, port))
    command = [sys.executable, "-m", "workers.cli", "worker", "-Q", "imaging,default", "-c", "1"]
    command += ["-n", f"pacs-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "info"]
    worker = Proc.start(command, env, folder / "worker.log")
    pacs = DicomWebClient(orthanc.dicomweb_url, timeout=30, retries=2, backoff=0.05)
    s = Stack(env, api_url, store, pacs, orthanc, fhir_server, root, folder, worker, patients=patients)
    try:
        s.start_watcher()
        yield s
    finally:
        if s.watcher is not None:
            s.watcher.stop()
        worker.stop()
        serving.close()
        pacs.close()
        store.close()


def _follow_up(p: PatientTruth) -> tuple[str, list[Path]]:
    files = sorted((p.folder / p.time_points[-1] / "dicom").glob("*.dcm"))
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


def _read_back(stack: Stack, study_uid: str, sop_class: str, dest: Path) -> pydicom.Dataset:
    [instance] = stack.instances(study_uid, sop_class)
    series_uid = str(tag_value(instance, "SeriesInstanceUID"))
    stack.pacs.retrieve_series(study_uid, series_uid, dest)
    [path] = dest.glob("*.dcm")
    return pydicom.dcmread(path)


def _ehr_track_uids(stack: Stack, report: dict[str, Any]) -> set[str]:
    """The DICOM UID identifiers of the Tumor BodyStructures that the report's TumorSize Observations measure."""
    uids: set[str] = set()
    with httpx.Client(base_url=stack.ehr.base_url, timeout=10) as ehr:
        for ref in report["result"]:
            obs = ehr.get(ref["reference"]).json()
            if obs["code"]["coding"][0]["code"] != "21889-1":  # the RECIST status Observation
                continue
            body = ehr.get(obs["focus"][0]["reference"]).json()
            uids |= {
                i["value"].removeprefix("urn:oid:") for i in body["identifier"] if i["system"] == C.DICOM_UID
            }
    return uids


def test_a_study_stored_in_the_pacs_is_analysed_and_its_seg_and_sr_come_back(
    stack: Stack, tmp_path: Path
) -> None:
    patient = stack.patients[0]
    seed(stack.ehr.base_url, patient.folder, time_points=1)  # the EHR knows the baseline
    study_uid, files = _follow_up(patient)
    stored_at = time.monotonic()
    assert stack.pacs.store(files).ok

    task = stack.wait_status(study_uid, "completed", 90)
    print(f"\nSTOW-RS -> stable study -> Task -> worker -> completed in {time.monotonic() - stored_at:.1f} s")
    [report] = stack.ehr_reports(study_uid)
    assert report["status"] == "preliminary" and stack.store_reports(study_uid) == 1

    # the SEG and the SR are in the same study, once each, and read back with highdicom
    seg = hd.seg.Segmentation.from_dataset(_read_back(stack, study_uid, SEG_CLASS, tmp_path / "seg"))
    sr = hd.sr.Comprehensive3DSR.from_dataset(_read_back(stack, study_uid, SR_CLASS, tmp_path / "sr"))
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == study_uid
    assert seg.Manufacturer == sr.Manufacturer == "Interval"
    seg_uids = {seg.get_segment_description(n).tracking_uid for n in seg.get_segment_numbers()}
    sr_uids = {g.tracking_uid for g in sr.content.get_planar_roi_measurement_groups()}  # type: ignore[attr-defined]
    ehr_uids = _ehr_track_uids(stack, report)
    assert seg_uids and seg_uids == sr_uids == ehr_uids
    _, priors = load_priors(patient.folder / "priors.json")
    baseline_uids = {f.track_id for f in priors[0].findings}
    assert seg_uids & baseline_uids  # lesions followed from the baseline keep the identity the EHR gave them

    # Orthanc announces the study as stable again once the SEG and SR are in: the watcher posts nothing
    log_line = f"study {study_uid}: skipped: nothing new but Interval's own series"
    assert stack.watcher is not None
    wait_for(lambda: log_line in stack.watcher.log(), 20, stack.diagnosis)  # type: ignore[union-attr]
    # a watcher that remembers nothing (a fresh state) posts the Task again: the API returns the same one
    fresh = PacsTrigger(
        StableStudyWatcher(stack.orthanc.url),
        stack.pacs,
        TaskApi.from_settings(stack.api_url, Settings(api_token_secret=SECRET)),
        tmp_path / "fresh-state.json",
    )
    again = fresh.handle(StableStudy(study_uid, "", 0))
    assert (again.action, again.task_id, again.detail) == ("existing", task["id"], "completed")
    assert len(stack.tasks_for(study_uid)) == 1

    # the whole publication repeated (an analysis run again): the same instances, nothing added anywhere
    before = {
        c: {tag_value(i, "SOPInstanceUID") for i in stack.instances(study_uid, c)}
        for c in (SEG_CLASS, SR_CLASS)
    }
    analyzer = PipelineAnalyzer(
        images=DicomWebImageSource(stack.pacs, tmp_path / "cache"),
        segmenter=TruthSegmenter(patient.folder),
        ehr=EhrConnection(stack.ehr.base_url),
        pacs=stack.pacs,
    )
    analyzer(AnalysisRequest("again", study_uid, patient.patient_id, None))
    after = {
        c: {tag_value(i, "SOPInstanceUID") for i in stack.instances(study_uid, c)}
        for c in (SEG_CLASS, SR_CLASS)
    }
    assert after == before and all(len(v) == 1 for v in after.values())
    assert len(stack.ehr_reports(study_uid)) == 1

    # a restarted watcher (the saved position) repeats nothing
    (tmp_path / "restarted.json").write_bytes(stack.state_path.read_bytes())
    restarted = PacsTrigger(
        StableStudyWatcher(stack.orthanc.url), stack.pacs, fresh.api, tmp_path / "restarted.json"
    )
    outcomes = [o for o in restarted.run_once() if o.action != "skipped"]
    assert outcomes == []
    fresh.close()
    restarted.close()


def test_a_pacs_down_during_the_analysis_fails_the_task_and_a_repost_completes(stack: Stack) -> None:
    patient = stack.patients[1]
    seed(stack.ehr.base_url, patient.folder, time_points=1)
    study_uid, files = _follow_up(patient)
    # the watcher is down while the study arrives: restarted from its state file, it misses nothing
    assert stack.watcher is not None
    stack.watcher.stop()
    assert stack.pacs.store(files).ok
    stack.start_watcher()

    def analysing() -> bool:
        task = stack.task_for(study_uid)
        return (
            task is not None
            and (task.get("businessStatus") or {}).get("coding", [{}])[0].get("code") == "analyze"
        )

    wait_for(analysing, 60, stack.diagnosis)
    stack.orthanc.stop()  # the worker sleeps 1 s before it analyses, then reports and sends to the PACS
    try:
        failed = stack.wait_status(study_uid, "failed", 60)
        reason = failed["statusReason"]["text"]
        assert reason.startswith(f"the PACS at {stack.orthanc.url} did not complete"), reason
        assert (
            stack.worker.log().count(": analyze met ExternalServiceError; retry") == 1
        )  # then no second retry
        assert len(stack.ehr_reports(study_uid)) <= 1  # the PACS is met for prior images first, then to store
    finally:
        stack.orthanc.start()

    # posted again (as the watcher or an EHR would): the same Task runs again and completes
    api = TaskApi.from_settings(stack.api_url, Settings(api_token_secret=SECRET))
    ordered = api.order(study_uid, patient.patient_id)
    api.close()
    assert (ordered.task_id, ordered.status, ordered.created) == (failed["id"], "requested", False)
    stack.wait_status(study_uid, "completed", 60)
    assert len(stack.ehr_reports(study_uid)) == 1 and stack.store_reports(study_uid) == 1
    assert [len(stack.instances(study_uid, c)) for c in (SEG_CLASS, SR_CLASS)] == [1, 1]
    assert len(stack.tasks_for(study_uid)) == 1
    log = stack.watcher.log()
    assert log.count(f"study {study_uid}: Task/") == 1  # the watcher ordered it once
    assert patient.patient_id not in log + stack.worker.log()  # no patient identifier in the logs
