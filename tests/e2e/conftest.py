"""Fixtures of the end-to-end suite: a real Label Studio (pinned, in its own cached virtualenv).

Nothing here is a stand-in. The Label Studio virtualenv is created once and reused across
runs (``VALVE_ID_LS_VENV``, default ``~/.cache/valve-id/label-studio-<version>``); its data
dir is migrated once per test session (``label-studio init``) and copied for each server. If
Label Studio cannot be installed or started, the tests **fail** with the reason: the suite is
never skipped.

Logs of every process and the timings of the slow steps go to the test-artefact folder
(``VALVE_ID_TEST_ARTIFACTS``, default ``<repo>/test-artifacts/``).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.tools.stack.labelstudio_server import (
    DEFAULT_LS_VENV,
    LABEL_STUDIO_VERSION,
    LabelStudioAccount,
    copy_data_dir,
    ensure_venv,
    init_data_dir,
    label_studio_env,
    start_label_studio,
)
from backend.tools.stack.processes import free_port, stop_process
from training.shared.errors import StackError

REPO = Path(__file__).resolve().parents[2]


def ls_venv_path() -> Path:
    """Where the suite keeps Label Studio's virtualenv (reused across runs)."""
    return Path(os.environ.get("VALVE_ID_LS_VENV") or DEFAULT_LS_VENV).expanduser()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Screenshots, logs and timings of the end-to-end suite (git-ignored)."""
    folder = Path(os.environ.get("VALVE_ID_TEST_ARTIFACTS") or REPO / "test-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Timings:
    """Seconds spent in the slow steps, written to ``e2e-timings.json`` as they happen."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, float] = {}

    def record(self, name: str, seconds: float) -> None:
        self.values[name] = round(seconds, 1)
        self.path.write_text(json.dumps(self.values, indent=1) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def timings(artifacts_dir: Path) -> Timings:
    return Timings(artifacts_dir / "e2e-timings.json")


@pytest.fixture(scope="session")
def ls_venv() -> Path:
    """Label Studio's virtualenv folder (see :func:`ls_venv_path`)."""
    return ls_venv_path()


@pytest.fixture(scope="session")
def label_studio_bin(timings: Timings) -> Path:
    """The pinned Label Studio's ``label-studio`` script (installed on first use)."""
    venv = ls_venv_path()
    started = time.monotonic()
    try:
        script = ensure_venv(venv)
    except StackError as exc:
        pytest.fail(
            f"Label Studio {LABEL_STUDIO_VERSION} could not be installed into {venv}: {exc}. "
            "The end-to-end suite needs the real server; it is never skipped.",
            pytrace=False,
        )
    timings.record("label_studio_venv_s", time.monotonic() - started)
    return script


@dataclass(frozen=True)
class LabelStudioTemplate:
    """A migrated data dir with an admin user, ready to copy."""

    data_dir: Path
    account: LabelStudioAccount


@pytest.fixture(scope="session")
def ls_template(
    label_studio_bin: Path, tmp_path_factory: pytest.TempPathFactory, timings: Timings
) -> LabelStudioTemplate:
    """``label-studio init`` once per session (migrations take ~30 s); servers copy it."""
    root = tmp_path_factory.mktemp("ls-template")
    account = LabelStudioAccount(
        "e2e@valve-id.local", secrets.token_urlsafe(12), secrets.token_hex(20)
    )
    env = label_studio_env(data_dir=root / "data", files_root=root / "files", account=account)
    started = time.monotonic()
    try:
        init_data_dir(label_studio_bin, data_dir=root / "data", env=env, log_path=root / "init.log")
    except StackError as exc:
        pytest.fail(f"label-studio init failed: {exc}", pytrace=False)
    timings.record("label_studio_init_s", time.monotonic() - started)
    return LabelStudioTemplate(root / "data", account)


@dataclass(frozen=True)
class LabelStudioServer:
    """A running Label Studio of the suite."""

    url: str
    account: LabelStudioAccount
    files_root: Path
    """Its LOCAL_FILES_DOCUMENT_ROOT."""
    run_dir: Path
    log: Path


@pytest.fixture(scope="module")
def label_studio(
    label_studio_bin: Path,
    ls_template: LabelStudioTemplate,
    tmp_path_factory: pytest.TempPathFactory,
    artifacts_dir: Path,
    timings: Timings,
) -> Iterator[LabelStudioServer]:
    """A real Label Studio on a free loopback port, for one test module."""
    root = tmp_path_factory.mktemp("label-studio")
    data_dir, files_root = root / "data", root / "files"
    copy_data_dir(ls_template.data_dir, data_dir)
    files_root.mkdir()
    env = label_studio_env(data_dir=data_dir, files_root=files_root, account=ls_template.account)
    log = root / "label-studio.log"
    started = time.monotonic()
    try:
        record = start_label_studio(
            label_studio_bin,
            port=free_port(),
            env=env,
            run_dir=root / "run",
            log_path=log,
            account=ls_template.account,
        )
    except StackError as exc:
        pytest.fail(f"Label Studio did not start: {exc}", pytrace=False)
    timings.record("label_studio_start_s", time.monotonic() - started)
    try:
        yield LabelStudioServer(
            url=str(record.info["url"]),
            account=ls_template.account,
            files_root=files_root,
            run_dir=root / "run",
            log=log,
        )
    finally:
        stop_process(root / "run", "label-studio", grace_s=10)
        shutil.copy(log, artifacts_dir / f"label-studio-{root.name}.log")
