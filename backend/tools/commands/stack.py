"""``valve-id up`` / ``down`` / ``status``: the local stack (see :mod:`backend.tools.stack.local`).

Mounted into the root command line by :mod:`backend.tools.cli` (the commands sit at the top level:
``valve-id up``, not ``valve-id stack up``). Heavy imports happen inside the commands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["stack_app"]

stack_app = typer.Typer()
_console = Console(stderr=True, highlight=False)

StateDir = Annotated[
    Path,
    typer.Option(
        "--state-dir",
        envvar="VALVE_ID_STATE_DIR",
        file_okay=False,
        help="Everything the stack writes (Label Studio data, models, Redis, logs, secrets).",
    ),
]


def _options(state_dir: Path, **kwargs: object):  # -> StackOptions
    from backend.tools.stack.local import StackOptions

    given = {k: v for k, v in kwargs.items() if v is not None}  # None: the stack's default
    return StackOptions(state_dir=state_dir, **given)  # type: ignore[arg-type]


def _logging() -> None:
    """The commands print their own steps; library logs only from WARNING (LOG_LEVEL=DEBUG
    shows everything)."""
    import logging

    from backend.settings import Settings

    level = Settings.from_env().log_level.upper()
    logging.basicConfig(
        level=logging.DEBUG if level == "DEBUG" else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@stack_app.command()
def up(
    state_dir: StateDir = Path("state"),
    ls_venv: Annotated[
        Path | None,
        typer.Option(
            "--ls-venv",
            envvar="VALVE_ID_LS_VENV",
            help="Label Studio's own virtualenv (default: ~/.cache/valve-id/label-studio-"
            "<version>, one per machine, shared with the tests); reused across runs.",
        ),
    ] = None,
    ls_port: Annotated[
        int | None,
        typer.Option("--ls-port", envvar="VALVE_ID_LS_PORT", help="Label Studio's port."),
    ] = None,
    backend_port: Annotated[
        int | None,
        typer.Option("--backend-port", envvar="VALVE_ID_BACKEND_PORT", help="The backend's port."),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            envvar="REDIS_URL",
            help="Use this Redis if it answers; otherwise valve-id starts its own.",
        ),
    ] = None,
    demo_images: Annotated[
        int | None,
        typer.Option(min=10, help="Synthetic X-rays in the demo project [default: 240]."),
    ] = None,
    seed_labels: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="About this many demo X-rays labelled up front (class and valve centre; "
            "whole patients), so training can start [default: 160].",
        ),
    ] = None,
) -> None:
    """Start Label Studio, Redis, the backend and workers; set up the demo project."""
    from backend.tools.stack.local import up as stack_up
    from training.shared.errors import ValveIdError

    _logging()
    options = _options(
        state_dir,
        ls_venv=ls_venv,
        ls_port=ls_port,
        backend_port=backend_port,
        redis_url=redis_url,
        demo_images=demo_images,
        seed_labels=seed_labels,
    )
    try:
        report = stack_up(options, say=lambda line: _console.print(f"· {line}"))
    except ValveIdError as exc:
        _console.print(f"[red]error:[/red] {exc}")
        _console.print("Parts already started keep running: `valve-id down` stops them.")
        raise typer.Exit(1) from None

    state = Path(state_dir)
    stop = "make down   (or: valve-id down)"
    if state != Path("state"):
        stop = f"valve-id down --state-dir {state}   (make down STATE_DIR={state})"
    login = report.username + (
        f"  password [bold]{report.password}[/bold]  (shown once; also in {report.secrets})"
        if report.password
        else f"  (password: LABEL_STUDIO_PASSWORD in {report.secrets})"
    )
    started = ", ".join(report.started) or "nothing new"
    kept = f"; already running: {', '.join(report.kept)}" if report.kept else ""
    _console.print(f"\n[bold green]valve-id is up[/bold green] (started: {started}{kept})\n")
    rows = [
        ("Label Studio", report.ls_url),
        ("login", login),
        ("review queue", f"{report.review_url}   (most uncertain first)"),
        ("label stream", report.label_stream_url),
        ("backend", f"{report.backend_url}/health   (/jobs: training runs; basic auth)"),
        ("training", report.training),
        ("logs", f"{report.logs}/  (label-studio, backend, worker, worker-default, redis)"),
        ("stop", stop),
        ("start over", f"stop, then rm -rf {state}"),
    ]
    for key, value in rows:
        _console.print(f"  [bold]{key:<13}[/bold] {value}", soft_wrap=True)


@stack_app.command()
def down(state_dir: StateDir = Path("state")) -> None:
    """Stop exactly what `valve-id up` started (by PID)."""
    from backend.tools.stack.local import down as stack_down
    from training.shared.errors import ValveIdError

    _logging()
    try:
        outcomes = stack_down(_options(state_dir), say=lambda line: _console.print(f"· {line}"))
    except ValveIdError as exc:
        _console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    if all(v == "not started" for v in outcomes.values()):
        _console.print("nothing to stop")
    else:
        _console.print("valve-id is down (data kept under the state dir)")


@stack_app.command()
def status(state_dir: StateDir = Path("state")) -> None:
    """Which parts of the local stack run, and the latest training runs."""
    from backend.tools.stack.local import backend_jobs, served_demo_accuracy
    from backend.tools.stack.local import status as stack_status
    from training.shared.errors import ValveIdError

    options = _options(state_dir)
    table = Table(title="valve-id local stack")
    for column in ("part", "state", "PID", "URL / log"):
        table.add_column(column)
    rows = stack_status(options)
    for row in rows:
        colour = {"running": "green", "stopped": "red"}.get(row.state, "dim")
        table.add_row(row.name, f"[{colour}]{row.state}[/{colour}]", str(row.pid or ""), row.detail)
    Console().print(table)
    jobs = backend_jobs(options)
    if jobs:
        for run in jobs.get("runs", [])[:5]:
            version = f" → {run['version']}" if run.get("version") else ""
            profile = (
                f" (profile {run['profile']}: {run.get('profile_reason', '')})"
                if run.get("profile")
                else ""
            )
            Console().print(f"run {run.get('run_id')}: {run.get('status')}{version}{profile}")
        Console().print(f"queues: {jobs.get('queues')}")
    try:
        scored = served_demo_accuracy(options)
    except ValveIdError as exc:  # Label Studio unreachable: the table above already says so
        Console().print(f"demo accuracy: unavailable ({exc})")
    else:
        if scored is not None:
            Console().print(f"served version {scored.line()}", soft_wrap=True)
    if not any(r.state == "running" for r in rows):
        raise typer.Exit(3)
