"""``valve-id up`` twice, ``status``, ``down``, for real: Label Studio, Redis, backend, workers.

A small demo (12 X-rays, no seed labels, so no training run) keeps it to about a minute
beyond Label Studio's own start. Checks what a person relies on: the login printed once,
secrets kept private, nothing duplicated by a second ``up``, and ``down`` stopping exactly
the processes ``up`` recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from backend.tools.stack import bootstrap
from backend.tools.stack.local import PARTS, valve_id_argv
from backend.tools.stack.processes import free_port, is_alive, read_record

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

UP_TIMEOUT_S = 900
STARTED = [part for part in PARTS if part != "redis"]
"""What ``up`` starts here: REDIS_URL points at the suite's Redis, which answers."""


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=UP_TIMEOUT_S)


def _secrets(state: Path) -> dict[str, str]:
    lines = (state / "secrets.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def _inventory(url: str, token: str) -> dict[str, object]:
    """What the bootstrap made in Label Studio (everything it must not duplicate)."""
    admin = bootstrap.LabelStudioAdmin(url, token)
    try:
        projects = admin.request("GET", "/api/projects/", params={"page_size": 100})["results"]
        (project,) = projects
        pid = int(project["id"])
        views = admin.request("GET", "/api/dm/views/", params={"project": pid})
        return {
            "projects": [p["title"] for p in projects],
            "tasks": len(list(admin.tasks(pid, fields="task_only"))),
            "ml": [(b["url"], b["state"], b["auth_method"]) for b in admin.ml_backends(pid)],
            "webhooks": [(w["url"], sorted(w["headers"])) for w in admin.webhooks(pid)],
            "views": sorted(v["data"].get("title", "") for v in views),
            "storages": len(
                admin.request("GET", "/api/storages/localfiles", params={"project": pid})
            ),
        }
    finally:
        admin.close()


def test_up_twice_status_down(
    tmp_path: Path, redis_url: str, label_studio_bin: Path, ls_venv: Path, artifacts_dir: Path
) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in {"MODEL_DIR", "VALVE_ID_CACHE_DIR"}}
    env.update(
        {
            "VALVE_ID_LS_VENV": str(ls_venv),  # installed by the label_studio_bin fixture
            "REDIS_URL": redis_url.rsplit("/", 1)[0] + "/2",
            "LOG_LEVEL": "INFO",
        }
    )
    env.pop("VALVE_ID_STATE_DIR", None)
    ls_port, backend_port = free_port(), free_port()
    up = [
        *valve_id_argv(),
        "up",
        "--state-dir",
        str(state),
        "--demo-images",
        "12",
        "--seed-labels",
        "0",
        "--ls-port",
        str(ls_port),
        "--backend-port",
        str(backend_port),
    ]
    down = [*valve_id_argv(), "down", "--state-dir", str(state)]
    status = [*valve_id_argv(), "status", "--state-dir", str(state)]
    records = {}
    try:
        first = _run(up, env)
        assert first.returncode == 0, first.stdout + first.stderr
        secrets = _secrets(state)
        assert stat.S_IMODE((state / "secrets.env").stat().st_mode) == 0o600
        assert secrets["LABEL_STUDIO_PASSWORD"] in first.stderr  # printed once...
        ls_url = f"http://127.0.0.1:{ls_port}"
        for where in (ls_url, "/projects/1/data?tab=", "make down", str(state / "logs")):
            assert where in first.stderr, where
        assert "nothing trained yet" in first.stderr
        # REDIS_URL answers, so it is used and no Redis of our own is started.
        assert "already running: redis (REDIS_URL)" in " ".join(first.stderr.split())
        assert read_record(state / "run", "redis") is None
        records = {name: read_record(state / "run", name) for name in STARTED}
        assert all(r is not None and is_alive(r) for r in records.values()), records
        made = _inventory(ls_url, secrets["LABEL_STUDIO_API_KEY"])
        assert made == {
            "projects": [bootstrap.PROJECT_TITLE],
            "tasks": 12,
            "ml": [(f"http://127.0.0.1:{backend_port}", "CO", "BASIC_AUTH")],
            "webhooks": [(f"http://127.0.0.1:{backend_port}/webhook", ["Authorization"])],
            "views": ["Review queue — most uncertain first"],
            "storages": 2,  # the X-rays' folder and the reading guides' pictures
        }
        chosen = json.loads((state / "stack.json").read_text())
        assert (chosen["ls_port"], chosen["backend_port"]) == (ls_port, backend_port)

        second = _run(up, env)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "already running" in second.stderr and "started: nothing new" in second.stderr
        assert secrets["LABEL_STUDIO_PASSWORD"] not in second.stderr  # ...and only once
        assert _secrets(state) == secrets
        assert _inventory(ls_url, secrets["LABEL_STUDIO_API_KEY"]) == made
        assert {n: read_record(state / "run", n).pid for n in STARTED} == {
            n: r.pid for n, r in records.items()
        }

        shown = _run(status, env)
        assert shown.returncode == 0 and shown.stdout.count("running") == len(STARTED)
    finally:
        stopped = _run(down, env)
        for log in (state / "logs").glob("*.log"):
            shutil.copy(log, artifacts_dir / f"e2e-up-{log.name}")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert records and not [n for n, r in records.items() if r is not None and is_alive(r)]
    assert not list((state / "run").glob("*.json"))
    assert _run(status, env).returncode == 3  # nothing runs
    again = _run(down, env)
    assert again.returncode == 0 and "nothing to stop" in again.stderr

    # Up again from the kept state, the backend on another port: the connection and its
    # webhook follow it (no second backend, no stale webhook), and nothing else changes.
    moved = free_port()
    try:
        restarted = _run([*up[:-1], str(moved)], env)
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert _inventory(ls_url, secrets["LABEL_STUDIO_API_KEY"]) == {
            **made,
            "ml": [(f"http://127.0.0.1:{moved}", "CO", "BASIC_AUTH")],
            "webhooks": [(f"http://127.0.0.1:{moved}/webhook", ["Authorization"])],
        }
    finally:
        assert _run(down, env).returncode == 0
