"""Re-scoring at scale: 1k / 5k / 10k unlabelled tasks through ``backend.loop.jobs.rescore``.

What a promotion triggers: every unlabelled task of a project is fetched, predicted with the
new version and written back, so the review queue re-sorts. This runs the real job body
(:func:`backend.loop.jobs.rescore`: paging, the image fetcher reading Label Studio local files,
the predictor, the Redis bookkeeping of a real Redis, the prediction rows) against an
in-process Label Studio stand-in. Why a stand-in: a real Label Studio sharing a 2-core
machine would be the bottleneck of 10k prediction writes (its database and request
handling), so the benchmark would measure Label Studio, not valve-id. The stand-in pages
tasks like Label Studio (100 per page) and keeps O(1) memory (it counts and serialises the
prediction rows, stores none), so the memory measured is the job's own.

Each scale runs in a fresh process (a clean peak RSS, an empty cache). To keep 16k tasks
feasible on 2 cores the version is a 1-model ResNet-34 at **64²** on 96² PNGs; the forward
pass at 512² would only scale every per-task time by the same factor. Checks (issue 6): time
per task stays flat from 1k to 10k (linear total time) and memory does not grow with the
number of tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fixtures import (
    LABEL_CONFIG_PATH,
    ROOT,
    XrayImages,
    local_task,
    publish_random_version,
    redis_server,
)
from benchmarks.harness import Table, add_common_arguments, emit, proc_rss_mib, verdict

__all__ = ["RescoreOptions", "StandInLabelStudio", "main", "run"]

VERSION = "bench-1"
MAX_PER_TASK_GROWTH = 1.2
"""Time per task at the largest scale over the smallest: at most this for "linear"."""
MAX_RSS_GROWTH_MIB = 50.0
"""RSS growth during a re-score (first batch → end) accepted as "flat", MiB."""
BASE_IMAGES = 16
"""Distinct radiographs rendered; each task's file stamps one with the task's number."""
WARMUP_IMAGES = 32
"""Images predicted before timing (lazy initialisation must not count against 1k)."""
WARMUP_STAMP = 1 << 23
"""Stamps of the warm-up images start here: never the bytes of a task's image."""


@dataclass(frozen=True)
class RescoreOptions:
    scales: tuple[int, ...] = (1000, 5000, 10000)
    size_px: int = 64
    image_px: int = 96
    arch: str = "resnet34"
    folds: int = 1


QUICK = RescoreOptions(scales=(20, 40), size_px=32, image_px=48, arch="resnet18")


class StandInLabelStudio:
    """Label Studio's side of a re-score, in process, O(1) memory.

    Serves ``n_tasks`` unlabelled tasks in pages of ``page_size`` by ascending id, each with
    a local-files image URL; counts (and JSON-encodes, as the SDK would) prediction rows.
    """

    def __init__(self, n_tasks: int, files_root: Path, images_dir: Path) -> None:
        self.n_tasks = n_tasks
        self.files_root = files_root
        self.images_dir = images_dir
        self.predictions = 0
        self.payload_bytes = 0
        self.model_version: str | None = None

    def count_unlabelled_tasks(self, project_id: int) -> int:
        return self.n_tasks

    def unlabelled_tasks(self, project_id: int, page_size: int = 100) -> Iterator[dict[str, Any]]:
        for start in range(0, self.n_tasks, page_size):
            page = [
                local_task(i + 1, self.images_dir / f"{i}.png", self.files_root)
                for i in range(start, min(start + page_size, self.n_tasks))
            ]
            yield from page

    def create_predictions(self, project_id: int, items: list[dict[str, Any]]) -> int:
        self.payload_bytes += len(json.dumps(items))
        self.predictions += len(items)
        return len(items)

    def set_model_version(self, project_id: int, version: str) -> None:
        self.model_version = version

    def ensure_review_view(self, project_id: int) -> int:
        return 1


def write_task_images(images_dir: Path, n: int, image_px: int, *, first_stamp: int = 0) -> None:
    """``images_dir/<i>.png`` for ``i < n``: distinct bytes per file (stamp ``first_stamp + i``
    written into three pixels)."""
    from PIL import Image

    base = XrayImages(BASE_IMAGES, seed=0, shape=(image_px, image_px)).arrays
    images_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = base[i % BASE_IMAGES].copy()
        row = image_px // 2
        stamp = first_stamp + i
        pixels[row, 4:7] = [(stamp >> s) & 0xFF for s in (0, 8, 16)]
        Image.fromarray(pixels).save(images_dir / f"{i}.png")


# --- one scale, in a child process ----------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    """Re-score ``args.tasks`` tasks; print one JSON line of measurements."""
    from redis import Redis
    from rich.progress import Progress

    from backend.loop.jobs import JobQueue, rescore
    from backend.loop.retraining import Retrainer
    from backend.service.labelstudio import image_fetcher
    from backend.service.predictor import Predictor
    from backend.settings import Settings
    from training.shared.labels import load_label_config

    files_root, images_dir = Path(args.files_root), Path(args.images_dir)
    settings = Settings(
        state_dir=Path(args.workdir) / "state",
        model_dir=Path(args.model_dir),
        local_files_root=files_root,
        label_studio_url="http://127.0.0.1:9",
        redis_url=args.redis_url,
    )
    redis = Redis.from_url(args.redis_url)
    retrainer = Retrainer(settings, redis, queue=JobQueue(redis))
    retrainer.register_project(args.project_id, f"{args.project_id}.1700000000")
    fetcher = image_fetcher(settings)
    predictor = Predictor(settings.models, device="cpu")
    warmup = Path(args.warmup_dir)
    predictor.predict([p.read_bytes() for p in sorted(warmup.glob("*.png"))])
    standin = StandInLabelStudio(args.tasks, files_root, images_dir)
    label_config = load_label_config(LABEL_CONFIG_PATH)
    rss_setup, _ = proc_rss_mib(os.getpid())
    samples: list[float] = []

    with Progress(transient=True) as bar:
        job = bar.add_task(f"re-scoring {args.tasks} tasks", total=args.tasks)

        def progress(**stats: Any) -> None:
            bar.update(job, completed=stats["done"])
            if stats["done"]:
                samples.append(proc_rss_mib(os.getpid())[0])

        started = time.perf_counter()
        stats = rescore(
            args.project_id,
            VERSION,
            label_studio=standin,
            predictor=predictor,
            fetcher=fetcher,
            retrainer=retrainer,
            label_config=label_config,
            progress=progress,
        )
        seconds = time.perf_counter() - started
    _, peak = proc_rss_mib(os.getpid())
    result = {
        "tasks": args.tasks,
        "seconds": seconds,
        "written": stats["written"],
        "failed": stats["failed"],
        "rows": standin.predictions,
        "model_version_set": standin.model_version,
        "rss_setup_mib": rss_setup,
        "rss_first_batch_mib": samples[0] if samples else rss_setup,
        "rss_end_mib": samples[-1] if samples else rss_setup,
        "rss_max_sampled_mib": max(samples, default=rss_setup),
        "peak_rss_mib": peak,
    }
    print(json.dumps(result), flush=True)
    return 0


# --- the parent -----------------------------------------------------------------------------


def run(options: RescoreOptions, workdir: Path) -> list[Table]:
    files_root = workdir / "files"
    images_dir = files_root / "rescore"
    warmup_dir = workdir / "warmup"
    started = time.perf_counter()
    write_task_images(images_dir, max(options.scales), options.image_px)
    write_task_images(warmup_dir, WARMUP_IMAGES, options.image_px, first_stamp=WARMUP_STAMP)
    prepare_s = time.perf_counter() - started
    model_dir = workdir / "models"
    publish_random_version(
        model_dir,
        n_folds=options.folds,
        size_px=options.size_px,
        arch=options.arch,
        version_id=VERSION,
    )
    results = []
    with redis_server(workdir / "redis") as redis_url:
        for project_id, n in enumerate(options.scales, start=1):
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_rescore", "--child"]
                + ["--tasks", str(n), "--project-id", str(project_id)]
                + ["--files-root", str(files_root), "--images-dir", str(images_dir)]
                + ["--warmup-dir", str(warmup_dir), "--model-dir", str(model_dir)]
                + ["--redis-url", redis_url, "--workdir", str(workdir)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            )
            result = json.loads(done.stdout.strip().splitlines()[-1])
            if result["written"] != n or result["rows"] != n:
                raise RuntimeError(f"re-score of {n} tasks wrote {result['written']}: {result}")
            results.append(result)

    table = Table(
        f"Re-scoring: {options.folds}-model {options.arch} at {options.size_px}² on "
        f"{options.image_px}² PNGs, in-process Label Studio stand-in, real Redis",
        [
            "tasks",
            "wall s",
            "ms/task",
            "tasks/s",
            "RSS after setup",
            "RSS 1st batch → end",
            "peak RSS",
        ],
    )
    for r in results:
        table.add_row(
            r["tasks"],
            f"{r['seconds']:.1f}",
            f"{1000 * r['seconds'] / r['tasks']:.2f}",
            f"{r['tasks'] / r['seconds']:.0f}",
            f"{r['rss_setup_mib']:.0f} MiB",
            f"{r['rss_first_batch_mib']:.0f} → {r['rss_end_mib']:.0f} MiB",
            f"{r['peak_rss_mib']:.0f} MiB",
        )
    small, large = results[0], results[-1]
    growth = large["seconds"] / large["tasks"] / (small["seconds"] / small["tasks"])
    rss_growth = max(r["rss_end_mib"] - r["rss_first_batch_mib"] for r in results)
    peak_spread = float(np.ptp([r["peak_rss_mib"] for r in results]))
    checks = Table("Re-scoring: does it scale?", ["check", "value", "target"])
    checks.add_row(
        f"time per task, {large['tasks']} vs {small['tasks']} tasks",
        f"{growth:.2f}×",
        f"≤ {MAX_PER_TASK_GROWTH:g}× (linear): "
        + verdict(growth, MAX_PER_TASK_GROWTH, higher_is_better=False),
    )
    checks.add_row(
        "RSS growth within a run (1st batch → end), worst scale",
        f"{rss_growth:+.0f} MiB",
        f"≤ {MAX_RSS_GROWTH_MIB:g} MiB (flat): "
        + verdict(rss_growth, MAX_RSS_GROWTH_MIB, higher_is_better=False),
    )
    checks.add_row(
        "peak RSS spread across scales",
        f"{peak_spread:.0f} MiB",
        f"≤ {MAX_RSS_GROWTH_MIB:g} MiB (flat): "
        + verdict(peak_spread, MAX_RSS_GROWTH_MIB, higher_is_better=False),
    )
    checks.notes.append(
        f"Each scale in a fresh process, {WARMUP_IMAGES} warm-up images first; "
        f"{max(options.scales)} task PNGs written in {prepare_s:.0f} s beforehand (not timed)."
    )
    return [table, checks]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_common_arguments(parser)
    parser.add_argument("--scales", type=str, default=None, help="comma-separated task counts")
    child_args = parser.add_argument_group("child process (internal)")
    child_args.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("files-root", "images-dir", "warmup-dir", "model-dir", "redis-url", "workdir"):
        child_args.add_argument(f"--{name}", help=argparse.SUPPRESS)
    child_args.add_argument("--tasks", type=int, help=argparse.SUPPRESS)
    child_args.add_argument("--project-id", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    options = QUICK if args.quick else RescoreOptions()
    if args.scales:
        options = replace(options, scales=tuple(int(s) for s in args.scales.split(",")))
    with tempfile.TemporaryDirectory(prefix="valve-id-bench-") as tmp:
        tables = run(options, Path(tmp))
    emit(tables, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
