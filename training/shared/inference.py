"""Batched forward passes over prepared images — shared by evaluation and serving.

Torch only (no fastai): out-of-fold evaluation and the simulation call
:func:`predict_logits`; the backend's predictor builds its batches from the same pieces
(:func:`iter_batches`, :func:`to_network_input`, :func:`autocast_for`), so a model is scored
the same way wherever it runs.
Normalisation is :func:`training.shared.preprocess.normalize_image`, the one preprocessing seam.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch import nn

from training.shared.preprocess import PreprocessParams, normalize_image

__all__ = [
    "autocast_dtype",
    "autocast_for",
    "cpu_has_native_bf16",
    "iter_batches",
    "computes_as_trained",
    "precision_name",
    "predict_logits",
    "to_network_input",
]

DEFAULT_BATCH_SIZE = 16
"""Images per forward pass when the caller does not say (fits 512² ResNet-34 on CPU)."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX).

    Without it oneDNN emulates bf16, and emulation is far slower than plain fp32: measured on
    a 2-core AVX2-only AMD EPYC, a Lite0 training step at 384² took 14× and a forward pass 33×
    as long in bf16 autocast as in fp32 (docs/PERFORMANCE.md). torch names the test only in
    private helpers; a torch without them is treated as having no native bf16.
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, name)()) for name in checks)
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype mixed precision computes in on ``device``, or ``None`` where it would not pay:
    fp16 on CUDA, bf16 on a CPU with native bf16, nothing elsewhere (fp32).

    The one decision training (the recipe, the two-stage design) and serving (the
    predictor's fast path) share, so both sides run the same arithmetic on one machine.
    """
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def precision_name(device: torch.device, enabled: bool = True) -> str:
    """What :func:`autocast_for` ``(device, enabled)`` computes convolutions in: ``"bfloat16"``,
    ``"float16"`` or ``"float32"``. Each fold records it: Lite0's answers change with the
    precision (a fold trained in fp32 and scored in bf16 autocast: 73 of 79 demo X-rays right
    instead of 76, docs/PERFORMANCE.md), so serving computes in the one a version was
    trained in."""
    dtype = autocast_dtype(device) if enabled else None
    return str(dtype or torch.float32).removeprefix("torch.")


def computes_as_trained(device: torch.device, trained_in: Collection[str]) -> bool:
    """Whether mixed precision on ``device`` computes in what every fold was trained in
    (:func:`precision_name` each); none recorded (older versions): yes, as before. Serving
    and the novelty reference that training computes for it both ask this."""
    recorded = set(trained_in)
    return not recorded or recorded == {precision_name(device)}


def autocast_for(device: torch.device, enabled: bool = True) -> AbstractContextManager[object]:
    """Mixed precision where it pays on this device (:func:`autocast_dtype`), else fp32."""
    dtype = autocast_dtype(device) if enabled else None
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


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
