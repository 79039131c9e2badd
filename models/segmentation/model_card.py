"""The segmenter's model card, generated from what was measured (never written by hand).

    python -m models.segmentation.model_card --validation models/weights/validation.json \
        --calibration models/weights/calibration_uih.json --out models/MODEL_CARD.md

``card_for_settings`` finds the card of the model the settings choose (the committed ``models/MODEL_CARD.md``
when its title names that model's version; none for a user's own model), without loading the model: the API
shows it at ``/model-card`` and publishes it as a FHIR DocumentReference (``adapters.fhir_model_card``).

Sources: ``train_config.json`` (data recipe, network, training), a validation JSON written by
``interval validate`` (per vendor and group), optionally the unseen vendor's validation before and after
``interval calibrate``, the longitudinal figures (``tracking_model.json``) and a subgroup audit JSON when one
exists. Every figure in the card comes from those files; the card names them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

from adapters.fhir_model_card import MissingModelCard, ModelCard
from adapters.settings import Settings
from core.errors import ModelError
from models.segmentation.contract import source_from_settings
from models.segmentation.validation import TARGETS

__all__ = ["CARD", "card_for_settings", "card_version", "render_model_card"]

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "models" / "weights"
CARD = WEIGHTS.parent / "MODEL_CARD.md"
_TITLE = re.compile(r"# Model card: Interval lesion segmenter `([^`]+)`")
_GENERATE = "generate it from this model's validation (python -m models.segmentation.model_card, see models/MODEL_CARD.md)"


def card_version(markdown: str) -> str | None:
    """The model version a card's title names (``render_model_card`` writes it), or None."""
    match = _TITLE.match(markdown.lstrip())
    return match.group(1) if match else None


def card_for_settings(settings: Settings, card: Path = CARD) -> ModelCard | MissingModelCard:
    """The card of the model the settings choose (``source_from_settings``, as the workers' segmenter), or why
    there is none. Reads the model's files to name its version; loads no model (no torch)."""
    if settings.test_segmenter is not None:
        return MissingModelCard(
            None,
            "the synthetic cohort's ground truth",
            "a test hook replaces the model: there is no model card",
        )
    try:
        source = source_from_settings(settings)
        model, version = source.describe(), source.version()
    except (OSError, ModelError) as exc:
        why = exc if isinstance(exc, ModelError) else type(exc).__name__
        return MissingModelCard(None, "the configured model", f"the model could not be read ({why})")
    if source.kind != "builtin":
        return MissingModelCard(
            version,
            model,
            "this is your own model (INTERVAL_SEGMENTER_KIND="
            f"{source.kind}): Interval has a card for its built-in model only, and that card does not describe "
            "this one. Measure it on labelled studies of your sites (interval validate, interval audit) and keep "
            "its own documentation before clinical use.",
        )
    try:
        text = card.read_text(encoding="utf-8")
    except OSError:
        return MissingModelCard(version, model, f"{card.name} is missing: {_GENERATE}")
    described = card_version(text)
    if described != version:
        return MissingModelCard(
            version,
            model,
            f"{card.name} describes the model {described or '(no version in its title)'}, not these weights: "
            f"{_GENERATE}",
        )
    return ModelCard(version, text, model)


_LOOKS = {
    "guided": "the model at a lower threshold",
    "contrast": "image contrast",
    "faint": "the mean of a ball the lesion's size (liver)",
}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _edges_line(validation: dict[str, Any]) -> list[str]:
    """Whether the figures include the image-placed lesion edges (``core.edges``); nothing for records that predate
    the setting."""
    if "edge_refinement" not in validation:
        return []
    if validation["edge_refinement"]:
        return [
            "Measured as the service runs: clear-contrast lesion edges placed by the image after the model "
            "(`core/edges.py`; `INTERVAL_SEGMENTER_EDGE_REFINEMENT=false` turns it off)."
        ]
    return ["Measured with the model's own lesion edges (edge refinement off)."]


def _vendor_rows(validation: dict[str, Any]) -> list[str]:
    rows = [
        "| vendor | studies | sensitivity, lesions >= 10 mm | sensitivity, all | FP / study | "
        "median abs diameter error | lesion Dice | targets met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for vendor, r in validation["per_vendor"].items():
        met = [k for k, ok in r["meets_targets"].items() if ok]
        missed = [k for k, ok in r["meets_targets"].items() if not ok]
        verdict = "all" if not missed else "missed: " + ", ".join(missed)
        rows.append(
            f"| {vendor} | {r['studies']} | {_pct(r['sensitivity_ge10mm'])} ({r['found_ge10mm']}) | "
            f"{_pct(r['sensitivity_all'])} | {r['false_positives_per_study']} | "
            f"{r['median_abs_diameter_error_mm']} mm | {r['lesion_dice']} | {verdict if met or missed else '-'} |"
        )
    return rows


_DEMO_METRICS = (
    ("sensitivity_ge10mm", "sensitivity, lesions >= 10 mm", _pct),
    ("false_positives_per_study", "FP / study", lambda v: "-" if v is None else f"{v:.2f}"),
    (
        "median_abs_diameter_error_mm",
        "median abs diameter error",
        lambda v: "-" if v is None else f"{v:.2f} mm",
    ),
)


# the audit demonstration's two models: file key (``audit_<key>.json``, ``validation_<key>.json``), name
_DEMO_MODELS = (("left_out", "trained without it"), ("all_patients", "trained on all patients"))


def _audit_demo_lines(demo: dict[str, Any]) -> list[str]:
    """Does the audit find a subgroup the model never saw? The same recipe trained with and without one
    subgroup (the first training leg, ``models/weights/stage1``), audited on one cohort: that subgroup's row in
    each audit."""
    left_out: dict[str, str] = demo["train_config"]["left_out"]
    (attribute, value), *_ = left_out.items()
    used = len(demo["train_config"].get("patients_used", []))
    total = len(demo["train_config"]["cohort_meta"]["patients"])
    lines = [
        "## Audit demonstration: a model trained without one subgroup",
        "",
        f"The same recipe (network, steps, seed) trained on {used} of the {total} training patients, without "
        f"those with {attribute} = {value}, and on all {total} (`models/weights/stage1`: the first leg of the "
        "shipped model's training), both without site calibration, on one cohort "
        f"of {demo['cohort']}; `interval audit` on each. The {attribute} = {value} row of each audit (value, "
        "95% bootstrap CI over patients, gap to the other patients with its CI):",
        "",
        "| model | " + " | ".join(label for _, label, _ in _DEMO_METRICS) + " | flagged |",
        "|---|" + "---|" * (len(_DEMO_METRICS) + 1),
    ]
    for name, result in ((name, demo["audits"][key]) for key, name in _DEMO_MODELS):
        row = next(r for r in result["rows"] if r["attribute"] == attribute and r["value"] == value)
        cells = []
        for key, _, fmt in _DEMO_METRICS:
            m = row["metrics"][key]
            ci = m.get("ci95")
            gap_ci = m.get("gap_ci95")

            def signed(v: float, fmt: Any = fmt) -> str:
                return ("+" if v >= 0 else "-") + str(fmt(abs(v)))

            cells.append(
                f"{fmt(m['value'])}"
                + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")
                + (f"; gap {signed(m['gap'])} [{signed(gap_ci[0])}, {signed(gap_ci[1])}]" if gap_ci else "")
            )
        flags = ", ".join(row["flags"]) or "no"
        lines.append(f"| {name} ({result.get('model_version', '')}) | " + " | ".join(cells) + f" | {flags} |")
    for name, result in ((name, demo["audits"][key]) for key, name in _DEMO_MODELS):
        flagged = "; ".join(
            f"{f['attribute']}={f['value']} ({', '.join(f['metrics'])})" for f in result["flagged"]
        )
        lines.append(f"- Everything the audit flagged, model {name}: {flagged or 'nothing'}.")
    lines.append("")
    return lines


def _legs(train_config: dict[str, Any]) -> list[str]:
    """The training legs before the shipped one, by path, hash and steps: the ``init_from`` chain, each leg's
    train_config.json beside its weights."""
    chain: list[dict[str, Any]] = []
    start = train_config.get("init_from")
    while start and len(chain) < 10:
        chain.append(start)
        beside = (
            ROOT / start["path"]
        ).parent / "train_config.json"  # paths are recorded from the repository root
        start = json.loads(beside.read_text()).get("init_from") if beside.exists() else None
    if not chain:
        return []
    last = max((int(run.get("stopped_at_step", 0)) for run in train_config.get("runs", [])), default=0)
    earlier = [f"{leg['step']} steps (`{leg['path']}`, sha256 {leg['sha256']})" for leg in reversed(chain)]
    lines = [
        f"- {len(chain) + 1} training legs, each from the weights of the one before with a fresh optimizer and "
        f"schedule (each leg's train_config.json beside its weights): {'; then '.join(earlier)}; then {last} "
        "steps of the recipe above."
    ]
    mined = train_config.get("hard_examples")
    if mined:
        summary = mined["summary"]
        lines.append(
            f"- Hard examples of the last leg (`{mined['path']}`, `models.segmentation.mining`): the errors of "
            f"`{mined['mined_with']}` (sha256 {mined['mined_with_sha256']}) on its training time points: "
            f"{summary['lesions']} lesions, median Dice {summary['median_dice']}, "
            f"{summary['missed (Dice < 0.1)']} missed, {summary['false_positives']} false-positive components."
        )
    return lines


def render_model_card(
    train_config: dict[str, Any],
    validation: dict[str, Any],
    unseen: dict[str, dict[str, Any]] | None = None,
    calibrated: dict[str, Any] | None = None,
    tracking: dict[str, Any] | None = None,
    audit: dict[str, Any] | None = None,
    sources: dict[str, str] | None = None,
    audit_demo: dict[str, Any] | None = None,
) -> str:
    opts = train_config["cohort_meta"]["options"]
    seen = ", ".join(opts["vendors"])
    net = train_config["net"]
    lines = [
        f"# Model card: Interval lesion segmenter `{validation['model_version']}`",
        "",
        "Generated by `python -m models.segmentation.model_card` from measured results"
        + (" (" + ", ".join(f"`{v}`" for v in (sources or {}).values()) + ")" if sources else "")
        + ". Do not edit by hand.",
        "",
        "## Intended use",
        "",
        "- Detect, segment and measure liver lesions, lung nodules and enlarged lymph nodes on adult chest/abdomen "
        "CT (axial series), as the measurement step of a follow-up (RECIST 1.1) report **drafted for a "
        "radiologist**, who reviews every finding, accepts or rejects it, and signs. Not for screening, "
        "not for diagnosis without a reader, not for children, not for non-CT images.",
        "- Output: organ + lesion label map, one instance per lesion with its probability, RECIST diameters and "
        "volume; DICOM SEG and TID 1500 SR; FHIR Observations marked AI-asserted.",
        "",
        "## Input specification",
        "",
        "- CT, axial, one series per study (the ingest selects it and refuses what it cannot read correctly: "
        "see README, 'Bad input').",
        "- Trained on 192x192 matrices, in-plane spacing 1.9-2.3 mm, slices 2-5 mm; finer series are averaged "
        "to a 2.0 mm in-plane / 2.5 mm slice working grid before inference and results return to the native grid.",
        "- Intensity: HU, encoded as two windows (soft tissue -160..240 HU, lung -1000..400 HU).",
        "",
        "## Training data and model",
        "",
        f"- Synthetic longitudinal CT cohort (`interval synth`), seed {opts['seed']}, "
        f"{len(train_config['cohort_meta']['patients'])} patients, vendor profiles {seen}, "
        f"contrast phases {'varied' if opts.get('contrast') else 'non-contrast only'}; "
        "sex, age band and body size drawn per patient.",
        f"- MONAI UNet, channels {net['channels']}, strides {net['strides']}, {net['num_res_units']} residual "
        f"unit(s); loss {train_config['loss']}; optimizer {train_config['optimizer']}; patch "
        f"{train_config['patch']}, batch {train_config['batch']}; sampling {train_config['sampling']}; "
        f"seed {train_config['seed']}"
        + (f"; augmentation: {train_config['augment']}" if "augment" in train_config else "")
        + f". Hardware: {train_config.get('hardware', 'not recorded')}.",
        *_legs(train_config),
        "",
        "## Performance per vendor (held-out synthetic patients)",
        "",
        f"Cohort `{validation['cohort']}`. Targets: sensitivity >= {_pct(TARGETS['sensitivity_ge10mm'])} for "
        f"lesions >= 10 mm, <= {TARGETS['false_positives_per_study']} false positives per study, median absolute "
        f"RECIST-diameter error <= {TARGETS['median_abs_diameter_error_mm']} mm.",
        *_edges_line(validation),
        "",
        *_vendor_rows(validation),
        "",
    ]
    groups = validation["groups"]
    lines += ["| group | found / total | sensitivity | median abs diameter error (mm) |", "|---|---|---|---|"]
    for key in sorted(k for k in groups if k.startswith(("organ:", "size:"))):
        g = groups[key]
        lines.append(
            f"| {key} | {g['found']} / {g['total']} | {_pct(g['sensitivity'])} | "
            f"{g['median_abs_diameter_error_mm']} |"
        )
    if calibrated is not None:
        lines += [
            "",
            "## The same held-out patients after per-site calibration (`interval calibrate`)",
            "",
            f"Calibrations applied: {', '.join(f'{k} ({n} studies)' for k, n in calibrated['calibrations_applied'].items())}.",
            "",
            *_vendor_rows(calibrated),
        ]
    if unseen:
        lines += ["", "## A scanner never seen in training, before and after site calibration", ""]
        for label, v in unseen.items():
            lines += [f"**{label}** (cohort `{v['cohort']}`)", "", *_vendor_rows(v), ""]
    if tracking is not None:
        s = tracking["summary"]["all"]
        lines += [
            "## Longitudinal use (whole pipeline with this model)",
            "",
            f"- Track links {s['track_links']['correct']}/{s['track_links']['total']} "
            f"({_pct(s['track_links']['rate'])}), new lesions >= 10 mm found "
            f"{s['new_lesion_recall']['found']}/{s['new_lesion_recall']['total']}, RECIST 1.1 category equal "
            f"to the truth {s['recist_agreement']['agree']}/{s['recist_agreement']['total']} "
            f"({_pct(s['recist_agreement']['rate'])}).",
        ]
        looks = tracking.get("second_look_settings")
        if looks is not None:  # figures from before the record name no looks
            on = [_LOOKS[k] for k, v in looks.items() if v and k in _LOOKS]
            lines.append(f"- Second looks where a prior lesion was missed: {', '.join(on) or 'none'}.")
        lines.append("")
    if audit is not None:
        lines += ["## Subgroup audit", "", *audit.get("markdown", "").splitlines(), ""]
    if audit_demo is not None:
        lines += _audit_demo_lines(audit_demo)
    misses = sorted(
        f"{v} ({', '.join(k for k, ok in r['meets_targets'].items() if not ok)})"
        for v, r in validation["per_vendor"].items()
        if not all(r["meets_targets"].values())
    )
    lines += [
        "## Known limits",
        "",
        "- Trained and measured on synthetic CT only: these figures show the method and its failure modes, "
        "not performance on patients. A site must validate on its own labelled studies (`interval validate`) "
        "and calibrate (`interval calibrate`) before clinical use.",
        "- Lesions under 10 mm are often missed; a lesion that shrinks below that may be reported as absent "
        "(a partial response read as complete). The pipeline looks again at a missed lesion's prior position (in "
        "the model's output at a lower threshold, then by its contrast in the liver and lungs) and marks what it "
        "finds so as faint; a small low-contrast lesion on thick or noisy slices still escapes both: the reader "
        "must check resolved targets.",
        "- Targets missed on the held-out cohort: " + ("; ".join(misses) if misses else "none") + ".",
        "- Lymph nodes are found by context (not liver, not lung); node short axes are less accurate.",
        "",
        "## Human oversight",
        "",
        "- Every report is `preliminary` and AI-asserted until a radiologist signs it; each AI finding must be "
        "accepted or rejected explicitly; a per-site switch turns AI drafting off; every AI output, view, edit "
        "and signature is logged as a FHIR AuditEvent.",
        "- Drift of inputs and outputs is monitored per site and scanner; alerts name the site, signals and "
        "studies.",
        "",
    ]
    return "\n".join(lines)


def _read_demo(folder: Path) -> dict[str, Any] | None:
    """``make audit-demo``'s files: each model's validation records and audit (the audit stamped with the
    validation's model version), and the left-out model's training config; None until all are there."""
    config = folder / "train_config.json"
    files = {
        key: (folder / f"validation_{key}.json", folder / f"audit_{key}.json") for key, _ in _DEMO_MODELS
    }
    if not config.is_file() or not all(p.is_file() for pair in files.values() for p in pair):
        return None
    validations = {key: json.loads(v.read_text()) for key, (v, _) in files.items()}
    audits = {key: json.loads(a.read_text()) for key, (_, a) in files.items()}
    for key, audit in audits.items():
        audit.setdefault("model_version", validations[key]["model_version"])
    n_patients = len({r["patient"] for r in validations["left_out"]["studies"]})
    cohort = audits["left_out"].get("cohort", "")
    return {
        "train_config": json.loads(config.read_text()),
        "audits": audits,
        "cohort": f"{n_patients} generated patients of the seen vendors (`{cohort}`)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--validation", type=Path, required=True, help="JSON from 'interval validate'")
    ap.add_argument("--unseen-before", type=Path, help="the unseen vendor's validation without calibration")
    ap.add_argument("--unseen-after", type=Path, help="the same after 'interval calibrate'")
    ap.add_argument("--calibrated", type=Path, help="the same validation with the site calibrations applied")
    ap.add_argument("--tracking", type=Path, default=WEIGHTS / "tracking_model.json")
    ap.add_argument("--audit", type=Path)
    ap.add_argument(
        "--audit-demo",
        type=Path,
        default=WEIGHTS / "subgroup_demo",
        help="the folder 'make audit-demo' writes (a model trained without one subgroup, both audits)",
    )
    ap.add_argument("--out", type=Path, default=Path("models/MODEL_CARD.md"))
    args = ap.parse_args()

    def read(p: Path | None) -> dict[str, Any] | None:
        return json.loads(p.read_text()) if p is not None and p.is_file() else None

    unseen = {
        label: v
        for label, v in (
            ("before calibration", read(args.unseen_before)),
            ("after calibration", read(args.unseen_after)),
        )
        if v is not None
    }
    paths = [
        args.validation,
        args.calibrated,
        args.unseen_before,
        args.unseen_after,
        args.tracking,
        args.audit,
    ]
    card = render_model_card(
        json.loads((WEIGHTS / "train_config.json").read_text()),
        json.loads(args.validation.read_text()),
        unseen or None,
        read(args.calibrated),
        read(args.tracking),
        read(args.audit),
        sources={str(i): os.path.relpath(p) for i, p in enumerate(paths) if p is not None and p.is_file()},
        audit_demo=_read_demo(args.audit_demo),
    )
    args.out.write_text(card)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
