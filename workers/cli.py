"""The ``interval`` command line.

    interval analyze STUDY_DIR --priors BUNDLE.json [--prior-images DIR] [--out DIR]
    interval explain STUDY_DIR --lesion L1 --out L1.png [--artifacts DIR | --report report.json]
    interval synth OUT_DIR [--patients N] [--seed S]
    interval demo [--out DIR]
    interval user add NAME --role radiologist|clinician|admin --site S [--site S2]
    interval watch-pacs --api http://interval:8000 [--state FILE] [--once]

Errors end in one readable line on stderr and a non-zero exit code (2 bad input, 3 model,
4 external service, 70 internal); never a traceback (an internal error's traceback goes to a
log file whose path is printed).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from core.errors import ExternalServiceError, InputError, IntervalError, ModelError
from workers.drift_cli import drift_app

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Interval: follow-up CT analysis with RECIST 1.1 and a grounded report.",
)
out_console = Console()
err_console = Console(stderr=True)

EXIT_CODES: list[tuple[type[IntervalError], int]] = [
    (InputError, 2),
    (ModelError, 3),
    (ExternalServiceError, 4),
]


@contextmanager
def _user_errors(log_dir: Path | None = None) -> Iterator[None]:
    try:
        yield
    except IntervalError as e:
        code = next((c for t, c in EXIT_CODES if isinstance(e, t)), 1)
        err_console.print(f"[bold red]error[/]: {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except ValidationError as e:  # settings from INTERVAL_* that do not validate
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "settings"
        err_console.print(
            f"[bold red]configuration error[/]: {where}: {first.get('msg', 'invalid')}", highlight=False
        )
        raise typer.Exit(78) from None
    except Exception as e:  # noqa: BLE001 - the last line of defence: log, never show a traceback
        log = (log_dir or Path.cwd()) / "interval-error.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(traceback.format_exc())
            where = f"; details in {log}"
        except OSError:
            where = ""
        err_console.print(f"[bold red]internal error[/]: {type(e).__name__}{where}", highlight=False)
        raise typer.Exit(70) from None


def _progress_callback(progress: Progress) -> Callable[[str, str, str], None]:
    tasks: dict[str, Any] = {}

    def on(step: str, state: str, detail: str) -> None:
        if state == "start":
            tasks[step] = progress.add_task(f"{step}", total=1)
        elif state == "done":
            progress.update(tasks[step], completed=1, description=f"{step} [dim]{detail}[/]")
        else:
            progress.update(tasks[step], description=f"[red]{step} failed[/]")

    return on


def run_analysis(
    study_dir: Path,
    priors: Path | None,
    prior_images: list[Path],
    out: Path,
    quiet: bool = False,
    irecist: bool | None = None,
    remeasure_priors: bool | None = None,
) -> Any:
    """Analyze one study in-process and write report.json + report.md; returns the result."""
    from adapters.image_folder import FolderImageSource
    from adapters.prior_bundle import BundlePriorStore, NoPriors
    from adapters.report_json import result_to_json, result_to_markdown
    from adapters.settings import Settings
    from core.pipeline import analyze_study
    from models.segmentation.inference import segmenter_from_settings

    settings = Settings()
    if irecist is not None:
        settings = settings.model_copy(update={"irecist": irecist})
    if remeasure_priors is not None:
        settings = settings.model_copy(update={"remeasure_priors": remeasure_priors})
    roots = prior_images or ([priors.parent] if priors is not None else [])
    images = FolderImageSource(roots, settings.series_rules())
    store = BundlePriorStore(priors) if priors is not None else NoPriors()
    if isinstance(store, BundlePriorStore):
        store.load()  # validate up front (parsed once, reused by the pipeline): fail before inference
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet,
        transient=False,
    ) as progress:
        on = _progress_callback(progress)
        on("load model", "start", "")
        segmenter = segmenter_from_settings(settings)
        on("load model", "done", segmenter.model_version)
        result = analyze_study(
            str(study_dir),
            images=images,
            priors=store,
            segmenter=segmenter,
            settings=settings.analysis(),
            progress=on,
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result_to_json(result), indent=1))
    (out / "report.md").write_text(result_to_markdown(result))
    _write_structured(result, study_dir, out)
    if result.history:
        from adapters.charts import CoursePoint, draw_course

        points = [
            CoursePoint(a.study_date, a.target_sum_mm, a.recist.category.value if a.recist else None)
            for a in result.history
        ]
        if result.recist is not None:
            points.append(
                CoursePoint(
                    result.acquisition.study_date, result.recist.current_sum_mm, result.recist.category.value
                )
            )
        draw_course(points, out / "history")
    return result


def _write_structured(result: Any, study_dir: Path, out: Path) -> None:
    """findings.fhir.json (mCODE TumorSize + Tumor BodyStructure, identifier = track UID) and
    measurements.sr.dcm (TID 1500, Tracking UID = the same track UID)."""
    from adapters.dicom_series import scan_folder
    from adapters.dicom_sr import write_measurement_report
    from adapters.fhir_priors import priors_to_bundle
    from adapters.report_json import result_to_time_point

    current = result_to_time_point(result)
    bundle = priors_to_bundle(result.acquisition.patient_id, [current])
    (out / "findings.fhir.json").write_text(json.dumps(bundle, indent=1))
    headers = scan_folder(study_dir).series.get(result.acquisition.series_uid, [])
    if headers:
        order = len(result.history) + 1 if result.history else 1
        write_measurement_report(result, [headers[0][1]], out / "measurements.sr.dcm", time_point_order=order)


def _print_report(result: Any, out: Path) -> None:
    from adapters.report_json import result_to_markdown

    out_console.print(result_to_markdown(result), highlight=False, markup=False)
    out_console.print(f"[green]wrote[/] {out / 'report.json'} and {out / 'report.md'}")


@app.command()
def analyze(
    study_dir: Annotated[Path, typer.Argument(help="Folder with the current CT study (DICOM files).")],
    priors: Annotated[
        Path | None, typer.Option(help="FHIR R4 Bundle of the patient's prior findings.")
    ] = None,
    prior_images: Annotated[
        list[Path] | None,
        typer.Option(
            help="Folder(s) searched for prior studies by StudyInstanceUID (default: the priors file's folder)."
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder for report.json and report.md.")] = Path("out"),
    quiet: Annotated[bool, typer.Option(help="No progress display.")] = False,
    irecist: Annotated[bool, typer.Option(help="Also assess iRECIST (confirmation of progression).")] = False,
    remeasure_priors: Annotated[
        bool, typer.Option(help="Segment the prior images too and re-measure prior lesions (slower).")
    ] = False,
) -> None:
    """Analyze one follow-up CT study against the patient's priors."""
    with _user_errors(out):
        result = run_analysis(
            study_dir,
            priors,
            list(prior_images or []),
            out,
            quiet,
            irecist=irecist or None,
            remeasure_priors=remeasure_priors or None,
        )
        _print_report(result, out)


@app.command()
def explain(
    study_dir: Annotated[Path, typer.Argument(help="Folder with the CT study (DICOM files).")],
    lesion: Annotated[str, typer.Option(help="The lesion: its label (L2) or track id.")],
    out: Annotated[Path, typer.Option(help="PNG of the key slice with the saliency overlay.")],
    artifacts: Annotated[
        Path | None,
        typer.Option(
            help="Stored analyses (INTERVAL_ARTIFACTS_DIR): name lesions as the web page does, and "
            "keep the saliency there so the page overlays it."
        ),
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="A report.json of 'interval analyze' that names the lesion.")
    ] = None,
) -> None:
    """Occlusion saliency of one lesion: which parts of the image the finding rests on (~10 s on one CPU)."""
    from adapters.settings import Settings
    from workers.explain import explain_lesion

    with _user_errors(out.parent):
        result = explain_lesion(study_dir, lesion, out, Settings(), report=report, artifacts=artifacts)
        sal = result.saliency
        out_console.print(
            f"{result.label}: lesion probability {sal.baseline:.2f}; {sal.occlusions} occlusions in "
            f"{result.seconds:.1f} s; largest drop {float(sal.drop.max()):.3f}; wrote {result.png}"
            + (f"; saliency kept in {result.stored_in}" if result.stored_in else ""),
            highlight=False,
        )


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Folder to write the cohort into.")],
    patients: Annotated[int, typer.Option(min=1, help="Number of patients.")] = 4,
    seed: Annotated[int, typer.Option(help="Cohort seed (same seed, same cohort).")] = 7,
    vendors: Annotated[
        str, typer.Option(help="Comma-separated vendor profiles.")
    ] = "ge,siemens,philips,canon",
    start: Annotated[int, typer.Option(help="Index of the first patient.")] = 0,
    min_time_points: Annotated[int, typer.Option(min=2, max=6, help="Fewest scans per patient.")] = 2,
    max_time_points: Annotated[int, typer.Option(min=2, max=6, help="Most scans per patient.")] = 4,
) -> None:
    """Generate a synthetic longitudinal CT cohort with ground truth and FHIR priors."""
    from fixtures.synth.cohort import CohortOptions, make_cohort
    from fixtures.synth.vendors import VENDORS

    with _user_errors(out):
        names = tuple(v.strip() for v in vendors.split(",") if v.strip())
        unknown = [v for v in names if v not in VENDORS]
        if unknown:
            raise InputError(f"unknown vendor profile(s) {unknown}; choose from {sorted(VENDORS)}")
        if min_time_points > max_time_points:
            raise InputError("--min-time-points must not exceed --max-time-points")
        options = CohortOptions(
            seed=seed, vendors=names, min_time_points=min_time_points, max_time_points=max_time_points
        )
        made = make_cohort(out, patients, options, start=start)
        for p in made:
            out_console.print(f"{p.patient_id}: {len(p.time_points)} time points in {p.folder}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Working folder for the demo patient and report.")] = Path(
        "out/demo"
    ),
    check: Annotated[
        bool, typer.Option(help="Exit 3 when the report disagrees with the ground truth.")
    ] = True,
) -> None:
    """Generate the demo patient (two time points), analyze the follow-up, compare with the truth."""
    from fixtures.synth.cohort import make_patient
    from fixtures.synth.demo import DEMO_OPTIONS, DEMO_PATIENT_INDEX, compare_with_truth

    with _user_errors(out):
        patient = make_patient(out / "cohort", DEMO_PATIENT_INDEX, DEMO_OPTIONS)
        follow_up = patient.folder / patient.time_points[-1]
        result = run_analysis(
            follow_up / "dicom", patient.folder / "priors.json", [patient.folder], out / "report"
        )
        _print_report(result, out / "report")
        agreement = compare_with_truth(result, follow_up / "truth.json")
        table = Table(title="Demo: report vs generated ground truth")
        for col in ("lesion", "organ", "truth", "measured", "error", "ok"):
            table.add_column(col)
        for row in agreement.rows:
            table.add_row(*row)
        out_console.print(table)
        out_console.print(f"RECIST: truth {agreement.truth_category}, report {agreement.category}")
        if agreement.ok:
            out_console.print("[bold green]demo report matches the ground truth[/]")
        else:
            out_console.print(f"[bold red]demo report disagrees with the ground truth[/]: {agreement.reason}")
            if check:
                raise typer.Exit(3)


@app.command()
def history(
    patient: Annotated[
        Path, typer.Argument(help="A priors Bundle (FHIR JSON) or a folder holding priors.json.")
    ],
    out: Annotated[Path, typer.Option(help="Folder for history.png and history.svg.")] = Path("out"),
) -> None:
    """Print each lesion's history and the RECIST course; draw the sum of diameters over time."""
    from adapters.charts import CoursePoint, draw_course
    from adapters.fhir_priors import load_priors
    from core.history import assess_history

    with _user_errors(out):
        bundle = patient / "priors.json" if patient.is_dir() else patient
        _, tps = load_priors(bundle)
        if not tps:
            raise InputError(f"{bundle.name!r} holds no prior imaging report; nothing to chart")
        course = assess_history(tps)
        tracks: dict[str, tuple[str, str]] = {}
        for tp in tps:
            for f in tp.findings:
                tracks.setdefault(f.track_id, (f.label or f.track_id[-6:], f.organ.value))
        table = Table(title="Lesion history (RECIST diameter, mm: long axis; short axis for nodes)")
        table.add_column("lesion")
        table.add_column("site")
        for a in course:
            table.add_column(a.study_date.isoformat(), justify="right")
        for tid, (label, organ) in sorted(tracks.items(), key=lambda kv: kv[1][0]):
            cells = [f"{a.diameters_mm[tid]:.0f}" if tid in a.diameters_mm else "—" for a in course]
            table.add_row(label, organ.replace("_", " "), *cells)
        table.add_row(
            "sum of targets",
            "",
            *[f"{a.target_sum_mm:.0f}" if a.target_sum_mm is not None else "NE" for a in course],
        )
        table.add_row(
            "RECIST 1.1", "", *["baseline" if a.recist is None else a.recist.category.value for a in course]
        )
        table.add_row("iRECIST", "", *["" if a.irecist is None else a.irecist.response.value for a in course])
        out_console.print(table)
        for a in course[1:]:
            assert a.recist is not None
            out_console.print(
                f"[bold]{a.study_date.isoformat()}[/]: " + " ".join(a.recist.trace), highlight=False
            )
        paths = draw_course(
            [
                CoursePoint(a.study_date, a.target_sum_mm, a.recist.category.value if a.recist else None)
                for a in course
            ],
            out / "history",
        )
        out_console.print("wrote " + ", ".join(str(p) for p in paths))


@app.command("second-look-nulls")
def second_look_nulls_cmd(
    cohort: Annotated[Path, typer.Argument(help="A cohort made by 'interval synth'.")],
    organ: Annotated[
        list[str] | None, typer.Option(help="liver (default) and/or lung; repeat for both.")
    ] = None,
    per_study: Annotated[int, typer.Option(help="Lesion-free positions per organ and study.")] = 12,
    every: Annotated[int, typer.Option(help="Use every n-th follow-up study.")] = 2,
    out: Annotated[Path | None, typer.Option(help="Write the counts as JSON here.")] = None,
) -> None:
    """How often the image second looks answer at lesion-free positions (a resolved lesion read as persisting)."""
    from core.lesions import ORGAN_LABEL
    from fixtures.synth.look_nulls import count_null_answers
    from models.segmentation.inference import MonaiSegmenter

    with _user_errors(out.parent if out else None):
        searched = {o.value: o for o in ORGAN_LABEL}  # the organs the image looks search
        names = organ or ["liver"]
        if any(o not in searched for o in names):
            raise InputError(f"--organ must be {' or '.join(searched)}, got {names}")
        organs = tuple(searched[o] for o in names)
        result = count_null_answers(cohort, MonaiSegmenter(), organs, per_study, every)
        text = json.dumps(result, indent=1)
        out_console.print(text)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")


@app.command("evaluate-tracking")
def evaluate_tracking_cmd(
    cohort: Annotated[Path, typer.Argument(help="A cohort made by 'interval synth'.")],
    segmenter: Annotated[str, typer.Option(help="'truth' (ground-truth masks) or 'model'.")] = "truth",
    out: Annotated[Path | None, typer.Option(help="Write the figures as JSON here.")] = None,
    calibrated: Annotated[
        bool,
        typer.Option(
            help="With --segmenter model: apply the site calibrations in INTERVAL_CALIBRATION_DIR, as the service does."
        ),
    ] = True,
) -> None:
    """Track linking, new-lesion recall and RECIST agreement over every follow-up of a cohort."""
    from adapters.settings import Settings
    from fixtures.synth.evaluation import TruthSegmenter, evaluate_tracking

    with _user_errors(out.parent if out else None):
        settings = Settings()  # the analysis settings the service would use (INTERVAL_* environment)
        if segmenter == "truth":
            result = evaluate_tracking(cohort, TruthSegmenter, err_console.print, settings.analysis())
        elif segmenter == "model":
            from models.segmentation.calibration import calibrated_segmenter

            model = calibrated_segmenter(settings, tta=False, calibrated=calibrated)
            result = evaluate_tracking(cohort, lambda _: model, err_console.print, settings.analysis())
            result["model_version"] = model.model_version
            result["calibration_dir"] = str(settings.calibration_dir) if calibrated else None
            result["calibrations_applied"] = dict(model.applied)
        else:
            raise InputError(f"--segmenter must be 'truth' or 'model', got {segmenter!r}")
        result["segmenter"] = segmenter
        table = Table(title=f"Longitudinal validation ({segmenter} segmentation)")
        for col in (
            "group",
            "track links",
            "new lesions >= 10 mm",
            "RECIST agreement",
            "second looks on a lesion",
        ):
            table.add_column(col)
        for key, v in result["summary"].items():
            t, n, r, g = v["track_links"], v["new_lesion_recall"], v["recist_agreement"], v["second_looks"]
            table.add_row(
                key,
                f"{t['correct']}/{t['total']} ({t['rate']})",
                f"{n['found']}/{n['total']} ({n['rate']})",
                f"{r['agree']}/{r['total']} ({r['rate']})",
                f"{g['on_a_true_lesion']}/{g['total']}",
            )
        out_console.print(table)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))


@app.command()
def validate(
    cohort: Annotated[Path, typer.Argument(help="A labelled cohort ('interval synth' format).")],
    out: Annotated[
        Path | None, typer.Option(help="Write the figures (and per-study records) as JSON here.")
    ] = None,
    vendor: Annotated[list[str] | None, typer.Option(help="Only these vendor profiles (repeatable).")] = None,
    calibrated: Annotated[
        bool,
        typer.Option(help="Apply the site calibrations in INTERVAL_CALIBRATION_DIR, as the service does."),
    ] = True,
) -> None:
    """Lesion sensitivity, false positives per study, Dice and diameter error, per vendor, size band and organ,
    against the imaging targets (sensitivity >= 95% for lesions >= 10 mm, <= 0.5 FP/study, median error <= 1.5 mm)."""
    with _user_errors(out.parent if out else None):
        from adapters.settings import Settings
        from models.segmentation.calibration import calibrated_segmenter
        from models.segmentation.validation import markdown_table, records_json, summarize, validate_cohort

        settings = Settings()
        segmenter = calibrated_segmenter(settings, tta=False, calibrated=calibrated)
        model = segmenter.inner
        records = validate_cohort(
            cohort, segmenter, vendors=set(vendor or []) or None, progress=err_console.print
        )
        summary = summarize(records)
        summary["model_version"] = model.model_version
        summary["cohort"] = str(cohort)
        summary["calibrations_applied"] = dict(segmenter.applied)
        summary["edge_refinement"] = model.edges is not None
        out_console.print(markdown_table(summary))
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({**summary, "studies": records_json(records)}, indent=1))
            out.with_suffix(".md").write_text(markdown_table(summary))


@app.command()
def audit(
    cohort: Annotated[
        Path, typer.Argument(help="A labelled cohort with patient sex, age band and body size.")
    ],
    records: Annotated[
        Path | None,
        typer.Option(help="Reuse the per-study records of an 'interval validate --out' JSON (no model run)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write the audit as JSON (and Markdown beside it).")
    ] = None,
    resamples: Annotated[int, typer.Option(min=100, help="Bootstrap resamples (of patients).")] = 1000,
) -> None:
    """Sensitivity, false positives and measurement error per sex, age band, body size and vendor, with bootstrap
    confidence intervals; subgroups served clearly worse than the rest are flagged."""
    with _user_errors(out.parent if out else None):
        from models.segmentation.audit import audit as run_audit
        from models.segmentation.validation import StudyRecord

        if records is not None:
            studies = [StudyRecord.from_json(d) for d in json.loads(records.read_text())["studies"]]
        else:
            from adapters.settings import Settings
            from models.segmentation.calibration import calibrated_segmenter
            from models.segmentation.validation import validate_cohort

            segmenter = calibrated_segmenter(Settings(), tta=False)
            studies = validate_cohort(cohort, segmenter, progress=err_console.print)
        result = run_audit(studies, n_boot=resamples)
        result["cohort"] = str(cohort)
        out_console.print(result["markdown"])
        flagged = result["flagged"]
        out_console.print(
            "flagged: "
            + (
                "; ".join(f"{f['attribute']}={f['value']} ({', '.join(f['metrics'])})" for f in flagged)
                or "none"
            )
        )
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
            out.with_suffix(".md").write_text(result["markdown"])


@app.command()
def calibrate(
    cohort: Annotated[
        Path, typer.Argument(help="A handful of labelled studies of one site ('interval synth' format).")
    ],
    out_dir: Annotated[
        Path | None, typer.Option(help="Where to write the calibrations (default INTERVAL_CALIBRATION_DIR).")
    ] = None,
    per_station: Annotated[
        bool, typer.Option(help="One calibration per StationName instead of per scanner model.")
    ] = False,
) -> None:
    """Fit a recalibration per scanner found in COHORT (HU offset, noise harmonisation, lesion decision bias) and
    write it where the service applies it automatically to that scanner's studies."""
    with _user_errors(out_dir):
        from adapters.settings import Settings
        from models.segmentation.calibration import file_name, fit_cohort
        from models.segmentation.inference import segmenter_from_settings

        settings = Settings()
        folder = out_dir or settings.calibration_dir
        fitted = fit_cohort(cohort, segmenter_from_settings(settings, tta=False), per_station=per_station)
        folder.mkdir(parents=True, exist_ok=True)
        for cal in fitted:
            path = folder / file_name(cal)
            path.write_text(json.dumps(cal.to_json(), indent=1) + "\n")
            f = cal.fitted
            out_console.print(
                f"{cal.scanner}: HU offset {cal.hu_offset:+.1f}, smoothing {cal.smooth_sigma_mm} mm, lesion bias "
                f"{cal.lesion_logit_bias:+.2f}; on its {f['studies']} studies found {f['before']['found']} -> "
                f"{f['after']['found']} of {f['after']['total']}, FP/study {f['before']['false_positives_per_study']}"
                f" -> {f['after']['false_positives_per_study']}, median diameter error "
                f"{f['before']['median_abs_diameter_error_mm']} -> {f['after']['median_abs_diameter_error_mm']} mm;"
                f" wrote {path}"
            )


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Run the FHIR API (analysis Tasks, reports) with the model loaded once; settings from INTERVAL_*."""
    with _user_errors():
        import uvicorn

        from workers.serve import app_from_env

        uvicorn.run(app_from_env(), host=host, port=port, log_level="info")


@app.command()
def worker(
    queues: Annotated[
        str,
        typer.Option(
            "--queues", "-Q", help="Comma-separated: imaging (model inference), default (everything else)."
        ),
    ] = "imaging,default",
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, help="Worker processes (prefork), one task each.")
    ] = 1,
    hostname: Annotated[
        str | None, typer.Option("--hostname", "-n", help="Node name, e.g. imaging1@%h (default celery@%h).")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run a Celery worker of the analysis pipeline; settings (broker, database, EHR, PACS) from INTERVAL_*."""
    with _user_errors():
        names = [q.strip() for q in queues.split(",") if q.strip()]
        from workers.celery_app import QUEUES

        unknown = [q for q in names if q not in QUEUES]
        if not names or unknown:
            raise InputError(f"unknown queue(s) {unknown or queues!r}; choose from {', '.join(QUEUES)}")
        from workers.celery_app import app as celery_app

        argv = ["worker", "-Q", ",".join(names), "-c", str(concurrency), "-P", "prefork", "-l", loglevel]
        argv += ["--without-mingle", "--without-gossip"]  # no peer chatter: workers share nothing but Redis
        if hostname:
            argv += ["-n", hostname]
        code = celery_app.start(argv=argv)  # worker_main would drop the exit code
        if code:
            raise typer.Exit(int(code))


@app.command()
def flower(
    address: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 5555,
    no_auth: Annotated[
        bool, typer.Option("--no-auth", help="Serve without a password (only on a loopback address).")
    ] = False,
) -> None:
    """Run Flower, Celery's monitor, on the pipeline's broker: workers, queues, every task and its retries.
    The password comes from INTERVAL_FLOWER_BASIC_AUTH ("user:password")."""
    with _user_errors():
        from adapters.settings import Settings
        from workers.celery_app import app as celery_app

        settings = Settings()
        argv = ["flower", f"--address={address}", f"--port={port}", "--purge_offline_workers=300"]
        if settings.flower_basic_auth:
            if ":" not in settings.flower_basic_auth:
                raise InputError('INTERVAL_FLOWER_BASIC_AUTH must be "user:password"')
            argv.append(f"--basic-auth={settings.flower_basic_auth}")
        elif not no_auth:
            raise InputError("set INTERVAL_FLOWER_BASIC_AUTH (user:password), or pass --no-auth on loopback")
        elif address not in ("127.0.0.1", "::1", "localhost"):
            raise InputError(f"--no-auth serves only a loopback address, not {address!r}")
        else:
            os.environ["FLOWER_UNAUTHENTICATED_API"] = "true"
        code = celery_app.start(argv=argv)
        if code:
            raise typer.Exit(int(code))


@app.command()
def token(
    client: Annotated[str, typer.Argument(help="Client id the token is issued to (its 'sub').")],
    scope: Annotated[
        str, typer.Option(help="Space-separated SMART scopes.")
    ] = "system/Task.cr system/Task.s system/DiagnosticReport.rs",
    hours: Annotated[float, typer.Option(help="Lifetime.")] = 24.0,
) -> None:
    """Issue an API bearer token signed with INTERVAL_API_TOKEN_SECRET (for an EHR integration)."""
    with _user_errors():
        from adapters.settings import Settings
        from service.auth import mint_token

        settings = Settings()
        out_console.print(
            mint_token(
                settings.api_token_secret,
                client,
                scope,
                ttl_s=int(hours * 3600),
                issuer=settings.api_token_issuer,
            ),
            highlight=False,
            soft_wrap=True,
        )


@app.command("watch-pacs")
def watch_pacs(
    api: Annotated[
        str | None,
        typer.Option(help="Interval's API that receives the Tasks (default: INTERVAL_PUBLIC_BASE_URL)."),
    ] = None,
    orthanc: Annotated[
        str | None,
        typer.Option(
            help="Orthanc's REST root (default: INTERVAL_PACS_ORTHANC_URL, else from the DICOMweb URL)."
        ),
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option(
            help="Position in Orthanc's change log, kept across restarts (INTERVAL_PACS_WATCH_STATE)."
        ),
    ] = None,
    interval: Annotated[
        float | None, typer.Option(min=0.1, help="Seconds between polls (INTERVAL_PACS_WATCH_INTERVAL_S).")
    ] = None,
    from_start: Annotated[
        bool, typer.Option(help="Without a state file: read Orthanc's whole change log, not only what comes.")
    ] = False,
    once: Annotated[bool, typer.Option(help="One pass over the new changes, then exit.")] = False,
) -> None:
    """Order an analysis (a FHIR Task to the API) for each study the PACS (Orthanc) announces as stable."""
    with _user_errors():
        import logging
        import signal
        import threading

        from adapters.dicomweb import StableStudyWatcher
        from adapters.settings import Settings
        from workers.pacs_trigger import PacsTrigger, TaskApi, orthanc_url
        from workers.serve import pacs_client

        settings = Settings()
        root = orthanc or orthanc_url(settings)
        pacs = pacs_client(settings)
        if pacs is None:
            raise InputError(
                "set INTERVAL_PACS_DICOMWEB_URL: the watcher reads each study's series by QIDO-RS"
            )
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        for name in ("httpx", "httpcore"):  # request URLs can hold identifiers
            logging.getLogger(name).setLevel(logging.WARNING)
        trigger = PacsTrigger(
            StableStudyWatcher(root, timeout=settings.ehr_timeout_s, retries=settings.ehr_retry_attempts - 1),
            pacs,
            TaskApi.from_settings(api or settings.public_base_url, settings),
            state or settings.pacs_watch_state,
            from_start=from_start,
        )
        try:
            if once:
                for outcome in trigger.run_once():
                    out_console.print(
                        f"{outcome.study_uid}: {outcome.action} {outcome.task_id or ''} {outcome.detail}",
                        highlight=False,
                    )
                return
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            err_console.print(f"watching {root} for stable studies; Tasks to {trigger.api.base_url}")
            trigger.run(stop, interval or settings.pacs_watch_interval_s)
        finally:
            trigger.close()
            pacs.close()


user_app = typer.Typer(
    no_args_is_help=True, help="Accounts of the web pages (radiologists, clinicians, admins)."
)
app.add_typer(user_app, name="user")
app.add_typer(drift_app, name="drift")
PASSWORD_ENV = "INTERVAL_USER_PASSWORD"


def _new_password() -> str:
    """The password from INTERVAL_USER_PASSWORD, else asked twice at the terminal (never an argument: it
    would stay in the shell history and the process list)."""
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return from_env
    if not sys.stdin.isatty():
        raise InputError(f"no terminal to ask the password on: set {PASSWORD_ENV}")
    return str(typer.prompt("Password", hide_input=True, confirmation_prompt=True))


@user_app.command("add")
def user_add(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, . _ @ -).")],
    role: Annotated[str, typer.Option(help="radiologist, clinician or admin.")],
    site: Annotated[
        list[str],
        typer.Option(help="A site whose studies the user reads; repeat for more; * for every site."),
    ],
    display_name: Annotated[str | None, typer.Option(help="Name shown on pages and signatures.")] = None,
    practitioner: Annotated[
        str | None,
        typer.Option(help="The user's Practitioner at the EHR (Practitioner/id), the report signer."),
    ] = None,
) -> None:
    """Add a web account; the password comes from INTERVAL_USER_PASSWORD or a prompt (argon2id-hashed)."""
    with _user_errors():
        from adapters.settings import Settings
        from service.users import UserStore

        users = UserStore(Settings().database_url)
        try:
            user = users.add_user(
                name,
                _new_password(),
                role=role,
                sites=site,
                display_name=display_name,
                practitioner_ref=practitioner,
            )
        finally:
            users.close()
        out_console.print(
            f"added {user.username} ({user.role.value}, sites: {', '.join(user.sites)})", highlight=False
        )


@user_app.command("password")
def user_password(name: Annotated[str, typer.Argument(help="User name.")]) -> None:
    """Set a new password (from INTERVAL_USER_PASSWORD or a prompt); the user's sessions end."""
    with _user_errors():
        from adapters.settings import Settings
        from service.users import UserStore

        users = UserStore(Settings().database_url)
        try:
            users.set_password(name, _new_password())
        finally:
            users.close()
        out_console.print(f"password of {name} changed", highlight=False)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
