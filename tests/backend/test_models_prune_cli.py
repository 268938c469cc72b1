"""``valve-id models prune`` and how ``list`` / ``promote`` treat pruned versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from backend.tools.commands.models import models_app
from training.shared.registry import ModelRegistry

CLASSES = ["codman_hakim", "certas_plus"]
WEIGHT_BYTES = 2_000_000
VERSIONS = ["20261125-100000-aaaa", "20261125-110000-bbbb", "20261125-120000-cccc"]

app = typer.Typer()
app.add_typer(models_app, name="models")
runner = CliRunner()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    registry = ModelRegistry(tmp_path / "models")
    for i, version in enumerate(VERSIONS):
        staging = registry.staging("cli")
        (staging / "config.json").write_text(json.dumps({"classes": CLASSES}))
        metrics = {"mean": {"f1_macro": 0.5 + i / 10}, "classes": CLASSES}
        (staging / "metrics.json").write_text(json.dumps(metrics))
        (staging / "weights").mkdir()
        (staging / "weights" / "fold_0.pt").write_bytes(b"\0" * WEIGHT_BYTES)
        registry.publish(staging, version_id=version)
    return registry.root


def _run(*args: str, **env: str):
    return runner.invoke(app, ["models", *args], env={"VALVE_ID_KEEP_DAYS": "0", **env})


def test_prune_is_a_dry_run_by_default(model_dir: Path) -> None:
    result = _run("prune", "--model-dir", str(model_dir), VALVE_ID_KEEP_VERSIONS="1")
    assert result.exit_code == 0, result.output
    assert f"would prune {VERSIONS[0]}: 2.0 MB in 1 file(s)" in result.output
    assert "would free 2.0 MB" in result.output and "--apply" in result.output
    assert (model_dir / "versions" / VERSIONS[0] / "weights" / "fold_0.pt").is_file()


def test_prune_apply_then_list_and_promote(model_dir: Path) -> None:
    result = _run("prune", "--model-dir", str(model_dir), "--apply", "--keep-versions", "1")
    assert result.exit_code == 0, result.output
    assert f"pruned {VERSIONS[0]}" in result.output and "freed 2.0 MB" in result.output
    assert not (model_dir / "versions" / VERSIONS[0] / "weights").exists()

    listed = _run("list", "--model-dir", str(model_dir))
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.output.splitlines() if VERSIONS[0] in line)
    assert "pruned" in row
    rows = json.loads(_run("list", "--model-dir", str(model_dir), "--json").stdout)
    assert [r["pruned"] for r in rows] == [True, False, False]

    promoted = _run("promote", VERSIONS[0], "--model-dir", str(model_dir))
    assert promoted.exit_code == 1
    assert f"{VERSIONS[0]} was pruned" in promoted.output
    assert "Traceback" not in promoted.output
    assert ModelRegistry(model_dir).current() == VERSIONS[2]


def test_prune_json_and_settings(model_dir: Path) -> None:
    result = _run("prune", "--model-dir", str(model_dir), "--json", VALVE_ID_KEEP_VERSIONS="5")
    assert result.exit_code == 0, result.output
    # three versions made current, all within the last five: nothing to prune
    assert json.loads(result.stdout) == {"applied": False, "freed_bytes": 0, "pruned": []}


def test_prune_refuses_a_bad_option(model_dir: Path) -> None:
    result = _run("prune", "--model-dir", str(model_dir), "--keep-versions", "0")
    assert result.exit_code == 2
