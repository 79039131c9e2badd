"""The interfaces the pipeline needs from the outside world (implemented in adapters/ and models/).

Tests pass other objects that satisfy them; nothing is monkeypatched.
"""

from __future__ import annotations

import datetime as dt
from typing import Protocol

from core.grounding import VerifiedDraft
from core.oversight import AiSwitch
from core.report import ReportFacts
from core.types import PriorTimePoint, Segmentation, Volume

__all__ = ["AiSwitchReader", "ImageSource", "PriorStore", "ReportDrafter", "Segmenter"]


class ImageSource(Protocol):
    """Where CT studies come from (a folder, a PACS over DICOMweb)."""

    def load_study(self, ref: str) -> Volume:
        """The CT volume of study ``ref`` (a folder path or a StudyInstanceUID)."""
        ...

    def find_study(self, study_uid: str) -> Volume | None:
        """A prior study by StudyInstanceUID, or None when this source does not hold it."""
        ...


class PriorStore(Protocol):
    """The EHR's view of a patient's prior imaging findings."""

    def prior_time_points(self, patient_id: str, before: dt.date) -> list[PriorTimePoint]:
        """Prior studies dated strictly before ``before``, oldest first."""
        ...


class Segmenter(Protocol):
    """Organ + lesion segmentation of a CT volume."""

    @property
    def model_version(self) -> str: ...

    def segment(self, volume: Volume) -> Segmentation: ...


class ReportDrafter(Protocol):
    """Writes the report from the facts; returns it verified (``core.grounding.verify_draft``)."""

    @property
    def model_version(self) -> str: ...

    def draft(self, facts: ReportFacts) -> VerifiedDraft: ...


class AiSwitchReader(Protocol):
    """Where each site's AI switch is recorded (``core.oversight``; the database in production)."""

    def current(self, site: str) -> AiSwitch | None:
        """The site's latest switch setting, or None when none was ever recorded (AI is used)."""
        ...
