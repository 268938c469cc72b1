"""Child processes of the local stack, tracked by PID file and stopped by PID, never by name.

Each process is started in its own session (process group), its output appended to a log
file, and described by a small JSON record under the run folder: PID, the kernel's start
time of that PID and the command line. Stopping reads the record back and first checks that
the PID still belongs to *that* process (same start time): a PID reused by
another program after a reboot or a crash is left alone, and the stale record is removed.

On Linux the identity is the boot id and the start time in ``/proc/<pid>/stat`` (clock
ticks since boot); elsewhere ``ps -o lstart=``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from training.shared.errors import StackError

__all__ = [
    "LOG_TAIL_LINES",
    "STOP_GRACE_S",
    "ProcessRecord",
    "forget",
    "free_port",
    "is_alive",
    "log_tail",
    "port_in_use",
    "read_record",
    "start_process",
    "stop_process",
    "wait_http",
]

logger = logging.getLogger(__name__)

STOP_GRACE_S = 20.0
"""Seconds a process gets after SIGTERM before the second SIGTERM (an RQ worker's cold
shutdown, which also ends the job it runs), then as long again before SIGKILL."""
LOG_TAIL_LINES = 25
"""Lines of a child's log quoted in an error message when it fails to start."""
HTTP_POLL_S = 0.5
"""Pause between two health probes (seconds)."""
_PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ProcessRecord:
    """What ``up`` wrote about a process it started (``<run dir>/<name>.json``)."""

    name: str
    pid: int
    identity: str
    """The PID's start time as the kernel reports it: with the PID, names one process."""
    argv: list[str]
    log: str
    started_at: float
    info: dict[str, Any] = field(default_factory=dict)
    """Whatever the caller wants to find again (port, URL)."""

    @classmethod
    def load(cls, path: Path) -> ProcessRecord:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**data)


# --------------------------------------------------------------------------------------------
# identity


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _identity(pid: int) -> str | None:
    """A token naming the process that has ``pid`` now (boot + start time), or None."""
    if Path("/proc/self/stat").exists():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        # Field 22 (starttime); the command name (field 2) may hold spaces: split after ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if not fields or fields[0] == "Z":  # a zombie has finished; only its exit code is left
            return None
        return f"{_boot_id()}:{fields[19]}"
    try:
        out = subprocess.run(
            ["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        return None
    return out or None


def is_alive(record: ProcessRecord) -> bool:
    """The process ``record`` describes is still running (not merely its PID reused).

    The start time, not the command line, is compared: RQ rewrites its process title.
    """
    return _identity(record.pid) == record.identity


# --------------------------------------------------------------------------------------------
# records


def _record_path(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.json"


def read_record(run_dir: Path, name: str) -> ProcessRecord | None:
    """The record of ``name``, or None if there is none (or it is unreadable)."""
    path = _record_path(run_dir, name)
    try:
        return ProcessRecord.load(path)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):
        logger.warning("ignoring unreadable process record %s", path)
        return None


def forget(run_dir: Path, name: str) -> None:
    """Remove the record of ``name`` (the process is gone)."""
    _record_path(run_dir, name).unlink(missing_ok=True)


def _write_record(run_dir: Path, record: ProcessRecord) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = _record_path(run_dir, record.name).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1), encoding="utf-8")
    os.replace(tmp, _record_path(run_dir, record.name))


# --------------------------------------------------------------------------------------------
# start / stop


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    run_dir: Path,
    log_path: Path,
    cwd: Path | None = None,
    info: Mapping[str, Any] | None = None,
) -> ProcessRecord:
    """Start ``argv`` in its own process group, output appended to ``log_path``, and record it.

    Refuses (StackError) if a live process of that name is already recorded.
    """
    existing = read_record(run_dir, name)
    if existing is not None and is_alive(existing):
        raise StackError(f"{name} is already running (PID {existing.pid})")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                list(argv),
                env=dict(env),
                cwd=str(cwd) if cwd else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise StackError(f"cannot start {name} ({argv[0]}): {exc.strerror or exc}") from exc
    identity = _identity(proc.pid)
    if identity is None:
        raise StackError(f"{name} exited at once (code {proc.poll()}); see {log_path}")
    record = ProcessRecord(
        name=name,
        pid=proc.pid,
        identity=identity,
        argv=list(argv),
        log=str(log_path),
        started_at=time.time(),
        info=dict(info or {}),
    )
    _write_record(run_dir, record)
    logger.info("started %s (PID %d), log %s", name, proc.pid, log_path)
    return record


def _signal_group(record: ProcessRecord, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, sig)  # our child is its group's leader: start_new_session=True


def _wait_gone(record: ProcessRecord, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(record.pid)
        if not is_alive(record):
            return True
        time.sleep(0.1)
    return not is_alive(record)


def _reap(pid: int) -> None:
    """Collect the exit status if the process is our own child (else it stays a zombie)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_process(run_dir: Path, name: str, *, grace_s: float = STOP_GRACE_S) -> str:
    """Stop the recorded process ``name`` and its group; returns what happened.

    SIGTERM, then after ``grace_s`` a second SIGTERM (RQ: cold shutdown), then SIGKILL.
    Returns ``"stopped"``, ``"killed"``, ``"not running"`` (stale record removed) or
    ``"not started"`` (no record).
    """
    record = read_record(run_dir, name)
    if record is None:
        return "not started"
    if not is_alive(record):
        forget(run_dir, name)
        return "not running"
    outcome = "stopped"
    _signal_group(record, signal.SIGTERM)
    if not _wait_gone(record, grace_s):
        _signal_group(record, signal.SIGTERM)
        if not _wait_gone(record, grace_s):
            _signal_group(record, signal.SIGKILL)
            _wait_gone(record, 5.0)
            outcome = "killed"
    if is_alive(record):
        raise StackError(f"{name} (PID {record.pid}) did not stop")
    # Anything left in its group (an RQ work horse) goes with it; the group is ours alone.
    _signal_group(record, signal.SIGKILL)
    forget(run_dir, name)
    logger.info("%s (PID %d) %s", name, record.pid, outcome)
    return outcome


# --------------------------------------------------------------------------------------------
# waiting and ports


def log_tail(path: Path | str, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log, for an error message."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def wait_http(
    url: str,
    *,
    record: ProcessRecord,
    timeout_s: float,
    ok: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
    what: str | None = None,
    log_check: Callable[[str], str | None] | None = None,
) -> None:
    """Poll ``url`` until ``ok(response)``; fail early if the process dies.

    ``log_check(log text)`` may return a reason to give up (a message the child printed).
    """
    what = what or record.name
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=_PROBE_TIMEOUT_S, trust_env=False) as client:
        while True:
            if not is_alive(record):
                _reap(record.pid)
                raise StackError(
                    f"{what} exited while starting; last lines of {record.log}:\n"
                    + log_tail(record.log)
                )
            if log_check is not None:
                reason = log_check(log_tail(record.log, 200))
                if reason:
                    raise StackError(f"{what}: {reason}; see {record.log}")
            try:
                if ok(client.get(url)):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise StackError(
                    f"{what} did not answer {url} within {timeout_s:.0f} s; last lines of "
                    f"{record.log}:\n" + log_tail(record.log)
                )
            time.sleep(HTTP_POLL_S)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Something accepts connections on ``host:port`` or holds it bound."""
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex((host, port)) == 0:
            return True
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """``preferred`` if it is free, else a free port the OS picks."""
    if preferred and not port_in_use(preferred, host):
        return preferred
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
