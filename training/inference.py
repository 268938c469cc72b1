"""Batched forward passes over prepared images — shared by evaluation and serving.

Torch only (no fastai): out-of-fold evaluation and the simulation call
:func:`predict_logits`; the backend's predictor builds its batches from the same pieces
(:func:`iter_batches`, :func:`to_network_input`, :func:`autocast_for`), so a model is scored
the same way wherever it runs.
Normalisation is :func:`training.preprocess.normalize_image`, the one preprocessing seam.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from training.preprocess import PreprocessParams, normalize_image

__all__ = ["autocast_for", "iter_batches", "predict_logits", "to_network_input"]

DEFAULT_BATCH_SIZE = 16
"""Images per forward pass when the caller does not say (fits 512² ResNet-34 on CPU)."""


def autocast_for(device: torch.device, enabled: bool = True) -> AbstractContextManager[object]:
    """Mixed precision that works on this device: fp16 AMP on CUDA, bf16 autocast on CPU."""
    if not enabled:
        return nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def to_network_input(
    prepared: torch.Tensor,
    params: PreprocessParams,
    *,
    channels_last: bool = True,
) -> torch.Tensor:
    """``(N, H, W)`` prepared images in [0, 1] (any float dtype) → normalised float32 batch."""
    batch = normalize_image(prepared.float(), params)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def iter_batches(n: int, batch_size: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)``."""
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    prepared: np.ndarray | torch.Tensor,
    params: PreprocessParams,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = DEFAULT_BATCH_SIZE,
    mixed_precision: bool = True,
    channels_last: bool = True,
) -> np.ndarray:
    """Logits ``(N, K)`` float32 for prepared images ``(N, H, W)`` in [0, 1]."""
    device = torch.device(device)
    model.eval()
    images = torch.as_tensor(prepared)
    outputs: list[torch.Tensor] = []
    for part in iter_batches(len(images), batch_size):
        batch = to_network_input(images[part].to(device), params, channels_last=channels_last)
        with autocast_for(device, mixed_precision):
            outputs.append(model(batch).float().cpu())
    if not outputs:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(outputs).numpy()
