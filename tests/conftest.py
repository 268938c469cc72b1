"""Shared fixtures: a real Redis of our own, and small synthetic data sets.

Redis: the tests start their own ``redis-server`` (from PATH) on a free loopback port, so
they never touch a user's data; only if no binary exists do they use ``REDIS_URL`` — and if
neither works they fail loudly (a queue test that cannot reach Redis must not pass).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis import Redis

REDIS_START_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_redis(url: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Redis.from_url(url, socket_timeout=1).ping():
                return True
        except Exception:
            time.sleep(0.05)
    return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real, empty Redis for this test session."""
    binary = shutil.which("redis-server")
    if binary is None:
        url = os.environ.get("REDIS_URL")
        if not url or not _wait_for_redis(url, 2):
            pytest.fail(
                "no redis-server on PATH and no reachable REDIS_URL: queue tests need Redis"
            )
        yield url
        return
    port = _free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        if not _wait_for_redis(url, REDIS_START_TIMEOUT_S):
            pytest.fail(f"redis-server did not start on port {port}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def redis_conn(redis_url: str) -> Iterator[Redis]:
    """A connection to the session Redis, emptied before each test that uses it."""
    conn = Redis.from_url(redis_url)
    conn.flushdb()
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 balanced synthetic X-rays (DICOM + manifest.csv) shared by the slow tests."""
    from training.synthetic import VALVE_CLASSES, generate_dataset

    out = tmp_path_factory.mktemp("tiny-dataset")
    generate_dataset(
        out, 40, seed=7, class_mix={c: 1.0 for c in VALVE_CLASSES}, size_range_px=(256, 384)
    )
    return out


S3_START_TIMEOUT_S = 30.0


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 API server over HTTP on loopback: ``moto_server`` (moto's standalone mode)
    in its own process on a free port. Each test makes its own bucket. Fails, never skips,
    when it cannot start (``moto[server]`` is a dev dependency)."""
    import sys
    import urllib.request

    binary = Path(sys.executable).with_name("moto_server")
    assert binary.is_file(), "moto_server missing: pip install -e '.[dev]' (moto[server])"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + S3_START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "moto_server exited at start"
                assert time.monotonic() < deadline, "moto_server did not answer in time"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
