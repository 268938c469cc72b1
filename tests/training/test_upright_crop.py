"""The setting reader's upright crop: the valve's long axis found and laid horizontal.

A setting is the rotor's angle relative to the valve; the reader learns it once every crop
shows the valve lying the same way (docs/TRAINING.md, "The pressure setting"). These tests
check the geometry on drawn bars and on real synthetic X-rays, whose generator knows each
valve's angle.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.fitting.config import RecipeConfig
from training.shared.locate_classify import (
    UPRIGHT_VIEWS,
    LocateClassifyNet,
    TwoStageParams,
    crop_around,
    dihedral,
    principal_axis,
    upright_crop,
)
from training.synthetic.xray import render_xray


def _axis_error_deg(estimate: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """Angular distance modulo half a turn (an axis has no direction)."""
    diff = (estimate.double() - truth.double() + math.pi / 2) % math.pi - math.pi / 2
    return np.degrees(np.abs(diff.numpy()))


def _bars(angles: list[float], side: int = 64, seed: int = 0) -> torch.Tensor:
    """A bright elongated bar with an off-axis dot, at each angle, on a noisy background."""
    rng = np.random.default_rng(seed)
    c = (side - 1) / 2
    yy, xx = np.mgrid[0:side, 0:side] - c
    out = []
    for a in angles:
        u = xx * math.cos(a) + yy * math.sin(a)
        v = -xx * math.sin(a) + yy * math.cos(a)
        image = 0.3 + 0.05 * rng.standard_normal((side, side))
        image[(u / 20) ** 2 + (v / 5) ** 2 <= 1] = 0.9
        image[(u - 6) ** 2 + (v - 7) ** 2 <= 4] = 1.0  # a chiral mark beside the axis
        out.append(image)
    return torch.from_numpy(np.stack(out)).float()


def test_principal_axis_finds_a_bar_at_any_angle() -> None:
    angles = [math.radians(d) for d in range(0, 360, 15)]
    bars = _bars(angles)
    estimate = principal_axis(bars)
    assert _axis_error_deg(estimate, torch.tensor(angles)).max() < 3.0
    # Gain and offset do not move it, so raw [0, 1] crops and normalised ones agree.
    assert torch.allclose(principal_axis(bars * 2 - 1), estimate, atol=1e-4)
    three_channels = (bars.unsqueeze(1).expand(-1, 3, -1, -1) - 0.5) / 0.5
    assert torch.allclose(principal_axis(three_channels), estimate, atol=1e-4)


def test_crop_around_turns_the_given_direction_onto_the_x_axis() -> None:
    angles = [0.3, 1.2, 2.5]
    bars = _bars(angles, side=96)
    centres = torch.full((3, 2), 0.5)
    turned = crop_around(bars, centres, 0.6, 48, torch.tensor(angles))
    assert _axis_error_deg(principal_axis(turned), torch.zeros(3)).max() < 3.0
    # Without angles it is the plain, unturned window.
    plain = crop_around(bars, centres, 0.6, 48)
    assert _axis_error_deg(principal_axis(plain), torch.tensor(angles)).max() < 3.0


def test_upright_crop_lays_synthetic_valves_horizontal() -> None:
    """On square synthetic X-rays, at the true centre and the reader's crop of about one valve
    length: the estimated axis is the drawn valve's (its angle is known modulo π)."""
    rng = np.random.default_rng(7)
    side = 768
    images, centres, truth = [], [], []
    for label in ["Codman Hakim", "Codman Certas Plus", "Sophysa Sophy SM8", "proGAV 2.0"] * 4:
        image, info = render_xray(rng, label, shape=(side, side))
        images.append(image)
        centres.append([(info["valve_x"] + 0.5) / side, (info["valve_y"] + 0.5) / side])
        truth.append(math.radians(info["valve_angle_deg"]))
    batch, at = torch.from_numpy(np.stack(images)), torch.tensor(centres)
    unturned = crop_around(batch, at, 0.08, 128)
    error = _axis_error_deg(principal_axis(unturned), torch.tensor(truth))
    assert np.median(error) < 10.0, error.round(1)
    upright = upright_crop(batch, at, 0.08, 128)
    left_over = _axis_error_deg(principal_axis(upright), torch.zeros(len(truth)))
    assert np.median(left_over) < 10.0, left_over.round(1)


def test_the_reader_crop_is_upright_only_where_the_version_was_trained_so() -> None:
    x = _bars([0.7, 2.0], side=96).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    centres = torch.full((2, 2), 0.5)
    settings = (("bar", ("lo", "hi")),)
    old = LocateClassifyNet(2, TwoStageParams(backbone="resnet18", settings=settings))
    new = LocateClassifyNet(
        2, TwoStageParams(backbone="resnet18", settings=settings, reader_upright=True)
    )
    fraction, px = old.params.reader_fraction, old.params.reader_px
    assert torch.equal(old.reader_crop(x, centres), crop_around(x, centres, fraction, px))
    assert torch.equal(new.reader_crop(x, centres), upright_crop(x, centres, fraction, px))
    # Checkpoints from before the field existed load with unturned crops, as they trained.
    fields = TwoStageParams().to_dict()
    fields.pop("reader_upright")
    assert TwoStageParams(**fields).reader_upright is False
    # New versions turn them: the recipe's default.
    assert RecipeConfig.from_profile("cpu").reader_upright is True


@pytest.mark.parametrize("quantile", [0.5, 0.8, 0.95])
def test_principal_axis_survives_a_flat_crop(quantile: float) -> None:
    """A blank crop (the valve missed entirely) gives some angle, never NaN."""
    flat = torch.full((2, 32, 32), 0.4)
    assert torch.isfinite(principal_axis(flat, quantile)).all()


def test_the_upright_views_keep_the_axis_horizontal_and_form_a_group() -> None:
    """Each of the four views of an upright crop keeps its axis horizontal (a quarter turn
    would not), and composing two of them gives a third: training in them loses nothing."""
    bar = _bars([0.0], side=48)
    for k in UPRIGHT_VIEWS:
        assert _axis_error_deg(principal_axis(dihedral(bar, k)), torch.zeros(1))[0] < 5.0, k
    assert _axis_error_deg(principal_axis(dihedral(bar, 1)), torch.zeros(1))[0] > 80.0
    x = torch.rand(1, 8, 8)
    seen = {repr(dihedral(x, k).flatten().tolist()) for k in UPRIGHT_VIEWS}
    for a in UPRIGHT_VIEWS:
        for b in UPRIGHT_VIEWS:
            assert repr(dihedral(dihedral(x, a), b).flatten().tolist()) in seen
