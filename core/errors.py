"""The one exception tree of Interval.

::

    IntervalError
    ├── InputError                  the input cannot be used; the user can fix it
    │   ├── NoSeriesFoundError      a folder holds no usable CT series
    │   ├── UnreadableDicomError    files that are not DICOM or are truncated
    │   ├── InvalidVolumeError      slices that do not make a volume (gaps, tilt, mixed sizes)
    │   ├── InvalidPriorsError      a FHIR resource or Bundle that does not validate
    │   └── PatientMismatchError    priors that belong to another patient than the study
    ├── ExternalServiceError        EHR, PACS or broker unreachable (retryable)
    ├── ExternalRequestError        EHR or PACS refused a request (4xx: not retryable as is)
    ├── ConcurrentEditError         someone else changed the resource first (ETag / If-Match)
    ├── ModelError                  weights missing, unreadable or of the wrong shape
    ├── AnalysisError               a pipeline step failed on valid input (a bug or a limit)
    └── OversightError              a human-oversight rule refuses the action (core.oversight)
        └── FindingsNotReviewedError  signing before every AI finding was accepted or rejected

Every exception carries identifiers (study UID, task id, file names relative to the input folder),
never PHI or pixel data, so its message is safe to log and to show to a user. ``str(exc)`` is one
readable line: what was expected, what arrived, how to fix it.
"""

from __future__ import annotations

__all__ = [
    "AnalysisError",
    "ConcurrentEditError",
    "ExternalRequestError",
    "ExternalServiceError",
    "FindingsNotReviewedError",
    "InputError",
    "IntervalError",
    "InvalidPriorsError",
    "InvalidVolumeError",
    "ModelError",
    "NoSeriesFoundError",
    "OversightError",
    "PatientMismatchError",
    "UnreadableDicomError",
]


class IntervalError(Exception):
    """Root of Interval's errors. ``reason`` is a stable machine-readable code for job records."""

    reason = "interval_error"

    def __init__(self, message: str, *, study_uid: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.study_uid = study_uid

    def __str__(self) -> str:
        return self.message


class InputError(IntervalError):
    reason = "bad_input"


class NoSeriesFoundError(InputError):
    reason = "no_ct_series"


class UnreadableDicomError(InputError):
    reason = "unreadable_dicom"


class InvalidVolumeError(InputError):
    reason = "invalid_volume"


class InvalidPriorsError(InputError):
    reason = "invalid_priors"


class PatientMismatchError(InputError):
    reason = "patient_mismatch"


class ExternalServiceError(IntervalError):
    reason = "external_service"


class ExternalRequestError(IntervalError):
    reason = "external_request_rejected"


class ConcurrentEditError(IntervalError):
    reason = "version_conflict"


class ModelError(IntervalError):
    reason = "model_error"


class AnalysisError(IntervalError):
    reason = "analysis_error"


class OversightError(IntervalError):
    """A human-oversight rule (``core.oversight``) refuses what was asked; the message says what to do first."""

    reason = "oversight_rule"


class FindingsNotReviewedError(OversightError):
    """A signature was asked for before a radiologist accepted or rejected every AI finding of the report."""

    reason = "findings_not_reviewed"

    def __init__(self, report_id: str, pending: tuple[str, ...]) -> None:
        super().__init__(
            f"DiagnosticReport/{report_id} cannot be signed yet: accept or reject every AI finding first; "
            f"not reviewed: {', '.join(pending)}"
        )
        self.report_id = report_id
        self.pending = pending
