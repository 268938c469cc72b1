"""A template fitted on turned and mirrored copies of one drawing puts every copy back in one
frame: the same turn relative to how it was drawn and the same face, copy after copy."""

from __future__ import annotations

import math

import pytest
import torch

from training.shared.template_frame import (
    ALIGN_PX,
    SCALES,
    align_to_template,
    fit_template,
    scale_to_template,
    setting_region,
    turn,
)


def _drawing() -> torch.Tensor:
    """A valve-like drawing along x: a body, a bright disc towards +x and a dot off the axis
    (so neither half a turn nor a mirror maps it onto itself)."""
    c = torch.arange(ALIGN_PX, dtype=torch.float32) - (ALIGN_PX - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    body = ((xx.abs() < 22) & (yy.abs() < 5)).float() * 0.4
    disc = ((xx - 12).square() + yy.square() < 36).float()
    dot = ((xx + 8).square() + (yy - 10).square() < 9).float()
    return body + disc + dot


def _copies(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` noisy copies of :func:`_drawing`, each turned to lie at a random angle and half of
    them mirrored first; the angles and mirror flags."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.rand(n, generator=g) * 2 * math.pi
    mirrored = torch.rand(n, generator=g) < 0.5
    base = _drawing().expand(n, -1, -1)
    drawn = turn(
        torch.where(mirrored.view(n, 1, 1), base.flip(-2), base),
        -angles,
        torch.zeros(n, dtype=torch.bool),
    )
    return drawn + 0.15 * torch.randn(drawn.shape, generator=g), angles, mirrored


def _spread_deg(offsets: torch.Tensor) -> float:
    """The largest angular distance of ``offsets`` (rad) from their circular mean, degrees."""
    mean = torch.atan2(offsets.sin().mean(), offsets.cos().mean())
    return float(torch.atan2((offsets - mean).sin(), (offsets - mean).cos()).abs().max().rad2deg())


def test_a_fitted_template_puts_every_copy_in_one_frame() -> None:
    crops, angles, mirrored = _copies(24, seed=0)
    # Started from frames up to 40° off, as a principal axis would start it.
    start = angles + (torch.rand(24, generator=torch.Generator().manual_seed(1)) - 0.5) * 1.4
    template = fit_template(crops, start)
    found, found_mirrored, score = align_to_template(crops, template)
    flip = found_mirrored ^ mirrored
    assert bool((flip == flip[0]).all()), "not every copy was given the same face"
    for face in (False, True):
        pick = mirrored == face
        assert _spread_deg(found[pick] - angles[pick]) < 6.0
    assert float(score.min()) > 0.5


def test_aligning_a_turned_template_finds_the_turn() -> None:
    """Copies of the template itself, turned and mirrored by known amounts, are found at those
    turns (to the search step) and faces: the turn's direction is the one :func:`turn` undoes."""
    template = _drawing()
    angles = torch.tensor([0.0, 0.5, 2.0, 4.0])
    mirrored = torch.tensor([False, True, False, True])
    base = template.expand(4, -1, -1)
    drawn = turn(
        torch.where(mirrored.view(4, 1, 1), base.flip(-2), base),
        -angles,
        torch.zeros(4, dtype=torch.bool),
    )
    found, found_mirrored, _ = align_to_template(drawn, template)
    assert found_mirrored.tolist() == mirrored.tolist()
    error = torch.atan2((found - angles).sin(), (found - angles).cos()).abs().rad2deg()
    assert float(error.max()) < 3.0


def test_a_zoomed_copy_is_found_at_its_zoom() -> None:
    """Copies of the template drawn smaller or larger are found at the zoom that undoes it,
    one :data:`SCALES` step exactly, and at their turn and face by the plain search first."""
    template = _drawing()
    zooms = SCALES[[3, 7, 11]]
    angles = torch.tensor([0.3, 2.5, 5.0])
    mirrored = torch.tensor([True, False, True])
    base = template.expand(3, -1, -1)
    # Showing 1/zoom of the side makes the drawing zoom times larger.
    drawn = turn(
        torch.where(mirrored.view(3, 1, 1), base.flip(-2), base),
        -angles,
        torch.zeros(3, dtype=torch.bool),
        1.0 / zooms,
    )
    found, found_mirrored, _ = align_to_template(drawn, template)
    scales, score = scale_to_template(drawn, template, found, found_mirrored)
    assert torch.allclose(scales, zooms), (scales, zooms)
    assert float(score.min()) > 0.8


def test_a_scaled_fit_brings_copies_of_different_sizes_to_one_size() -> None:
    """Copies drawn at sizes 0.8-1.25 × fitted with ``scaled``: every copy's zoom over its
    size is one constant (to a search step), and the template is the drawing, not a blur of
    its sizes (NCC 0.99 with it; the unscaled fit of the same copies: 0.95)."""
    crops, angles, mirrored = _copies(24, seed=2)
    g = torch.Generator().manual_seed(3)
    sizes = torch.exp((torch.rand(24, generator=g) - 0.5) * 2 * 0.22)
    crops = turn(crops, torch.zeros(24), torch.zeros(24, dtype=torch.bool), 1.0 / sizes)
    start = angles + (torch.rand(24, generator=g) - 0.5) * 1.0
    template = fit_template(crops, start, scaled=True)
    found, found_mirrored, _ = align_to_template(crops, template)
    scales, _ = scale_to_template(crops, template, found, found_mirrored)
    ratio = (scales / sizes).log()
    step = float(SCALES[1] / SCALES[0])
    assert float(ratio.max() - ratio.min()) <= 2 * math.log(step) + 1e-4
    drawing = _drawing()[None]
    at = align_to_template(drawing, template)
    assert float(scale_to_template(drawing, template, at[0], at[1])[1]) > 0.97


def test_the_setting_region_is_where_the_settings_differ() -> None:
    """A fixed body with a dot that circles a hub 12 px right of the centre, its angle the
    setting: the region is centred on the hub (along the axis, fractions of the half side)
    and just holds the dot's circle; a single setting has no region."""
    c = torch.arange(ALIGN_PX, dtype=torch.float32) - (ALIGN_PX - 1) / 2
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    body = ((xx.abs() < 22) & (yy.abs() < 8)).float() * 0.4
    g = torch.Generator().manual_seed(4)
    settings = torch.arange(8).repeat(6)
    crops = []
    for k in settings.tolist():
        angle = 2 * math.pi * k / 8
        dx, dy = 12 + 6 * math.cos(angle), 6 * math.sin(angle)
        dot = ((xx - dx).square() + (yy - dy).square() < 6).float()
        crops.append(body + dot + 0.1 * torch.randn(xx.shape, generator=g))
    x, half = setting_region(torch.stack(crops), settings, 8)
    assert abs(x - 12 / (ALIGN_PX / 2)) < 0.05
    assert 4 / (ALIGN_PX / 2) < half < 12 / (ALIGN_PX / 2)
    with pytest.raises(ValueError, match="2 or more settings"):
        setting_region(torch.stack(crops[:1]), settings[:1], 8)
