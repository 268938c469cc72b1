"""training.shared.parallel: results in input order whatever the number of processes, and
one process for small jobs."""

from __future__ import annotations

import os

import pytest

from training.shared.parallel import PARALLEL_FROM_ITEMS, default_workers, ordered_map


def _square_and_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def test_results_come_back_in_input_order_from_other_processes() -> None:
    out = list(ordered_map(_square_and_pid, list(range(20)), workers=2))
    assert [value for value, _ in out] == [x * x for x in range(20)]
    assert os.getpid() not in {pid for _, pid in out}, "the work did not leave this process"


def test_one_worker_stays_in_this_process() -> None:
    out = list(ordered_map(_square_and_pid, [1, 2, 3], workers=1))
    assert out == [(1, os.getpid()), (4, os.getpid()), (9, os.getpid())]


def _fails_on_three(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return x


def test_an_exception_in_a_worker_reaches_the_caller() -> None:
    with pytest.raises(ValueError, match="three"):
        list(ordered_map(_fails_on_three, list(range(8)), workers=2))


def test_large_sets_use_the_cpus_small_ones_stay_in_process() -> None:
    assert default_workers(PARALLEL_FROM_ITEMS - 1) == 1
    assert default_workers(959) == min(8, len(os.sched_getaffinity(0)))


def test_workers_end_when_the_process_that_started_them_is_killed(tmp_path) -> None:
    """A parent killed with SIGKILL (an RQ work-horse at a cold shutdown) leaves no worker
    behind."""
    import signal
    import subprocess
    import sys
    import time

    pids = tmp_path / "pids"
    script = f"""
import os, time
from training.shared.parallel import ordered_map
from tests_parallel_helper import record_and_sleep
list(ordered_map(record_and_sleep, [{str(pids)!r}] * 8, workers=2))
"""
    (tmp_path / "tests_parallel_helper.py").write_text(
        "import os, time\n"
        "def record_and_sleep(folder):\n"
        "    os.makedirs(folder, exist_ok=True)\n"
        "    open(os.path.join(folder, str(os.getpid())), 'w').close()\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}"}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 60
    while len(list(pids.glob("*")) if pids.exists() else []) < 2:
        assert time.monotonic() < deadline, "the workers did not start"
        time.sleep(0.2)
    workers = [int(p.name) for p in pids.iterdir()]
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 20
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in workers if _alive(pid)]
    assert not alive, f"workers {alive} outlived their killed parent"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def _dies_outside(item: tuple[int, int]) -> int:
    value, parent = item
    if value == 5 and os.getpid() != parent:
        os._exit(1)  # a worker killed (for memory, say) while it held item 5
    return value


def test_a_dead_worker_leaves_the_rest_to_this_process() -> None:
    items = [(k, os.getpid()) for k in range(12)]
    assert list(ordered_map(_dies_outside, items, workers=2)) == list(range(12))


def test_a_script_read_from_stdin_works_in_process() -> None:
    """Spawned workers re-run the main script, which ``python - < script`` does not have."""
    import subprocess
    import sys

    script = (
        "from training.shared.parallel import ordered_map\n"
        "print(list(ordered_map(abs, [-3, -2, -1, 0] * 20, workers=2)) == [3, 2, 1, 0] * 20)\n"
    )
    out = subprocess.run(
        [sys.executable, "-"], input=script, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.strip() == "True", out.stderr
