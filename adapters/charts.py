"""The course of disease as a chart (PNG and SVG, matplotlib): sum of target diameters over time
with the RECIST 1.1 thresholds and the nadir marked."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.dates as mdates
import matplotlib.pyplot as plt

from core.recist import PD_ABSOLUTE_MM, PD_INCREASE, PR_DECREASE

__all__ = ["CoursePoint", "draw_course"]


@dataclass(frozen=True, slots=True)
class CoursePoint:
    study_date: dt.date
    target_sum_mm: float | None
    category: str | None  # None at baseline


def draw_course(
    points: Sequence[CoursePoint], out_stem: Path, title: str = "Sum of target diameters"
) -> list[Path]:
    """Write ``out_stem``.png and .svg; returns their paths. The PD line at each time point is the
    threshold that applied there: max(nadir x 1.2, nadir + 5 mm) over the earlier time points."""
    pts = [p for p in points if p.target_sum_mm is not None]
    if not pts:
        return []
    dates = mdates.date2num([p.study_date for p in pts])  # type: ignore[no-untyped-call]
    sums = [float(p.target_sum_mm or 0.0) for p in pts]
    baseline = sums[0]
    fig, ax = plt.subplots(figsize=(7.5, 4.0), dpi=110)
    ax.plot(dates, sums, marker="o", color="#1f4e79", lw=2, label="sum of target diameters")
    for d, s, pt in zip(dates, sums, pts, strict=True):
        ax.annotate(
            f"{s:.0f} mm" + (f"\n{pt.category}" if pt.category else "\nbaseline"),
            (d, s),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
        )
    ax.axhline(
        baseline * (1 - PR_DECREASE),
        color="#2e7d32",
        ls="--",
        lw=1,
        label=f"PR threshold ({baseline * (1 - PR_DECREASE):.0f} mm, -30% of baseline)",
    )
    if len(pts) > 1:
        pd_dates: list[float] = []
        pd_vals: list[float] = []
        for i in range(1, len(pts)):
            nadir = min(sums[:i])
            pd_dates.append(float(dates[i]))
            pd_vals.append(max(nadir * (1 + PD_INCREASE), nadir + PD_ABSOLUTE_MM))
        ax.step(
            pd_dates,
            pd_vals,
            where="mid",
            color="#c62828",
            ls="--",
            lw=1,
            label="PD threshold (+20% and +5 mm over nadir)",
        )
    i_nadir = min(range(len(sums)), key=lambda i: (sums[i], -i))
    ax.scatter(
        [dates[i_nadir]],
        [sums[i_nadir]],
        s=140,
        facecolors="none",
        edgecolors="#ef6c00",
        lw=2,
        label=f"nadir ({sums[i_nadir]:.0f} mm)",
        zorder=5,
    )
    ax.set_ylabel("mm")
    ax.set_title(title)
    ax.set_ylim(0, max([*sums, baseline * 1.3]) * 1.25)
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))  # type: ignore[no-untyped-call]
    fig.autofmt_xdate()
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".svg")]
    for path in paths:
        fig.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(fig)
    return paths
