"""The served model version: loaded once, hot-swapped, batched fast inference, cached results.

What a :class:`Predictor` holds is one immutable :class:`_Served` state (the version's fold
ensemble, preprocessing parameters, temperature, classes and acquisition). A request takes
that state once and uses it throughout, and :meth:`Predictor.refresh` builds a *complete* new
state before replacing the one attribute, so concurrent requests see the old version or the
new one, never a mix. ``refresh`` is a throttled read of the registry's tiny ``current``
file, called at the start of every :meth:`Predictor.predict`: every backend process picks up
a promoted version by itself, without a restart. A version that fails to load leaves the
previous one in service and says why in :attr:`Predictor.load_error`.

Per request: inputs are hashed (sha256 of the file bytes); results cached under
``(hash, version)`` are returned as they are (an unchanged task is never recomputed); the
rest are decoded and preprocessed (:func:`training.shared.dicom.load_image`,
:func:`training.shared.preprocess.prepare_image` — the same functions training used) in a thread
pool, and go through the ensemble ``batch_size`` at a time. A bad image becomes a
:class:`PredictionError` for itself only. Each answer also says where the valve is (pixels of
the original image), so the pre-annotation can mark it for the annotator.

The fast path (default on): channels_last weights and inputs plus bf16 autocast on the CPU
(fp16 AMP on CUDA), conv and linear weights stored in that dtype (autocast would cast them
on every forward; stored, they take half the memory, and the answers are bit for bit the
same). It was adopted because ``tests/backend/test_predictor.py::
test_fast_path_agrees_with_fp32_on_a_trained_model`` shows the same top-1 as eager fp32 on
a trained model; on a CPU with AMX it is several times faster. Autocast computes only the
versions whose folds were trained in its dtype (each fold records its precision): a
version trained elsewhere in fp32 or fp16 is served in fp32, since Lite0's answers change
with the precision (:func:`_serves_in_mixed_precision`). ``compile=True`` adds
``torch.compile`` (inductor, ``freezing``): off by default because compiling a ResNet-34
takes minutes on a 2-core CPU. It happens at load (a warm-up batch of ``batch_size``, then
one image, which compiles the dynamic-batch graph every other request size uses), while the
previous version keeps serving.

Threads: :meth:`Predictor.predict` may run in many threads at once (the app calls it through
Starlette's thread pool, so decoding never blocks the event loop). Models are in eval mode
under ``torch.inference_mode()`` and keep no per-call state. Decoding runs in one pool per
predictor (CPU-count threads), concurrently across requests; forward passes run one batch at
a time (a lock), because each already uses every core through torch's intra-op threads and
two at once would only fight over them. Torch's intra-op thread count is left at its default
(one per core; ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` change it). On a machine
whose cores are busy with other processes, one thread can be much faster than the default:
OpenMP threads wait for each other (a 2-core test box shared with other jobs trained a fold in
5 s with one thread and 83 s with two).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from backend.service.prediction import Prediction, PredictionError
from backend.service.ranking import (
    resolve_acquisition,
    score,
    validate_acquisition,
    with_setting,
)
from training.shared.dicom import load_image
from training.shared.errors import ModelLoadError, ValveIdError
from training.shared.inference import (
    autocast_dtype,
    autocast_for,
    computes_as_trained,
    iter_batches,
    to_network_input,
)
from training.shared.locate_classify import (
    LocateClassifyNet,
    SettingLayout,
    averaged_views,
    setting_blocks,
)
from training.shared.model import load_fold_models
from training.shared.novelty import NOVELTY_FILE, Novelty, features_and_logits
from training.shared.preprocess import (
    PreprocessParams,
    from_prepared_fraction,
    prepare_image_with_source,
)
from training.shared.registry import Registry, open_registry
from training.shared.saliency import grad_cam, saliency_peaks
from training.shared.setting_gate import proposed_settings
from training.shared.uncertainty import (
    bald,
    entropy,
    margin,
    max_softmax,
    normalized_entropy,
    softmax,
)
from training.shared.version_config import CONFIG_FILE, VersionConfig, read_version_file

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_CACHE_SIZE",
    "REFRESH_INTERVAL_S",
    "Prediction",
    "PredictionError",
    "Predictor",
]

logger = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 16
"""Images per forward pass (a 512² ResNet-34 batch of 16 needs ~1.5 GB of activations)."""
DEFAULT_CACHE_SIZE = 10_000
"""Cached predictions (entries of about 1 kB): a few projects' worth of tasks."""
REFRESH_INTERVAL_S = 1.0
"""Seconds between two looks at the registry's ``current`` pointer (a tiny file read)."""


@dataclass(frozen=True)
class _Served:
    """Everything one model version needs to answer; replaced whole, never modified."""

    version: str
    classes: tuple[str, ...]
    params: PreprocessParams
    temperature: float
    acquisition: str
    models: tuple[nn.Module, ...]
    novelty: Novelty | None = None
    """The version's novelty model (:mod:`training.shared.novelty`); None before it existed."""
    explainer: nn.Module | None = None
    """The first fold's network, uncompiled: Grad-CAM needs its hooks and gradients. None for
    locate-then-classify versions, whose locator answers where the valve is."""
    settings: SettingLayout = ()
    """The setting scales the version reads (a locate-then-classify version trained on a
    config with scales); empty: it reads none."""
    proposed: frozenset[str] = frozenset()
    """The valve models whose settings it reads well enough to propose
    (:mod:`training.shared.setting_gate`)."""
    source_px: int | None = None
    """The side each X-ray's unsquished source is kept at, for a setting reader that reads
    at the X-ray's own pixels (:attr:`TwoStageParams.source_px`); None: none is kept (also
    where no setting it reads is proposed: nothing is read)."""
    mixed_precision: bool = True
    """Whether the fast path's autocast computes this version's forwards: only where its
    folds were trained in the same precision (:func:`_serves_in_mixed_precision`)."""


@dataclass(frozen=True)
class _Outputs:
    """What the ensemble answered for a batch of prepared images."""

    logits: np.ndarray
    """``(members, n, K)`` float32."""
    centres: np.ndarray
    """``(n, 2)`` valve centres, fractions of the prepared square (NaN: none found)."""
    novelty: np.ndarray
    """``(n,)`` novelty in [0, 1] (NaN: the version has no novelty model)."""
    setting_logits: np.ndarray | None = None
    """``(members, n, T)`` float32 setting logits; None when the version reads no setting."""


@dataclass(frozen=True)
class _Prepared:
    """One decoded image: the network's square, the crop that made it, the original size."""

    array: np.ndarray
    box: tuple[int, int, int, int]
    size_px: tuple[int, int]
    """``(width, height)`` of the original image."""
    source: np.ndarray | None = None
    """The foreground at its own pixels, for a reader that reads there; else None."""


class _LRUCache:
    """A bounded, thread-safe least-recently-used map with hit/miss counters."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[Hashable, Prediction] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Prediction | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: Hashable, value: Prediction) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


class Predictor:
    """The registry's current version, served (see the module docstring).

    ``acquisition`` is ``auto`` (the version's report decides) or a name from
    :data:`training.shared.uncertainty.ACQUISITIONS`. ``device`` defaults to CUDA when available.
    ``refresh_interval_s`` throttles :meth:`refresh` (tests set 0). ``locate`` (default on)
    also answers where the valve is: a locate-then-classify version's locator costs nothing
    extra; a whole-image version's Grad-CAM peak costs one backward pass of one fold network.
    ``gate_settings`` (default on) answers only the settings the version read well out of fold
    (:mod:`training.shared.setting_gate`); off, every scale it reads (for measuring them).
    ``test_views`` (1, 2, 4 or 8) overrides the views a locate-then-classify version averages
    each crop over (:func:`training.shared.locate_classify.averaged_views`); None: as it was
    trained. For comparing them on one version (``benchmarks/bench_heldout.py``).
    """

    def __init__(
        self,
        registry_root: str | os.PathLike[str] | Registry,
        *,
        acquisition: str = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: str | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        fast_path: bool = True,
        compile: bool = False,
        refresh_interval_s: float = REFRESH_INTERVAL_S,
        locate: bool = True,
        gate_settings: bool = True,
        test_views: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self._acquisition_setting = validate_acquisition(acquisition)
        self._registry = (
            open_registry(registry_root)
            if isinstance(registry_root, str | os.PathLike)
            else registry_root
        )
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._batch_size = batch_size
        self._fast_path = fast_path
        self._compile = compile
        self._refresh_interval_s = refresh_interval_s
        self._locate = locate
        self._gate_settings = gate_settings
        self._test_views = None if test_views is None else averaged_views(test_views)
        self._cache = _LRUCache(cache_size)
        self._workers = os.cpu_count() or 1
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="valve-id-decode")
        self._state: _Served | None = None
        self._load_error: str | None = None
        self._failed_version: str | None = None
        self._swap_lock = threading.Lock()
        self._forward_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._images_inferred = 0
        self._image_errors = 0
        self._last_check = -math.inf
        self.refresh(force=True)

    # --- what is served ---------------------------------------------------------------

    @property
    def version(self) -> str | None:
        """The served version id, or ``None`` when none could be loaded (or none exists)."""
        state = self._state
        return state.version if state else None

    @property
    def classes(self) -> tuple[str, ...]:
        state = self._state
        return state.classes if state else ()

    @property
    def load_error(self) -> str | None:
        """Why the registry's current version is not the one served, if it is not."""
        return self._load_error

    def info(self) -> dict[str, Any]:
        """What ``/health`` shows."""
        state = self._state
        return {
            "version": state.version if state else None,
            "classes": list(state.classes) if state else [],
            "acquisition": state.acquisition if state else self._acquisition_setting,
            "load_error": self._load_error,
            "n_models": len(state.models) if state else 0,
            "device": str(self._device),
            "fast_path": self._fast_path,
            "mixed_precision": (
                _precision_name(self._device)
                if state is not None and state.mixed_precision
                else None
            ),
            "compiled": self._compile,
        }

    def stats(self) -> dict[str, int]:
        """Counters for ``/metrics``."""
        with self._stats_lock:
            inferred, errors = self._images_inferred, self._image_errors
        return {
            "cache_hits": self._cache.hits,
            "cache_misses": self._cache.misses,
            "cache_entries": len(self._cache),
            "cache_capacity": self._cache.capacity,
            "images_inferred": inferred,
            "image_errors": errors,
        }

    # --- hot swap -----------------------------------------------------------------------

    def refresh(self, *, force: bool = False, wait: bool = True) -> bool:
        """Serve the registry's current version if it changed; ``True`` when it was swapped.

        At most one look per ``refresh_interval_s`` unless ``force`` (a caller that must see
        a version promoted a moment ago, like a re-scoring job, passes ``force=True``). One
        loader at a time: ``wait=True`` waits for a load in progress, ``wait=False`` (what
        :meth:`predict` does, so no request waits for a model to load or compile) goes on
        with the version in service and loads a new one in a background thread.
        """
        if not force and time.monotonic() - self._last_check < self._refresh_interval_s:
            return False
        if not self._swap_lock.acquire(blocking=wait):
            return False
        handed_over = False
        try:
            self._last_check = time.monotonic()
            version_id = self._changed_version()
            if version_id is None:
                return False
            if wait:
                return self._swap_to(version_id)
            threading.Thread(
                target=self._swap_and_release,
                args=(version_id,),
                name="valve-id-model-load",
                daemon=True,
            ).start()
            handed_over = True  # the loader thread releases the lock when it is done
            return False
        finally:
            if not handed_over:
                self._swap_lock.release()

    def _changed_version(self) -> str | None:
        """The registry's current version if it should be loaded now, else ``None``."""
        try:
            current = self._registry.current()
        except OSError as exc:
            logger.warning("cannot read the registry's current version: %s", exc)
            return None
        if current is not None and current == self.version:
            self._failed_version = self._load_error = None  # e.g. rolled back to it
            return None
        if current is None or current == self._failed_version:
            return None
        return current

    def _swap_and_release(self, version_id: str) -> None:
        try:
            self._swap_to(version_id)
        finally:
            self._swap_lock.release()

    def _swap_to(self, version_id: str) -> bool:
        try:
            state = _load_served(
                self._registry,
                version_id,
                self._device,
                self._acquisition_setting,
                fast_path=self._fast_path,
                compile=self._compile,
                warmup_batch=self._batch_size,
                gate_settings=self._gate_settings,
                test_views=self._test_views,
            )
        except Exception as exc:  # any failure to load means "keep the old one", never crash
            self._failed_version = version_id
            self._load_error = f"version {version_id} could not be loaded: {exc}"
            logger.error("%s; still serving %s", self._load_error, self.version or "nothing")
            return False
        previous = self.version
        self._state = state  # one attribute replaced: requests see old or new, never a mix
        self._failed_version = None
        self._load_error = None
        logger.info(
            "serving model version %s (was %s): %d model(s), acquisition %s",
            version_id,
            previous,
            len(state.models),
            state.acquisition,
        )
        return True

    # --- prediction ---------------------------------------------------------------------

    def predict(
        self, images: Sequence[bytes | BaseException]
    ) -> list[Prediction | PredictionError | None]:
        """One result per input, in input order; all ``None`` when no version is served.

        An input is the image file's bytes or the exception that prevented fetching them
        (which becomes that item's :class:`PredictionError`).
        """
        self.refresh(wait=False)
        state = self._state
        if state is None:
            return [None] * len(images)
        results: list[Prediction | PredictionError | None] = [None] * len(images)
        pending: dict[str, list[int]] = {}  # content hash -> positions (duplicates decode once)
        payloads: dict[str, bytes] = {}
        for i, item in enumerate(images):
            if isinstance(item, BaseException):
                results[i] = PredictionError(_reason(item))
                continue
            if not isinstance(item, bytes | bytearray | memoryview):
                results[i] = PredictionError(f"expected image bytes, got {type(item).__name__}")
                continue
            digest = hashlib.sha256(item).hexdigest()
            cached = self._cache.get((digest, state.version))
            if cached is not None:
                results[i] = cached
                continue
            pending.setdefault(digest, []).append(i)
            payloads.setdefault(digest, bytes(item))
        digests = list(pending)
        # Decode a chunk, infer it, then the next: memory stays bounded for large requests.
        for part in iter_batches(len(digests), max(self._batch_size, self._workers)):
            for digest, result in self._predict_new(state, digests[part], payloads):
                for i in pending[digest]:
                    results[i] = result
        return results

    def _predict_new(
        self, state: _Served, digests: list[str], payloads: dict[str, bytes]
    ) -> list[tuple[str, Prediction | PredictionError]]:
        prepared = list(
            self._executor.map(
                lambda d: _prepare(payloads[d], d, state.params, state.source_px), digests
            )
        )
        out: list[tuple[str, Prediction | PredictionError]] = []
        good: list[tuple[str, _Prepared]] = []
        for digest, item in zip(digests, prepared, strict=True):
            if isinstance(item, PredictionError):
                out.append((digest, item))
            else:
                good.append((digest, item))
        if good:
            arrays = np.stack([item.array for _, item in good])
            sources = [item.source for _, item in good] if state.source_px else None
            outputs = self._forward(state, arrays, sources)
            predictions = _to_predictions(state, outputs, good)
            for prediction in predictions:
                self._cache.put((prediction.content_hash, state.version), prediction)
                out.append((prediction.content_hash, prediction))
        with self._stats_lock:
            self._images_inferred += len(good)
            self._image_errors += len(digests) - len(good)
        return out

    def _forward(
        self, state: _Served, prepared: np.ndarray, sources: Sequence[Any] | None = None
    ) -> _Outputs:
        """The ensemble's answers for prepared images ``(n, H, W)`` (and their sources, where
        the version's setting reader reads at the X-ray's own pixels): see :class:`_Outputs`."""
        images = torch.from_numpy(prepared)
        n = len(images)
        logits = np.empty((len(state.models), n, len(state.classes)), dtype=np.float32)
        centres = np.full((n, 2), np.nan, dtype=np.float64)
        novelty = np.full(n, np.nan, dtype=np.float64)
        total = sum(len(values) for _, values in state.settings)
        # Only the settings it will propose are read: a version whose gate proposes none
        # spends nothing on its reader (a framed model's reading is a template search).
        reads = total and state.proposed
        readings = np.full((len(state.models), n, total), np.nan, np.float32) if reads else None
        for part in iter_batches(n, self._batch_size):
            batch = to_network_input(
                images[part].to(self._device), state.params, channels_last=self._fast_path
            )
            seen = None if sources is None else [torch.from_numpy(a) for a in sources[part]]
            # One batch at a time (see the module docstring), released between batches so
            # a small request is not stuck behind a large one.
            with self._forward_lock, autocast_for(self._device, state.mixed_precision):
                located: list[np.ndarray] = []
                features: list[np.ndarray] = []
                with torch.inference_mode():
                    for m, model in enumerate(state.models):
                        # A locator answers once; the crop is classified there (as forward).
                        locate = getattr(model, "locate", None)
                        where = locate(batch) if locate is not None else None
                        if where is not None:
                            located.append(where.float().cpu().numpy())
                        if readings is not None:  # one pass: class, features and setting
                            crop = model.answer(  # type: ignore[operator]
                                batch, where, seen, valves=state.proposed
                            )
                            features.append(crop.features.float().cpu().numpy())
                            readings[m, part] = crop.setting_logits.float().cpu().numpy()
                            answer = crop.logits
                        elif state.novelty is None:
                            answer = model(batch) if where is None else model(batch, where)
                        else:
                            found, answer = features_and_logits(model, batch, where)
                            features.append(found.float().cpu().numpy())
                        logits[m, part] = answer.float().cpu().numpy()
                if located:
                    centres[part] = np.mean(located, axis=0)
                elif self._locate and state.explainer is not None:
                    centres[part] = _saliency_centres(state.explainer, batch)
                if state.novelty is not None:
                    novelty[part] = state.novelty.score(features, logits[:, part])
        return _Outputs(logits, centres, novelty, readings)

    # --- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the decode threads (the process is ending)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- loading a version --------------------------------------------------------------------


def _load_served(
    registry: Registry,
    version_id: str,
    device: torch.device,
    acquisition: str,
    *,
    fast_path: bool,
    compile: bool,
    warmup_batch: int,
    gate_settings: bool = True,
    test_views: tuple[int, ...] | None = None,
) -> _Served:
    """Build the complete state for ``version_id``; :class:`ModelLoadError` if it is unusable."""
    path = registry.version_path(version_id)
    config = VersionConfig.read(path)
    try:
        metrics = read_version_file(path / "metrics.json")
    except ModelLoadError:
        metrics = {}  # picks the acquisition and the settings to propose; defaults are safe
    models = load_fold_models(path / "weights", map_location=device)
    if test_views is not None:
        for model in models:
            if isinstance(model, LocateClassifyNet):
                model.params = replace(model.params, test_views=test_views)
    if config.folds is not None and len(config.folds) != len(models):
        raise ModelLoadError(
            f"{CONFIG_FILE} lists {len(config.folds)} folds, {len(models)} checkpoints found",
            source=str(path / "weights"),
        )
    for model in models:
        if tuple(model.classes or ()) != config.classes:
            raise ModelLoadError(
                f"fold classes {model.classes} differ from {CONFIG_FILE}'s {list(config.classes)}",
                source=str(path / "weights"),
            )
    mixed = fast_path and _serves_in_mixed_precision(config, device, version_id)
    if len({_how_it_reads(model) for model in models}) > 1:  # served as one, from models[0]
        raise ModelLoadError(
            "the fold networks read settings differently (scales, or square vs the X-ray's "
            "own pixels): they come from different runs; train the version again",
            source=str(path / "weights"),
        )
    readable = frozenset(valve for valve, _ in _setting_layout(models[0]))
    proposed = readable & proposed_settings(metrics) if gate_settings else readable
    served = _Served(
        version=version_id,
        classes=config.classes,
        params=config.preprocess,
        temperature=config.temperature,
        acquisition=resolve_acquisition(acquisition, metrics),
        models=tuple(
            _for_serving(m, fast_path=fast_path, mixed=mixed, compile=compile) for m in models
        ),
        # _for_serving prepared models[0] in place; compiling wrapped it, not replaced it.
        explainer=None if hasattr(models[0], "locate") else models[0],
        novelty=_load_novelty(path, len(models)),
        settings=_setting_layout(models[0]),
        source_px=_source_px(models[0], proposed),
        proposed=proposed,
        mixed_precision=mixed,
    )
    if compile:  # compile now, while the previous version still serves
        _warm_up(served, device, warmup_batch, fast_path)
    return served


def _serves_in_mixed_precision(config: VersionConfig, device: torch.device, version: str) -> bool:
    """Whether autocast may compute this version's forwards on ``device``: only when every
    fold was trained in what it would compute in here. A Lite0 trained in fp32 and scored in
    bf16 autocast got 73 of 79 demo X-rays right instead of 76 (docs/PERFORMANCE.md), so a
    version trained on another machine (fp32, or fp16 on a GPU) is served in fp32 on a bf16
    CPU. Versions that did not record their precision are served as before."""
    recorded = {fold.precision for fold in config.folds or () if fold.precision is not None}
    if computes_as_trained(device, recorded):
        return True
    trained = " and ".join(sorted(recorded))
    logger.info("version %s was trained in %s; serving it in float32 here", version, trained)
    return False


def _how_it_reads(model: nn.Module) -> tuple[str, SettingLayout, int | None]:
    """What of a fold network the version serves from its first fold alone."""
    if isinstance(model, LocateClassifyNet):
        return "locate_classify", model.params.settings, model.params.source_px
    return "whole_image", (), None


def _source_px(model: nn.Module, proposed: frozenset[str]) -> int | None:
    """The side to keep each X-ray's own pixels at: where the version's reader reads there
    and some setting it reads is proposed (none is read otherwise)."""
    if not (isinstance(model, LocateClassifyNet) and proposed):
        return None
    return model.params.source_px


def _setting_layout(model: nn.Module) -> SettingLayout:
    """The scales a fold network reads: a locate-then-classify network's, else none."""
    return model.params.settings if isinstance(model, LocateClassifyNet) else ()


def _load_novelty(path: Path, n_folds: int) -> Novelty | None:
    """The version's novelty model, or None (older versions have none: no flag, no error)."""
    if not (path / NOVELTY_FILE).is_file():
        return None
    novelty = Novelty.load(path / NOVELTY_FILE)
    if novelty.n_folds != n_folds:
        raise ModelLoadError(
            f"{NOVELTY_FILE} has {novelty.n_folds} folds, the version {n_folds}",
            source=str(path),
        )
    return novelty


def _for_serving(
    model: nn.Module, *, fast_path: bool, compile: bool, mixed: bool | None = None
) -> nn.Module:
    """channels_last on the fast path, and weights in the autocast dtype where autocast
    computes the forwards (``mixed``, default: the fast path)."""
    model.eval().requires_grad_(False)
    if fast_path:
        model = model.to(memory_format=torch.channels_last)
    if fast_path if mixed is None else mixed:
        _keep_weights_in_autocast_dtype(model)
    if compile:
        import torch._inductor.config as inductor_config

        # Freezing folds the (now constant) weights into the graph: BN into conv, etc.
        inductor_config.freezing = True
        return torch.compile(model, backend="inductor")  # type: ignore[return-value]
    return model


def _keep_weights_in_autocast_dtype(model: nn.Module) -> None:
    """Store conv and linear weights in the dtype autocast computes them in (bf16 on a CPU).

    Autocast casts these weights on every forward anyway, and rounding fp32 to bf16 once at
    load gives the very same values, so the answers do not change; each forward skips the
    casts, and the weights take half the memory (a 5-fold ResNet-34: 417 → 210 MB).
    BatchNorm keeps fp32 parameters, as it does under autocast.
    """
    first = next(model.parameters(), None)
    dtype = autocast_dtype(first.device) if first is not None else None
    if dtype is None:
        return
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d | nn.Linear):
            layer.to(dtype)


def _warm_up(served: _Served, device: torch.device, batch: int, fast_path: bool) -> None:
    """Compile now: a full batch, then one image, whose new shape makes dynamo build the
    dynamic-batch graph that serves every other request size (no request waits for it)."""
    size = served.params.size_px
    for n in dict.fromkeys((batch, 1)):
        dummy = torch.zeros((n, size, size), device=device)
        with torch.inference_mode(), autocast_for(device, served.mixed_precision):
            net_input = to_network_input(dummy, served.params, channels_last=fast_path)
            for model in served.models:
                model(net_input)


# --- per-image steps --------------------------------------------------------------------


def _prepare(
    data: bytes, digest: str, params: PreprocessParams, source_px: int | None
) -> _Prepared | PredictionError:
    """Decode + preprocess one image (runs in the decode pool); errors become values. With
    ``source_px`` the unsquished foreground is kept too (a setting reader reads there)."""
    try:
        image = load_image(data, name="image")
        array, box, source = prepare_image_with_source(image, params, source_px)
        if source is not None:  # float16, as training's cache keeps it (and half the memory)
            source = source.astype(np.float16)
        return _Prepared(array, box, (int(image.shape[1]), int(image.shape[0])), source)
    except ValveIdError as exc:
        return PredictionError(str(exc), digest)
    except Exception as exc:  # a decoder bug must cost one image, not the batch
        logger.warning("unexpected %s while decoding an image", type(exc).__name__)
        return PredictionError(f"image could not be read ({type(exc).__name__})", digest)


def _saliency_centres(explainer: nn.Module, batch: torch.Tensor) -> np.ndarray:
    """Where a whole-image network looked hardest (its Grad-CAM peak), ``(n, 2)`` fractions.

    Costs one backward pass of one fold network; a failure costs the location, never the
    prediction.
    """
    body = getattr(explainer, "body", None)
    try:
        if not isinstance(body, nn.Sequential):
            raise TypeError(f"{type(explainer).__name__} has no body to explain")
        return saliency_peaks(grad_cam(explainer, batch, body[-1]))
    except Exception as exc:
        logger.warning("no saliency location (%s)", type(exc).__name__)
        return np.full((len(batch), 2), np.nan)


def _to_predictions(
    state: _Served, outputs: _Outputs, images: Sequence[tuple[str, _Prepared]]
) -> list[Prediction]:
    member_probs = softmax(outputs.logits, state.temperature)  # (m, n, K)
    probs = member_probs.mean(axis=0)
    scores = score(state.acquisition, probs, member_probs)
    centres, novelty = outputs.centres, outputs.novelty
    flag = state.novelty.flag_quantile if state.novelty is not None else math.inf
    unfamiliar = np.nan_to_num(novelty, nan=0.0) >= flag
    # An X-ray unlike every learned model goes to the top of the review queue, the most
    # unusual first, whatever the classes' probabilities say.
    scores = np.where(unfamiliar, np.minimum(scores, 1.0 - novelty), scores)
    readings = _setting_readings(
        state.settings, state.proposed, outputs.setting_logits, len(images)
    )
    labels = [state.classes[int(c)] for c in np.argmax(probs, axis=1)]
    sure = np.array(
        [r.get(label, (None, 1.0))[1] for r, label in zip(readings, labels, strict=True)]
    )
    scores = with_setting(scores, sure)
    measures = {
        "entropy": entropy(probs),
        "normalized_entropy": normalized_entropy(probs),
        "margin": margin(probs),
        "max_softmax": max_softmax(probs),
        "bald": bald(member_probs),
    }
    source = "saliency" if state.explainer is not None else "locator"
    predictions = []
    for i, (digest, image) in enumerate(images):
        found = bool(np.isfinite(centres[i]).all())
        predictions.append(
            Prediction(
                label=labels[i],
                probs={c: float(p) for c, p in zip(state.classes, probs[i], strict=True)},
                score=float(scores[i]),
                uncertainty={name: float(values[i]) for name, values in measures.items()},
                model_version=state.version,
                content_hash=digest,
                centre_px=(
                    from_prepared_fraction(centres[i, 0], centres[i, 1], image.box)
                    if found
                    else None
                ),
                image_size_px=image.size_px,
                centre_source=source if found else None,
                novelty=float(novelty[i]) if np.isfinite(novelty[i]) else None,
                unfamiliar=bool(unfamiliar[i]),
                settings=readings[i],
            )
        )
    return predictions


def _setting_readings(
    layout: SettingLayout, proposed: frozenset[str], logits: np.ndarray | None, n: int
) -> list[dict[str, tuple[str, float]]]:
    """Per image, each ``proposed`` scale's most probable setting and its probability: the
    fold members' mean softmax within the valve model's block (``logits`` ``(members, n, T)``)."""
    readings: list[dict[str, tuple[str, float]]] = [{} for _ in range(n)]
    if logits is None or not layout:
        return readings
    blocks = setting_blocks(layout)
    for valve, values in layout:
        if valve not in proposed:
            continue
        block = softmax(logits[:, :, blocks[valve]], 1.0).mean(axis=0)
        for i in range(n):
            best = int(np.argmax(block[i]))
            readings[i][valve] = (values[best], float(block[i, best]))
    return readings


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, ValveIdError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _precision_name(device: torch.device) -> str | None:
    dtype = autocast_dtype(device)
    return str(dtype).removeprefix("torch.") if dtype is not None else None
