"""The model registry in object storage (S3 API: AWS S3, MinIO, ...), for several hosts.

Selected by a registry location ``s3://bucket/prefix`` (:func:`training.shared.registry.
open_registry`); it answers the same calls as the folder registry
(:class:`training.shared.registry.ModelRegistry`), with the same guarantees.

Layout under ``s3://bucket/prefix/``::

    versions/<version_id>/<file>   a version's files, uploaded by publish (weights, config,
                                   metrics, report ...); invisible until committed
    registry.json                  THE commit point: every published version (its promotion
                                   record, metrics summary, file list, pruned marker),
                                   ``current`` and the history, in one small JSON object

Why this shape:

* **A reader never sees half a version.** :meth:`S3Registry.publish` uploads every file
  first, then adds the version to ``registry.json``; readers list versions from
  ``registry.json`` only. A publisher that dies mid-upload leaves objects no reader lists,
  which :meth:`S3Registry.cleanup_staging` deletes once they are old.
* **Two publishers cannot corrupt ``current``.** ``registry.json`` is only ever replaced
  by a *conditional* PUT: ``If-Match: <the ETag it was read with>`` (``If-None-Match: *``
  to create it). S3 (since 2024-11) and MinIO refuse the write with 412 when anyone wrote
  in between; the loser re-reads, re-runs the promotion gate against the new ``current``
  and tries again. Pointer, version list and history change together in one object, so
  there is no window in which one is updated and the other is not. A server that ignores
  conditional writes would silently lose updates, so the first write of a process checks
  that the server refuses a second ``If-None-Match: *`` PUT and stops with a clear error if
  it does not.
* **The backend reads local files.** :meth:`S3Registry.version_path` downloads a version
  once into a local cache folder (into a temporary folder renamed into place, so a
  half-download is never used) and returns that folder, so the predictor loads from a path
  exactly as with the folder registry. ``current`` is polled with a conditional GET
  (``If-None-Match``): an unchanged ``registry.json`` costs a 304 and no body.
* **Staging is local.** Training writes into ``<cache>/registry/.staging`` as before; only
  publish talks to the server.

Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, a profile, an instance role), never from valve-id's settings; the
endpoint of a non-AWS server (MinIO) is passed in. Every server or credential problem
becomes one :class:`RegistryError` line; the traceback is logged at debug level only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from training.shared.errors import ModelNotFound, RegistryError
from training.shared.registry import (
    DEFAULT_F1_TOLERANCE,
    DEFAULT_STAGING_MAX_AGE_S,
    Action,
    HistoryEntry,
    PromotionDecision,
    PublishResult,
    VersionInfo,
    check_id,
    decide_promotion,
    new_version_id,
    newest_mtime,
    now_iso,
    rollback_target,
    validate_version_dir,
    write_json,
)
from training.shared.retention import (
    PRUNED_FILE,
    PrunedVersion,
    PruneResult,
    RetentionPolicy,
    is_weight_file,
    versions_to_keep,
)

__all__ = ["S3Registry", "parse_s3_url"]

logger = logging.getLogger(__name__)

STATE_KEY = "registry.json"
"""The one object every change is a conditional write of (see the module docstring)."""
CAS_ATTEMPTS = 20
"""Conditional writes tried before giving up (each loser waits a little, with jitter)."""
CACHE_KEEP_VERSIONS = 3
"""Downloaded versions kept in the local cache (the current one, and two to roll back to)."""

_T = TypeVar("_T")
_PROMOTION_FILE = "promotion.json"
_COMPLETE_MARKER = ".complete"
_PRECONDITION_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict"})
_MISSING_CODES = frozenset({"NoSuchKey", "404", "NotFound"})


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix/")`` (prefix may be empty)."""
    if not url.startswith("s3://"):
        raise RegistryError(f"{url!r} is not an s3:// URL")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise RegistryError(f"{url!r} names no bucket; use s3://bucket/prefix")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


class S3Registry:
    """The versions under one ``s3://bucket/prefix``; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        cache_dir: str | os.PathLike[str],
        endpoint_url: str | None = None,
        client: Any = None,
    ) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        local = Path(cache_dir) / "registry"
        self.staging_dir = local / ".staging"
        self.cache_root = local / self.bucket / (self.prefix.strip("/") or "_")
        self._endpoint_url = endpoint_url or None
        self._client = client
        self._state_cache: tuple[str, dict[str, Any]] | None = None  # (ETag, state)
        self._conditional_checked = False

    def __repr__(self) -> str:
        return f"S3Registry({self.root!r})"

    @property
    def location(self) -> str:
        return self.root

    # --- reading ----------------------------------------------------------------------

    def current(self) -> str | None:
        """The id of the served version, or ``None`` when nothing was promoted yet."""
        current = self._state().get("current")
        return current if isinstance(current, str) and current else None

    def version_path(self, version_id: str) -> Path:
        """A local folder holding ``version_id``'s files, downloaded once into the cache."""
        check_id(version_id, "version id")
        entry = self._entry(self._state(), version_id)
        target = self.cache_root / version_id
        if (target / _COMPLETE_MARKER).is_file():
            return target
        self._download(version_id, entry, target, weights=True)
        self._evict_cache(keep=version_id)
        return target

    def get(self, version_id: str) -> VersionInfo:
        """Summary of one version (its small files fetched for inspection, never weights)."""
        check_id(version_id, "version id")
        state = self._state()
        entry = self._entry(state, version_id)
        full = self.cache_root / version_id
        if (full / _COMPLETE_MARKER).is_file():
            return self._info(version_id, entry, state, full)
        records = self.cache_root / ".records" / version_id
        if not (records / _COMPLETE_MARKER).is_file():
            self._download(version_id, entry, records, weights=False)
        return self._info(version_id, entry, state, records)

    def list_versions(self) -> list[VersionInfo]:
        """All published versions, oldest first (uncommitted uploads are never included)."""
        state = self._state()
        versions = state.get("versions") or {}
        return [
            self._info(vid, versions[vid], state, self.cache_root / vid) for vid in sorted(versions)
        ]

    def history(self) -> list[HistoryEntry]:
        """Every recorded decision, oldest first."""
        entries = []
        for raw in self._state().get("history") or []:
            with contextlib.suppress(TypeError):
                entries.append(HistoryEntry(**raw))
        return entries

    # --- writing ----------------------------------------------------------------------

    def staging(self, run_id: str = "run") -> Path:
        """A fresh, empty local directory for one job to write a version into."""
        check_id(run_id, "run id")
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f"{run_id}-", dir=self.staging_dir))
        path.chmod(0o755)
        return path

    def publish(
        self,
        staging_path: str | os.PathLike[str],
        version_id: str | None = None,
        *,
        tolerance: float = DEFAULT_F1_TOLERANCE,
    ) -> PublishResult:
        """Upload a finished staging directory, then commit it (gate included) in one
        conditional write of ``registry.json``. The staging folder becomes the version's
        local cached copy."""
        staging_path = Path(staging_path)
        if staging_path.resolve().parent != self.staging_dir.resolve():
            raise RegistryError(
                f"{staging_path} is not a staging directory of {self.root}; "
                "get one from the registry's staging()"
            )
        if not staging_path.is_dir():
            raise RegistryError(f"staging directory {staging_path} no longer exists")
        try:
            metrics = validate_version_dir(staging_path)
        except RegistryError as exc:
            shutil.rmtree(staging_path, ignore_errors=True)
            raise RegistryError(f"{exc}; staging directory removed") from exc
        if version_id is None:
            version_id = new_version_id()
        check_id(version_id, "version id")
        if version_id in (self._state().get("versions") or {}):
            raise RegistryError(f"model version {version_id!r} already exists")
        self._check_conditional_writes()

        files = {}
        for file in sorted(p for p in staging_path.rglob("*") if p.is_file()):
            rel = file.relative_to(staging_path).as_posix()
            if rel == _PROMOTION_FILE:
                continue  # the promotion record lives in registry.json
            self._call(
                "upload",
                self._client_().upload_file,
                str(file),
                self.bucket,
                self._version_key(version_id, rel),
            )
            files[rel] = file.stat().st_size
        summary = {"mean": metrics.get("mean"), "classes": metrics.get("classes")}

        def commit(state: dict[str, Any]) -> tuple[PromotionDecision, str | None]:
            versions = state.setdefault("versions", {})
            if version_id in versions:
                raise RegistryError(f"model version {version_id!r} already exists")
            previous = state.get("current") or None
            decision = _decide(summary, previous, versions, tolerance)
            versions[version_id] = {
                "published_at": now_iso(),
                "decision": "promoted" if decision.promote else "kept",
                "reason": decision.reason,
                "compared_with": previous,
                "tolerance": tolerance,
                "metrics": summary,
                "files": files,
            }
            if decision.promote:
                state["current"] = version_id
            action: Action = "promote" if decision.promote else "rejected"
            _append_history(state, action, version_id, previous, decision.reason)
            return decision, previous

        decision, previous = self._commit(commit)
        target = self.cache_root / version_id
        try:  # what was just uploaded is this host's cached copy: no download to serve it
            state = self._state()
            write_json(staging_path / _PROMOTION_FILE, _promotion_record(version_id, state))
            (staging_path / _COMPLETE_MARKER).touch()
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(staging_path, target)
        except OSError:
            shutil.rmtree(staging_path, ignore_errors=True)
        logger.info(
            "published model version %s to %s (%s): %s",
            version_id,
            self.root,
            "now current" if decision.promote else "not promoted",
            decision.reason,
        )
        return PublishResult(version_id, target, decision.promote, decision.reason, previous)

    def promote(self, version_id: str, reason: str = "manual") -> None:
        """Make ``version_id`` current, bypassing the gate (it must exist, with weights)."""
        check_id(version_id, "version id")
        self._check_conditional_writes()

        def change(state: dict[str, Any]) -> str | None:
            entry = self._entry(state, version_id)
            _check_servable(version_id, entry)
            previous = state.get("current") or None
            if previous == version_id:
                return previous
            state["current"] = version_id
            _append_history(state, "promote", version_id, previous, reason)
            return previous

        previous = self._commit(change)
        logger.info("promoted model version %s (was %s): %s", version_id, previous, reason)

    def rollback(self, reason: str = "manual rollback") -> str:
        """Make the version that was current before the present one current again; its id."""
        self._check_conditional_writes()

        def change(state: dict[str, Any]) -> str:
            current = state.get("current") or None
            if current is None:
                raise RegistryError("no current model version, nothing to roll back")
            history = [HistoryEntry(**raw) for raw in state.get("history") or []]
            target = rollback_target(history, current)
            if target is None:
                raise RegistryError(f"no version was current before {current}; cannot roll back")
            entry = (state.get("versions") or {}).get(target)
            if entry is None:
                raise ModelNotFound(
                    f"the previous version {target} no longer exists; promote one explicitly"
                )
            _check_servable(target, entry)
            state["current"] = target
            _append_history(state, "rollback", target, current, reason)
            return target

        target = self._commit(change)
        logger.info("rolled back model version in %s to %s", self.root, target)
        return target

    def cleanup_staging(
        self, max_age_s: float = DEFAULT_STAGING_MAX_AGE_S, *, now: float | None = None
    ) -> list[str]:
        """Remove abandoned local staging folders and uploads no commit ever listed (a
        publisher that died mid-upload), both untouched for ``max_age_s``."""
        now = time.time() if now is None else now
        removed: list[str] = []
        if self.staging_dir.is_dir():
            for path in sorted(self.staging_dir.iterdir()):
                if path.is_dir() and now - newest_mtime(path) >= max_age_s:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(str(path))
        committed = set(self._state().get("versions") or {})
        orphans: dict[str, list[str]] = {}
        young: set[str] = set()
        for obj in self._objects(f"{self.prefix}versions/"):
            version = obj["Key"][len(f"{self.prefix}versions/") :].split("/", 1)[0]
            if version in committed:
                continue
            if now - obj["LastModified"].timestamp() < max_age_s:
                young.add(version)
            orphans.setdefault(version, []).append(obj["Key"])
        for version, keys in sorted(orphans.items()):
            if version in young:
                continue  # a publisher may still be uploading it
            self._delete(keys)
            removed.append(f"{self.root}/versions/{version}/")
        if removed:
            logger.info("removed %d abandoned staging folder(s) or upload(s)", len(removed))
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

        The versions are marked pruned in ``registry.json`` (a conditional write, so never
        against a ``current`` that moved meanwhile) before any object is deleted; a prune
        that dies half-way is finished by the next one.
        """
        policy = policy or RetentionPolicy()
        protect = tuple(protect)

        def plan(state: dict[str, Any]) -> tuple[dict[str, str], list[PrunedVersion]]:
            versions = state.get("versions") or {}
            history = [HistoryEntry(**raw) for raw in state.get("history") or []]
            keep = versions_to_keep(
                [(vid, _published(e)) for vid, e in versions.items()],
                [e.version for e in history if e.action in ("promote", "rollback")],
                state.get("current") or None,
                policy,
                protect=protect,
                now=now,
            )
            pruned = []
            for vid in sorted(versions):
                entry = versions[vid]
                weights = {r: s for r, s in (entry.get("files") or {}).items() if is_weight_file(r)}
                if vid in keep or (entry.get("pruned") and not weights):
                    continue
                pruned_before = entry.get("pruned") or {}
                pruned.append(PrunedVersion(vid, sum(weights.values()), len(weights)))
                if apply:  # marked first; the objects go after the commit
                    entry["pruned"] = pruned_before or {
                        "pruned_at": now_iso(),
                        "freed_bytes": sum(weights.values()),
                        "files": len(weights),
                    }
            return keep, pruned

        if apply:
            self._check_conditional_writes()
            keep, pruned = self._commit(plan)
        else:
            keep, pruned = plan(copy.deepcopy(self._state()))
        if apply and pruned:
            self._delete_weights([p.version_id for p in pruned])
            logger.info(
                "pruned the weights of %d model version(s) in %s, %.1f MB freed",
                len(pruned),
                self.root,
                sum(p.freed_bytes for p in pruned) / 1e6,
            )
        return PruneResult(apply, tuple(pruned), keep)

    # --- helpers ----------------------------------------------------------------------

    def _client_(self) -> Any:
        if self._client is None:
            try:
                import boto3
                from botocore.config import Config
            except ImportError as exc:  # pragma: no cover - boto3 is a dependency
                raise RegistryError("an s3:// registry needs boto3 (pip install boto3)") from exc
            config = Config(
                retries={"max_attempts": 3, "mode": "standard"},
                connect_timeout=5,
                read_timeout=60,
            )
            session = boto3.session.Session()  # its own: credentials as the environment is now
            self._client = session.client("s3", endpoint_url=self._endpoint_url, config=config)
        return self._client

    def _call(self, what: str, func: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """One S3 call; every failure becomes one readable :class:`RegistryError` line."""
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            message = _explain(exc, self.root, self._endpoint_url)
            if message is None:
                raise
            logger.debug("S3 %s on %s failed", what, self.root, exc_info=True)
            raise RegistryError(message) from exc

    def _state(self) -> dict[str, Any]:
        """``registry.json`` as last read; re-read with ``If-None-Match`` (304 if unchanged)."""
        return self._read_state()[1]

    def _read_state(self) -> tuple[str | None, dict[str, Any]]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self.prefix + STATE_KEY}
        if self._state_cache is not None:
            kwargs["IfNoneMatch"] = self._state_cache[0]
        try:
            response = self._client_().get_object(**kwargs)
        except Exception as exc:
            code = _error_code(exc)
            if code in ("304", "NotModified") and self._state_cache is not None:
                return self._state_cache[0], self._state_cache[1]
            if code in _MISSING_CODES:
                self._state_cache = None
                return None, {}
            message = _explain(exc, self.root, self._endpoint_url)
            if message is None:
                raise
            logger.debug("reading %s/%s failed", self.root, STATE_KEY, exc_info=True)
            raise RegistryError(message) from exc
        body = response["Body"].read()
        try:
            state = json.loads(body)
        except ValueError as exc:
            raise RegistryError(f"{self.root}/{STATE_KEY} is not valid JSON ({exc})") from exc
        if not isinstance(state, dict):
            raise RegistryError(f"{self.root}/{STATE_KEY} must hold a JSON object")
        etag = str(response["ETag"])
        self._state_cache = (etag, state)
        return etag, state

    def _commit(self, change: Callable[[dict[str, Any]], _T]) -> _T:
        """Apply ``change`` to a fresh copy of the state and write it back only if nobody
        wrote in between (compare-and-swap on the ETag); retried on a lost race."""
        for attempt in range(CAS_ATTEMPTS):
            etag, state = self._read_state()
            new_state = copy.deepcopy(state)
            new_state.setdefault("format", 1)
            result = change(new_state)
            condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
            try:
                response = self._client_().put_object(
                    Bucket=self.bucket,
                    Key=self.prefix + STATE_KEY,
                    Body=json.dumps(new_state, indent=1).encode(),
                    ContentType="application/json",
                    **condition,
                )
            except Exception as exc:
                if _error_code(exc) in _PRECONDITION_CODES:
                    logger.info("%s changed meanwhile; retrying (%d)", STATE_KEY, attempt + 1)
                    time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))
                    continue
                message = _explain(exc, self.root, self._endpoint_url)
                if message is None:
                    raise
                logger.debug("writing %s/%s failed", self.root, STATE_KEY, exc_info=True)
                raise RegistryError(message) from exc
            self._state_cache = (str(response["ETag"]), new_state)
            return result
        raise RegistryError(
            f"{self.root}/{STATE_KEY} kept changing during {CAS_ATTEMPTS} attempts; try again"
        )

    def _check_conditional_writes(self) -> None:
        """Refuse to write to a server that ignores ``If-None-Match`` (lost updates)."""
        if self._conditional_checked:
            return
        key = f"{self.prefix}.probe/{secrets.token_hex(8)}"
        client = self._client_()
        self._call(
            "probe", client.put_object, Bucket=self.bucket, Key=key, Body=b"1", IfNoneMatch="*"
        )
        try:
            client.put_object(Bucket=self.bucket, Key=key, Body=b"2", IfNoneMatch="*")
        except Exception as exc:
            if _error_code(exc) not in _PRECONDITION_CODES:
                raise RegistryError(
                    _explain(exc, self.root, self._endpoint_url) or str(exc)
                ) from exc
        else:
            raise RegistryError(
                f"the S3 server behind {self.root} ignores conditional writes "
                "(If-None-Match); two publishers could overwrite each other's `current`, "
                "so valve-id refuses to write there"
            )
        finally:
            with contextlib.suppress(Exception):
                client.delete_object(Bucket=self.bucket, Key=key)
        self._conditional_checked = True

    def _entry(self, state: Mapping[str, Any], version_id: str) -> dict[str, Any]:
        entry = (state.get("versions") or {}).get(version_id)
        if not isinstance(entry, dict):
            raise ModelNotFound(f"no model version {version_id!r} in {self.root}")
        return entry

    def _version_key(self, version_id: str, rel: str) -> str:
        return f"{self.prefix}versions/{version_id}/{rel}"

    def _download(
        self, version_id: str, entry: Mapping[str, Any], target: Path, *, weights: bool
    ) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version_id}-", dir=target.parent))
        try:
            for rel in entry.get("files") or {}:
                if is_weight_file(rel) and (not weights or entry.get("pruned")):
                    continue
                local = tmp / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                self._call(
                    "download",
                    self._client_().download_file,
                    self.bucket,
                    self._version_key(version_id, rel),
                    str(local),
                )
            write_json(tmp / _PROMOTION_FILE, _promotion_record(version_id, self._state()))
            if entry.get("pruned"):
                write_json(tmp / PRUNED_FILE, entry["pruned"])
            (tmp / _COMPLETE_MARKER).touch()
            tmp.chmod(0o755)
            if target.exists():  # an older partial or records-only copy: replace it
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / _COMPLETE_MARKER).is_file():  # not another process's copy
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("downloaded model version %s from %s into %s", version_id, self.root, target)

    def _evict_cache(self, keep: str) -> None:
        """Keep the :data:`CACHE_KEEP_VERSIONS` most recently downloaded versions locally."""
        with contextlib.suppress(OSError, RegistryError):
            spared = {keep, self.current()}
            cached = sorted(
                (p for p in self.cache_root.iterdir() if (p / _COMPLETE_MARKER).is_file()),
                key=lambda p: (p / _COMPLETE_MARKER).stat().st_mtime,
                reverse=True,
            )
            for path in cached[CACHE_KEEP_VERSIONS:]:
                if path.name not in spared:
                    shutil.rmtree(path, ignore_errors=True)

    def _objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self._client_().get_paginator("list_objects_v2")
        pages = self._call(
            "list", lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=prefix))
        )
        for page in pages:
            yield from page.get("Contents") or []

    def _delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            self._call(
                "delete",
                self._client_().delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )

    def _delete_weights(self, version_ids: list[str]) -> None:
        for version_id in version_ids:
            prefix = f"{self.prefix}versions/{version_id}/"
            keys = [
                o["Key"] for o in self._objects(prefix) if is_weight_file(o["Key"][len(prefix) :])
            ]
            self._delete(keys)
            shutil.rmtree(self.cache_root / version_id, ignore_errors=True)

        def drop_weight_files(state: dict[str, Any]) -> None:
            for version_id in version_ids:
                entry = (state.get("versions") or {}).get(version_id)
                if isinstance(entry, dict) and entry.get("pruned"):
                    files = entry.get("files") or {}
                    entry["files"] = {r: s for r, s in files.items() if not is_weight_file(r)}

        self._commit(drop_weight_files)

    def _info(
        self, version_id: str, entry: Mapping[str, Any], state: Mapping[str, Any], path: Path
    ) -> VersionInfo:
        metrics = entry.get("metrics") or {}
        mean = metrics.get("mean")
        if not isinstance(mean, dict):
            mean = {}
        decision = entry.get("decision")
        return VersionInfo(
            version_id=version_id,
            path=path,
            created=_published(entry),
            f1_macro=_number(mean.get("f1_macro")),
            accuracy=_number(mean.get("accuracy")),
            classes=tuple(str(c) for c in metrics.get("classes") or ()),
            is_current=version_id == state.get("current"),
            gate=decision if decision in ("promoted", "kept") else None,
            gate_reason=entry.get("reason"),
            pruned=bool(entry.get("pruned")),
        )


# --- module helpers ------------------------------------------------------------------------


def _decide(
    metrics: Mapping[str, Any],
    current: str | None,
    versions: Mapping[str, Any],
    tolerance: float,
) -> PromotionDecision:
    if current is None:
        return decide_promotion(metrics, None, tolerance=tolerance)
    entry = versions.get(current)
    current_metrics = entry.get("metrics") if isinstance(entry, dict) else None
    try:
        return decide_promotion(metrics, current_metrics, tolerance=tolerance)
    except (KeyError, TypeError, ValueError) as exc:
        return PromotionDecision(True, f"current version {current} is unusable ({exc!r})")


def _check_servable(version_id: str, entry: Mapping[str, Any]) -> None:
    if entry.get("pruned"):
        raise RegistryError(
            f"model version {version_id} was pruned (its weights were deleted by retention); "
            "its metrics and report remain, but it cannot be served"
        )


def _append_history(
    state: dict[str, Any], action: Action, version: str, previous: str | None, reason: str
) -> None:
    entry = HistoryEntry(now_iso(), action, version, previous, reason)
    state.setdefault("history", []).append(asdict(entry))


def _promotion_record(version_id: str, state: Mapping[str, Any]) -> dict[str, Any]:
    entry = (state.get("versions") or {}).get(version_id) or {}
    keys = ("published_at", "decision", "reason", "compared_with", "tolerance")
    return {"version": version_id, **{k: entry.get(k) for k in keys}}


def _published(entry: Mapping[str, Any]) -> datetime | None:
    with contextlib.suppress(TypeError, ValueError):
        return datetime.fromisoformat(entry["published_at"])
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        error = response.get("Error") or {}
        code = str(error.get("Code") or "")
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return code or str(status or "")
    return ""


def _explain(exc: BaseException, root: str, endpoint: str | None) -> str | None:
    """One line for a boto3/botocore failure, or ``None`` when it is not one of theirs."""
    try:
        from botocore import exceptions as bex
    except ImportError:  # pragma: no cover
        return None
    where = f"{root} (endpoint {endpoint or 'AWS'})"
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        return (
            f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
        )
    if isinstance(exc, bex.EndpointConnectionError | bex.ConnectTimeoutError):
        return f"cannot reach the S3 server for {where}: {exc}"
    if isinstance(exc, bex.ClientError):
        code = _error_code(exc)
        if code in ("NoSuchBucket",):
            return f"the bucket of {root} does not exist (endpoint {endpoint or 'AWS'})"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403"):
            return f"the S3 server refused the credentials for {where} ({code})"
        if code in _MISSING_CODES:
            return f"an object of {root} is missing ({code}); the registry may be damaged"
        return f"S3 request to {where} failed: {code or exc}"
    if isinstance(exc, bex.BotoCoreError):
        return f"S3 request to {where} failed: {exc}"
    return None
