"""A report's sentences as the draft editor shows them, and a DiagnosticReport's text in FHIR.

- Each sentence's origin: the analysis' wording (deterministic, or model text when a language model drafted
  it and recorded per-sentence origins), replaced or added by the verifier, or edited by a person.
- Each sentence's check: every sentence, whoever wrote it, checked against the measurements with
  ``core.grounding.verify_draft`` on report facts rebuilt from ``report.json``.
- What a person changed (a sentence-by-sentence diff) and what rejecting a finding removes.
- The text read from and written into ``presentedForm`` (as ``adapters.fhir_publish`` writes it).
"""

from __future__ import annotations

import base64
import datetime as dt
import difflib
import re
from dataclasses import dataclass
from typing import Any

from core.grounding import Origin, split_sentences, verify_draft
from core.recist import NonTargetResponse, RecistResult, Response
from core.report import Change, LesionFact, ReportFacts, ReportText
from core.types import Organ, RecistRole

__all__ = [
    "ORIGIN_LABELS",
    "SentenceView",
    "facts_from_report_json",
    "raw_report_text",
    "remove_lesion_sentences",
    "report_text",
    "sentence_views",
    "set_report_text",
    "text_diff",
]

# --- the report's sentences -------------------------------------------------------------------------


def facts_from_report_json(report: dict[str, Any], exclude: frozenset[str] = frozenset()) -> ReportFacts:
    """The ``ReportFacts`` a ``report.json`` was worded from (without splits/merges notes and iRECIST),
    leaving out the lesions (track ids) in ``exclude``; ``KeyError``/``ValueError`` when it is malformed."""
    lesions = []
    for item in report["lesions"]:
        if item["track_id"] in exclude:
            continue
        cur, prior = item.get("current"), item.get("prior")
        absent = 0.0 if item.get("status") == "absent" else None
        lesions.append(
            LesionFact(
                track_id=item["track_id"],
                label=item.get("label") or "",
                organ=Organ(item["organ"]),
                laterality=item.get("laterality"),
                role=RecistRole(item["recist_role"]) if item.get("recist_role") else None,
                change=Change(item["change"]),
                long_axis_mm=cur["long_axis_mm"] if cur else absent,
                short_axis_mm=cur["short_axis_mm"] if cur else absent,
                prior_long_axis_mm=prior["long_axis_mm"] if prior else None,
                prior_short_axis_mm=prior["short_axis_mm"] if prior else None,
                prior_date=dt.date.fromisoformat(prior["date"]) if prior and prior.get("date") else None,
                confidence=cur.get("probability") if cur else None,
                equivocal=bool(item.get("equivocal")),
                guided=bool(item.get("guided")),
            )
        )
    r = report.get("recist")
    recist = None
    if r is not None:
        recist = RecistResult(
            category=Response(r["category"]),
            target_response=Response(r["target_response"]) if r.get("target_response") else None,
            non_target_response=NonTargetResponse(r["non_target_response"]),
            baseline_sum_mm=float(r["baseline_sum_mm"] or 0.0),
            nadir_sum_mm=float(r["nadir_sum_mm"] or 0.0),
            current_sum_mm=r.get("current_sum_mm"),
            change_from_baseline_pct=r.get("change_from_baseline_pct"),
            change_from_nadir_pct=r.get("change_from_nadir_pct"),
            change_from_nadir_mm=r.get("change_from_nadir_mm"),
            new_lesions=tuple(r.get("new_lesions") or ()),
            trace=tuple(r.get("trace") or ()),
        )
    study = report["study"]
    return ReportFacts(
        study_date=dt.date.fromisoformat(study["study_date"]),
        study_uid=study["study_uid"],
        comparison_dates=tuple(
            sorted((dt.date.fromisoformat(d) for d in report["prior_dates"]), reverse=True)
        ),
        lesions=tuple(lesions),
        recist=recist,
    )


ORIGIN_LABELS = {
    "deterministic": "deterministic wording",
    "model": "model text",
    "replaced": "replaced by the verifier",
    "added": "added by the verifier",
    "edited": "edited by a radiologist",
}


@dataclass(frozen=True)
class SentenceView:
    """One sentence of a report as the editor shows it."""

    section: str
    text: str
    origin: str  # a key of ORIGIN_LABELS
    problems: tuple[str, ...] = ()  # where it disagrees with the measurements
    drafted: str = ""  # for a replaced sentence: what the model had written

    @property
    def origin_label(self) -> str:
        return ORIGIN_LABELS[self.origin]


def sentence_views(
    current: ReportText,
    draft: ReportText,
    report: dict[str, Any] | None,
    exclude: frozenset[str] = frozenset(),
) -> tuple[list[SentenceView], list[str]]:
    """Each sentence of ``current`` with its origin and its check; plus what the report omits.

    Origins: the per-sentence record a language-model drafter stored (``draft.json`` beside ``report.json``,
    given here as ``report["report"]["sentences"]``: section, text, origin ``model``/``replaced``/``added``,
    drafted, problems) when there is one; else a
    sentence of the analysis' ``draft`` is ``deterministic`` (or ``model`` when ``report.author`` names a
    model); anything else is ``edited``. Every sentence is then checked against the facts rebuilt from
    ``report`` (lesions in ``exclude``, the rejected findings, left out).
    """
    meta = (report or {}).get("report") or {}
    author = str(meta.get("author") or "deterministic")
    recorded = {
        (str(s.get("section")), str(s.get("text"))): s
        for s in meta.get("sentences") or []
        if isinstance(s, dict)
    }
    drafted = {
        (section, s)
        for section in ("comparison", "findings", "impression")
        for s in split_sentences(getattr(draft, section))
    }
    problems: dict[str, tuple[str, ...]] = {}
    omissions: list[str] = [
        f'removed by the verifier: the model wrote "{s.get("drafted")}" ({"; ".join(map(str, s.get("problems") or []))})'
        for s in meta.get("sentences") or []
        if isinstance(s, dict) and s.get("origin") == "removed" and s.get("drafted")
    ]
    if report is not None:
        try:
            facts = facts_from_report_json(report, exclude)
        except (KeyError, ValueError, TypeError):
            facts = None
            omissions.append("the analysis record could not be read: sentences are not checked")
        if facts is not None:
            verified = verify_draft(current, facts)
            for check in verified.sentences:
                if check.origin in (Origin.REPLACED, Origin.REMOVED):
                    problems[check.drafted] = check.problems
                elif check.origin is Origin.ADDED:
                    omissions.extend(check.problems)
    views: list[SentenceView] = []
    for section in ("comparison", "findings", "impression"):
        for sentence in split_sentences(getattr(current, section)):
            record = recorded.get((section, sentence))
            if record is not None and str(record.get("origin")) in ORIGIN_LABELS:
                origin = str(record["origin"])
                views.append(
                    SentenceView(
                        section,
                        sentence,
                        origin,
                        tuple(str(p) for p in record.get("problems") or ()) or problems.get(sentence, ()),
                        str(record.get("drafted") or ""),
                    )
                )
                continue
            if (section, sentence) in drafted:
                origin = "deterministic" if author == "deterministic" else "model"
            else:
                origin = "edited"
            views.append(SentenceView(section, sentence, origin, problems.get(sentence, ())))
    return views, omissions


def remove_lesion_sentences(text: ReportText, label: str) -> tuple[ReportText, list[str]]:
    """``text`` without the sentences about lesion ``label`` alone; returns the sentences that name it
    together with other lesions (kept: a person has to reword them)."""
    if not label:
        return text, []
    pattern = re.compile(rf"\b{re.escape(label)}\b")
    other = re.compile(r"\b[LN]\d{1,3}\b")
    kept_mixed: list[str] = []
    parts: dict[str, str] = {}
    for section in ("comparison", "findings", "impression"):
        keep = []
        for sentence in split_sentences(getattr(text, section)):
            if pattern.search(sentence):
                if any(m != label for m in other.findall(sentence)):
                    kept_mixed.append(sentence)
                    keep.append(sentence)
                continue
            keep.append(sentence)
        parts[section] = " ".join(keep)
    return ReportText(parts["comparison"], parts["findings"], parts["impression"]), kept_mixed


def text_diff(draft: ReportText, signed: ReportText) -> str:
    """Unified diff, one sentence per line, of what a person changed in the analysis' draft."""

    def lines(text: ReportText) -> list[str]:
        out = []
        for section in ("comparison", "findings", "impression"):
            out.append(f"{section.upper()}:")
            out += [f"  {s}" for s in split_sentences(getattr(text, section))]
        return out

    return "\n".join(difflib.unified_diff(lines(draft), lines(signed), "draft", "signed", lineterm="", n=1))


# --- the report's text in FHIR ---------------------------------------------------------------------


def raw_report_text(resource: dict[str, Any]) -> str:
    """A DiagnosticReport's text as written (its first ``presentedForm`` with data), else its conclusion."""
    for form in resource.get("presentedForm") or []:
        data = form.get("data")
        if isinstance(data, str) and data:
            try:
                return base64.b64decode(data).decode("utf-8", errors="replace")
            except ValueError:
                continue
    return str(resource.get("conclusion") or "")


def report_text(resource: dict[str, Any]) -> ReportText:
    """A DiagnosticReport's text in sections (as ``adapters.fhir_publish`` writes it); a text without section
    headings is its impression."""
    raw = raw_report_text(resource)
    text = ReportText.from_text(raw)
    return text if text != ReportText("", "", "") else ReportText("", "", raw.strip())


def set_report_text(resource: dict[str, Any], text: ReportText, when: str) -> None:
    """Write ``text`` into a DiagnosticReport: ``presentedForm`` (plain text with headings) and ``conclusion``."""
    resource["conclusion"] = text.impression
    resource["presentedForm"] = [
        {
            "contentType": "text/plain; charset=utf-8",
            "language": "en",
            "data": base64.b64encode(text.as_text().encode()).decode(),
            "title": "Radiology report",
            "creation": when,
        }
    ]
