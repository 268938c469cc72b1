"""Small raster helpers shared by the synthetic X-ray renderer: noise, blur, resampling."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = [
    "SUPERSAMPLING",
    "downsample",
    "gaussian_blur",
    "lowpass",
    "paste",
    "rotation",
    "smooth_noise",
]

SUPERSAMPLING = 2
"""Sub-pixels per pixel side used to draw valves and tubing (anti-aliasing)."""


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """Band-limited noise, unit variance: white noise on a coarse grid, upsampled bicubically."""
    h, w = shape
    gh, gw = max(2, int(h / cell_px) + 3), max(2, int(w / cell_px) + 3)
    coarse = rng.standard_normal((gh, gw), dtype=np.float32)
    img = Image.fromarray(coarse, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    std = float(out.std())
    return out / std if std > 0 else out


def gaussian_blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur with a short kernel (a detector PSF is ~1 px), edges repeated."""
    radius = max(1, int(math.ceil(3.0 * sigma_px)))
    taps = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (taps / sigma_px) ** 2)
    kernel /= kernel.sum()
    out = image
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="edge")
        n = out.shape[axis]
        acc = np.zeros_like(out)
        for k, weight in enumerate(kernel):
            acc += weight * (padded[k : k + n] if axis == 0 else padded[:, k : k + n])
        out = acc
    return out


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Block mean by ``factor`` (the shape must be divisible)."""
    if factor == 1:
        return image
    h, w = image.shape
    return image.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def lowpass(image: np.ndarray, factor: int) -> np.ndarray:
    """A cheap large-scale blur: shrink by ``factor`` (box), blur there, grow back."""
    h, w = image.shape
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    small = pil.resize((max(1, w // factor), max(1, h // factor)), Image.Resampling.BOX)
    smooth = gaussian_blur(np.asarray(small, dtype=np.float32), 2.0)
    grown = Image.fromarray(smooth, mode="F").resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(grown, dtype=np.float32)


def paste(target: np.ndarray, patch: np.ndarray, x0: int, y0: int) -> None:
    """Add ``patch`` into ``target`` with its top-left corner at (x0, y0), clipped."""
    h, w = target.shape
    ph, pw = patch.shape
    tx0, ty0, tx1, ty1 = max(0, x0), max(0, y0), min(w, x0 + pw), min(h, y0 + ph)
    if tx0 < tx1 and ty0 < ty1:
        target[ty0:ty1, tx0:tx1] += patch[ty0 - y0 : ty1 - y0, tx0 - x0 : tx1 - x0]


def rotation(angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[c, -s], [s, c]])
