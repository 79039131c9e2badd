"""Interval's API process: settings -> analyzer (model loaded once) -> FastAPI app.

``interval serve`` runs it with uvicorn; ``uvicorn workers.serve:app_from_env --factory`` does the same. The
Celery workers build their analyzer here too (``build_analyzer``): the same settings give the same image source
(a folder, or the PACS over DICOMweb when ``INTERVAL_PACS_DICOMWEB_URL`` is set), EHR and PACS outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapters.ai_switch import AiSwitchStore
from adapters.artifacts import ReusingSegmenter
from adapters.dicomweb import DicomWebClient, DicomWebImageSource
from adapters.drift_recorder import DriftRecorder
from adapters.fhir_client import RetryPolicy, SmartBackendAuth
from adapters.image_folder import FolderImageSource
from adapters.settings import Settings
from workers.analysis import EhrConnection, PipelineAnalyzer

if TYPE_CHECKING:
    from fastapi import FastAPI

    from core.ports import ImageSource, ReportDrafter, Segmenter

__all__ = ["app_from_env", "build_analyzer", "build_drafter", "ehr_connection", "image_source", "pacs_client"]


def ehr_connection(settings: Settings) -> EhrConnection | None:
    if settings.ehr_base_url is None:
        return None
    auth = None
    if settings.ehr_client_id is not None and settings.ehr_private_key is not None:
        auth = SmartBackendAuth.from_key_file(
            settings.ehr_client_id,
            settings.ehr_private_key,
            scope=settings.ehr_scope,
            token_url=settings.ehr_token_url,
        )
    retry = RetryPolicy(
        attempts=settings.ehr_retry_attempts,
        backoff_s=settings.ehr_backoff_s,
        read_timeout_s=settings.ehr_timeout_s,
    )
    return EhrConnection(settings.ehr_base_url, auth=auth, retry=retry)


def pacs_client(settings: Settings) -> DicomWebClient | None:
    """The PACS's DICOMweb client (retries and timeout as the EHR's), or None when no PACS is configured."""
    if settings.pacs_dicomweb_url is None:
        return None
    return DicomWebClient(
        settings.pacs_dicomweb_url,
        timeout=settings.ehr_timeout_s,
        retries=settings.ehr_retry_attempts - 1,
        backoff=settings.ehr_backoff_s,
    )


def image_source(settings: Settings, pacs: DicomWebClient | None) -> ImageSource:
    """Studies from the PACS (retrieved once into ``image_cache_dir``) when there is one, else from folders."""
    if pacs is not None:
        return DicomWebImageSource(pacs, settings.image_cache_dir, settings.series_rules())
    return FolderImageSource(list(settings.image_roots), settings.series_rules())


def build_analyzer(
    settings: Settings, segmenter: Segmenter | None = None, images: ImageSource | None = None
) -> PipelineAnalyzer:
    """The analysis behind every Task of this process; the segmentation model is loaded here, once. With a PACS
    the SEG and SR of each analysis go to it (unless ``pacs_publish_results`` is off). Each study's site is looked
    up in the AI switch of the shared database (``database_url``) before any model runs."""
    if segmenter is None:
        import torch

        from models.segmentation.calibration import calibrated_segmenter

        torch.set_num_threads(1)
        segmenter = ReusingSegmenter(calibrated_segmenter(settings), settings.artifacts_dir)
    pacs = images.client if isinstance(images, DicomWebImageSource) else pacs_client(settings)
    return PipelineAnalyzer(
        images=images if images is not None else image_source(settings, pacs),
        segmenter=segmenter,
        ehr=ehr_connection(settings),
        settings=settings.analysis(),
        artifacts_dir=settings.artifacts_dir,
        drafter=build_drafter(settings),
        pacs=pacs if settings.pacs_publish_results else None,
        switches=AiSwitchStore(settings.database_url),
        station_sites=settings.web_station_sites,
        drift=DriftRecorder.from_settings(settings) if settings.drift_monitor else None,
    )


def build_drafter(settings: Settings) -> ReportDrafter | None:
    if settings.report_drafter == "deterministic":
        return None
    from models.drafter.drafter import LlmDrafter

    return LlmDrafter(constrained=settings.report_drafter_constrained)


def app_from_env() -> FastAPI:
    """The API: with ``INTERVAL_PIPELINE=celery`` Tasks go to the workers (no model in this process),
    otherwise they are analysed in-process. Either way it shows and publishes the configured model's card."""
    settings = Settings()
    if settings.pipeline == "celery":
        from workers.celery_app import api_from_env

        return api_from_env()
    from models.segmentation.model_card import card_for_settings
    from service.app import create_app

    return create_app(settings, analyzer=build_analyzer(settings), model_card=card_for_settings(settings))
