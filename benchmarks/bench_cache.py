"""The prediction cache: ``/predict`` of unchanged tasks vs the first time.

Label Studio asks ``/predict`` again whenever an annotator reopens a task or a view reloads;
the predictor caches each answer under (image content hash, version), so an unchanged task
costs a file read, a hash and the JSON answer. Each round sends tasks with new image bytes
(first time: fetch, decode, forward passes), then the very same request again (repeat), to
the real backend serving the 5-fold 512² version. Target (issue 6): repeat ≥ 100× faster.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.fixtures import Served, deployment
from benchmarks.harness import Table, add_common_arguments, emit, median, verdict

__all__ = ["CacheOptions", "main", "run"]

TARGET_SPEEDUP = 100.0
"""First-time over repeat wall time (issue 6)."""
REPEATS = 3
"""Repeats of an unchanged request per round (their median is the round's repeat time)."""


@dataclass(frozen=True)
class CacheOptions:
    size_px: int = 512
    folds: int = 5
    arch: str = "resnet34"
    batch_tasks: int = 32
    rounds: int = 3


QUICK = CacheOptions(size_px=64, folds=2, arch="resnet18", batch_tasks=4, rounds=1)


def run(options: CacheOptions, workdir: Path) -> list[Table]:
    import httpx

    served = Served(options.folds)
    with (
        deployment(
            workdir,
            (served,),
            size_px=options.size_px,
            arch=options.arch,
            n_images=options.batch_tasks,
        ) as deployed,
        httpx.Client(timeout=600) as client,
    ):
        backend = deployed.backends[served]
        variant = iter(range(1, 10**6))
        backend.predict(client, deployed.tasks(next(variant)))  # warm-up

        def wall(tasks: list[dict[str, Any]]) -> float:
            started = time.perf_counter()
            backend.predict(client, tasks)
            return time.perf_counter() - started

        sizes = {"1 task": [0], f"{options.batch_tasks} tasks": None}
        first: dict[str, list[float]] = {name: [] for name in sizes}
        repeat: dict[str, list[float]] = {name: [] for name in sizes}
        for _ in range(options.rounds):
            for name, indices in sizes.items():
                tasks = deployed.tasks(next(variant), indices)
                first[name].append(wall(tasks))
                repeat[name].append(median([wall(tasks) for _ in range(REPEATS)]))
        metrics = client.get(f"{backend.url}/metrics").text

    hits = next(
        (
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith("valve_id_predictor_cache_hits")
        ),
        "?",
    )
    table = Table(
        f"Cache: unchanged tasks vs first time, {options.folds}-model {options.arch} at "
        f"{options.size_px}², median of {options.rounds} rounds",
        ["request", "first ms", "repeat ms", "speed-up", f"target ≥ {TARGET_SPEEDUP:g}×"],
    )
    for name in sizes:
        speedup = median(first[name]) / median(repeat[name])
        table.add_row(
            name,
            f"{1000 * median(first[name]):.1f}",
            f"{1000 * median(repeat[name]):.1f}",
            f"{speedup:.0f}×",
            verdict(speedup, TARGET_SPEEDUP),
        )
    table.notes.append(
        f"Wall time at the client of the whole HTTP request; {REPEATS} repeats per round "
        f"(median). Backend cache hits counted by /metrics: {hits}."
    )
    return [table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_common_arguments(parser)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    options = QUICK if args.quick else CacheOptions()
    if args.rounds:
        options = replace(options, rounds=args.rounds)
    with tempfile.TemporaryDirectory(prefix="valve-id-bench-") as tmp:
        tables = run(options, Path(tmp))
    emit(tables, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
