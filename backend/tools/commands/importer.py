"""``valve-id import DIR``: put a folder of X-rays into Label Studio, de-identified.

A thin layer over :func:`backend.tools.importer.import_folder`: settings from the environment,
a progress bar, and a summary. Exits 1 when any file failed (after importing the rest), so a
script notices; running the same command again only adds what is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from backend.service.labelstudio import label_studio_client
from backend.settings import Settings, SettingsError
from backend.tools.importer import DEFAULT_PROJECT_TITLE, ImportReport, import_folder
from training.shared.errors import ValveIdError

__all__ = ["import_command"]

_console = Console(stderr=True)


def import_command(
    source: Annotated[
        Path,
        typer.Argument(
            help="Folder of DICOM files (searched recursively; PNG/JPEG need manifest.csv "
            "with file,patient_id).",
            exists=True,
            file_okay=False,
            dir_okay=True,
        ),
    ],
    project: Annotated[
        int | None, typer.Option("--project", min=1, help="Label Studio project id to add to.")
    ] = None,
    create: Annotated[
        bool,
        typer.Option("--create", help="Create a new project from the label config instead."),
    ] = False,
    storage_dir: Annotated[
        Path | None,
        typer.Option(
            "--storage-dir",
            file_okay=False,
            help="Where the PNGs go: a subfolder of LOCAL_FILES_DOCUMENT_ROOT "
            "(default: <root>/valve-id).",
        ),
    ] = None,
    title: Annotated[
        str, typer.Option("--title", help="Title of the project made by --create.")
    ] = DEFAULT_PROJECT_TITLE,
) -> None:
    """Import X-rays as de-identified PNG tasks (pseudonymous patient id, no DICOM text)."""
    if create == (project is not None):
        _console.print("[red]error:[/red] give either --project ID or --create")
        raise typer.Exit(2)
    try:
        settings = Settings.from_env()
        client = label_studio_client(settings)
        columns = (
            TextColumn("importing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=_console, transient=True) as bar:
            task = bar.add_task("import", total=None)
            report = import_folder(
                source,
                project_id=project,
                create=create,
                settings=settings,
                client=client,
                storage_root=storage_dir,
                title=title,
                progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except (ValveIdError, SettingsError) as exc:
        _console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    _print_report(report)
    if report.failed:
        raise typer.Exit(1)


def _print_report(report: ImportReport) -> None:
    _console.print(
        f"project {report.project_id}: {report.created} task(s) created, "
        f"{report.skipped_duplicates} already there, {len(report.failed)} failed, "
        f"{report.ignored} non-image file(s) ignored",
        highlight=False,
        soft_wrap=True,
    )
    if report.without_patient:
        _console.print(
            f"[yellow]{report.without_patient} image(s) had no Patient ID[/yellow]: each is "
            "its own patient group in training",
            soft_wrap=True,
        )
    if report.burned_in:
        _console.print(
            f"[yellow]{report.burned_in} image(s) declare text burned into the pixels[/yellow] "
            "(Burned In Annotation YES): valve-id cannot remove it; check those images",
            soft_wrap=True,
        )
    if report.failed:
        table = Table(title="Not imported", show_lines=False)
        table.add_column("file", overflow="fold")
        table.add_column("reason", overflow="fold")
        for name, reason in sorted(report.failed.items()):
            table.add_row(name, reason)
        _console.print(table)
