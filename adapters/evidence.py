"""What a reader is shown as the evidence behind a stored analysis, rebuilt from its artifacts.

This module summarises a ``report.json`` for the pages (worklist urgency, the course of the target sum, where
a lesion's prior image is, each lesion's history) and re-exports the rest of the evidence API:

- ``adapters.evidence_images``: the key images and the course chart, drawn on the server as PNG.
- ``adapters.evidence_text``: each sentence's origin and check, the text diff, a DiagnosticReport's text.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapters.charts import CoursePoint
from adapters.evidence_images import course_png, key_slice_png, prior_slice_png
from adapters.evidence_text import (
    SentenceView,
    facts_from_report_json,
    raw_report_text,
    remove_lesion_sentences,
    report_text,
    sentence_views,
    set_report_text,
    text_diff,
)
from core.types import PriorTimePoint

__all__ = [
    "LesionHistory",
    "PriorLink",
    "SentenceView",
    "course_png",
    "course_points",
    "facts_from_report_json",
    "key_slice_png",
    "lesion_history",
    "prior_link",
    "prior_slice_png",
    "raw_report_text",
    "remove_lesion_sentences",
    "report_text",
    "sentence_views",
    "set_report_text",
    "text_diff",
    "urgency",
]

# --- the analysis summarised for the pages ----------------------------------------------------------

_URGENCY = {"PD": 0, "NE": 1, "SD": 2, "Non-CR/Non-PD": 2, "PR": 3, "CR": 4}


def urgency(analysis: dict[str, Any] | None) -> tuple[int, str]:
    """(rank, words) of a ``report.json`` for the worklist: progression and new lesions first (0), then not
    evaluable, stable, partial and complete response, baseline (5), no analysis record (6)."""
    if analysis is None:
        return 6, "no analysis record"
    recist = analysis.get("recist")
    if recist is None:
        return 5, "baseline"
    if recist.get("new_lesions"):
        n = len(recist["new_lesions"])
        return 0, f"new lesion{'s' if n > 1 else ''}: {recist.get('category_label')}"
    return _URGENCY.get(str(recist.get("category")), 5), str(recist.get("category_label"))


def course_points(analysis: dict[str, Any]) -> list[CoursePoint]:
    """The sum of target diameters at each time point of an analysis: its history, then itself."""
    points = [
        CoursePoint(dt.date.fromisoformat(h["study_date"]), h.get("target_sum_mm"), h.get("recist"))
        for h in analysis.get("history") or []
    ]
    recist = analysis.get("recist") or {}
    points.append(
        CoursePoint(
            dt.date.fromisoformat(analysis["study"]["study_date"]),
            recist.get("current_sum_mm"),
            recist.get("category"),
        )
    )
    return points


@dataclass(frozen=True)
class PriorLink:
    """Where a lesion's prior image is: the prior study's date and UID, and the alignment of that study to
    this one (``current_lps = prior_lps + shift``), when the analysis estimated it."""

    date: str | None
    study_uid: str | None
    shift_lps_mm: tuple[float, float, float] | None

    def to_prior(self, current_lps: Sequence[float]) -> tuple[float, float, float] | None:
        if self.shift_lps_mm is None:
            return None
        s = self.shift_lps_mm
        return (current_lps[0] - s[0], current_lps[1] - s[1], current_lps[2] - s[2])

    def to_current(self, prior_lps: Sequence[float]) -> tuple[float, float, float] | None:
        if self.shift_lps_mm is None:
            return None
        s = self.shift_lps_mm
        return (prior_lps[0] + s[0], prior_lps[1] + s[1], prior_lps[2] + s[2])


def prior_link(analysis: dict[str, Any], lesion: dict[str, Any]) -> PriorLink:
    """The prior study a lesion is compared with: its own prior measurement's, else (a new lesion) the latest
    prior study, where it would have been."""
    history = analysis.get("history") or []
    date = (lesion.get("prior") or {}).get("date") or (history[-1]["study_date"] if history else None)
    uid = next((h["study_uid"] for h in history if h["study_date"] == date), None)
    shift = (analysis.get("alignments", {}).get(uid) or {}).get("translation_lps_mm") if uid else None
    return PriorLink(date, uid, (float(shift[0]), float(shift[1]), float(shift[2])) if shift else None)


@dataclass(frozen=True)
class LesionHistory:
    dates: list[str]  # ISO dates, oldest first
    rows: list[tuple[dict[str, Any], dict[str, str]]]  # (report.json lesion, date -> size or state)
    others: list[tuple[str, dict[str, str]]]  # lesions of earlier studies not followed now: (label, sizes)


def _dims(long_mm: float, short_mm: float) -> str:
    return f"{long_mm:.0f} x {short_mm:.0f} mm"


def lesion_history(
    analysis: dict[str, Any],
    time_points: Sequence[PriorTimePoint] = (),
    rejected: frozenset[str] = frozenset(),
) -> LesionHistory:
    """Each lesion's size at every time point up to the analysed study: from ``time_points`` (the EHR's
    record, when read) and the analysis itself; a finding a radiologist rejected says so."""
    today = str(analysis["study"]["study_date"])
    sizes: dict[str, dict[str, str]] = {}
    names: dict[str, str] = {}
    dates = {today}
    for tp in time_points:
        day = tp.study_date.isoformat()
        if day > today:
            continue
        dates.add(day)
        for f in tp.findings:
            sizes.setdefault(f.track_id, {})[day] = _dims(f.long_axis_mm, f.short_axis_mm)
            names.setdefault(f.track_id, f.label or "?")
    rows = []
    for lesion in analysis.get("lesions", []):
        track = lesion["track_id"]
        row = sizes.setdefault(track, {})
        prior, current = lesion.get("prior"), lesion.get("current")
        if prior and prior.get("date"):
            row.setdefault(prior["date"], _dims(prior["long_axis_mm"], prior["short_axis_mm"]))
            dates.add(prior["date"])
        if track in rejected:
            row[today] = "rejected on review"
        elif current:
            row[today] = _dims(current["long_axis_mm"], current["short_axis_mm"])
        else:
            row[today] = str(lesion.get("status", "")).replace("_", " ")
        rows.append((lesion, row))
        names.pop(track, None)
    return LesionHistory(sorted(dates), rows, [(label, sizes[t]) for t, label in names.items()])
