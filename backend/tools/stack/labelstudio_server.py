"""A real Label Studio for the local stack and the end-to-end tests: venv, data dir, server.

Label Studio is a separate server with its own pins (Django, ``redis<5.3``, ``rq<2.7``,
``numpy``...), so it gets its **own virtualenv**, never valve-id's: :func:`ensure_venv`
creates it once (about a minute and 1 GB) and reuses it. :func:`init_data_dir` migrates a
fresh SQLite data dir and creates the admin user with a fixed legacy token, without a server
(``label-studio init``). :func:`start_label_studio` starts it bound to loopback with the
environment the ML-backend loop needs (see ``docs/PROTOCOL.md``: a backend on
127.0.0.1 is refused unless ``ML_BLOCK_LOCAL_IP=false``; the webhook Label Studio creates on
connect silently does not exist unless ``SSRF_PROTECTION_ENABLED=false``).

Label Studio's environment is built from an allow-list, not inherited: it reads many generic
names (``HOST``, ``PORT``, ``USERNAME``, ``PASSWORD``, ``DATABASE_*`` ...) that a user's shell
may hold for other reasons. Credentials travel in the environment, never on a command line
(which every local user can read with ``ps``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx

from backend.tools.stack.processes import (
    ProcessRecord,
    port_in_use,
    start_process,
    stop_process,
    wait_http,
)
from training.shared.errors import StackError

__all__ = [
    "DEFAULT_LS_VENV",
    "LABEL_STUDIO_REQUIREMENT",
    "LABEL_STUDIO_VERSION",
    "START_TIMEOUT_S",
    "LabelStudioAccount",
    "check_account",
    "copy_data_dir",
    "ensure_venv",
    "init_data_dir",
    "label_studio_env",
    "start_label_studio",
    "venv_is_ready",
]

logger = logging.getLogger(__name__)

LABEL_STUDIO_VERSION = "1.23.2"
"""The Label Studio release valve-id is built and tested against (docs/PROTOCOL.md)."""
LABEL_STUDIO_REQUIREMENT = f"label-studio=={LABEL_STUDIO_VERSION}"
DEFAULT_LS_VENV = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "valve-id"
    / f"label-studio-{LABEL_STUDIO_VERSION}"
)
"""One Label Studio install per machine and version (~1 GB), shared by ``valve-id up`` and
the test suite, outside any state folder so that ``rm -rf state`` keeps it."""
INSTALL_TIMEOUT_S = 30 * 60
"""Seconds ``pip install label-studio`` may take (about 1 min here; slow mirrors are slower)."""
INIT_TIMEOUT_S = 10 * 60
"""Seconds ``label-studio init`` may take (migrations: ~30 s on 2 idle cores)."""
START_TIMEOUT_S = 5 * 60
"""Seconds until ``/health`` answers (~5 s on a migrated data dir, ~30 s on a fresh one,
much more on a busy 2-core machine)."""
_READY_MARKER = ".valve-id-label-studio"
_INIT_MARKER = ".valve-id-initialized"
_PORT_MOVED_TEXT = "is in use"
"""What ``label-studio start`` prints when it silently moves to the next port."""

# The only variables of the caller's environment Label Studio gets (plus its own below).
_PASSED_THROUGH = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)


@dataclass(frozen=True, repr=False)
class LabelStudioAccount:
    """The admin user created on first run; the token is a legacy API token (40 hex)."""

    username: str
    password: str = field(repr=False)
    token: str = field(repr=False)

    def __repr__(self) -> str:
        return f"LabelStudioAccount(username={self.username!r}, password=***, token=***)"


# --------------------------------------------------------------------------------------------
# the virtualenv


def _bin(venv: Path, name: str) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin") / name


def venv_is_ready(venv: Path) -> bool:
    """``venv`` holds the pinned Label Studio, fully installed by :func:`ensure_venv`."""
    marker = venv / _READY_MARKER
    try:
        version = marker.read_text().strip()
    except OSError:
        return False
    return version == LABEL_STUDIO_VERSION and _bin(venv, "label-studio").is_file()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One installer at a time per venv (``make up`` and a test run may race)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_venv(venv: Path, *, python: str | None = None, log_path: Path | None = None) -> Path:
    """Create (or reuse) Label Studio's own virtualenv; returns its ``label-studio`` script.

    A folder left half-installed by an interrupted run is completed, not trusted: only a
    finished install writes the marker :func:`venv_is_ready` looks for. ``python`` defaults
    to the interpreter running valve-id (``venv`` bases the new one on its base install).
    """
    venv = venv.expanduser().absolute()
    if venv_is_ready(venv):
        return _bin(venv, "label-studio")
    log_path = log_path or venv.parent / f"{venv.name}-install.log"
    with _locked(venv.parent / f".{venv.name}.lock"):
        if venv_is_ready(venv):
            return _bin(venv, "label-studio")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        interpreter = python or sys.executable
        with log_path.open("ab") as log:
            if not _bin(venv, "python").exists():
                logger.info("creating Label Studio's virtualenv %s", venv)
                _run([interpreter, "-m", "venv", str(venv)], log, "creating the virtualenv")
            logger.info(
                "installing %s into %s (about a minute, ~1 GB)", LABEL_STUDIO_REQUIREMENT, venv
            )
            _run(
                [
                    str(_bin(venv, "python")),
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    LABEL_STUDIO_REQUIREMENT,
                ],
                log,
                f"pip install {LABEL_STUDIO_REQUIREMENT}",
                timeout_s=INSTALL_TIMEOUT_S,
            )
        if not _bin(venv, "label-studio").is_file():
            raise StackError(
                f"{LABEL_STUDIO_REQUIREMENT} installed no label-studio script in {venv}"
            )
        (venv / _READY_MARKER).write_text(LABEL_STUDIO_VERSION + "\n")
    return _bin(venv, "label-studio")


def _run(
    argv: list[str],
    log: BinaryIO,
    what: str,
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = INSTALL_TIMEOUT_S,
) -> None:
    try:
        result = subprocess.run(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise StackError(f"{what} took longer than {timeout_s:.0f} s") from None
    except OSError as exc:
        raise StackError(f"{what} could not run: {exc.strerror or exc}") from exc
    if result.returncode != 0:
        name = getattr(log, "name", "the log")
        raise StackError(f"{what} failed (exit {result.returncode}); see {name}")


# --------------------------------------------------------------------------------------------
# environment, data dir, server


def label_studio_env(
    *,
    data_dir: Path,
    files_root: Path,
    account: LabelStudioAccount,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment Label Studio runs with (allow-listed, see the module docstring)."""
    source = os.environ if base is None else base
    env = {k: source[k] for k in _PASSED_THROUGH if k in source}
    env.update(
        {
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir.absolute()),
            "LABEL_STUDIO_USERNAME": account.username,
            "LABEL_STUDIO_PASSWORD": account.password,
            "LABEL_STUDIO_USER_TOKEN": account.token,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(files_root.absolute()),
            # A backend on 127.0.0.1 is refused, and its webhook silently not created,
            # without these two (docs/PROTOCOL.md). Label Studio itself listens on loopback only.
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
            "COLLECT_ANALYTICS": "false",
            "LATEST_VERSION_CHECK": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def init_data_dir(
    label_studio: Path, *, data_dir: Path, env: Mapping[str, str], log_path: Path
) -> bool:
    """Migrate a data dir and create the admin user (``label-studio init``); once.

    Returns False if it was done before (a marker in the data dir says so).
    """
    marker = data_dir / _INIT_MARKER
    if marker.is_file():
        return False
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        _run(
            [str(label_studio), "init", "-q", "--no-browser", "--enable-legacy-api-token"],
            log,
            "label-studio init",
            env=env,
            timeout_s=INIT_TIMEOUT_S,
        )
    marker.write_text(LABEL_STUDIO_VERSION + "\n")
    return True


def start_label_studio(
    label_studio: Path,
    *,
    port: int,
    env: Mapping[str, str],
    run_dir: Path,
    log_path: Path,
    account: LabelStudioAccount,
    name: str = "label-studio",
    timeout_s: float = START_TIMEOUT_S,
) -> ProcessRecord:
    """Start Label Studio on ``127.0.0.1:port`` and wait until it answers as itself.

    ``label-studio start`` moves to the next port by itself when ``port`` is busy; that is
    refused here (the backend, the browser and the printed URL would point elsewhere): the
    port is checked first, and the log watched for the move while waiting.
    """
    if port_in_use(port):
        raise StackError(f"port {port} is taken; Label Studio needs it free (choose another)")
    offset = log_path.stat().st_size if log_path.exists() else 0
    argv = [
        str(label_studio),
        "start",
        "--no-browser",
        "--internal-host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    url = f"http://127.0.0.1:{port}"
    record = start_process(
        name,
        argv,
        env=env,
        run_dir=run_dir,
        log_path=log_path,
        info={"url": url, "port": port},
    )

    def moved(_: str) -> str | None:
        with log_path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        if _PORT_MOVED_TEXT in text:
            return f"port {port} was taken while starting, and Label Studio moved to another"
        return None

    try:
        wait_http(
            f"{url}/health",
            record=record,
            timeout_s=timeout_s,
            what="Label Studio",
            log_check=moved,
        )
        check_account(url, account)
    except BaseException:
        stop_process(run_dir, name, grace_s=5.0)
        raise
    return record


def check_account(url: str, account: LabelStudioAccount) -> None:
    """The server at ``url`` knows our token (it is our Label Studio, and the token works)."""
    try:
        answer = httpx.get(
            f"{url}/api/current-user/whoami",
            headers={"Authorization": f"Token {account.token}"},
            timeout=10,
            trust_env=False,
        )
    except httpx.HTTPError as exc:
        raise StackError(f"Label Studio at {url} stopped answering ({type(exc).__name__})") from exc
    if answer.status_code != 200:
        raise StackError(
            f"Label Studio at {url} refuses the stack's API token (HTTP {answer.status_code}); "
            "its data dir belongs to another set of secrets"
        )


def copy_data_dir(template: Path, target: Path) -> None:
    """Copy a migrated data dir (tests: one ``init`` per session, a copy per server)."""
    shutil.copytree(template, target, dirs_exist_ok=False)
