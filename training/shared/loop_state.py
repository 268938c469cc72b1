"""Every Redis name the retraining loop uses, and the statuses a run record holds.

The loop's state is shared by the training jobs, the backend's decision code, the web app
and the local stack; naming each key here (as rq's ``keys.py`` does) is what lets one grep
find every reader and writer. The values are the stored format: changing one orphans the
data already in Redis. ``training/`` owns this module because ``training/`` never imports
``backend/``. docs/ARCHITECTURE.md describes what each key holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis import Redis

__all__ = [
    "ACCEPTANCE_PREFIX",
    "ACCEPTANCE_VERSIONS",
    "DEFAULT_QUEUE",
    "PREFIX",
    "PROJECTS",
    "PROJECT_INDEX",
    "RECONCILE_LOCK",
    "RECONCILE_SCHEDULED",
    "RUN_PATTERN",
    "TRAINING_QUEUE",
    "RunStatus",
    "acceptance",
    "annotation_acceptance",
    "check_pending",
    "prediction",
    "project",
    "project_lock",
    "run",
    "run_id_of",
    "run_ids",
    "run_status",
]

PREFIX = "valve-id:"

TRAINING_QUEUE = "valve-id-training"
"""Queue the training jobs go to; ``valve-id worker`` listens on it."""
DEFAULT_QUEUE = "valve-id-default"
"""Queue of short backend jobs (webhooks, re-scoring); ``valve-id worker`` listens on it too."""


class RunStatus(StrEnum):
    """A training run's ``status`` field; ``str(status)`` is the value stored in Redis."""

    QUEUED = "queued"
    RUNNING = "running"
    PUBLISHED = "published"
    FAILED = "failed"

    @classmethod
    def of(cls, record: Mapping[str, str]) -> RunStatus | None:
        """The status of a run record (None: no record, or a value this code does not know)."""
        try:
            return cls(record.get("status", ""))
        except ValueError:
            return None

    @property
    def active(self) -> bool:
        """Queued or running: the run still holds its project's lock."""
        return self in {RunStatus.QUEUED, RunStatus.RUNNING}

    @property
    def finished(self) -> bool:
        """Published or failed: the run's ``on_finish`` hook is due."""
        return self in {RunStatus.PUBLISHED, RunStatus.FAILED}


# --- training runs ----------------------------------------------------------------------

_RUN = PREFIX + "run:"
RUN_PATTERN = _RUN + "*"
"""``SCAN`` pattern of the run records (it can match keys below a record, see run_id_of)."""


def text(value: bytes | str | None) -> str:
    """A Redis reply as text (the connections here return bytes); None as ``""``."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def run(run_id: str) -> str:
    """Hash: the run's record (status, staging, jobs, version, reason, project fields)."""
    return _RUN + run_id


def run_id_of(key: bytes | str) -> str | None:
    """The run id a :data:`RUN_PATTERN` match names, or None for any other key."""
    name = text(key)
    if not name.startswith(_RUN):
        return None
    run_id = name[len(_RUN) :]
    return run_id if run_id and ":" not in run_id else None


def run_status(connection: Redis, run_id: str) -> dict[str, str]:
    """The run's record: status, staging, job ids, version, reason."""
    raw: dict[bytes, bytes] = connection.hgetall(run(run_id))  # type: ignore[assignment]
    return {text(k): text(v) for k, v in raw.items()}


def run_ids(connection: Redis, *, limit: int) -> list[str]:
    """Ids of at most ``limit`` run records, in no order (a ``SCAN``, never ``KEYS``)."""
    found = []
    for key in connection.scan_iter(match=RUN_PATTERN, count=200):
        run_id = run_id_of(key)
        if run_id is not None:
            found.append(run_id)
            if len(found) >= limit:
                break
    return found


# --- projects ---------------------------------------------------------------------------

PROJECTS = PREFIX + "projects"
"""Set: every known project key (what reconciliation walks)."""
PROJECT_INDEX = PREFIX + "project-keys"
"""Hash: Label Studio project id -> the latest project key seen for it."""


def project(project_key: str) -> str:
    """Hash: the project's snapshot counts, active run and follow-up flag."""
    return f"{PREFIX}project:{project_key}"


def project_lock(project_key: str) -> str:
    """String (``SET NX EX``): the project's single queued-or-running run."""
    return f"{PREFIX}project:{project_key}:lock"


def check_pending(project_key: str) -> str:
    """String (``SET NX EX``): a check job is queued (webhook de-duplication)."""
    return f"{PREFIX}project:{project_key}:check-pending"


# --- acceptance -------------------------------------------------------------------------

ACCEPTANCE_VERSIONS = PREFIX + "acceptance-versions"
"""Set: versions that have acceptance counts."""


ACCEPTANCE_PREFIX = PREFIX + "acceptance:"
"""What :func:`acceptance` puts before a version (the Lua counter builds keys from it)."""


def acceptance(version: str) -> str:
    """Hash: ``total`` and ``accepted`` annotations of tasks ``version`` proposed a class for."""
    return ACCEPTANCE_PREFIX + version


def annotation_acceptance(project_key: str) -> str:
    """Hash: annotation id -> how it was counted (each annotation once, latest choice wins)."""
    return f"{PREFIX}annotation-acceptance:{project_key}"


def prediction(project_key: str, task_id: int | str) -> str:
    """Hash: the class and version last proposed for a task."""
    return f"{PREFIX}prediction:{project_key}:{task_id}"


# --- reconciliation ---------------------------------------------------------------------

RECONCILE_LOCK = PREFIX + "reconcile:lock"
"""String (``SET NX EX``): one reconciliation at a time."""
RECONCILE_SCHEDULED = PREFIX + "reconcile:scheduled"
"""String (``SET NX EX``): one backend process enqueued this interval's reconciliation."""
