"""Interval's settings: one pydantic-settings class, read once at the edge and passed inward.

Environment variables use the prefix ``INTERVAL_`` (``INTERVAL_SEGMENTER_WEIGHTS=/path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.lesions import LesionFilter
from core.pipeline import AnalysisSettings

__all__ = ["DEV_TOKEN_SECRET", "Settings"]

_LESIONS = LesionFilter()
_ANALYSIS = AnalysisSettings()
_DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights" / "segmenter.pt"
# Signs development tokens only; refused when ``environment`` is production.
DEV_TOKEN_SECRET = "interval-development-token-secret-not-for-production"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INTERVAL_", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    segmenter_weights: Path = _DEFAULT_WEIGHTS
    database_url: str = "sqlite:///interval.db"
    # defaults are the core's own, so that the CLI and a direct caller of analyze_study agree
    min_lesion_long_axis_mm: float = _LESIONS.min_long_axis_mm
    min_lesion_volume_ml: float = _LESIONS.min_volume_ml
    min_lesion_probability: float = _LESIONS.min_probability
    match_gate_mm: float = _ANALYSIS.gate_mm
    new_lesion_min_mm: float = _ANALYSIS.new_lesion_min_mm
    new_lesion_min_probability: float = _ANALYSIS.new_lesion_min_probability
    guided_search: bool = _ANALYSIS.guided_search
    retrospective_check: bool = _ANALYSIS.retrospective_check
    irecist: bool = _ANALYSIS.irecist
    remeasure_priors: bool = _ANALYSIS.remeasure_priors
    # FHIR API: bearer JWTs signed HS256 with the secret, or RS256/RS384 verified with the public key (PEM)
    api_token_secret: str = DEV_TOKEN_SECRET
    api_token_issuer: str = "interval"
    api_token_public_key: Path | None = None
    # the SMART token endpoint that issues those JWTs, advertised in the CapabilityStatement when set
    api_token_url: str | None = None
    public_base_url: str = "http://127.0.0.1:8000"
    # The EHR (FHIR R4) that holds the priors and receives the reports; unset: no priors, nothing published
    ehr_base_url: str | None = None
    # SMART Backend Services, when the EHR requires it: client id + private key (PEM) that signs the assertion
    ehr_client_id: str | None = None
    ehr_private_key: Path | None = None
    ehr_scope: str = "system/Patient.rs system/DiagnosticReport.crus system/Observation.crs system/ImagingStudy.crs system/BodyStructure.crs system/Condition.rs system/Device.crs system/Provenance.cr"
    ehr_token_url: str | None = None  # discovered from .well-known/smart-configuration when unset
    ehr_retry_attempts: int = 4
    ehr_backoff_s: float = 0.5
    ehr_timeout_s: float = 30.0
    # Where CT studies are found by StudyInstanceUID (until a PACS is configured): folders searched
    image_roots: list[Path] = []

    @model_validator(mode="after")
    def _sane(self) -> Settings:
        if self.min_lesion_long_axis_mm < 0 or self.match_gate_mm <= 0:
            raise ValueError("lesion size floor must be >= 0 mm and the match gate > 0 mm")
        if self.environment == "production" and self.api_token_secret == DEV_TOKEN_SECRET:
            raise ValueError(
                "INTERVAL_API_TOKEN_SECRET is the development default; set a random secret of at least "
                "32 characters in production"
            )
        if len(self.api_token_secret.encode()) < 32:
            raise ValueError("INTERVAL_API_TOKEN_SECRET must be at least 32 bytes (HS256 key length)")
        if self.api_token_public_key is not None and not self.api_token_public_key.is_file():
            raise ValueError(
                f"INTERVAL_API_TOKEN_PUBLIC_KEY {self.api_token_public_key} is not a file; "
                "give the path of a PEM public key or leave it unset"
            )
        if not self.public_base_url.startswith(("http://", "https://")):
            raise ValueError(
                "INTERVAL_PUBLIC_BASE_URL must be an http(s) URL such as https://interval.example.org"
            )
        self.public_base_url = self.public_base_url.rstrip("/")
        if (self.ehr_client_id is None) != (self.ehr_private_key is None):
            raise ValueError(
                "INTERVAL_EHR_CLIENT_ID and INTERVAL_EHR_PRIVATE_KEY go together (SMART Backend Services)"
            )
        if self.ehr_private_key is not None and not self.ehr_private_key.is_file():
            raise ValueError(f"INTERVAL_EHR_PRIVATE_KEY {self.ehr_private_key} is not a file")
        if self.ehr_retry_attempts < 1 or self.ehr_backoff_s < 0:
            raise ValueError("INTERVAL_EHR_RETRY_ATTEMPTS must be >= 1 and INTERVAL_EHR_BACKOFF_S >= 0")
        return self

    def analysis(self) -> AnalysisSettings:
        return AnalysisSettings(
            lesion_filter=LesionFilter(
                min_long_axis_mm=self.min_lesion_long_axis_mm,
                min_volume_ml=self.min_lesion_volume_ml,
                min_probability=self.min_lesion_probability,
            ),
            gate_mm=self.match_gate_mm,
            new_lesion_min_mm=self.new_lesion_min_mm,
            new_lesion_min_probability=self.new_lesion_min_probability,
            guided_search=self.guided_search,
            retrospective_check=self.retrospective_check,
            irecist=self.irecist,
            remeasure_priors=self.remeasure_priors,
        )
