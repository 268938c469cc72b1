"""When to train: label counts against the last snapshot, one run per project, follow-ups.

Label Studio waits at most 1 s for ``/webhook`` and never redelivers an event, so webhooks are
*hints*, never the record: the number of labelled tasks Label Studio reports is the source of
truth, compared with the count the project's last published run was trained on
(``last_snapshot_labels``). The pieces:

* :meth:`Retrainer.on_webhook` (web process, O(1) Redis work) records the project, counts
  acceptance, and enqueues a cheap ``check`` job — at most one pending per project, so a burst
  of 100 annotations costs a handful of jobs.
* :meth:`Retrainer.check` (worker) asks Label Studio for the count; when it has grown by
  ``RETRAIN_EVERY_N_LABELS`` (or on ``START_TRAINING``) it takes the project's lock
  (``SET NX``) and enqueues a run. The lock holder is the only queued-or-running run; a check
  that finds it taken sets ``followup``.
* :meth:`Retrainer.after_run` (the run's ``on_finish`` hook) releases the lock, advances the
  snapshot if the run published (a failed run does not), starts the one follow-up if labels
  arrived meanwhile, and enqueues re-scoring when a new version was promoted.
* :meth:`Retrainer.reconcile` (periodic) repairs what a lost hook, a killed worker or a
  dropped webhook left behind. Every step is idempotent, so running it from several processes
  at once is harmless (and deduplicated anyway).

Failure policy: after a failed run, automatic retraining waits until the count has grown by
``N`` beyond the failed run's count (``failed_labels``), so a run that cannot succeed (e.g. too
few patients for the folds) is not retried on every annotation; "Start training" always runs.

Each annotation's webhook is also counted for acceptance (:mod:`backend.loop.acceptance`:
did the annotator keep the class the served version proposed?).

Work for the workers goes through an injected :class:`LoopQueue` (``backend.loop.jobs.JobQueue`` on
RQ), so this module names no job; the Redis keys are named in :mod:`training.shared.loop_state`.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from redis import Redis

from backend.loop.acceptance import Proposals
from backend.service.labelstudio import project_key_of
from training.shared import loop_state
from training.shared.loop_state import RunStatus, run_status

if TYPE_CHECKING:
    from backend.settings import Settings

__all__ = [
    "ANNOTATION_ACTIONS",
    "HANDLED_ACTIONS",
    "LabelCounter",
    "LoopQueue",
    "Retrainer",
    "chosen_label",
]

logger = logging.getLogger(__name__)

ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"})
"""Webhook actions that may change the labelled count."""
HANDLED_ACTIONS = ANNOTATION_ACTIONS | {"START_TRAINING", "TASKS_CREATED"}
"""Everything else (PROJECT_UPDATED, ...) is ignored."""

PROJECT_LOCK_TTL_S = 24 * 3600
"""The project lock outlives any sane run; :meth:`Retrainer.reconcile` extends it while a
run is still queued or running, so a long CPU run does not lose it."""
PENDING_LOCK_GRACE_S = 300
"""A lock taken but never bound to a run (the process died while enqueueing) is released
by reconciliation after this long."""
CHECK_PENDING_TTL_S = 60
"""How long a queued ``check`` job suppresses further ones for its project (it clears the
key when it starts; the TTL only matters if the job is lost)."""
RECONCILE_LOCK_TTL_S = 600
"""At most one reconciliation at a time; the key expires if its process dies."""

_PENDING_PREFIX = "pending:"
"""A lock's value while its run is being enqueued (``pending:<token>:<unix time>``)."""

# Release a lock only if it still holds our token (compare-and-delete).
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Keep a live run's lock: extend it if it is still ours, re-create it if it expired.
_REFRESH_LUA = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if not v then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]); return 1 end
return 0
"""

# Book a finished run exactly once: only the caller that still finds the run id in the
# project hash does the bookkeeping; returns -1 (already done), 0, or 1 (a follow-up is due).
# ARGV: run id, its status, labelled count at its start, RunStatus.PUBLISHED.
_FINISH_LUA = """
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
if redis.call('HGET', KEYS[1], 'run_id') ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'run_id', '')
if ARGV[2] == ARGV[4] then
  redis.call('HSET', KEYS[1], 'last_snapshot_labels', ARGV[3])
  redis.call('HDEL', KEYS[1], 'failed_labels')
else
  redis.call('HSET', KEYS[1], 'failed_labels', ARGV[3])
end
local followup = redis.call('HGET', KEYS[1], 'followup')
redis.call('HSET', KEYS[1], 'followup', '0')
if followup == '1' then return 1 end
return 0
"""


class LabelCounter(Protocol):
    """The one Label Studio call retraining needs (``training.labelstudio.LabelStudio``)."""

    def count_labelled_tasks(self, project_id: int) -> int: ...


class LoopQueue(Protocol):
    """The work the decision hands to workers (``backend.loop.jobs.JobQueue`` puts it on RQ).

    Injected rather than named: the decision never spells a job's import path, and tests
    can see exactly what was handed on.
    """

    def handle_event(
        self, action: str, ls_project_id: int, project_key: str, payload: Mapping[str, Any]
    ) -> None:
        """A webhook's work (a check, or pre-annotating new tasks), off the web process."""

    def start_run(self, **run: Any) -> Any:
        """Enqueue a training run (``training.fitting.jobs.enqueue_training``'s keyword arguments)
        whose end calls :meth:`Retrainer.after_run`; returns the run or its id."""

    def rescore_project(self, ls_project_id: int, version: str) -> None:
        """Predict the project's unlabelled tasks with a newly promoted ``version``."""


def _as_dict(event: Any) -> dict[str, Any]:
    """A webhook body as a plain dict, whether raw JSON or a pydantic model."""
    if isinstance(event, Mapping):
        return dict(event)
    dump = getattr(event, "model_dump", None)
    if dump is None:
        raise TypeError(f"not a webhook event: {type(event).__name__}")
    return dict(dump(mode="json", by_alias=True))


def _project_id(body: Mapping[str, Any]) -> int | None:
    project = body.get("project")
    if isinstance(project, Mapping) and project.get("id") is not None:
        return int(project["id"])
    if isinstance(project, int | str) and str(project).split(".")[0].isdigit():
        return int(str(project).split(".")[0])
    annotation = body.get("annotation")
    if isinstance(annotation, Mapping) and annotation.get("project") is not None:
        return int(annotation["project"])
    return None


def chosen_label(result: Iterable[Mapping[str, Any]] | None) -> str | None:
    """The class an annotation's ``result`` chose (first ``choices`` value), if any."""
    for region in result or ():
        if region.get("type") == "choices":
            choices = (region.get("value") or {}).get("choices") or []
            if choices:
                return str(choices[0])
    return None


def _minimal_payload(action: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """What a job needs from the event: ids, a chosen label, new tasks' data — no more."""
    if action in {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}:
        annotation = body.get("annotation") or {}
        return {
            "annotation_id": annotation.get("id"),
            "task_id": annotation.get("task") or (body.get("task") or {}).get("id"),
            "label": chosen_label(annotation.get("result")),
        }
    if action == "ANNOTATIONS_DELETED":
        return {"annotation_ids": [a.get("id") for a in body.get("annotations") or []]}
    if action == "TASKS_CREATED":
        return {
            "tasks": [
                {"id": t.get("id"), "data": t.get("data") or {}} for t in body.get("tasks") or []
            ]
        }
    return {}


class Retrainer:
    """Decides when a project trains; every method is safe to call from many processes.

    ``queue`` takes the work this decides on (checks, runs, re-scoring). ``label_studio``
    answers :meth:`LabelCounter.count_labelled_tasks`; it is built from ``settings`` on
    first use, so the web process (which only calls :meth:`on_webhook`) never opens a Label
    Studio client.
    """

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        *,
        queue: LoopQueue,
        label_studio: LabelCounter | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.queue = queue
        self._label_studio = label_studio
        self._release = redis.register_script(_RELEASE_LUA)
        self._refresh = redis.register_script(_REFRESH_LUA)
        self._finish = redis.register_script(_FINISH_LUA)
        self.proposals = Proposals(redis)
        """What each served version proposed, and whether annotators kept it."""

    @property
    def label_studio(self) -> LabelCounter:
        if self._label_studio is None:
            from backend.service.labelstudio import label_studio_client

            self._label_studio = label_studio_client(self.settings)
        return self._label_studio

    # --- web process: O(1) ----------------------------------------------------------

    def on_webhook(self, event: Mapping[str, Any] | Any) -> str:
        """Hand a webhook to the queue; returns ``queued``, ``deduplicated`` or ``ignored``.

        Only O(1) Redis work happens here (Label Studio waits for this, see module doc).
        Raises if Redis is unreachable; the app answers Label Studio regardless.
        """
        body = _as_dict(event)
        action = str(body.get("action") or "")
        if action not in HANDLED_ACTIONS:
            logger.debug("webhook %s ignored", action or "<no action>")
            return "ignored"
        ls_id = _project_id(body)
        if ls_id is None:
            logger.warning("webhook %s without a project id ignored", action)
            return "ignored"
        project = body.get("project")
        # Label Studio's "<id>.<created_ts>" key, rebuilt from the project's created_at.
        key = project_key_of(project) if isinstance(project, Mapping) else None
        key = self.register_project(ls_id, key)
        payload = _minimal_payload(action, body)

        if action in {"ANNOTATION_CREATED", "ANNOTATION_UPDATED"}:
            annotation = body.get("annotation") or {}
            if payload["label"] is not None and not annotation.get("was_cancelled"):
                self.proposals.count(
                    key, payload["task_id"], payload["annotation_id"], payload["label"]
                )
        # One pending check per project: it counts everything labelled before it starts.
        if action in ANNOTATION_ACTIONS and not self.redis.set(
            loop_state.check_pending(key), "1", nx=True, ex=CHECK_PENDING_TTL_S
        ):
            return "deduplicated"
        self.queue.handle_event(action, ls_id, key, payload)
        return "queued"

    def register_project(self, ls_project_id: int, project_key: str | None = None) -> str:
        """Remember a project for reconciliation; returns the key its state lives under.

        Without a ``"<id>.<created_ts>"`` key (an event lacking ``created_at``, a bare id),
        the last key seen for that Label Studio id is used, else the bare id.
        """
        if project_key is not None and "." not in str(project_key):
            project_key = None
        key = self._resolve_key(ls_project_id, project_key)
        pipe = self.redis.pipeline(transaction=False)
        pipe.sadd(loop_state.PROJECTS, key)
        pipe.hset(loop_state.project(key), "ls_id", str(ls_project_id))
        if project_key:
            pipe.hset(loop_state.PROJECT_INDEX, str(ls_project_id), key)
        pipe.execute()
        return key

    def _resolve_key(self, ls_project_id: int, project_key: str | None) -> str:
        if project_key:
            return project_key
        index = self.redis.hget(loop_state.PROJECT_INDEX, str(ls_project_id))
        return loop_state.text(index) or str(ls_project_id)

    def project_key(self, ls_project_id: int) -> str:
        """The key a Label Studio project id's state lives under (latest seen)."""
        return self._resolve_key(ls_project_id, None)

    # --- worker: the decision ----------------------------------------------------------

    def state(self, project_key: str) -> dict[str, str]:
        """The project's hash (see docs/ARCHITECTURE.md)."""
        raw = self.redis.hgetall(loop_state.project(project_key))
        return {loop_state.text(k): loop_state.text(v) for k, v in raw.items()}

    def mark_model_version(self, project_key: str, version: str) -> None:
        """Remember which version the project's ``model_version`` was set to."""
        self.redis.hset(loop_state.project(project_key), "model_version", version)

    def clear_check_pending(self, project_key: str) -> None:
        """Called when a check job starts: later webhooks must enqueue a fresh check."""
        self.redis.delete(loop_state.check_pending(project_key))

    def check(
        self,
        ls_project_id: int,
        *,
        force: bool = False,
        project_key: str | None = None,
        min_new: int | None = None,
    ) -> str | None:
        """Start a run if one is due; returns its id, or None.

        Due: ``force`` (START_TRAINING), or the labelled count has grown by ``min_new``
        (default ``RETRAIN_EVERY_N_LABELS``; 1 while a follow-up is owed) since the last
        published run — and, after a failed run, since that run's count. If a run is already
        queued or running, labels newer than it set ``followup`` instead.
        """
        key = self.register_project(ls_project_id, project_key)
        threshold = self.settings.retrain_every_n_labels if min_new is None else min_new
        count = int(self.label_studio.count_labelled_tasks(ls_project_id))
        state = self.state(key)

        if self._active_run(key, state):
            if force or count > int(state.get("run_labels") or -1):
                self.redis.hset(loop_state.project(key), "followup", "1")
                logger.info("project %s: run in progress, follow-up noted", key)
            return None

        if state.get("followup") == "1":
            threshold = min(threshold, 1)  # promised by a run whose end could not act on it
        snapshot = int(state.get("last_snapshot_labels") or 0)
        base = max(snapshot, int(state.get("failed_labels") or 0))
        if not force and count - base < threshold:
            logger.debug("project %s: %d labelled, %d at last snapshot", key, count, base)
            return None
        return self._start(key, ls_project_id, count, force=force)

    def _active_run(self, key: str, state: Mapping[str, str]) -> bool:
        """A lock is held, or the recorded run is still queued/running (lock lost)."""
        if self.redis.exists(loop_state.project_lock(key)):
            return True
        run_id = state.get("run_id")
        if not run_id:
            return False
        status = RunStatus.of(run_status(self.redis, run_id))
        if status is not None and status.active:
            self.redis.set(loop_state.project_lock(key), run_id, nx=True, ex=PROJECT_LOCK_TTL_S)
            return True
        return False

    def _start(self, key: str, ls_project_id: int, count: int, *, force: bool) -> str | None:
        token = f"{_PENDING_PREFIX}{secrets.token_hex(8)}:{int(time.time())}"
        lock = loop_state.project_lock(key)
        if not self.redis.set(lock, token, nx=True, ex=PROJECT_LOCK_TTL_S):
            # Someone started a run between our look and our lock: ours becomes its follow-up.
            self.redis.hset(loop_state.project(key), "followup", "1")
            return None
        try:
            run = self._enqueue_run(key, ls_project_id, count)
        except BaseException:
            self._release(keys=[lock], args=[token])
            raise
        run_id = str(getattr(run, "run_id", run))
        pipe = self.redis.pipeline()
        pipe.set(lock, run_id, xx=True, keepttl=True)
        pipe.hset(
            loop_state.project(key),
            mapping={"run_id": run_id, "run_labels": str(count), "followup": "0"},
        )
        pipe.execute()
        logger.info(
            "project %s: training run %s enqueued (%d labelled%s)",
            key,
            run_id,
            count,
            ", forced" if force else "",
        )
        return run_id

    def _enqueue_run(self, key: str, ls_project_id: int, count: int) -> Any:
        from training.fitting.config import recipe_request  # fastai-free

        # "auto" travels unresolved: the worker that plans the run decides (its GPU, its files).
        recipe = recipe_request(self.settings.training_profile)
        return self.queue.start_run(
            data=f"labelstudio:{ls_project_id}",
            label_config_path=str(self.settings.label_config),
            recipe=recipe,
            model_dir=self.settings.registry_location,
            s3_endpoint_url=self.settings.s3_endpoint_url,
            cache_dir=str(self.settings.cache),
            tolerance=self.settings.promotion_tolerance,
            keep_versions=self.settings.keep_versions,
            keep_days=self.settings.keep_days,
            extra={
                "project": str(ls_project_id),
                "project_key": key,
                "labels_at_start": str(count),
            },
        )

    def after_run(self, run_id: str) -> str | None:
        """Book a finished run once: lock, snapshot, follow-up, re-scoring.

        Returns the follow-up run id if one was started. A second call for the same run
        (a duplicate hook, or reconciliation racing the hook) does nothing.
        """
        record = run_status(self.redis, run_id)
        status = RunStatus.of(record)
        if status is None or not status.finished:
            logger.warning(
                "after_run(%s): run is %s, not finished; ignored", run_id, record.get("status")
            )
            return None
        if not record.get("project"):
            logger.warning("after_run(%s): run has no project; ignored", run_id)
            return None
        ls_id = int(record["project"])
        key = record.get("project_key") or self.project_key(ls_id)
        labels = record.get("labels_at_start") or self.state(key).get("run_labels") or "0"
        return self._book(key, ls_id, run_id, status, labels, record)

    def _book(
        self,
        key: str,
        ls_id: int,
        run_id: str,
        status: RunStatus,
        labels: str,
        record: Mapping[str, str],
    ) -> str | None:
        followup = int(
            self._finish(
                keys=[loop_state.project(key), loop_state.project_lock(key)],
                args=[run_id, status, labels, RunStatus.PUBLISHED],
            )
        )
        if followup < 0:
            return None
        logger.info("project %s: run %s %s (%s labelled)", key, run_id, status, labels)
        if (
            status is RunStatus.PUBLISHED
            and record.get("promoted") == "1"
            and record.get("version")
        ):
            self.queue.rescore_project(ls_id, record["version"])
        # Labels that arrived during the run: any new one earns exactly one follow-up.
        # Without a follow-up, still look once (covers webhooks dropped during the run).
        try:
            return self.check(ls_id, project_key=key, min_new=1 if followup else None)
        except Exception:
            if followup:  # Label Studio unreachable: keep the promise for reconciliation
                self.redis.hset(loop_state.project(key), "followup", "1")
            raise

    # --- periodic repair -------------------------------------------------------------

    def reconcile(self) -> list[str]:
        """Repair every known project; returns the run ids it started.

        Finishes runs whose hook was lost, frees locks whose run is gone, keeps the locks of
        live runs from expiring, and re-checks counts (which catches dropped webhooks).
        Returns at once if another process is reconciling.
        """
        token = secrets.token_hex(8)
        if not self.redis.set(loop_state.RECONCILE_LOCK, token, nx=True, ex=RECONCILE_LOCK_TTL_S):
            logger.debug("reconcile already running elsewhere")
            return []
        started: list[str] = []
        try:
            for key in sorted(loop_state.text(k) for k in self.redis.smembers(loop_state.PROJECTS)):
                try:
                    run_id = self._reconcile_project(key)
                except Exception:  # one broken project must not stop the others
                    logger.exception("reconcile: project %s failed", key)
                    continue
                if run_id:
                    started.append(run_id)
        finally:
            self._release(keys=[loop_state.RECONCILE_LOCK], args=[token])
        return started

    def _reconcile_project(self, key: str) -> str | None:
        state = self.state(key)
        if not state.get("ls_id"):
            return None
        ls_id = int(state["ls_id"])
        if loop_state.text(self.redis.hget(loop_state.PROJECT_INDEX, str(ls_id))) not in {"", key}:
            # Label Studio was reinstalled: this id now names another project.
            logger.info("reconcile: project %s superseded; forgotten", key)
            self.redis.srem(loop_state.PROJECTS, key)
            return None
        lock_key = loop_state.project_lock(key)
        lock = loop_state.text(self.redis.get(lock_key))
        run_id = state.get("run_id") or ("" if lock.startswith(_PENDING_PREFIX) else lock)
        if run_id:
            status = RunStatus.of(run_status(self.redis, run_id))
            if status is not None and status.active:
                self._refresh(keys=[lock_key], args=[run_id, PROJECT_LOCK_TTL_S])
                return None
            if status is not None and status.finished:
                logger.warning("reconcile: run %s of %s finished unbooked; booking", run_id, key)
                return self.after_run(run_id)
            # The run record is gone (expired, or Redis lost it): count it as failed.
            logger.warning("reconcile: run %s of %s unknown; releasing", run_id, key)
            labels = state.get("run_labels") or "0"
            if state.get("run_id") == run_id:
                return self._book(key, ls_id, run_id, RunStatus.FAILED, labels, {})
            self._release(keys=[lock_key], args=[run_id])
        elif lock.startswith(_PENDING_PREFIX):
            taken_at = int(lock.rsplit(":", 1)[-1] or 0)
            if time.time() - taken_at < PENDING_LOCK_GRACE_S:
                return None
            logger.warning("reconcile: stale pending lock of %s released", key)
            self._release(keys=[lock_key], args=[lock])
        return self.check(ls_id, project_key=key)
