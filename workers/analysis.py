"""The analysis behind a FHIR ``Task``: image -> segmentation -> priors from the EHR -> RECIST -> publish.

``PipelineAnalyzer`` is the ``service.jobs.Analyzer`` the API's runner calls. It loads the segmenter once
(per process), reads the study from the image source by StudyInstanceUID, reads the patient's priors from
the EHR over FHIR (``EhrPriorStore``), runs ``core.pipeline.analyze_study`` and publishes the result to the
EHR as one transaction Bundle (``preliminary``, AI-asserted, with Provenance). It returns the Bundle for
Interval's own store: the same resources, with every lesion track created conditionally there too.

Errors are Interval's own (``core.errors``): a dead EHR raises ``ExternalServiceError`` after the client's
retries, so the Task ends ``failed`` with a reason and can be posted again; nothing is half-published
because the EHR receives a single transaction, and a repeat is absorbed by the conditional creates.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.artifacts import save_artifacts
from adapters.ehr_priors import EhrPriorStore
from adapters.fhir_client import FhirClient, RetryPolicy, SmartBackendAuth
from adapters.fhir_publish import publish_report, report_bundle
from adapters.prior_bundle import NoPriors
from adapters.telemetry import ANALYSES, log_context, observe_steps, timed
from core.errors import InputError, IntervalError
from core.pipeline import AnalysisSettings, StudyResult, analyze_study
from core.ports import ImageSource, Segmenter

if TYPE_CHECKING:
    from service.jobs import AnalysisRequest

__all__ = ["EhrConnection", "PipelineAnalyzer"]

log = logging.getLogger(__name__)

EHR_REPORT_SYSTEM = "http://interval.local/fhir/ehr-report"


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
    ) -> None:
        self.artifacts_dir = artifacts_dir
        self.images = images
        self.segmenter = segmenter
        self.ehr = ehr
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
        result = analyze_study(
            request.study_uid,
            images=self.images,
            priors=store,
            segmenter=self.segmenter,
            settings=self.settings,
        )
        if result.acquisition.study_uid != request.study_uid:
            raise InputError(
                "the image source returned a different study than the Task names", study_uid=request.study_uid
            )
        self.last_result = result
        observe_steps(result.step_seconds)
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
        return local

    async def _publish(self, bundle: dict[str, Any]) -> Any:
        assert self.ehr is not None
        async with self.ehr.client() as ehr:
            return await publish_report(ehr, bundle)
