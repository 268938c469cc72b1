"""Mixed precision only where the hardware computes it: training and serving share the rule."""

from __future__ import annotations

import pytest
import torch

import training.shared.inference
from training.shared.inference import autocast_dtype, autocast_for

CPU = torch.device("cpu")


@pytest.mark.parametrize(("native", "expected"), [(True, torch.bfloat16), (False, None)])
def test_a_cpu_computes_in_bf16_only_with_native_bf16(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: torch.dtype | None
) -> None:
    monkeypatch.setattr(training.shared.inference, "cpu_has_native_bf16", lambda: native)
    assert autocast_dtype(CPU) == expected
    with autocast_for(CPU):
        assert torch.is_autocast_enabled("cpu") is native
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == (torch.bfloat16 if native else torch.float32)


def test_cuda_always_gets_fp16_and_disabled_means_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(training.shared.inference, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(torch.device("cuda")) == torch.float16
    with autocast_for(CPU, enabled=False):
        assert not torch.is_autocast_enabled("cpu")


def test_the_probe_answers_on_this_machine() -> None:
    """Whatever the CPU, the probe returns a bool (a torch without the private helpers: False)."""
    assert isinstance(training.shared.inference.cpu_has_native_bf16(), bool)
