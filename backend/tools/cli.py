"""The ``valve-id`` command line.

One typer app; each command imports what it needs inside its body, so ``valve-id --help``
stays fast and the serving commands never import fastai. Configuration comes from
:class:`backend.settings.Settings` (environment), options override it per call. An error the
user can fix (a setting, Redis unreachable, any :class:`ValveIdError`) ends every command in
one red line and exit status 1; ``LOG_LEVEL=DEBUG`` adds its traceback.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from typer.core import TyperGroup

from backend.settings import Settings, SettingsError, debug_requested, environment_of
from backend.tools.commands.importer import import_command
from backend.tools.commands.models import models_app
from backend.tools.commands.simulate import simulate_command
from backend.tools.commands.stack import stack_app
from training.shared.errors import ValveIdError

if TYPE_CHECKING:
    # typer vendors click; TyperGroup.invoke takes that copy's Context, not click's.
    from typer._click.core import Context as ClickContext

logger = logging.getLogger("valve_id.cli")
console = Console(stderr=True)
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _settings() -> Settings:
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level.upper(), format=_LOG_FORMAT)
    return settings


def _environment(verb: str) -> str:
    """``--help`` epilog: the variables ``verb`` needs, from the one list next to Settings."""
    return f"Environment: {', '.join(environment_of(verb))} (see README, Configuration)."


def _fail(message: str) -> typer.Exit:
    """Print ``message`` as one line (never wrapped, never read as markup); exit status 1."""
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(code=1)


def _expected_error(exc: Exception) -> str | None:
    """The one line to print for an error the user can fix; ``None`` for a bug."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    if isinstance(exc, SettingsError | ValveIdError):
        return str(exc)
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return (
            f"Redis is unreachable ({exc}): start it (`valve-id up` starts one) "
            "or set REDIS_URL to one that runs"
        )
    return None


class _Commands(TyperGroup):
    """The root command: an expected error of any command becomes one line, not a traceback
    (logged at DEBUG, so ``LOG_LEVEL=DEBUG`` still shows where it came from)."""

    def invoke(self, ctx: ClickContext) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = _expected_error(exc)
            if message is None:
                raise
            if debug_requested():  # even when the settings themselves failed to parse
                logging.basicConfig(level=logging.DEBUG, format=_LOG_FORMAT)
            logger.debug("%s, with its traceback:", type(exc).__name__, exc_info=exc)
            raise _fail(message) from None


app = typer.Typer(
    name="valve-id",
    cls=_Commands,
    help="Identify shunt-valve models on skull X-rays, inside a Label Studio annotation loop.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_progress(row: dict[str, object]) -> None:
    """One line per epoch of in-process training."""
    if "epoch" not in row:
        return
    numbers = ", ".join(
        f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and k != "epoch"
    )
    console.print(f"fold {row['fold']} epoch {row['epoch']}/{row['epochs']}: {numbers}")


@app.callback()
def _main() -> None:
    """valve-id command line."""


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option(help="Folder to write images/ and manifest.csv into.")],
    n: Annotated[int, typer.Option(min=1, help="Number of X-rays.")] = 200,
    seed: Annotated[int, typer.Option(help="Same seed, same files, byte for byte.")] = 0,
    balanced: Annotated[
        bool, typer.Option(help="Equal class mix instead of the paper's 81/12/4/3 %.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a data set already in --out.")] = False,
) -> None:
    """Generate the synthetic skull X-ray demo data set (DICOM + manifest.csv)."""
    from training.synthetic import VALVE_CLASSES, generate_dataset

    _settings()
    mix = {c: 1.0 for c in VALVE_CLASSES} if balanced else None
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("rendering X-rays", total=n)
        manifest = generate_dataset(
            out,
            n,
            seed,
            class_mix=mix,
            overwrite=overwrite,
            progress=lambda done, total: bar.update(task, completed=done),
        )
    console.print(f"wrote {n} synthetic X-rays; manifest: {manifest}")


@app.command()
def preview(
    manifest: Annotated[Path, typer.Argument(help="manifest.csv (or its folder).")],
    out: Annotated[Path | None, typer.Option(help="PNG to write.")] = None,
    per_class: Annotated[int, typer.Option(min=1)] = 4,
) -> None:
    """Contact sheet of a data set, each image as the network sees it."""
    from training.fitting.preview import write_preview

    _settings()
    manifest = manifest / "manifest.csv" if manifest.is_dir() else manifest
    target = out or manifest.with_name("preview.png")
    path = write_preview(manifest, target, per_class=per_class)
    console.print(f"preview: {path}")


@app.command()
def train(
    data: Annotated[
        str, typer.Option(help="Data set folder, its manifest.csv, or labelstudio:<project id>.")
    ],
    profile: Annotated[
        str,
        typer.Option(
            help="Recipe profile: auto (paper on a CUDA worker with the ResNet-34 ImageNet "
            "file, else cpu), paper or cpu."
        ),
    ] = "auto",
    enqueue: Annotated[
        bool, typer.Option(help="Send to the RQ workers instead of training here.")
    ] = False,
    epochs: Annotated[int | None, typer.Option(help="Override the profile's epochs.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Override the input size (px).")] = None,
    folds: Annotated[int | None, typer.Option(help="Override the number of folds.")] = None,
    from_scratch: Annotated[
        bool, typer.Option(help="Random init instead of ImageNet weights.")
    ] = False,
    seed: Annotated[int | None, typer.Option(help="Override the seed.")] = None,
    reader_epochs: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Epochs of the setting reader (locate-then-classify versions; 0 reads no "
            "setting). More read better with a few hundred X-rays per valve model.",
        ),
    ] = None,
    test_views: Annotated[
        int | None,
        typer.Option(
            help="Flips/turns each valve crop is averaged over when a locate-then-classify "
            "version answers: 1, 2, 4 (the cpu profile's) or 8 (a little more accurate, "
            "slower; docs/TRAINING.md, 'Test-time views').",
        ),
    ] = None,
    reader_native: Annotated[
        bool | None,
        typer.Option(
            "--reader-native/--reader-square",
            help="Read the setting at the X-ray's own pixels (the cpu profile's) or on the "
            "squished square the classifier sees (docs/TRAINING.md, 'At the X-ray's own "
            "pixels').",
        ),
    ] = None,
    reader_template: Annotated[
        bool | None,
        typer.Option(
            "--reader-template/--reader-principal-axis",
            help="Read each valve model's setting in its own template's frame, turned, faced "
            "and zoomed alike (the cpu profile's), or on the crop turned along the valve's "
            "principal axis (docs/TRAINING.md, 'The crop, not the face, kept the Hakim "
            "unread').",
        ),
    ] = None,
) -> None:
    """Train the paper's 5-fold recipe and publish a model version."""
    from training.fitting.config import RecipeConfig, recipe_request

    settings = _settings()
    overrides = {
        "epochs": epochs,
        "image_size_px": image_size,
        "n_folds": folds,
        "seed": seed,
        "pretrained": False if from_scratch else None,
        "reader_epochs": reader_epochs,
        "test_views": test_views,
        "reader_native": reader_native,
        "reader_template": reader_template,
    }
    try:
        # Enqueued, "auto" is decided by the worker that plans the run, not by this machine.
        request = recipe_request(profile, **overrides)
        recipe = None if enqueue else RecipeConfig.from_profile(profile, **overrides)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    if recipe is not None:
        console.print(f"profile {recipe.profile} ({recipe.profile_reason})")
    if enqueue:
        from redis import Redis

        from training.fitting.jobs import enqueue_training

        run = enqueue_training(
            Redis.from_url(settings.redis_url),
            data=data if data.startswith("labelstudio:") else str(Path(data).resolve()),
            label_config_path=str(settings.label_config),
            recipe=request,
            model_dir=settings.registry_location,
            s3_endpoint_url=settings.s3_endpoint_url,
            cache_dir=str(settings.cache.resolve()),
            tolerance=settings.promotion_tolerance,
            keep_versions=settings.keep_versions,
            keep_days=settings.keep_days,
        )
        console.print(f"enqueued run {run.run_id}: jobs {', '.join(run.job_ids)}")
        typer.echo(json.dumps({"run_id": run.run_id, "jobs": run.job_ids}))
        return

    from backend.service.labelstudio import configure_training
    from training.fitting.jobs import prune_after_run
    from training.fitting.run import run_in_process
    from training.fitting.sources import load_items
    from training.shared.labels import load_label_config
    from training.shared.registry import new_version_id

    registry = settings.open_registry()
    run_id = new_version_id()
    staging = registry.staging(run_id)
    try:
        label_config = load_label_config(settings.label_config)
        configure_training(settings)
        items = load_items(
            data,
            label_config.classes,
            settings.cache / "labelstudio-images",
            image_key=label_config.image_key,
            choices_name=label_config.choices_name,
            keypoint_name=label_config.keypoint_name,
            keypoint_label=label_config.keypoint_label,
            settings=label_config.settings,
        )
        run_in_process(
            staging,
            items,
            label_config,
            recipe,
            source=str(data),
            cache_dir=settings.cache,
            run_id=run_id,
            progress=_print_progress,
        )
        result = registry.publish(
            staging, version_id=run_id, tolerance=settings.promotion_tolerance
        )
        prune_after_run(registry, run_id, settings.keep_versions, settings.keep_days)
    except BaseException:  # a failed run leaves no staging directory behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    state = "promoted to current" if result.promoted else "kept, not promoted"
    console.print(f"version {result.version_id}: {state} ({result.reason})")
    console.print(f"report: {result.path / 'report.html'}")


@app.command(epilog=_environment("worker"))
def worker(
    burst: Annotated[bool, typer.Option(help="Exit when the queues are empty.")] = False,
    name: Annotated[str | None, typer.Option(help="Worker name (default: RQ's).")] = None,
    queues: Annotated[
        str, typer.Option(help="Comma-separated queues, in priority order.")
    ] = "valve-id-training,valve-id-default",
) -> None:
    """Start an RQ worker: training jobs, and (by default) webhook and re-scoring jobs.

    One GPU per training worker: start N workers with CUDA_VISIBLE_DEVICES=0, 1, ... to train
    the folds of a run in parallel. A worker given only ``--queues valve-id-default`` runs the
    short backend jobs in-process (no fork per job), keeping its loaded model between jobs.
    """
    from redis import Redis
    from rq import Queue, SimpleWorker, Worker
    from rq.worker import BaseWorker

    from backend.service.labelstudio import configure_training
    from training.fitting.jobs import on_work_horse_killed
    from training.shared.loop_state import DEFAULT_QUEUE

    settings = _settings()
    connection = Redis.from_url(settings.redis_url)
    connection.ping()  # no Redis: say so now, not after importing torch
    # The worker reads settings once; the forked jobs inherit them (training never reads env).
    configure_training(settings)
    names = [q.strip() for q in queues.split(",") if q.strip()]
    listened = [Queue(q, connection=connection) for q in names]
    if names == [DEFAULT_QUEUE]:
        worker_class: type[BaseWorker] = SimpleWorker
    else:
        import training.fitting.recipe  # noqa: F401  (import torch/fastai once; each job's fork inherits it)
        from training.fitting.config import choose_profile

        worker_class = Worker
        chosen, why = choose_profile()
        logging.getLogger("valve_id.worker").info(
            "training worker: VALVE_ID_TRAINING_PROFILE=%s; auto trains %s here (%s)",
            settings.training_profile,
            chosen,
            why,
        )
    worker_class(
        listened, connection=connection, name=name, work_horse_killed_handler=on_work_horse_killed
    ).work(burst=burst, with_scheduler=False)


@app.command(epilog=_environment("serve"))
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port Label Studio connects to.")] = 9090,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve the Label Studio ML backend (/health, /setup, /predict, /webhook, /metrics, /jobs)."""
    from backend.service.app import run

    run(_settings(), host=host, port=port, workers=workers)


app.command("import", epilog=_environment("import"))(import_command)
app.command("simulate")(simulate_command)
app.add_typer(
    models_app, name="models", help="List, inspect, promote, roll back and prune versions."
)
app.add_typer(stack_app)  # valve-id up / down / status


if __name__ == "__main__":  # pragma: no cover
    app()
