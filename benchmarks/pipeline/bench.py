"""Pipeline throughput and latency through the distributed path, with the real segmentation model.

    OMP_NUM_THREADS=1 python -m benchmarks.pipeline.bench --studies 4 --out benchmarks/pipeline/result.json

Everything runs as in production, on loopback: Orthanc (the PACS, DICOMweb), Redis, PostgreSQL, the FHIR stand-in
(the EHR, seeded with each patient's baseline), the API under uvicorn with the ``CeleryRunner``, and
``interval worker`` subprocesses with the default analyzer (``models/weights/segmenter.pt``, deterministic wording).
Each follow-up and its prior are in Orthanc; a worker retrieves the follow-up by WADO-RS (``interval.ingest``),
analyses it (the prior's images come from Orthanc too), reports to the EHR and sends the SEG and SR back.

(a) **Throughput**: the same N generated follow-ups (cohort default matrix 192) ordered at once, with 1 and with 2
    worker processes (``interval worker -c K``); each run starts from an empty database, EHR and image cache, and
    its pool processes are warmed first (one study each, not counted: the model loads once per process).
(b) **Latency** of one large follow-up (matrix 512, the generator's ~120-slice vendor) with one prior: from the end
    of its STOW-RS into Orthanc, through ``interval watch-pacs`` (Orthanc's StableAge), to the stored draft; and
    from the Task's creation to the stored draft (the target: <= 30 s on two cores).

Per-step times come from the workers' Prometheus histogram ``interval_step_seconds`` (multiprocess mode), per
Task times from the Tasks' ``authoredOn`` / ``executionPeriod``. Results go to ``--out`` (JSON) and stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pydicom
import redis as redis_lib
import uvicorn

from adapters.dicomweb import DicomWebClient
from adapters.resource_store import ResourceStore
from adapters.settings import Settings
from benchmarks.machine import machine
from fixtures.ehr import seed
from fixtures.services import (
    REPO_ROOT,
    FhirStandin,
    OrthancServer,
    Postgres,
    RedisServer,
    fhir_standin,
    free_port,
    orthanc_server,
    postgres,
    redis_server,
)
from fixtures.synth.cohort import CohortOptions, PatientTruth, make_patient
from service.app import create_app
from workers.celery_app import CeleryRunner, api_model_version, create_celery
from workers.pacs_trigger import TaskApi

HERE = Path(__file__).resolve().parent
SECRET = "pipeline-benchmark-secret-0123456789abcdef"
SMALL = CohortOptions(seed=101, min_time_points=2, max_time_points=2, course="progression")  # matrix 192
# canon: 2.0 mm slices over the generator's 260 mm range = 130 slices, the nearest it makes to 120
LARGE = CohortOptions(
    seed=202, matrix=512, vendors=("canon",), min_time_points=2, max_time_points=2, course="progression"
)
STEPS = (
    "retrieve",
    "ingest",
    "segment",
    "measure",
    "priors",
    "compare",
    "draft",
    "publish",
    "pacs_outputs",
    "publish_pacs",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def wait_for(probe: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"not within {timeout_s:.0f} s: {what}")


def instant(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


# --- data -------------------------------------------------------------------------------------------------------


def cohort(folder: Path, n: int, options: CohortOptions) -> list[PatientTruth]:
    """The patients, generated once into ``folder`` and read back afterwards (``patient.json`` is written last,
    so a patient that has one is complete; the generator is deterministic)."""
    patients = []
    for index in range(n):
        pid = f"SYN{options.seed:03d}{index:04d}"
        meta = folder / pid / "patient.json"
        if meta.is_file():
            n_tp = len(json.loads(meta.read_text())["time_points"])
            patients.append(PatientTruth(pid, folder / pid, tuple(f"t{t}" for t in range(n_tp))))
            continue
        began = time.monotonic()
        patients.append(make_patient(folder, index, options))
        log(f"generated {pid} (matrix {options.matrix}) in {time.monotonic() - began:.0f} s")
    return patients


def study_files(p: PatientTruth, time_point: int) -> tuple[str, list[Path]]:
    files = sorted((p.folder / p.time_points[time_point] / "dicom").glob("*.dcm"))
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


def shape(files: list[Path]) -> list[int]:
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    return [int(ds.Columns), int(ds.Rows), len(files)]


# --- one run: its own database, Redis db, EHR content, cache, metrics and workers ---------------------------------


@dataclass
class Services:
    orthanc: OrthancServer
    redis: RedisServer
    pg: Postgres
    ehr: FhirStandin
    pacs: DicomWebClient
    work: Path


class Run:
    """The API (uvicorn thread, CeleryRunner) and ``interval worker -c K`` over fresh state."""

    def __init__(self, services: Services, name: str, concurrency: int, redis_db: int) -> None:
        self.s = services
        self.name = name
        self.folder = services.work / name
        self.folder.mkdir(parents=True)
        self.prom = self.folder / "prometheus"
        self.prom.mkdir()
        database = f"bench_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(services.pg.dsn.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{database}"')
        self.database_url = services.pg.url.rsplit("/", 1)[0] + f"/{database}"
        self.broker_url = services.redis.db_url(redis_db)
        with redis_lib.Redis.from_url(self.broker_url) as r:
            r.flushdb()
        services.ehr.control.wipe()
        _delete_interval_series(services.orthanc)
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("INTERVAL_")},
            "OMP_NUM_THREADS": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(self.prom),
            "INTERVAL_ENVIRONMENT": "test",
            "INTERVAL_API_TOKEN_SECRET": SECRET,
            "INTERVAL_BROKER_URL": self.broker_url,
            "INTERVAL_DATABASE_URL": self.database_url,
            "INTERVAL_EHR_BASE_URL": services.ehr.base_url,
            "INTERVAL_PACS_DICOMWEB_URL": services.orthanc.dicomweb_url,
            "INTERVAL_IMAGE_CACHE_DIR": str(self.folder / "cache"),
            "INTERVAL_ARTIFACTS_DIR": str(self.folder / "artifacts"),
        }
        settings = Settings(
            environment="test",
            api_token_secret=SECRET,
            broker_url=self.broker_url,
            database_url=self.database_url,
            public_base_url=self.api_url,
        )
        self.model_version = api_model_version(settings)
        self.store = ResourceStore(self.database_url)
        app = create_app(
            settings,
            store=self.store,
            runner=CeleryRunner(self.store, create_celery(settings), self.model_version),
        )
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 30, "the API started")
        self.api = TaskApi.from_settings(self.api_url, settings)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.worker_log = self.folder / "worker.log"
        command = [
            sys.executable,
            "-m",
            "workers.cli",
            "worker",
            "-Q",
            "imaging,default",
            "-c",
            str(concurrency),
        ]
        command += ["-n", f"{name}@%h", "--loglevel", "info"]
        self.procs.append(self._spawn(command, self.worker_log))
        wait_for(lambda: " ready." in self.worker_log.read_text(errors="replace"), 120, "the worker started")

    def _spawn(self, command: list[str], log_path: Path) -> subprocess.Popen[bytes]:
        with log_path.open("ab") as out:
            return subprocess.Popen(
                command,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_watcher(self) -> Path:
        log_path = self.folder / "watcher.log"
        state = self.folder / "watch-state.json"
        command = [sys.executable, "-m", "workers.cli", "watch-pacs", "--api", self.api_url]
        command += ["--state", str(state), "--interval", "0.2"]
        self.procs.append(self._spawn(command, log_path))
        wait_for(state.is_file, 60, "the watcher started")
        return log_path

    def order(self, patients: list[PatientTruth]) -> dict[str, str]:
        """Task id -> study UID of each patient's follow-up."""
        ordered = {}
        for p in patients:
            study_uid, _ = study_files(p, -1)
            ordered[self.api.order(study_uid, p.patient_id).task_id] = study_uid
        return ordered

    def tasks(self) -> list[dict[str, Any]]:
        return self.store.search("Task", {"_count": "500"})[0]

    def wait_done(self, task_ids: list[str], timeout_s: float) -> list[dict[str, Any]]:
        def probe() -> list[dict[str, Any]] | None:
            by_id = {t["id"]: t for t in self.tasks()}
            failed = [
                by_id[i].get("statusReason") for i in task_ids if by_id.get(i, {}).get("status") == "failed"
            ]
            if failed:
                raise RuntimeError(
                    f"{self.name}: a Task failed: {failed}\n{self.worker_log.read_text()[-3000:]}"
                )
            if all(by_id.get(i, {}).get("status") == "completed" for i in task_ids):
                return [by_id[i] for i in task_ids]
            return None

        return wait_for(probe, timeout_s, f"{self.name}: {len(task_ids)} Task(s) completed")  # type: ignore[no-any-return]

    def steps(self) -> dict[str, tuple[float, int]]:
        """step -> (sum of seconds, count) over every worker process so far."""
        from prometheus_client import CollectorRegistry, multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.prom))  # type: ignore[no-untyped-call]
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for metric in registry.collect():
            if metric.name != "interval_step_seconds":
                continue
            for sample in metric.samples:
                step = sample.labels.get("step", "")
                if sample.name.endswith("_sum"):
                    sums[step] = sums.get(step, 0.0) + sample.value
                elif sample.name.endswith("_count"):
                    counts[step] = counts.get(step, 0) + int(sample.value)
        return {step: (sums.get(step, 0.0), counts.get(step, 0)) for step in sums}

    def models_loaded(self) -> int:
        return self.worker_log.read_text(errors="replace").count(": analyzer ")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.api.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.store.close()


def _delete_interval_series(orthanc: OrthancServer) -> None:
    """Remove the SEG and SR series a previous run sent, so that each run stores them anew."""
    with httpx.Client(base_url=orthanc.url, timeout=30, trust_env=False) as client:
        for modality in ("SEG", "SR"):
            found = client.post(
                "/tools/find", json={"Level": "Series", "Query": {"Modality": modality}}
            ).json()
            for series_id in found:
                client.delete(f"/series/{series_id}")


def _step_delta(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for step in STEPS:
        s1, n1 = after.get(step, (0.0, 0))
        s0, n0 = before.get(step, (0.0, 0))
        if n1 > n0:
            out[step] = {
                "mean_s": round((s1 - s0) / (n1 - n0), 3),
                "total_s": round(s1 - s0, 2),
                "n": n1 - n0,
            }
    return out


def _task_times(tasks: list[dict[str, Any]]) -> dict[str, Any]:
    latency = [
        (instant(t["executionPeriod"]["end"]) - instant(t["authoredOn"])).total_seconds() for t in tasks
    ]
    wait = [
        (instant(t["executionPeriod"]["start"]) - instant(t["authoredOn"])).total_seconds() for t in tasks
    ]
    return {
        "latency_s": {
            "min": round(min(latency), 2),
            "mean": round(sum(latency) / len(latency), 2),
            "max": round(max(latency), 2),
        },
        "first_step_wait_s": {"mean": round(sum(wait) / len(wait), 2), "max": round(max(wait), 2)},
    }


# --- (a) throughput -------------------------------------------------------------------------------------------------


def throughput(
    services: Services, measured: list[PatientTruth], warm: list[PatientTruth], workers: int
) -> dict[str, Any]:
    run = Run(services, f"throughput-c{workers}", workers, redis_db=10 + workers)
    try:
        for p in [*warm[:workers], *measured]:
            seed(services.ehr.base_url, p.folder, time_points=1)
        warm_ids = list(run.order(warm[:workers]))
        run.wait_done(warm_ids, 600)
        log(f"c{workers}: warmed ({run.models_loaded()} process(es) loaded the model)")
        before = run.steps()
        started = dt.datetime.now(dt.UTC)
        t0 = time.monotonic()
        ids = list(run.order(measured))
        tasks = run.wait_done(ids, 1800)
        ended = max(instant(t["executionPeriod"]["end"]) for t in tasks)
        wall_s = (ended - started).total_seconds()
        log(f"c{workers}: {len(ids)} studies in {wall_s:.1f} s (polled {time.monotonic() - t0:.1f} s)")
        return {
            "worker_processes": workers,
            "studies": len(ids),
            "wall_s": round(wall_s, 2),
            "studies_per_hour": round(len(ids) * 3600 / wall_s, 1),
            "processes_with_model_loaded": run.models_loaded(),
            "lesions_per_study": [lesions(run, t) for t in tasks],
            **_task_times(tasks),
            "steps": _step_delta(before, run.steps()),
        }
    finally:
        run.close()


# --- (b) latency of one large follow-up ---------------------------------------------------------------------------


def latency(services: Services, large: PatientTruth, warm: PatientTruth) -> dict[str, Any]:
    run = Run(services, "latency", 1, redis_db=14)
    try:
        for p in (warm, large):
            seed(services.ehr.base_url, p.folder, time_points=1)
        run.wait_done(list(run.order([warm])), 600)  # the model is loaded, as in a running deployment
        watcher_log = run.start_watcher()
        before = run.steps()
        study_uid, files = study_files(large, -1)
        t_stow = time.monotonic()
        assert services.pacs.store(files, study_uid=study_uid).ok
        stored_at = dt.datetime.now(dt.UTC)
        stow_s = time.monotonic() - t_stow

        def task() -> dict[str, Any] | None:
            found = [t for t in run.tasks() if t["focus"]["identifier"]["value"] == f"urn:oid:{study_uid}"]
            if found and found[0]["status"] == "failed":
                raise RuntimeError(f"the Task failed: {found[0].get('statusReason')}")
            return found[0] if found and found[0]["status"] == "completed" else None

        done: dict[str, Any] = wait_for(task, 900, "the large follow-up's Task completed")
        created = instant(done["authoredOn"])
        start = instant(done["executionPeriod"]["start"])
        end = instant(done["executionPeriod"]["end"])
        steps = _step_delta(before, run.steps())
        task_to_draft_s = (end - created).total_seconds()
        accounted = sum(v["total_s"] for v in steps.values())
        return {
            "size_xyz": shape(files),
            "lesions_reported": lesions(run, done),
            "prior_size_xyz": shape(study_files(large, 0)[1]),
            "stow_s": round(stow_s, 2),
            "stow_end_to_task_s": round((created - stored_at).total_seconds(), 2),
            "task_to_draft_s": round(task_to_draft_s, 2),
            "stow_end_to_draft_s": round((end - stored_at).total_seconds(), 2),
            "first_step_wait_s": round((start - created).total_seconds(), 2),
            "steps": steps,
            "unaccounted_s": round(task_to_draft_s - accounted, 2),
            "orthanc_stable_age_s": services.orthanc.stable_age,
            "target_s": 30,
            "met": task_to_draft_s <= 30,
            "watcher_ordered": "Task/" in watcher_log.read_text(errors="replace"),
        }
    finally:
        run.close()


# --- main ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_services(work: Path) -> Iterator[Services]:
    with (
        orthanc_server() as orthanc,
        redis_server() as rds,
        postgres() as pg,
        fhir_standin() as ehr,
        DicomWebClient(orthanc.dicomweb_url, timeout=120, retries=2) as pacs,
    ):
        yield Services(orthanc, rds, pg, ehr, pacs, work)


def lesions(run: Run, task: dict[str, Any]) -> int:
    """How many lesions the report measured (its TumorSize Observations)."""
    ref = task["output"][0]["valueReference"]["reference"]
    report = run.store.read("DiagnosticReport", ref.split("/")[1]) or {}
    count = 0
    for result in report.get("result", []):
        obs = run.store.read("Observation", result["reference"].split("/")[1]) or {}
        count += any(c.get("code") == "21889-1" for c in obs.get("code", {}).get("coding", []))
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=4, help="follow-ups per throughput run (matrix 192)")
    ap.add_argument("--data", type=Path, default=HERE / "data", help="generated studies (kept between runs)")
    ap.add_argument("--out", type=Path, default=HERE / "result.json")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-latency", action="store_true")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    result: dict[str, Any] = {"machine": machine(), "date": dt.date.today().isoformat()}
    if (args.skip_throughput or args.skip_latency) and args.out.exists():  # keep the part not re-run
        before = json.loads(args.out.read_text())
        skipped = ("throughput", "throughput_ratio_2_vs_1") if args.skip_throughput else ("latency",)
        for key in skipped:
            if key in before:
                result[key] = before[key]
                result.setdefault("kept_from_earlier_run", {})[key] = before.get("date")
    small = cohort(args.data / f"m{SMALL.matrix}-s{SMALL.seed}", args.studies + 2, SMALL)
    warm, measured = small[:2], small[2:]
    large = None if args.skip_latency else cohort(args.data / f"m{LARGE.matrix}-s{LARGE.seed}", 1, LARGE)[0]
    work = Path(tempfile.mkdtemp(prefix="interval-bench-"))
    try:
        with running_services(work) as s:
            began = time.monotonic()
            for p in [*small, *([large] if large else [])]:
                for tp in range(
                    len(p.time_points) - (1 if p is large else 0)
                ):  # the large follow-up comes later
                    study_uid, files = study_files(p, tp)
                    assert s.pacs.store(files, study_uid=study_uid).ok
            log(f"studies stored into Orthanc in {time.monotonic() - began:.0f} s")
            time.sleep(
                s.orthanc.stable_age + 2
            )  # their StableStudy changes are history before a watcher starts
            if not args.skip_throughput:
                result["throughput"] = [throughput(s, measured, warm, k) for k in (1, 2)]
                one, two = (r["studies_per_hour"] for r in result["throughput"])
                result["throughput_ratio_2_vs_1"] = round(two / one, 2)
            if large is not None:
                result["latency"] = latency(s, large, warm[0])
                result["model_version"] = api_model_version(Settings())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
