"""Run every benchmark, one after the other, each in its own process.

``python -m benchmarks.run_all`` (about 20 minutes on a 2-core CPU) or ``--quick`` (a smoke
run). Each benchmark prints its tables as it finishes; ``--markdown FILE`` collects them all
(plus the machine) for docs/PERFORMANCE.md. ``--device cuda`` adds the GPU
training benchmark and the full paper-profile run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.fixtures import ROOT
from benchmarks.harness import machine_line

__all__ = ["BENCHMARKS", "main"]

BENCHMARKS = (
    "predict",
    "latency",
    "cache",
    "rescore",
    "training",
    "memory",
    "precision",
    "reader_frames",
)
"""Run in this order (``bench_<name>.py``); paper_profile joins them with ``--device cuda``."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="smoke run of every benchmark")
    parser.add_argument("--markdown", type=Path, default=None, help="collect the tables here")
    parser.add_argument("--device", default="cpu", help="training benchmarks' device")
    parser.add_argument("--only", default=None, help="comma-separated subset, e.g. predict,latency")
    args = parser.parse_args(argv)
    names = list(BENCHMARKS)
    if args.device.startswith("cuda"):
        names.append("paper_profile")
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = set(wanted) - set(names)
        if unknown:
            parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {names}")
        names = wanted
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(f"Machine: {machine_line()}\n\n", encoding="utf-8")
    failed = []
    for name in names:
        command = [sys.executable, "-m", f"benchmarks.bench_{name}"]
        if args.quick:
            command.append("--quick")
        if args.markdown is not None:
            command += ["--markdown", str(args.markdown.resolve())]
        if name == "training":
            command += ["--device", args.device]
        print(f"== bench_{name}", flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT)
        print(f"== bench_{name}: exit {done.returncode}, {time.perf_counter() - started:.0f} s")
        if done.returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
