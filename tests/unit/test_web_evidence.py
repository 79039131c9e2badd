"""What the pages show about a stored analysis (``adapters.evidence``): key images, sentence origins and
checks, removal of a rejected finding's sentences, the worklist's urgency and the lesion history."""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

import matplotlib.image as mpimg
import numpy as np

from adapters.evidence import (
    course_points,
    key_slice_png,
    lesion_history,
    prior_link,
    prior_slice_png,
    remove_lesion_sentences,
    report_text,
    sentence_views,
    set_report_text,
    urgency,
)
from core.report import ReportText
from core.types import Organ, PriorFinding, PriorTimePoint, Volume

YELLOW = np.array([255, 214, 0])
ORANGE = np.array([255, 120, 0])
CYAN = np.array([0, 220, 255])
CYAN = np.array([0, 220, 255])


def _volume() -> tuple[Volume, np.ndarray]:
    k, j, i = np.mgrid[0:12, 0:64, 0:64]
    hu = np.where((j - 32) ** 2 + (i - 32) ** 2 < 28**2, 60.0, -1000.0).astype(np.float32)
    lesion = (k - 6) ** 2 * 4 + (j - 30) ** 2 + (i - 20) ** 2 < 36
    hu[lesion] = 20.0
    labels = np.where(lesion, 3, 0).astype(np.uint8)
    return Volume(hu, (2.5, 1.0, 1.0), (0.0, 0.0, 0.0)), labels


LESION: dict[str, Any] = {
    "track_id": "2.25.1",
    "label": "L1",
    "organ": "liver",
    "laterality": None,
    "recist_role": "target",
    "status": "measured",
    "change": "increased",
    "current": {
        "long_axis_mm": 11.0,
        "short_axis_mm": 11.0,
        "volume_ml": 0.5,
        "slice_index": 6,
        "long_axis_endpoints_kji": [[6.0, 30.0, 14.5], [6.0, 30.0, 25.5]],
        "centroid_lps_mm": [20.0, 30.0, 15.0],
        "probability": 0.93,
    },
    "prior": {"date": "2024-01-02", "long_axis_mm": 8.0, "short_axis_mm": 7.0, "source": "measured"},
}

ANALYSIS: dict[str, Any] = {
    "study": {"study_uid": "1.2.3", "study_date": "2024-03-04"},
    "model_version": "m1",
    "prior_dates": ["2024-01-02"],
    "alignments": {"1.2.9": {"translation_lps_mm": [1.0, 2.0, 3.0], "score": 0.9, "method": "ncc"}},
    "lesions": [LESION],
    "history": [{"study_date": "2024-01-02", "study_uid": "1.2.9", "target_sum_mm": 8.0, "recist": None}],
    "recist": {
        "category": "PD",
        "category_label": "progressive disease",
        "target_response": "PD",
        "non_target_response": "none",
        "baseline_sum_mm": 8.0,
        "nadir_sum_mm": 8.0,
        "current_sum_mm": 11.0,
        "change_from_baseline_pct": 37.5,
        "change_from_nadir_pct": 37.5,
        "change_from_nadir_mm": 3.0,
        "new_lesions": [],
        "trace": ["Target PD."],
    },
    "report": {"author": "deterministic"},
}


def _rgb(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return (mpimg.imread(io.BytesIO(png))[..., :3] * 255).round().astype(int)


def test_key_slice_shows_the_lesion_contour_where_the_lesion_is() -> None:
    volume, labels = _volume()
    rgb = _rgb(key_slice_png(volume, LESION, labels=labels) or b"")
    contour = np.all(rgb == YELLOW, axis=2)
    assert contour.sum() > 20
    rows, cols = np.nonzero(contour)
    # the lesion is at (j, i) = (30, 20) of a 64 mm field cropped to the slice: left of centre, mid-height
    assert (
        abs(rows.mean() / rgb.shape[0] - 30.5 / 64) < 0.08
        and abs(cols.mean() / rgb.shape[1] - 20.5 / 64) < 0.08
    )
    axis_rows, axis_cols = np.nonzero(np.all(rgb == CYAN, axis=2))  # the long axis, across the lesion
    assert axis_cols.max() - axis_cols.min() > 0.12 * rgb.shape[1] and np.ptp(axis_rows) <= 2
    thumb = _rgb(key_slice_png(volume, LESION, labels=labels, thumb=True) or b"")
    assert thumb.shape[0] < rgb.shape[0] and np.all(thumb == YELLOW, axis=2).any()
    # without a label map there is no contour, but the slice is still drawn
    assert not np.all(_rgb(key_slice_png(volume, LESION) or b"") == YELLOW, axis=2).any()


def test_prior_slice_is_circled_at_the_prior_centroid_and_refused_outside_the_volume() -> None:
    volume, _ = _volume()
    rgb = _rgb(prior_slice_png(volume, (20.0, 30.0, 15.0), organ="liver", radius_mm=5.0) or b"")
    ring = np.all(rgb == ORANGE, axis=2)
    rows, cols = np.nonzero(ring)
    assert ring.sum() > 20 and abs(cols.mean() / rgb.shape[1] - 20.5 / 64) < 0.08
    assert abs(rows.mean() / rgb.shape[0] - 30.5 / 64) < 0.08
    assert prior_slice_png(volume, (20.0, 30.0, 500.0), organ="liver", radius_mm=5.0) is None


def test_prior_link_maps_between_the_frames() -> None:
    link = prior_link(ANALYSIS, LESION)
    assert link.date == "2024-01-02" and link.study_uid == "1.2.9"
    assert link.to_prior((20.0, 30.0, 15.0)) == (19.0, 28.0, 12.0)
    assert link.to_current((19.0, 28.0, 12.0)) == (20.0, 30.0, 15.0)


def test_sentence_origins_and_checks() -> None:
    draft = ReportText(
        "CT of 2024-01-02.",
        "Liver lesion L1 (target) has increased, now 11 x 11 mm (previously 8 x 7 mm on 2024-01-02).",
        "RECIST 1.1: progressive disease (PD).",
    )
    edited = ReportText(
        draft.comparison, draft.findings.replace("11 x 11 mm", "15 x 11 mm"), draft.impression
    )
    views, omissions = sentence_views(edited, draft, ANALYSIS)
    by_text = {v.text: v for v in views}
    assert by_text["CT of 2024-01-02."].origin_label == "deterministic wording"
    changed = next(v for v in views if "15 x 11" in v.text)
    assert changed.origin == "edited" and any("15 mm" in p for p in changed.problems)
    assert omissions == []
    # a drafter's per-sentence record names model text and verifier replacements
    recorded = {
        **ANALYSIS,
        "report": {
            "sentences": [
                {"section": "comparison", "text": "CT of 2024-01-02.", "origin": "model"},
                {
                    "section": "impression",
                    "text": "RECIST 1.1: progressive disease (PD).",
                    "origin": "replaced",
                    "drafted": "Stable disease.",
                    "problems": ["states SD; the assessment is PD"],
                },
            ]
        },
    }
    views, _ = sentence_views(draft, draft, recorded)
    labels = [v.origin_label for v in views]
    assert labels == ["model text", "deterministic wording", "replaced by the verifier"]
    assert views[2].drafted == "Stable disease."
    # without the impression's category, the check says so
    _, omissions = sentence_views(ReportText(draft.comparison, draft.findings, ""), draft, ANALYSIS)
    assert omissions == ["the RECIST category was not stated"]


def test_rejecting_a_finding_removes_its_sentences_only() -> None:
    text = ReportText(
        "CT of 2024-01-02.",
        "Liver lesion L1 is stable. New lymph node L4 measures 19 x 16 mm. L4 and L1 are near.",
        "New lymph node lesion L4. RECIST 1.1: progressive disease (PD).",
    )
    out, mixed = remove_lesion_sentences(text, "L4")
    assert out.findings == "Liver lesion L1 is stable. L4 and L1 are near."
    assert out.impression == "RECIST 1.1: progressive disease (PD)."
    assert mixed == ["L4 and L1 are near."]
    assert remove_lesion_sentences(text, "L14")[0] == text


def test_report_text_round_trips_through_fhir() -> None:
    text = ReportText("CT of 2024-01-02.", "Findings <b>here</b>.", "Impression.")
    resource: dict[str, Any] = {"resourceType": "DiagnosticReport"}
    set_report_text(resource, text, "2024-03-04T00:00:00Z")
    assert report_text(resource) == text and resource["conclusion"] == "Impression."
    assert report_text({"conclusion": "Only a conclusion."}) == ReportText("", "", "Only a conclusion.")


def test_urgency_puts_progression_and_new_lesions_first() -> None:
    def analysis(category: str, new: list[str]) -> dict[str, Any]:
        return {"recist": {"category": category, "category_label": category, "new_lesions": new}}

    ranked = sorted(
        [
            analysis("SD", []),
            analysis("PD", []),
            analysis("PR", []),
            analysis("PD", ["2.25.9"]),
            {"recist": None},
        ],
        key=lambda a: urgency(a)[0],
    )
    assert [urgency(a)[0] for a in ranked] == [0, 0, 2, 3, 5]
    assert "new lesion" in urgency(analysis("PD", ["2.25.9"]))[1] and urgency(None)[0] == 6


def test_lesion_history_and_course_points() -> None:
    earlier = PriorTimePoint(
        dt.date(2023, 10, 1), "1.2.8", (PriorFinding("2.25.1", Organ.LIVER, 9.0, 8.0, label="L1"),)
    )
    gone = PriorTimePoint(
        dt.date(2024, 1, 2), "1.2.9", (PriorFinding("2.25.7", Organ.LUNG, 6.0, 5.0, label="L2"),)
    )
    history = lesion_history(ANALYSIS, [earlier, gone], rejected=frozenset())
    assert history.dates == ["2023-10-01", "2024-01-02", "2024-03-04"]
    ((lesion, sizes),) = history.rows
    assert lesion["label"] == "L1"
    assert sizes == {"2023-10-01": "9 x 8 mm", "2024-01-02": "8 x 7 mm", "2024-03-04": "11 x 11 mm"}
    assert history.others == [("L2", {"2024-01-02": "6 x 5 mm"})]
    rejected = lesion_history(ANALYSIS, rejected=frozenset({"2.25.1"}))
    assert rejected.rows[0][1]["2024-03-04"] == "rejected on review"
    points = course_points(ANALYSIS)
    assert [(p.study_date.isoformat(), p.target_sum_mm, p.category) for p in points] == [
        ("2024-01-02", 8.0, None),
        ("2024-03-04", 11.0, "PD"),
    ]
