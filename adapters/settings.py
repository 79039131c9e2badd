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

__all__ = ["Settings"]

_LESIONS = LesionFilter()
_ANALYSIS = AnalysisSettings()
_DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "weights" / "segmenter.pt"


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
            guided_search=self.guided_search,
            retrospective_check=self.retrospective_check,
            irecist=self.irecist,
            remeasure_priors=self.remeasure_priors,
        )
