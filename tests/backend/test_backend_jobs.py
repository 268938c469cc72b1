"""Backend jobs on a real Redis and real RQ: re-scoring, pre-annotating new tasks, the hooks.

Label Studio, the image download and the model are stand-ins (``retraining_fakes``): a
Label Studio server cannot run in a unit test (issue 5 runs these jobs against a real one).
The jobs themselves run in a real RQ worker (in-process, :class:`QuietWorker`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis import Redis
from retraining_fakes import (
    PROJECT_KEY,
    FakeFetcher,
    FakeLabelStudio,
    FakePredictor,
    QuietWorker,
    RecordingEnqueue,
    annotation_event,
    finish_run,
    webhook,
)
from rq import Queue
from rq.job import Job

from backend.loop import jobs
from backend.loop.retraining import Retrainer
from backend.settings import Settings
from training.shared import loop_state
from training.shared.labels import load_label_config
from training.shared.loop_state import DEFAULT_QUEUE, run_status

N = 5
LS_ID = 1
LABEL_CONFIG = load_label_config(Path(__file__).parents[2] / "label_config.xml")


def make_tasks(n: int, first_id: int = 100, bad: dict[int, str] | None = None) -> list[dict]:
    """``n`` unlabelled tasks; ``bad`` maps a task id to a broken/corrupt/missing image."""
    tasks = []
    for task_id in range(first_id, first_id + n):
        kind = (bad or {}).get(task_id)
        if kind == "missing":
            data: dict[str, Any] = {"patient": "p1"}
        else:
            name = f"{kind}-{task_id}" if kind else f"valve-{task_id}"
            data = {"image": f"/data/upload/1/{name}.png", "patient": "p1"}
        tasks.append({"id": task_id, "data": data})
    return tasks


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path, retrain_every_n_labels=N, training_profile="quick")


@pytest.fixture
def parts(settings: Settings, redis_conn: Redis) -> Iterator[dict[str, Any]]:
    ls = FakeLabelStudio()
    fetcher = FakeFetcher()
    predictor = FakePredictor("v1")
    runs = RecordingEnqueue()
    jobs.use_context(
        jobs.WorkerContext(
            settings=settings,
            label_studio=ls,
            fetcher=fetcher,
            predictor=predictor,
            enqueue_training=runs,
        )
    )
    queue = jobs.JobQueue(redis_conn, enqueue_training=runs)
    retrainer = Retrainer(settings, redis_conn, queue=queue, label_studio=ls)
    retrainer.register_project(LS_ID, PROJECT_KEY)  # what /setup does
    yield {"ls": ls, "fetcher": fetcher, "predictor": predictor, "runs": runs, "rt": retrainer}
    jobs.use_context(None)


def drain(conn: Redis) -> list[Job]:
    """Run every queued backend job here; returns them, finished."""
    queue = Queue(DEFAULT_QUEUE, connection=conn)
    ids = queue.get_job_ids()
    QuietWorker([queue], connection=conn).work(burst=True)
    failed = queue.failed_job_registry.get_job_ids()
    assert not failed, [Job.fetch(j, connection=conn).latest_result().exc_string for j in failed]
    return [Job.fetch(i, connection=conn) for i in ids]


def test_rescore_job_predicts_every_unlabelled_task_in_pages(
    parts: dict[str, Any], redis_conn: Redis
) -> None:
    ls, predictor = parts["ls"], parts["predictor"]
    predictor.version = "v2"
    bad = {110: "broken", 120: "corrupt", 130: "missing"}
    ls.unlabelled = make_tasks(150, bad=bad)
    Queue(DEFAULT_QUEUE, connection=redis_conn).enqueue(jobs.rescore_project, LS_ID, "v2")
    (job,) = drain(redis_conn)

    assert job.meta["done"] == job.meta["total"] == 150
    assert job.meta["failed"] == 3 and job.meta["written"] == 147
    assert job.return_value()["written"] == 147
    written = ls.written()
    assert sorted(w["task"] for w in written) == sorted(set(range(100, 250)) - set(bad))
    for item in written:
        url = f"/data/upload/1/valve-{item['task']}.png"
        label = predictor.label_for(f"img:{url}".encode())
        assert item["result"] == [
            {
                "from_name": LABEL_CONFIG.choices_name,
                "to_name": LABEL_CONFIG.image_name,
                "type": "choices",
                "value": {"choices": [label]},
            }
        ]
        assert item["model_version"] == "v2" and item["score"] == 0.5

    writes = [v for name, v in ls.calls if name == "create_predictions"]
    assert jobs.RESCORE_BATCH_TASKS == 64
    assert [len(items) for _, items, _ in writes] == [61, 64, 22]  # the 3 bad ones: batch 1
    # Streamed: the first batch was written before the second page was even read.
    assert writes[0][2] <= jobs.RESCORE_BATCH_TASKS
    names = ls.names()
    first_write = names.index("create_predictions")
    assert names.index("set_model_version") == first_write + 1
    assert ("set_model_version", (LS_ID, "v2")) in ls.calls
    assert "ensure_review_view" in names
    assert names.count("create_predictions") == 3 and names.count("set_model_version") == 1
    # Remembered for acceptance tracking.
    assert parts["rt"].proposals.versions(PROJECT_KEY, [100, 110, 249]) == ["v2", None, "v2"]


def test_rescore_again_is_idempotent(parts: dict[str, Any], redis_conn: Redis) -> None:
    ls, rt = parts["ls"], parts["rt"]
    ls.unlabelled = make_tasks(70, bad={105: "corrupt"})

    def run() -> dict[str, Any]:
        return jobs.rescore(
            LS_ID,
            "v1",
            label_studio=ls,
            predictor=parts["predictor"],
            fetcher=parts["fetcher"],
            retrainer=rt,
            label_config=LABEL_CONFIG,
        )

    first = run()
    assert (first["written"], first["failed"], first["skipped"]) == (69, 1, 0)
    fetched = len(parts["fetcher"].fetched)
    ls.calls.clear()
    second = run()
    assert (second["written"], second["failed"], second["skipped"]) == (0, 1, 69)
    assert ls.names().count("create_predictions") == 0
    assert len(parts["fetcher"].fetched) == fetched + 1  # only the bad one was tried again
    # The project's version is (re)announced even though nothing new was written.
    assert ("set_model_version", (LS_ID, "v1")) in ls.calls


def test_rescore_retries_a_refused_model_version_on_the_next_batch(
    parts: dict[str, Any],
) -> None:
    ls = parts["ls"]
    ls.unlabelled = make_tasks(10)
    ls.refuse_model_version = 1  # "no prediction of this version yet"
    stats = jobs.rescore(
        LS_ID,
        "v1",
        label_studio=ls,
        predictor=parts["predictor"],
        fetcher=parts["fetcher"],
        retrainer=parts["rt"],
        label_config=LABEL_CONFIG,
        batch_size=4,
    )
    assert stats["written"] == 10
    assert ls.names() == [
        "create_predictions",
        "set_model_version_refused",
        "create_predictions",
        "set_model_version",
        "ensure_review_view",
        "create_predictions",
    ]


def test_rescore_leaves_the_project_alone_unless_the_version_is_served(
    parts: dict[str, Any],
) -> None:
    ls, predictor = parts["ls"], parts["predictor"]
    ls.unlabelled = make_tasks(10)
    predictor.version = "v3"  # v2 failed to load, or v3 was promoted since
    stats = jobs.rescore(
        LS_ID,
        "v2",
        label_studio=ls,
        predictor=predictor,
        fetcher=parts["fetcher"],
        retrainer=parts["rt"],
        label_config=LABEL_CONFIG,
    )
    assert stats["written"] == 0 and "serving v3" in stats["stopped"]
    assert ls.calls == []

    class Swapping(FakePredictor):
        """Promoted to v4 after its first batch."""

        def predict(self, images: list) -> list:
            out = super().predict(images)
            self.version = "v4"
            return out

    stats = jobs.rescore(
        LS_ID,
        "v3",
        label_studio=ls,
        predictor=Swapping("v3"),
        fetcher=parts["fetcher"],
        retrainer=parts["rt"],
        label_config=LABEL_CONFIG,
        batch_size=4,
    )
    assert stats["written"] == 4 and "v4" in stats["stopped"]
    assert {w["model_version"] for w in ls.written()} == {"v3"}


def test_new_tasks_get_predictions_pushed_from_the_webhook(
    parts: dict[str, Any], redis_conn: Redis
) -> None:
    ls, rt = parts["ls"], parts["rt"]
    assert rt.on_webhook(webhook("TASKS_CREATED")) == "queued"
    (job,) = drain(redis_conn)
    assert [w["task"] for w in ls.written()] == [6]  # the recorded import's task
    assert ls.written()[0]["model_version"] == "v1"
    assert job.return_value()["written"] == 1
    assert ls.names().count("set_model_version") == 1

    more = webhook("TASKS_CREATED")
    more["tasks"] = make_tasks(3, first_id=7, bad={8: "broken"})
    rt.on_webhook(more)
    (job,) = drain(redis_conn)
    assert [w["task"] for w in ls.written()] == [6, 7, 9]
    assert job.meta["failed"] == 1 and job.meta["done"] == job.meta["total"] == 3
    assert ls.names().count("set_model_version") == 1  # the project already has v1


def test_new_tasks_without_a_model_are_left_alone(parts: dict[str, Any], redis_conn: Redis) -> None:
    parts["predictor"].version = None
    parts["rt"].on_webhook(webhook("TASKS_CREATED"))
    (job,) = drain(redis_conn)
    assert job.return_value()["stopped"] == "no model version"
    assert parts["ls"].calls == []


def test_webhooks_to_training_to_rescoring_through_the_queues(
    parts: dict[str, Any], redis_conn: Redis
) -> None:
    """The whole chain as the worker runs it: annotations → one run → its on_finish hook →
    re-scoring with the promoted version."""
    ls, rt, runs, predictor = parts["ls"], parts["rt"], parts["runs"], parts["predictor"]
    ls.unlabelled = make_tasks(5, first_id=500)
    for i in range(1, N + 1):
        ls.labelled = i
        rt.on_webhook(annotation_event(i, i, "proGAV 2.0"))
        drain(redis_conn)
    assert len(runs.runs) == 1
    run_id = runs.runs[0]

    finish_run(redis_conn, run_id, "published", promoted=True)
    predictor.version = run_id  # the registry's new current version
    record = run_status(redis_conn, run_id)
    Queue(record["on_finish_queue"], connection=redis_conn).enqueue(record["on_finish"], run_id)
    hook, *_ = drain(redis_conn)  # the hook, then the re-score it enqueued
    assert hook.func_name == "backend.loop.jobs.after_run"
    assert {w["task"] for w in ls.written()} == set(range(500, 505))
    assert {w["model_version"] for w in ls.written()} == {run_id}
    assert ("set_model_version", (LS_ID, run_id)) in ls.calls
    assert not redis_conn.exists(f"valve-id:project:{PROJECT_KEY}:lock")


def test_reconcile_job_runs_the_reconciliation(parts: dict[str, Any], redis_conn: Redis) -> None:
    parts["ls"].labelled = N  # labelled, but every webhook was lost
    Queue(DEFAULT_QUEUE, connection=redis_conn).enqueue(jobs.reconcile_job)
    (job,) = drain(redis_conn)
    assert job.return_value() == parts["runs"].runs and len(parts["runs"].runs) == 1


def test_one_of_several_backends_schedules_each_interval_s_reconciliation(
    redis_conn: Redis,
) -> None:
    # Every backend process runs the schedule; the SET NX key lets one enqueue per interval.
    backends = [jobs.JobQueue(redis_conn) for _ in range(3)]
    assert [b.schedule_reconcile(60) for b in backends] == [True, False, False]
    queued = Queue(DEFAULT_QUEUE, connection=redis_conn).jobs
    assert [job.func_name for job in queued] == ["backend.loop.jobs.reconcile_job"]
    redis_conn.delete(loop_state.RECONCILE_SCHEDULED)  # the interval has passed
    assert backends[1].schedule_reconcile(60) is True
    assert Queue(DEFAULT_QUEUE, connection=redis_conn).count == 2


def test_worker_predictor_is_built_once_per_registry(tmp_path: Path) -> None:
    a = Settings(state_dir=tmp_path / "a")
    first = jobs.get_predictor(a)
    assert jobs.get_predictor(Settings(state_dir=tmp_path / "a")) is first
    assert jobs.get_predictor(Settings(state_dir=tmp_path / "b")) is not first
    assert first.version is None  # an empty registry: nothing served, nothing raised
