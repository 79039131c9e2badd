"""Interval's API process: settings -> analyzer (model loaded once) -> FastAPI app.

``interval serve`` runs it with uvicorn; ``uvicorn workers.serve:app_from_env --factory`` does the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from adapters.fhir_client import RetryPolicy, SmartBackendAuth
from adapters.image_folder import FolderImageSource
from adapters.settings import Settings
from workers.analysis import EhrConnection, PipelineAnalyzer

if TYPE_CHECKING:
    from fastapi import FastAPI

    from core.ports import Segmenter

__all__ = ["app_from_env", "build_analyzer", "ehr_connection"]


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


def build_analyzer(settings: Settings, segmenter: Segmenter | None = None) -> PipelineAnalyzer:
    """The analysis behind every Task of this process; the segmentation model is loaded here, once."""
    if segmenter is None:
        import torch

        from models.segmentation.inference import MonaiSegmenter

        torch.set_num_threads(1)
        segmenter = MonaiSegmenter(settings.segmenter_weights)
    return PipelineAnalyzer(
        images=FolderImageSource(list(settings.image_roots)),
        segmenter=segmenter,
        ehr=ehr_connection(settings),
        settings=settings.analysis(),
        artifacts_dir=settings.artifacts_dir,
    )


def app_from_env() -> FastAPI:
    from service.app import create_app

    settings = Settings()
    return create_app(settings, analyzer=build_analyzer(settings))
