"""``PriorStore`` over a FHIR Bundle file (the embedded default; an EHR comes over FHIR HTTP)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from adapters.fhir_priors import load_priors
from core.types import PriorTimePoint

__all__ = ["BundlePriorStore", "NoPriors"]


class BundlePriorStore:
    """Reads and validates the Bundle on each call: a file may change between studies."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def prior_time_points(self, patient_id: str, before: dt.date) -> list[PriorTimePoint]:
        _, tps = load_priors(self.path, patient_id=patient_id)
        return [tp for tp in tps if tp.study_date < before]


class NoPriors:
    """No EHR configured: every study is a baseline."""

    def prior_time_points(self, patient_id: str, before: dt.date) -> list[PriorTimePoint]:
        return []
