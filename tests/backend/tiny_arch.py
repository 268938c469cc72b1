"""A backbone small enough for serving tests: one strided conv, 8 features.

Registered once under :data:`TINY_ARCH` in :mod:`training.shared.model`'s architecture
registry, so a test can save and serve real checkpoints in milliseconds. Importing this module
registers it; a second import (another test module) finds it registered already.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import ResNet18_Weights

from training.shared.model import available_archs, register_arch

TINY_ARCH = "tiny-test"

if TINY_ARCH not in available_archs():

    @register_arch(TINY_ARCH, weights=ResNet18_Weights.IMAGENET1K_V1, num_features=8, body_split=1)
    def _tiny_trunk() -> nn.Module:
        # ValveNet keeps all children but the last two (a ResNet's avgpool and fc).
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Identity(),
            nn.Identity(),
        )  # fmt: skip
