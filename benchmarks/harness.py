"""Measuring tools shared by the benchmarks: the machine, interleaved rounds, result tables.

Why interleave: on a shared 2-core box the speed of a contender depends on what else runs
at that moment. Running contender A for a minute and then B for a minute compares two
different machines; running A, B, C, then B, C, A ... and taking medians compares them on the
same one. Ratios are what the targets are about, so they are computed from medians of the
same rounds.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MIB",
    "Table",
    "add_common_arguments",
    "emit",
    "interleaved",
    "machine",
    "machine_line",
    "median",
    "percentile",
    "proc_memory_mib",
    "proc_rss_mib",
    "self_peak_rss_mib",
    "timed",
    "verdict",
]

MIB = 1024 * 1024
"""Bytes per MiB (memory is reported in MiB)."""
REPORT_WIDTH = 150
"""Characters per line when the output is not a terminal (logs, pytest captures)."""


# --- the machine ------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def machine() -> dict[str, str]:
    """What the numbers were measured on (CPU, cores, torch threads, GPU, load, date)."""
    import torch

    flags = _cpu_flags()
    bf16 = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    info = {
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count() or 1),
        "bf16 units": ", ".join(bf16) or "none",
        "torch": f"{torch.__version__}, {torch.get_num_threads()} intra-op threads",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "load average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return info


def machine_line() -> str:
    """:func:`machine` as one line, for the head of a report."""
    return "; ".join(f"{k}: {v}" for k, v in machine().items())


# --- statistics ---------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100), linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def interleaved(
    contenders: Mapping[str, Callable[[int], float]],
    rounds: int,
    *,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Call every contender once per round, rotating who goes first; their results by name.

    A contender is ``f(round) -> measurement`` (usually seconds for one pass over the inputs).
    """
    names = list(contenders)
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        this_round: dict[str, float] = {}
        for name in names[shift:] + names[:shift]:
            this_round[name] = contenders[name](r)
            results[name].append(this_round[name])
        if on_round is not None:
            on_round(r, this_round)
    return results


def timed(fn: Callable[[], object]) -> Callable[[int], float]:
    """A contender for :func:`interleaved` that times one call of ``fn`` (seconds)."""

    def one_round(_round: int) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return one_round


# --- memory ---------------------------------------------------------------------------------


def proc_memory_mib(pid: int) -> dict[str, float]:
    """Process ``pid``'s ``VmRSS``, ``VmHWM`` (peak RSS), ``RssAnon`` and ``RssFile``
    (mapped library and file pages) in MiB, from Linux ``/proc``."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) / 1024  # kB
    return values


def proc_rss_mib(pid: int) -> tuple[float, float]:
    """``(current, peak)`` resident set size of process ``pid`` in MiB."""
    values = proc_memory_mib(pid)
    return values["VmRSS"], values["VmHWM"]


def self_peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (``ru_maxrss`` is in kB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- tables ---------------------------------------------------------------------------------


def verdict(value: float, target: float, *, higher_is_better: bool = True) -> str:
    """``met`` / ``MISSED`` against a target (the tables say which way is better)."""
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "MISSED"


@dataclass
class Table:
    """One result table: printed with rich, and as Markdown for docs/PERFORMANCE.md."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_row(self, *cells: object) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        self.rows.append([str(c) for c in cells])

    def rich(self) -> object:
        from rich.table import Table as RichTable

        table = RichTable(title=self.title, title_justify="left", caption_justify="left")
        for i, column in enumerate(self.columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in self.rows:
            table.add_row(*row)
        if self.notes:
            table.caption = "\n".join(self.notes)
        return table

    def markdown(self) -> str:
        lines = [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(self.columns) - 1)) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines) + "\n"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``--quick`` (smoke run) and ``--markdown FILE`` (append the tables there)."""
    parser.add_argument(
        "--quick", action="store_true", help="tiny inputs, one round: proves it runs"
    )
    parser.add_argument(
        "--markdown", type=Path, default=None, help="append the result tables to this file"
    )


def add_size_range_argument(parser: argparse.ArgumentParser) -> None:
    """``--size-range LO HI``: the sides of the synthetic X-rays a benchmark draws."""
    parser.add_argument(
        "--size-range",
        type=int,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="sides of the generated X-rays, px (default 600 1200, the demo's; 1800 2600 is "
        "radiograph-sized)",
    )


def emit(tables: Sequence[Table], markdown: Path | None, *, header: str | None = None) -> None:
    """Print the tables (and the machine) and append them to ``markdown`` if given."""
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else REPORT_WIDTH)
    line = header or machine_line()
    console.print(f"[dim]{line}[/dim]")
    for table in tables:
        console.print(table.rich())
        console.print()
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        with open(markdown, "a", encoding="utf-8") as fh:
            for table in tables:
                fh.write(table.markdown() + "\n")
