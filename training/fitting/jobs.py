"""Training as RQ jobs: plain functions taking ids, paths and numbers.

A run is ``1 + n_folds + 1`` jobs on the training queue::

    plan ──► fold 0 ─┐
         ├─► fold 1 ─┤
         ├─► ...     ├─► finalise (evaluate, report, publish + promotion gate, prune)
         └─► fold 4 ─┘

so N workers with one GPU each (``CUDA_VISIBLE_DEVICES``) train folds in parallel, and one
worker trains them in sequence. Progress (stage, fold, epoch, losses, macro-F1) lives in each
job's ``meta``. If any job fails — an exception, a timeout, or a worker killed mid-fold (RQ
then marks the job abandoned and still runs its failure callback) — the run is marked failed,
its other jobs are cancelled, its staging directory is deleted and the registry is untouched.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Callback, Queue, get_current_job
from rq.exceptions import AbandonedJobError
from rq.job import Job, JobStatus

from training.shared import loop_state
from training.shared.loop_state import DEFAULT_QUEUE, TRAINING_QUEUE, RunStatus
from training.shared.registry import Registry, new_version_id, open_registry
from training.shared.retention import DEFAULT_KEEP_DAYS, DEFAULT_KEEP_VERSIONS, RetentionPolicy

__all__ = [
    "TrainingRun",
    "enqueue_training",
    "on_work_horse_killed",
    "prune_after_run",
    "report_progress",
    "finalize_job",
    "fold_job",
    "plan_job",
]

logger = logging.getLogger(__name__)

PLAN_TIMEOUT_S = 2 * 3600
"""Decoding and caching a large export can take a while on a slow disk."""
FOLD_TIMEOUT_S = 6 * 3600
"""One fold of the paper profile takes minutes on a GPU, hours on a CPU."""
FINALIZE_TIMEOUT_S = 3600
RESULT_TTL_S = 7 * 24 * 3600
"""How long finished jobs (and their progress meta) stay visible."""
_RUN_TTL_S = 30 * 24 * 3600
_NOT_STARTED = frozenset({JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED})
"""RQ statuses of a job that can still be cancelled before it runs."""


@dataclass(frozen=True)
class TrainingRun:
    """Handle of an enqueued run."""

    run_id: str
    staging: str
    plan_job_id: str
    fold_job_ids: list[str]
    finalize_job_id: str

    @property
    def job_ids(self) -> list[str]:
        return [self.plan_job_id, *self.fold_job_ids, self.finalize_job_id]


def report_progress(**fields: Any) -> None:
    """Put progress on the running job's meta (no-op outside a worker)."""
    job = get_current_job()
    if job is None:
        return
    job.meta.update(fields)
    job.save_meta()


def _set_run(connection: Redis, run_id: str, **fields: Any) -> None:
    key = loop_state.run(run_id)
    connection.hset(key, mapping={k: str(v) for k, v in fields.items()})
    connection.expire(key, _RUN_TTL_S)


def plan_job(
    run_id: str,
    staging: str,
    data: str,
    label_config_path: str,
    recipe: dict[str, Any],
    cache_dir: str | None,
) -> dict[str, Any]:
    """Stage 1: snapshot the labelled data, decode/cache it once, fix classes and folds."""
    from training.fitting.config import resolve_recipe
    from training.fitting.run import plan_run
    from training.fitting.sources import load_items
    from training.shared.labels import load_label_config

    report_progress(stage="plan", run_id=run_id)
    # "auto" is decided here, on the worker that trains
    # (see training.fitting.config.choose_profile).
    config = resolve_recipe(recipe)
    logger.info("run %s: profile %s (%s)", run_id, config.profile, config.profile_reason)
    job = get_current_job()
    if job is not None:
        _set_run(
            job.connection,
            run_id,
            status=RunStatus.RUNNING,
            profile=config.profile,
            profile_reason=config.profile_reason,
        )
    label_config = load_label_config(label_config_path)
    # Images exported from Label Studio are kept beside the cache, never inside the version.
    downloads = (
        Path(cache_dir) / "labelstudio-images"
        if cache_dir
        else Path(staging).parent / f"{run_id}-images"
    )
    items = load_items(
        data,
        label_config.classes,
        downloads,
        image_key=label_config.image_key,
        choices_name=label_config.choices_name,
        keypoint_name=label_config.keypoint_name,
        keypoint_label=label_config.keypoint_label,
        settings=label_config.settings,
    )
    plan = plan_run(
        Path(staging),
        items,
        label_config,
        config,
        source=data,
        cache_dir=Path(cache_dir) if cache_dir else None,
        run_id=run_id,
        progress=lambda row: report_progress(**row),
    )
    return {"n_images": len(plan["snapshot"]), "classes": plan["classes"]}


def fold_job(run_id: str, staging: str, fold: int, cache_dir: str | None) -> dict[str, Any]:
    """Stage 2: train one fold (any worker, any order)."""
    from training.fitting.run import train_fold_stage

    report_progress(stage="fold", run_id=run_id, fold=fold)
    summary = train_fold_stage(
        Path(staging),
        fold,
        cache_dir=Path(cache_dir) if cache_dir else None,
        progress=lambda row: report_progress(stage="fold", **row),
    )
    return {k: summary[k] for k in ("fold", "n_train", "n_val")}


def finalize_job(
    run_id: str,
    staging: str,
    model_dir: str,
    cache_dir: str | None,
    tolerance: float,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    keep_days: float = DEFAULT_KEEP_DAYS,
    s3_endpoint_url: str = "",
) -> dict[str, Any]:
    """Stage 3: evaluate, report, publish atomically; the gate decides on promotion; then
    prune old versions' weights (retention; a failed prune is logged, never fails the run).

    ``model_dir`` is a folder or an ``s3://`` URL (then reached at ``s3_endpoint_url``)."""
    from training.fitting.run import finalize_run

    report_progress(stage="finalize", run_id=run_id)
    finalize_run(Path(staging), cache_dir=Path(cache_dir) if cache_dir else None, version=run_id)
    registry = open_registry(model_dir, endpoint_url=s3_endpoint_url or None, cache_dir=cache_dir)
    result = registry.publish(staging, version_id=run_id, tolerance=tolerance)
    prune_after_run(registry, run_id, keep_versions, keep_days)
    job = get_current_job()
    if job is not None:
        _set_run(
            job.connection,
            run_id,
            status=RunStatus.PUBLISHED,
            version=result.version_id,
            promoted=int(result.promoted),
            reason=result.reason,
        )
        _notify_finished(job.connection, run_id)
    logger.info(
        "run %s published as %s (promoted=%s: %s)",
        run_id,
        result.version_id,
        result.promoted,
        result.reason,
    )
    return {"version": result.version_id, "promoted": result.promoted, "reason": result.reason}


def prune_after_run(registry: Registry, run_id: str, keep_versions: int, keep_days: float) -> None:
    """Retention after a published run, and abandoned staging folders (untouched for a day)
    removed; any failure is logged and swallowed (the version is published and the run
    succeeded, whatever happens to older versions' weights)."""
    try:
        result = registry.prune(RetentionPolicy(keep_versions, keep_days), apply=True)
        registry.cleanup_staging()
    except Exception as exc:
        logger.warning("run %s: pruning old model versions failed: %s", run_id, exc)
        logger.debug("pruning failure", exc_info=True)
        return
    if result.pruned:
        logger.info(
            "run %s: pruned %d old version(s), %.1f MB freed",
            run_id,
            len(result.pruned),
            result.freed_bytes / 1e6,
        )


def _on_failure(job: Job, connection: Redis, exc_type: type, exc: BaseException, tb: Any) -> None:
    """Any stage failed (or its worker died): fail the run visibly and leave nothing half-done."""
    run_id = job.meta.get("run_id") or job.kwargs.get("run_id") or job.args[0]
    record = loop_state.run_status(connection, run_id)
    detail = str(exc)
    if not detail and issubclass(exc_type, AbandonedJobError):  # RQ's cleanup says nothing more
        detail = "its worker died (no heartbeat since); RQ abandoned the job"
    reason = f"{job.meta.get('stage', 'job')} failed: {exc_type.__name__}: {detail}"
    logger.error("training run %s failed: %s", run_id, reason)
    _set_run(connection, run_id, status=RunStatus.FAILED, reason=reason, failed_job=job.id)
    for other_id in record.get("jobs", "").split(","):
        if other_id and other_id != job.id:
            try:
                other = Job.fetch(other_id, connection=connection)
            except Exception:  # already expired or deleted: nothing left to stop
                continue
            if other.get_status(refresh=True) in _NOT_STARTED:
                other.cancel()
    staging = record.get("staging")
    if staging:
        shutil.rmtree(staging, ignore_errors=True)
    _notify_finished(connection, run_id)


class WorkHorseKilled(Exception):
    """The process running a job died without a Python exception (SIGKILL, OOM killer)."""


def on_work_horse_killed(job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
    """RQ worker hook: a killed work-horse fails its run like any other job failure.

    RQ runs ``on_failure`` callbacks inside the work-horse, so a horse killed by a signal
    never runs them; the worker calls this hook instead (pass it as
    ``Worker(work_horse_killed_handler=...)``).
    """
    if not job.meta.get("run_id"):
        return  # not a training job
    exc = WorkHorseKilled(f"the training process died (waitpid status {ret_val})")
    _on_failure(job, job.connection, WorkHorseKilled, exc, None)


def _notify_finished(connection: Redis, run_id: str) -> None:
    """Enqueue the run's ``on_finish`` hook (e.g. the backend's booking), success or not.

    The record holds the hook as a dotted function path, called as ``hook(run_id)``: the
    record outlives the process that enqueued the run, and this module never imports the
    code it notifies.
    """
    record = loop_state.run_status(connection, run_id)
    hook = record.get("on_finish")
    if not hook:
        return
    Queue(record.get("on_finish_queue") or DEFAULT_QUEUE, connection=connection).enqueue(
        hook, run_id, result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S
    )


def _dotted_path(func: Callable[..., Any] | str | None) -> str:
    """``module.name`` of a module-level function, as RQ itself stores a job's function."""
    if func is None or isinstance(func, str):
        return func or ""
    path = f"{func.__module__}.{func.__qualname__}"
    if "<" in path:  # a lambda or a nested function: no worker could import it
        raise ValueError(f"on_finish must be a module-level function, not {path}")
    return path


def enqueue_training(
    connection: Redis,
    *,
    data: str,
    label_config_path: str,
    recipe: dict[str, Any],
    model_dir: str,
    cache_dir: str | None,
    tolerance: float = 0.02,
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    keep_days: float = DEFAULT_KEEP_DAYS,
    s3_endpoint_url: str = "",
    queue_name: str = TRAINING_QUEUE,
    on_finish: Callable[[str], Any] | str | None = None,
    on_finish_queue: str = "",
    extra: dict[str, str] | None = None,
) -> TrainingRun:
    """Enqueue a whole run; returns its handle at once (nothing is trained here).

    ``on_finish`` (an importable function, or its dotted path) is enqueued with the run id
    when the run ends, published or failed; ``extra`` fields are stored in the run record
    (e.g. the project).
    """
    run_id = new_version_id()
    registry = open_registry(model_dir, endpoint_url=s3_endpoint_url or None, cache_dir=cache_dir)
    staging = str(registry.staging(run_id))
    queue = Queue(queue_name, connection=connection)
    on_failure = Callback(_on_failure)
    common = {"result_ttl": RESULT_TTL_S, "failure_ttl": RESULT_TTL_S, "on_failure": on_failure}
    n_folds = int(recipe["n_folds"])
    run = TrainingRun(
        run_id,
        staging,
        plan_job_id=f"{run_id}-plan",
        fold_job_ids=[f"{run_id}-fold{k}" for k in range(n_folds)],
        finalize_job_id=f"{run_id}-finalize",
    )
    # The record exists before any job can run, so a failure callback always finds it.
    _set_run(
        connection,
        run_id,
        status=RunStatus.QUEUED,
        staging=staging,
        jobs=",".join(run.job_ids),
        data=data,
        on_finish=_dotted_path(on_finish),
        on_finish_queue=on_finish_queue,
        **(extra or {}),
    )

    plan = queue.enqueue(
        plan_job,
        args=(run_id, staging, data, label_config_path, recipe, cache_dir),
        job_id=run.plan_job_id,
        job_timeout=PLAN_TIMEOUT_S,
        meta={"run_id": run_id, "stage": "plan"},
        description=f"valve-id run {run_id}: plan",
        **common,
    )
    folds = [
        queue.enqueue(
            fold_job,
            args=(run_id, staging, fold, cache_dir),
            job_id=job_id,
            depends_on=plan,
            job_timeout=FOLD_TIMEOUT_S,
            meta={"run_id": run_id, "stage": "fold", "fold": fold},
            description=f"valve-id run {run_id}: fold {fold}",
            **common,
        )
        for fold, job_id in enumerate(run.fold_job_ids)
    ]
    queue.enqueue(
        finalize_job,
        args=(run_id, staging, model_dir, cache_dir, tolerance, keep_versions, keep_days),
        kwargs={"s3_endpoint_url": s3_endpoint_url} if s3_endpoint_url else None,
        job_id=run.finalize_job_id,
        depends_on=folds,
        job_timeout=FINALIZE_TIMEOUT_S,
        meta={"run_id": run_id, "stage": "finalize"},
        description=f"valve-id run {run_id}: finalize",
        **common,
    )
    return run
