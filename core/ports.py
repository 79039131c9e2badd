"""The interfaces the pipeline needs from the outside world (implemented in adapters/ and models/).

Tests pass other objects that satisfy them; nothing is monkeypatched.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from core.grounding import VerifiedDraft
from core.oversight import AiSwitch
from core.report import ReportFacts
from core.types import BoxKji, PriorTimePoint, Segmentation, Volume

__all__ = ["AiSwitchReader", "AugmentingSegmenter", "ImageSource", "PriorStore", "ReportDrafter", "Segmenter"]


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


@runtime_checkable
class AugmentingSegmenter(Protocol):
    """A segmenter that can also show how its result changes under test-time augmentation."""

    @property
    def augmentations(self) -> tuple[str, ...]:
        """Names of the augmentations ``augmented_views`` returns, in order (empty: none configured)."""
        ...

    def augmented_views(self, volume: Volume, boxes_kji: Sequence[BoxKji]) -> list[list[Segmentation]]:
        """For each box of the volume, the segmentation inside it (box-shaped arrays) under each augmentation
        (input transformed, output transformed back), in ``augmentations`` order."""
        ...


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
