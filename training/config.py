"""The recipe's hyperparameters as data: :class:`RecipeConfig` and its named profiles.

Kept apart from :mod:`training.recipe` (which imports fastai) so the backend can build a
run's configuration, and a model version can be described, without loading fastai.
Hyperparameters sit one per line with a comment (nanoGPT style); a profile is a named set
of overrides, and every run saves its effective configuration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from training.preprocess import PreprocessParams

__all__ = ["PROFILES", "RecipeConfig"]


@dataclass(frozen=True)
class RecipeConfig:
    """The paper's recipe; defaults are the ``paper`` profile."""

    profile: str = "paper"  # name of the profile these values came from
    image_size_px: int = 512  # network input side (paper: 512, squished)
    pretrained: bool = True  # ImageNet init (transfer learning); False = from scratch
    epochs: int = 50  # fine-tuning epochs after the frozen one (paper: 50)
    epochs_from_scratch: int = 80  # epochs when pretrained=False (paper: 80)
    freeze_epochs: int = 1  # head-only epochs before unfreezing (fastai fine_tune)
    lr_max: float = 3e-3  # one-cycle maximum learning rate (paper: 0.003)
    batch_size: int = 32  # images per forward pass (paper: 32)
    effective_batch_size: int = 64  # gradient accumulation target (paper: 64)
    n_folds: int = 5  # stratified, patient-grouped folds (paper: 5)
    seed: int = 42  # splits, init and shuffling
    arch: str = "resnet34"  # backbone name from training.model's registry
    augment: bool = True  # flip, rotate, zoom, brightness, warp — training split only
    max_rotate_deg: float = 10.0  # fastai aug_transforms defaults (the paper used them)
    max_zoom: float = 1.1
    max_lighting: float = 0.2
    max_warp: float = 0.2
    mixed_precision: bool = True  # AMP fp16 on CUDA, bf16 autocast on CPU
    channels_last: bool = True  # memory format of activations (faster convs)
    refit_all: bool = False  # also train one model on all data (off: serve the fold ensemble)
    gradcam_per_class: int = 2  # saliency examples per class in the report

    @classmethod
    def from_profile(cls, name: str = "paper", **overrides: Any) -> RecipeConfig:
        """The named profile with ``overrides`` applied (unknown names are errors)."""
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
        values = {**PROFILES[name], **{k: v for k, v in overrides.items() if v is not None}}
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown recipe settings: {sorted(unknown)}")
        return cls(profile=name, **values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeConfig:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def train_epochs(self) -> int:
        """Epochs of the main one-cycle phase for the chosen initialisation."""
        return self.epochs if self.pretrained else self.epochs_from_scratch

    def preprocess_params(self) -> PreprocessParams:
        return PreprocessParams(size_px=self.image_size_px)

    def with_overrides(self, **changes: Any) -> RecipeConfig:
        return replace(self, **changes)


PROFILES: dict[str, dict[str, Any]] = {
    "paper": {},
    # Small images and one short epoch: checks the mechanics on a CPU in seconds. It cannot
    # reach the paper's accuracy (see README, "What the CPU demo can and cannot show").
    "quick": {
        "image_size_px": 64,
        "epochs": 1,
        "epochs_from_scratch": 1,
        "freeze_epochs": 0,
        "batch_size": 8,
        "effective_batch_size": 16,
        "gradcam_per_class": 1,
    },
}
