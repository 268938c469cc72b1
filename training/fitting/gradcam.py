"""Grad-CAM overlays for the report: the heat map blended over the X-ray (the paper's Fig. 5).

The maps themselves come from :func:`training.shared.saliency.grad_cam` (torch only, shared
with serving, which takes a valve location from their peak); this adds the colour map.
"""

from __future__ import annotations

import logging

import numpy as np
from matplotlib import colormaps
from PIL import Image

__all__ = ["OVERLAY_ALPHA", "overlay"]

logger = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.4
"""Weight of the heat map when blended over the X-ray (0 = X-ray only, 1 = heat map only)."""


def overlay(image_01: np.ndarray, cam: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend a Grad-CAM map (``jet`` colour map) over a grayscale image; ``(H, W, 3)`` uint8.

    ``image_01`` is ``(H, W)`` in [0, 1]; ``cam`` in [0, 1] is resized to it if needed.
    """
    image = np.clip(np.asarray(image_01, dtype=np.float64), 0.0, 1.0)
    heat = np.clip(np.asarray(cam, dtype=np.float64), 0.0, 1.0)
    if image.ndim != 2 or heat.ndim != 2:
        raise ValueError(f"image and cam must be 2-D, got {image.shape} and {heat.shape}")
    if heat.shape != image.shape:
        resized = Image.fromarray(heat.astype(np.float32)).resize(
            (image.shape[1], image.shape[0]), Image.Resampling.BILINEAR
        )
        heat = np.clip(np.asarray(resized, dtype=np.float64), 0.0, 1.0)
    coloured = colormaps["jet"](heat)[..., :3]
    blended = (1.0 - alpha) * image[..., None] + alpha * coloured
    return np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)
