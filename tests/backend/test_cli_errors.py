"""The ``valve-id`` command line, run for real: an error the user can fix is one line.

A wrong setting or an unreachable Redis used to end in a 40-190 line traceback before the
useful sentence. Each case runs ``.venv/bin/valve-id`` in a subprocess with a controlled
environment and checks the answer is one line naming the setting or address, exit status 1,
and the traceback only with ``LOG_LEVEL=DEBUG``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

VALVE_ID = Path(sys.executable).with_name("valve-id")
DEAD_REDIS = "redis://127.0.0.1:1/0"  # port 1: refused at once


def valve_id(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``valve-id *args`` with only ``env`` set on top of PATH/HOME (no inherited settings)."""
    base = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    return subprocess.run(
        [str(VALVE_ID), *args],
        env={**base, "VALVE_ID_STATE_DIR": str(tmp_path / "state"), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


CASES = {
    "serve, user without password": (
        ["serve", "--port", "9"],
        {"BASIC_AUTH_USER": "annotator"},
        ["BASIC_AUTH_USER", "BASIC_AUTH_PASS"],
    ),
    "serve, misspelt acquisition": (
        ["serve", "--port", "9", "--workers", "2"],
        {"VALVE_ID_ACQUISITION": "entroy"},
        ["VALVE_ID_ACQUISITION", "'entroy'", "entropy"],
    ),
    "serve --workers 2, bad Label Studio URL": (
        ["serve", "--port", "9", "--workers", "2"],
        {"LABEL_STUDIO_URL": "ftp://ls.example"},
        ["LABEL_STUDIO_URL", "ftp://ls.example"],
    ),
    "worker, Redis unreachable": (
        ["worker", "--burst"],
        {"REDIS_URL": DEAD_REDIS},
        ["Redis", "127.0.0.1:1", "REDIS_URL"],
    ),
    "train --enqueue, Redis unreachable": (
        ["train", "--data", ".", "--enqueue"],
        {"REDIS_URL": DEAD_REDIS},
        ["Redis", "127.0.0.1:1", "REDIS_URL"],
    ),
    "models list, bad setting": (
        ["models", "list"],
        {"RETRAIN_EVERY_N_LABELS": "0"},
        ["RETRAIN_EVERY_N_LABELS"],
    ),
    "preview, no manifest": (["preview", "missing.csv"], {}, ["missing.csv"]),
    "train --enqueue, test views not 1, 2, 4 or 8": (
        ["train", "--data", ".", "--enqueue", "--test-views", "3"],
        {"REDIS_URL": DEAD_REDIS},
        ["test_views", "1, 2, 4 or 8", "3"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_expected_error_is_one_line_naming_what_to_fix(tmp_path: Path, case: str) -> None:
    args, env, named = CASES[case]
    result = valve_id(tmp_path, *args, **env)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for word in named:
        assert word in lines[0]


@pytest.mark.parametrize(
    "args, env",
    [
        (["serve", "--port", "9"], {"BASIC_AUTH_USER": "annotator"}),  # settings never built
        (["worker", "--burst"], {"REDIS_URL": DEAD_REDIS}),
    ],
)
def test_log_level_debug_adds_the_traceback(
    tmp_path: Path, args: list[str], env: dict[str, str]
) -> None:
    result = valve_id(tmp_path, *args, LOG_LEVEL="DEBUG", **env)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
