"""Faults injected for real — a killed Redis, a killed worker, a poisoned model file, load —
and what must follow: nothing lost, recovery by itself.

Label Studio is the one part played by a stand-in: :class:`retraining_fakes.FakeLabelStudio`
answers the labelled-task count (the source of truth retraining reads), and training runs
read a manifest instead of a Label Studio export (``ManifestRuns``). Redis, RQ, the
``valve-id worker`` and ``valve-id serve`` processes, the predictor and the registry are real.

Covered elsewhere, not repeated here: a dead Redis from the start (``tests/backend/test_app.py::
test_webhook_is_fast_and_200_when_redis_is_unreachable``), a killed work-horse alone
(``tests/training/test_jobs.py::test_a_fold_killed_mid_training_leaves_no_half_version``),
Label Studio unreachable during an export (``tests/training/test_labelstudio_source.py::
test_unreachable_label_studio_is_retried_then_fails_visibly``), corrupt weights at the
predictor (``tests/backend/test_predictor.py::
test_a_corrupt_new_version_keeps_the_previous_one_in_service``), 100 sequential webhooks
(``tests/backend/test_retraining.py::
test_hundred_webhooks_make_a_handful_of_jobs_and_exactly_one_run``).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from redis import Redis
from retraining_fakes import PROJECT_KEY, FakeLabelStudio, RecordingEnqueue, annotation_event
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry

from backend.loop import jobs
from backend.loop.retraining import Retrainer
from backend.service.app import REDIS_SOCKET_TIMEOUT_S, create_app
from backend.service.predictor import Predictor
from backend.settings import Settings
from training.shared.loop_state import DEFAULT_QUEUE, TRAINING_QUEUE, run_status
from training.shared.registry import ModelRegistry
from training.synthetic import VALVE_CLASSES, generate_dataset

from .hardening_support import (
    LABEL_CONFIG_XML,
    ROOT,
    VERSION,
    RedisServer,
    RunningServer,
    children,
    drain_default_queue,
    free_port,
    local_url,
    png,
    predict_body,
    publish_version,
    wait_until,
)

N = 4
"""RETRAIN_EVERY_N_LABELS in these tests."""
LS_ID = 1
WEBHOOK_LIMIT_S = 0.2
"""How long /webhook may take with Redis gone (Label Studio gives it 1 s)."""
WORKER_TIMEOUT_S = 240.0
HEARTBEAT_EXPIRED_S = 120.0
"""RQ keeps a started job alive for job_monitoring_interval (30 s) + 60 s after each
heartbeat; a cleanup this far in the future finds a dead worker's job expired."""


def _settings(tmp_path: Path, redis_url: str, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "redis_url": redis_url,
        "label_studio_url": f"http://127.0.0.1:{free_port()}",  # nobody there
        "retrain_every_n_labels": N,
        "training_profile": "quick",
        "promotion_tolerance": 1.0,
    }
    values.update(changes)
    return Settings(**values)


def _lock(conn: Redis) -> str | None:
    value = conn.get(f"valve-id:project:{PROJECT_KEY}:lock")
    return value.decode() if value else None


def _project(conn: Redis) -> dict[str, str]:
    raw = conn.hgetall(f"valve-id:project:{PROJECT_KEY}")
    return {k.decode(): v.decode() for k, v in raw.items()}


# --------------------------------------------------------------------------------------------
# Redis stopped, then back


def test_with_redis_killed_predict_answers_webhooks_stay_fast_and_reconciliation_catches_up(
    tmp_path: Path,
    served_registry: ModelRegistry,
    image_root: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis_server = RedisServer(tmp_path / "redis").start()
    settings = _settings(
        tmp_path, redis_server.url, model_dir=served_registry.root, local_files_root=image_root,
        reconcile_interval_s=1,
    )  # fmt: skip
    # The app's own Redis client settings: a dead Redis costs a request at most 0.2 s.
    redis = Redis.from_url(
        redis_server.url,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        socket_connect_timeout=REDIS_SOCKET_TIMEOUT_S,
    )
    ls = FakeLabelStudio(labelled=N - 2)  # Label Studio's labelled count
    runs = RecordingEnqueue()
    queue = jobs.JobQueue(redis, enqueue_training=runs)
    retrainer = Retrainer(settings, redis, queue=queue, label_studio=ls)
    jobs.use_context(jobs.WorkerContext(settings=settings, label_studio=ls, enqueue_training=runs))
    predictor = Predictor(served_registry.root, device="cpu")
    app = create_app(settings, predictor=predictor, redis=redis, retrainer=retrainer)
    task = predict_body([{"id": 1, "data": {"image": local_url("inputs/good.png")}}], PROJECT_KEY)
    caplog.set_level(logging.INFO)
    try:
        with TestClient(app) as client:
            setup = client.post("/setup", json={"project": PROJECT_KEY, "schema": LABEL_CONFIG_XML})
            assert setup.json() == {"model_version": VERSION}
            assert client.post("/webhook", json=annotation_event(1, 1, "proGAV 2.0")).json() == {
                "status": "accepted"
            }
            drain_default_queue(redis)  # the check finds N - 2 labels: no run yet
            assert runs.runs == []

            redis_server.kill(signal.SIGKILL)
            ls.labelled = N + 3  # annotators keep labelling; their webhooks are lost
            times, answers = [], []
            for i in range(2, 12):
                started = time.perf_counter()
                response = client.post("/webhook", json=annotation_event(i, i, "proGAV 2.0"))
                times.append(time.perf_counter() - started)
                answers.append((response.status_code, response.json()))
            predicted = client.post("/predict", json=task)
            health = client.get("/health")
            # The periodic reconciliation fails while Redis is gone, and must live through it.
            wait_until(
                lambda: "could not schedule reconciliation" in caplog.text,
                10.0,
                "a reconciliation tick during the outage",
            )

            redis_server.start()  # same port, same data directory
            # Nobody calls anything: the app's periodic reconciliation enqueues the repair.
            queue = Queue(DEFAULT_QUEUE, connection=redis)
            wait_until(
                lambda: (
                    "backend.loop.jobs.reconcile_job" in [j.func_name for j in queue.get_jobs()]
                ),
                10.0,
                "the app to enqueue a reconciliation once Redis is back",
            )
            drain_default_queue(redis)
            drain_default_queue(redis)  # a second reconciliation must not start a second run
        records = [run_status(redis, run_id) for run_id in runs.runs]
        plan_jobs = Queue(TRAINING_QUEUE, connection=redis).count
    finally:
        jobs.use_context(None)
        predictor.close()
        redis_server.stop()

    assert answers == [(200, {"status": "logged"})] * 10
    assert max(times) < WEBHOOK_LIMIT_S, times
    assert "webhook ANNOTATION_CREATED not handed over" in caplog.text
    assert predicted.status_code == 200
    (result,) = predicted.json()["results"]
    assert result["result"] and result["model_version"] == VERSION
    assert health.json()["status"] == "UP"
    assert len(records) == 1  # the training that became due while Redis was down
    assert records[0]["status"] == "queued" and records[0]["labels_at_start"] == str(N + 3)
    assert plan_jobs == 1


# --------------------------------------------------------------------------------------------
# A worker killed in the middle of a fold


class ManifestRuns(RecordingEnqueue):
    """The real :func:`training.fitting.jobs.enqueue_training`, reading a manifest instead of Label
    Studio's export (the stand-in for it), with a small recipe for a 2-core CPU."""

    def __init__(self, manifest: Path) -> None:
        super().__init__()
        self.manifest = manifest
        self.recipe: dict[str, Any] = {}

    def __call__(self, connection: Redis, **kwargs: Any) -> Any:
        kwargs["data"] = str(self.manifest)
        kwargs["recipe"] = {**kwargs["recipe"], **self.recipe}
        return super().__call__(connection, **kwargs)


SMALL_RECIPE = {"image_size_px": 32, "n_folds": 2, "pretrained": False}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small-dataset")
    generate_dataset(
        out, 16, seed=7, class_mix={c: 1.0 for c in VALVE_CLASSES}, size_range_px=(64, 96)
    )
    return out / "manifest.csv"


def _worker(redis_url: str, log: IO[bytes], *, burst: bool) -> subprocess.Popen[bytes]:
    """``valve-id worker`` on the training queue, as the leader of its own process group."""
    env = {**os.environ, "REDIS_URL": redis_url, "OMP_NUM_THREADS": "1", "LOG_LEVEL": "INFO"}
    command = [sys.executable, "-m", "backend.tools.cli", "worker", "--queues", TRAINING_QUEUE]
    return subprocess.Popen(
        command + (["--burst"] if burst else []),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"  # dead, waiting to be reaped by whoever adopted it


def _registry_state(registry: ModelRegistry) -> tuple[Any, ...]:
    return (
        [v.version_id for v in registry.list_versions()],
        registry.current(),
        sorted(str(p.relative_to(registry.root)) for p in registry.versions_dir.rglob("*")),
        (registry.root / "history.jsonl").read_text(),
    )


@pytest.mark.slow
def test_a_worker_killed_mid_fold_fails_the_run_frees_the_project_and_the_next_run_succeeds(
    tmp_path: Path, redis_conn: Redis, redis_url: str, small_dataset: Path
) -> None:
    settings = _settings(tmp_path, redis_url)
    registry = ModelRegistry(settings.models)
    publish_version(registry, "20261125-090000-v000")  # what is served before the runs
    before = _registry_state(registry)
    ls = FakeLabelStudio(labelled=N)
    runs = ManifestRuns(small_dataset)
    queue = jobs.JobQueue(redis_conn, enqueue_training=runs)
    retrainer = Retrainer(settings, redis_conn, queue=queue, label_studio=ls)
    runs.recipe = {**SMALL_RECIPE, "epochs_from_scratch": 500}  # far longer than the test
    first = retrainer.check(LS_ID, project_key=PROJECT_KEY)
    assert first is not None and _lock(redis_conn) == first
    fold_ids = [f"{first}-fold{k}" for k in range(2)]

    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = _worker(redis_url, log, burst=False)
        try:

            def training_fold() -> str | None:
                assert worker.poll() is None, log_path.read_text()[-3000:]
                for job_id in fold_ids:
                    if Job.fetch(job_id, connection=redis_conn).get_meta(refresh=True).get("epoch"):
                        return job_id
                return None

            killed = wait_until(training_fold, WORKER_TIMEOUT_S, "a fold to be training", 0.1)
            horses = children(worker.pid)
            assert horses, "RQ runs each job in a forked work-horse"
            # The whole worker at once: the main process first (so nothing of RQ's reacts),
            # then the work-horse, which RQ puts in a process group of its own.
            os.killpg(worker.pid, signal.SIGKILL)
            for horse in horses:
                os.killpg(horse, signal.SIGKILL)
            worker.wait(timeout=10)
            wait_until(lambda: all(_gone(pid) for pid in horses), 10.0, "the work-horse to die")
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=10)

    # Nobody noticed yet: the job still looks started, the run running, the project busy.
    started = StartedJobRegistry(TRAINING_QUEUE, connection=redis_conn)
    assert Job.fetch(killed, connection=redis_conn).get_status() == "started"
    assert run_status(redis_conn, first)["status"] == "running"
    started.cleanup()  # what any worker's maintenance does: nothing while the heartbeat lives
    assert run_status(redis_conn, first)["status"] == "running"
    assert retrainer.check(LS_ID, project_key=PROJECT_KEY) is None  # the project is busy

    # Two minutes later the heartbeat has expired: RQ's own cleanup abandons the job and
    # runs its failure callback, as a worker's maintenance or a restarted worker would.
    started.cleanup(timestamp=time.time() + HEARTBEAT_EXPIRED_S)
    record = run_status(redis_conn, first)
    assert record["status"] == "failed", record
    assert record["failed_job"] == killed
    assert "fold failed: AbandonedJobError" in record["reason"]
    assert "worker" in record["reason"]  # says what happened, not just the class name
    assert Job.fetch(killed, connection=redis_conn).get_status() == "failed"
    finalize = Job.fetch(f"{first}-finalize", connection=redis_conn)
    assert finalize.get_status() in {"canceled", "deferred"}
    assert not Path(record["staging"]).exists()  # no half version anywhere
    assert _registry_state(registry) == before

    # The backend's periodic repair books the failed run and frees the project.
    assert retrainer.reconcile() == []  # nothing new labelled: no automatic retry
    assert _lock(redis_conn) is None
    assert _project(redis_conn)["run_id"] == "" and _project(redis_conn)["failed_labels"] == str(N)

    # "Start training": the next run is not blocked, and a fresh worker trains it.
    runs.recipe = {**SMALL_RECIPE, "epochs_from_scratch": 1}
    second = retrainer.check(LS_ID, project_key=PROJECT_KEY, force=True)
    assert second is not None and second != first
    with (tmp_path / "worker2.log").open("wb") as log:
        fresh = _worker(redis_url, log, burst=True)
        assert fresh.wait(timeout=WORKER_TIMEOUT_S) == 0, (tmp_path / "worker2.log").read_text()
    record = run_status(redis_conn, second)
    assert record["status"] == "published", record
    assert registry.current() == second
    assert [v.version_id for v in registry.list_versions()] == ["20261125-090000-v000", second]
    assert not any(registry.staging_dir.iterdir())

    jobs.use_context(jobs.WorkerContext(settings=settings, label_studio=ls, enqueue_training=runs))
    try:
        drain_default_queue(redis_conn)  # the runs' on_finish hooks: booked once, no failure
    finally:
        jobs.use_context(None)
    assert _lock(redis_conn) is None
    assert _project(redis_conn)["last_snapshot_labels"] == str(N)
    assert runs.runs == [first, second]


# --------------------------------------------------------------------------------------------
# A poisoned model file in a new version


class _Trap:
    """Unpickling this creates a directory: the proof that a pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_a_poisoned_or_truncated_new_version_leaves_the_previous_one_serving(
    tmp_path: Path, image_root: Path
) -> None:
    registry = ModelRegistry(tmp_path / "models")
    served = publish_version(registry, "20261125-100000-v001")
    truncated = (served / "weights" / "fold_0.pt").read_bytes()[:100_000]
    marker = tmp_path / "code-ran"
    trap = io.BytesIO()
    torch.save({"format": 1, "arch": "resnet18", "state_dict": _Trap(marker)}, trap)

    settings = _settings(
        tmp_path, f"redis://127.0.0.1:{free_port()}/0", model_dir=registry.root,
        local_files_root=image_root,
    )  # fmt: skip
    predictor = Predictor(registry.root, device="cpu", refresh_interval_s=0.0)
    body = predict_body([{"id": 1, "data": {"image": local_url("inputs/good.png")}}])
    answers = []
    try:
        with TestClient(create_app(settings, predictor=predictor)) as client:
            for version, weights in (("v002", trap.getvalue()), ("v003", truncated)):
                path = publish_version(registry, f"20261125-100000-{version}", corrupt=weights)
                assert registry.current() == path.name  # promoted: the gate saw good metrics
                result = client.post("/predict", json=body).json()["results"][0]
                answers.append((version, result["model_version"], client.get("/health").json()))
            publish_version(registry, "20261125-100000-v004")  # a good one fixes it
            fixed = client.post("/predict", json=body).json()["results"][0]
            fixed_health = client.get("/health").json()
    finally:
        predictor.close()

    for version, served, health in answers:
        assert served == "20261125-100000-v001" == health["model_version"]
        error = health["load_error"]
        assert error.startswith(f"version 20261125-100000-{version} could not be loaded")
        assert "fold_0.pt" in error and "cannot read checkpoint" in error
    assert fixed["model_version"] == "20261125-100000-v004" == fixed_health["model_version"]
    assert fixed_health["load_error"] is None
    assert not marker.exists()  # weights_only loading never ran the pickle's code ...
    torch.load(io.BytesIO(trap.getvalue()), weights_only=False)
    assert marker.is_dir()  # ... which a plain unpickling would have run


# --------------------------------------------------------------------------------------------
# Load


def test_fifty_concurrent_predicts_on_the_real_server_all_succeed(
    server: RunningServer, image_root: Path
) -> None:
    folder = image_root / "concurrent"
    folder.mkdir(exist_ok=True)
    for i in range(200):
        (folder / f"{i:03d}.png").write_bytes(png(50_000 + i))
    bodies = [
        predict_body(
            [
                {"id": 4 * r + k, "data": {"image": local_url(f"concurrent/{4 * r + k:03d}.png")}}
                for k in range(4)
            ]
        )  # fmt: skip
        for r in range(50)
    ]

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(
            base_url=server.url, auth=server.auth, timeout=120.0, limits=limits
        ) as client:
            return await asyncio.gather(*(client.post("/predict", json=b) for b in bodies))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 50
    for body, response in zip(bodies, responses, strict=True):
        results = response.json()["results"]
        assert len(results) == len(body["tasks"])
        assert all(r["result"] and r["model_version"] == VERSION for r in results)
    assert server.alive()


def test_a_hundred_concurrent_webhooks_on_the_real_server_start_exactly_one_run(
    server: RunningServer, tmp_path: Path, redis_conn: Redis, redis_url: str
) -> None:
    ls = FakeLabelStudio(labelled=N + 96)  # Label Studio counted them before sending
    runs = RecordingEnqueue()
    events = [annotation_event(i, i, "Codman Hakim") for i in range(1, 101)]

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(
            base_url=server.url, auth=server.auth, timeout=30.0, limits=limits
        ) as client:
            return await asyncio.gather(*(client.post("/webhook", json=e) for e in events))

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses)
    assert {r.json()["status"] for r in responses} <= {"accepted", "logged"}
    queue = Queue(DEFAULT_QUEUE, connection=redis_conn)
    wait_until(lambda: queue.count >= 1, 10.0, "the webhooks' check job")
    settings = _settings(tmp_path, redis_url)
    jobs.use_context(jobs.WorkerContext(settings=settings, label_studio=ls, enqueue_training=runs))
    try:
        for _ in range(3):  # hand-offs still in flight land in a later round
            drain_default_queue(redis_conn)
            time.sleep(0.3)
    finally:
        jobs.use_context(None)
    assert len(runs.runs) == 1
    assert run_status(redis_conn, runs.runs[0])["labels_at_start"] == str(N + 96)
    run_keys = [k for k in redis_conn.scan_iter("valve-id:run:*") if b":run:" in k]
    assert len(run_keys) == 1
