"""The backend on an object-storage registry: the predictor hot-reloads from ``s3://`` (a
real S3 API server, ``moto_server`` on loopback) through its local weight cache, and
``valve-id models`` works on ``MODEL_DIR=s3://...``."""

from __future__ import annotations

import io
import json
import secrets
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import torch
import typer
from PIL import Image
from tiny_arch import TINY_ARCH
from typer.testing import CliRunner

from backend.service.predictor import Prediction, Predictor
from backend.settings import Settings
from backend.tools.commands.models import models_app
from training.shared.model import ValveNet, save_checkpoint
from training.shared.preprocess import PreprocessParams
from training.shared.registry import Registry
from training.shared.registry_s3 import S3Registry

CLASSES = ["Codman Hakim", "Codman Certas Plus", "Sophysa Sophy SM8", "proGAV 2.0"]
SIZE_PX = 32


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def env(s3_endpoint: str, tmp_path: Path) -> dict[str, str]:
    bucket = f"valve-id-{secrets.token_hex(4)}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return {
        "MODEL_DIR": f"s3://{bucket}/models",
        "VALVE_ID_S3_ENDPOINT_URL": s3_endpoint,
        "VALVE_ID_STATE_DIR": str(tmp_path / "state"),
    }


def _publish(registry: Registry, version_id: str, *, seed: int, f1: float) -> None:
    staging = registry.staging("test")
    torch.manual_seed(seed)
    for k in range(2):
        model = ValveNet(len(CLASSES), arch=TINY_ARCH)
        save_checkpoint(model, staging / "weights" / f"fold_{k}.pt", classes=CLASSES)
    config = {
        "format": 1,
        "version": version_id,
        "classes": CLASSES,
        "preprocess": PreprocessParams(size_px=SIZE_PX).to_dict(),
        "temperature": 1.0,
        "arch": TINY_ARCH,
        "folds": [{"fold": k, "weights": f"weights/fold_{k}.pt"} for k in range(2)],
    }
    metrics = {"mean": {"f1_macro": f1}, "classes": CLASSES}
    (staging / "config.json").write_text(json.dumps(config))
    (staging / "metrics.json").write_text(json.dumps(metrics))
    registry.publish(staging, version_id=version_id)


def _png(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((40, 40)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_the_predictor_hot_reloads_from_object_storage(env: dict[str, str], tmp_path: Path) -> None:
    # a GPU host publishes; the backend host has only the bucket and its own cache
    worker = Settings.from_env({**env, "VALVE_ID_STATE_DIR": str(tmp_path / "gpu-host")})
    backend = Settings.from_env({**env, "VALVE_ID_STATE_DIR": str(tmp_path / "backend-host")})
    publisher = worker.open_registry()
    assert isinstance(publisher, S3Registry)
    _publish(publisher, "v1", seed=1, f1=0.8)

    with Predictor(backend.open_registry(), device="cpu", refresh_interval_s=0.0) as predictor:
        (first,) = predictor.predict([_png(3)])
        assert isinstance(first, Prediction) and first.model_version == "v1"
        cached = backend.cache / "registry"
        assert list(cached.rglob("v1/weights/fold_1.pt")), "weights served from a local copy"

        _publish(publisher, "v2", seed=2, f1=0.9)
        assert predictor.refresh(force=True) is True
        assert predictor.version == "v2"
        (second,) = predictor.predict([_png(3)])
        assert isinstance(second, Prediction) and second.model_version == "v2"
        assert second.probs != first.probs

        publisher.rollback(reason="test")
        assert predictor.refresh(force=True) is True
        assert predictor.version == "v1"


runner = CliRunner()
app = typer.Typer()
app.add_typer(models_app, name="models")


def test_models_commands_on_an_s3_registry(env: dict[str, str]) -> None:
    registry = Settings.from_env(env).open_registry()
    for i, version in enumerate(("v1", "v2", "v3")):
        _publish(registry, version, seed=i, f1=0.5 + i / 10)

    listed = runner.invoke(app, ["models", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert env["MODEL_DIR"] in listed.output and "v3" in listed.output

    dry = runner.invoke(
        app, ["models", "prune", "--keep-versions", "1", "--keep-days", "0"], env=env
    )
    assert dry.exit_code == 0, dry.output
    assert "would prune v1" in dry.output and "would free" in dry.output
    applied = runner.invoke(
        app, ["models", "prune", "--apply", "--keep-versions", "1", "--keep-days", "0"], env=env
    )
    assert applied.exit_code == 0, applied.output
    rows: list[dict[str, Any]] = json.loads(
        runner.invoke(app, ["models", "list", "--json"], env=env).stdout
    )
    assert [(r["version_id"], r["pruned"]) for r in rows] == [
        ("v1", True),
        ("v2", False),
        ("v3", False),
    ]
    refused = runner.invoke(app, ["models", "promote", "v1"], env=env)
    assert refused.exit_code == 1 and "v1 was pruned" in refused.output
    rolled = runner.invoke(app, ["models", "rollback"], env=env)
    assert rolled.exit_code == 0, rolled.output
    assert "current model version: v2" in rolled.output


def test_a_wrong_bucket_is_one_line_in_the_cli(env: dict[str, str]) -> None:
    wrong = {**env, "MODEL_DIR": "s3://no-such-bucket-anywhere/models"}
    result = runner.invoke(app, ["models", "list"], env=wrong)
    assert result.exit_code == 1
    assert "does not exist" in result.output and "Traceback" not in result.output
