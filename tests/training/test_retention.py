"""Retention of the local registry (training.shared.retention + ModelRegistry.prune)."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from training.fitting.jobs import prune_after_run
from training.shared.errors import RegistryError
from training.shared.registry import ModelRegistry
from training.shared.retention import (
    PRUNED_FILE,
    RetentionPolicy,
    is_weight_file,
    versions_to_keep,
)

CLASSES = ["a", "b"]
WEIGHT_BYTES = 3 * 1024 * 1024  # "a few MB" per fold file
RECORD_FILES = ("config.json", "metrics.json", "report.html", "promotion.json")


def _publish(registry: ModelRegistry, version_id: str, f1: float, folds: int = 1) -> None:
    staging = registry.staging("t")
    (staging / "config.json").write_text(json.dumps({"classes": CLASSES}))
    metrics = {"mean": {"f1_macro": f1, "accuracy": f1}, "classes": CLASSES}
    (staging / "metrics.json").write_text(json.dumps(metrics))
    (staging / "report.html").write_text("<html>report</html>")
    (staging / "weights").mkdir()
    for fold in range(folds):
        (staging / "weights" / f"fold_{fold}.pt").write_bytes(b"\0" * WEIGHT_BYTES)
    (staging / "oof").mkdir()
    (staging / "oof" / "fold_0.npz").write_bytes(b"oof")
    registry.publish(staging, version_id=version_id)


def _vid(i: int) -> str:
    return f"20261201-{i // 60:04d}{i % 60:02d}-{i:04x}"


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _has_weights(registry: ModelRegistry, version_id: str) -> bool:
    return (registry.versions_dir / version_id / "weights" / "fold_0.pt").is_file()


# --- the rule -------------------------------------------------------------------------


def test_weight_files_are_checkpoints_only() -> None:
    assert is_weight_file("weights/fold_0.pt")
    assert is_weight_file("weights/anything.bin")
    assert is_weight_file("extra/model.safetensors")
    for kept in ("metrics.json", "config.json", "report.html", "promotion.json", "oof/f.npz"):
        assert not is_weight_file(kept)


def test_policy_rejects_nonsense() -> None:
    with pytest.raises(RegistryError, match="keep_versions"):
        RetentionPolicy(0, 1)
    with pytest.raises(RegistryError, match="keep_days"):
        RetentionPolicy(1, -1)
    with pytest.raises(RegistryError, match="keep_days"):
        RetentionPolicy(1, float("nan"))


def test_versions_to_keep_rules() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    old = now - timedelta(days=30)
    versions = [(v, old) for v in "abcdefg"] + [("young", now - timedelta(days=1))]
    versions.append(("undated", None))
    made_current = ["a", "b", "c", "d", "e", "b"]  # e was current, rolled back to b
    keep = versions_to_keep(
        versions, made_current, "b", RetentionPolicy(2, 7), protect=["g"], now=now
    )
    assert keep["b"] == "current"
    assert keep["e"] == "current before the present one"
    assert set(keep) == {"b", "e", "g", "young", "undated"}
    # a wider window keeps more of those made current, most recent first
    keep = versions_to_keep(versions, made_current, "b", RetentionPolicy(4, 7), now=now)
    assert {"b", "e", "d", "c"} <= set(keep) and "a" not in keep and "f" not in keep


# --- the local registry ----------------------------------------------------------------


def test_disk_use_is_bounded_over_many_runs(tmp_path: Path) -> None:
    """30 runs, every third one rejected by the gate: pruned after each, the registry
    stays under (N + 2) versions' weights; without pruning it grows with every run."""
    keep = 3
    pruned_registry = ModelRegistry(tmp_path / "pruned")
    unpruned_registry = ModelRegistry(tmp_path / "unpruned")
    sizes = []
    for i in range(30):
        f1 = 0.1 if i % 3 == 2 else 0.5 + i / 100  # every third run loses to current
        for registry in (pruned_registry, unpruned_registry):
            _publish(registry, _vid(i), f1)
        prune_after_run(pruned_registry, _vid(i), keep_versions=keep, keep_days=0)
        sizes.append(_disk_bytes(pruned_registry.root))

    bound = (keep + 2) * WEIGHT_BYTES + 1024 * 1024  # + records, history: far below one MB
    assert max(sizes) < bound, [s // 1024 for s in sizes]
    assert _disk_bytes(unpruned_registry.root) > 30 * WEIGHT_BYTES

    current = pruned_registry.current()
    promoted = [e.version for e in pruned_registry.history() if e.action == "promote"]
    assert current == promoted[-1]
    for version in promoted[-keep:]:
        assert _has_weights(pruned_registry, version), version
    infos = pruned_registry.list_versions()
    assert len(infos) == 30, "every version stays listed"
    pruned = [v for v in infos if v.pruned]
    assert len(pruned) >= 30 - keep - 1
    for info in pruned:
        assert not _has_weights(pruned_registry, info.version_id)
        for name in RECORD_FILES:
            assert (info.path / name).is_file(), (info.version_id, name)
        assert (info.path / "oof" / "fold_0.npz").is_file()
        assert info.f1_macro is not None and info.gate in ("promoted", "kept")
    assert not any(v.pruned for v in infos if v.version_id in promoted[-keep:])


def test_dry_run_deletes_nothing_and_apply_reports_the_same(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    for i in range(4):
        _publish(registry, _vid(i), 0.5 + i / 10, folds=2)
    before = _disk_bytes(registry.root)
    dry = registry.prune(RetentionPolicy(1, 0))
    assert not dry.applied and _disk_bytes(registry.root) == before
    assert [p.version_id for p in dry.pruned] == [_vid(0), _vid(1)]
    assert dry.freed_bytes == 2 * 2 * WEIGHT_BYTES
    assert {p.files for p in dry.pruned} == {2}

    done = registry.prune(RetentionPolicy(1, 0), apply=True)
    assert done.applied and done.pruned == dry.pruned
    assert before - _disk_bytes(registry.root) > done.freed_bytes - 4096  # + the markers
    marker = json.loads((registry.versions_dir / _vid(0) / PRUNED_FILE).read_text())
    assert marker["freed_bytes"] == 2 * WEIGHT_BYTES and marker["files"] == 2
    assert registry.prune(RetentionPolicy(1, 0), apply=True).pruned == ()  # idempotent


def test_young_versions_keep_their_weights(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    for i in range(4):
        _publish(registry, _vid(i), 0.5 + i / 10)
    assert registry.prune(RetentionPolicy(1, 14), apply=True).pruned == ()
    later = datetime.now(UTC) + timedelta(days=15)
    result = registry.prune(RetentionPolicy(1, 14), apply=True, now=later)
    assert [p.version_id for p in result.pruned] == [_vid(0), _vid(1)]


def test_current_is_never_pruned_even_when_old_and_rolled_back_to(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    for i in range(5):
        _publish(registry, _vid(i), 0.5 + i / 10)
    registry.promote(_vid(0), reason="the oldest, by hand")
    protected = registry.prune(RetentionPolicy(1, 0), protect=[_vid(2)])
    assert {p.version_id for p in protected.pruned} == {_vid(1), _vid(3)}
    result = registry.prune(RetentionPolicy(1, 0), apply=True)
    kept = set(result.kept)
    assert _vid(0) in kept and _vid(4) in kept  # current, and the one before it
    assert _has_weights(registry, _vid(0)) and _has_weights(registry, _vid(4))
    assert {p.version_id for p in result.pruned} == {_vid(1), _vid(2), _vid(3)}


def test_a_pruned_version_cannot_be_promoted_or_rolled_back_to(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    for i in range(3):
        _publish(registry, _vid(i), 0.5 + i / 10)
    registry.prune(RetentionPolicy(1, 0), apply=True)  # prunes version 0 only
    assert registry.get(_vid(0)).pruned and not registry.get(_vid(1)).pruned
    with pytest.raises(RegistryError, match=f"{_vid(0)} was pruned") as err:
        registry.promote(_vid(0))
    assert "\n" not in str(err.value)
    registry.rollback()  # 2 → 1 still has weights
    assert registry.current() == _vid(1)
    with pytest.raises(RegistryError, match=f"{_vid(0)} was pruned"):
        registry.rollback()  # 1 → 0 is pruned
    assert registry.current() == _vid(1)


def test_a_prune_killed_half_way_is_finished_and_never_servable(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "models")
    for i in range(3):
        _publish(registry, _vid(i), 0.5 + i / 10, folds=2)
    path = registry.versions_dir / _vid(0)
    (path / PRUNED_FILE).write_text('{"pruned_at": "x"}')  # as if killed after the marker
    (path / "weights" / "fold_0.pt").unlink()
    assert registry.get(_vid(0)).pruned
    with pytest.raises(RegistryError, match="was pruned"):
        registry.promote(_vid(0))
    result = registry.prune(RetentionPolicy(1, 0), apply=True)
    assert [p.version_id for p in result.pruned] == [_vid(0)]
    assert not (path / "weights").exists()


def test_a_failing_prune_never_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    registry = ModelRegistry(tmp_path / "models")
    _publish(registry, _vid(0), 0.5)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(registry, "prune", broken)
    with caplog.at_level(logging.WARNING, logger="training.fitting.jobs"):
        prune_after_run(registry, _vid(0), 1, 0)
    assert "pruning old model versions failed: disk on fire" in caplog.text
    assert registry.current() == _vid(0)
