"""Suite-wide parts of the hardening suite: one served version, its files, the real server.

The server is ``valve-id serve`` in a subprocess (uvicorn, the real :func:`create_app`, a
real :class:`~backend.service.predictor.Predictor`), configured only through the environment, with
basic auth on, distinctive secrets and ``LOG_LEVEL=DEBUG`` (everything it logs goes to a file
the secrets test greps). It fetches images through the real
:class:`~training.labelstudio.ImageFetcher`: from ``LOCAL_FILES_DOCUMENT_ROOT`` on disk, or
over HTTP from the Label Studio stand-in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from labelstudio_standin import StandInLabelStudio

from training.shared.registry import ModelRegistry

from .hardening_support import (
    BASIC_PASS,
    BASIC_USER,
    HTML_ERROR_PAGE,
    LS_API_KEY,
    PSEUDONYM_KEY,
    VERSION,
    CountingHost,
    RunningServer,
    dicom_bytes,
    dicom_dataset,
    dicom_with_transfer_syntax,
    dicom_without_pixel_data,
    jpeg,
    png,
    png_16_bit,
    png_header_claiming,
    png_rgba,
    publish_version,
)

BATCH_SIZE = 1000
"""Distinct images under ``batch/`` (one /predict of the largest allowed size)."""
UNSUPPORTED_TRANSFER_SYNTAX = "1.2.826.0.1.3680043.99999.1"


@pytest.fixture(scope="package")
def served_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    """A registry whose current version is :data:`VERSION` (read-only for the tests)."""
    registry = ModelRegistry(tmp_path_factory.mktemp("served") / "models")
    publish_version(registry, VERSION)
    return registry


@pytest.fixture(scope="package")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``LOCAL_FILES_DOCUMENT_ROOT``: every kind of bad (and good) file, plus a batch."""
    base = tmp_path_factory.mktemp("local-files")
    root = base / "root"
    inputs = root / "inputs"
    inputs.mkdir(parents=True)
    good_dicom = dicom_bytes(dicom_dataset(1))
    files = {
        "good.png": png(1),
        "good.dcm": good_dicom,
        "zero.png": b"",
        "zero.jpg": b"",
        "zero.dcm": b"",
        "truncated.png": png(2)[:60],
        "truncated.jpg": jpeg(3)[:200],
        "truncated.dcm": good_dicom[:300],
        "error-page.png": HTML_ERROR_PAGE,
        "bomb.png": png_header_claiming(40_000, 40_000),
        "16-bit.png": png_16_bit(4),
        "rgba.png": png_rgba(5),
        "cmyk.jpg": jpeg(6, mode="CMYK"),
        "no-pixels.dcm": dicom_without_pixel_data(7),
        "multi-frame.dcm": dicom_bytes(dicom_dataset(8, frames=3)),
        "unsupported-syntax.dcm": dicom_with_transfer_syntax(9, UNSUPPORTED_TRANSFER_SYNTAX),
    }
    for name, data in files.items():
        (inputs / name).write_bytes(data)
    batch = root / "batch"
    batch.mkdir()
    for i in range(BATCH_SIZE):
        (batch / f"{i:04d}.png").write_bytes(png(10_000 + i, size=40))
    outside = base / "outside"
    outside.mkdir()
    (outside / "private.png").write_bytes(png(99))  # readable, but outside the root
    return root


@pytest.fixture(scope="package")
def standin(image_root: Path) -> Iterator[StandInLabelStudio]:
    """Label Studio's HTTP API as the server sees it (uploads, local files, projects)."""
    server = StandInLabelStudio(api_key=LS_API_KEY, local_files_root=image_root)
    server.uploads["/data/upload/1/good.png"] = png(11)
    server.uploads["/data/upload/1/error-page.png"] = HTML_ERROR_PAGE
    with server:
        yield server


@pytest.fixture(scope="package")
def foreign_host() -> Iterator[CountingHost]:
    host = CountingHost()
    yield host
    host.close()


@pytest.fixture(scope="package")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    served_registry: ModelRegistry,
    image_root: Path,
    standin: StandInLabelStudio,
    redis_url: str,
) -> Iterator[RunningServer]:
    """``valve-id serve``, configured as in production but with test secrets."""
    state = tmp_path_factory.mktemp("server-state")
    env = {
        "VALVE_ID_STATE_DIR": str(state),
        "MODEL_DIR": str(served_registry.root),
        "REDIS_URL": redis_url,
        "LABEL_STUDIO_URL": standin.url,
        "LABEL_STUDIO_API_KEY": LS_API_KEY,
        "BASIC_AUTH_USER": BASIC_USER,
        "BASIC_AUTH_PASS": BASIC_PASS,
        "VALVE_ID_PSEUDONYM_KEY": PSEUDONYM_KEY,
        "LOCAL_FILES_DOCUMENT_ROOT": str(image_root),
        "VALVE_ID_ALLOWED_HOSTS": "",
        "LOG_LEVEL": "DEBUG",
        # One intra-op thread: the 2-core test box is shared (see backend/service/predictor.py).
        "OMP_NUM_THREADS": "1",
    }
    running = RunningServer.start(env, state / "server.log", auth=(BASIC_USER, BASIC_PASS))
    yield running
    running.stop()
