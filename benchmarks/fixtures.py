"""What the benchmarks run against: synthetic PNG tasks, published versions, Redis, a backend.

Everything is built in a temporary folder and torn down afterwards. The backend is the real
one (``valve-id serve`` in a subprocess, uvicorn, the registry's current version, images read
through Label Studio's local-files route), so an HTTP number includes request parsing, image
reading, decoding, preprocessing, the forward passes, the Redis bookkeeping and the JSON
answer. Versions are random-init networks: speed does not depend on what the weights learned
(the agreement check in :mod:`benchmarks.bench_predict` trains real ones). A
:class:`VersionKind` says which network a version holds: today's ResNet-34 at 512² (the
default), or the ``cpu`` profile's EfficientNet-Lite0, whole image or locate-then-classify.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.fitting.config import RecipeConfig

__all__ = [
    "BENCH_PROJECT",
    "CPU_LOCATE_CLASSIFY",
    "CPU_WHOLE_IMAGE",
    "LABEL_CONFIG_PATH",
    "LOCATE_CLASSIFY",
    "PRECISIONS",
    "ROOT",
    "Backend",
    "Deployment",
    "Served",
    "VersionKind",
    "XrayImages",
    "backend_server",
    "deployment",
    "class_names",
    "free_port",
    "in_process_predictors",
    "local_task",
    "network_batch",
    "predict_all",
    "publish_random_version",
    "quadrant_image",
    "quadrant_png",
    "redis_server",
    "serving_model",
    "train_quadrant_version",
]

ROOT = Path(__file__).resolve().parents[1]
LABEL_CONFIG_PATH = ROOT / "label_config.xml"
BENCH_PROJECT = "1.1700000000"
"""The ``"<id>.<created_ts>"`` project key Label Studio sends with ``/predict``."""
SERVER_START_TIMEOUT_S = 600.0
"""Seconds a backend may take to import, load (and possibly compile) its version."""
VERSION_ID = "bench-1"
"""Id of the random-init versions the benchmarks publish."""
REDIS_START_TIMEOUT_S = 10.0
"""Seconds a private redis-server may take to answer PING."""


def class_names() -> tuple[str, ...]:
    """The classes of the shipped label config (the vocabulary's one source)."""
    from training.shared.labels import load_label_config

    return tuple(load_label_config(LABEL_CONFIG_PATH).classes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- images -------------------------------------------------------------------------------


class XrayImages:
    """Synthetic skull radiographs, rendered once, written as 8-bit PNGs like ``valve-id
    import`` writes them.

    ``variant`` stamps two pixels near the centre: same content for the network, different
    bytes, so each round of a benchmark sees images the predictor's cache has never seen.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        shape: tuple[int, int] | None = None,
    ) -> None:
        from training.synthetic import VALVE_CLASSES, render_xray

        rng = np.random.default_rng(seed)
        self.labels = [VALVE_CLASSES[i % len(VALVE_CLASSES)] for i in range(n)]
        self.arrays: list[np.ndarray] = []
        for label in self.labels:
            image, _ = render_xray(rng, label, shape=shape)
            self.arrays.append(np.round(image * 255).astype(np.uint8))

    def __len__(self) -> int:
        return len(self.arrays)

    def png(self, i: int, variant: int = 0) -> bytes:
        from PIL import Image

        pixels = self.arrays[i]
        if variant:
            pixels = pixels.copy()
            h, w = pixels.shape
            pixels[h // 2, w // 2] = variant % 256
            pixels[h // 2, w // 2 + 1] = (variant // 256) % 256
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue()

    def write(self, folder: Path, variant: int = 0) -> list[Path]:
        """Write every image as ``folder/v<variant>_<i>.png``; returns the paths."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(len(self)):
            path = folder / f"v{variant}_{i}.png"
            path.write_bytes(self.png(i, variant))
            paths.append(path)
        return paths


def local_task(task_id: int, path: Path, files_root: Path) -> dict[str, Any]:
    """A Label Studio task whose image is a local file (``/data/local-files/?d=...``)."""
    rel = path.resolve().relative_to(files_root.resolve()).as_posix()
    return {"id": task_id, "data": {"image": f"/data/local-files/?d={rel}"}}


# --- model versions -----------------------------------------------------------------------

LOCATE_CLASSIFY = "locate_classify"
"""``design`` of the ``cpu`` profile's two-stage network (:mod:`training.fitting.two_stage`)."""
_ARCH_NAMES = {"resnet34": "ResNet-34", "resnet18": "ResNet-18", "efficientnet_lite0": "Lite0"}


@dataclass(frozen=True)
class VersionKind:
    """Which network a published version holds, at which input size.

    ``design="locate_classify"`` is :class:`training.shared.locate_classify.LocateClassifyNet`
    (the ``cpu`` profile's design: images prepared at ``size_px``, the locator sees
    ``locator_px``, the classifier a ``crop_fraction`` crop resampled to ``crop_px``); otherwise
    a whole-image :class:`training.shared.model.ValveNet`. Normalisation is what ``arch``'s
    ImageNet weights expect
    (Lite0: mean = std = 0.5), as training writes it.
    """

    arch: str = "resnet34"
    size_px: int = 512
    design: str = "whole_image"
    locator_px: int = 384
    crop_px: int = 160
    crop_fraction: float = 0.25
    test_views: int = 1
    """Flips/turns each crop is averaged over (``RecipeConfig.test_views``)."""

    @property
    def name(self) -> str:
        arch = _ARCH_NAMES.get(self.arch, self.arch)
        if self.design == LOCATE_CLASSIFY:
            views = f", {self.test_views} views" if self.test_views > 1 else ""
            return (
                f"{arch} locate→classify ({self.size_px}², locator {self.locator_px}², "
                f"crop {self.crop_px}²{views})"
            )
        return f"{arch} at {self.size_px}²"

    def preprocess(self) -> Any:
        from training.shared.model import get_arch
        from training.shared.preprocess import PreprocessParams

        weights = get_arch(self.arch).weights
        return PreprocessParams(size_px=self.size_px, mean=weights.mean, std=weights.std)

    def random_model(self, num_classes: int) -> Any:
        """A random-init network of this kind (the speed of a trained one)."""
        from training.shared.model import ValveNet

        if self.design != LOCATE_CLASSIFY:
            return ValveNet(num_classes, arch=self.arch)
        from training.shared.locate_classify import (
            LocateClassifyNet,
            TwoStageParams,
            averaged_views,
        )

        params = TwoStageParams(
            backbone=self.arch,
            locator_px=self.locator_px,
            crop_fraction=self.crop_fraction,
            crop_px=self.crop_px,
            test_views=averaged_views(self.test_views),
        )
        return LocateClassifyNet(num_classes, params)


CPU_LOCATE_CLASSIFY = VersionKind(
    arch="efficientnet_lite0",
    size_px=768,
    design=LOCATE_CLASSIFY,
    test_views=RecipeConfig.test_views,
)
"""The ``cpu`` profile's default design as it serves (768² prepared, locator 384², crop 160²,
each crop averaged over the recipe's test views)."""
CPU_WHOLE_IMAGE = VersionKind(arch="efficientnet_lite0", size_px=384)
"""The ``cpu`` profile's whole-image fallback (Lite0 at 384²)."""


def publish_random_version(
    model_dir: Path,
    *,
    n_folds: int,
    size_px: int | None = None,
    arch: str = "resnet34",
    version_id: str = VERSION_ID,
    seed: int = 0,
    kind: VersionKind | None = None,
) -> str:
    """Publish a version of ``n_folds`` random-init models; its id.

    The network is ``kind``, else a whole-image ``arch`` at ``size_px``.
    """
    import torch

    from training.shared.model import save_checkpoint
    from training.shared.registry import ModelRegistry

    if kind is None:
        if size_px is None:
            raise ValueError("give size_px (with arch) or kind")
        kind = VersionKind(arch=arch, size_px=size_px)
    classes = list(class_names())
    registry = ModelRegistry(model_dir)
    staging = registry.staging("bench")
    torch.manual_seed(seed)
    for k in range(n_folds):
        model = kind.random_model(len(classes))
        save_checkpoint(model, staging / "weights" / f"fold_{k}.pt", classes=classes)
    config = {
        "format": 1,
        "version": version_id,
        "classes": classes,
        "preprocess": kind.preprocess().to_dict(),
        "temperature": 1.0,
        "arch": kind.arch,
        "design": kind.design,
        "folds": [{"fold": k, "weights": f"weights/fold_{k}.pt"} for k in range(n_folds)],
    }
    metrics = {
        "mean": {"f1_macro": 0.5},
        "classes": classes,
        "uncertainty": {"best_acquisition": "entropy"},
    }
    (staging / "config.json").write_text(json.dumps(config))
    (staging / "metrics.json").write_text(json.dumps(metrics))
    registry.publish(staging, version_id=version_id)
    return version_id


def quadrant_image(
    label: int,
    rng: np.random.Generator,
    *,
    size_px: int = 96,
    contrast: float = 1.0,
    rival: int | None = None,
    rival_strength: float = 0.0,
) -> tuple[bytes, tuple[float, float]]:
    """:func:`quadrant_png` and the centre ``(x, y)`` of the class's square, in pixels (the
    "valve centre" a locate-then-classify recipe learns from)."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (size_px, size_px), 0)
    draw = ImageDraw.Draw(image)
    frame = int(rng.integers(30, 60))
    draw.rectangle([2, 2, size_px - 3, size_px - 3], fill=frame)
    bright = frame + contrast * (int(rng.integers(150, 196)) - frame)
    squares = [(label, bright)]
    if rival is not None:
        squares.append((rival, frame + rival_strength * (bright - frame)))
    side = size_px // 3
    centre = (0.0, 0.0)
    for i, (quadrant, level) in enumerate(squares):
        x0 = 8 + (quadrant % 2) * (size_px // 2) + int(rng.integers(0, 6))
        y0 = 8 + (quadrant // 2) * (size_px // 2) + int(rng.integers(0, 6))
        draw.rectangle([x0, y0, x0 + side, y0 + side], fill=int(level))
        if i == 0:  # PIL fills both corners: pixels x0 .. x0 + side, i.e. [x0, x0 + side + 1)
            centre = (x0 + (side + 1) / 2, y0 + (side + 1) / 2)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue(), centre


def quadrant_png(
    label: int,
    rng: np.random.Generator,
    *,
    size_px: int = 96,
    contrast: float = 1.0,
    rival: int | None = None,
    rival_strength: float = 0.0,
) -> bytes:
    """A dim frame with a bright square whose quadrant is the class: learnable in seconds.

    ``contrast`` < 1 makes it faint; ``rival`` adds a second square (``rival_strength`` of
    the first's brightness) in another quadrant, so some answers are not saturated.
    """
    png, _ = quadrant_image(
        label,
        rng,
        size_px=size_px,
        contrast=contrast,
        rival=rival,
        rival_strength=rival_strength,
    )
    return png


def _quadrant_data(workdir: Path, n_images: int) -> Path:
    """``n_images`` quadrant PNGs and their manifest (with the squares' centres), made once."""
    classes = class_names()
    data = workdir / f"quadrants-{n_images}"
    if (data / "manifest.csv").exists():
        return data
    (data / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with open(data / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "patient_id", "valve_x", "valve_y"])
        for i in range(n_images):
            png, (x, y) = quadrant_image(i % 4, rng)
            (data / "images" / f"{i}.png").write_bytes(png)
            writer.writerow([f"images/{i}.png", classes[i % 4], f"patient-{i}", x, y])
    return data


def train_quadrant_version(
    model_dir: Path,
    workdir: Path,
    *,
    n_images: int,
    epochs: int,
    n_folds: int = 2,
    recipe: Any = None,
    version_id: str = "trained-1",
) -> str:
    """Train on quadrant images through the real run stages and publish; the version id.

    ``recipe`` (a :class:`training.fitting.config.RecipeConfig`; its epochs, folds and Grad-CAM are
    set here) defaults to a ResNet-18 from scratch at 64², about a minute at the defaults of
    bench_predict.
    """
    from training.fitting.config import RecipeConfig
    from training.fitting.run import run_in_process
    from training.shared.dataset import load_manifest
    from training.shared.labels import load_label_config
    from training.shared.registry import ModelRegistry

    if recipe is None:
        recipe = RecipeConfig.from_profile("quick", arch="resnet18", pretrained=False)
    recipe = recipe.with_overrides(
        epochs=epochs,
        epochs_from_scratch=epochs,
        n_folds=n_folds,
        augment=False,
        gradcam_per_class=0,
    )
    data = _quadrant_data(workdir, n_images)
    registry = ModelRegistry(model_dir)
    staging = registry.staging("trained")
    run_in_process(
        staging,
        load_manifest(data, class_names()),
        load_label_config(LABEL_CONFIG_PATH),
        recipe,
        source="quadrants",
        cache_dir=None,
        run_id=version_id,
    )
    registry.publish(staging, version_id=version_id)
    return version_id


# --- model-only contenders ----------------------------------------------------------------


def serving_model(model: Any, *, compile: bool, channels_last: bool = True) -> Any:
    """``model`` as the fastest serving path runs it on a CPU: eval, channels_last, bf16
    conv/linear weights, and optionally ``torch.compile`` (inductor with freezing: weights
    folded into the graph). Call it under bf16 autocast."""
    import torch

    model = model.eval().requires_grad_(False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    for layer in model.modules():  # what autocast computes in anyway (as the predictor does)
        if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear):
            layer.to(torch.bfloat16)
    if not compile:
        return model
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model, backend="inductor")


def network_batch(
    prepared: np.ndarray, size_px: int, *, channels_last: bool = True, params: Any = None
) -> Any:
    """Prepared ``(N, H, W)`` images → the normalised network input, made once.

    ``params`` (:class:`training.shared.preprocess.PreprocessParams`) default to ImageNet's
    normalisation at ``size_px``."""
    import torch

    from training.shared.inference import to_network_input
    from training.shared.preprocess import PreprocessParams

    return to_network_input(
        torch.from_numpy(np.ascontiguousarray(prepared)),
        params or PreprocessParams(size_px=size_px),
        channels_last=channels_last,
    )


PRECISIONS = {"bf16": True, "fp32": False}
"""In-process predictor paths: the served fast path (channels_last, bf16 weights and
autocast) and eager fp32 (``Predictor(fast_path=False)``; a backend always serves the first)."""


@contextlib.contextmanager
def in_process_predictors(
    model_dirs: dict[Any, Path], *, batch_size: int = 16
) -> Iterator[dict[tuple[Any, str], Any]]:
    """A :class:`backend.service.predictor.Predictor` per (key, precision) of :data:`PRECISIONS`,
    each serving its registry's current version in this process (no HTTP, no Redis)."""
    from backend.service.predictor import Predictor

    with contextlib.ExitStack() as stack:
        predictors = {}
        for key, model_dir in model_dirs.items():
            for precision, fast in PRECISIONS.items():
                predictors[(key, precision)] = stack.enter_context(
                    Predictor(model_dir, device="cpu", fast_path=fast, batch_size=batch_size)
                )
        yield predictors


def predict_all(predictor: Any, images: Sequence[bytes]) -> None:
    """``predictor.predict(images)``, checked: every image got a prediction."""
    from backend.service.predictor import Prediction

    results = predictor.predict(list(images))
    bad = [r for r in results if not isinstance(r, Prediction)]
    if bad:
        raise RuntimeError(f"the in-process predictor failed on {len(bad)} image(s): {bad[0]}")


# --- services -----------------------------------------------------------------------------


def _wait_for_redis(url: str, timeout_s: float) -> bool:
    from redis import Redis

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Redis.from_url(url, socket_timeout=1).ping():
                return True
        except Exception:
            time.sleep(0.05)
    return False


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A private, empty redis-server on a free loopback port; its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("the benchmarks need redis-server on PATH (apt install redis-server)")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        if not _wait_for_redis(url, REDIS_START_TIMEOUT_S):
            raise RuntimeError(f"redis-server did not start on port {port}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclass
class Backend:
    """A running ``valve-id serve`` process."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path
    label_config: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def predict(self, client: Any, tasks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """``POST /predict`` as Label Studio sends it; the results (each checked non-empty)."""
        response = client.post(
            f"{self.url}/predict",
            json={
                "tasks": list(tasks),
                "project": BENCH_PROJECT,
                "label_config": self.label_config,
            },
        )
        response.raise_for_status()
        results = response.json()["results"]
        if len(results) != len(tasks) or not all(r.get("result") for r in results):
            raise RuntimeError(f"/predict left tasks without a prediction; see {self.log}")
        return results


def _valve_id_command() -> list[str]:
    script = Path(sys.executable).with_name("valve-id")
    return [str(script)] if script.exists() else [sys.executable, "-m", "backend.tools.cli"]


@contextlib.contextmanager
def backend_server(
    model_dir: Path,
    files_root: Path,
    redis_url: str,
    workdir: Path,
    *,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Backend]:
    """``valve-id serve`` on a free port, serving ``model_dir``'s current version."""
    import httpx

    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"backend-{port}.log"
    env = {
        **os.environ,
        "VALVE_ID_STATE_DIR": str(workdir / "state"),
        "MODEL_DIR": str(model_dir),
        "LOCAL_FILES_DOCUMENT_ROOT": str(files_root),
        # Never contacted: every image is a local file under the root above.
        "LABEL_STUDIO_URL": "http://127.0.0.1:9",
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*_valve_id_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    backend = Backend(
        f"http://127.0.0.1:{port}", process, log, LABEL_CONFIG_PATH.read_text(encoding="utf-8")
    )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the backend exited with {process.returncode}; see {log}")
            try:
                health = httpx.get(f"{backend.url}/health", timeout=2).json()
                if health.get("model_loaded"):
                    break
                if health.get("load_error"):
                    raise RuntimeError(f"the backend cannot load the version: {health}")
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the backend did not become ready; see {log}")
            time.sleep(0.2)
        yield backend
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- a served deployment ------------------------------------------------------------------


@dataclass(frozen=True)
class Served:
    """One backend to start: a version of ``folds`` models, served eagerly or compiled."""

    folds: int
    compiled: bool = False
    """Start it with ``VALVE_ID_COMPILE=1``."""
    env: tuple[tuple[str, str], ...] = ()
    """More environment for this backend (e.g. allocator settings)."""
    kind: VersionKind | None = None
    """The network of its version; None: the deployment's default (``arch`` at ``size_px``)."""

    @property
    def name(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.env)
        return (
            (f"{self.kind.name}, " if self.kind is not None else "")
            + f"{self.folds}-model"
            + (", compiled" if self.compiled else "")
            + (f", {extra}" if extra else "")
        )

    def environment(self) -> dict[str, str]:
        return {"VALVE_ID_COMPILE": "1" if self.compiled else "0", **dict(self.env)}


class Deployment:
    """Running backends over one set of synthetic images.

    :meth:`tasks` writes an image variant on first use and returns Label Studio tasks for
    it, so a benchmark asks for fresh bytes (a cache miss) or the same ones (a hit).
    """

    def __init__(
        self,
        xrays: XrayImages,
        files_root: Path,
        backends: dict[Served, Backend],
        model_dirs: dict[tuple[VersionKind, int], Path],
        start_s: dict[Served, float],
        default_kind: VersionKind,
    ) -> None:
        self.xrays = xrays
        self.files_root = files_root
        self.backends = backends
        self.model_dirs = model_dirs
        """Registry of each published version, by (kind, folds)."""
        self.start_s = start_s
        """Seconds each backend took from launch to serving (loading, compiling)."""
        self.default_kind = default_kind
        self._written: dict[tuple[int, int], Path] = {}

    def kind(self, served: Served | VersionKind | None = None) -> VersionKind:
        """The network of ``served`` (a kind passes through; None: the default)."""
        if isinstance(served, VersionKind):
            return served
        if served is None or served.kind is None:
            return self.default_kind
        return served.kind

    def model_dir(self, served: Served | int, kind: VersionKind | None = None) -> Path:
        """The registry a backend serves (``served``), or that of ``folds`` models of ``kind``."""
        if isinstance(served, Served):
            return self.model_dirs[(self.kind(served), served.folds)]
        return self.model_dirs[(self.kind(kind), served)]

    def fold_weights(
        self, served: Served | int, fold: int = 0, kind: VersionKind | None = None
    ) -> Path:
        """Checkpoint of fold ``fold`` of ``served``'s version (or ``folds`` of ``kind``)."""
        folder = self.model_dir(served, kind) / "versions" / VERSION_ID / "weights"
        return folder / f"fold_{fold}.pt"

    def path(self, index: int, variant: int) -> Path:
        key = (index, variant)
        if key not in self._written:
            folder = self.files_root / "bench"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"v{variant}_{index}.png"
            path.write_bytes(self.xrays.png(index, variant))
            self._written[key] = path
        return self._written[key]

    def tasks(self, variant: int, indices: Sequence[int] | None = None) -> list[dict[str, Any]]:
        indices = range(len(self.xrays)) if indices is None else indices
        return [local_task(i, self.path(i, variant), self.files_root) for i in indices]


@contextlib.contextmanager
def deployment(
    workdir: Path,
    served: Sequence[Served],
    *,
    size_px: int,
    arch: str,
    n_images: int,
    extra_versions: Sequence[tuple[VersionKind, int]] = (),
) -> Iterator[Deployment]:
    """Publish one random-init version per (kind, fold count), start Redis and every backend.

    ``extra_versions`` are published too without a backend (for in-process contenders)."""
    files_root = workdir / "files"
    xrays = XrayImages(n_images, seed=0)
    default_kind = VersionKind(arch=arch, size_px=size_px)
    model_dirs: dict[tuple[VersionKind, int], Path] = {}
    wanted = [(s.kind or default_kind, s.folds) for s in served] + list(extra_versions)
    for kind, folds in dict.fromkeys(wanted):
        model_dirs[(kind, folds)] = workdir / f"models-{len(model_dirs)}"
        publish_random_version(model_dirs[(kind, folds)], n_folds=folds, kind=kind)
    with contextlib.ExitStack() as stack:
        redis_url = stack.enter_context(redis_server(workdir / "redis"))
        backends: dict[Served, Backend] = {}
        start_s: dict[Served, float] = {}
        for i, config in enumerate(served):
            started = time.perf_counter()
            backends[config] = stack.enter_context(
                backend_server(
                    model_dirs[(config.kind or default_kind, config.folds)],
                    files_root,
                    redis_url,
                    workdir / f"backend-{i}",
                    extra_env=config.environment(),
                )
            )
            start_s[config] = time.perf_counter() - started
        yield Deployment(xrays, files_root, backends, model_dirs, start_s, default_kind)
