"""Grad-CAM on a network whose answer we know, and on a small ResNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from matplotlib import colormaps
from torch import nn

from training.fitting.gradcam import overlay
from training.shared.saliency import grad_cam

SIZE_PX = 32
POOL = 4


class BrightSquareNet(nn.Module):
    """Class 1 = amount of bright pixels, class 0 = amount of dark pixels.

    ``features`` (the Grad-CAM target) has channel 0 = ReLU(x - 0.5) (bright detector) and
    channel 1 = ReLU(0.5 - x) (dark detector), max-pooled 4x. Each logit is the spatial sum
    of one channel, so the class-1 CAM must be the bright-detector map: it peaks on bright
    squares and is zero elsewhere.
    """

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(1, 2, kernel_size=1)
        with torch.no_grad():
            conv.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            conv.bias.copy_(torch.tensor([-0.5, 0.5]))
        self.features = nn.Sequential(conv, nn.ReLU(), nn.MaxPool2d(POOL))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.features(x)
        return torch.stack([a[:, 1].sum(dim=(1, 2)), a[:, 0].sum(dim=(1, 2))], dim=1)


def _square_image(top: int, left: int, side: int = 8) -> torch.Tensor:
    image = torch.zeros(1, SIZE_PX, SIZE_PX)
    image[:, top : top + side, left : left + side] = 1.0
    return image


def test_cam_peaks_on_the_bright_square() -> None:
    model = BrightSquareNet()
    squares = [(8, 20), (20, 4)]
    x = torch.stack([_square_image(top, left) for top, left in squares])
    cams = grad_cam(model, x, model.features, class_idx=[1, 1])
    assert cams.shape == (2, SIZE_PX, SIZE_PX)
    for cam, (top, left) in zip(cams, squares, strict=True):
        row, col = np.unravel_index(cam.argmax(), cam.shape)
        assert top <= row < top + 8 and left <= col < left + 8
        inside = np.zeros_like(cam, dtype=bool)
        inside[top : top + 8, left : left + 8] = True
        # Bilinear upsampling blurs a few pixels around the square; far away it is zero.
        grown = np.zeros_like(inside)
        grown[max(top - POOL, 0) : top + 8 + POOL, max(left - POOL, 0) : left + 8 + POOL] = True
        assert cam[inside].mean() > 0.6  # 2x2 feature cells, bilinearly blurred at the edges
        assert cam[inside].mean() > 10 * cam[~inside].mean()
        assert cam[~grown].max() == pytest.approx(0.0, abs=1e-9)
        assert cam.max() == pytest.approx(1.0)


def test_cam_for_the_other_class_avoids_the_square() -> None:
    model = BrightSquareNet()
    x = _square_image(12, 12)[None]
    cam = grad_cam(model, x, model.features, class_idx=[0])[0]
    assert cam[14:18, 14:18].max() == pytest.approx(0.0, abs=1e-9)
    assert cam[0:4, 0:4].min() == pytest.approx(1.0)


def test_default_class_is_the_prediction() -> None:
    model = BrightSquareNet()
    x = torch.stack([_square_image(0, 0, side=28), _square_image(4, 4, side=8)])
    predicted = model(x).argmax(dim=1).tolist()
    assert predicted == [1, 0]
    np.testing.assert_allclose(
        grad_cam(model, x, model.features), grad_cam(model, x, model.features, predicted)
    )


def test_works_with_frozen_weights_and_leaves_no_gradients() -> None:
    model = BrightSquareNet()
    for p in model.parameters():
        p.requires_grad_(False)
    cam = grad_cam(model, _square_image(8, 8)[None], model.features, class_idx=[1])[0]
    assert cam[8:16, 8:16].mean() > 0.6


def test_resnet18_layer4_restores_state() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    model.train()
    model.bn1.eval()  # a module in its own mode must keep it
    x = torch.randn(3, 3, 64, 64)
    x_before = x.clone()
    cams = grad_cam(model, x, model.layer4, class_idx=[0, 1, 2])
    assert cams.shape == (3, 64, 64)
    assert cams.dtype == np.float64
    assert np.isfinite(cams).all() and cams.min() >= 0.0 and cams.max() <= 1.0
    assert cams.reshape(3, -1).max(axis=1) == pytest.approx([1.0, 1.0, 1.0])
    assert model.training and model.layer4.training and not model.bn1.training
    assert all(p.grad is None for p in model.parameters())
    assert not model.layer4._forward_hooks and not model.layer4._backward_hooks
    assert torch.equal(x, x_before) and not x.requires_grad


def test_hook_is_removed_when_the_forward_fails() -> None:
    model = BrightSquareNet()
    model.train()
    with pytest.raises(RuntimeError):
        grad_cam(model, torch.zeros(1, 3, SIZE_PX, SIZE_PX), model.features)  # wrong channels
    assert not model.features._forward_hooks
    assert model.training


def test_class_idx_length_is_checked() -> None:
    model = BrightSquareNet()
    with pytest.raises(ValueError, match="class_idx"):
        grad_cam(model, torch.zeros(2, 1, SIZE_PX, SIZE_PX), model.features, class_idx=[1])


def test_overlay_blends_jet_over_gray() -> None:
    image = np.linspace(0, 1, 16 * 16).reshape(16, 16)
    cam = np.zeros((16, 16))
    cam[4:8, 4:8] = 1.0
    out = overlay(image, cam, alpha=0.5)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    hot = np.array(colormaps["jet"](1.0)[:3])
    expected = np.round((0.5 * image[5, 5] + 0.5 * hot) * 255)
    np.testing.assert_allclose(out[5, 5], expected, atol=1)
    gray = overlay(image, cam, alpha=0.0)
    np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
    np.testing.assert_allclose(gray[..., 0], np.round(image * 255), atol=1)


def test_overlay_resizes_a_small_cam() -> None:
    out = overlay(np.zeros((40, 60)), np.ones((5, 5)), alpha=1.0)
    assert out.shape == (40, 60, 3)
    np.testing.assert_allclose(out[20, 30], np.round(np.array(colormaps["jet"](1.0)[:3]) * 255))
