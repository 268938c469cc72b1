"""Which model versions keep their weights: the retention rule, shared by every registry.

A version costs ~418 MB (five ResNet-34 folds), nearly all of it checkpoints. Retention keeps
the record of every version (``config.json``, ``metrics.json``, ``report.html``,
``promotion.json``: why the gate decided so) and deletes only the *weights* of versions no one
can need soon. A version keeps its weights when it is

* ``current`` (served, or being loaded by a backend that just saw it change),
* the version that was current before it (what a rollback returns to, and what a backend
  still serves until its next look at ``current``),
* one of the last ``keep_versions`` versions ever made current (by promote or rollback,
  most recent first), or
* younger than ``keep_days`` days (so a freshly rejected version can still be inspected and
  promoted by hand), or
* named by the caller (``protect``).

Every other version is *pruned*: its weight files are deleted and a ``pruned.json`` marker
records when and how much; it stays listed (as pruned) but can no longer be promoted or
rolled back to. The marker is written before the first file is deleted, so a prune that dies
half-way leaves a version that is marked pruned and is finished by the next prune — never one
that looks servable with half its folds.

Pure functions and plain data; the registries (:mod:`training.shared.registry`,
:mod:`training.shared.registry_s3`) do the listing, locking and deleting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import PurePosixPath

from training.shared.errors import RegistryError

__all__ = [
    "DEFAULT_KEEP_DAYS",
    "DEFAULT_KEEP_VERSIONS",
    "PRUNED_FILE",
    "PruneResult",
    "PrunedVersion",
    "RetentionPolicy",
    "is_weight_file",
    "versions_to_keep",
]

DEFAULT_KEEP_VERSIONS = 5
"""Versions most recently made current that keep their weights (rollback depth)."""
DEFAULT_KEEP_DAYS = 14.0
"""Days a version keeps its weights whatever the gate decided (time to inspect a rejection)."""
PRUNED_FILE = "pruned.json"
"""The marker a pruned version holds: when, how many bytes and files were deleted."""

_WEIGHTS_DIR = "weights"
_WEIGHT_SUFFIXES = frozenset({".pt", ".pth", ".ckpt", ".safetensors"})


def is_weight_file(relative_path: str) -> bool:
    """Whether a file of a version (path relative to the version, ``/``-separated) is weights:
    anything under ``weights/`` or any checkpoint file (``.pt``, ``.pth``, ``.ckpt``,
    ``.safetensors``). Metrics, config, report, promotion record, OOF logits stay."""
    path = PurePosixPath(relative_path)
    return (len(path.parts) > 1 and path.parts[0] == _WEIGHTS_DIR) or (
        path.suffix.lower() in _WEIGHT_SUFFIXES
    )


@dataclass(frozen=True)
class RetentionPolicy:
    """How much to keep (see the module docstring)."""

    keep_versions: int = DEFAULT_KEEP_VERSIONS
    keep_days: float = DEFAULT_KEEP_DAYS

    def __post_init__(self) -> None:
        if isinstance(self.keep_versions, bool) or self.keep_versions < 1:
            raise RegistryError(f"keep_versions must be at least 1, got {self.keep_versions!r}")
        if not math.isfinite(self.keep_days) or self.keep_days < 0:
            raise RegistryError(f"keep_days must be a number ≥ 0, got {self.keep_days!r}")


@dataclass(frozen=True)
class PrunedVersion:
    """One version whose weights a prune deletes (or would delete, in a dry run)."""

    version_id: str
    freed_bytes: int
    files: int


@dataclass(frozen=True)
class PruneResult:
    """What :meth:`prune` did (``applied``) or would do (a dry run)."""

    applied: bool
    pruned: tuple[PrunedVersion, ...]
    kept: Mapping[str, str] = field(default_factory=dict)
    """Version id → why it keeps its weights."""

    @property
    def freed_bytes(self) -> int:
        return sum(p.freed_bytes for p in self.pruned)


def versions_to_keep(
    versions: Iterable[tuple[str, datetime | None]],
    made_current: Sequence[str],
    current: str | None,
    policy: RetentionPolicy,
    *,
    protect: Iterable[str] = (),
    now: datetime | None = None,
) -> dict[str, str]:
    """The versions that keep their weights, each with the reason (first rule that holds).

    ``versions``: (id, created) of every published version; ``made_current``: the ids that
    became current, oldest first (the registry's history: promote and rollback). A version
    with no known creation time counts as young (kept): never delete what cannot be dated.
    """
    now = datetime.now(UTC) if now is None else now
    keep: dict[str, str] = {}
    if current is not None:
        keep[current] = "current"
    recent: list[str] = []
    for version in reversed(made_current):
        if version not in recent:
            recent.append(version)
    if current is not None and current in recent:
        position = recent.index(current)
        if position + 1 < len(recent):
            keep.setdefault(recent[position + 1], "current before the present one")
    for version in recent[: policy.keep_versions]:
        keep.setdefault(version, f"among the last {policy.keep_versions} made current")
    for version in protect:
        keep.setdefault(version, "protected by the caller")
    cutoff = now - timedelta(days=policy.keep_days)
    for version, created in versions:
        if created is None:
            keep.setdefault(version, "creation time unknown")
        elif created > cutoff:
            keep.setdefault(version, f"younger than {policy.keep_days:g} days")
    return keep
