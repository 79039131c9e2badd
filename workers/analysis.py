"""The analysis behind a FHIR ``Task``: image -> segmentation -> priors from the EHR -> RECIST -> publish.

``PipelineAnalyzer`` is the ``service.jobs.Analyzer`` the API's runner calls. It loads the segmenter once
(per process), reads the study from the image source by StudyInstanceUID, reads the patient's priors from
the EHR over FHIR (``EhrPriorStore``), runs ``core.pipeline.analyze_study`` and publishes the result to the
EHR as one transaction Bundle (``preliminary``, AI-asserted, with Provenance). With a PACS (``pacs``) it then
sends the lesions as a DICOM SEG and the measurements as a TID 1500 SR into the same study by STOW-RS
(``publish_to_pacs``). It returns the Bundle for Interval's own store: the same resources, with every lesion
track created conditionally there too.

Human oversight (``core.oversight``): the study is read first, and its site (the StationName, mapped by
``station_sites``) looked up in the AI switch (``switches``). When AI is switched off for that site nothing of
the AI runs: no segmentation, no measurement, no draft, nothing to the EHR or the PACS, no artifacts. The
analysis returns ``adapters.fhir_publish.ai_not_used_bundle`` (the ImagingStudy only) and the Task completes
"AI not used" (``service.jobs.complete_task``). The switch is read per study, so a change applies from the next
analysis on.

Errors are Interval's own (``core.errors``): a dead EHR or PACS raises ``ExternalServiceError`` after the
client's retries, so the Task ends ``failed`` with a reason (after the Celery step's own retries) and can be
posted again. A repeat publishes nothing twice: the EHR receives a single transaction whose conditional creates
absorb it, and the SEG and SR have SOP Instance UIDs derived from the series and the model version, so the PACS
keeps one instance of each however often they are sent.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.artifacts import save_artifacts
from adapters.dicom_series import DEFAULT_RULES, series_source_headers
from adapters.dicomweb import DicomWebClient, DicomWebImageSource, StowResult
from adapters.drift_recorder import DriftRecorder
from adapters.ehr_priors import EhrPriorStore
from adapters.fhir_client import FhirClient, RetryPolicy, SmartBackendAuth
from adapters.fhir_codes import PATIENT_ID_SYSTEM
from adapters.fhir_publish import EHR_REPORT_SYSTEM, ai_not_used_bundle, publish_report, report_bundle
from adapters.image_folder import FolderImageSource
from adapters.prior_bundle import NoPriors
from adapters.telemetry import ANALYSES, log_context, observe_steps, timed
from core.errors import AnalysisError, InputError, IntervalError
from core.oversight import AiDecision, decide_ai_use, site_of_station
from core.pipeline import AnalysisSettings, StudyResult, analyze_study
from core.ports import AiSwitchReader, ImageSource, ReportDrafter, Segmenter
from core.types import AcquisitionInfo, Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from service.jobs import AnalysisRequest

__all__ = ["EhrConnection", "PipelineAnalyzer", "publish_to_pacs", "source_headers"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EhrConnection:
    base_url: str
    auth: SmartBackendAuth | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    def client(self) -> FhirClient:
        return FhirClient(self.base_url, auth=self.auth, retry=self.retry)


class PipelineAnalyzer:
    def __init__(
        self,
        *,
        images: ImageSource,
        segmenter: Segmenter,
        ehr: EhrConnection | None,
        settings: AnalysisSettings | None = None,
        artifacts_dir: Path | None = None,
        drafter: ReportDrafter | None = None,
        pacs: DicomWebClient | None = None,
        switches: AiSwitchReader | None = None,
        station_sites: Mapping[str, str] | None = None,
        drift: DriftRecorder | None = None,
    ) -> None:
        self.drift = drift  # every result feeds the drift monitor; None: not monitored
        self.artifacts_dir = artifacts_dir
        self.switches = switches  # each site's AI switch; None: AI is used for every study
        self.station_sites = dict(station_sites or {})  # DICOM StationName -> site (as the web pages map it)
        self.drafter = drafter
        self.images = images
        self.segmenter = segmenter
        self.ehr = ehr
        self.pacs = pacs  # where the SEG and SR go (STOW-RS); None: nowhere
        self.settings = settings or AnalysisSettings()
        self.last_result: StudyResult | None = None

    @property
    def model_version(self) -> str:
        return self.segmenter.model_version

    def __call__(self, request: AnalysisRequest) -> dict[str, Any]:
        with log_context(task_id=request.task_id, study_uid=request.study_uid):
            try:
                bundle = self._analyze(request)
            except IntervalError as e:
                ANALYSES.labels("failed", e.reason).inc()
                log.warning("analysis failed (%s)", e.reason)
                raise
            except Exception:
                ANALYSES.labels("failed", "internal_error").inc()
                raise
            ANALYSES.labels("completed", "").inc()
            return bundle

    def _analyze(self, request: AnalysisRequest) -> dict[str, Any]:
        store: EhrPriorStore | NoPriors
        if self.ehr is not None:
            store = EhrPriorStore(
                self.ehr.base_url, auth=self.ehr.auth, retry=self.ehr.retry, patient_ref=request.patient_ref
            )
        else:
            store = NoPriors()
        started = time.perf_counter()
        volume = self.images.load_study(request.study_uid)
        load_s = time.perf_counter() - started
        acq = volume.acquisition
        if acq is None or acq.study_uid != request.study_uid:
            raise InputError(
                "the image source returned a different study than the Task names", study_uid=request.study_uid
            )
        decision = self.decide(acq)
        if not decision.ai_used:
            log.info("AI is switched off for the study's site: no segmentation, no draft")
            subject = (
                {"reference": request.patient_ref}
                if request.patient_ref
                else {"identifier": {"system": PATIENT_ID_SYSTEM, "value": request.patient_id}}
            )
            return ai_not_used_bundle(acq, subject, decision)
        result = analyze_study(
            request.study_uid,
            images=_Loaded(self.images, volume),
            priors=store,
            segmenter=self.segmenter,
            settings=self.settings,
            drafter=self.drafter,
        )
        self.last_result = result
        steps = {**result.step_seconds, "ingest": round(result.step_seconds.get("ingest", 0.0) + load_s, 3)}
        observe_steps(steps)
        if self.drift is not None:
            self.drift.record_result(result)
        log.info("steps: %s", ", ".join(f"{k} {v:.2f} s" for k, v in steps.items()))
        if self.artifacts_dir is not None:
            save_artifacts(result, self.artifacts_dir)
        issued = dt.datetime.now(dt.UTC).replace(microsecond=0)
        if isinstance(store, EhrPriorStore) and store.snapshot is not None and self.ehr is not None:
            snap = store.snapshot
            to_ehr = report_bundle(result, patient_ref=snap.patient_ref, tracks=snap.tracks, issued=issued)
            with timed("publish"):
                published = asyncio.run(self._publish(to_ehr))
            patient_ref = snap.patient_ref
            log.info(
                "task %s: published %d resources to the EHR (%d round trips for priors)",
                request.task_id,
                len(published.locations),
                snap.round_trips,
            )
            ehr_report: str | None = published.report_ref
        else:
            if request.patient_ref is None:
                raise InputError(
                    "no EHR is configured and the Task names no Patient reference; "
                    "set INTERVAL_EHR_BASE_URL or give Task.for a reference",
                    study_uid=request.study_uid,
                )
            patient_ref, ehr_report = request.patient_ref, None
        local = report_bundle(result, patient_ref=patient_ref, tracks={}, issued=issued)
        if ehr_report is not None:
            for entry in local["entry"]:
                if entry["resource"]["resourceType"] == "DiagnosticReport":
                    entry["resource"]["identifier"].append(
                        {
                            "system": EHR_REPORT_SYSTEM,
                            "value": f"{self.ehr.base_url if self.ehr else ''}/{ehr_report}",
                        }
                    )
        if self.pacs is not None:
            publish_to_pacs(result, self.images, self.pacs)
        return local

    def decide(self, acq: AcquisitionInfo) -> AiDecision:
        """Whether AI is used for a study with these acquisition facts: its site's switch (``core.oversight``)."""
        site = site_of_station(acq.station_name, self.station_sites)
        switch = self.switches.current(site) if self.switches is not None and site is not None else None
        return decide_ai_use(site, switch)

    async def _publish(self, bundle: dict[str, Any]) -> Any:
        assert self.ehr is not None
        async with self.ehr.client() as ehr:
            return await publish_report(ehr, bundle)


class _Loaded:
    """The image source, with the study already loaded (to read its site before any model runs) served from
    memory instead of being read a second time."""

    def __init__(self, images: ImageSource, volume: Volume) -> None:
        self._images = images
        self._volume = volume

    def load_study(self, ref: str) -> Volume:
        acq = self._volume.acquisition
        return self._volume if acq is not None and acq.study_uid == ref else self._images.load_study(ref)

    def find_study(self, study_uid: str) -> Volume | None:
        return self._images.find_study(study_uid)


def source_headers(images: ImageSource, result: StudyResult) -> list[Dataset]:
    """The headers (no pixels) of the series ``result`` was measured on, read from the folder the image source
    loaded it from: the study's folder in the DICOMweb cache, or the folder a ``FolderImageSource`` found."""
    acq = result.acquisition
    folder: Path | None = None
    if isinstance(images, DicomWebImageSource):
        folder = images.study_dir(acq.study_uid)
    elif isinstance(images, FolderImageSource):
        folder = images.folder_of(acq.study_uid, refresh=True)
    if folder is None or not folder.is_dir():
        raise AnalysisError(
            f"the images of study {acq.study_uid} are not in a folder of the image source "
            f"({type(images).__name__}); the SEG and SR need them as their source",
            study_uid=acq.study_uid,
        )
    rules = images.rules if isinstance(images, (DicomWebImageSource, FolderImageSource)) else DEFAULT_RULES
    headers = series_source_headers(folder, acq.series_uid, rules)
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in headers):
        raise AnalysisError(
            f"series {acq.series_uid} is enhanced multi-frame CT: the SEG and SR writers reference single-frame "
            "source images only",
            study_uid=acq.study_uid,
        )
    if len(headers) != result.volume_shape[0]:
        raise AnalysisError(
            f"series {acq.series_uid} has {len(headers)} image(s) in the study's folder, the analysis used "
            f"{result.volume_shape[0]}: the study changed since; post the Task again",
            study_uid=acq.study_uid,
        )
    return headers


def publish_to_pacs(result: StudyResult, images: ImageSource, pacs: DicomWebClient) -> StowResult:
    """Send the DICOM SEG (one segment per detected lesion, Tracking UID = the lesion's track) and the TID 1500
    SR (time point order = priors + 1) into the analysed study by STOW-RS; nothing when no lesion was detected
    (a SEG and a TID 1500 measurement report need at least one). Safe to repeat: both SOP Instance UIDs are
    derived from the series and the model version, and a PACS stores an instance it holds once (Orthanc keeps
    the first copy). ``ExternalServiceError`` when the PACS is unreachable after the client's retries."""
    from adapters.dicom_seg import write_lesion_seg  # highdicom: imported where it is used
    from adapters.dicom_sr import write_measurement_report

    acq = result.acquisition
    if not any(t.detected is not None for t in result.lesions):
        log.info("no lesion detected: no SEG or SR for the PACS")
        return StowResult((), (), ())
    order = len(result.prior_dates) + 1
    with tempfile.TemporaryDirectory(prefix="interval-dicom-") as tmp:
        with timed("pacs_outputs"):
            headers = source_headers(images, result)
            seg = write_lesion_seg(result, headers, Path(tmp) / "seg.dcm")
            sr = write_measurement_report(result, headers, Path(tmp) / "sr.dcm", time_point_order=order)
        with timed("publish_pacs"):
            stored = pacs.store([seg, sr], study_uid=acq.study_uid)
    log.info("sent the SEG and the SR (time point %d) to the PACS: %d instance(s)", order, len(stored.stored))
    return stored
