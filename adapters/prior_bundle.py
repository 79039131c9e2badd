"""``PriorStore`` over a FHIR Bundle file (the embedded default; an EHR comes over FHIR HTTP)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from adapters.fhir_priors import check_patient, load_priors
from core.types import PriorTimePoint

__all__ = ["BundlePriorStore", "NoPriors"]


class BundlePriorStore:
    """Reads and validates the Bundle once, again only if the file changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: tuple[tuple[int, int], str, list[PriorTimePoint]] | None = None

    def load(self) -> tuple[str, list[PriorTimePoint]]:
        """(patient id, time points); raises ``InvalidPriorsError`` for a Bundle that does not validate."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = (0, -1)  # missing file: load_priors raises the readable error
        if self._cache is None or self._cache[0] != stamp:
            pid, tps = load_priors(self.path)
            self._cache = (stamp, pid, tps)
        return self._cache[1], self._cache[2]

    def prior_time_points(self, patient_id: str, before: dt.date) -> list[PriorTimePoint]:
        pid, tps = self.load()
        check_patient(pid, patient_id)
        return [tp for tp in tps if tp.study_date < before]


class NoPriors:
    """No EHR configured: every study is a baseline."""

    def prior_time_points(self, patient_id: str, before: dt.date) -> list[PriorTimePoint]:
        return []
