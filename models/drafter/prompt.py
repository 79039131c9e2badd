"""What the language model reads (the facts, compactly) and how its answer is read back into sections."""

from __future__ import annotations

from core.report import Change, LesionFact, ReportFacts, ReportText, lesion_site

__all__ = ["SYSTEM", "facts_prompt", "parse_sections"]

SYSTEM = (
    "You are a radiology reporting assistant. Write the report of a follow-up CT with three sections, "
    "COMPARISON, FINDINGS and IMPRESSION, using only the facts given. Copy every measurement and date "
    "exactly. Mention every new lesion and the RECIST 1.1 category."
)


def _dims(a: float | None, b: float | None) -> str:
    return f"{round(a or 0):d} x {round(b or 0):d} mm"


def _lesion_line(f: LesionFact) -> str:
    site = lesion_site(f.organ, f.laterality)
    role = f.role.value if f.role else "unassigned"
    parts = [f"{f.label}", site, role, f.change.value]
    if f.change is not Change.RESOLVED and f.long_axis_mm is not None:
        parts.append(f"now {_dims(f.long_axis_mm, f.short_axis_mm)}")
    if f.prior_long_axis_mm is not None:
        when = f" on {f.prior_date.isoformat()}" if f.prior_date else ""
        parts.append(f"prior {_dims(f.prior_long_axis_mm, f.prior_short_axis_mm)}{when}")
    if f.equivocal:
        parts.append("equivocal (too small or uncertain to call progression)")
    return "- " + " | ".join(parts)


def facts_prompt(facts: ReportFacts) -> str:
    lines = [f"Study date: {facts.study_date.isoformat()}."]
    lines.append("Comparison: " + (", ".join(d.isoformat() for d in facts.comparison_dates) or "none") + ".")
    lines.append("Lesions:")
    lines += [_lesion_line(f) for f in sorted(facts.lesions, key=lambda f: f.label)] or ["- none"]
    r = facts.recist
    if r is None:
        lines.append("RECIST 1.1: baseline study.")
    else:
        new = [f.label for f in facts.lesions if f.change is Change.NEW and not f.equivocal]
        sums = ""
        if r.current_sum_mm is not None and r.change_from_baseline_pct is not None and r.baseline_sum_mm > 0:
            sums = (
                f" Target sum {round(r.current_sum_mm):d} mm, {r.change_from_baseline_pct:+.0f}% from baseline "
                f"{round(r.baseline_sum_mm):d} mm, nadir {round(r.nadir_sum_mm):d} mm."
            )
        lines.append(
            f"RECIST 1.1: {r.category.value} ({r.category.label})."
            + sums
            + (f" New lesions: {', '.join(new)}." if new else " New lesions: none.")
        )
    if facts.prior_impression:
        prior = " ".join(facts.prior_impression.split())[:400]
        lines.append(f"Prior report: {prior}")
    return "\n".join(lines)


def parse_sections(text: str) -> ReportText:
    """The model's answer as sections; a missing heading leaves that section empty."""
    return ReportText.from_text(text.replace("**", "").strip())
