"""Tests for training.shared.version_config: the config.json contract between a run and serving."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from training.shared.errors import ModelLoadError
from training.shared.preprocess import PreprocessParams
from training.shared.version_config import (
    CONFIG_FILE,
    DataSummary,
    FoldEntry,
    VersionConfig,
    read_version_file,
)

CLASSES = ["codman_hakim", "certas_plus", "sophy_sm8", "progav_2"]


def _as_run_writes() -> dict[str, Any]:
    """A config.json as a run's finalise stage writes it, keys in its order."""
    return {
        "format": 1,
        "version": "20261125-100000-aaaa",
        "run_id": "20261125-100000-aaaa",
        "created": "2026-11-25T10:00:00Z",
        "arch": "resnet34",
        "design": "whole_image",
        "classes": CLASSES,
        "unused_classes": ["miethke_proGAV"],
        "label_config_hash": "abc123",
        "preprocess": PreprocessParams(size_px=64).to_dict(),
        "recipe": {"arch": "resnet34", "n_folds": 2, "profile": "quick"},
        "temperature": 1.25,
        "init": {"arch": "resnet34", "init": "random", "weights_file": None, "reason": "test"},
        "folds": [
            {
                "fold": k,
                "weights": f"weights/fold_{k}.pt",
                "n_train": 30,
                "n_val": 10,
                "precision": "bfloat16",
            }
            for k in range(2)
        ],
        "data": {"source": "manifest.csv", "n_images": 40, "n_failed": 0, "snapshot": "run.json"},
    }


def test_round_trip_keeps_the_layout_on_disk(tmp_path: Path) -> None:
    stored = _as_run_writes()
    (tmp_path / CONFIG_FILE).write_text(json.dumps(stored, indent=2))
    config = VersionConfig.read(tmp_path)
    assert config.classes == tuple(CLASSES)
    assert config.preprocess == PreprocessParams(size_px=64)
    assert config.temperature == 1.25
    assert config.folds == (
        FoldEntry(0, "weights/fold_0.pt", 30, 10, "bfloat16"),
        FoldEntry(1, "weights/fold_1.pt", 30, 10, "bfloat16"),
    )
    assert config.data == DataSummary("manifest.csv", 40, 0, "run.json")
    assert list(config.to_dict()) == list(stored)  # same keys, same order
    assert config.to_dict() == stored
    assert json.dumps(config.to_dict(), indent=2) == json.dumps(stored, indent=2)
    assert VersionConfig.from_dict(config.to_dict()) == config


def test_an_old_config_without_the_optional_fields_loads() -> None:
    """Only classes and preprocess are needed, as by a version written before the rest."""
    config = VersionConfig.from_dict({"classes": CLASSES, "preprocess": {"size_px": 512}})
    assert config.classes == tuple(CLASSES)
    assert config.preprocess == PreprocessParams()
    assert config.temperature == 1.0
    assert config.folds is None
    assert (config.arch, config.design, config.version, config.data) == (None,) * 4
    assert config.unused_classes == ()


def test_folds_without_sizes_and_nulls_and_unknown_keys_load() -> None:
    config = VersionConfig.from_dict(
        {
            "classes": CLASSES,
            "preprocess": {"size_px": 32},
            "temperature": None,
            "version": None,
            "folds": [{"fold": 0, "weights": "weights/fold_0.pt"}],
            "added_by_a_newer_valve_id": {"anything": 1},
        }
    )
    assert config.temperature == 1.0 and config.version is None
    assert config.folds == (FoldEntry(0, "weights/fold_0.pt"),)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": None}, "classes is missing"),
        ({"preprocess": None}, "preprocess is missing"),
        ({"classes": "codman_hakim"}, "classes must be a list of non-empty strings"),
        ({"classes": [1, 2]}, "classes must be a list of non-empty strings"),
        ({"classes": []}, "at least one class"),
        ({"classes": ["a", "a"]}, "distinct"),
        ({"preprocess": [512]}, "preprocess must be an object, not a list"),
        ({"preprocess": {"size_px": 512, "zoom": 2}}, "unknown preprocessing parameters"),
        ({"temperature": "warm"}, "temperature must be a number, not a string"),
        ({"temperature": 0}, "temperature 0.0 is not positive"),
        ({"temperature": True}, "temperature must be a number, not a boolean"),
        ({"folds": {"fold": 0}}, "folds must be a list, not an object"),
        ({"folds": [{"fold": 0, "weights": 3}]}, "folds[0].weights must be a string, not a number"),
        ({"folds": [{"weights": "w.pt"}]}, "folds[0].fold is missing"),
        ({"folds": [7]}, "folds[0] must be an object, not a number"),
        ({"data": {"source": "x"}}, "data.n_images is missing"),
        ({"arch": 34}, "arch must be a string, not a number"),
        ({"format": "1"}, "format must be an integer, not a string"),
        ({"recipe": []}, "recipe must be an object, not a list"),
    ],
)
def test_a_malformed_field_gets_one_clear_error(change: dict[str, Any], message: str) -> None:
    stored = {k: v for k, v in {**_as_run_writes(), **change}.items() if v is not None}
    with pytest.raises(ModelLoadError, match="unusable config.json") as caught:
        VersionConfig.from_dict(stored, source="versions/v1")
    assert message in str(caught.value)
    assert str(caught.value).startswith("versions/v1: ")


def test_unreadable_files_are_model_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot read config.json"):
        VersionConfig.read(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read config.json"):
        VersionConfig.read(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match="config.json is not a JSON object"):
        read_version_file(tmp_path / CONFIG_FILE)
    with pytest.raises(ModelLoadError, match="must hold a JSON object, not a list"):
        VersionConfig.from_dict([1, 2])


def test_the_contract_imports_no_torch_or_fastai() -> None:
    """Serving and the models command read it; neither may pull in the training stack."""
    code = (
        "import sys, training.shared.version_config\n"
        "assert not {'torch', 'fastai', 'torchvision'} & set(sys.modules), 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
