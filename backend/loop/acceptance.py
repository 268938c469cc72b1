"""Acceptance: how often annotators keep the class a served version proposed.

The class each served version proposed for a task is remembered (:meth:`Proposals.record`,
called by the predict path and by re-scoring); each annotation is then counted once against
the version that proposed its task's class, and the *latest* choice wins: an
``ANNOTATION_UPDATED`` that changes the answer moves the annotation between kept and changed
instead of counting it twice (:meth:`Proposals.count`, one Lua script, so concurrent webhooks
cannot double-count). ``/metrics`` publishes the totals per version.

Re-scoring also asks which version last proposed a task (:meth:`Proposals.versions`) to skip
the tasks a version already scored. The Redis keys are named in
:mod:`training.shared.loop_state`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from redis import Redis

from training.shared import loop_state

__all__ = ["PREDICTION_TTL_S", "Proposals"]

PREDICTION_TTL_S = 180 * 24 * 3600
"""A proposed class is kept this long for acceptance tracking."""

# Count one annotation against the version that proposed its task's class; the latest
# choice wins. KEYS: prediction hash, the project's annotation records.
# ARGV: annotation id, chosen label, acceptance key prefix, versions set.
_ACCEPT_LUA = """
local rec = redis.call('HGET', KEYS[2], ARGV[1])
local version, proposed, prev
if rec then
  local r = cjson.decode(rec)
  version = r['v']; proposed = r['p']; prev = r['a']
else
  local pred = redis.call('HMGET', KEYS[1], 'label', 'version')
  if not pred[1] or not pred[2] then return false end
  proposed = pred[1]; version = pred[2]; prev = -1
end
local accepted = 0
if ARGV[2] == proposed then accepted = 1 end
local key = ARGV[3] .. version
if prev == -1 then
  redis.call('HINCRBY', key, 'total', 1)
  redis.call('HINCRBY', key, 'accepted', accepted)
  redis.call('SADD', ARGV[4], version)
elseif prev ~= accepted then
  redis.call('HINCRBY', key, 'accepted', accepted - prev)
end
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({v = version, p = proposed, a = accepted}))
return {version, accepted}
"""


class Proposals:
    """What each served version proposed, and whether annotators kept it (in Redis)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._accept = redis.register_script(_ACCEPT_LUA)

    def record(self, project_key: str, items: Iterable[tuple[int | str, str, str]]) -> None:
        """Remember ``(task id, proposed class, version)`` for many tasks, one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id, label, version in items:
            key = loop_state.prediction(project_key, task_id)
            pipe.hset(key, mapping={"label": label, "version": version})
            pipe.expire(key, PREDICTION_TTL_S)
        pipe.execute()

    def versions(self, project_key: str, task_ids: Iterable[int | str]) -> list[str | None]:
        """Per task, the version whose proposal was last recorded (one round trip)."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hget(loop_state.prediction(project_key, task_id), "version")
        return [loop_state.text(v) or None for v in pipe.execute()]

    def count(
        self, project_key: str, task_id: int | str | None, annotation_id: Any, label: str
    ) -> tuple[str, bool] | None:
        """Count one annotation as kept or changed; ``(version, kept)`` or None if the task
        had no recorded proposal. Idempotent per annotation (latest choice wins)."""
        if task_id is None or annotation_id is None:
            return None
        out = self._accept(
            keys=[
                loop_state.prediction(project_key, task_id),
                loop_state.annotation_acceptance(project_key),
            ],
            args=[
                str(annotation_id),
                label,
                loop_state.ACCEPTANCE_PREFIX,
                loop_state.ACCEPTANCE_VERSIONS,
            ],
        )
        if not out:
            return None
        return loop_state.text(out[0]), bool(int(out[1]))

    def per_version(self) -> dict[str, dict[str, int]]:
        """``{version: {"total": n, "accepted": k}}`` for ``/metrics`` and reports."""
        members = self.redis.smembers(loop_state.ACCEPTANCE_VERSIONS)
        versions = sorted(loop_state.text(v) for v in members)
        pipe = self.redis.pipeline(transaction=False)
        for version in versions:
            pipe.hgetall(loop_state.acceptance(version))
        stats = {}
        for version, raw in zip(versions, pipe.execute(), strict=True):
            row = {loop_state.text(k): int(v) for k, v in raw.items()}
            stats[version] = {"total": row.get("total", 0), "accepted": row.get("accepted", 0)}
        return stats
