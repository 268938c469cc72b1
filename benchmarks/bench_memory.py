"""Backend memory: resident set size of ``valve-id serve`` with the served version loaded.

The served version is what training publishes: a 5-fold ResNet-34 ensemble at 512² (plus a
1-model version for comparison). RSS is read from ``/proc/<pid>/status`` of the backend
process: idle after start-up, after batched ``/predict`` requests, after single-task ones,
and its peak (``VmHWM``). Target (issue 6): ≤ 1.5 GiB.

Beside them (issue 12, item 6), the ``cpu`` profile's versions at the same ensemble size,
random weights: EfficientNet-Lite0 locate-then-classify (768² prepared, 384² locator, 160²
crop) and the whole-image Lite0 at 384². A backend always serves the bf16 fast path, so
there is no fp32 row (the weights-on-disk column is the fp32 size).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.fixtures import (
    CPU_LOCATE_CLASSIFY,
    CPU_WHOLE_IMAGE,
    LOCATE_CLASSIFY,
    Served,
    VersionKind,
    deployment,
)
from benchmarks.harness import (
    MIB,
    Table,
    add_common_arguments,
    emit,
    proc_memory_mib,
    proc_rss_mib,
    verdict,
)

__all__ = ["MemoryOptions", "main", "run"]

TARGET_MIB = 1.5 * 1024
"""Largest acceptable backend RSS (issue 6: 1.5 GB, read as GiB), MiB."""
SETTLE_S = 2.0
"""Seconds the backend idles before an idle reading."""
MMAP_THRESHOLD_BYTES = 1 << 20
"""glibc ``MALLOC_MMAP_THRESHOLD_`` of the allocator variant: blocks from 1 MiB up (every
activation map) come from mmap and go back to the system when freed, instead of staying in
the heap after glibc's dynamic threshold has grown."""


@dataclass(frozen=True)
class MemoryOptions:
    size_px: int = 512
    served: tuple[Served, ...] = (
        Served(5),
        Served(5, env=(("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD_BYTES)),)),
        Served(5, True),
        Served(1),
    )
    arch: str = "resnet34"
    batch_tasks: int = 32
    batch_requests: int = 3
    single_requests: int = 10
    backbones: tuple[VersionKind, ...] = (CPU_LOCATE_CLASSIFY, CPU_WHOLE_IMAGE)
    """The cpu profile's networks served beside ``arch`` (empty: none)."""
    backbone_folds: int = 5


QUICK = MemoryOptions(
    size_px=64,
    served=(Served(2),),
    arch="resnet18",
    batch_tasks=4,
    batch_requests=1,
    single_requests=2,
    backbones=(
        VersionKind(
            arch="efficientnet_lite0", size_px=64, design=LOCATE_CLASSIFY, locator_px=64, crop_px=32
        ),
    ),
    backbone_folds=2,
)


def _weights_mib(model_dir: Path) -> float:
    """Size of the version's checkpoints (fp32 state dicts), MiB."""
    files = (model_dir / "versions").rglob("fold_*.pt")
    return sum(f.stat().st_size for f in files) / MIB


def run(options: MemoryOptions, workdir: Path) -> list[Table]:
    import httpx

    rows = []
    backbone_served = tuple(Served(options.backbone_folds, kind=k) for k in options.backbones)
    all_served = tuple(dict.fromkeys((*options.served, *backbone_served)))
    with (
        deployment(
            workdir,
            all_served,
            size_px=options.size_px,
            arch=options.arch,
            n_images=options.batch_tasks,
        ) as deployed,
        httpx.Client(timeout=600) as client,
    ):
        variant = iter(range(1, 10**6))
        for served, backend in deployed.backends.items():
            time.sleep(SETTLE_S)
            idle, _ = proc_rss_mib(backend.pid)
            for _ in range(options.batch_requests):
                backend.predict(client, deployed.tasks(next(variant)))
            after_batches, _ = proc_rss_mib(backend.pid)
            for _ in range(options.single_requests):
                backend.predict(client, deployed.tasks(next(variant), [0]))
            time.sleep(SETTLE_S)
            memory = proc_memory_mib(backend.pid)
            weights = _weights_mib(deployed.model_dir(served))
            rows.append((served, weights, idle, after_batches, memory))

    reference = Served(options.backbone_folds)
    peaks = {served: memory["VmHWM"] for served, *_, memory in rows}
    title = f"Backend RSS (MiB), {options.arch} at {options.size_px}²"
    if backbone_served:
        title += " and the cpu profile's Lite0 versions"
    table = Table(
        title,
        [
            "served version",
            "weights on disk (fp32)",
            "idle after start",
            f"after {options.batch_requests}×{options.batch_tasks} tasks",
            f"after +{options.single_requests}×1 task",
            "of which files/libraries",
            "peak",
            f"peak ÷ {options.arch} {reference.name}'s" if reference in peaks else "",
            f"target ≤ {TARGET_MIB:.0f}",
        ],
    )
    for served, weights, idle, after_batches, memory in rows:
        name = served.name if served.kind is not None else f"{options.arch}, {served.name}"
        ratio = memory["VmHWM"] / peaks[reference] if reference in peaks else None
        table.add_row(
            name,
            f"{weights:.0f}",
            f"{idle:.0f}",
            f"{after_batches:.0f}",
            f"{memory['VmRSS']:.0f}",
            f"{memory['RssFile']:.0f}",
            f"{memory['VmHWM']:.0f}",
            f"{ratio:.2f}×" if ratio is not None else "",
            verdict(memory["VmHWM"], TARGET_MIB, higher_is_better=False),
        )
    table.notes.append(
        "RSS of the `valve-id serve` process (uvicorn, one worker) from /proc; peak is VmHWM; "
        "'files/libraries' is RssFile (mapped shared libraries: torch's CUDA build maps "
        "several hundred MiB even on a CPU). Each request sends new image bytes, so every "
        "task is decoded and inferred."
    )
    return [table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    options = QUICK if args.quick else MemoryOptions()
    with tempfile.TemporaryDirectory(prefix="valve-id-bench-") as tmp:
        tables = run(options, Path(tmp))
    emit(tables, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
