"""``analyze_study``: one follow-up CT from images to a measured, compared, worded report.

Steps (each reported to ``progress``): ingest -> segment -> measure -> priors -> compare -> draft.
Everything outside the core arrives through ports (``core.ports``); the function is the same in
the command line, a Celery worker or a test.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from core.confidence import add_spreads
from core.drift_signals import image_signals
from core.errors import AnalysisError, IntervalError
from core.grounding import VerifiedDraft
from core.history import TimePointAssessment, assess_history, baseline_roles
from core.irecist import IRecistState, irecist_step
from core.lesions import LesionFilter, contrast_search, extract_lesions, faint_search, guided_search
from core.matching import GATE_MM, MatchResult, find_splits_and_merges, match_lesions
from core.ports import AugmentingSegmenter, ImageSource, PriorStore, ReportDrafter, Segmenter
from core.recist import (
    NEW_LESION_MIN_AXIS_RATIO,
    NEW_LESION_MIN_MM,
    CurrentStatus,
    RecistResult,
    TrackObservation,
    assess_response,
    is_unequivocal_new,
    select_targets,
)
from core.registration import Alignment, estimate_translation
from core.report import Change, LesionFact, ReportFacts, ReportText, classify_change, render_report
from core.types import (
    AcquisitionInfo,
    DetectedLesion,
    Organ,
    PriorFinding,
    PriorTimePoint,
    RecistRole,
    Segmentation,
    Volume,
)

__all__ = ["STEPS", "AnalysisSettings", "StudyResult", "TrackedLesion", "analyze_study"]

STEPS = ("ingest", "segment", "measure", "priors", "compare", "draft")
Progress = Callable[[str, str, str], None]
_TRACK_NS = uuid.UUID("2f4b8c7e-3f0a-4a51-b3f3-2c9a4d0e7b11")


@dataclass(frozen=True, slots=True)
class AnalysisSettings:
    lesion_filter: LesionFilter = field(default_factory=LesionFilter)
    gate_mm: float = GATE_MM
    new_lesion_min_mm: float = NEW_LESION_MIN_MM  # smaller new findings are equivocal, not PD
    new_lesion_min_probability: float = 0.8  # less certain new findings are equivocal, not PD
    new_lesion_min_axis_ratio: float = (
        NEW_LESION_MIN_AXIS_RATIO  # band-like new findings are equivocal, not PD
    )
    guided_search: bool = True  # look again, at a lower threshold, where a missed prior lesion should be
    contrast_search: bool = (
        True  # and then by its contrast to the organ (liver, lung), if the model saw nothing
    )
    faint_search: bool = True  # and then by the mean of a ball its size (liver), if no voxel stands out
    irecist: bool = False  # also assess iRECIST (progression confirmed at the next time point)
    remeasure_priors: bool = False  # segment the prior images too and measure prior lesions the same way
    retrospective_check: bool = True  # a "new" lesion the model also finds on the prior image is not new


@dataclass(frozen=True, slots=True)
class TrackedLesion:
    """One track as seen by this study: its identity, its history's last entry, and now."""

    track_id: str
    label: str
    organ: Organ
    laterality: str | None
    role: RecistRole | None
    change: Change
    status: CurrentStatus
    detected: DetectedLesion | None
    prior: PriorFinding | None
    prior_date: dt.date | None
    match_distance_mm: float | None = None
    match_method: str | None = None  # "position", "site+size" (lower confidence), a second look's, or None
    prior_remeasured: tuple[float, float] | None = (
        None  # (long, short) mm measured by Interval on the prior image
    )
    equivocal: bool = False  # a new finding too small or too uncertain to call progression
    guided: bool = False  # found only by looking again at the prior lesion's aligned position


@dataclass(frozen=True, slots=True)
class StudyResult:
    acquisition: AcquisitionInfo
    model_version: str
    lesions: tuple[TrackedLesion, ...]
    recist: RecistResult | None
    irecist: IRecistState | None
    history: tuple[TimePointAssessment, ...]  # the prior time points, reassessed (baseline first)
    facts: ReportFacts
    report: ReportText
    prior_dates: tuple[dt.date, ...]
    alignments: dict[str, Alignment]
    step_seconds: dict[str, float]
    warnings: tuple[str, ...]
    volume_shape: tuple[int, int, int]
    spacing_kji_mm: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]
    direction_lps: tuple[tuple[float, float, float], ...]
    # the label map and lesion probability this result was measured on (evidence images); not compared
    segmentation: Segmentation | None = field(default=None, repr=False, compare=False)
    # the language model's verified draft (None: deterministic wording); ``report`` is its text
    draft: VerifiedDraft | None = None
    # HU and noise statistics of the input for the drift monitor (``core.drift_signals.image_signals``)
    image_signals: dict[str, float] = field(default_factory=dict, compare=False)


def _noop(step: str, state: str, detail: str) -> None:
    return None


def new_track_id(study_uid: str, lesion_id: int) -> str:
    """A DICOM UID (2.25 form, from a name-based UUID) for a lesion first seen in this study."""
    return f"2.25.{uuid.uuid5(_TRACK_NS, f'{study_uid}/{lesion_id}').int}"


class _Steps:
    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[list[str]]:
        detail: list[str] = []
        self.progress(name, "start", "")
        t0 = time.perf_counter()
        try:
            yield detail
        except IntervalError:
            self.progress(name, "failed", "")
            raise
        self.seconds[name] = round(time.perf_counter() - t0, 3)
        self.progress(name, "done", "; ".join(detail))


def analyze_study(
    study_ref: str,
    *,
    images: ImageSource,
    priors: PriorStore,
    segmenter: Segmenter,
    settings: AnalysisSettings | None = None,
    progress: Progress = _noop,
    drafter: ReportDrafter | None = None,
) -> StudyResult:
    settings = settings or AnalysisSettings()
    steps = _Steps(progress)
    warnings: list[str] = []
    notes: list[str] = []  # splits and merges, stated in the report
    with steps.step("ingest") as d:
        volume = images.load_study(study_ref)
        acq = volume.acquisition
        if acq is None:
            raise AnalysisError("the image source returned a volume without acquisition facts")
        warnings += [f"ingest: {n}" for n in acq.ingest_notes]
        d.append(f"{volume.shape[0]} slices, {acq.manufacturer or 'unknown vendor'}")
    with steps.step("segment") as d:
        seg = segmenter.segment(volume)
        if seg.labels.shape != volume.shape:
            raise AnalysisError(
                f"segmenter returned shape {seg.labels.shape} for a volume of shape {volume.shape}",
                study_uid=acq.study_uid,
            )
        d.append(f"model {segmenter.model_version}")
    with steps.step("measure") as d:
        detected = extract_lesions(volume, seg, settings.lesion_filter)
        d.append(f"{len(detected)} lesion(s)")
        if isinstance(segmenter, AugmentingSegmenter) and segmenter.augmentations and detected:
            detected = add_spreads(volume, seg, detected, segmenter)
            d.append(f"spread over {1 + len(segmenter.augmentations)} views")
        input_stats = image_signals(volume, seg.labels)
    with steps.step("priors") as d:
        tps = [
            tp
            for tp in priors.prior_time_points(acq.patient_id, before=acq.study_date)
            if tp.study_uid != acq.study_uid
        ]
        d.append(f"{len(tps)} prior stud{'y' if len(tps) == 1 else 'ies'}")
    with steps.step("compare") as d:
        alignments: dict[str, Alignment] = {}
        irecist: IRecistState | None = None
        history: list[TimePointAssessment] = []
        if tps:
            lesions, recist, irecist, history = _compare(
                volume, seg, detected, tps, images, settings, alignments, warnings, notes, segmenter
            )
            d.append(
                f"RECIST {recist.category.value}" + (f", iRECIST {irecist.response.value}" if irecist else "")
            )
        else:
            lesions, recist = _baseline(acq.study_uid, detected), None
            d.append("baseline study")
    with steps.step("draft") as d:
        facts = ReportFacts(
            study_date=acq.study_date,
            study_uid=acq.study_uid,
            comparison_dates=tuple(tp.study_date for tp in reversed(tps)),
            lesions=tuple(_fact(t) for t in lesions),
            recist=recist,
            prior_impression=tps[-1].report_text if tps else "",
            irecist=irecist,
            notes=tuple(notes),
        )
        if drafter is None:
            report, draft = render_report(facts), None
            d.append("deterministic wording")
        else:
            draft = drafter.draft(facts)
            report = draft.text
            d.append(f"{drafter.model_version}, {len(draft.flagged)} sentence(s) replaced or added")
    return StudyResult(
        acquisition=acq,
        model_version=segmenter.model_version,
        lesions=tuple(lesions),
        recist=recist,
        irecist=irecist,
        history=tuple(history),
        facts=facts,
        report=report,
        prior_dates=tuple(tp.study_date for tp in tps),
        alignments=alignments,
        step_seconds=steps.seconds,
        warnings=tuple(warnings),
        volume_shape=volume.shape,
        origin_lps_mm=volume.origin_lps_mm,
        direction_lps=volume.direction_lps,
        spacing_kji_mm=volume.spacing_kji_mm,
        segmentation=seg,
        draft=draft,
        image_signals=input_stats,
    )


def _fact(t: TrackedLesion) -> LesionFact:
    m = t.detected.measurement if t.detected else None
    return LesionFact(
        track_id=t.track_id,
        label=t.label,
        organ=t.organ,
        laterality=t.laterality,
        role=t.role,
        change=t.change,
        long_axis_mm=m.long_axis_mm if m else (0.0 if t.status is CurrentStatus.ABSENT else None),
        short_axis_mm=m.short_axis_mm if m else (0.0 if t.status is CurrentStatus.ABSENT else None),
        prior_long_axis_mm=t.prior.long_axis_mm if t.prior else None,
        prior_short_axis_mm=t.prior.short_axis_mm if t.prior else None,
        prior_date=t.prior_date,
        confidence=t.detected.probability if t.detected else None,
        equivocal=t.equivocal,
        guided=t.guided,
    )


@dataclass(frozen=True, slots=True)
class _AsMeasured:
    track_id: str
    organ: Organ
    long_axis_mm: float
    short_axis_mm: float


def _baseline(study_uid: str, detected: list[DetectedLesion]) -> list[TrackedLesion]:
    ids = {d.lesion_id: new_track_id(study_uid, d.lesion_id) for d in detected}
    roles = select_targets(
        [
            _AsMeasured(ids[d.lesion_id], d.organ, d.measurement.long_axis_mm, d.measurement.short_axis_mm)
            for d in detected
        ]
    )
    return [
        TrackedLesion(
            ids[d.lesion_id],
            f"L{d.lesion_id}",
            d.organ,
            d.laterality,
            roles.get(ids[d.lesion_id]),
            Change.BASELINE,
            CurrentStatus.MEASURED,
            d,
            None,
            None,
        )
        for d in detected
    ]


def _latest_findings(tps: list[PriorTimePoint]) -> dict[str, tuple[PriorFinding, PriorTimePoint]]:
    latest: dict[str, tuple[PriorFinding, PriorTimePoint]] = {}
    for tp in tps:  # oldest first: later time points overwrite
        for f in tp.findings:
            latest[f.track_id] = (f, tp)
    return latest


def _in_current_frame(
    volume: Volume,
    latest: dict[str, tuple[PriorFinding, PriorTimePoint]],
    images: ImageSource,
    alignments: dict[str, Alignment],
    warnings: list[str],
    prior_volumes: dict[str, Volume],
) -> list[PriorFinding]:
    moved: list[PriorFinding] = []
    missing_images: set[str] = set()
    for f, tp in latest.values():
        if f.centroid_lps_mm is None:
            moved.append(f)
            continue
        if tp.study_uid not in alignments and tp.study_uid not in missing_images:
            prior_volume = images.find_study(tp.study_uid) if tp.study_uid else None
            if prior_volume is None:
                missing_images.add(tp.study_uid)
                warnings.append(
                    f"images of the prior study of {tp.study_date.isoformat()} are not available: its lesions "
                    "are matched by site and size only (lower confidence) and new findings in those organs "
                    "are reported as equivocal"
                )
            else:
                alignments[tp.study_uid] = estimate_translation(volume, prior_volume)
                prior_volumes[tp.study_uid] = prior_volume
        al = alignments.get(tp.study_uid)
        centroid = al.apply(f.centroid_lps_mm) if al else None
        moved.append(replace(f, centroid_lps_mm=centroid))
    return moved


class _PriorLesions:
    """Lesions the model finds on prior images, segmented at most once per prior study."""

    def __init__(self, segmenter: Segmenter, volumes: dict[str, Volume], keep: LesionFilter) -> None:
        self.segmenter, self.volumes, self.keep = segmenter, volumes, keep
        self.found: dict[str, list[DetectedLesion]] = {}

    def of(self, study_uid: str) -> list[DetectedLesion] | None:
        vol = self.volumes.get(study_uid)
        if vol is None:
            return None
        if study_uid not in self.found:
            self.found[study_uid] = extract_lesions(vol, self.segmenter.segment(vol), self.keep)
        return self.found[study_uid]


def _remeasure_priors(
    latest: dict[str, tuple[PriorFinding, PriorTimePoint]], prior_lesions: _PriorLesions
) -> dict[str, tuple[float, float]]:
    """Measure each prior lesion on its own prior image with the same model and geometry as the
    current study: the lesion found within 10 mm of the reported position."""
    out: dict[str, tuple[float, float]] = {}
    for track_id, (f, tp) in latest.items():
        found = prior_lesions.of(tp.study_uid)
        if f.centroid_lps_mm is None or found is None:
            continue
        best = min(
            found,
            key=lambda d: float(np.linalg.norm(np.subtract(d.centroid_lps_mm, f.centroid_lps_mm))),  # type: ignore[arg-type]
            default=None,
        )
        if (
            best is not None
            and float(np.linalg.norm(np.subtract(best.centroid_lps_mm, f.centroid_lps_mm))) <= 10.0
        ):
            out[track_id] = (best.measurement.long_axis_mm, best.measurement.short_axis_mm)
    return out


def _visible_before(
    det: DetectedLesion,
    prior: PriorTimePoint,
    volume: Volume,
    images: ImageSource,
    alignments: dict[str, Alignment],
    prior_volumes: dict[str, Volume],
    prior_lesions: _PriorLesions,
    within_mm: float = 10.0,
) -> dt.date | None:
    """The prior study's date when the model finds a lesion at this lesion's place on its image."""
    if prior.study_uid not in prior_volumes:
        vol = images.find_study(prior.study_uid) if prior.study_uid else None
        if vol is None:
            return None
        prior_volumes[prior.study_uid] = vol
        alignments.setdefault(prior.study_uid, estimate_translation(volume, vol))
    found = prior_lesions.of(prior.study_uid)
    t = alignments[prior.study_uid].translation_lps_mm
    back = np.subtract(det.centroid_lps_mm, t)  # current frame -> prior frame
    if found and any(float(np.linalg.norm(np.subtract(d.centroid_lps_mm, back))) <= within_mm for d in found):
        return prior.study_date
    return None


def _compare(
    volume: Volume,
    seg: Segmentation,
    detected: list[DetectedLesion],
    tps: list[PriorTimePoint],
    images: ImageSource,
    settings: AnalysisSettings,
    alignments: dict[str, Alignment],
    warnings: list[str],
    notes: list[str],
    segmenter: Segmenter,
) -> tuple[list[TrackedLesion], RecistResult, IRecistState | None, list[TimePointAssessment]]:
    acq = volume.acquisition
    assert acq is not None
    latest = _latest_findings(tps)
    prior_volumes: dict[str, Volume] = {}
    moved = _in_current_frame(volume, latest, images, alignments, warnings, prior_volumes)
    prior_lesions = _PriorLesions(segmenter, prior_volumes, settings.lesion_filter)
    remeasured = _remeasure_priors(latest, prior_lesions) if settings.remeasure_priors else {}
    result: MatchResult = match_lesions(detected, moved, settings.gate_mm)
    events = find_splits_and_merges(detected, moved, result)
    fragments = {e.track_ids[0]: e.lesion_ids[1:] for e in events if e.kind == "split"}
    merged_away = {t for e in events if e.kind == "merge" for t in e.track_ids[1:]}
    absorbed = {lid for lids in fragments.values() for lid in lids}
    by_lesion = {d.lesion_id: d for d in detected}
    by_track_moved = {f.track_id: f for f in moved}
    match_of = {m.track_id: m for m in result.matches}

    baseline = tps[0]
    roles = baseline_roles(baseline)
    baseline_ids = {f.track_id for f in baseline.findings}

    current: dict[str, TrackObservation] = {}
    tracked: list[TrackedLesion] = []
    for track_id, (f, tp) in latest.items():
        m = match_of.get(track_id)
        det = by_lesion[m.lesion_id] if m else None
        pos = by_track_moved[track_id].centroid_lps_mm
        second_look: str | None = None
        if (
            det is None
            and pos is not None
            and volume.contains_lps(pos)
            and settings.guided_search
            and track_id not in merged_away
        ):
            elsewhere = [d.centroid_lps_mm for d in detected]
            floor = settings.lesion_filter.min_long_axis_mm
            det = guided_search(volume, seg, pos, f.organ, elsewhere)
            second_look = "second look" if det is not None else None
            if det is None and settings.contrast_search:
                det = contrast_search(volume, seg, pos, f.organ, elsewhere, min_long_axis_mm=floor)
                second_look = "second look (image contrast)" if det is not None else None
            if det is None and settings.faint_search:
                det = faint_search(
                    volume, seg, pos, f.organ, elsewhere, f.long_axis_mm, min_long_axis_mm=floor
                )
                second_look = "second look (faint contrast)" if det is not None else None
        if det is not None:
            parts = [det, *(by_lesion[lid] for lid in fragments.get(track_id, ()))]
            obs = TrackObservation(  # RECIST 1.1: the diameters of a fragmented lesion are summed
                CurrentStatus.MEASURED,
                sum(p.measurement.long_axis_mm for p in parts),
                sum(p.measurement.short_axis_mm for p in parts),
            )
        else:
            status = (
                CurrentStatus.ABSENT
                if pos is not None and volume.contains_lps(pos)
                else CurrentStatus.NOT_EVALUABLE
            )
            obs = TrackObservation(status)
        current[track_id] = obs
        cur_d = obs.diameter_mm(f.organ)
        again = remeasured.get(track_id)
        # the direction of change compares like with like when the prior was re-measured
        prior_d = (again[1] if f.organ.is_nodal else again[0]) if again else f.recist_diameter_mm()
        role = roles.get(track_id) or (RecistRole.NEW if track_id not in baseline_ids else None)
        tracked.append(
            TrackedLesion(
                track_id=track_id,
                label=f.label or track_id[-6:],
                organ=f.organ,
                laterality=f.laterality or (det.laterality if det else None),
                role=role,
                change=classify_change(prior_d, cur_d, f.organ),
                status=obs.status,
                detected=det,
                prior=f,
                prior_date=tp.study_date,
                match_distance_mm=m.distance_mm if m else None,
                match_method=m.method if m else second_look,
                prior_remeasured=again,
                guided=second_look is not None,
            )
        )
    next_label = 1 + max(
        (int(f.label[1:]) for f, _ in latest.values() if f.label.startswith("L") and f.label[1:].isdigit()),
        default=0,
    )
    new_ids: list[str] = []
    unlocated_organs = {f.organ for f in moved if f.centroid_lps_mm is None}
    for n, lesion_id in enumerate(lid for lid in result.new_lesion_ids if lid not in absorbed):
        det = by_lesion[lesion_id]
        tid = new_track_id(acq.study_uid, lesion_id)
        meas = det.measurement
        equivocal = (
            not (
                is_unequivocal_new(
                    det.organ,
                    meas.long_axis_mm,
                    meas.short_axis_mm,
                    settings.new_lesion_min_mm,
                    settings.new_lesion_min_axis_ratio,
                )
                and det.probability >= settings.new_lesion_min_probability
            )
            # a prior of this organ had no position: "new" cannot be told from "not matched"
            or det.organ in unlocated_organs
        )
        if not equivocal and settings.retrospective_check:
            seen_on = _visible_before(det, tps[-1], volume, images, alignments, prior_volumes, prior_lesions)
            if seen_on is not None:
                equivocal = True
                notes.append(
                    f"L{next_label + n} is visible in retrospect on the prior study of {seen_on.isoformat()}, "
                    "though not in its report: an unreported finding, not counted as a new lesion."
                )
        if not equivocal:
            new_ids.append(tid)
        tracked.append(
            TrackedLesion(
                tid,
                f"L{next_label + n}",
                det.organ,
                det.laterality,
                RecistRole.NEW,
                Change.NEW,
                CurrentStatus.MEASURED,
                det,
                None,
                None,
                equivocal=equivocal,
            )
        )
    # A lesion absent at baseline that is present now keeps the assessment PD (RECIST 1.1
    # progression is not undone at later time points).
    earlier_new = [
        tid
        for tid, (f, _) in latest.items()
        if tid not in baseline_ids
        and current[tid].status is CurrentStatus.MEASURED
        and is_unequivocal_new(
            f.organ,
            current[tid].long_axis_mm,
            current[tid].short_axis_mm,
            settings.new_lesion_min_mm,
            settings.new_lesion_min_axis_ratio,
        )
    ]
    history = assess_history(tps)
    new_all = [*earlier_new, *new_ids]
    recist = assess_response(
        list(baseline.findings),
        roles,
        current,
        [a.target_sum_mm for a in history[1:]],
        new_all,
        labels={t.track_id: t.label for t in tracked},
    )
    label_of = {t.track_id: t.label for t in tracked}
    for e in events:
        if e.kind == "split":
            notes.append(
                f"{label_of[e.track_ids[0]]} appears fragmented into {len(e.lesion_ids)} parts; "
                "their diameters are summed (RECIST 1.1)."
            )
        else:
            others = ", ".join(label_of[t] for t in e.track_ids[1:])
            notes.append(
                f"{others} appear(s) to have merged with {label_of[e.track_ids[0]]}; the merged lesion is "
                f"measured on {label_of[e.track_ids[0]]} and {others} counts 0 mm (RECIST 1.1)."
            )
    irecist = None
    if settings.irecist:
        sizes = {
            t.track_id: (current[t.track_id].diameter_mm(t.organ) or 0.0) if t.track_id in current else 0.0
            for t in tracked
        }
        for t in tracked:
            if t.detected is not None and t.track_id in new_ids:
                sizes[t.track_id] = t.detected.measurement.recist_diameter_mm(t.organ)
        irecist = irecist_step(history[-1].irecist, recist, {k: sizes.get(k, 0.0) for k in new_all})
    tracked.sort(key=lambda t: (t.label[:1], int(t.label[1:]) if t.label[1:].isdigit() else 0))
    return tracked, recist, irecist, history
