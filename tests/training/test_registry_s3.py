"""The object-storage registry (training.shared.registry_s3) against a real S3 API server.

The server is ``moto_server`` on loopback (the ``s3_endpoint`` fixture): real HTTP, real
boto3 requests and signatures, real ETags and conditional-write answers (412).
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from training.fitting.jobs import prune_after_run
from training.shared.errors import ModelNotFound, RegistryError
from training.shared.registry import Registry, open_registry
from training.shared.registry_s3 import STATE_KEY, S3Registry, parse_s3_url
from training.shared.retention import RetentionPolicy

CLASSES = ["a", "b"]
WEIGHT_BYTES = 1_000_000


@pytest.fixture(autouse=True)
def _credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"valve-id-{secrets.token_hex(4)}"
    s3.create_bucket(Bucket=name)
    return name


def _registry(bucket: str, endpoint: str, cache: Path) -> S3Registry:
    registry = open_registry(f"s3://{bucket}/team/models", endpoint_url=endpoint, cache_dir=cache)
    assert isinstance(registry, S3Registry)
    return registry


@pytest.fixture
def registry(bucket: str, s3_endpoint: str, tmp_path: Path) -> S3Registry:
    return _registry(bucket, s3_endpoint, tmp_path / "host-a")


def _stage(registry: Registry, f1: float, folds: int = 1) -> Path:
    staging = registry.staging("t")
    (staging / "config.json").write_text(json.dumps({"classes": CLASSES}))
    metrics = {"mean": {"f1_macro": f1, "accuracy": f1}, "classes": CLASSES}
    (staging / "metrics.json").write_text(json.dumps(metrics))
    (staging / "report.html").write_text("<html>report</html>")
    (staging / "weights").mkdir()
    for fold in range(folds):
        (staging / "weights" / f"fold_{fold}.pt").write_bytes(bytes([fold]) * WEIGHT_BYTES)
    return staging


def _vid(i: int) -> str:
    return f"20261201-0000{i:02d}-{i:04x}"


def _keys(s3: Any, bucket: str) -> dict[str, int]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://b/x/y/") == ("b", "x/y/")
    assert parse_s3_url("s3://b") == ("b", "")
    with pytest.raises(RegistryError, match="names no bucket"):
        parse_s3_url("s3:///x")


def test_publish_list_current_and_local_cache(
    registry: S3Registry, bucket: str, s3: Any, s3_endpoint: str, tmp_path: Path
) -> None:
    assert registry.current() is None and registry.list_versions() == []
    result = registry.publish(_stage(registry, 0.8, folds=2), version_id=_vid(1))
    assert result.promoted and registry.current() == _vid(1)
    keys = _keys(s3, bucket)
    assert f"team/models/versions/{_vid(1)}/weights/fold_1.pt" in keys
    assert f"team/models/{STATE_KEY}" in keys
    assert not list(registry.staging_dir.iterdir()), "staging moved into the cache"

    # another host: downloads once into its own cache, then reads local files
    other = _registry(bucket, s3_endpoint, tmp_path / "host-b")
    (info,) = other.list_versions()
    assert info.is_current and info.f1_macro == 0.8 and info.gate == "promoted"
    path = other.version_path(_vid(1))
    assert path.is_relative_to(tmp_path / "host-b")
    assert (path / "weights" / "fold_1.pt").read_bytes() == b"\1" * WEIGHT_BYTES
    promotion = json.loads((path / "promotion.json").read_text())
    assert promotion["decision"] == "promoted"
    s3.delete_object(Bucket=bucket, Key=f"team/models/versions/{_vid(1)}/weights/fold_0.pt")
    assert other.version_path(_vid(1)) == path  # cached: not downloaded again
    assert (path / "weights" / "fold_0.pt").is_file()
    with pytest.raises(ModelNotFound):
        other.version_path(_vid(9))


def test_gate_rollback_and_history(registry: S3Registry) -> None:
    registry.publish(_stage(registry, 0.8), version_id=_vid(1))
    registry.publish(_stage(registry, 0.9), version_id=_vid(2))
    kept = registry.publish(_stage(registry, 0.5), version_id=_vid(3))
    assert not kept.promoted and "worse" in kept.reason
    assert registry.current() == _vid(2)
    assert registry.rollback() == _vid(1)
    assert registry.current() == _vid(1)
    with pytest.raises(RegistryError, match="no version was current before"):
        registry.rollback()
    registry.promote(_vid(3), reason="by hand")
    assert registry.current() == _vid(3)
    actions = [(e.action, e.version) for e in registry.history()]
    assert actions == [
        ("promote", _vid(1)),
        ("promote", _vid(2)),
        ("rejected", _vid(3)),
        ("rollback", _vid(1)),
        ("promote", _vid(3)),
    ]
    with pytest.raises(RegistryError, match="already exists"):
        registry.publish(_stage(registry, 0.9), version_id=_vid(1))


def test_a_crashed_publish_leaves_nothing_visible(
    registry: S3Registry, bucket: str, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.publish(_stage(registry, 0.8), version_id=_vid(1))
    client = registry._client_()
    real_upload = client.upload_file
    uploads: list[str] = []

    def dying_upload(filename: str, bucket_name: str, key: str, *a: Any, **kw: Any) -> None:
        if uploads:
            raise KeyboardInterrupt("worker killed mid-upload")
        uploads.append(key)
        real_upload(filename, bucket_name, key, *a, **kw)

    monkeypatch.setattr(client, "upload_file", dying_upload)
    with pytest.raises(KeyboardInterrupt):
        registry.publish(_stage(registry, 0.99, folds=2), version_id=_vid(2))
    monkeypatch.undo()
    assert any(_vid(2) in k for k in _keys(s3, bucket)), "some files did reach the server"
    assert [v.version_id for v in registry.list_versions()] == [_vid(1)]
    assert registry.current() == _vid(1)
    with pytest.raises(ModelNotFound):
        registry.version_path(_vid(2))

    assert registry.cleanup_staging(max_age_s=3600) == [], "young uploads are left alone"
    removed = registry.cleanup_staging(max_age_s=0)
    assert f"{registry.root}/versions/{_vid(2)}/" in removed
    assert not any(_vid(2) in k for k in _keys(s3, bucket))
    assert any(_vid(1) in k for k in _keys(s3, bucket)), "committed versions stay"


def test_an_incomplete_staging_directory_is_refused(registry: S3Registry) -> None:
    staging = registry.staging("t")
    (staging / "config.json").write_text("{}")
    with pytest.raises(RegistryError, match="metrics.json is missing"):
        registry.publish(staging)
    assert not staging.exists() and registry.list_versions() == []


def test_the_server_refuses_a_stale_conditional_write(
    registry: S3Registry, bucket: str, s3: Any
) -> None:
    """What the compare-and-swap relies on, asked of the server directly."""
    registry.publish(_stage(registry, 0.8), version_id=_vid(1))
    key = f"team/models/{STATE_KEY}"
    etag = s3.head_object(Bucket=bucket, Key=key)["ETag"]
    state = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    state["note"] = "another writer"
    s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(state).encode(), IfMatch=etag)
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket=bucket, Key=key, Body=b"{}", IfMatch=etag)  # stale now
    assert err.value.response["Error"]["Code"] == "PreconditionFailed"
    with pytest.raises(ClientError):
        s3.put_object(Bucket=bucket, Key=key, Body=b"{}", IfNoneMatch="*")
    assert registry.current() == _vid(1)


def test_two_publishers_racing_for_current_both_land(
    registry: S3Registry, bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    """A reads the state, B commits, A's write (If-Match: A's stale ETag) gets 412: A
    re-reads, re-runs the gate against B's version and commits; nothing is lost."""
    registry.publish(_stage(registry, 0.5), version_id=_vid(1))
    host_b = _registry(bucket, s3_endpoint, tmp_path / "host-b")
    stale = registry._read_state()
    real_read = registry._read_state
    reads = {"n": 0}

    def read_once_stale() -> tuple[str | None, dict[str, Any]]:
        reads["n"] += 1
        if reads["n"] == 1:
            host_b.publish(_stage(host_b, 0.9), version_id=_vid(2))  # B wins the race
            return stale
        return real_read()

    registry._read_state = read_once_stale  # type: ignore[method-assign]
    result = registry.publish(_stage(registry, 0.7), version_id=_vid(3))
    registry._read_state = real_read  # type: ignore[method-assign]
    assert reads["n"] >= 2, "the first write was refused and retried"
    assert not result.promoted and result.previous == _vid(2), "gated against B's version"
    fresh = _registry(bucket, s3_endpoint, tmp_path / "reader")
    assert [v.version_id for v in fresh.list_versions()] == [_vid(1), _vid(2), _vid(3)]
    assert fresh.current() == _vid(2)
    assert [(e.action, e.version) for e in fresh.history()] == [
        ("promote", _vid(1)),
        ("promote", _vid(2)),
        ("rejected", _vid(3)),
    ]


def test_a_server_ignoring_conditional_writes_is_refused(registry: S3Registry) -> None:
    client = registry._client_()

    class IgnoresConditions:
        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

        def put_object(self, **kwargs: Any) -> Any:
            kwargs.pop("IfNoneMatch", None)
            kwargs.pop("IfMatch", None)
            return client.put_object(**kwargs)

    registry._client = IgnoresConditions()
    with pytest.raises(RegistryError, match="ignores conditional writes"):
        registry.publish(_stage(registry, 0.8), version_id=_vid(1))
    assert registry.list_versions() == []


def test_retention_bounds_the_bucket_over_many_runs(
    registry: S3Registry, bucket: str, s3: Any
) -> None:
    keep = 2
    sizes = []
    for i in range(12):
        f1 = 0.1 if i % 3 == 2 else 0.5 + i / 100
        registry.publish(_stage(registry, f1), version_id=_vid(i))
        prune_after_run(registry, _vid(i), keep_versions=keep, keep_days=0)
        sizes.append(sum(_keys(s3, bucket).values()))
    assert max(sizes) < (keep + 2) * WEIGHT_BYTES + 200_000, sizes
    infos = registry.list_versions()
    assert len(infos) == 12
    promoted = [e.version for e in registry.history() if e.action == "promote"]
    for version in promoted[-keep:]:
        assert not registry.get(version).pruned
        assert (registry.version_path(version) / "weights" / "fold_0.pt").is_file()
    pruned = [v for v in infos if v.pruned]
    assert len(pruned) >= 12 - keep - 1
    keys = _keys(s3, bucket)
    for info in pruned:
        prefix = f"team/models/versions/{info.version_id}/"
        assert f"{prefix}metrics.json" in keys and f"{prefix}report.html" in keys
        assert not any(k.startswith(prefix + "weights/") for k in keys)
        assert info.f1_macro is not None
        with pytest.raises(RegistryError, match="was pruned"):
            registry.promote(info.version_id)
        records = registry.get(info.version_id).path
        assert (records / "metrics.json").is_file() and (records / "pruned.json").is_file()
    assert registry.prune(RetentionPolicy(keep, 0), apply=True).pruned == ()


def test_a_dry_run_prune_changes_nothing(registry: S3Registry, bucket: str, s3: Any) -> None:
    for i in range(3):
        registry.publish(_stage(registry, 0.5 + i / 10), version_id=_vid(i))
    before = _keys(s3, bucket)
    result = registry.prune(RetentionPolicy(1, 0))
    assert [p.version_id for p in result.pruned] == [_vid(0)]
    assert result.freed_bytes == WEIGHT_BYTES
    assert _keys(s3, bucket) == before
    assert not registry.get(_vid(0)).pruned


def test_wrong_bucket_and_missing_credentials_are_one_line(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = _registry("no-such-bucket-here", s3_endpoint, tmp_path)
    with pytest.raises(RegistryError) as err:
        missing.current()
    assert "does not exist" in str(err.value) and "\n" not in str(err.value)

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    anonymous = _registry("any-bucket", s3_endpoint, tmp_path)
    with pytest.raises(RegistryError) as err:
        anonymous.current()
    assert "no S3 credentials" in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value)
    assert "\n" not in str(err.value)


def test_unreachable_server_is_one_line(tmp_path: Path) -> None:
    registry = _registry("b", "http://127.0.0.1:9", tmp_path)  # discard port: nothing there
    with pytest.raises(RegistryError, match="cannot reach the S3 server"):
        registry.current()
