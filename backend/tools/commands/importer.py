"""``valve-id import DIR``: put a folder of X-rays into Label Studio, de-identified.

A thin layer over :func:`backend.tools.importer.import_folder` (or, with ``--pacs``,
:mod:`backend.tools.pacs`): settings from the environment, a progress bar, and a summary. Exits
1 when any file failed (after importing the rest), so a script notices; running the same
command again only adds what is missing.
"""

from __future__ import annotations

import logging
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from backend.service.labelstudio import label_studio_client
from backend.settings import Settings, SettingsError
from backend.tools.importer import DEFAULT_PROJECT_TITLE, ImportReport, import_folder
from training.shared.errors import ValveIdError

if TYPE_CHECKING:
    from backend.tools.pacs import PacsQuery

__all__ = ["import_command"]

logger = logging.getLogger(__name__)
_console = Console(stderr=True)


def import_command(
    source: Annotated[
        Path | None,
        typer.Argument(
            help="Folder of DICOM files (searched recursively; PNG/JPEG need manifest.csv "
            "with file,patient_id). Not with --pacs.",
            exists=True,
            file_okay=False,
            dir_okay=True,
        ),
    ] = None,
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
    pacs: Annotated[
        bool,
        typer.Option(
            "--pacs",
            help="Import from the PACS at VALVE_ID_DICOMWEB_URL (DICOMweb) instead of a folder.",
        ),
    ] = False,
    modality: Annotated[
        list[str] | None,
        typer.Option("--modality", help="--pacs: only this modality (repeatable: CR, DX, ...)."),
    ] = None,
    since: Annotated[
        datetime | None,
        typer.Option("--since", formats=["%Y-%m-%d"], help="--pacs: studies from this date."),
    ] = None,
    until: Annotated[
        datetime | None,
        typer.Option("--until", formats=["%Y-%m-%d"], help="--pacs: studies up to this date."),
    ] = None,
    body_part: Annotated[
        str,
        typer.Option("--body-part", help="--pacs: BodyPartExamined (wildcards * and ?)."),
    ] = "",
    study_description: Annotated[
        str,
        typer.Option("--study-description", help="--pacs: StudyDescription (wildcards * and ?)."),
    ] = "",
    watch: Annotated[
        bool,
        typer.Option("--watch", help="--pacs: keep polling for new X-rays until stopped."),
    ] = False,
    interval: Annotated[
        float,
        typer.Option("--interval", min=1.0, help="--watch: seconds between polls."),
    ] = 30.0,
) -> None:
    """Import X-rays as de-identified PNG tasks (pseudonymous patient id, no DICOM text)."""
    if create == (project is not None):
        _console.print("[red]error:[/red] give either --project ID or --create")
        raise typer.Exit(2)
    if pacs == (source is not None):
        _console.print("[red]error:[/red] give either a folder or --pacs")
        raise typer.Exit(2)
    if not pacs and (modality or since or until or body_part or study_description or watch):
        _console.print("[red]error:[/red] the filters and --watch only apply with --pacs")
        raise typer.Exit(2)
    if pacs:
        from backend.tools.pacs import PacsQuery

        query = PacsQuery(
            modalities=tuple(m.strip().upper() for m in modality or () if m.strip()),
            since=_day(since),
            until=_day(until),
            body_part=body_part,
            study_description=study_description,
        )
        _import_pacs(query, project, create, storage_dir, watch, interval)
        return
    assert source is not None
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


def _day(value: datetime | None) -> date | None:
    return value.date() if value is not None else None


def _import_pacs(
    query: PacsQuery,
    project: int | None,
    create: bool,
    storage_dir: Path | None,
    watch: bool,
    interval: float,
) -> None:
    """One import from the PACS, or (``watch``) polls until Ctrl-C, printing each poll that
    did something. One line per error; the traceback only at LOG_LEVEL=DEBUG."""
    from backend.tools.pacs import import_from_pacs, pacs_client, watch_pacs

    try:
        settings = Settings.from_env()
        client = label_studio_client(settings)
        pacs = pacs_client(settings)
        if watch:
            _console.print(f"watching the PACS every {interval:.0f} s; Ctrl-C stops")
            watch_pacs(
                query,
                settings=settings,
                client=client,
                pacs=pacs,
                project_id=project,
                create=create,
                storage_root=storage_dir,
                interval_s=interval,
                on_poll=lambda r: _print_report(r, "instance") if r.created or r.failed else None,
            )
            return
        report = import_from_pacs(
            query,
            settings=settings,
            client=client,
            pacs=pacs,
            project_id=project,
            create=create,
            storage_root=storage_dir,
        )
    except KeyboardInterrupt:
        _console.print("stopped; the next run resumes where this one stopped")
        return
    except (ValveIdError, SettingsError) as exc:
        logger.debug("PACS import failed", exc_info=True)
        _console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    _print_report(report, "instance")
    if report.failed:
        raise typer.Exit(1)


def _print_report(report: ImportReport, what: str = "file") -> None:
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
        table.add_column(what, overflow="fold")
        table.add_column("reason", overflow="fold")
        for name, reason in sorted(report.failed.items()):
            table.add_row(name, reason)
        _console.print(table)
