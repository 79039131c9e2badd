"""``interval drift``: set a scanner's reference, and see where the monitored scanners stand.

    interval drift reference SITE STATION --from validation.jsonl     # signals written by benchmarks/drift
    interval drift reference SITE STATION --recorded 120              # the unit's last 120 recorded studies
    interval drift status

A reference is calibrated when it is set (``core.drift_calibration.build_reference``): half of the studies
become the reference, the other half a simulated stable stream that sets the rule for the false-alarm rate
asked for. Setting a reference restarts the unit's window and resolves its active alerts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from core.drift import DecisionRule
from core.drift_signals import CATALOGUE, SignalGroup, StudySignals, Unit
from core.errors import InputError

__all__ = ["drift_app"]

_DEFAULT_RULE = DecisionRule()
drift_app = typer.Typer(no_args_is_help=True, help="Drift monitoring: references and status per scanner.")


def _signals_option(value: str | None) -> list[str] | None:
    """Signal names or groups (header, image, output), comma-separated; None: all."""
    if not value:
        return None
    names: list[str] = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        if part in SignalGroup.__members__.values():
            names += [n for n, s in CATALOGUE.items() if s.group.value == part]
        elif part in CATALOGUE:
            names.append(part)
        else:
            raise InputError(
                f"unknown signal or group {part!r}: use header, image, output or names from {list(CATALOGUE)}"
            )
    return names


def _read_jsonl(path: Path, unit: Unit) -> list[StudySignals]:
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InputError(f"cannot read {path.name}: {exc.strerror}") from None
    studies: list[StudySignals] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            studies.append(StudySignals.from_json(json.loads(line)))
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"{path.name} line {n}: not a study's signals ({type(exc).__name__}: {exc})"
            ) from None
    return [s for s in studies if s.unit == unit]


@drift_app.command("reference")
def reference_cmd(
    site: Annotated[str, typer.Argument(help="Site of the scanner.")],
    station: Annotated[str, typer.Argument(help="DICOM StationName of the scanner.")],
    from_file: Annotated[
        Path | None, typer.Option("--from", help="JSON lines of study signals (StudySignals.to_json).")
    ] = None,
    recorded: Annotated[
        int | None, typer.Option(min=40, help="Use the unit's last N recorded studies instead.")
    ] = None,
    window: Annotated[int, typer.Option(min=2, help="Studies per window.")] = _DEFAULT_RULE.window,
    persistence: Annotated[
        int, typer.Option(min=1, help="Positive windows in a row that raise an alert.")
    ] = (_DEFAULT_RULE.persistence),
    target: Annotated[
        float, typer.Option(help="False alerts per 1000 stable studies to calibrate for.")
    ] = 0.25,
    signals: Annotated[str | None, typer.Option(help="Signals or groups to monitor (default: all).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the reference/calibration split.")] = 0,
) -> None:
    """Calibrate and set the reference of one scanner."""
    from workers.cli import _user_errors, out_console

    with _user_errors():
        from adapters.drift_store import DriftStore
        from adapters.settings import Settings
        from core.drift_calibration import build_reference

        if (from_file is None) == (recorded is None):
            raise InputError("give exactly one of --from FILE and --recorded N")
        unit = Unit(site, station)
        store = DriftStore(Settings().database_url)
        try:
            studies = _read_jsonl(from_file, unit) if from_file else store.studies(unit, limit=recorded or 0)
            reference = build_reference(
                unit,
                studies,
                rule=DecisionRule(window=window, persistence=persistence),
                target_per_1000=target,
                signals=_signals_option(signals),
                seed=seed,
            )
            resolved = store.set_reference(reference)
        finally:
            store.close()
        cal = reference.calibration
        out_console.print(
            f"reference of {unit} set: {cal['reference_studies']} reference + {cal['calibration_studies']} "
            f"calibration studies, {len(reference.signals)} signals; Holm level {reference.rule.alpha:.2g}, "
            f"score threshold {reference.rule.score_threshold:.2f}; estimated "
            f"{cal['estimated_false_alarms_per_1000']} false alerts per 1000 studies (target {target})"
            + (f"; resolved {len(resolved)} active alert(s)" if resolved else ""),
            highlight=False,
        )


@drift_app.command("status")
def status_cmd() -> None:
    """Every monitored scanner's score and state, and the active alerts."""
    from workers.cli import _user_errors, out_console

    with _user_errors():
        from adapters.drift_store import DriftStore
        from adapters.settings import Settings

        store = DriftStore(Settings().database_url)
        try:
            units, alerts = store.units(), store.alerts(status="active")
        finally:
            store.close()
        table = Table("site", "station", "reference", "studies", "score", "threshold", "alerts")
        for u in units:
            table.add_row(
                u.unit.site,
                u.unit.station,
                "yes" if u.has_reference else "none",
                str(u.studies_since_reference),
                "-" if u.score is None else f"{u.score:.1f}",
                "-" if u.score_threshold is None else f"{u.score_threshold:.1f}",
                str(u.active_alerts),
            )
        out_console.print(table)
        for a in alerts:
            out_console.print(f"[bold red]alert[/] {a.id}: {a.summary}", highlight=False)
