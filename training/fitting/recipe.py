"""The paper's training recipe (Vach et al. 2025, Methods / Model Training), with fastai 2.8.

One fold = one fastai ``Learner`` on a :class:`training.shared.model.ValveNet` (ResNet-34 body +
fastai-style head, a plain ``nn.Module`` so serving never needs fastai). Faithful to the paper,
with the published code's bugs fixed:

* class weights are the inverse class frequency **of the training fold**, ordered like the
  class vocabulary (the published code used ``1/sqrt`` of whole-data counts in frequency
  order — a silent mismatch as soon as the vocabulary order differs from the frequency order);
* the same preprocessing function for training and evaluation (:mod:`training.shared.preprocess`);
* the maximum learning rate the paper reports (3e-3; the code used ``fine_tune(50, 1e-3)``).

Hyperparameters sit in :class:`training.fitting.config.RecipeConfig` (fastai-free, so the backend
can
build a run's configuration); folds come from :mod:`training.fitting.splits`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fastai.callback.progress  # noqa: F401  (patches Learner.no_bar)
import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle)
import numpy as np
import torch
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import Adam
from fastai.torch_core import TensorImage, params
from fastai.vision.augment import aug_transforms
from fasttransform import Pipeline

from training.fitting.config import PROFILES, RecipeConfig
from training.shared.inference import autocast_dtype, predict_logits, to_network_input
from training.shared.model import InitInfo, ValveNet, build_model, layer_groups
from training.shared.preprocess import PreprocessParams

__all__ = [
    "PROFILES",
    "FoldResult",
    "RecipeConfig",
    "class_weights",
    "pick_device",
    "seed_everything",
    "train_fold",
]

logger = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


def pick_device() -> torch.device:
    """The GPU this worker was given (``CUDA_VISIBLE_DEVICES``), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def class_weights(train_labels: Sequence[int], num_classes: int) -> np.ndarray:
    """Inverse class frequency on the training fold, indexed by class id (vocabulary order).

    ``w_c = n / (K_present * n_c)``: balanced classes get weight 1. A class absent from the
    training fold gets weight 1: it is never a target in training, and in validation it then
    counts like a balanced class (a weight of 0 would make the loss of a validation batch made
    only of such images 0/0).
    """
    counts = np.bincount(np.asarray(train_labels, dtype=np.int64), minlength=num_classes)
    present = counts > 0
    weights = np.ones(num_classes, dtype=np.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.astype(np.float32)


class _ArrayDataset(torch.utils.data.Dataset):
    """Prepared ``(H, W)`` float16 images and int labels, indexed in memory."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class _AugmentAndNormalize(Callback):
    """Batch transforms on the device: augment (training only), then the shared normalise.

    Augmentations are fastai's ``aug_transforms`` (flip, rotate, zoom, lighting, warp) on the
    [0, 1] image, before :func:`training.shared.preprocess.normalize_image` — validation batches get
    only the normalisation, exactly like serving.
    """

    order = 5  # before MixedPrecision (10): inputs are ready before autocast starts

    def __init__(self, params: PreprocessParams, config: RecipeConfig) -> None:
        self.params, self.channels_last = params, config.channels_last
        tfms = aug_transforms(
            max_rotate=config.max_rotate_deg,
            max_zoom=config.max_zoom,
            max_lighting=config.max_lighting,
            max_warp=config.max_warp,
            do_flip=True,
        )
        self.augment = Pipeline(tfms, split_idx=0) if config.augment else None

    def before_batch(self) -> None:
        x = self.xb[0].float()  # (B, H, W) in [0, 1]
        if self.training and self.augment is not None:
            x = self.augment(TensorImage(x.unsqueeze(1))).as_subclass(torch.Tensor)[:, 0]
            x = x.clamp(0.0, 1.0)
        self.learn.xb = (to_network_input(x, self.params, channels_last=self.channels_last),)


class _CpuBf16(Callback):
    """bf16 autocast for CPU training (fastai's MixedPrecision is CUDA-only); added only on a
    CPU with native bf16 (:func:`training.shared.inference.autocast_dtype`)."""

    order = 10

    def before_batch(self) -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        self._ctx: torch.autocast | None = ctx
        ctx.__enter__()

    def after_pred(self) -> None:
        self.learn.pred = self.pred.float()

    def after_loss(self) -> None:
        self._exit()

    def after_batch(self) -> None:
        self._exit()

    def _exit(self) -> None:
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            self._ctx = None
            ctx.__exit__(None, None, None)


class _ReportProgress(Callback):
    """Epoch-level progress (losses, validation macro-F1) to a caller's function."""

    order = 90

    def __init__(self, fold: int, total_epochs: int, progress: ProgressFn | None) -> None:
        self.fold, self.total, self.progress_fn = fold, total_epochs, progress
        self.done = 0
        self.history: list[dict[str, Any]] = []

    def after_epoch(self) -> None:
        self.done += 1
        names = self.recorder.metric_names[1:-1]  # drop "epoch" and "time"
        values = [_finite_or_none(v) for v in self.recorder.log[1:-1]]
        row = {
            "fold": self.fold,
            "epoch": self.done,
            "epochs": self.total,
            **dict(zip(names, values, strict=False)),
        }
        self.history.append(row)
        logger.info("fold %d epoch %d/%d %s", self.fold, self.done, self.total, row)
        if self.progress_fn is not None:
            self.progress_fn(row)


def _finite_or_none(value: object) -> float | None:
    """Epoch numbers as JSON can hold them: a diverged (NaN/inf) value becomes None."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


@dataclass
class FoldResult:
    """What one fold produces: the trained network and its out-of-fold logits."""

    model: ValveNet
    val_logits: np.ndarray
    history: list[dict[str, Any]]
    init: InitInfo
    class_weights: np.ndarray


def _loaders(
    images: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    config: RecipeConfig,
    device: torch.device,
) -> DataLoaders:
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    targets = torch.from_numpy(labels.astype(np.int64))

    def loader(idx: np.ndarray, train: bool) -> DataLoader:
        ds = _ArrayDataset(tensor[idx], targets[idx])
        return DataLoader(
            ds,
            bs=config.batch_size,
            shuffle=train,
            drop_last=train and len(idx) > config.batch_size,
            device=device,
            pin_memory=device.type == "cuda",
        )

    return DataLoaders(loader(train_idx, True), loader(val_idx, False), device=device)


def train_fold(
    images: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    num_classes: int,
    config: RecipeConfig,
    *,
    fold: int = 0,
    device: torch.device | None = None,
    progress: ProgressFn | None = None,
) -> FoldResult:
    """Train one fold and score its validation images (the out-of-fold predictions)."""
    from fastai.metrics import F1Score, accuracy  # fastai metrics need sklearn; load lazily

    device = device or pick_device()
    seed_everything(config.seed + fold)
    prep = config.preprocess_params()
    weights = class_weights(labels[train_idx], num_classes)
    model, init = build_model(num_classes, pretrained=config.pretrained, arch=config.arch)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)

    dls = _loaders(images, labels, train_idx, val_idx, config, device)
    imagenet = init.init == "imagenet"
    total_epochs = (config.freeze_epochs if imagenet else 0) + config.train_epochs
    reporter = _ReportProgress(fold, total_epochs, progress)
    cbs: list[Callback] = [
        _AugmentAndNormalize(prep, config),
        GradientAccumulation(n_acc=config.effective_batch_size),
        reporter,
    ]
    learn = Learner(
        dls,
        model,
        loss_func=CrossEntropyLossFlat(weight=torch.from_numpy(weights).to(device)),
        opt_func=Adam,
        metrics=[accuracy, F1Score(average="macro")],
        splitter=lambda m: [params(g) for g in layer_groups(m)],
        cbs=cbs,
    )
    if config.mixed_precision and autocast_dtype(device) is not None:
        if device.type == "cuda":
            learn.to_fp16()
        elif device.type == "cpu":
            learn.add_cb(_CpuBf16())

    with learn.no_bar(), learn.no_logging():
        if imagenet:
            # fastai's fine_tune shape: head-only warm-up, then everything with
            # discriminative rates whose maximum is the paper's 3e-3 (one rate for the cpu
            # profile, as measured: the small body adapts fastest that way).
            if config.freeze_epochs:
                learn.freeze()
                learn.fit_one_cycle(config.freeze_epochs, config.lr_max)
            learn.unfreeze()
            lr = config.lr_max
            learn.fit_one_cycle(
                config.epochs,
                lr if config.body_lr_ratio == 1 else slice(lr * config.body_lr_ratio, lr),
            )
        else:
            learn.fit_one_cycle(config.train_epochs, config.lr_max)

    model = learn.model
    val_logits = predict_logits(
        model,
        images[val_idx],
        prep,
        device=device,
        batch_size=config.batch_size,
        mixed_precision=config.mixed_precision,
        channels_last=config.channels_last,
    )
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    return FoldResult(model, val_logits, reporter.history, init, weights)
