"""Grad-CAM saliency maps: which image regions drove a class score (the paper's Fig. 5).

Grad-CAM (Selvaraju et al., IJCV 2020, eq. 1-2): for a convolutional layer with activations
``A^k`` (channels ``k``) and a class score ``y^c`` (the logit, before softmax),

* ``alpha_k^c = mean_{i,j} d y^c / d A^k_{ij}``   (spatially averaged gradients), and
* ``L^c = ReLU(sum_k alpha_k^c A^k)``,

upsampled bilinearly to the input size. Here each map is then min-max normalised to
[0, 1] per image, so maps show *where*, not *how strongly in absolute terms*.

Plain torch: it works on any ``nn.Module`` (e.g. the ResNet-34 of
:mod:`training.shared.model`, with ``target_layer=model.layer4`` or its equivalent).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["grad_cam", "saliency_peaks"]

_FLAT_CAM = 1e-12
"""A map whose max - min is below this is flat (no evidence): it is returned as zeros."""
PEAK_LEVEL = 0.8
"""A saliency peak is the centroid of the map above this fraction of its maximum: steadier
than the single brightest pixel of a map upsampled from a 16 × 16 grid."""


def grad_cam(
    model: nn.Module,
    inputs: torch.Tensor,
    target_layer: nn.Module,
    class_idx: Sequence[int] | None = None,
) -> np.ndarray:
    """Grad-CAM maps ``(N, H, W)`` in [0, 1] for ``inputs`` ``(N, C, H, W)``.

    ``class_idx`` picks the explained class per image (default: the predicted class).
    ``target_layer`` must be a submodule whose output is a ``(N, K, h, w)`` tensor.
    The model runs in eval mode (batch norm uses running stats, so images do not
    influence each other); each module's train/eval flag is restored afterwards, the hook
    is removed, and no gradient is accumulated into the parameters (``autograd.grad`` is
    taken with respect to the activations only).
    """
    if inputs.ndim != 4:
        raise ValueError(f"inputs must be (N, C, H, W), got shape {tuple(inputs.shape)}")
    n, _, height, width = inputs.shape
    if class_idx is not None and len(class_idx) != n:
        raise ValueError(f"class_idx has {len(class_idx)} entries for {n} images")

    captured: list[torch.Tensor] = []

    def keep_activation(_module: nn.Module, _args: object, output: object) -> None:
        if not isinstance(output, torch.Tensor) or output.ndim != 4:
            raise ValueError("target_layer must output a (N, K, h, w) tensor for Grad-CAM")
        captured.append(output)

    modes = {module: module.training for module in model.modules()}
    handle = target_layer.register_forward_hook(keep_activation)
    try:
        model.eval()
        with torch.enable_grad():
            # A leaf that requires grad keeps the graph alive even if every weight is frozen.
            x = inputs.detach().clone().requires_grad_(True)
            logits = model(x)
            if not captured:
                raise ValueError("target_layer was not called in the model's forward pass")
            activation = captured[-1]
            if class_idx is None:
                chosen = logits.argmax(dim=1)
            else:
                chosen = torch.as_tensor(list(class_idx), dtype=torch.long, device=logits.device)
            # Images are independent in eval mode, so one backward of the summed scores
            # gives each image the gradient of its own score.
            score = logits.gather(1, chosen.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(score, activation)
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
        cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)
        cam = cam[:, 0].to(torch.float64)
        lo = cam.amin(dim=(1, 2), keepdim=True)
        span = cam.amax(dim=(1, 2), keepdim=True) - lo
        cam = torch.where(span > _FLAT_CAM, (cam - lo) / span.clamp_min(_FLAT_CAM), 0.0)
        return cam.clamp(0.0, 1.0).cpu().numpy()
    finally:
        handle.remove()
        for module, was_training in modes.items():
            module.training = was_training


def saliency_peaks(cams: np.ndarray, level: float = PEAK_LEVEL) -> np.ndarray:
    """``(N, 2)`` peaks ``(x, y)`` as fractions of each ``(N, H, W)`` map; NaN for a flat map.

    Where a classifier looked hardest is where the valve most likely is: the paper's Grad-CAM
    figures sit on the valve. This is the location a whole-image version can offer before any
    annotator has placed a valve centre (locate-then-classify versions locate directly).
    """
    n, height, width = cams.shape
    peaks = np.full((n, 2), np.nan, dtype=np.float64)
    ys, xs = np.mgrid[0:height, 0:width]
    for i, cam in enumerate(cams):
        top = float(cam.max())
        if top <= 0.0:
            continue
        weights = np.where(cam >= level * top, cam, 0.0)
        total = float(weights.sum())
        peaks[i] = (
            (float((weights * xs).sum()) / total + 0.5) / width,
            (float((weights * ys).sum()) / total + 0.5) / height,
        )
    return peaks
