"""``valve-id simulate`` (backend.tools.commands.simulate), run in-process: options, rerun from
config.json, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from backend.tools.commands.simulate import simulate_command

app = typer.Typer()
app.command("simulate")(simulate_command)
app.command("noop")(lambda: None)  # two commands: typer keeps "simulate" as a subcommand
runner = CliRunner()

TINY = [
    "--profile",
    "quick",  # mechanics only: the default (auto) trains the real cpu profile
    "--strategies",
    "random,margin",
    "--seeds",
    "1",
    "--budget",
    "12",
    "--batch-size",
    "4",
    "--seed-size",
    "8",
    "--image-size",
    "32",
    "--epochs",
    "1",
    "--arch",
    "resnet18",
    "--from-scratch",
]


def _env(tmp_path: Path) -> dict[str, str]:
    return {"VALVE_ID_STATE_DIR": str(tmp_path / "state"), "LOG_LEVEL": "WARNING"}


def _picks(results_path: Path) -> dict[str, list[list[str]]]:
    results = json.loads(results_path.read_text(encoding="utf-8"))
    return {
        name: [r["picked"] for r in runs[0]["rounds"]] for name, runs in results["runs"].items()
    }


@pytest.mark.slow
def test_simulate_writes_the_report_and_a_rerun_from_its_config_picks_the_same(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "first"
    result = runner.invoke(
        app, ["simulate", "--data", str(tiny_dataset), "--out", str(out), *TINY], env=_env(tmp_path)
    )
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file()
    assert result.stdout.strip() == str(out / "results.json")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    recipe = config["simulation"]["recipe"]
    assert (recipe["image_size_px"], recipe["epochs_from_scratch"], recipe["arch"]) == (
        32,
        1,
        "resnet18",
    )
    assert recipe["pretrained"] is False
    assert config["simulation"]["strategies"] == ["random", "margin"]

    again = tmp_path / "again"
    result = runner.invoke(
        app,
        ["simulate", "--config", str(out / "config.json"), "--out", str(again)],
        env=_env(tmp_path),
    )
    assert result.exit_code == 0, result.output
    assert _picks(again / "results.json") == _picks(out / "results.json")
    assert len(_picks(out / "results.json")["margin"][1]) == 4

    # The same images in another folder: --data relocates them, the snapshot check still holds.
    import shutil

    moved = shutil.copytree(tiny_dataset, tmp_path / "moved-data")
    relocated = tmp_path / "relocated"
    result = runner.invoke(
        app,
        ["simulate", "--config", str(out / "config.json"), "--data", str(moved)]
        + ["--out", str(relocated)],
        env=_env(tmp_path),
    )
    assert result.exit_code == 0, result.output
    assert _picks(relocated / "results.json") == _picks(out / "results.json")
    saved = json.loads((relocated / "config.json").read_text(encoding="utf-8"))
    assert saved["simulation"]["data"] == str(moved)


def test_simulate_refuses_bad_options_with_a_clear_message(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--seeds", "1"], env=_env(tmp_path))
    assert result.exit_code == 2 and "--data" in result.output
    result = runner.invoke(
        app,
        ["simulate", "--data", str(tmp_path), "--strategies", "random,best"],
        env=_env(tmp_path),
    )
    assert result.exit_code == 2 and "unknown strategies" in result.output
    result = runner.invoke(
        app,
        ["simulate", "--data", str(tmp_path), "--budget", "10", "--seed-size", "20"],
        env=_env(tmp_path),
    )
    assert result.exit_code == 2 and "budget" in result.output
    result = runner.invoke(
        app, ["simulate", "--data", str(tmp_path / "missing"), *TINY], env=_env(tmp_path)
    )
    assert result.exit_code == 1 and "manifest" in result.output
