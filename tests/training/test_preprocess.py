"""The one preprocessing function: crop, squish, scale, normalise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.preprocess import (
    PreprocessParams,
    crop_to_foreground,
    normalize_image,
    prepare_image,
    preprocess_image,
    scale_to_unit_range,
    squish,
)


def _framed(height: int, width: int, box: tuple[int, int, int, int], value: float = 1000.0):
    """A black image with a bright rectangle ``box = (top, bottom, left, right)``."""
    img = np.zeros((height, width), dtype=np.float32)
    top, bottom, left, right = box
    img[top:bottom, left:right] = value
    return img


def test_crop_keeps_exactly_the_bounding_box_of_foreground() -> None:
    img = scale_to_unit_range(_framed(100, 80, (10, 70, 5, 60)))
    cropped = crop_to_foreground(img, threshold=0.02)
    assert cropped.shape == (60, 55)
    assert cropped.min() == 1.0


def test_crop_bounding_box_spans_separate_objects() -> None:
    img = np.zeros((50, 50), dtype=np.float32)
    img[5, 7] = 1.0
    img[40, 30] = 1.0
    assert crop_to_foreground(img, threshold=0.5).shape == (36, 24)


def test_crop_ignores_sparse_near_black_noise_in_the_border() -> None:
    rng = np.random.default_rng(0)
    img = _framed(200, 200, (50, 150, 40, 160), value=1.0)
    noise = rng.random((200, 200)) < 0.001  # isolated bright specks in the black border
    img[noise] = 1.0
    img += rng.uniform(0, 0.01, img.shape).astype(np.float32)  # near-black noise floor
    img = np.clip(img, 0, 1)
    cropped = crop_to_foreground(img, threshold=0.02, min_fraction=0.05)
    assert cropped.shape == (100, 120)


def test_paper_crop_without_noise_tolerance_keeps_a_single_pixel_line() -> None:
    img = _framed(20, 20, (5, 15, 5, 15), value=1.0)
    img[0, 0] = 0.5
    assert crop_to_foreground(img, threshold=0.0).shape == (15, 15)


@pytest.mark.parametrize("image", [np.zeros((30, 40)), np.full((30, 40), 7.0)])
def test_crop_never_returns_an_empty_image(image: np.ndarray) -> None:
    unit = scale_to_unit_range(image)
    assert crop_to_foreground(unit, threshold=0.02, min_fraction=0.5).shape == (30, 40)
    assert prepare_image(image, PreprocessParams(size_px=16)).shape == (16, 16)


def test_squish_ignores_aspect_ratio_and_keeps_content_at_the_edges() -> None:
    img = np.zeros((100, 300), dtype=np.float32)
    img[:, -30:] = 1.0  # a bright object touching the right edge
    out = squish(img, 64)
    assert out.shape == (64, 64)
    assert out[:, -3:].min() > 0.9, "the edge object must survive (no centre crop)"
    assert out[:, :50].max() < 0.05


def test_scale_to_unit_range_maps_min_max_and_handles_constant_and_nan() -> None:
    out = scale_to_unit_range(np.array([[100, 4195]], dtype=np.uint16))
    assert out.tolist() == [[0.0, 1.0]]
    assert scale_to_unit_range(np.full((3, 3), 5.0)).max() == 0.0
    assert np.isfinite(scale_to_unit_range(np.array([[np.nan, 1.0, 2.0]]))).all()
    with pytest.raises(ValueError, match="2-D"):
        scale_to_unit_range(np.zeros((2, 2, 3)))


def test_prepare_crops_then_squishes_to_unit_range() -> None:
    params = PreprocessParams(size_px=32)
    img = _framed(300, 200, (100, 200, 50, 150), value=4095.0)
    img[100:150, 50:100] = 2047.5
    out = prepare_image(img, params)
    assert out.shape == (32, 32) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    # After the crop the black border is gone: every pixel belongs to the bright field.
    assert out.min() > 0.45
    # The darker quadrant (top-left of the field) fills the top-left quarter of the output.
    assert out[:14, :14].mean() == pytest.approx(0.5, abs=0.01)
    assert out[18:, 18:].mean() == pytest.approx(1.0, abs=0.01)


def test_normalize_gives_channels_first_imagenet_layout() -> None:
    params = PreprocessParams(size_px=8)
    prepared = np.full((8, 8), 0.5, dtype=np.float32)
    out = normalize_image(prepared, params)
    assert out.shape == (3, 8, 8) and out.dtype == np.float32
    expected = [(0.5 - m) / s for m, s in zip(params.mean, params.std, strict=True)]
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-6)
    batch = normalize_image(np.stack([prepared, prepared]), params)
    assert batch.shape == (2, 3, 8, 8)
    np.testing.assert_allclose(batch[1], out)


def test_preprocess_image_is_prepare_then_normalize() -> None:
    params = PreprocessParams(size_px=24, channels=1, mean=(0.5,), std=(0.25,))
    img = np.random.default_rng(1).integers(0, 4096, (90, 70)).astype(np.float32)
    expected = normalize_image(prepare_image(img, params), params)
    np.testing.assert_array_equal(preprocess_image(img, params), expected)
    assert expected.shape == (1, 24, 24)


def test_params_travel_as_json_and_reject_unknown_or_bad_values() -> None:
    params = PreprocessParams(size_px=128, background_threshold=0.05)
    restored = PreprocessParams.from_dict(json.loads(json.dumps(params.to_dict())))
    assert restored == params
    with pytest.raises(ValueError, match="unknown"):
        PreprocessParams.from_dict({**params.to_dict(), "centre_crop": True})
    with pytest.raises(ValueError):
        PreprocessParams(mean=(0.5,))
    with pytest.raises(ValueError):
        PreprocessParams(size_px=2)


def test_normalize_means_the_same_on_torch_tensors() -> None:
    import torch

    params = PreprocessParams(size_px=8)
    prepared = np.random.default_rng(2).random((2, 8, 8)).astype(np.float32)
    expected = normalize_image(prepared, params)
    got = normalize_image(torch.from_numpy(prepared), params)
    assert tuple(got.shape) == (2, 3, 8, 8)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-6)
