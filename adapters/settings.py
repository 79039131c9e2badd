"""Interval's settings: one pydantic-settings class, read once at the edge and passed inward.

Environment variables use the prefix ``INTERVAL_`` (``INTERVAL_SEGMENTER_WEIGHTS=/path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.lesions import LesionFilter
from core.matching import GATE_MM
from core.pipeline import AnalysisSettings

__all__ = ["Settings"]

_DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights" / "segmenter.pt"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INTERVAL_", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    segmenter_weights: Path = _DEFAULT_WEIGHTS
    database_url: str = "sqlite:///interval.db"
    min_lesion_long_axis_mm: float = 5.0
    min_lesion_volume_ml: float = 0.1
    min_lesion_probability: float = 0.5
    match_gate_mm: float = GATE_MM
    new_lesion_min_mm: float = 10.0
    new_lesion_min_probability: float = 0.8
    irecist: bool = False
    remeasure_priors: bool = False

    @model_validator(mode="after")
    def _sane(self) -> Settings:
        if self.min_lesion_long_axis_mm < 0 or self.match_gate_mm <= 0:
            raise ValueError("lesion size floor must be >= 0 mm and the match gate > 0 mm")
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
            irecist=self.irecist,
            remeasure_priors=self.remeasure_priors,
        )
