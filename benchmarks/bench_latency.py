"""Latency of a single-task ``/predict`` (what opening a task costs) vs the model alone.

Each call sends one task with image bytes the backend has never seen (no cache hit), to the
real backend serving a 512² version (the 5-fold ensemble that training publishes, and a
1-model version for comparison). The reference is the same number of forward passes of one
image through the model alone (batch 1, channels_last + bf16, compiled and eager), timed in
the same rounds. Target (issue 6): p50 of the served version ≤ 1.5× its model-only time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.bench_predict import prepared_images
from benchmarks.fixtures import Served, deployment, network_batch, serving_model
from benchmarks.harness import (
    Table,
    add_common_arguments,
    emit,
    interleaved,
    median,
    percentile,
    verdict,
)

__all__ = ["LatencyOptions", "main", "run"]

TARGET_RATIO = 1.5
"""p50 of /predict over the model-only time of the same forwards (issue 6)."""
N_IMAGES = 8
"""Distinct radiographs; every call stamps one with a new variant (new bytes)."""
WARMUP_CALLS = 3
"""Single-task requests per backend before timing."""
MODEL_WARMUP_CALLS = 8
"""Model-only forwards before timing: on this VM the first few are seconds, not ms."""


@dataclass(frozen=True)
class LatencyOptions:
    size_px: int = 512
    served: tuple[Served, ...] = (Served(5), Served(5, True), Served(1))
    """The first is the default served version the target is about."""
    calls: int = 30
    arch: str = "resnet34"
    compile: bool = True


QUICK = LatencyOptions(size_px=64, served=(Served(2),), calls=3, arch="resnet18", compile=False)


def _model_only(model: Any, image: Any, forwards: int) -> Any:
    import torch

    def one_round(_round: int) -> float:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            started = time.perf_counter()
            for _ in range(forwards):
                model(image)
            return time.perf_counter() - started

    return one_round


def run(options: LatencyOptions, workdir: Path) -> list[Table]:
    import httpx

    from training.model import load_checkpoint

    served = options.served[0].folds
    with (
        deployment(
            workdir, options.served, size_px=options.size_px, arch=options.arch, n_images=N_IMAGES
        ) as deployed,
        httpx.Client(timeout=600) as client,
    ):
        fold0 = deployed.fold_weights(served)
        image = network_batch(
            prepared_images([deployed.xrays.png(0)], options.size_px), options.size_px
        )
        models = {"eager": serving_model(load_checkpoint(fold0), compile=False)}
        if options.compile:
            models["compiled"] = serving_model(load_checkpoint(fold0), compile=True)
        contenders = {}
        for name, model in models.items():
            for _ in range(MODEL_WARMUP_CALLS):  # compiles for batch 1; steady kernels
                _model_only(model, image, 1)(0)
            contenders[f"model only, {name} bf16, batch 1 × {served}"] = _model_only(
                model, image, served
            )

        variant = iter(range(1, 10**6))
        for backend in deployed.backends.values():
            for _ in range(WARMUP_CALLS):
                backend.predict(client, deployed.tasks(next(variant), [0]))

        def http(config: Served) -> Any:
            def one_call(r: int) -> float:
                tasks = deployed.tasks(next(variant), [r % N_IMAGES])
                started = time.perf_counter()
                deployed.backends[config].predict(client, tasks)
                return time.perf_counter() - started

            return one_call

        judged = set()  # the rows of the served fold count: the target is about them
        for config in options.served:
            name = f"/predict of 1 task, {config.name} version"
            contenders[name] = http(config)
            if config.folds == served:
                judged.add(name)
        seconds = interleaved(contenders, options.calls)

    reference_name = (
        next(n for n in contenders if n.startswith("model only, compiled"))
        if (options.compile)
        else next(n for n in contenders if n.startswith("model only, eager"))
    )
    reference = median(seconds[reference_name])
    table = Table(
        f"Single-task /predict latency: {options.arch} at {options.size_px}², "
        f"{options.calls} interleaved calls each",
        ["contender", "p50 ms", "p95 ms", f"p50 / {reference_name.split(',')[1].strip()}", ""],
    )
    for name, values in seconds.items():
        ratio = median(values) / reference
        target = ""
        if name in judged:
            target = f"≤ {TARGET_RATIO:g}×: " + verdict(ratio, TARGET_RATIO, higher_is_better=False)
        table.add_row(
            name,
            f"{1000 * median(values):.0f}",
            f"{1000 * percentile(values, 95):.0f}",
            f"{ratio:.2f}×",
            target,
        )
    table.notes.append(
        f"Every call sends new image bytes (no cache hit); {WARMUP_CALLS} warm-up calls per "
        "backend first. Model-only rows: the forwards that version does for one image (one "
        "fold's network, same architecture), on a pre-made tensor."
    )
    return [table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_common_arguments(parser)
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument("--no-compiled", action="store_true", help="skip compiled backends")
    args = parser.parse_args(argv)
    options = QUICK if args.quick else LatencyOptions()
    if args.calls:
        options = replace(options, calls=args.calls)
    if args.no_compiled:
        options = replace(options, served=tuple(s for s in options.served if not s.compiled))
    with tempfile.TemporaryDirectory(prefix="valve-id-bench-") as tmp:
        tables = run(options, Path(tmp))
    emit(tables, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
