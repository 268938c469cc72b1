"""Tests for training.shared.registry: atomic publish, the promotion gate, current pointer,
rollback."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from training.shared.errors import ModelNotFound, RegistryError, ValveIdError
from training.shared.registry import (
    ModelRegistry,
    decide_promotion,
    new_version_id,
)

CLASSES = ["codman_hakim", "certas_plus", "sophy_sm8", "progav_2"]


def _stage(
    registry: ModelRegistry,
    f1: float,
    classes: list[str] | None = None,
    *,
    accuracy: float | None = None,
) -> Path:
    """A staging directory holding what the recipe would write."""
    classes = CLASSES if classes is None else classes
    path = registry.staging("test")
    (path / "config.json").write_text(json.dumps({"classes": classes, "arch": "resnet34"}))
    mean = {"f1_macro": f1, "accuracy": f1 if accuracy is None else accuracy}
    (path / "metrics.json").write_text(json.dumps({"mean": mean, "classes": classes}))
    (path / "weights").mkdir()
    (path / "weights" / "fold_0.pt").write_bytes(b"weights")
    return path


def _publish(registry: ModelRegistry, f1: float, classes: list[str] | None = None, **kw):
    return registry.publish(_stage(registry, f1, classes), **kw)


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


def test_version_ids_sort_chronologically() -> None:
    start = datetime(2026, 11, 25, 19, 3, 12, tzinfo=UTC)
    ids = [new_version_id(start + timedelta(seconds=s)) for s in (0, 1, 59, 3600, 86400 * 40)]
    assert ids == sorted(ids)
    assert ids[0].startswith("20261125-190312-") and len(ids[0]) == len("20261125-190312-a1b2")
    # a non-UTC clock gives the UTC timestamp
    plus_two = datetime(2026, 11, 25, 23, 3, 12, tzinfo=timezone(timedelta(hours=2)))
    assert new_version_id(plus_two).startswith("20261125-210312-")
    assert len({new_version_id(start) for _ in range(50)}) > 1  # random suffix


def test_publish_list_current(registry: ModelRegistry) -> None:
    assert registry.current() is None
    assert registry.list_versions() == []
    first = _publish(registry, 0.80, version_id="20261125-100000-aaaa")
    assert first.promoted and first.previous is None and first.reason == "no current version"
    assert registry.current() == "20261125-100000-aaaa"
    assert (first.path / "weights" / "fold_0.pt").read_bytes() == b"weights"
    second = _publish(registry, 0.85, version_id="20261125-110000-bbbb")
    assert second.promoted and second.previous == first.version_id
    assert registry.current() == second.version_id

    versions = registry.list_versions()
    assert [v.version_id for v in versions] == [first.version_id, second.version_id]
    assert [v.is_current for v in versions] == [False, True]
    assert versions[1].f1_macro == 0.85 and versions[1].accuracy == 0.85
    assert versions[1].classes == tuple(CLASSES)
    assert versions[1].gate == "promoted"
    assert versions[1].created is not None
    assert registry.get(second.version_id) == versions[1]
    assert registry.version_path(first.version_id) == first.path
    assert json.loads(json.dumps(versions[0].to_dict()))["version_id"] == first.version_id
    # staging is empty again: published directories were moved, not copied
    assert list(registry.staging_dir.iterdir()) == []
    # readable by a server running as another user than the training worker
    assert first.path.stat().st_mode & 0o055 == 0o055
    assert (registry.root / "current").stat().st_mode & 0o044 == 0o044


def test_generated_version_id(registry: ModelRegistry) -> None:
    result = _publish(registry, 0.5)
    assert result.version_id[:8].isdigit() and result.path.parent == registry.versions_dir


def test_gate_keeps_worse_version_out(registry: ModelRegistry) -> None:
    good = _publish(registry, 0.90)
    worse = _publish(registry, 0.85)  # 0.05 worse > default tolerance 0.02
    assert not worse.promoted
    assert "worse" in worse.reason and "0.8500" in worse.reason and "0.9000" in worse.reason
    assert registry.current() == good.version_id
    info = registry.get(worse.version_id)
    assert (info.gate, info.is_current) == ("kept", False)
    promotion = json.loads((worse.path / "promotion.json").read_text())
    assert promotion["decision"] == "kept" and promotion["compared_with"] == good.version_id
    last = registry.history()[-1]
    assert (last.action, last.version, last.previous) == (
        "rejected",
        worse.version_id,
        good.version_id,
    )
    assert last.reason == worse.reason
    # still servable by explicit promotion
    registry.promote(worse.version_id)
    assert registry.current() == worse.version_id


def test_gate_promotes_within_tolerance_and_better(registry: ModelRegistry) -> None:
    _publish(registry, 0.90)
    assert _publish(registry, 0.885).promoted  # worse by 0.015 < 0.02
    assert _publish(registry, 0.95).promoted
    assert not _publish(registry, 0.90, tolerance=0.01).promoted
    assert _publish(registry, 0.90, tolerance=0.1).promoted


def test_decide_promotion_is_pure() -> None:
    cur = {"mean": {"f1_macro": 0.8}, "classes": CLASSES}
    assert decide_promotion({"mean": {"f1_macro": 0.5}, "classes": CLASSES}, None).promote
    assert not decide_promotion({"mean": {"f1_macro": 0.7}, "classes": CLASSES}, cur).promote
    assert decide_promotion({"mean": {"f1_macro": 0.79}, "classes": CLASSES[::-1]}, cur).promote
    assert decide_promotion(
        {"mean": {"f1_macro": 0.7}, "classes": CLASSES}, cur, tolerance=0.1
    ).promote


def test_class_vocabulary_change_promotes(registry: ModelRegistry) -> None:
    _publish(registry, 0.95)
    new_classes = [*CLASSES, "miethke_m_blue"]
    result = _publish(registry, 0.60, new_classes)
    assert result.promoted
    assert "class vocabulary changed" in result.reason and "miethke_m_blue" in result.reason
    assert registry.current() == result.version_id


def test_promote_and_rollback(registry: ModelRegistry) -> None:
    a = _publish(registry, 0.80).version_id
    b = _publish(registry, 0.85).version_id
    c = _publish(registry, 0.90).version_id
    assert registry.rollback() == b
    assert registry.current() == b
    assert registry.rollback() == a  # repeated rollbacks walk further back
    with pytest.raises(RegistryError, match="cannot roll back"):
        registry.rollback()
    registry.promote(c, reason="back to the best")
    assert registry.current() == c
    assert registry.rollback() == a
    last = registry.history()[-1]
    assert (last.action, last.version, last.previous) == ("rollback", a, c)
    with pytest.raises(ModelNotFound):
        registry.promote("20991231-000000-dead")


def test_rollback_without_current(registry: ModelRegistry) -> None:
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "", ".hidden", "x" * 81, "a b"])
def test_invalid_ids_rejected(registry: ModelRegistry, bad: str) -> None:
    _publish(registry, 0.8)
    for call in (registry.get, registry.version_path, registry.promote):
        with pytest.raises(RegistryError, match="invalid version id"):
            call(bad)
    with pytest.raises(RegistryError):
        registry.staging(bad)
    with pytest.raises(RegistryError):
        registry.publish(_stage(registry, 0.8), version_id=bad)


def test_publish_rejects_paths_outside_staging(registry: ModelRegistry, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(RegistryError, match="not a staging directory"):
        registry.publish(elsewhere)
    assert elsewhere.is_dir()


def test_killed_job_staging_not_listed_and_cleaned(registry: ModelRegistry) -> None:
    kept = _publish(registry, 0.8)
    half = registry.staging("killed")
    (half / "config.json").write_text("{}")
    (half / "weights").mkdir()
    (half / "weights" / "fold_0.pt").write_bytes(b"partial")
    assert [v.version_id for v in registry.list_versions()] == [kept.version_id]

    assert registry.cleanup_staging(max_age_s=3600) == []  # still fresh: maybe running
    old = time.time() - 7200
    for p in (half, half / "config.json", half / "weights", half / "weights" / "fold_0.pt"):
        os.utime(p, (old, old))
    assert registry.cleanup_staging(max_age_s=3600) == [half]
    assert not half.exists()
    assert [v.version_id for v in registry.list_versions()] == [kept.version_id]


def test_cleanup_spares_a_job_still_writing(registry: ModelRegistry) -> None:
    running = registry.staging("running")
    (running / "weights").mkdir()
    old = time.time() - 7200
    os.utime(running, (old, old))  # the top directory looks old ...
    (running / "weights" / "fold_3.pt").write_bytes(b"new")  # ... but a file is fresh
    assert registry.cleanup_staging(max_age_s=3600) == []
    assert running.is_dir()


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"config.json": "{}"}, "metrics.json is missing"),
        (
            {"metrics.json": json.dumps({"mean": {"f1_macro": 0.5}, "classes": CLASSES})},
            "config.json is missing",
        ),
        ({"config.json": "{}", "metrics.json": "{not json"}, "not valid JSON"),
        ({"config.json": "{}", "metrics.json": json.dumps({"classes": CLASSES})}, "f1_macro"),
        ({"config.json": "{}", "metrics.json": json.dumps({"mean": {"f1_macro": 0.5}})}, "classes"),
        (
            {
                "config.json": json.dumps({"classes": ["x"]}),
                "metrics.json": json.dumps({"mean": {"f1_macro": 0.5}, "classes": CLASSES}),
            },
            "different classes",
        ),
    ],
)
def test_incomplete_staging_fails_cleanly(
    registry: ModelRegistry, files: dict[str, str], message: str
) -> None:
    kept = _publish(registry, 0.8)
    before = sorted(p.name for p in registry.versions_dir.iterdir())
    history_before = registry.history()
    staging = registry.staging("broken")
    for name, text in files.items():
        (staging / name).write_text(text)
    with pytest.raises(RegistryError, match=message) as excinfo:
        registry.publish(staging)
    assert isinstance(excinfo.value, ValveIdError)
    assert sorted(p.name for p in registry.versions_dir.iterdir()) == before
    assert registry.current() == kept.version_id
    assert registry.history() == history_before
    assert not staging.exists()  # removed on validation failure


def test_current_switch_is_atomic_for_readers(registry: ModelRegistry) -> None:
    ids = [_publish(registry, 0.8).version_id for _ in range(3)]
    seen: set[str | None] = set()
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            seen.add(registry.current())

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for i in range(300):
            registry.promote(ids[i % 3])
    finally:
        stop.set()
        reader.join()
    assert seen <= set(ids), seen - set(ids)
    assert len(seen) >= 2  # the reader did overlap with the switches


def _publish_in_process(root: str, f1: float, barrier) -> str:
    registry = ModelRegistry(root)
    staging = _stage(registry, f1)
    barrier.wait()
    return registry.publish(staging).version_id


def test_concurrent_publishes_from_two_processes(registry: ModelRegistry) -> None:
    first = _publish(registry, 0.5)
    ctx = multiprocessing.get_context("spawn")
    rounds = 3
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        barrier = manager.Barrier(2)
        for _ in range(rounds):
            results = [
                pool.apply_async(_publish_in_process, (str(registry.root), f1, barrier))
                for f1 in (0.9, 0.6)
            ]
            [r.get(timeout=60) for r in results]

    versions = registry.list_versions()
    assert len(versions) == 1 + 2 * rounds
    history = registry.history()
    assert len(history) == 1 + 2 * rounds
    assert {h.version for h in history} == {v.version_id for v in versions}
    # each decision saw the previous one's result: the chain of "previous" is consistent
    current = None
    for h in history:
        assert h.previous == current
        if h.action == "promote":
            current = h.version
    assert registry.current() == current
    assert first.version_id in {v.version_id for v in versions}
    assert not any(registry.staging_dir.iterdir())
    assert list(registry.root.glob(".current-*")) == []


def test_registry_import_is_light() -> None:
    code = (
        "import sys, training.shared.registry; "
        "assert not {'torch', 'fastai', 'torchvision'} & set(sys.modules), 'heavy import'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
