"""The one preprocessing function: crop, squish, scale, normalise."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.shared.preprocess import (
    PreprocessParams,
    crop_to_foreground,
    foreground_box,
    normalize_image,
    prepare_image,
    prepare_image_with_box,
    preprocess_image,
    scale_to_unit_range,
    squish,
    to_prepared_fraction,
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


def _border_noise_image() -> np.ndarray:
    """A [0, 1] image: bright field, a dim 10/255 region above it, and a black border made of
    dense near-black noise at 3/255 (half its pixels), as collimated exports have."""
    rng = np.random.default_rng(4)
    img = np.where(rng.random((100, 100)) < 0.5, 3 / 255, 0.0).astype(np.float32)
    img[20:40, 30:70] = 10 / 255  # dim soft tissue: foreground
    img[40:60, 30:70] = 1.0  # bone
    return img


def test_default_background_threshold_is_the_documented_value() -> None:
    # training/shared/preprocess.py documents 0.02, "≈ 5 of 255 grey levels"; model versions saved
    # with the default depend on it.
    assert PreprocessParams().background_threshold == 0.02
    assert round(PreprocessParams().background_threshold * 255) == 5


def test_default_threshold_crops_3_of_255_border_noise_and_keeps_a_10_of_255_region() -> None:
    # Pins the default between 3/255 and 10/255: with the paper's "> 0" the noisy border
    # would survive; with a higher threshold the dim region would be lost.
    defaults = PreprocessParams()
    img = _border_noise_image()
    cropped = crop_to_foreground(
        img, defaults.background_threshold, defaults.min_foreground_fraction
    )
    assert cropped.shape == (40, 40)
    np.testing.assert_allclose(cropped[:20], 10 / 255)  # the dim region is kept whole
    # The same through the pipeline, with every crop setting at its default.
    out = prepare_image(img, PreprocessParams(size_px=40))
    assert out.shape == (40, 40)
    np.testing.assert_allclose(out[:20], 10 / 255, atol=1e-6)  # no black border remains
    np.testing.assert_allclose(out[20:], 1.0, atol=1e-6)


def test_prepare_with_box_is_prepare_image_plus_the_crop_it_made() -> None:
    img = _framed(90, 120, (10, 70, 20, 100))
    params = PreprocessParams(size_px=32)
    prepared, box = prepare_image_with_box(img, params)
    np.testing.assert_array_equal(prepared, prepare_image(img, params))
    assert box == (10, 70, 20, 100)
    unit = scale_to_unit_range(img)
    assert box == foreground_box(unit, params.background_threshold, params.min_foreground_fraction)
    # Nothing above the threshold: the whole image is the box.
    assert prepare_image_with_box(np.zeros((12, 9), np.float32), params)[1] == (0, 12, 0, 9)


def test_a_point_of_the_original_lands_where_the_prepared_square_shows_it() -> None:
    # A dim field (rows 20..80, columns 10..130) with one bright 4x4 spot; the spot's centre
    # in original pixels (continuous: pixel i spans [i, i+1)) is (62, 42).
    img = np.zeros((100, 150), dtype=np.float32)
    img[20:80, 10:130] = 0.3
    img[40:44, 60:64] = 1.0
    params = PreprocessParams(size_px=60)
    prepared, box = prepare_image_with_box(img, params)
    assert box == (20, 80, 10, 130)
    fx, fy = to_prepared_fraction(62.0, 42.0, box)
    assert (fx, fy) == pytest.approx(((62 - 10) / 120, (42 - 20) / 60))
    # The spot's centroid in the prepared square (pixel j spans [j, j+1) / size) is the point.
    weight = np.clip(prepared - 0.3, 0.0, None)
    rows, cols = np.indices(prepared.shape) + 0.5
    centroid = (
        float((weight * cols).sum() / weight.sum()) / params.size_px,
        float((weight * rows).sum() / weight.sum()) / params.size_px,
    )
    assert centroid == pytest.approx((fx, fy), abs=0.25 / params.size_px)


def test_points_outside_the_crop_are_clipped_to_its_edges() -> None:
    box = (10, 50, 20, 60)
    assert to_prepared_fraction(0.0, 100.0, box) == (0.0, 1.0)
    assert to_prepared_fraction(20.0, 10.0, box) == (0.0, 0.0)
    assert to_prepared_fraction(60.0, 50.0, box) == (1.0, 1.0)
    assert to_prepared_fraction(40.0, 30.0, box) == (0.5, 0.5)
