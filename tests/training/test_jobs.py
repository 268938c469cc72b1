"""The 5-fold recipe as RQ jobs, executed by a real ``valve-id worker`` on a real Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from redis import Redis
from rq.job import Job

from training.fitting.config import RecipeConfig
from training.fitting.jobs import enqueue_training
from training.shared.inference import precision_name
from training.shared.labels import load_label_config
from training.shared.loop_state import run_status
from training.shared.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[2]
LABEL_CONFIG = ROOT / "label_config.xml"
WORKER_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _worker(redis_url: str, state: Path, *, burst: bool = True) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": redis_url, "VALVE_ID_STATE_DIR": str(state)}
    args = [sys.executable, "-m", "backend.tools.cli", "worker"] + (["--burst"] if burst else [])
    return subprocess.Popen(
        args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def _enqueue(conn: Redis, data: Path, state: Path, **overrides: object):
    recipe = RecipeConfig.from_profile("quick", **overrides)
    return enqueue_training(
        conn,
        data=str(data),
        label_config_path=str(LABEL_CONFIG),
        recipe=recipe.to_dict(),
        model_dir=str(state / "models"),
        cache_dir=str(state / "cache"),
    )


def test_enqueued_run_is_trained_by_a_worker_and_published(
    redis_conn: Redis, redis_url: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    run = _enqueue(redis_conn, tiny_dataset, tmp_path)
    assert run_status(redis_conn, run.run_id)["status"] == "queued"
    worker = _worker(redis_url, tmp_path)
    out, _ = worker.communicate(timeout=WORKER_TIMEOUT_S)
    assert worker.returncode == 0, out.decode(errors="replace")[-3000:]

    status = run_status(redis_conn, run.run_id)
    assert status["status"] == "published", status
    registry = ModelRegistry(tmp_path / "models")
    assert registry.current() == run.run_id == status["version"]
    version_dir = registry.version_path(run.run_id)
    for name in ("config.json", "metrics.json", "report.html", "splits.json", "run.json"):
        assert (version_dir / name).is_file(), name
    assert sorted(p.name for p in (version_dir / "weights").iterdir()) == [
        f"fold_{k}.pt" for k in range(5)
    ]
    metrics = json.loads((version_dir / "metrics.json").read_text())
    assert metrics["classes"] == list(load_label_config(LABEL_CONFIG).classes[:4])
    assert len(metrics["splits"]) == 5
    assert sum(s["n_val"] for s in metrics["splits"]) == 40
    # A whole-image version is scored on where its saliency peaks (what serving marks).
    assert metrics["localisation"]["source"] == "saliency"
    assert metrics["localisation"]["n"] == 40 and metrics["localisation"]["median_px"] >= 0
    # Its novelty model is fitted out of fold: every labelled X-ray is in the reference.
    assert metrics["novelty"]["n_reference"] == 40 and (version_dir / "novelty.npz").is_file()
    assert metrics["novelty"]["measure"] == "combined"  # the default (docs/TRAINING.md)
    config = json.loads((version_dir / "config.json").read_text())
    assert config["preprocess"]["size_px"] == 64
    assert config["init"]["init"] in {"imagenet", "random"}
    assert config["temperature"] > 0
    # Each fold says what it computed in (on this worker, with the recipe's mixed precision),
    # so that serving computes in the same.
    trained_in = precision_name(torch.device("cpu"))
    assert [fold["precision"] for fold in config["folds"]] == [trained_in] * 5

    # No patient in two folds: validation sets are disjoint by (pseudonymous) patient.
    snapshot = {
        s["key"]: s["group"] for s in json.loads((version_dir / "run.json").read_text())["snapshot"]
    }
    fold_groups = [
        {snapshot[k] for k in split["val"]}
        for split in json.loads((version_dir / "splits.json").read_text())
    ]
    for i, a in enumerate(fold_groups):
        for b in fold_groups[i + 1 :]:
            assert not a & b

    # Progress was visible on the jobs while they ran.
    fold_job = Job.fetch(run.fold_job_ids[0], connection=redis_conn)
    assert fold_job.meta["stage"] == "fold" and fold_job.meta["epoch"] >= 1
    assert "train_loss" in fold_job.meta
    assert not any((tmp_path / "models" / ".staging").iterdir())


def test_a_failing_fold_fails_the_run_and_leaves_the_registry_untouched(
    redis_conn: Redis, redis_url: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    run = _enqueue(redis_conn, tiny_dataset, tmp_path, design="no-such-design")
    worker = _worker(redis_url, tmp_path)
    worker.communicate(timeout=WORKER_TIMEOUT_S)

    status = run_status(redis_conn, run.run_id)
    assert status["status"] == "failed"
    assert "fold failed" in status["reason"] and "no-such-design" in status["reason"]
    finalize = Job.fetch(run.finalize_job_id, connection=redis_conn)
    assert finalize.get_status() in {"canceled", "deferred"}
    registry = ModelRegistry(tmp_path / "models")
    assert registry.list_versions() == [] and registry.current() is None
    assert not Path(run.staging).exists()


def _stop(worker: subprocess.Popen[bytes]) -> None:
    """Stop a worker that may be mid-job (SIGTERM waits for the job; then SIGKILL)."""
    worker.terminate()
    try:
        worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        for pid in _children(worker.pid):
            os.kill(pid, signal.SIGKILL)
        worker.kill()
        worker.wait(timeout=10)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_fold_killed_mid_training_leaves_no_half_version(
    redis_conn: Redis, redis_url: str, tiny_dataset: Path, tmp_path: Path
) -> None:
    run = _enqueue(redis_conn, tiny_dataset, tmp_path, epochs=50)
    worker = _worker(redis_url, tmp_path, burst=False)
    try:
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        training = None
        while training is None:  # RQ may start any fold first once the plan is done
            assert time.monotonic() < deadline, "no fold ever started training"
            assert worker.poll() is None, worker.stdout.read().decode(errors="replace")[-3000:]
            for job_id in run.fold_job_ids:
                if Job.fetch(job_id, connection=redis_conn).get_meta(refresh=True).get("epoch"):
                    training = job_id
            time.sleep(0.2)
        horses = _children(worker.pid)
        assert horses, "the worker runs each job in a forked work-horse"
        for pid in horses:
            os.kill(pid, signal.SIGKILL)  # like the OOM killer taking the training process

        while run_status(redis_conn, run.run_id).get("status") != "failed":
            assert time.monotonic() < deadline, run_status(redis_conn, run.run_id)
            time.sleep(0.2)
    finally:
        _stop(worker)
    registry = ModelRegistry(tmp_path / "models")
    assert registry.list_versions() == [] and registry.current() is None
    assert not Path(run.staging).exists()
    status = run_status(redis_conn, run.run_id)
    assert status["failed_job"] == training
