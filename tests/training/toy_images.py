"""Toy "X-rays" for the locate-then-classify tests: a small object whose shape is the class,
at a random place on dim noise, so a real Lite0 learns where and what in seconds."""

from __future__ import annotations

import numpy as np

from training.fitting.config import RecipeConfig

SIDE = 192
"""Side of the toy images (px)."""


def ring_or_cross(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images (n, SIDE, SIDE) float16, labels, centres (n, 2) in [0, 1])``: a bright ring
    (class 0) or a bright cross (class 1)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    images = rng.uniform(0.1, 0.3, (n, SIDE, SIDE)).astype(np.float32)
    labels = np.arange(n) % 2
    centres = rng.uniform(0.15, 0.85, (n, 2)).astype(np.float32)
    for i in range(n):
        cx, cy = centres[i] * SIDE
        r = np.hypot(xx - cx, yy - cy)
        if labels[i] == 0:
            mask = (r > 6) & (r < 10)
        else:
            mask = ((abs(xx - cx) < 2.5) | (abs(yy - cy) < 2.5)) & (r < 10)
        images[i][mask] = 0.95
    return images.astype(np.float16), labels, centres


def toy_recipe(**overrides: object) -> RecipeConfig:
    """The ``cpu`` profile scaled to the toys: both stages learn them in a few seconds."""
    values: dict[str, object] = {
        "image_size_px": SIDE,
        "locator_px": 96,
        "crop_fraction": 0.25,
        "crop_px": 48,
        "epochs": 8,
        "locator_epochs": 60,
        **overrides,
    }
    return RecipeConfig.from_profile("cpu", **values)
