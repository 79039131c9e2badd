"""The core pipeline through its ports, with the ground truth standing in for the model.

With perfect segmentation, what is left to be right is Interval's own logic: volume geometry,
measurement, alignment of the prior, matching, RECIST and wording. The model itself is measured
in tests/integration and models/weights/metrics.json.
"""

from __future__ import annotations

import json

import numpy as np

from adapters.image_folder import FolderImageSource
from adapters.prior_bundle import BundlePriorStore, NoPriors
from core.pipeline import STEPS, analyze_study
from core.recist import CurrentStatus
from core.registration import estimate_translation
from fixtures.synth.demo import compare_with_truth
from fixtures.synth.evaluation import TruthSegmenter


def follow_up(patient, settings=None, priors=None, image_roots=None, progress=None):
    """The demo patient's follow-up through the pipeline, ground truth as the segmenter."""
    folder = patient.folder
    kwargs = {"progress": progress} if progress else {}
    return analyze_study(
        str(folder / patient.time_points[-1] / "dicom"),
        images=FolderImageSource([folder] if image_roots is None else image_roots),
        priors=BundlePriorStore(priors or folder / "priors.json"),
        segmenter=TruthSegmenter(folder),
        settings=settings,
        **kwargs,
    )


def test_follow_up_with_perfect_segmentation_matches_truth(demo_patient):
    folder = demo_patient.folder
    follow = folder / demo_patient.time_points[-1]
    steps: list[tuple[str, str]] = []
    result = follow_up(demo_patient, progress=lambda s, state, d: steps.append((s, state)))
    agreement = compare_with_truth(result, follow / "truth.json")
    assert agreement.ok, agreement.reason
    assert result.recist is not None and result.recist.trace
    assert [s for s, state in steps if state == "done"] == list(STEPS)
    assert len(result.alignments) == 1
    assert "RECIST 1.1" in result.report.impression
    for t in result.lesions:
        assert t.label in result.report.findings


def test_baseline_study_selects_targets(demo_patient):
    folder = demo_patient.folder
    result = analyze_study(
        str(folder / "t0" / "dicom"),
        images=FolderImageSource(),
        priors=NoPriors(),
        segmenter=TruthSegmenter(folder),
    )
    assert result.recist is None
    truth = json.loads((folder / "t0" / "truth.json").read_text())
    assert len(result.lesions) == sum(1 for les in truth["lesions"] if les["present"])
    assert "Baseline study" in result.report.impression


def test_prior_without_images_matches_by_site_and_size_and_says_so(demo_patient):
    result = follow_up(demo_patient, image_roots=[])
    assert any("site and size only" in w for w in result.warnings)
    linked = [t for t in result.lesions if t.detected is not None and t.prior is not None]
    assert linked and all(t.match_method == "site+size" for t in linked)
    assert all(t.status is not CurrentStatus.ABSENT for t in result.lesions)  # never called resolved
    assert all(t.equivocal for t in result.lesions if t.prior is None)  # nor new without a position


def test_registration_recovers_the_repositioning(demo_patient):
    folder = demo_patient.folder
    cur = FolderImageSource().load_study(str(folder / "t1" / "dicom"))
    pri = FolderImageSource().load_study(str(folder / "t0" / "dicom"))
    al = estimate_translation(cur, pri)
    t0 = json.loads((folder / "t0" / "truth.json").read_text())
    t1 = json.loads((folder / "t1" / "truth.json").read_text())
    for a, b in zip(t0["lesions"], t1["lesions"], strict=True):
        if a["present"] and b["present"]:
            err = np.subtract(b["center_lps_mm"], al.apply(tuple(a["center_lps_mm"])))
            # rotation about the long axis (up to 3.4 degrees) is left to the matcher's gate
            assert np.linalg.norm(err) < 10.0
    assert al.score > 0.8


def test_irecist_option_follows_the_recist_category(demo_patient):
    from core.pipeline import AnalysisSettings

    result = follow_up(demo_patient, settings=AnalysisSettings(irecist=True))
    assert result.recist is not None and result.irecist is not None
    assert result.irecist.response.value == "i" + result.recist.category.value
    assert f"iRECIST: {result.irecist.response.value}." in result.report.impression
    assert len(result.history) == len(demo_patient.time_points) - 1


def test_text_only_priors_are_matched_by_site_and_size(demo_patient, tmp_path):
    folder = demo_patient.folder
    follow = folder / demo_patient.time_points[-1]
    raw = json.loads((folder / "priors.json").read_text())
    raw["entry"] = [
        e for e in raw["entry"] if e["resource"]["resourceType"] not in ("Observation", "BodyStructure")
    ]
    for e in raw["entry"]:
        e["resource"].pop("result", None)
    prose = tmp_path / "priors.json"
    prose.write_text(json.dumps(raw))
    result = follow_up(demo_patient, priors=prose)
    linked = [t for t in result.lesions if t.prior is not None and t.detected is not None]
    assert len(linked) >= 4
    assert all(t.prior.source == "text" and t.match_method == "site+size" for t in linked)
    truth = json.loads((follow / "truth.json").read_text())
    assert result.recist is not None and result.recist.category.value == truth["recist"]["category"]


def test_prior_lesions_are_remeasured_on_the_prior_images_when_asked(demo_patient):
    from core.pipeline import AnalysisSettings

    result = follow_up(demo_patient, settings=AnalysisSettings(remeasure_priors=True))
    again = [t for t in result.lesions if t.prior is not None and t.prior_remeasured is not None]
    assert len(again) == sum(1 for t in result.lesions if t.prior is not None)
    for t in again:
        assert t.prior is not None and t.prior_remeasured is not None
        assert abs(t.prior_remeasured[0] - t.prior.long_axis_mm) <= 3.0  # same lesion, same ruler


def test_a_lesion_missing_from_the_prior_report_but_visible_on_its_image_is_not_new(demo_patient, tmp_path):
    from core.pipeline import AnalysisSettings

    raw = json.loads((demo_patient.folder / "priors.json").read_text())
    truth = json.loads((demo_patient.folder / demo_patient.time_points[-1] / "truth.json").read_text())
    lung = next(les for les in truth["lesions"] if les["organ"] == "lung" and les["long_axis_mm"] >= 10.0)
    # the prior radiologist did not report this lung lesion
    focus = next(
        e["fullUrl"]
        for e in raw["entry"]
        if e["resource"]["resourceType"] == "BodyStructure"
        and e["resource"]["identifier"][0]["value"] == f"urn:oid:{lung['track_id']}"
    )
    dropped = {
        e["fullUrl"]
        for e in raw["entry"]
        if e["resource"]["resourceType"] == "Observation" and e["resource"]["focus"][0]["reference"] == focus
    }
    raw["entry"] = [e for e in raw["entry"] if e["fullUrl"] not in dropped and e["fullUrl"] != focus]
    for e in raw["entry"]:
        if e["resource"]["resourceType"] == "DiagnosticReport":
            e["resource"]["result"] = [r for r in e["resource"]["result"] if r["reference"] not in dropped]
    unreported = tmp_path / "priors.json"
    unreported.write_text(json.dumps(raw))
    naive = follow_up(demo_patient, priors=unreported, settings=AnalysisSettings(retrospective_check=False))
    assert naive.recist is not None and naive.recist.category.value == "PD"  # "new" lesion
    checked = follow_up(demo_patient, priors=unreported)
    assert checked.recist is not None and checked.recist.category.value == truth["recist"]["category"]
    assert any("visible in retrospect" in line for line in checked.report.findings.split(". "))


def test_what_the_ingest_tolerated_reaches_the_result_warnings(small_patient, tmp_path):
    import shutil

    import pydicom

    study = tmp_path / "study"
    shutil.copytree(small_patient.folder / "t0" / "dicom", study)
    copy = pydicom.dcmread(sorted(study.iterdir())[3])
    copy.SOPInstanceUID = copy.SOPInstanceUID + ".9"  # the same slice sent twice
    copy.save_as(study / "again.dcm")
    result = analyze_study(
        str(study),
        images=FolderImageSource(),
        priors=NoPriors(),
        segmenter=TruthSegmenter(small_patient.folder),
    )
    assert any(w.startswith("ingest: kept one image of 1 identical duplicate") for w in result.warnings)


class _NewFinding(TruthSegmenter):
    """The truth, plus one new lung finding of ``size_mm`` (k, j, i) painted on the follow-up only."""

    def __init__(self, patient, size_mm: tuple[float, float, float]) -> None:
        super().__init__(patient.folder)
        follow = json.loads((patient.folder / patient.time_points[-1] / "truth.json").read_text())
        self.follow_uid = follow["study_uid"]
        self.size_mm = size_mm

    def segment(self, volume):
        from scipy import ndimage

        from core.types import LabelId, Segmentation

        seg = super().segment(volume)
        if volume.acquisition.study_uid != self.follow_uid:
            return seg
        labels = seg.labels.copy()
        depth = ndimage.distance_transform_edt(labels == LabelId.LUNG, sampling=volume.spacing_kji_mm)
        centre = np.unravel_index(int(np.argmax(depth)), labels.shape)  # deep inside a lung
        half = [max(1, round(s / sp / 2)) for s, sp in zip(self.size_mm, volume.spacing_kji_mm, strict=True)]
        labels[tuple(slice(c - h, c + h) for c, h in zip(centre, half, strict=True))] = LabelId.LESION
        return Segmentation(labels, (labels == LabelId.LESION).astype(np.float32))


def _new_findings(patient, size_mm):
    folder = patient.folder
    result = analyze_study(
        str(folder / patient.time_points[-1] / "dicom"),
        images=FolderImageSource([folder]),
        priors=BundlePriorStore(folder / "priors.json"),
        segmenter=_NewFinding(patient, size_mm),
    )
    return result, [t for t in result.lesions if t.prior is None]


def test_a_band_like_new_finding_is_equivocal_and_a_round_one_is_progression(demo_patient):
    band, (finding,) = _new_findings(demo_patient, (5.0, 5.0, 30.0))  # 30 x 5 mm in plane
    assert finding.detected is not None
    m = finding.detected.measurement
    assert m.long_axis_mm >= 25 and m.short_axis_mm < 0.5 * m.long_axis_mm
    assert finding.equivocal and band.recist is not None and band.recist.category.value != "PD"
    assert f"New right lung lesion {finding.label}" in band.report.findings or (
        f"New left lung lesion {finding.label}" in band.report.findings
    )  # not "small": it is 30 mm long
    assert "Equivocal new finding(s)" in band.report.impression
    round_, (finding,) = _new_findings(demo_patient, (14.0, 14.0, 14.0))
    assert not finding.equivocal
    assert round_.recist is not None and round_.recist.category.value == "PD"


class _MissedLesion(TruthSegmenter):
    """The truth, except that on the follow-up one lesion is labelled as its organ with zero lesion probability:
    what the model says of a lesion it does not see."""

    def __init__(self, patient, instance: int, organ_label: int) -> None:
        super().__init__(patient.folder)
        follow = patient.folder / patient.time_points[-1]
        self.follow_uid = json.loads((follow / "truth.json").read_text())["study_uid"]
        self.instances = np.load(follow / "truth_labels.npz")["instances"]
        self.instance, self.organ_label = instance, organ_label

    def segment(self, volume):
        from core.types import LabelId, Segmentation

        seg = super().segment(volume)
        if volume.acquisition.study_uid != self.follow_uid:
            return seg
        labels = seg.labels.copy()
        labels[self.instances == self.instance] = self.organ_label
        return Segmentation(labels, (labels == LabelId.LESION).astype(np.float32))


def test_a_lesion_the_model_misses_is_found_again_by_its_contrast_at_its_prior_position(demo_patient):
    from core.pipeline import AnalysisSettings
    from core.types import LabelId

    folder = demo_patient.folder
    truth = json.loads((folder / demo_patient.time_points[-1] / "truth.json").read_text())
    liver = [les for les in truth["lesions"] if les["present"] and les["organ"] == "liver"]
    les = min(liver, key=lambda x: x["long_axis_mm"])
    segmenter = _MissedLesion(demo_patient, les["instance"], LabelId.LIVER)

    def run(settings):
        result = analyze_study(
            str(folder / demo_patient.time_points[-1] / "dicom"),
            images=FolderImageSource([folder]),
            priors=BundlePriorStore(folder / "priors.json"),
            segmenter=segmenter,
            settings=settings,
        )
        return next(t for t in result.lesions if t.track_id == les["track_id"])

    found = run(AnalysisSettings())
    assert found.status is CurrentStatus.MEASURED and found.guided
    assert found.match_method == "second look (image contrast)"
    assert found.detected is not None
    assert abs(found.detected.measurement.long_axis_mm - les["long_axis_mm"]) <= 2.5, (
        found.detected.measurement
    )
    # the ball-mean look finds it too, when the voxel look is off; with neither, it is called absent
    faint = run(AnalysisSettings(contrast_search=False))
    assert faint.status is CurrentStatus.MEASURED and faint.match_method == "second look (faint contrast)"
    assert faint.detected is not None
    assert abs(faint.detected.measurement.long_axis_mm - les["long_axis_mm"]) <= 3.0, (
        faint.detected.measurement
    )
    assert run(AnalysisSettings(contrast_search=False, faint_search=False)).status is CurrentStatus.ABSENT
