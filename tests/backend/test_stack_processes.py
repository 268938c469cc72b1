"""The local stack's process handling, secrets and Redis, on real processes (no Label Studio).

``down`` must stop exactly what ``up`` started: these tests start real child processes and
check that a PID reused by someone else is left alone, that a process ignoring SIGTERM is
still stopped, and that the secrets file is private and stable.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from backend.tools.stack import processes
from backend.tools.stack.labelstudio_server import LabelStudioAccount, start_label_studio
from backend.tools.stack.local import ensure_secrets
from backend.tools.stack.processes import (
    free_port,
    is_alive,
    port_in_use,
    read_record,
    start_process,
    stop_process,
)
from backend.tools.stack.redis_server import find_redis_server, redis_answers, start_redis
from training.shared.errors import StackError

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_start_records_and_stop_ends_the_process(tmp_path: Path) -> None:
    record = start_process(
        "sleeper", SLEEPER, env=dict(os.environ), run_dir=tmp_path, log_path=tmp_path / "s.log"
    )
    assert is_alive(record)
    assert read_record(tmp_path, "sleeper") == record
    with pytest.raises(StackError, match="already running"):
        start_process(
            "sleeper", SLEEPER, env=dict(os.environ), run_dir=tmp_path, log_path=tmp_path / "s.log"
        )
    assert stop_process(tmp_path, "sleeper", grace_s=5) == "stopped"
    assert not is_alive(record)
    assert read_record(tmp_path, "sleeper") is None
    assert stop_process(tmp_path, "sleeper") == "not started"


def test_a_reused_pid_is_left_alone(tmp_path: Path) -> None:
    """A record whose PID now belongs to another process (other start time) is stale."""
    record = start_process(
        "ours", SLEEPER, env=dict(os.environ), run_dir=tmp_path, log_path=tmp_path / "o.log"
    )
    # Start times count clock ticks (10 ms): a stranger started in the same tick would look
    # like ours, which a real PID reuse never does (the PID must first be freed).
    time.sleep(0.1)
    stranger = subprocess.Popen(SLEEPER)
    try:
        forged = replace(record, name="forged", pid=stranger.pid)
        processes._write_record(tmp_path, forged)
        assert not is_alive(forged)
        assert stop_process(tmp_path, "forged", grace_s=1) == "not running"
        assert stranger.poll() is None, "a process we did not start was signalled"
        assert read_record(tmp_path, "forged") is None
    finally:
        stranger.kill()
        stranger.wait()
        stop_process(tmp_path, "ours", grace_s=5)


def test_a_process_ignoring_sigterm_is_killed_with_its_children(tmp_path: Path) -> None:
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "stubborn.log"
    record = start_process(
        "stubborn",
        [sys.executable, "-c", script],
        env=dict(os.environ),
        run_dir=tmp_path,
        log_path=log,
    )
    deadline = time.monotonic() + 20
    while not log.read_text().strip().splitlines()[-1:][0].isdigit():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(log.read_text().strip().splitlines()[-1])
    started = time.monotonic()
    assert stop_process(tmp_path, "stubborn", grace_s=0.5) == "killed"
    assert time.monotonic() - started < 10
    assert not is_alive(record)
    deadline = time.monotonic() + 5
    while processes._identity(child) is not None:  # gone, or a zombie waiting for init
        assert time.monotonic() < deadline, "the grandchild survived its group"
        time.sleep(0.05)


def test_wait_http_fails_fast_when_the_process_dies(tmp_path: Path) -> None:
    record = start_process(
        "dies",
        # It lives long enough to be recorded (a process gone before that is start_process's
        # own error, tested by the launch path), then dies while we wait for its port.
        [
            sys.executable,
            "-c",
            "import sys, time; print('boom', flush=True); time.sleep(0.5); sys.exit(3)",
        ],
        env=dict(os.environ),
        run_dir=tmp_path,
        log_path=tmp_path / "dies.log",
    )
    started = time.monotonic()
    with pytest.raises(StackError, match="exited while starting") as failure:
        processes.wait_http(f"http://127.0.0.1:{free_port()}/", record=record, timeout_s=60)
    assert "boom" in str(failure.value)
    assert time.monotonic() - started < 10


def test_ports() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        busy = server.getsockname()[1]
        assert port_in_use(busy)
        assert free_port(busy) != busy
    port = free_port()
    assert not port_in_use(port)
    assert free_port(port) == port


def test_label_studio_refuses_a_busy_port_before_starting(tmp_path: Path) -> None:
    """``label-studio start`` would silently move to the next port; we refuse instead."""
    account = LabelStudioAccount("a@b.c", "pw", "0" * 40)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with pytest.raises(StackError, match="is taken"):
            start_label_studio(
                tmp_path / "no-such-label-studio",
                port=server.getsockname()[1],
                env={},
                run_dir=tmp_path,
                log_path=tmp_path / "ls.log",
                account=account,
            )
    assert not (tmp_path / "ls.log").exists()


def test_secrets_are_generated_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "secrets.env"
    values, generated = ensure_secrets(path)
    assert generated
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(values["LABEL_STUDIO_API_KEY"]) == 40
    assert int(values["LABEL_STUDIO_API_KEY"], 16) >= 0
    assert len(values["VALVE_ID_PSEUDONYM_KEY"]) >= 16
    assert len(set(values.values())) == len(values)  # nothing reused between secrets
    os.chmod(path, 0o644)
    again, generated = ensure_secrets(path)
    assert (again, generated) == (values, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    other, _ = ensure_secrets(tmp_path / "other" / "secrets.env")
    assert other["LABEL_STUDIO_PASSWORD"] != values["LABEL_STUDIO_PASSWORD"]


def test_own_redis_starts_on_loopback_and_stops(tmp_path: Path) -> None:
    assert find_redis_server() is not None
    port = free_port()
    record, url = start_redis(
        port=port,
        data_dir=tmp_path / "redis",
        run_dir=tmp_path / "run",
        log_path=tmp_path / "redis.log",
        env=dict(os.environ),
    )
    try:
        assert url == f"redis://127.0.0.1:{port}/0" and redis_answers(url)
        assert record.info["url"] == url
    finally:
        assert stop_process(tmp_path / "run", "redis", grace_s=5) == "stopped"
    assert not redis_answers(url)
    assert (tmp_path / "redis").is_dir()  # its data stays under the state dir


def test_stop_signals_only_the_recorded_group(tmp_path: Path) -> None:
    """Stopping one part leaves another part (another group) running."""
    a = start_process("a", SLEEPER, env=dict(os.environ), run_dir=tmp_path, log_path=tmp_path / "a")
    b = start_process("b", SLEEPER, env=dict(os.environ), run_dir=tmp_path, log_path=tmp_path / "b")
    try:
        assert os.getpgid(a.pid) == a.pid and os.getpgid(b.pid) == b.pid
        assert stop_process(tmp_path, "a", grace_s=5) == "stopped"
        assert is_alive(b) and not is_alive(a)
    finally:
        if is_alive(b):
            os.kill(b.pid, signal.SIGKILL)


def test_label_studio_is_installed_once_per_machine_not_per_state_folder(tmp_path: Path) -> None:
    """``make up`` and ``make test`` share one Label Studio virtualenv; deleting a state
    folder never deletes it (issue 14)."""
    from backend.tools.stack.labelstudio_server import DEFAULT_LS_VENV, LABEL_STUDIO_VERSION
    from backend.tools.stack.local import StackOptions, StackPaths

    options = StackOptions(state_dir=tmp_path / "state")
    venv = StackPaths.of(options).ls_venv(options)
    assert venv == DEFAULT_LS_VENV.absolute()
    assert not venv.is_relative_to(tmp_path), "outside the state folder"
    assert venv.name == f"label-studio-{LABEL_STUDIO_VERSION}", "one per version"
    assert StackPaths.of(options).ls_venv(replace(options, ls_venv=tmp_path / "v")) == (
        tmp_path / "v"
    )
