"""``valve-id simulate``: what would the uncertainty-sorted queue have saved on our data?

A thin layer over :func:`training.simulation.loop.simulate`: settings from the environment,
options into a :class:`training.simulation.SimulationConfig`, progress lines, and where the
report went. ``--config`` reruns a saved ``config.json`` exactly (it refuses changed data).
Heavy imports (torch, fastai) happen inside the command, never when the CLI loads.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from backend.settings import Settings, SettingsError
from training.shared.errors import ValveIdError

__all__ = ["simulate_command"]

_console = Console(stderr=True)

_DEFAULT_STRATEGIES = "random,entropy,margin,bald,coreset"


def simulate_command(
    data: Annotated[
        str | None,
        typer.Option(help="Fully labelled data: folder, manifest.csv or labelstudio:<id>."),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Output folder (default: <state>/simulations/<UTC time>)."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            exists=True,
            dir_okay=False,
            help="Rerun a saved config.json exactly (then only --out applies, and --data "
            "for the same images in another place).",
        ),
    ] = None,
    strategies: Annotated[
        str,
        typer.Option(
            help="Comma-separated: random, entropy, margin, least_confidence, "
            "bald, coreset, entropy_coreset, typiclust, tcm."
        ),
    ] = _DEFAULT_STRATEGIES,
    seeds: Annotated[int, typer.Option(min=1, help="Replicates per strategy.")] = 3,
    budget: Annotated[int, typer.Option(min=2, help="Total labels, seed set included.")] = 120,
    batch_size: Annotated[int, typer.Option(min=1, help="Labels revealed per round.")] = 20,
    seed_size: Annotated[int, typer.Option(min=1, help="Initial stratified labelled set.")] = 20,
    test_fraction: Annotated[
        float, typer.Option(help="Patient-grouped held-out test share.")
    ] = 0.25,
    members: Annotated[
        int, typer.Option(min=1, help="Models per round (>= 2: BALD from the ensemble).")
    ] = 1,
    mc_passes: Annotated[
        int, typer.Option(min=0, help="MC-dropout passes for BALD when --members is 1.")
    ] = 20,
    profile: Annotated[
        str,
        typer.Option(
            help="Recipe profile: auto (paper with CUDA and the ResNet-34 file, else cpu), "
            "paper, cpu, or quick (mechanics only)."
        ),
    ] = "auto",
    image_size: Annotated[int | None, typer.Option(help="Override the input size (px).")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Override the main-phase epochs (either init).")
    ] = None,
    locator_epochs: Annotated[
        int | None, typer.Option(help="Override the locator head's epochs (locate_classify).")
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="Backbone: resnet34, resnet18 or efficientnet_lite0.")
    ] = None,
    from_scratch: Annotated[
        bool, typer.Option(help="Random init instead of ImageNet weights.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Base seed (test split, seed sets, training).")] = 0,
) -> None:
    """Simulate active learning on a fully labelled set: labels saved per strategy."""
    from backend.service.labelstudio import configure_training
    from training.fitting.config import RecipeConfig
    from training.shared.labels import load_label_config
    from training.simulation import SimulationConfig

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        _console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    expected = None
    try:
        if config is not None:
            from training.simulation.loop import load_simulation_config

            sim, expected = load_simulation_config(config)
            if data is not None:  # the same data elsewhere: the snapshot's hashes must match
                located = data if data.startswith("labelstudio:") else str(Path(data).resolve())
                sim = sim.with_overrides(data=located)
        else:
            if data is None:
                raise ValueError("give --data (or --config to rerun a saved simulation)")
            recipe = RecipeConfig.from_profile(
                profile,
                image_size_px=image_size,
                epochs=epochs,
                epochs_from_scratch=epochs,
                locator_epochs=locator_epochs,
                arch=arch,
                pretrained=False if from_scratch else None,
            )
            sim = SimulationConfig(
                data=data if data.startswith("labelstudio:") else str(Path(data).resolve()),
                strategies=tuple(s.strip() for s in strategies.split(",") if s.strip()),
                seeds=seeds,
                budget=budget,
                batch_size=batch_size,
                seed_size=seed_size,
                test_fraction=test_fraction,
                members=members,
                mc_passes=mc_passes,
                seed=seed,
                recipe=recipe,
            )
    except ValueError as exc:
        _console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None

    from training.simulation.loop import simulate

    target = out or settings.state_dir / "simulations" / time.strftime(
        "%Y%m%dT%H%M%SZ", time.gmtime()
    )
    total = len(sim.strategies) * sim.seeds * (sim.rounds + 1)
    done = 0

    def show(row: dict) -> None:
        nonlocal done
        done += 1
        _console.print(
            f"[{done}/{total}] {row['strategy']} seed {row['seed']} round {row['round']}: "
            f"{row['n_labels']} labels, macro-F1 {row['macro_f1']:.3f} "
            f"({row['elapsed_s'] / 60:.1f} min)",
            highlight=False,
        )

    try:
        label_config = load_label_config(settings.label_config)
        configure_training(settings)
        report = simulate(
            sim,
            target,
            classes=label_config.classes,
            cache_dir=settings.cache,
            download_dir=settings.cache / "labelstudio-images",
            image_key=label_config.image_key,
            choices_name=label_config.choices_name,
            expected_snapshot=expected,
            progress=show,
        )
    except ValveIdError as exc:
        _console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    _console.print(f"report: {report}")
    typer.echo(str(report.parent / "results.json"))
