"""Human oversight rules (EU AI Act Art 14): the per-site AI switch, who may sign, explicit review of findings.

- **AI switch.** Each site has a switch, set by an admin with a reason. A study acquired at a site whose switch
  is off gets no AI output at all: no segmentation, no measurements, no drafted text. Its analysis ends in the
  explicit state "AI not used" (``AiDecision``). A site without a recorded switch, and a study without a site
  (no StationName), use AI: the switch is the exception an admin sets, not a default to configure.
- **Sign-off.** A report becomes ``final`` (or ``amended``, ``corrected``, ``appended``) only through a
  radiologist's signature, and a signed report is changed only that way (``changes_signature``).
- **Explicit review.** Every AI finding of a report is accepted or rejected by a radiologist before the report is
  signed (``check_review_complete``): silence is not acceptance.

The rules are plain functions of plain values: the service and the workers gather the values (the switch from
the database, verdicts from the review records) and ask.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from core.errors import FindingsNotReviewedError

__all__ = [
    "MAX_REASON_CHARS",
    "REVIEWED",
    "SIGNED_STATUSES",
    "AiDecision",
    "AiSwitch",
    "changes_signature",
    "check_review_complete",
    "decide_ai_use",
    "pending_findings",
    "site_of_station",
]

SIGNED_STATUSES = frozenset({"final", "amended", "corrected", "appended"})  # DiagnosticReport.status
REVIEWED = frozenset({"accepted", "rejected"})  # a radiologist's explicit verdicts on one AI finding
MAX_REASON_CHARS = 500
_MAX_SITE_CHARS = 64


@dataclass(frozen=True, slots=True)
class AiSwitch:
    """One recorded setting of a site's AI switch: who set it, when (naive UTC) and why."""

    site: str
    ai_enabled: bool
    changed_by: str  # the admin's user name
    changed_at: dt.datetime
    reason: str
    change_id: int = 0  # the record's number in the switch history (0: not stored yet)

    def __post_init__(self) -> None:
        if not self.site.strip() or len(self.site) > _MAX_SITE_CHARS or not self.site.isprintable():
            raise ValueError(f"a site is 1-{_MAX_SITE_CHARS} printable characters")
        if self.site == "*":
            raise ValueError("the AI switch is set per site; '*' (every site) is not a site")
        if not self.changed_by:
            raise ValueError("a switch change names the admin who made it")
        if not self.reason.strip():
            raise ValueError("a switch change needs a reason (why AI is switched on or off)")
        if len(self.reason) > MAX_REASON_CHARS:
            raise ValueError(f"the reason is limited to {MAX_REASON_CHARS} characters")
        if self.changed_at.tzinfo is not None:
            raise ValueError("changed_at is naive UTC")


@dataclass(frozen=True, slots=True)
class AiDecision:
    """Whether AI is used for one study, and the switch setting that decided it (None: no setting recorded)."""

    site: str | None
    ai_used: bool
    switch: AiSwitch | None

    def explanation(self) -> str:
        """One line for the Task and the worklist; names the site and the time, never a patient."""
        if self.ai_used:
            return "AI used"
        assert self.switch is not None
        return (
            f"AI not used: AI is switched off for site {self.site} "
            f"(since {self.switch.changed_at:%Y-%m-%d %H:%M} UTC); read this study without AI"
        )


def site_of_station(station: str | None, station_sites: Mapping[str, str]) -> str | None:
    """The site of a study from its recorded station (DICOM StationName): mapped by ``station_sites``, an
    unmapped station is its own site, no station means no site."""
    if not station:
        return None
    return station_sites.get(station, station)


def decide_ai_use(site: str | None, switch: AiSwitch | None) -> AiDecision:
    """The decision for a study of ``site`` given that site's current switch setting (None: never set)."""
    if switch is not None and switch.site != site:
        raise ValueError(f"the switch of site {switch.site} was given for a study of site {site}")
    return AiDecision(site, switch is None or switch.ai_enabled, switch)


def changes_signature(old_status: str, new_status: str) -> bool:
    """Whether changing a report from ``old_status`` to ``new_status`` signs it or changes a signed report,
    which only a radiologist may do."""
    return new_status in SIGNED_STATUSES or old_status in SIGNED_STATUSES


def pending_findings(findings: Mapping[str, str], verdicts: Mapping[str, str]) -> list[str]:
    """Labels of the AI findings (track id -> label, in report order) that have no explicit verdict yet
    (``verdicts``: track id -> the latest decision)."""
    return [label for track, label in findings.items() if verdicts.get(track) not in REVIEWED]


def check_review_complete(report_id: str, findings: Mapping[str, str], verdicts: Mapping[str, str]) -> None:
    """Refuse (``FindingsNotReviewedError``, listing them) to sign a report whose AI findings are not all
    accepted or rejected."""
    pending = pending_findings(findings, verdicts)
    if pending:
        raise FindingsNotReviewedError(report_id, tuple(pending))
