"""``valve-id models ...``: list, inspect, promote, roll back and prune model versions.

A thin layer over :class:`training.shared.registry.ModelRegistry`; every change it makes goes
through
the registry's lock and history, exactly as a training job's publish does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from backend.settings import Settings
from training.shared.errors import ModelLoadError, ModelNotFound, ValveIdError
from training.shared.registry import ModelRegistry, Registry, VersionInfo
from training.shared.retention import RetentionPolicy
from training.shared.version_config import CONFIG_FILE, VersionConfig, read_version_file

__all__ = ["models_app"]

models_app = typer.Typer(
    help="Inspect the trained model versions and switch the one being served.",
    no_args_is_help=True,
)

ModelDir = Annotated[
    Path | None,
    typer.Option(
        "--model-dir",
        help="Model registry root (default: the settings' MODEL_DIR or <state>/models).",
        file_okay=False,
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Reason = Annotated[str, typer.Option("--reason", help="Why; recorded in the registry history.")]

_console = Console()
_err_console = Console(stderr=True)


@contextmanager
def _exit_on_error() -> Iterator[None]:
    """Turn a valve-id error into one red line and exit status 1, not a traceback."""
    try:
        yield
    except ValveIdError as exc:
        _err_console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc


def _registry(model_dir: Path | None) -> Registry:
    """The registry at ``--model-dir``, else where the settings put it (MODEL_DIR: a folder
    or ``s3://bucket/prefix``); absolute either way, so that every message names the folder
    actually read."""
    if model_dir is not None:
        return ModelRegistry(model_dir.expanduser().absolute())
    return Settings.from_env().open_registry()


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


@models_app.command("list")
def list_versions(model_dir: ModelDir = None, as_json: AsJson = False) -> None:
    """List model versions, oldest first; the current one is marked."""
    with _exit_on_error():
        registry = _registry(model_dir)
        versions = registry.list_versions()
    if as_json:
        typer.echo(json.dumps([v.to_dict() for v in versions], indent=2))
        return
    if not versions:
        _console.print(f"No model versions in {registry.location}.", soft_wrap=True)
        return
    # The id already says when (UTC); `show` gives the exact publish time.
    _console.print(f"Model versions in {registry.location}", soft_wrap=True)
    table = Table()
    for column in ("", "version", "macro-F1", "accuracy", "classes", "gate", "weights"):
        table.add_column(column, no_wrap=True)
    for v in versions:
        table.add_row(
            "*" if v.is_current else "",
            v.version_id,
            _fmt(v.f1_macro),
            _fmt(v.accuracy),
            str(len(v.classes)),
            v.gate or "—",
            "pruned" if v.pruned else "kept",
        )
    _console.print(table)
    _console.print("* = current. `valve-id models show VERSION` tells why the gate decided so.")
    if any(v.pruned for v in versions):
        _console.print(
            "pruned = retention deleted its weights: metrics and report remain, not servable."
        )


@models_app.command("show")
def show(
    version: Annotated[
        str | None, typer.Argument(help="Version id; the current version when left out.")
    ] = None,
    model_dir: ModelDir = None,
    as_json: AsJson = False,
) -> None:
    """Show one version: its key metrics, gate decision and config."""
    with _exit_on_error():
        registry = _registry(model_dir)
        if version is None:
            version = registry.current()
            if version is None:
                raise ModelNotFound(f"no current model version in {registry.location}")
        info = registry.get(version)
    config = _stored(info.path / CONFIG_FILE)
    metrics = _stored(info.path / "metrics.json")
    if as_json:
        typer.echo(
            json.dumps({"version": info.to_dict(), "config": config, "metrics": metrics}, indent=2)
        )
        return
    _print_summary(info, metrics)
    _console.print(f"[bold]{CONFIG_FILE}[/bold]")
    _console.print_json(data=config)
    try:
        VersionConfig.read(info.path)
    except ModelLoadError as exc:  # say so here rather than only in the backend's /health
        _err_console.print(
            f"[yellow]warning:[/yellow] the backend cannot serve this version: {exc}",
            highlight=False,
            soft_wrap=True,
        )


@models_app.command("promote")
def promote(
    version: Annotated[str, typer.Argument(help="Version id to serve.")],
    model_dir: ModelDir = None,
    reason: Reason = "manual (CLI)",
) -> None:
    """Serve VERSION from now on, whatever the promotion gate decided."""
    with _exit_on_error():
        registry = _registry(model_dir)
        previous = registry.current()
        registry.promote(version, reason=reason)
    typer.echo(f"current model version: {version} (was {previous or 'none'})")


@models_app.command("rollback")
def rollback(model_dir: ModelDir = None, reason: Reason = "manual (CLI)") -> None:
    """Serve the version that was current before the present one again."""
    with _exit_on_error():
        registry = _registry(model_dir)
        previous = registry.current()
        target = registry.rollback(reason=reason)
    typer.echo(f"current model version: {target} (rolled back from {previous})")


@models_app.command("prune")
def prune(
    model_dir: ModelDir = None,
    apply: Annotated[
        bool, typer.Option("--apply", help="Delete the weights; without it, only show what.")
    ] = False,
    keep_versions: Annotated[
        int | None,
        typer.Option(
            "--keep-versions", min=1, help="Override VALVE_ID_KEEP_VERSIONS for this prune."
        ),
    ] = None,
    keep_days: Annotated[
        float | None,
        typer.Option("--keep-days", min=0.0, help="Override VALVE_ID_KEEP_DAYS for this prune."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Delete the weights of old versions (a dry run unless --apply).

    Keeps current, the version before it, the last VALVE_ID_KEEP_VERSIONS versions made
    current and every version younger than VALVE_ID_KEEP_DAYS; the others keep metrics,
    config, report and promotion record.
    """
    with _exit_on_error():
        settings = Settings.from_env()
        registry = _registry(model_dir)
        policy = RetentionPolicy(
            settings.keep_versions if keep_versions is None else keep_versions,
            settings.keep_days if keep_days is None else keep_days,
        )
        result = registry.prune(policy, apply=apply)
    if as_json:
        rows = [
            {"version": p.version_id, "freed_bytes": p.freed_bytes, "files": p.files}
            for p in result.pruned
        ]
        typer.echo(
            json.dumps(
                {"applied": apply, "freed_bytes": result.freed_bytes, "pruned": rows}, indent=2
            )
        )
        return
    verb = "pruned" if apply else "would prune"
    for p in result.pruned:
        typer.echo(f"{verb} {p.version_id}: {p.freed_bytes / 1e6:.1f} MB in {p.files} file(s)")
    if apply:
        typer.echo(f"freed {result.freed_bytes / 1e6:.1f} MB in {registry.location}")
    else:
        typer.echo(
            f"would free {result.freed_bytes / 1e6:.1f} MB in {registry.location} "
            "(dry run; --apply deletes)"
        )


def _print_summary(info: VersionInfo, metrics: dict[str, Any]) -> None:
    table = Table(title=f"Model version {info.version_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("current", "yes" if info.is_current else "no")
    table.add_row("created (UTC)", info.created.isoformat() if info.created else "—")
    table.add_row("path", str(info.path))
    table.add_row("classes", ", ".join(info.classes) or "—")
    mean = metrics.get("mean")
    if not isinstance(mean, dict):
        mean = {}
    for name, value in sorted(mean.items()):
        if isinstance(value, int | float) and not isinstance(value, bool):
            table.add_row(f"out-of-fold {name}", f"{value:.4f}")
    table.add_row("promotion gate", f"{info.gate or '—'}: {info.gate_reason or '—'}")
    if info.pruned:
        table.add_row("weights", "pruned by retention (not servable)")
    _console.print(table)


def _stored(path: Path) -> dict[str, Any]:
    """A version's JSON file as stored, shown as it is; ``{}`` when it cannot be read."""
    try:
        return read_version_file(path)
    except ModelLoadError:
        return {}
