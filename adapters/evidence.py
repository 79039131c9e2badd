"""What a reader is shown as the evidence behind a stored analysis, rebuilt from its artifacts.

- **Key images** (PNG, drawn on the server with numpy + matplotlib): the lesion's key axial slice (the
  slice of its RECIST long axis) from the study's own volume, windowed for the organ, with the lesion's
  contour from the saved label map (``adapters.artifacts``), its long axis, and the saliency map as an
  overlay when the analysis saved one; the matched prior slice, found through the prior lesion's centroid
  in the prior study's own frame, marked with a circle of the prior long axis. Images are shown in the
  radiological convention: patient's right on the image's left, anterior up.
- **The course chart** (``adapters.charts.draw_course``) as PNG bytes.
- **Each sentence's origin and check**: which sentences are the analysis' wording (deterministic, or model
  text when a language model drafted them and recorded per-sentence origins), which a verifier replaced or
  added, which a person edited; and every sentence, whoever wrote it, checked against the measurements with
  ``core.grounding.verify_draft`` on report facts rebuilt from ``report.json``.
"""

from __future__ import annotations

import base64
import datetime as dt
import difflib
import io
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import numpy as np
import numpy.typing as npt
from matplotlib import colormaps
from scipy import ndimage

from adapters.charts import CoursePoint, draw_course
from core.grounding import Origin, split_sentences, verify_draft
from core.recist import NonTargetResponse, RecistResult, Response
from core.report import Change, LesionFact, ReportFacts, ReportText
from core.types import LabelId, Organ, PriorTimePoint, RecistRole, Volume

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

Window = tuple[float, float]  # (centre, width) in HU
_WINDOWS: dict[str, Window] = {"lung": (-600.0, 1500.0), "default": (40.0, 400.0)}
_CONTOUR = (255, 214, 0)
_AXIS = (0, 220, 255)
_PRIOR = (255, 120, 0)
FULL_PX = 384
THUMB_PX = 112
THUMB_HALF_MM = 40.0
FULL_HALF_MM = 75.0  # the key image shows 15 cm around the lesion: its surroundings, at a readable size


def _window(organ: str) -> Window:
    return _WINDOWS.get(organ, _WINDOWS["default"])


def _gray(hu: npt.NDArray[Any], window: Window) -> npt.NDArray[np.float64]:
    centre, width = window
    return np.clip((hu.astype(np.float64) - (centre - width / 2)) / width, 0.0, 1.0)


def _flips(direction: Sequence[Sequence[float]]) -> tuple[bool, bool]:
    """(flip rows, flip columns) that bring an axis-aligned axial slice to anterior-up, patient-right-left."""
    d = np.asarray(direction, dtype=float)
    return bool(d[1, 1] < 0), bool(d[0, 0] < 0)


@dataclass(frozen=True)
class _Canvas:
    """A slice resampled to square display pixels; ``scale`` display px per voxel along (j, i)."""

    rgb: npt.NDArray[np.uint8]
    scale_ji: tuple[float, float]
    offset_ji: tuple[int, int]  # voxel (j, i) of the canvas' top-left corner (after cropping)
    flips: tuple[bool, bool]
    shape_ji: tuple[int, int]  # the cropped slice's shape in voxels

    def to_px(self, j: float, i: float) -> tuple[float, float]:
        jj, ii = j - self.offset_ji[0], i - self.offset_ji[1]
        if self.flips[0]:
            jj = self.shape_ji[0] - 1 - jj
        if self.flips[1]:
            ii = self.shape_ji[1] - 1 - ii
        return (jj + 0.5) * self.scale_ji[0] - 0.5, (ii + 0.5) * self.scale_ji[1] - 0.5


def _crop_box(
    shape_ji: tuple[int, int], spacing_ji: tuple[float, float], centre_ji: tuple[float, float], half_mm: float
) -> tuple[slice, slice]:
    out = []
    for axis in range(2):
        half = max(round(half_mm / spacing_ji[axis]), 4)
        lo = round(centre_ji[axis]) - half
        lo = min(max(lo, 0), max(shape_ji[axis] - 2 * half, 0))
        out.append(slice(lo, min(lo + 2 * half, shape_ji[axis])))
    return out[0], out[1]


def _canvas(
    hu: npt.NDArray[Any],
    spacing_ji: tuple[float, float],
    window: Window,
    direction: Sequence[Sequence[float]],
    out_px: int,
    box: tuple[slice, slice] | None,
) -> tuple[_Canvas, tuple[slice, slice]]:
    box = box or (slice(0, hu.shape[0]), slice(0, hu.shape[1]))
    part = hu[box]
    flips = _flips(direction)
    gray = _gray(part, window)
    if flips[0]:
        gray = gray[::-1]
    if flips[1]:
        gray = gray[:, ::-1]
    extent_mm = (part.shape[0] * spacing_ji[0], part.shape[1] * spacing_ji[1])
    px_per_mm = out_px / max(extent_mm)
    zoom = (spacing_ji[0] * px_per_mm, spacing_ji[1] * px_per_mm)
    big = ndimage.zoom(gray, zoom, order=1, grid_mode=True, mode="nearest")
    rgb = np.repeat((big * 255).astype(np.uint8)[..., None], 3, axis=2)
    scale = (big.shape[0] / part.shape[0], big.shape[1] / part.shape[1])
    offset = (box[0].start or 0, box[1].start or 0)
    return _Canvas(rgb, scale, offset, flips, (part.shape[0], part.shape[1])), box


def _mask_on(canvas: _Canvas, mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    m = mask[::-1] if canvas.flips[0] else mask
    m = m[:, ::-1] if canvas.flips[1] else m
    big: npt.NDArray[np.bool_] = (
        ndimage.zoom(m.astype(np.uint8), canvas.scale_ji, order=0, grid_mode=True, mode="nearest") > 0
    )
    h, w = canvas.rgb.shape[:2]
    out = np.zeros((h, w), dtype=bool)
    out[: min(h, big.shape[0]), : min(w, big.shape[1])] = big[:h, :w]
    return out


def _paint(canvas: _Canvas, where: npt.NDArray[np.bool_], colour: tuple[int, int, int]) -> None:
    canvas.rgb[where] = colour


def _draw_contour(canvas: _Canvas, mask: npt.NDArray[np.bool_], colour: tuple[int, int, int]) -> None:
    big = _mask_on(canvas, mask)
    edge = big & ~ndimage.binary_erosion(big, iterations=2)
    _paint(canvas, edge, colour)


def _draw_line(canvas: _Canvas, a_ji: tuple[float, float], b_ji: tuple[float, float]) -> None:
    (y0, x0), (y1, x1) = canvas.to_px(*a_ji), canvas.to_px(*b_ji)
    n = int(max(abs(y1 - y0), abs(x1 - x0)) * 2) + 2
    h, w = canvas.rgb.shape[:2]
    for t in np.linspace(0.0, 1.0, n):
        y, x = round(y0 + t * (y1 - y0)), round(x0 + t * (x1 - x0))
        if 0 <= y < h and 0 <= x < w:
            canvas.rgb[y, x] = _AXIS


def _draw_circle(canvas: _Canvas, centre_ji: tuple[float, float], radius_px: float, dashed: bool) -> None:
    cy, cx = canvas.to_px(*centre_ji)
    h, w = canvas.rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    dist = np.hypot(yy - cy, xx - cx)
    ring = np.abs(dist - radius_px) <= 1.2
    if dashed:
        ring &= (np.floor(np.degrees(np.arctan2(yy - cy, xx - cx)) / 15.0) % 2) == 0
    _paint(canvas, ring, _PRIOR)


def _overlay(canvas: _Canvas, heat: npt.NDArray[Any]) -> None:
    h = np.clip(np.asarray(heat, dtype=np.float64), 0.0, 1.0)
    h = h[::-1] if canvas.flips[0] else h
    h = h[:, ::-1] if canvas.flips[1] else h
    big = ndimage.zoom(h, canvas.scale_ji, order=1, grid_mode=True, mode="nearest")
    rows, cols = min(big.shape[0], canvas.rgb.shape[0]), min(big.shape[1], canvas.rgb.shape[1])
    big = big[:rows, :cols]
    colours = colormaps["inferno"](big)[..., :3] * 255
    alpha = (0.55 * big)[..., None]
    base = canvas.rgb[:rows, :cols].astype(np.float64)
    canvas.rgb[:rows, :cols] = (base * (1 - alpha) + colours * alpha).astype(np.uint8)


def _png(rgb: npt.NDArray[np.uint8]) -> bytes:
    buf = io.BytesIO()
    mpimg.imsave(buf, rgb, format="png")
    return buf.getvalue()


def _component(labels_2d: npt.NDArray[Any], near_ji: tuple[float, float]) -> npt.NDArray[np.bool_]:
    """The lesion-labelled connected region on a slice that contains (or lies nearest) ``near_ji``."""
    lesion: npt.NDArray[np.bool_] = np.asarray(labels_2d == LabelId.LESION)
    regions, n = ndimage.label(lesion)
    if n == 0:
        return lesion
    j = int(np.clip(round(near_ji[0]), 0, lesion.shape[0] - 1))
    i = int(np.clip(round(near_ji[1]), 0, lesion.shape[1] - 1))
    if regions[j, i]:
        chosen = int(regions[j, i])
    else:
        jj, ii = np.nonzero(regions)
        nearest = int(np.argmin((jj - near_ji[0]) ** 2 + (ii - near_ji[1]) ** 2))
        chosen = int(regions[jj[nearest], ii[nearest]])
    mask: npt.NDArray[np.bool_] = regions == chosen
    return mask


def key_slice_png(
    volume: Volume,
    lesion: dict[str, Any],
    *,
    labels: npt.NDArray[Any] | None = None,
    saliency: npt.NDArray[Any] | None = None,
    expected_lps_mm: tuple[float, float, float] | None = None,
    expected_radius_mm: float = 0.0,
    thumb: bool = False,
) -> bytes | None:
    """The lesion's key axial slice with its contour and long axis (``lesion`` is a ``report.json`` lesion).

    A lesion not seen on this study (no ``current``) is drawn at ``expected_lps_mm`` (its prior position
    mapped into this study) with a dashed circle; None when there is nothing to show.
    """
    current = lesion.get("current")
    spacing_ji = (volume.spacing_kji_mm[1], volume.spacing_kji_mm[2])
    window = _window(str(lesion.get("organ")))
    if current is not None:
        k = int(current["slice_index"])
        ends = [tuple(float(v) for v in e) for e in current["long_axis_endpoints_kji"]]
        centre = ((ends[0][1] + ends[1][1]) / 2, (ends[0][2] + ends[1][2]) / 2)
    elif expected_lps_mm is not None and volume.contains_lps(expected_lps_mm):
        kji = volume.lps_to_kji(expected_lps_mm)
        k, centre, ends = round(kji[0]), (float(kji[1]), float(kji[2])), []
    else:
        return None
    k = int(np.clip(k, 0, volume.shape[0] - 1))
    box = _crop_box(volume.shape[1:], spacing_ji, centre, THUMB_HALF_MM if thumb else FULL_HALF_MM)
    canvas, box = _canvas(
        volume.voxels_hu[k], spacing_ji, window, volume.direction_lps, THUMB_PX if thumb else FULL_PX, box
    )
    if saliency is not None and saliency.shape == volume.shape and not thumb:
        _overlay(canvas, saliency[k][box])
    if current is not None and labels is not None and labels.shape == volume.shape:
        mask = _component(labels[k], centre)
        _draw_contour(canvas, mask[box], _CONTOUR)
    if len(ends) == 2 and not thumb:
        _draw_line(canvas, (ends[0][1], ends[0][2]), (ends[1][1], ends[1][2]))
    if current is None:
        _draw_circle(canvas, centre, _radius_px(canvas, spacing_ji, expected_radius_mm), dashed=True)
    return _png(canvas.rgb)


def _radius_px(canvas: _Canvas, spacing_ji: tuple[float, float], radius_mm: float) -> float:
    return max(radius_mm, 6.0) / spacing_ji[1] * canvas.scale_ji[1] + 3.0


def prior_slice_png(
    volume: Volume,
    centre_lps_mm: tuple[float, float, float],
    *,
    organ: str,
    radius_mm: float,
    thumb: bool = False,
    seen: bool = True,
) -> bytes | None:
    """The prior study's axial slice through ``centre_lps_mm`` (in the prior's own frame), circled (dashed
    when the lesion was not reported there: the position where a new lesion would have been)."""
    if not volume.contains_lps(centre_lps_mm, margin_voxels=2.0):
        return None
    kji = volume.lps_to_kji(centre_lps_mm)
    k = int(np.clip(round(kji[0]), 0, volume.shape[0] - 1))
    centre = (float(kji[1]), float(kji[2]))
    spacing_ji = (volume.spacing_kji_mm[1], volume.spacing_kji_mm[2])
    box = _crop_box(volume.shape[1:], spacing_ji, centre, THUMB_HALF_MM if thumb else FULL_HALF_MM)
    canvas, _ = _canvas(
        volume.voxels_hu[k],
        spacing_ji,
        _window(organ),
        volume.direction_lps,
        THUMB_PX if thumb else FULL_PX,
        box,
    )
    _draw_circle(canvas, centre, _radius_px(canvas, spacing_ji, radius_mm), dashed=not seen)
    return _png(canvas.rgb)


def course_png(points: Sequence[CoursePoint], title: str = "Sum of target diameters") -> bytes | None:
    """``draw_course`` as PNG bytes; None when no time point has a target sum."""
    with tempfile.TemporaryDirectory(prefix="interval-course-") as folder:
        paths = draw_course(points, Path(folder) / "course", title=title)
        png = next((p for p in paths if p.suffix == ".png"), None)
        return png.read_bytes() if png is not None else None


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
