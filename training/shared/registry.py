"""The versioned model registry: one directory per trained version, one ``current`` pointer.

Layout under the registry root (``MODEL_DIR``)::

    versions/<version_id>/   everything one training run produced; the registry itself only
                             needs config.json and metrics.json (plus promotion.json it adds)
    .staging/<run_id>-xxxx/  where a running job writes; never listed as a version
    current                  text file holding the served version id
    history.jsonl            append-only log of promote / rollback / rejected decisions
    versions/<id>/pruned.json  the weights of this version were deleted by retention
    .lock                    flock'ed around every change, so concurrent jobs serialise

Why this shape:

* **A reader never sees half a version.** A job writes into a staging directory on the same
  filesystem and :meth:`ModelRegistry.publish` renames it into ``versions/`` in one
  ``os.rename``, after fsyncing its files. A killed job leaves only a staging directory,
  which :meth:`ModelRegistry.cleanup_staging` removes.
* **``current`` is a small file replaced with ``os.replace``**, not a symlink: it works on every
  volume type (Docker volumes on Windows hosts, SMB, some FUSE mounts have no symlinks) and a
  reader sees either the old or the new id, never an empty file.
* **Disk use is bounded.** :meth:`ModelRegistry.prune` deletes the weights of versions no one
  can need soon (:mod:`training.shared.retention` says which), under the same lock; their
  metrics, config, report and promotion record stay.
* **A new version must earn ``current``.** :func:`decide_promotion` (pure) compares its
  out-of-fold macro-F1 with the current version's; a worse one is kept, servable by an
  explicit :meth:`ModelRegistry.promote`, and the reason is recorded. When the class
  vocabulary differs, the new version is promoted regardless: the label config changed and
  the old model cannot answer the new classes, so comparing F1 would compare different tasks.

Stdlib only, so the backend can import it without torch. ``fcntl`` makes it POSIX-only, which
is where the backend runs (Linux containers).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from training.shared.errors import ModelNotFound, RegistryError
from training.shared.retention import (
    PRUNED_FILE,
    PrunedVersion,
    PruneResult,
    RetentionPolicy,
    is_weight_file,
    versions_to_keep,
)

__all__ = [
    "DEFAULT_F1_TOLERANCE",
    "DEFAULT_STAGING_MAX_AGE_S",
    "REQUIRED_FILES",
    "HistoryEntry",
    "ModelRegistry",
    "PromotionDecision",
    "PublishResult",
    "Registry",
    "VersionInfo",
    "check_id",
    "decide_promotion",
    "new_version_id",
    "open_registry",
    "rollback_target",
    "validate_version_dir",
]

logger = logging.getLogger(__name__)

DEFAULT_F1_TOLERANCE = 0.02
"""How much lower (absolute macro-F1, 0–1 scale) a new version may score and still be promoted.

Out-of-fold F1 on a few hundred images moves by about this much between reruns."""
DEFAULT_STAGING_MAX_AGE_S = 24 * 3600
"""Seconds without any write after which a staging directory counts as abandoned."""
REQUIRED_FILES = ("config.json", "metrics.json")
"""Files a staging directory must hold (as JSON objects) to be published."""

_F1_EPSILON = 1e-9  # so "worse by exactly the tolerance" survives float rounding
_DIR_MODE = 0o755  # readable by a server running as another user than the training worker
_FILE_MODE = 0o644
_CURRENT_FILE = "current"
_HISTORY_FILE = "history.jsonl"
_LOCK_FILE = ".lock"
_PROMOTION_FILE = "promotion.json"
_SAFE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
_TIMESTAMP_ID_RE = re.compile(r"^(\d{8}-\d{6})-")

Action = Literal["promote", "rollback", "rejected"]


def new_version_id(now: datetime | None = None) -> str:
    """``YYYYMMDD-HHMMSS-xxxx`` (UTC time + 4 random hex digits): lexical order is time order.

    A naive ``now`` is taken as UTC.
    """
    now = datetime.now(UTC) if now is None else now
    now = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


# --- the promotion gate ---------------------------------------------------------------


@dataclass(frozen=True)
class PromotionDecision:
    """Whether a freshly published version becomes current, and why."""

    promote: bool
    reason: str


def decide_promotion(
    new_metrics: Mapping[str, Any],
    current_metrics: Mapping[str, Any] | None,
    *,
    tolerance: float = DEFAULT_F1_TOLERANCE,
) -> PromotionDecision:
    """Promote unless the new out-of-fold macro-F1 is worse than the current one by > tolerance.

    Both mappings follow the ``metrics.json`` contract (``mean.f1_macro``, ``classes``). No
    current version, or a different set of classes, always promotes (see the module docstring).
    """
    new_f1 = float(new_metrics["mean"]["f1_macro"])
    if current_metrics is None:
        return PromotionDecision(True, "no current version")
    new_classes, old_classes = set(new_metrics["classes"]), set(current_metrics["classes"])
    if new_classes != old_classes:
        added = ", ".join(sorted(new_classes - old_classes)) or "none"
        removed = ", ".join(sorted(old_classes - new_classes)) or "none"
        return PromotionDecision(
            True,
            f"class vocabulary changed (added: {added}; removed: {removed}); "
            "the current version cannot answer the new label config",
        )
    old_f1 = float(current_metrics["mean"]["f1_macro"])
    comparison = f"out-of-fold macro-F1 {new_f1:.4f} vs current {old_f1:.4f}"
    if new_f1 >= old_f1 - tolerance - _F1_EPSILON:
        return PromotionDecision(True, f"{comparison} (within tolerance {tolerance:g} or better)")
    return PromotionDecision(
        False, f"{comparison}: worse by more than the tolerance {tolerance:g}; kept, not promoted"
    )


# --- what the registry hands out --------------------------------------------------------


@dataclass(frozen=True)
class VersionInfo:
    """One published version, as listed by the registry."""

    version_id: str
    path: Path
    created: datetime | None
    f1_macro: float | None
    accuracy: float | None
    classes: tuple[str, ...]
    is_current: bool
    gate: Literal["promoted", "kept"] | None
    """The promotion gate's decision at publish time (a later manual promote overrides it)."""
    gate_reason: str | None
    pruned: bool = False
    """Retention deleted its weights: listed and inspectable, no longer servable."""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["created"] = self.created.isoformat() if self.created else None
        data["classes"] = list(self.classes)
        return data


@dataclass(frozen=True)
class PublishResult:
    """Outcome of :meth:`ModelRegistry.publish`."""

    version_id: str
    path: Path
    promoted: bool
    reason: str
    previous: str | None
    """The version that was current before the publish."""


@dataclass(frozen=True)
class HistoryEntry:
    """One line of ``history.jsonl``."""

    timestamp: str
    action: Action
    version: str
    previous: str | None
    reason: str


# --- the registry -----------------------------------------------------------------------


class Registry(Protocol):
    """What every registry answers: the folder (:class:`ModelRegistry`) and object storage
    (:class:`training.shared.registry_s3.S3Registry`); get one with :func:`open_registry`."""

    staging_dir: Path

    @property
    def location(self) -> str:
        """Where it lives, for messages (a folder or an ``s3://`` URL)."""
        ...

    def current(self) -> str | None: ...

    def version_path(self, version_id: str) -> Path:
        """A local folder holding the version's files (object storage: downloaded once)."""
        ...

    def get(self, version_id: str) -> VersionInfo: ...

    def list_versions(self) -> list[VersionInfo]: ...

    def history(self) -> list[HistoryEntry]: ...

    def staging(self, run_id: str = "run") -> Path: ...

    def publish(
        self,
        staging_path: str | os.PathLike[str],
        version_id: str | None = None,
        *,
        tolerance: float = DEFAULT_F1_TOLERANCE,
    ) -> PublishResult: ...

    def promote(self, version_id: str, reason: str = "manual") -> None: ...

    def rollback(self, reason: str = "manual rollback") -> str: ...

    def cleanup_staging(
        self, max_age_s: float = DEFAULT_STAGING_MAX_AGE_S, *, now: float | None = None
    ) -> Sequence[Path | str]: ...

    def prune(
        self,
        policy: RetentionPolicy | None = None,
        *,
        apply: bool = False,
        protect: Iterable[str] = (),
        now: datetime | None = None,
    ) -> PruneResult: ...


def open_registry(
    location: str | os.PathLike[str],
    *,
    endpoint_url: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Registry:
    """The registry at ``location``: a folder, or ``s3://bucket/prefix`` (object storage,
    reached at ``endpoint_url`` — MinIO — or AWS when ``None``; its staging folder and the
    downloaded weights live under ``cache_dir``/registry)."""
    text = os.fspath(location)
    if text.startswith("s3://"):
        from training.shared.registry_s3 import S3Registry

        if cache_dir is None:
            raise RegistryError(f"an s3:// registry ({text}) needs a local cache folder")
        return S3Registry(text, cache_dir=cache_dir, endpoint_url=endpoint_url)
    return ModelRegistry(text)


class ModelRegistry:
    """The versions under one ``MODEL_DIR``. Reads never lock; every change holds ``.lock``."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.versions_dir = self.root / "versions"
        self.staging_dir = self.root / ".staging"

    def __repr__(self) -> str:
        return f"ModelRegistry({str(self.root)!r})"

    @property
    def location(self) -> str:
        return str(self.root)

    # reading

    def current(self) -> str | None:
        """The id of the served version, or ``None`` when nothing was promoted yet."""
        try:
            text = (self.root / _CURRENT_FILE).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return text or None

    def version_path(self, version_id: str) -> Path:
        """Directory of ``version_id``; :class:`ModelNotFound` if there is none."""
        check_id(version_id, "version id")
        path = self.versions_dir / version_id
        if not path.is_dir():
            raise ModelNotFound(f"no model version {version_id!r} in {self.root}")
        return path

    def get(self, version_id: str) -> VersionInfo:
        """Summary of one version; :class:`ModelNotFound` if it does not exist."""
        return self._info(self.version_path(version_id), self.current())

    def list_versions(self) -> list[VersionInfo]:
        """All published versions, oldest first (staging directories are never included)."""
        if not self.versions_dir.is_dir():
            return []
        current = self.current()
        paths = sorted(
            p for p in self.versions_dir.iterdir() if p.is_dir() and _SAFE_ID_RE.match(p.name)
        )
        return [self._info(p, current) for p in paths]

    def history(self) -> list[HistoryEntry]:
        """Every recorded decision, oldest first. A torn last line (crash) is skipped."""
        try:
            lines = (self.root / _HISTORY_FILE).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entries.append(HistoryEntry(**json.loads(line)))
            except (ValueError, TypeError):
                logger.warning("skipping unreadable line %d of %s", number, _HISTORY_FILE)
        return entries

    # writing

    def staging(self, run_id: str = "run") -> Path:
        """A fresh, empty directory for one job to write a version into, then :meth:`publish`."""
        check_id(run_id, "run id")
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{run_id}-", dir=self.staging_dir))
        path.chmod(_DIR_MODE)  # mkdtemp makes it owner-only; the server may run as another user
        return path

    def publish(
        self,
        staging_path: str | os.PathLike[str],
        version_id: str | None = None,
        *,
        tolerance: float = DEFAULT_F1_TOLERANCE,
    ) -> PublishResult:
        """Move a finished staging directory into ``versions/`` and run the promotion gate.

        An incomplete staging directory (missing or unreadable config/metrics) is removed and
        :class:`RegistryError` raised; ``versions/`` is left untouched.
        """
        staging_path = Path(staging_path)
        if staging_path.resolve().parent != self.staging_dir.resolve():
            raise RegistryError(
                f"{staging_path} is not a staging directory of {self.root}; "
                "get one from ModelRegistry.staging()"
            )
        if version_id is not None:
            check_id(version_id, "version id")
        with self._lock():
            if not staging_path.is_dir():
                raise RegistryError(f"staging directory {staging_path} no longer exists")
            try:
                metrics = validate_version_dir(staging_path)
            except RegistryError as exc:
                shutil.rmtree(staging_path, ignore_errors=True)
                raise RegistryError(f"{exc}; staging directory removed") from exc
            if version_id is None:
                version_id = new_version_id()
                while (self.versions_dir / version_id).exists():
                    version_id = new_version_id()
            target = self.versions_dir / version_id
            if target.exists():
                raise RegistryError(f"model version {version_id!r} already exists")

            previous = self.current()
            decision = self._decide(metrics, previous, tolerance)
            write_json(
                staging_path / _PROMOTION_FILE,
                {
                    "version": version_id,
                    "published_at": now_iso(),
                    "decision": "promoted" if decision.promote else "kept",
                    "reason": decision.reason,
                    "compared_with": previous,
                    "tolerance": tolerance,
                },
            )
            _fsync_tree(staging_path)
            self.versions_dir.mkdir(parents=True, exist_ok=True)
            os.rename(staging_path, target)
            _fsync_dir(self.versions_dir)
            if decision.promote:
                self._set_current(version_id)
            action: Action = "promote" if decision.promote else "rejected"
            self._append_history(action, version_id, previous, decision.reason)
        logger.info(
            "published model version %s (%s): %s",
            version_id,
            "now current" if decision.promote else "not promoted",
            decision.reason,
        )
        return PublishResult(version_id, target, decision.promote, decision.reason, previous)

    def promote(self, version_id: str, reason: str = "manual") -> None:
        """Make ``version_id`` current, bypassing the gate (it must exist and be complete)."""
        with self._lock():
            path = self.version_path(version_id)
            validate_version_dir(path)
            _check_not_pruned(path)
            previous = self.current()
            if previous == version_id:
                logger.info("model version %s is already current", version_id)
                return
            self._set_current(version_id)
            self._append_history("promote", version_id, previous, reason)
        logger.info("promoted model version %s (was %s): %s", version_id, previous, reason)

    def rollback(self, reason: str = "manual rollback") -> str:
        """Make the version that was current before the present one current again; its id.

        Follows the promotion history like a stack, so repeated rollbacks walk further back.
        """
        with self._lock():
            current = self.current()
            if current is None:
                raise RegistryError("no current model version, nothing to roll back")
            target = self._rollback_target(current)
            if target is None:
                raise RegistryError(f"no version was current before {current}; cannot roll back")
            try:
                path = self.version_path(target)
            except ModelNotFound as exc:
                raise ModelNotFound(
                    f"the previous version {target} no longer exists; promote one explicitly"
                ) from exc
            validate_version_dir(path)
            _check_not_pruned(path)
            self._set_current(target)
            self._append_history("rollback", target, current, reason)
        logger.info("rolled back from model version %s to %s", current, target)
        return target

    def cleanup_staging(
        self, max_age_s: float = DEFAULT_STAGING_MAX_AGE_S, *, now: float | None = None
    ) -> list[Path]:
        """Remove staging directories nothing was written to for ``max_age_s``; their paths.

        Age counts from the newest file inside, so a long job still writing is left alone.
        """
        if not self.staging_dir.is_dir():
            return []
        now = time.time() if now is None else now
        removed = []
        with self._lock():
            for path in sorted(self.staging_dir.iterdir()):
                if now - newest_mtime(path) < max_age_s:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
        if removed:
            logger.info("removed %d abandoned staging director(ies)", len(removed))
        return removed

    def prune(
        self,
        policy: RetentionPolicy | None = None,
        *,
        apply: bool = False,
        protect: Iterable[str] = (),
        now: datetime | None = None,
    ) -> PruneResult:
        """Delete the weights of the versions retention does not keep; a dry run by default.

        Holds the lock throughout, so ``current`` cannot move while the kept set is decided
        and applied; ``current`` and the version before it are always kept (see
        :mod:`training.shared.retention`). A version already pruned is finished if a crash
        left weight files behind.
        """
        policy = policy or RetentionPolicy()
        if not self.versions_dir.is_dir():
            return PruneResult(apply, ())
        with self._lock():
            infos = self.list_versions()
            keep = versions_to_keep(
                [(v.version_id, v.created) for v in infos],
                self._made_current(),
                self.current(),
                policy,
                protect=protect,
                now=now,
            )
            pruned = []
            for info in infos:
                if info.version_id in keep:
                    continue
                files = _weight_files(info.path)
                if not files:
                    continue
                size = sum(_size(f) for f in files)
                pruned.append(PrunedVersion(info.version_id, size, len(files)))
                if apply:
                    self._prune_version(info.path, files, size)
        if apply and pruned:
            logger.info(
                "pruned the weights of %d model version(s), %.1f MB freed",
                len(pruned),
                sum(p.freed_bytes for p in pruned) / 1e6,
            )
        return PruneResult(apply, tuple(pruned), keep)

    # helpers

    def _prune_version(self, path: Path, files: list[Path], size: int) -> None:
        marker = path / PRUNED_FILE
        if not marker.exists():  # the marker first: a crash mid-way leaves it marked pruned
            write_json(
                marker,
                {"pruned_at": now_iso(), "freed_bytes": size, "files": len(files)},
            )
            _fsync_tree(path)
        for file in files:
            file.unlink(missing_ok=True)
        weights = path / "weights"
        if weights.is_dir():
            shutil.rmtree(weights, ignore_errors=True)

    def _made_current(self) -> list[str]:
        return [e.version for e in self.history() if e.action in ("promote", "rollback")]

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / _LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _decide(
        self, metrics: Mapping[str, Any], current: str | None, tolerance: float
    ) -> PromotionDecision:
        if current is None:
            return decide_promotion(metrics, None, tolerance=tolerance)
        try:
            current_metrics = validate_version_dir(self.versions_dir / current)
        except RegistryError as exc:
            return PromotionDecision(True, f"current version {current} is unusable ({exc})")
        return decide_promotion(metrics, current_metrics, tolerance=tolerance)

    def _set_current(self, version_id: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".current-", suffix=".tmp", dir=self.root)
        try:
            os.fchmod(fd, _FILE_MODE)  # mkstemp makes it owner-only
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(version_id + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / _CURRENT_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)

    def _append_history(
        self, action: Action, version: str, previous: str | None, reason: str
    ) -> None:
        entry = HistoryEntry(now_iso(), action, version, previous, reason)
        with open(self.root / _HISTORY_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(entry)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _rollback_target(self, current: str) -> str | None:
        return rollback_target(self.history(), current)

    def _info(self, path: Path, current: str | None) -> VersionInfo:
        metrics = _read_json_object(path / "metrics.json")
        promotion = _read_json_object(path / _PROMOTION_FILE)
        mean = metrics.get("mean")
        if not isinstance(mean, dict):
            mean = {}
        decision = promotion.get("decision")
        return VersionInfo(
            version_id=path.name,
            path=path,
            created=_created(path.name, promotion),
            f1_macro=_number_or_none(mean.get("f1_macro")),
            accuracy=_number_or_none(mean.get("accuracy")),
            classes=tuple(str(c) for c in metrics.get("classes") or ()),
            is_current=path.name == current,
            gate=decision if decision in ("promoted", "kept") else None,
            gate_reason=promotion.get("reason"),
            pruned=(path / PRUNED_FILE).is_file(),
        )


# --- module helpers -----------------------------------------------------------------------


def rollback_target(history: Iterable[HistoryEntry], current: str) -> str | None:
    """The version a rollback from ``current`` returns to: the promotion history walked like a
    stack (repeated rollbacks walk further back); ``None`` if there is none."""
    stack: list[str] = []
    for entry in history:
        if entry.action == "promote":
            stack.append(entry.version)
        elif entry.action == "rollback":
            if stack:
                stack.pop()
            while stack and stack[-1] != entry.version:
                stack.pop()
            if not stack:
                stack.append(entry.version)
    if not stack or stack[-1] != current:  # pointer changed outside the registry
        stack.append(current)
    return stack[-2] if len(stack) >= 2 else None


def check_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not _SAFE_ID_RE.match(value):
        raise RegistryError(
            f"invalid {what} {value!r}: use letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (at most 80 characters)"
        )


def _check_not_pruned(path: Path) -> None:
    if (path / PRUNED_FILE).exists():
        raise RegistryError(
            f"model version {path.name} was pruned (its weights were deleted by retention); "
            "its metrics and report remain, but it cannot be served"
        )


def _weight_files(path: Path) -> list[Path]:
    """The checkpoint files of one version directory (see :func:`is_weight_file`)."""
    files = []
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            file = Path(dirpath) / name
            if is_weight_file(file.relative_to(path).as_posix()) and not file.is_symlink():
                files.append(file)
    return sorted(files)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def validate_version_dir(path: Path) -> dict[str, Any]:
    """Check the files the registry relies on; returns the parsed metrics."""
    parsed = {}
    for name in REQUIRED_FILES:
        file = path / name
        if not file.is_file():
            raise RegistryError(f"{path.name}: {name} is missing; the version is incomplete")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RegistryError(f"{path.name}: {name} is not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise RegistryError(f"{path.name}: {name} must hold a JSON object")
        parsed[name] = data
    config, metrics = parsed["config.json"], parsed["metrics.json"]
    mean = metrics.get("mean")
    f1 = _number_or_none(mean.get("f1_macro")) if isinstance(mean, dict) else None
    if f1 is None or not 0.0 <= f1 <= 1.0:
        raise RegistryError(f"{path.name}: metrics.json needs mean.f1_macro as a number in [0, 1]")
    classes = metrics.get("classes")
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise RegistryError(f"{path.name}: metrics.json needs classes as distinct names")
    if "classes" in config and config["classes"] != classes:
        raise RegistryError(f"{path.name}: config.json and metrics.json list different classes")
    return metrics


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError):
        logger.warning("unreadable %s in model version %s", path.name, path.parent.name)
        return {}
    return data if isinstance(data, dict) else {}


def _number_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _created(version_id: str, promotion: Mapping[str, Any]) -> datetime | None:
    with contextlib.suppress(TypeError, ValueError):
        return datetime.fromisoformat(promotion["published_at"])
    if match := _TIMESTAMP_ID_RE.match(version_id):
        with contextlib.suppress(ValueError):
            return datetime.strptime(match.group(1), "%Y%m%d-%H%M%S").replace(tzinfo=UTC)
    return None


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk before it is renamed into view."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    # Some filesystems (network mounts) refuse fsync on a directory; the rename stays atomic.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        logger.debug("fsync of directory %s not supported", path)
    finally:
        os.close(fd)
