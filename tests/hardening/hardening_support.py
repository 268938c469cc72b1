"""Helpers of the hardening suite: bad files, a served version, real processes to break.

Everything here is real: ``valve-id serve`` runs as a subprocess (:class:`RunningServer`),
Redis is a private ``redis-server`` that tests stop and restart (:class:`RedisServer`), a
foreign host is a real HTTP server that counts who calls it (:class:`CountingHost`). The
only stand-ins are for Label Studio (a real one cannot run in a unit test; issue 5's
end-to-end suite has it): :mod:`labelstudio_standin` for its HTTP API and
:class:`retraining_fakes.FakeLabelStudio` for the labelled count.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from redis import Redis

from training.shared.model import ValveNet, save_checkpoint
from training.shared.preprocess import PreprocessParams
from training.shared.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[2]
# retraining_fakes lives with the backend tests; the hardening suite reuses its stand-ins.
_BACKEND_TESTS = str(ROOT / "tests" / "backend")
if _BACKEND_TESTS not in sys.path:
    sys.path.append(_BACKEND_TESTS)

LABEL_CONFIG_XML = (ROOT / "label_config.xml").read_text()
CLASSES = ["Codman Hakim", "Codman Certas Plus", "Sophysa Sophy SM8", "proGAV 2.0"]
VERSION = "20261125-100000-h001"
SIZE_PX = 32
PROJECT = "1.1795624869"
"""The project key Label Studio sends (``retraining_fakes.PROJECT_KEY``)."""

# Distinctive secrets: long enough that finding one anywhere can only mean a leak.
LS_API_KEY = "5ec12e7a" * 5
"""A legacy Label Studio token (40 hex characters)."""
BASIC_USER = "label-studio"
BASIC_PASS = "basic-pass-Q7v2xK9mW3"
PSEUDONYM_KEY = "pseudonym-key-Z4t8pL1wR6"
SECRETS = (LS_API_KEY, BASIC_PASS, PSEUDONYM_KEY)

SERVER_START_TIMEOUT_S = 90.0
REDIS_START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(condition: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll ``condition()`` until it is truthy; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


# ------------------------------------------------------------------------------ images


def png(seed: int, size: int = 48) -> bytes:
    pixels = (np.random.default_rng(seed).random((size, size)) * 255).astype(np.uint8)
    return _save(Image.fromarray(pixels, mode="L"), "PNG")


def _save(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_16_bit(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((48, 48)) * 65535).astype(np.uint16)
    return _save(Image.fromarray(pixels), "PNG")


def png_rgba(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((48, 48, 4)) * 255).astype(np.uint8)
    return _save(Image.fromarray(pixels, mode="RGBA"), "PNG")


def jpeg(seed: int, mode: str = "L") -> bytes:
    pixels = (np.random.default_rng(seed).random((48, 48)) * 255).astype(np.uint8)
    return _save(Image.fromarray(pixels, mode="L").convert(mode), "JPEG")


def png_header_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width × height`` (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1024))
        + chunk(b"IEND", b"")
    )


def dicom_dataset(seed: int, frames: int = 1) -> Dataset:
    """A small uncompressed 12-bit MONOCHROME2 radiograph."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = 48, 48
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    shape = (frames, 48, 48) if frames > 1 else (48, 48)
    ds.PixelData = (rng.random(shape) * 4095).astype(np.uint16).tobytes()
    return ds


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_without_pixel_data(seed: int) -> bytes:
    ds = dicom_dataset(seed)
    del ds.PixelData
    return dicom_bytes(ds)


def dicom_with_transfer_syntax(seed: int, uid: str) -> bytes:
    ds = dicom_dataset(seed)
    ds.file_meta.TransferSyntaxUID = uid
    buffer = io.BytesIO()  # a private syntax: pydicom needs to be told how to write it
    pydicom.dcmwrite(buffer, ds, implicit_vr=False, little_endian=True, enforce_file_format=True)
    return buffer.getvalue()


HTML_ERROR_PAGE = (
    b"<!DOCTYPE html><html><head><title>Sign in | Label Studio</title></head>"
    b"<body><form action='/user/login/'>Session expired</form></body></html>"
)


# ------------------------------------------------------------------------------ a version


def publish_version(
    registry: ModelRegistry, version_id: str, *, seed: int = 0, corrupt: bytes | None = None
) -> Path:
    """A servable one-fold ResNet-18 version with random weights (serving, not accuracy).

    ``corrupt`` replaces the fold's weights file with those bytes before publishing.
    """
    staging = registry.staging("hardening")
    torch.manual_seed(seed)
    weights = staging / "weights" / "fold_0.pt"
    save_checkpoint(ValveNet(len(CLASSES), arch="resnet18"), weights, classes=CLASSES)
    if corrupt is not None:
        weights.write_bytes(corrupt)
    config = {
        "format": 1,
        "version": version_id,
        "classes": CLASSES,
        "preprocess": PreprocessParams(size_px=SIZE_PX).to_dict(),
        "temperature": 1.0,
        "arch": "resnet18",
        "folds": [{"fold": 0, "weights": "weights/fold_0.pt"}],
    }
    metrics = {"mean": {"f1_macro": 0.5}, "classes": CLASSES}
    (staging / "config.json").write_text(json.dumps(config))
    (staging / "metrics.json").write_text(json.dumps(metrics))
    return registry.publish(staging, version_id=version_id, tolerance=1.0).path


def predict_body(tasks: list[dict[str, Any]], project: str = PROJECT) -> dict[str, Any]:
    return {"tasks": tasks, "project": project, "label_config": LABEL_CONFIG_XML}


def local_url(relative: str) -> str:
    """A Label Studio local-files URL (read from LOCAL_FILES_DOCUMENT_ROOT by the backend)."""
    return f"/data/local-files/?d={relative}"


# ------------------------------------------------------------------------------ processes


def _rss_field(pid: int, name: str) -> int:
    """A ``/proc/<pid>/status`` memory field in bytes (VmRSS: now; VmHWM: peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"/proc/{pid}/status has no {name}")


@dataclass
class RunningServer:
    """``valve-id serve`` in a subprocess: its URL, log file and memory."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    auth: tuple[str, str] | None = None

    @classmethod
    def start(cls, env: dict[str, str], log_path: Path, auth: tuple[str, str] | None = None):
        port = free_port()
        command = [sys.executable, "-m", "backend.tools.cli", "serve", "--host", "127.0.0.1"]
        log = log_path.open("wb")
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        server = cls(f"http://127.0.0.1:{port}", process, log_path, auth)

        def up() -> bool:
            assert process.poll() is None, server.log_text()[-3000:]
            try:
                return httpx.get(f"{server.url}/health", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, SERVER_START_TIMEOUT_S, "valve-id serve to answer /health", 0.2)
        return server

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 120.0)
        return httpx.Client(base_url=self.url, auth=self.auth, **kwargs)

    def rss(self) -> int:
        return _rss_field(self.process.pid, "VmRSS")

    def peak_rss(self) -> int:
        return _rss_field(self.process.pid, "VmHWM")

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


@dataclass
class RedisServer:
    """A private ``redis-server`` that a test may kill and start again on the same port.

    Append-only persistence with fsync on every write, as a production Redis runs
    (docker-compose.yml: ``--appendonly yes``): what was written before a crash is there
    after the restart.
    """

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary, "the hardening suite needs redis-server on PATH"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

        def pong() -> bool:
            try:
                return bool(Redis.from_url(self.url, socket_timeout=0.5).ping())
            except Exception:
                return False

        wait_until(pong, REDIS_START_TIMEOUT_S, f"redis-server on port {self.port}")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait(timeout=10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.kill(signal.SIGTERM)


class CountingHost:
    """A real HTTP server on another port (a foreign host) that serves a valid PNG to anyone
    and counts the requests it got: a fetch that was refused never reaches it."""

    def __init__(self) -> None:
        host = self
        self.requests = 0
        self._lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                with host._lock:
                    host.requests += 1
                body = png(0)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        if root.exists():
            yield from (p for p in sorted(root.rglob("*")) if p.is_file())


def drain_default_queue(conn: Redis) -> int:
    """Run every queued backend job in this process (a real RQ worker); returns how many.

    The jobs use whatever :func:`backend.loop.jobs.use_context` set (the tests' stand-ins).
    """
    from retraining_fakes import QuietWorker
    from rq import Queue
    from rq.job import Job

    from training.shared.loop_state import DEFAULT_QUEUE

    queue = Queue(DEFAULT_QUEUE, connection=conn)
    count = queue.count
    QuietWorker([queue], connection=conn).work(burst=True)
    failed = queue.failed_job_registry.get_job_ids()
    assert not failed, [Job.fetch(j, connection=conn).latest_result().exc_string for j in failed]
    return count
