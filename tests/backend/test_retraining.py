"""Retraining that never misses and never doubles, on a real Redis with real RQ queues.

Label Studio is played by :class:`FakeLabelStudio` (a stand-in: a real server cannot run in
a unit test; issue 5 runs the same loop against one). Training runs are really enqueued by
:func:`training.fitting.jobs.enqueue_training` but never executed; a run's end is written into its
record the way ``training.fitting.jobs`` does, and the queued backend jobs run in a real
``rq.SimpleWorker`` (:class:`QuietWorker`).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis
from retraining_fakes import (
    PROJECT_KEY,
    FakeLabelStudio,
    QuietWorker,
    RecordingEnqueue,
    annotation_event,
    finish_run,
    webhook,
)
from rq import Queue
from rq.job import Job

from backend.loop import jobs
from backend.loop.retraining import Retrainer, chosen_label
from backend.service.labelstudio import WebhookEvent, project_key_of
from backend.settings import Settings
from training.fitting.config import RecipeConfig
from training.shared.loop_state import DEFAULT_QUEUE, TRAINING_QUEUE, run_status

N = 20  # RETRAIN_EVERY_N_LABELS in these tests
LS_ID = 1


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path, retrain_every_n_labels=N, training_profile="quick")


@pytest.fixture
def ls() -> FakeLabelStudio:
    return FakeLabelStudio()


@pytest.fixture
def runs() -> RecordingEnqueue:
    return RecordingEnqueue()


@pytest.fixture
def retrainer(
    settings: Settings, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> Iterator[Retrainer]:
    # The jobs a worker runs build their Retrainer from the same parts.
    jobs.use_context(jobs.WorkerContext(settings=settings, label_studio=ls, enqueue_training=runs))
    queue = jobs.JobQueue(redis_conn, enqueue_training=runs)
    yield Retrainer(settings, redis_conn, queue=queue, label_studio=ls)
    jobs.use_context(None)


def drain(conn: Redis) -> int:
    """Run every queued backend job in this process; returns how many ran."""
    queue = Queue(DEFAULT_QUEUE, connection=conn)
    before = queue.count
    QuietWorker([queue], connection=conn).work(burst=True)
    failed = queue.failed_job_registry.get_job_ids()
    assert not failed, [Job.fetch(j, connection=conn).latest_result().exc_string for j in failed]
    return before


def queued_functions(conn: Redis, queue: str = DEFAULT_QUEUE) -> list[tuple[str, tuple]]:
    q = Queue(queue, connection=conn)
    return [(job.func_name, job.args) for job in q.get_jobs()]


def project(conn: Redis) -> dict[str, str]:
    raw = conn.hgetall(f"valve-id:project:{PROJECT_KEY}")
    return {k.decode(): v.decode() for k, v in raw.items()}


def test_project_key_is_the_one_label_studio_sends_to_setup_and_predict() -> None:
    assert project_key_of(webhook("ANNOTATION_CREATED")["project"]) == PROJECT_KEY
    assert chosen_label(webhook("ANNOTATION_UPDATED")["annotation"]["result"]) == "Codman Hakim"
    assert chosen_label([]) is None


def test_a_webhook_without_created_at_uses_the_key_setup_registered(
    retrainer: Retrainer, redis_conn: Redis
) -> None:
    retrainer.register_project(LS_ID, PROJECT_KEY)  # what /setup does
    bare = webhook("START_TRAINING")
    del bare["project"]["created_at"]
    assert retrainer.on_webhook(bare) == "queued"
    # The app may hand over the parsed model instead of the raw body.
    typed = WebhookEvent.model_validate(webhook("START_TRAINING"))
    assert retrainer.on_webhook(typed) == "queued"
    assert queued_functions(redis_conn) == 2 * [
        ("backend.loop.jobs.handle_event", ("START_TRAINING", LS_ID, PROJECT_KEY, {}))
    ]


def test_hundred_webhooks_make_a_handful_of_jobs_and_exactly_one_run(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> None:
    answers, jobs_run = [], 0
    for i in range(1, 101):
        ls.labelled = i  # Label Studio counts the new annotation before it sends the webhook
        answers.append(retrainer.on_webhook(annotation_event(i, i, "proGAV 2.0")))
        if i % 10 == 0:  # a worker picks jobs up now and then
            jobs_run += drain(redis_conn)

    assert answers.count("queued") == jobs_run == 10
    assert answers.count("deduplicated") == 90
    assert len(runs.runs) == 1
    run = run_status(redis_conn, runs.runs[0])
    assert run["status"] == "queued"
    assert run["data"] == f"labelstudio:{LS_ID}"
    assert run["labels_at_start"] == str(N)  # started by the check that saw the count cross N
    assert run["on_finish"] == "backend.loop.jobs.after_run"
    assert run["on_finish_queue"] == DEFAULT_QUEUE
    assert runs.kwargs[0]["recipe"] == RecipeConfig.from_profile("quick").to_dict()
    plan = Job.fetch(f"{runs.runs[0]}-plan", connection=redis_conn)
    assert plan.origin == TRAINING_QUEUE
    assert project(redis_conn)["followup"] == "1"  # 80 labels arrived while it was queued


def test_no_run_below_the_threshold(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> None:
    for i in range(1, N):
        ls.labelled = i
        retrainer.on_webhook(annotation_event(i, i, "Codman Hakim"))
        if i % 5 == 0 or i == N - 1:
            drain(redis_conn)
    assert runs.runs == []
    assert ("count_labelled_tasks", LS_ID) in ls.calls  # it did look
    assert Queue(TRAINING_QUEUE, connection=redis_conn).count == 0
    ls.labelled = N
    retrainer.on_webhook(annotation_event(N, N, "Codman Hakim"))
    drain(redis_conn)
    assert len(runs.runs) == 1


def test_start_training_runs_now_even_below_threshold(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> None:
    ls.labelled = 3
    assert retrainer.on_webhook(webhook("START_TRAINING")) == "queued"
    drain(redis_conn)
    assert len(runs.runs) == 1
    assert run_status(redis_conn, runs.runs[0])["labels_at_start"] == "3"


def test_other_events_are_ignored(retrainer: Retrainer, redis_conn: Redis) -> None:
    assert retrainer.on_webhook(webhook("PROJECT_UPDATED")) == "ignored"
    assert retrainer.on_webhook({"action": "ANNOTATION_CREATED"}) == "ignored"  # no project
    assert Queue(DEFAULT_QUEUE, connection=redis_conn).count == 0


def test_webhook_handling_is_fast(retrainer: Retrainer) -> None:
    """Label Studio gives /webhook 1 s and the annotator waits for it: stay far below 50 ms."""
    timings = []
    for i in range(50):
        body = annotation_event(i, i, "proGAV 2.0") if i % 2 else webhook("TASKS_CREATED")
        start = time.perf_counter()
        retrainer.on_webhook(body)
        timings.append(time.perf_counter() - start)
    assert statistics.median(timings) < 0.05, timings


def test_labels_during_a_run_lead_to_exactly_one_follow_up(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> None:
    ls.labelled = N
    first = retrainer.check(LS_ID, project_key=PROJECT_KEY)
    assert first is not None
    for i in range(N + 1, N + 6):  # five labels while it trains
        ls.labelled = i
        retrainer.on_webhook(annotation_event(i, i, "proGAV 2.0"))
    assert drain(redis_conn) == 1
    assert runs.runs == [first]

    finish_run(redis_conn, first, "published", promoted=False)
    second = retrainer.after_run(first)
    assert second is not None and runs.runs == [first, second]
    assert project(redis_conn)["last_snapshot_labels"] == str(N)
    assert run_status(redis_conn, second)["labels_at_start"] == str(N + 5)
    assert retrainer.after_run(first) is None  # a duplicate hook books nothing twice
    assert runs.runs == [first, second]

    finish_run(redis_conn, second, "published", promoted=False)
    assert retrainer.after_run(second) is None  # nothing new since: no third run
    assert runs.runs == [first, second]
    assert project(redis_conn)["last_snapshot_labels"] == str(N + 5)
    assert not redis_conn.exists(f"valve-id:project:{PROJECT_KEY}:lock")


def test_failed_run_keeps_the_snapshot_and_is_not_retried_on_every_label(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> None:
    ls.labelled = N
    first = retrainer.check(LS_ID, project_key=PROJECT_KEY)
    finish_run(redis_conn, first, "failed")
    assert retrainer.after_run(first) is None
    state = project(redis_conn)
    assert state.get("last_snapshot_labels", "0") == "0"
    assert state["failed_labels"] == str(N)
    ls.labelled = N + 1
    assert retrainer.check(LS_ID, project_key=PROJECT_KEY) is None
    ls.labelled = 2 * N
    assert retrainer.check(LS_ID, project_key=PROJECT_KEY) is not None
    assert len(runs.runs) == 2


def test_promoted_publish_enqueues_rescoring_only_when_promoted(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio
) -> None:
    ls.labelled = N
    first = retrainer.check(LS_ID, project_key=PROJECT_KEY)
    finish_run(redis_conn, first, "published", promoted=False)
    retrainer.after_run(first)
    assert queued_functions(redis_conn) == []

    ls.labelled = 2 * N
    second = retrainer.check(LS_ID, project_key=PROJECT_KEY)
    finish_run(redis_conn, second, "published", promoted=True)
    retrainer.after_run(second)
    assert queued_functions(redis_conn) == [("backend.loop.jobs.rescore_project", (LS_ID, second))]


def test_reconcile_catches_a_dropped_webhook(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> None:
    ls.labelled = 1
    retrainer.on_webhook(annotation_event(1, 1, "proGAV 2.0"))
    drain(redis_conn)
    ls.labelled = N + 4  # labelled in Label Studio, webhooks lost
    started = retrainer.reconcile()
    assert started == runs.runs and len(started) == 1
    assert run_status(redis_conn, started[0])["labels_at_start"] == str(N + 4)
    assert retrainer.reconcile() == []  # the run holds the lock: no double
    assert len(runs.runs) == 1


def test_reconcile_books_a_run_whose_hook_was_lost(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> None:
    ls.labelled = N
    first = retrainer.check(LS_ID, project_key=PROJECT_KEY)
    finish_run(redis_conn, first, "failed")  # ... and its on_finish hook never ran
    ls.labelled = N + 2
    assert retrainer.check(LS_ID, project_key=PROJECT_KEY) is None  # the lock still holds

    started = retrainer.reconcile()
    assert project(redis_conn)["failed_labels"] == str(N)
    # The two labels that arrived meanwhile earn their follow-up, once.
    assert len(started) == 1 and runs.runs == [first, started[0]]
    assert retrainer.reconcile() == []
    assert redis_conn.get(f"valve-id:project:{PROJECT_KEY}:lock").decode() == started[0]

    # A lost hook of a promoted run still gets the snapshot advanced and the re-score queued.
    finish_run(redis_conn, started[0], "published", promoted=True)
    assert retrainer.reconcile() == []
    assert project(redis_conn)["last_snapshot_labels"] == str(N + 2)
    assert ("backend.loop.jobs.rescore_project", (LS_ID, started[0])) in queued_functions(
        redis_conn
    )
    ls.labelled = 2 * N + 2
    assert retrainer.check(LS_ID, project_key=PROJECT_KEY) is not None


def test_reconcile_releases_locks_of_vanished_runs(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> None:
    ls.labelled = N
    first = retrainer.check(LS_ID, project_key=PROJECT_KEY)
    redis_conn.delete(f"valve-id:run:{first}")  # expired, or Redis lost it
    started = retrainer.reconcile()
    assert len(started) == 0  # booked as failed at N labels: nothing new to train on
    assert not redis_conn.exists(f"valve-id:project:{PROJECT_KEY}:lock")
    ls.labelled = 2 * N
    assert retrainer.check(LS_ID, project_key=PROJECT_KEY) is not None


def test_reconcile_releases_only_stale_pending_locks(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> None:
    retrainer.register_project(LS_ID, PROJECT_KEY)
    lock = f"valve-id:project:{PROJECT_KEY}:lock"
    ls.labelled = N
    redis_conn.set(lock, f"pending:abc:{int(time.time())}")  # someone is enqueueing right now
    assert retrainer.reconcile() == []
    redis_conn.set(lock, f"pending:abc:{int(time.time()) - 3600}")  # died while enqueueing
    assert len(retrainer.reconcile()) == 1


def test_reconcile_forgets_a_project_superseded_by_a_reinstalled_label_studio(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> None:
    retrainer.register_project(LS_ID, "1.1000000000")
    retrainer.register_project(LS_ID, PROJECT_KEY)  # project 1 again, created later
    ls.labelled = N
    started = retrainer.reconcile()
    assert len(started) == 1
    assert run_status(redis_conn, started[0])["project_key"] == PROJECT_KEY
    assert redis_conn.smembers("valve-id:projects") == {PROJECT_KEY.encode()}


def test_concurrent_reconciliations_do_not_overlap(retrainer: Retrainer, redis_conn: Redis) -> None:
    redis_conn.set("valve-id:reconcile:lock", "other-process")
    retrainer.register_project(LS_ID, PROJECT_KEY)
    assert retrainer.reconcile() == []
    assert retrainer.label_studio.calls == []  # type: ignore[attr-defined]


def test_twenty_simultaneous_checks_start_exactly_one_run(
    retrainer: Retrainer,
    redis_conn: Redis,
    ls: FakeLabelStudio,
    runs: RecordingEnqueue,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ls.labelled = N + 3
    # The worst interleaving, every time: all twenty pass the live-run check and only then
    # does any of them try the lock (``_start`` begins with its SET NX). So the lock alone
    # must keep it to one run; thread timing cannot hide a lock that lets two through.
    at_the_lock = threading.Barrier(20, timeout=10)
    reached: list[int] = []
    start = retrainer._start

    def start_together(key: str, ls_project_id: int, count: int, *, force: bool) -> str | None:
        reached.append(1)
        at_the_lock.wait()  # a check turned away before the lock breaks it: the test fails
        return start(key, ls_project_id, count, force=force)

    monkeypatch.setattr(retrainer, "_start", start_together)
    results: list[str | None] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(retrainer.check(LS_ID, project_key=PROJECT_KEY))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(reached) == 20  # nobody was turned away before the lock
    started = [r for r in results if r is not None]
    assert len(results) == 20 and len(started) == 1 and runs.runs == started
    # The losers' follow-up notes are harmless: nothing was labelled after the run started.
    finish_run(redis_conn, started[0], "published", promoted=False)
    assert retrainer.after_run(started[0]) is None
    assert len(runs.runs) == 1


def test_acceptance_counts_kept_and_changed_classes_per_version(
    retrainer: Retrainer, redis_conn: Redis
) -> None:
    retrainer.proposals.record(
        PROJECT_KEY,
        [(3, "proGAV 2.0", "v1"), (4, "Codman Hakim", "v1"), (5, "Codman Hakim", "v2")],
    )

    retrainer.on_webhook(annotation_event(1, 3, "proGAV 2.0"))  # kept
    retrainer.on_webhook(annotation_event(1, 3, "proGAV 2.0"))  # the same event twice
    retrainer.on_webhook(annotation_event(2, 4, "Sophysa Sophy SM8"))  # changed
    retrainer.on_webhook(annotation_event(3, 5, "Codman Hakim"))  # kept, by v2
    retrainer.on_webhook(annotation_event(4, 9, "Codman Hakim"))  # no proposal recorded
    retrainer.on_webhook(annotation_event(5, 4, "Codman Hakim", cancelled=True))  # skipped
    assert retrainer.proposals.per_version() == {
        "v1": {"total": 2, "accepted": 1},
        "v2": {"total": 1, "accepted": 1},
    }

    # The recorded ANNOTATION_UPDATED: annotation 1 on task 3 changed to Codman Hakim.
    retrainer.on_webhook(
        webhook("ANNOTATION_UPDATED", project=webhook("START_TRAINING")["project"])
    )
    assert retrainer.proposals.per_version()["v1"] == {"total": 2, "accepted": 0}
    # A later re-prediction of task 3 by v2 does not move annotation 1 to v2.
    retrainer.proposals.record(PROJECT_KEY, [(3, "Codman Hakim", "v2")])
    retrainer.on_webhook(annotation_event(1, 3, "proGAV 2.0", action="ANNOTATION_UPDATED"))
    assert retrainer.proposals.per_version() == {
        "v1": {"total": 2, "accepted": 1},
        "v2": {"total": 1, "accepted": 1},
    }


def test_a_live_run_keeps_its_lock_even_if_the_key_expired(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> None:
    lock = f"valve-id:project:{PROJECT_KEY}:lock"
    ls.labelled = N
    first = retrainer.check(LS_ID, project_key=PROJECT_KEY)
    redis_conn.hset(f"valve-id:run:{first}", "status", "running")
    redis_conn.expire(lock, 5)
    assert retrainer.reconcile() == []
    assert redis_conn.ttl(lock) > 3600  # extended while the run lives
    redis_conn.delete(lock)  # a very long run outlived the key anyway
    ls.labelled = 3 * N
    assert retrainer.check(LS_ID, project_key=PROJECT_KEY) is None  # the run record says busy
    assert runs.runs == [first]
    assert redis_conn.get(lock).decode() == first


def test_a_follow_up_survives_label_studio_being_down_at_the_end_of_a_run(
    retrainer: Retrainer, redis_conn: Redis, ls: FakeLabelStudio, runs: RecordingEnqueue
) -> None:
    ls.labelled = N
    first = retrainer.check(LS_ID, project_key=PROJECT_KEY)
    ls.labelled = N + 1
    retrainer.check(LS_ID, project_key=PROJECT_KEY)  # during the run: follow-up noted
    finish_run(redis_conn, first, "published", promoted=False)

    def down(project_id: int) -> int:
        raise ConnectionError("Label Studio unreachable")

    ls.count_labelled_tasks = down  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        retrainer.after_run(first)
    assert project(redis_conn)["followup"] == "1"
    assert not redis_conn.exists(f"valve-id:project:{PROJECT_KEY}:lock")

    del ls.count_labelled_tasks  # back up
    started = retrainer.reconcile()
    assert len(started) == 1 and runs.runs == [first, *started]
    assert run_status(redis_conn, started[0])["labels_at_start"] == str(N + 1)
