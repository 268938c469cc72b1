"""The one preprocessing function: grayscale X-ray → network input.

Training, evaluation and serving all call :func:`preprocess_image` (or its two halves,
:func:`prepare_image` then :func:`normalize_image`) with the :class:`PreprocessParams`
saved in the model version, so the three can never drift apart. (The paper's published
code trained on squished images and evaluated on centre-cropped ones; here that is
impossible by construction.)

The steps follow the paper (Vach et al. 2025, Methods / Dataset):

1. grayscale float, bright bone on dark background (see :mod:`training.shared.dicom`);
2. scale the image's own range to [0, 1];
3. crop away the black background: keep the bounding box of pixels brighter than
   ``background_threshold``. The paper keeps pixels ``> 0``; real exports carry near-black
   noise in the collimated border, so a row/column only counts as foreground if at least
   ``min_foreground_fraction`` of it is above the threshold. If nothing qualifies the
   image is kept whole: the crop never produces an empty image;
4. resize to ``size_px`` × ``size_px`` by *squishing* (no aspect-preserving crop: the valve
   may sit at the edge of the radiograph);
5. clip to [0, 1] and lay out the channels the network expects (grayscale repeated to
   ``channels``, then ``(x - mean) / std``).

Steps 2–4 (:func:`prepare_image`) give a compact single-channel array worth caching;
step 5 (:func:`normalize_image`) is cheap and may run batched on the accelerator.
:func:`prepare_image_with_box` is the same steps 2–4 plus the crop they made, which maps a
point of the original image (the valve centre) into the prepared square
(:func:`to_prepared_fraction`); :func:`prepare_image_with_source` also keeps that crop at
the X-ray's own pixels, unsquished, for the setting reader (:func:`native_source`).
A change to what steps 2–4 produce must bump :data:`training.shared.dataset.CACHE_VERSION`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PreprocessParams",
    "crop_to_foreground",
    "foreground_box",
    "from_prepared_fraction",
    "native_source",
    "normalize_image",
    "prepare_image",
    "prepare_image_with_box",
    "prepare_image_with_source",
    "preprocess_image",
    "scale_to_unit_range",
    "source_side_px",
    "squish",
    "to_prepared_fraction",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet, what torchvision's pretrained ResNet-34 expects."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet."""


@dataclass(frozen=True)
class PreprocessParams:
    """Everything that defines the network input; saved with every model version."""

    size_px: int = 512
    """Side of the square network input, pixels (the paper: 512)."""
    background_threshold: float = 0.02
    """Foreground = brighter than this, on the [0, 1]-scaled image (≈ 5 of 255 grey levels)."""
    min_foreground_fraction: float = 0.005
    """A row/column belongs to the crop if at least this fraction of it is foreground."""
    channels: int = 3
    """Channels of the network input: the grayscale image repeated (ImageNet nets want 3)."""
    mean: tuple[float, ...] = field(default=IMAGENET_MEAN)
    """Per-channel mean subtracted after scaling to [0, 1]."""
    std: tuple[float, ...] = field(default=IMAGENET_STD)
    """Per-channel standard deviation divided out after subtracting the mean."""

    def __post_init__(self) -> None:
        if self.size_px < 8:
            raise ValueError(f"size_px must be at least 8, got {self.size_px}")
        if not 0.0 <= self.background_threshold < 1.0:
            raise ValueError("background_threshold must lie in [0, 1)")
        if not 0.0 <= self.min_foreground_fraction < 1.0:
            raise ValueError("min_foreground_fraction must lie in [0, 1)")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessParams:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error, not ignored."""
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing parameters: {sorted(unknown)}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


def scale_to_unit_range(image: np.ndarray) -> np.ndarray:
    """Linearly map the image's own min..max to 0..1 (a constant image becomes all zeros)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {img.shape}")
    if not np.all(np.isfinite(img)):
        img = np.nan_to_num(img, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(img.min()), float(img.max())
    if hi <= lo:
        return np.zeros_like(img)
    return (img - lo) / (hi - lo)


def _foreground_span(counts: np.ndarray, needed: float) -> tuple[int, int] | None:
    """First and one-past-last index whose foreground count reaches ``needed``."""
    idx = np.flatnonzero(counts >= needed)
    if idx.size == 0:
        return None
    return int(idx[0]), int(idx[-1]) + 1


def foreground_box(
    image: np.ndarray, threshold: float, min_fraction: float = 0.0
) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` (half-open) of the crop :func:`crop_to_foreground` keeps.

    The whole image when nothing qualifies. A point ``(x, y)`` of the original image lies at
    ``((x - left) / (right - left), (y - top) / (bottom - top))`` of the prepared square.
    """
    mask = image > threshold
    height, width = mask.shape
    rows = _foreground_span(mask.sum(axis=1), max(1.0, min_fraction * width))
    cols = _foreground_span(mask.sum(axis=0), max(1.0, min_fraction * height))
    if rows is None or cols is None:
        return 0, height, 0, width
    return rows[0], rows[1], cols[0], cols[1]


def crop_to_foreground(
    image: np.ndarray, threshold: float, min_fraction: float = 0.0
) -> np.ndarray:
    """Crop to the bounding box of foreground pixels; never returns an empty image.

    ``image`` is 2-D and already scaled to [0, 1]. A row counts if at least
    ``max(1, min_fraction * width)`` of its pixels exceed ``threshold`` (columns alike),
    which ignores isolated noise pixels in a black border. With no foreground at all the
    image comes back unchanged.
    """
    top, bottom, left, right = foreground_box(image, threshold, min_fraction)
    return image[top:bottom, left:right]


def squish(image: np.ndarray, size_px: int) -> np.ndarray:
    """Resize to ``size_px`` × ``size_px`` ignoring the aspect ratio (antialiased bilinear)."""
    if image.shape == (size_px, size_px):
        return image.astype(np.float32, copy=False)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32), mode="F")
    resized = pil.resize((size_px, size_px), resample=Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def prepare_image_with_box(
    image: np.ndarray, params: PreprocessParams
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """:func:`prepare_image` and the crop it made: ``(prepared, (top, bottom, left, right))``.

    The box (half-open, pixels of ``image``) is what maps a point of the original image into
    the prepared square (:func:`to_prepared_fraction`).
    """
    prepared, box, _ = prepare_image_with_source(image, params, None)
    return prepared, box


def prepare_image_with_source(
    image: np.ndarray, params: PreprocessParams, source_px: int | None
) -> tuple[np.ndarray, tuple[int, int, int, int], np.ndarray | None]:
    """:func:`prepare_image_with_box` and, with ``source_px``, the same foreground crop
    *not* squished (:func:`native_source`): what a setting reader reads at the X-ray's own
    pixels. One pass over the image for both, so the two can never disagree on the crop."""
    unit = scale_to_unit_range(image)
    box = foreground_box(unit, params.background_threshold, params.min_foreground_fraction)
    top, bottom, left, right = box
    foreground = unit[top:bottom, left:right]
    # Bilinear resampling can overshoot by rounding only; clip keeps the [0, 1] contract.
    prepared = np.clip(squish(foreground, params.size_px), 0.0, 1.0)
    source = None if source_px is None else native_source(foreground, source_px)
    return prepared, box, source


def source_side_px(crop_px: int, fraction: float) -> int:
    """The geometric-mean side (pixels) a source needs for a reader that sees ``fraction`` of
    it at ``crop_px`` pixels: its crops are then never shrunk (:func:`native_source`)."""
    return math.ceil(crop_px / fraction)


def native_source(foreground: np.ndarray, side_px: int) -> np.ndarray:
    """The X-ray's foreground crop (scaled to [0, 1]) at its own pixels and aspect, shrunk
    (antialiased, aspect kept) only where the geometric mean of its sides exceeds
    ``side_px``: a reader that sees ``fraction`` of that side at ``n`` px needs no more than
    ``n / fraction`` (more would be thrown away by its resampling, and cost memory).
    Float32 in [0, 1]; a point at fraction ``(fx, fy)`` of the prepared square lies at the
    same fractions of it (both are the same crop)."""
    height, width = foreground.shape
    scale = min(1.0, side_px / math.sqrt(height * width))
    if scale >= 1.0:
        return np.clip(foreground.astype(np.float32, copy=True), 0.0, 1.0)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    pil = Image.fromarray(np.ascontiguousarray(foreground, dtype=np.float32), mode="F")
    shrunk = pil.resize(size, resample=Image.Resampling.BILINEAR)
    return np.clip(np.asarray(shrunk, dtype=np.float32), 0.0, 1.0)


def prepare_image(image: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Steps 2–4: scale, crop the background, squish. Returns float32 (size, size) in [0, 1].

    This is the part worth caching: it depends on the image and ``params`` only.
    """
    return prepare_image_with_box(image, params)[0]


def to_prepared_fraction(x: float, y: float, box: tuple[int, int, int, int]) -> tuple[float, float]:
    """A point ``(x, y)`` of the original image (pixels, x = column, origin top-left) as
    fractions ``(x, y)`` of the prepared square, clipped to [0, 1].

    ``box`` is the ``(top, bottom, left, right)`` crop of :func:`prepare_image_with_box`; the
    squish is linear, so the fraction is the point's place inside the crop. A point the crop
    cut away lands on the nearest edge.
    """
    top, bottom, left, right = box
    fx = (float(x) - left) / max(right - left, 1)
    fy = (float(y) - top) / max(bottom - top, 1)
    return min(max(fx, 0.0), 1.0), min(max(fy, 0.0), 1.0)


def from_prepared_fraction(
    fx: float, fy: float, box: tuple[int, int, int, int]
) -> tuple[float, float]:
    """The inverse of :func:`to_prepared_fraction`: fractions ``(x, y)`` of the prepared square
    as pixels ``(x, y)`` of the original image (where serving places the valve it found)."""
    top, bottom, left, right = box
    return left + float(fx) * (right - left), top + float(fy) * (bottom - top)


def normalize_image(prepared: Any, params: PreprocessParams) -> Any:
    """Step 5: (H, W) in [0, 1] → (channels, H, W) float32, ``(x - mean) / std``.

    Also accepts a batch ``(N, H, W)`` and returns ``(N, channels, H, W)``. Works on numpy
    arrays and, unchanged in meaning, on torch tensors (batches already on the accelerator),
    so training and serving share this one definition.
    """
    shape = (params.channels, 1, 1)
    if hasattr(prepared, "unsqueeze"):  # a torch tensor; torch is imported only by its callers
        mean = prepared.new_tensor(params.mean).reshape(shape)
        std = prepared.new_tensor(params.std).reshape(shape)
        stacked = prepared.unsqueeze(-3).expand(*prepared.shape[:-2], params.channels, -1, -1)
        return (stacked - mean) / std
    arr = np.asarray(prepared, dtype=np.float32)
    mean_np = np.asarray(params.mean, dtype=np.float32).reshape(shape)
    std_np = np.asarray(params.std, dtype=np.float32).reshape(shape)
    stacked_np = np.repeat(arr[..., None, :, :], params.channels, axis=-3)
    return (stacked_np - mean_np) / std_np


def preprocess_image(image: np.ndarray, params: PreprocessParams | None = None) -> np.ndarray:
    """The whole pipeline: grayscale X-ray → normalised (channels, size, size) float32."""
    params = params or PreprocessParams()
    return normalize_image(prepare_image(image, params), params)
