"""Latency of a single-task ``/predict`` (what opening a task costs) vs the model alone.

Each call sends one task with image bytes the backend has never seen (no cache hit), to the
real backend serving a 512² version (the 5-fold ensemble that training publishes, and a
1-model version for comparison). The reference is the same number of forward passes of one
image through the model alone (batch 1, channels_last + bf16, compiled and eager), timed in
the same rounds. Target (issue 6): p50 of the served version ≤ 1.5× its model-only time.

A second table (issue 12, item 6) puts the ``cpu`` profile's networks beside the ResNet-34
version at the same ensemble size, random weights, in the same rounds: EfficientNet-Lite0
locate-then-classify (768² prepared, 384² locator, 160² crop) and the whole-image Lite0 at
384². Each is called through ``/predict`` (the served bf16 fast path), through the model
alone (eager bf16, its own reference), and through an in-process
:class:`backend.service.predictor.Predictor` in bf16 and eager fp32 (``fast_path=False``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.bench_predict import prepared_images
from benchmarks.fixtures import (
    CPU_LOCATE_CLASSIFY,
    CPU_WHOLE_IMAGE,
    LOCATE_CLASSIFY,
    PRECISIONS,
    Served,
    VersionKind,
    deployment,
    in_process_predictors,
    network_batch,
    predict_all,
    serving_model,
)
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
    backbones: tuple[VersionKind, ...] = (CPU_LOCATE_CLASSIFY, CPU_WHOLE_IMAGE)
    """The cpu profile's networks timed beside the first served version (empty: none)."""
    model_warmup_calls: int = MODEL_WARMUP_CALLS


QUICK = LatencyOptions(
    size_px=64,
    served=(Served(2),),
    calls=3,
    arch="resnet18",
    compile=False,
    model_warmup_calls=2,
    backbones=(
        VersionKind(
            arch="efficientnet_lite0", size_px=64, design=LOCATE_CLASSIFY, locator_px=64, crop_px=32
        ),
    ),
)


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

    from training.shared.model import load_checkpoint

    served = options.served[0].folds
    reference_kind = VersionKind(arch=options.arch, size_px=options.size_px)
    kinds = (reference_kind, *options.backbones) if options.backbones else ()
    backbone_served = tuple(Served(served, kind=k) for k in options.backbones)
    with (
        deployment(
            workdir,
            (*options.served, *backbone_served),
            size_px=options.size_px,
            arch=options.arch,
            n_images=N_IMAGES,
        ) as deployed,
        httpx.Client(timeout=600) as client,
        in_process_predictors(
            {k: deployed.model_dir(served, kind=k) for k in kinds}, batch_size=1
        ) as predictors,
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
            for _ in range(options.model_warmup_calls):  # compiles for batch 1; steady kernels
                _model_only(model, image, 1)(0)
            contenders[f"model only, {name} bf16, batch 1 × {served}"] = _model_only(
                model, image, served
            )

        # The cpu profile's networks: model alone (eager bf16), /predict, in-process predictors.
        rows: dict[tuple[VersionKind, str], str] = {}
        for kind in kinds:
            if kind == reference_kind:
                rows[(kind, "model")] = f"model only, eager bf16, batch 1 × {served}"
                continue
            model = serving_model(
                load_checkpoint(deployed.fold_weights(served, kind=kind)), compile=False
            )
            kind_image = network_batch(
                prepared_images([deployed.xrays.png(0)], kind.size_px),
                kind.size_px,
                params=kind.preprocess(),
            )
            for _ in range(options.model_warmup_calls):
                _model_only(model, kind_image, 1)(0)
            name = f"model only, eager bf16, batch 1 × {served}, {kind.name}"
            rows[(kind, "model")] = name
            contenders[name] = _model_only(model, kind_image, served)

        variant = iter(range(1, 10**6))
        for backend in deployed.backends.values():
            for _ in range(WARMUP_CALLS):
                backend.predict(client, deployed.tasks(next(variant), [0]))
        for predictor in predictors.values():
            for _ in range(WARMUP_CALLS):
                predict_all(predictor, [deployed.xrays.png(0, next(variant))])

        def http(config: Served) -> Any:
            def one_call(r: int) -> float:
                tasks = deployed.tasks(next(variant), [r % N_IMAGES])
                started = time.perf_counter()
                deployed.backends[config].predict(client, tasks)
                return time.perf_counter() - started

            return one_call

        def in_process(predictor: Any) -> Any:
            def one_call(r: int) -> float:
                image_bytes = deployed.xrays.png(r % N_IMAGES, next(variant))  # new, untimed
                started = time.perf_counter()
                predict_all(predictor, [image_bytes])
                return time.perf_counter() - started

            return one_call

        judged = set()  # the rows of the served fold count: the target is about them
        for config in options.served:
            name = f"/predict of 1 task, {config.name} version"
            contenders[name] = http(config)
            if config.folds == served:
                judged.add(name)
            if config == Served(served):
                rows[(reference_kind, "http")] = name
        for config in backbone_served:
            name = f"/predict of 1 task, {config.name} version"
            contenders[name] = http(config)
            rows[(deployed.kind(config), "http")] = name
        for kind in kinds:
            for precision in PRECISIONS:
                name = f"Predictor in-process, 1 task, {precision}, {kind.name}, {served}-model"
                contenders[name] = in_process(predictors[(kind, precision)])
                rows[(kind, precision)] = name
        if kinds and (reference_kind, "http") not in rows:  # no default-kind row served
            kinds = ()
        seconds = interleaved(contenders, options.calls)

    backbone_only = {name for (kind, _), name in rows.items() if kind != reference_kind} | {
        name for (_, path), name in rows.items() if path in PRECISIONS
    }
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
        if name in backbone_only:
            continue
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
    tables = [table]
    if kinds:
        tables.append(backbone_table(options, kinds, rows, seconds, served))
    return tables


def backbone_table(
    options: LatencyOptions,
    kinds: tuple[VersionKind, ...],
    rows: dict[tuple[VersionKind, str], str],
    seconds: dict[str, list[float]],
    folds: int,
) -> Table:
    """p50 of each network by path, × the reference (first kind)'s /predict p50."""

    def ms(kind: VersionKind, path: str, q: float = 50) -> float:
        return 1000 * percentile(seconds[rows[(kind, path)]], q)

    table = Table(
        f"Single-task latency by backbone: {folds}-model versions, "
        f"{options.calls} interleaved calls each",
        [
            "version",
            "/predict p50 ms",
            "p95 ms",
            "× " + kinds[0].name,
            "model only p50 ms",
            f"/predict ÷ model only (≤ {TARGET_RATIO:g}×)",
            "Predictor bf16 p50 ms",
            "Predictor fp32 p50 ms",
            "fp32 ÷ bf16",
        ],
    )
    for kind in kinds:
        http = ms(kind, "http")
        table.add_row(
            kind.name,
            f"{http:.0f}",
            f"{ms(kind, 'http', 95):.0f}",
            f"{http / ms(kinds[0], 'http'):.2f}×",
            f"{ms(kind, 'model'):.0f}",
            f"{http / ms(kind, 'model'):.2f}×",
            f"{ms(kind, 'bf16'):.0f}",
            f"{ms(kind, 'fp32'):.0f}",
            f"{ms(kind, 'fp32') / ms(kind, 'bf16'):.2f}×",
        )
    table.notes.append(
        "Random weights, new image bytes every call. /predict: the backend's served fast path "
        f"(channels_last, bf16). Model only: {folds} eager bf16 forwards of batch 1 on a "
        "pre-made tensor of that version's input (locate→classify: both networks). Predictor: "
        "backend.service.predictor.Predictor in this process with one task (decode, preprocess, "
        "ensemble; no HTTP or Redis), bf16 fast path or fp32 (fast_path=False, which a backend "
        "cannot serve)."
    )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_common_arguments(parser)
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument("--no-compiled", action="store_true", help="skip compiled backends")
    parser.add_argument(
        "--no-backbones", action="store_true", help="skip the cpu profile's Lite0 versions"
    )
    args = parser.parse_args(argv)
    options = QUICK if args.quick else LatencyOptions()
    if args.calls:
        options = replace(options, calls=args.calls)
    if args.no_compiled:
        options = replace(options, served=tuple(s for s in options.served if not s.compiled))
    if args.no_backbones:
        options = replace(options, backbones=())
    with tempfile.TemporaryDirectory(prefix="valve-id-bench-") as tmp:
        tables = run(options, Path(tmp))
    emit(tables, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
