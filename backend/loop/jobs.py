"""Backend RQ jobs: handle a webhook event, re-score a project, pre-annotate new tasks,
reconcile.

Each job is a plain importable function of ids and numbers (``valve-id worker`` runs them
from the ``valve-id-default`` queue). What a job needs — settings, the Label Studio client,
the image fetcher, the served model — comes from the :class:`WorkerContext`, built once per
worker process from :meth:`Settings.from_env`; :func:`use_context` replaces it (the worker's
start-up, tests, and issue 5's end-to-end suite against a real Label Studio).

:class:`JobQueue` is the one place these jobs are enqueued (by function, so the chain
webhook → check → run → ``after_run`` → re-score shows in imports); :class:`Retrainer`
receives it as its queue.

Predicting and writing share one loop (:func:`_predict_and_write`): tasks stream in pages,
images are fetched in parallel, a bad image is counted and skipped, and memory stays flat
however large the project. Progress is in ``job.meta`` (``done``/``total``/``failed``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from redis import Redis
from rq import Queue, get_current_job

from backend.loop.retraining import ANNOTATION_ACTIONS, Retrainer
from backend.service.prelabel import FetcherLike, PredictorLike, prelabel, task_id
from backend.settings import Settings
from training.fitting.jobs import TrainingRun, enqueue_training, report_progress
from training.shared import loop_state
from training.shared.errors import ValveIdError
from training.shared.labels import LabelConfig
from training.shared.loop_state import DEFAULT_QUEUE

__all__ = [
    "RESCORE_BATCH_TASKS",
    "JobQueue",
    "WorkerContext",
    "after_run",
    "get_predictor",
    "handle_event",
    "predict_tasks",
    "reconcile_job",
    "rescore",
    "rescore_project",
    "use_context",
]

logger = logging.getLogger(__name__)

RESCORE_BATCH_TASKS = 64
"""Tasks fetched, predicted and written per step (Label Studio pages hold 100)."""
FETCH_THREADS = 8
"""Images downloaded in parallel; fetching is I/O-bound and dominates a re-score."""
EVENT_JOB_TIMEOUT_S = 120
"""A check is one count request to Label Studio plus a few Redis calls."""
PREDICT_JOB_TIMEOUT_S = 3600
"""Pre-annotating a large import (TASKS_CREATED) fetches and predicts every new image."""
RESCORE_JOB_TIMEOUT_S = 6 * 3600
"""Re-scoring predicts every unlabelled task: tens of thousands of images on a CPU."""
JOB_RESULT_TTL_S = 24 * 3600
"""How long finished backend jobs stay visible (``/jobs``)."""


@dataclass
class WorkerContext:
    """Everything the backend jobs use, built once per worker process.

    ``predictor`` None means the process-wide cached :func:`get_predictor`.
    """

    settings: Settings
    label_studio: Any = None
    fetcher: Any = None
    predictor: Any = None
    enqueue_training: Callable[..., Any] = enqueue_training
    redis: Redis | None = None
    _label_config: Any = field(default=None, repr=False)
    _retrainer: Retrainer | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        from backend.service.labelstudio import image_fetcher, label_studio_client

        label_studio = label_studio_client(settings)
        fetcher = image_fetcher(settings, auth_headers=label_studio.auth_headers)
        return cls(settings=settings, label_studio=label_studio, fetcher=fetcher)

    @property
    def label_config(self) -> Any:
        """The configured label config (``VALVE_ID_LABEL_CONFIG``)."""
        if self._label_config is None:
            from training.shared.labels import load_label_config

            self._label_config = load_label_config(self.settings.label_config)
        return self._label_config

    def project_label_config(self, ls_project_id: int) -> Any:
        """The project's own config (its ``Image``/``Choices`` names and classes build the
        results), else the configured one if Label Studio cannot say."""
        from training.shared.labels import parse_label_config

        try:
            return parse_label_config(self.label_studio.label_config(ls_project_id))
        except ValveIdError as exc:
            logger.warning("project %s: using the configured label config (%s)", ls_project_id, exc)
            return self.label_config

    def connection(self) -> Redis:
        """The running job's Redis (the one the worker listens on), else the settings'."""
        job = get_current_job()
        if job is not None:
            return job.connection
        if self.redis is None:
            self.redis = Redis.from_url(self.settings.redis_url)
        return self.redis

    def retrainer(self) -> Retrainer:
        """The decision on the running job's Redis, built once per connection."""
        connection = self.connection()
        if self._retrainer is None or self._retrainer.redis is not connection:
            self._retrainer = Retrainer(
                self.settings,
                connection,
                queue=JobQueue(connection, enqueue_training=self.enqueue_training),
                label_studio=self.label_studio,
            )
        return self._retrainer

    def served_predictor(self) -> Any:
        """The predictor, looking at the registry now (a promotion may be seconds old)."""
        if self.predictor is not None:
            self.predictor.refresh(force=True)
            return self.predictor
        return get_predictor(self.settings)


_context: WorkerContext | None = None
_predictors: dict[str, Any] = {}


def use_context(context: WorkerContext | None) -> None:
    """Set (or with None, forget) the context every job in this process uses."""
    global _context
    _context = context


def _ctx() -> WorkerContext:
    global _context
    if _context is None:
        _context = WorkerContext.from_settings(Settings.from_env())
    return _context


def get_predictor(settings: Settings) -> Any:
    """The worker's predictor for ``settings.models``: loaded once per process, refreshed
    before each use (a newly promoted version is picked up without restarting the worker)."""
    from backend.service.predictor import Predictor

    root = settings.registry_location
    predictor = _predictors.get(root)
    if predictor is None:
        predictor = Predictor(
            settings.open_registry(),
            acquisition=settings.acquisition,
            batch_size=settings.predict_batch_size,
            compile=settings.compile_model,
        )
        _predictors[root] = predictor
    predictor.refresh(force=True)
    return predictor


# --- jobs -----------------------------------------------------------------------------


def handle_event(
    action: str, ls_project_id: int, project_key: str | None, payload: Mapping[str, Any]
) -> dict[str, Any]:
    """A webhook's work, off Label Studio's 1-second clock."""
    ctx = _ctx()
    retrainer = ctx.retrainer()
    key = retrainer.register_project(ls_project_id, project_key)
    if action in ANNOTATION_ACTIONS:
        retrainer.clear_check_pending(key)
        return {"action": action, "run_id": retrainer.check(ls_project_id, project_key=key)}
    if action == "START_TRAINING":
        return {
            "action": action,
            "run_id": retrainer.check(ls_project_id, project_key=key, force=True),
        }
    if action == "TASKS_CREATED":
        return predict_tasks(ls_project_id, list(payload.get("tasks") or []), project_key=key)
    logger.debug("event %s has no handler", action)
    return {"action": action, "ignored": True}


def after_run(run_id: str) -> str | None:
    """A training run's ``on_finish`` hook (published or failed)."""
    return _ctx().retrainer().after_run(run_id)


def reconcile_job() -> list[str]:
    """Periodic repair (see :meth:`Retrainer.reconcile`); returns the run ids it started."""
    return _ctx().retrainer().reconcile()


def rescore_project(ls_project_id: int, version: str) -> dict[str, Any]:
    """Predict every unlabelled task with ``version`` and make it the project's version."""
    ctx = _ctx()
    return rescore(
        ls_project_id,
        version,
        label_studio=ctx.label_studio,
        predictor=ctx.served_predictor(),
        fetcher=ctx.fetcher,
        retrainer=ctx.retrainer(),
        label_config=ctx.project_label_config(ls_project_id),
        progress=report_progress,
    )


def predict_tasks(
    ls_project_id: int,
    tasks: list[Mapping[str, Any]],
    project_key: str | None = None,
) -> dict[str, Any]:
    """Pre-annotate newly imported tasks (``{"id", "data"}`` each) with the served version."""
    ctx = _ctx()
    retrainer = ctx.retrainer()
    key = project_key or retrainer.project_key(ls_project_id)
    predictor = ctx.served_predictor()
    if predictor.version is None:
        logger.info("project %s: no model version yet; new tasks stay unpredicted", key)
        return {"done": 0, "failed": 0, "total": len(tasks), "stopped": "no model version"}
    return _predict_and_write(
        ls_project_id,
        key,
        tasks,
        label_studio=ctx.label_studio,
        predictor=predictor,
        fetcher=ctx.fetcher,
        retrainer=retrainer,
        label_config=ctx.project_label_config(ls_project_id),
        total=len(tasks),
        progress=report_progress,
        rescoring=None,
    )


def rescore(
    ls_project_id: int,
    version: str,
    *,
    label_studio: Any,
    predictor: PredictorLike,
    fetcher: FetcherLike,
    retrainer: Retrainer,
    label_config: LabelConfig,
    progress: Callable[..., None] | None = None,
    batch_size: int = RESCORE_BATCH_TASKS,
) -> dict[str, Any]:
    """Re-score a project's unlabelled tasks (the body of :func:`rescore_project`).

    Idempotent: tasks already given a prediction of ``version`` are skipped, so a re-run
    after a crash continues where the first stopped. Does nothing (or stops) when the served
    version is not ``version``: a newer one's own re-score takes over, and a version that
    failed to load must not be announced to Label Studio.
    """
    key = retrainer.project_key(ls_project_id)
    if predictor.version != version:
        reason = getattr(predictor, "load_error", None) or f"serving {predictor.version}"
        logger.warning("project %s: not re-scoring with %s (%s)", key, version, reason)
        return {
            "done": 0,
            "total": None,
            "failed": 0,
            "written": 0,
            "skipped": 0,
            "stopped": reason,
        }
    total = int(label_studio.count_unlabelled_tasks(ls_project_id))
    stats = _predict_and_write(
        ls_project_id,
        key,
        label_studio.unlabelled_tasks(ls_project_id),
        label_studio=label_studio,
        predictor=predictor,
        fetcher=fetcher,
        retrainer=retrainer,
        label_config=label_config,
        total=total,
        progress=progress,
        rescoring=version,
        batch_size=batch_size,
    )
    logger.info(
        "project %s re-scored with %s: %d written, %d bad images, %d already done",
        key,
        version,
        stats["written"],
        stats["failed"],
        stats["skipped"],
    )
    return stats


# --- enqueueing -------------------------------------------------------------------------


class JobQueue:
    """The loop's jobs on the ``valve-id-default`` queue: the RQ side of
    :class:`backend.loop.retraining.LoopQueue`, plus the periodic reconciliation.

    Each job is enqueued as a function object; RQ stores its import path, so the jobs stay
    plain functions and a reader finds every enqueue site by following imports.
    ``enqueue_training`` is the seam tests use to observe runs.
    """

    def __init__(
        self, connection: Redis, *, enqueue_training: Callable[..., Any] = enqueue_training
    ) -> None:
        self.connection = connection
        self._enqueue_training = enqueue_training

    def _queue(self) -> Queue:
        return Queue(DEFAULT_QUEUE, connection=self.connection)

    def handle_event(
        self, action: str, ls_project_id: int, project_key: str, payload: Mapping[str, Any]
    ) -> None:
        timeout = PREDICT_JOB_TIMEOUT_S if action == "TASKS_CREATED" else EVENT_JOB_TIMEOUT_S
        self._queue().enqueue(
            handle_event,
            args=(action, ls_project_id, project_key, payload),
            job_timeout=timeout,
            result_ttl=JOB_RESULT_TTL_S,
            failure_ttl=JOB_RESULT_TTL_S,
            description=f"valve-id {action} project {ls_project_id}",
        )

    def start_run(self, **run: Any) -> TrainingRun:
        """A training run on the training queue whose end enqueues :func:`after_run` here."""
        return self._enqueue_training(
            self.connection, on_finish=after_run, on_finish_queue=DEFAULT_QUEUE, **run
        )

    def rescore_project(self, ls_project_id: int, version: str) -> None:
        self._queue().enqueue(
            rescore_project,
            args=(ls_project_id, version),
            job_timeout=RESCORE_JOB_TIMEOUT_S,
            result_ttl=JOB_RESULT_TTL_S,
            failure_ttl=JOB_RESULT_TTL_S,
            description=f"valve-id re-score project {ls_project_id} with {version}",
        )

    def reconcile(self, interval_s: int) -> None:
        """One :func:`reconcile_job`, which must end (and be forgotten) within an interval."""
        self._queue().enqueue(reconcile_job, job_timeout=interval_s, result_ttl=interval_s)

    def schedule_reconcile(self, interval_s: int) -> bool:
        """This interval's :meth:`reconcile`, enqueued by one backend process of however many
        run the schedule (a ``SET NX`` key that lasts just under the interval)."""
        if not self.connection.set(
            loop_state.RECONCILE_SCHEDULED, "1", nx=True, ex=max(1, interval_s - 1)
        ):
            return False
        self.reconcile(interval_s)
        return True


# --- the shared loop ---------------------------------------------------------------------


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _predict_and_write(
    ls_project_id: int,
    project_key: str,
    tasks: Iterable[Any],
    *,
    label_studio: Any,
    predictor: PredictorLike,
    fetcher: FetcherLike,
    retrainer: Retrainer,
    label_config: LabelConfig,
    total: int | None,
    progress: Callable[..., None] | None,
    rescoring: str | None,
    batch_size: int = RESCORE_BATCH_TASKS,
) -> dict[str, Any]:
    """Fetch, predict, write, a batch at a time; returns the counts.

    ``rescoring`` names the version a re-score writes: tasks already holding it are skipped,
    the loop stops if another version starts answering, and the project's ``model_version``
    is set to it even if it already looked set. Without it (new tasks), whatever version is
    served is written and announced only if the project does not have it yet.
    """
    stats: dict[str, Any] = {"done": 0, "total": total, "failed": 0, "written": 0, "skipped": 0}
    version_set = False

    def report() -> None:
        if progress is not None:
            progress(**stats)

    report()
    with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
        for batch in _batches(tasks, batch_size):
            todo = batch
            if rescoring is not None:
                have = retrainer.proposals.versions(project_key, [task_id(t) for t in batch])
                todo = [t for t, v in zip(batch, have, strict=True) if v != rescoring]
                stats["skipped"] += len(batch) - len(todo)
                stats["done"] += len(batch) - len(todo)
            if not todo:
                report()
                continue
            items, recorded = [], []
            for answer in prelabel(
                todo, config=label_config, predictor=predictor, fetcher=fetcher, pool=pool
            ):
                if not answer.ok or answer.label is None:
                    stats["failed"] += 1
                    logger.info("task %s: no prediction (%s)", answer.task_id, answer.reason)
                    continue
                version = answer.model_version or predictor.version or ""
                if rescoring is not None and version != rescoring:
                    stats["stopped"] = f"served version changed to {version}"
                    logger.info("project %s: %s; re-score stops", project_key, stats["stopped"])
                    report()
                    return stats
                items.append(
                    {
                        "task": answer.task_id,
                        "result": answer.result,
                        "score": answer.score,
                        "model_version": version,
                    }
                )
                recorded.append((answer.task_id, answer.label, version))
            if items:
                label_studio.create_predictions(ls_project_id, items)
                retrainer.proposals.record(project_key, recorded)
                stats["written"] += len(items)
                if not version_set:
                    version_set = _publish_version(
                        label_studio,
                        retrainer,
                        ls_project_id,
                        project_key,
                        items[0]["model_version"],
                        always=rescoring is not None,
                    )
            stats["done"] += len(todo)
            report()
    if not version_set and rescoring is not None and stats["skipped"]:
        # A re-run that found the work done: the first run may have died before announcing.
        _publish_version(
            label_studio, retrainer, ls_project_id, project_key, rescoring, always=True
        )
    if stats["total"] is None:
        stats["total"] = stats["done"]
        report()
    return stats


def _publish_version(
    label_studio: Any,
    retrainer: Retrainer,
    ls_project_id: int,
    project_key: str,
    version: str,
    *,
    always: bool,
) -> bool:
    """Make ``version`` the project's ``model_version`` (after its first predictions exist:
    Label Studio refuses a version without predictions) and keep the review view.

    Without this, ``predictions_score`` ignores the new predictions and the queue does not
    re-sort (docs/PROTOCOL.md). Returns whether it is done; a refusal is retried next batch.
    """
    if not always and retrainer.state(project_key).get("model_version") == version:
        return True
    try:
        label_studio.set_model_version(ls_project_id, version)
        label_studio.ensure_review_view(ls_project_id)
    except Exception:
        logger.warning(
            "project %s: setting model_version %s failed; will retry",
            project_key,
            version,
            exc_info=True,
        )
        return False
    retrainer.mark_model_version(project_key, version)
    return True
