"""Tests for ``valve-id models ...`` (backend.tools.commands.models), run in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from backend.settings import Settings
from backend.tools.commands.models import models_app
from training.shared.registry import ModelRegistry

CLASSES = ["codman_hakim", "certas_plus", "sophy_sm8", "progav_2"]

app = typer.Typer()
app.add_typer(models_app, name="models")
runner = CliRunner()


def _publish(registry: ModelRegistry, version_id: str, f1: float) -> None:
    staging = registry.staging("cli")
    config = {"classes": CLASSES, "preprocess": {"size_px": 512}, "arch": "resnet34"}
    (staging / "config.json").write_text(json.dumps(config))
    metrics = {"mean": {"f1_macro": f1, "accuracy": f1 + 0.01}, "classes": CLASSES}
    (staging / "metrics.json").write_text(json.dumps(metrics))
    registry.publish(staging, version_id=version_id)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    registry = ModelRegistry(root)
    _publish(registry, "20261125-100000-aaaa", 0.80)
    _publish(registry, "20261125-110000-bbbb", 0.90)
    _publish(registry, "20261125-120000-cccc", 0.50)  # kept out by the gate
    return root


def _run(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["models", *args], env=env)


def test_list_table_and_json(model_dir: Path) -> None:
    result = _run("list", "--model-dir", str(model_dir))
    assert result.exit_code == 0, result.output
    for vid in ("20261125-100000-aaaa", "20261125-110000-bbbb", "20261125-120000-cccc"):
        assert vid in result.output
    assert "0.900" in result.output

    result = _run("list", "--model-dir", str(model_dir), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["version_id"] for r in rows] == [
        "20261125-100000-aaaa",
        "20261125-110000-bbbb",
        "20261125-120000-cccc",
    ]
    assert [r["is_current"] for r in rows] == [False, True, False]
    assert rows[2]["gate"] == "kept"


def test_model_dir_from_environment(model_dir: Path) -> None:
    result = _run("list", "--json", env={"MODEL_DIR": str(model_dir)})
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 3


def test_list_empty_registry(tmp_path: Path) -> None:
    result = _run("list", "--model-dir", str(tmp_path / "nothing"))
    assert result.exit_code == 0
    assert "No model versions" in result.output
    assert not (tmp_path / "nothing").exists()  # reading creates nothing


def test_show(model_dir: Path) -> None:
    result = _run("show", "20261125-100000-aaaa", "--model-dir", str(model_dir), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["version"]["version_id"] == "20261125-100000-aaaa"
    assert data["config"]["preprocess"] == {"size_px": 512}
    assert data["metrics"]["mean"]["f1_macro"] == 0.80

    result = _run("show", "--model-dir", str(model_dir))  # current by default
    assert result.exit_code == 0, result.output
    assert "20261125-110000-bbbb" in result.output
    assert "0.9000" in result.output and "size_px" in result.output


def test_show_unknown_and_invalid(model_dir: Path) -> None:
    result = _run("show", "20991231-000000-dead", "--model-dir", str(model_dir))
    assert result.exit_code == 1
    assert "no model version" in result.output
    result = _run("show", "../etc", "--model-dir", str(model_dir))
    assert result.exit_code == 1
    assert "invalid version id" in result.output


def test_promote_and_rollback(model_dir: Path) -> None:
    registry = ModelRegistry(model_dir)
    result = _run("promote", "20261125-120000-cccc", "--model-dir", str(model_dir))
    assert result.exit_code == 0, result.output
    assert registry.current() == "20261125-120000-cccc"
    assert registry.history()[-1].reason == "manual (CLI)"

    result = _run("rollback", "--model-dir", str(model_dir), "--reason", "bad on new scanner")
    assert result.exit_code == 0, result.output
    assert registry.current() == "20261125-110000-bbbb"
    assert registry.history()[-1].reason == "bad on new scanner"
    assert "20261125-110000-bbbb" in result.output


def test_rollback_with_nothing_before(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path)
    _publish(registry, "20261125-100000-aaaa", 0.8)
    result = _run("rollback", "--model-dir", str(tmp_path))
    assert result.exit_code == 1
    assert "cannot roll back" in result.output
    assert registry.current() == "20261125-100000-aaaa"


def test_list_names_the_absolute_registry_from_any_directory(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From another folder the listing names the registry it read, absolute, never "None"
    (issue 14: "Model versions in None")."""
    for name in ("VALVE_ID_STATE_DIR", "MODEL_DIR"):
        monkeypatch.delenv(name, raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    empty = _run("list")
    assert empty.exit_code == 0, empty.output
    assert f"No model versions in {elsewhere / 'state' / 'models'}." in empty.output
    assert "None" not in empty.output

    monkeypatch.chdir(model_dir.parent)
    listed = _run("list", env={"MODEL_DIR": model_dir.name})
    assert listed.exit_code == 0, listed.output
    assert f"Model versions in {model_dir}\n" in listed.output and "None" not in listed.output
    missing = _run("show", env={"MODEL_DIR": "nothing"})
    assert missing.exit_code == 1
    assert f"no current model version in {model_dir.parent / 'nothing'}" in missing.output


def test_settings_fix_state_registry_and_cache_absolutely_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"VALVE_ID_STATE_DIR": "state", "VALVE_ID_CACHE_DIR": "~/c"})
    monkeypatch.chdir("/")  # later changes of directory change nothing
    assert settings.state_dir == tmp_path / "state"
    assert settings.models == tmp_path / "state" / "models"
    assert settings.cache == Path.home() / "c"
    assert Settings(model_dir=Path("m")).models == Path("/m")
