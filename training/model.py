"""The network as a plain ``nn.Module``: a torchvision ResNet body plus a fastai-style head.

Serving rebuilds models through this module, so it imports torch and torchvision only,
never fastai. The head is built to match fastai 2.8 ``create_head(512, K)`` layer for layer
(same order, bias and BatchNorm choices, same initialisation), so the paper's recipe trains
the same network it published, and a fastai ``Learner`` can wrap :class:`ValveNet` directly.

Pretrained weights come through torchvision's own path (``ResNet34_Weights.IMAGENET1K_V1``
→ ``load_state_dict_from_url``), which reads ``$TORCH_HOME/hub/checkpoints/<file>``. The
machine running valve-id may have no internet, so the file is checked first and never
downloaded: when it is missing the model starts from random weights, a warning says so, and
:class:`InitInfo` records it with the version.

Checkpoints describe themselves (arch, classes, weights), so a fold model can be rebuilt
from its file alone.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet34_Weights, WeightsEnum

from training.errors import ModelLoadError

__all__ = [
    "CHECKPOINT_FORMAT",
    "DEFAULT_ARCH",
    "AdaptiveConcatPool2d",
    "ArchSpec",
    "InitInfo",
    "ValveNet",
    "available_archs",
    "build_model",
    "get_arch",
    "layer_groups",
    "load_checkpoint",
    "load_fold_models",
    "make_head",
    "pretrained_weights_path",
    "register_arch",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "resnet34"
"""The paper's architecture."""
CHECKPOINT_FORMAT = 1
"""Version of the checkpoint dict layout written by :func:`save_checkpoint`."""
HEAD_HIDDEN_FEATURES = 512
"""Width of the head's hidden layer (fastai ``create_head`` default)."""
HEAD_DROPOUT = 0.5
"""Dropout before the last linear layer; the first dropout is half of it (fastai ``ps``)."""
HEAD_BN_BIAS_INIT = 1e-3
"""fastai initialises the head's BatchNorm biases to this value (``fastai.layers.BatchNorm``)."""

_FOLD_FILE_RE = re.compile(r"^fold_(\d+)\.pt$")


# --- architectures, created by name ---------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """How to build one backbone: a torchvision factory and its ImageNet weights."""

    name: str
    make_trunk: Callable[[], nn.Module]
    """Returns the full torchvision classifier, randomly initialised (no download)."""
    weights: WeightsEnum
    """The ImageNet weights torchvision would load for it."""
    num_features: int
    """Channels of the body's last feature map."""
    body_split: int
    """Index in the body where the second discriminative-LR group starts (fastai's split)."""


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(
    name: str, *, weights: WeightsEnum, num_features: int, body_split: int = 6
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Register a backbone factory under ``name`` (decorator)."""

    def decorator(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in _ARCHS:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHS[name] = ArchSpec(name, factory, weights, num_features, body_split)
        return factory

    return decorator


@register_arch("resnet34", weights=ResNet34_Weights.IMAGENET1K_V1, num_features=512)
def _resnet34() -> nn.Module:
    return torchvision.models.resnet34(weights=None)


@register_arch("resnet18", weights=ResNet18_Weights.IMAGENET1K_V1, num_features=512)
def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None)


def available_archs() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(_ARCHS)


def get_arch(name: str) -> ArchSpec:
    """The registered :class:`ArchSpec` called ``name``; ``ValueError`` if unknown."""
    try:
        return _ARCHS[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r}; known: {', '.join(available_archs())}"
        ) from None


# --- the network ----------------------------------------------------------------------


class AdaptiveConcatPool2d(nn.Module):
    """Adaptive max and average pooling, concatenated (max first, as in fastai).

    Gives the head both "is the pattern anywhere" and "how much of it" per channel.
    """

    def __init__(self, size: int = 1) -> None:
        super().__init__()
        self.mp = nn.AdaptiveMaxPool2d(size)
        self.ap = nn.AdaptiveAvgPool2d(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], dim=1)


def make_head(num_features: int, num_classes: int) -> nn.Sequential:
    """fastai 2.8 ``create_head(num_features, num_classes)`` with its defaults, initialised
    as ``create_vision_model`` does (Kaiming-normal linear weights, BN bias 1e-3)."""
    pooled = 2 * num_features  # concat pooling doubles the channels
    head = nn.Sequential(
        AdaptiveConcatPool2d(),
        nn.Flatten(),
        nn.BatchNorm1d(pooled),
        nn.Dropout(HEAD_DROPOUT / 2),
        nn.Linear(pooled, HEAD_HIDDEN_FEATURES, bias=False),
        nn.ReLU(inplace=True),
        nn.BatchNorm1d(HEAD_HIDDEN_FEATURES),
        nn.Dropout(HEAD_DROPOUT),
        nn.Linear(HEAD_HIDDEN_FEATURES, num_classes, bias=False),
    )
    for layer in head:
        if isinstance(layer, nn.BatchNorm1d):
            nn.init.ones_(layer.weight)
            nn.init.constant_(layer.bias, HEAD_BN_BIAS_INIT)
        elif isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight)
    return head


class ValveNet(nn.Module):
    """Backbone ``body`` (ResNet minus avgpool/fc) followed by the classification ``head``.

    ``body`` and ``head`` are separate attributes so the recipe can freeze the body and give
    the parts different learning rates (see :func:`layer_groups`). ``classes`` is filled in
    when the model comes from a checkpoint.
    """

    def __init__(
        self, num_classes: int, *, arch: str = DEFAULT_ARCH, trunk: nn.Module | None = None
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        spec = get_arch(arch)
        trunk = spec.make_trunk() if trunk is None else trunk
        self.arch = arch
        self.num_classes = num_classes
        self.classes: tuple[str, ...] | None = None
        self.body = nn.Sequential(*list(trunk.children())[:-2])
        self.head = make_head(spec.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def layer_groups(model: ValveNet) -> list[nn.Module]:
    """Early body, late body, head: the three groups of fastai's ResNet splitter."""
    split = get_arch(model.arch).body_split
    return [model.body[:split], model.body[split:], model.head]


# --- building with or without ImageNet weights ------------------------------------------


@dataclass(frozen=True)
class InitInfo:
    """How a model's body was initialised; saved in the version's ``config.json``.

    ``weights_file`` is the file that was loaded (``init="imagenet"``), or the file that was
    looked for and missing (``init="random"`` after a fallback), or ``None`` (from scratch).
    """

    arch: str
    init: Literal["imagenet", "random"]
    weights_file: str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pretrained_weights_path(arch: str = DEFAULT_ARCH) -> Path:
    """Where torchvision looks for ``arch``'s ImageNet weights: ``<hub dir>/checkpoints/<file>``.

    ``<hub dir>`` is ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``).
    """
    filename = Path(urlparse(get_arch(arch).weights.url).path).name
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def build_model(
    num_classes: int,
    *,
    pretrained: bool = True,
    arch: str = DEFAULT_ARCH,
    weights_path: str | os.PathLike[str] | None = None,
) -> tuple[ValveNet, InitInfo]:
    """A fresh :class:`ValveNet`, its body ImageNet-initialised when the weights are on disk.

    ``pretrained=False`` trains from scratch. With ``pretrained=True`` the weights are read
    from ``weights_path`` if given (it must exist), else from torchvision's cache
    (:func:`pretrained_weights_path`); a missing cache file means random init plus a warning,
    never a download. A present but unreadable file raises :class:`ModelLoadError`.
    """
    spec = get_arch(arch)
    trunk = spec.make_trunk()
    if not pretrained:
        info = InitInfo(arch, "random", None, "from scratch requested")
    elif weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise ModelLoadError("pretrained weights file not found", source=str(path))
        _load_trunk(trunk, path, lambda: _torch_load(path))
        info = InitInfo(arch, "imagenet", str(path), "loaded ImageNet weights from weights_path")
    else:
        path = pretrained_weights_path(arch)
        if path.is_file():
            # torchvision's own path; it finds the cached file and does not download.
            _load_trunk(
                trunk, path, lambda: spec.weights.get_state_dict(progress=False, weights_only=True)
            )
            info = InitInfo(arch, "imagenet", str(path), "loaded ImageNet weights (torch hub)")
        else:
            reason = (
                f"ImageNet weights file {path} is missing, so the {arch} body starts from "
                "random weights; expect much worse accuracy on small datasets. Copy the file "
                "there (or set TORCH_HOME) to train from ImageNet weights."
            )
            logger.warning(reason)
            info = InitInfo(arch, "random", str(path), reason)
    return ValveNet(num_classes, arch=arch, trunk=trunk), info


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _load_trunk(trunk: nn.Module, path: Path, read: Callable[[], Any]) -> None:
    try:
        state_dict = read()
        trunk.load_state_dict(state_dict)
    except Exception as exc:  # torch raises many kinds for bad files; all mean "unusable"
        raise ModelLoadError(
            f"cannot load pretrained weights ({type(exc).__name__}: {_short(exc)}); "
            "the file is truncated, corrupt or for another architecture",
            source=str(path),
        ) from exc


# --- self-describing checkpoints --------------------------------------------------------


def save_checkpoint(
    model: ValveNet,
    path: str | os.PathLike[str],
    *,
    classes: Sequence[str],
    arch: str | None = None,
) -> None:
    """Write ``{"format", "arch", "num_classes", "classes", "state_dict"}`` to ``path``.

    Written to a temporary file and renamed, so a reader never sees half a checkpoint.
    """
    arch = model.arch if arch is None else arch
    if arch != model.arch:
        raise ValueError(f"arch {arch!r} does not match the model's {model.arch!r}")
    classes = [str(c) for c in classes]
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a {model.num_classes}-class model")
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "num_classes": model.num_classes,
        "classes": classes,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> ValveNet:
    """Rebuild the model saved by :func:`save_checkpoint`, in eval mode, ``classes`` set.

    Uses ``torch.load(weights_only=True)``: a checkpoint file cannot run code.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError("checkpoint file not found", source=str(path))
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot read checkpoint ({type(exc).__name__}: {_short(exc)}); "
            "the file is truncated or not a valve-id checkpoint",
            source=str(path),
        ) from exc
    arch, num_classes, classes, state_dict = _checkpoint_fields(checkpoint, path)
    try:
        model = ValveNet(num_classes, arch=arch)
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError) as exc:
        raise ModelLoadError(
            f"weights do not fit a {num_classes}-class {arch} ({_short(exc)})", source=str(path)
        ) from exc
    model.classes = classes
    return model.to(map_location).eval()


def load_fold_models(
    weights_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> list[ValveNet]:
    """All ``fold_<k>.pt`` checkpoints in ``weights_dir``, ordered by ``k``.

    The folds must agree on architecture and classes, since their outputs get averaged.
    """
    weights_dir = Path(weights_dir)
    found = sorted(
        (int(m.group(1)), p)
        for p in (weights_dir.iterdir() if weights_dir.is_dir() else [])
        if (m := _FOLD_FILE_RE.match(p.name))
    )
    if not found:
        raise ModelLoadError("no fold_<k>.pt checkpoints found", source=str(weights_dir))
    models = [load_checkpoint(p, map_location) for _, p in found]
    first = models[0]
    for (_, p), model in zip(found, models, strict=True):
        if (model.arch, model.classes) != (first.arch, first.classes):
            raise ModelLoadError(
                f"fold checkpoints disagree: {model.arch} {model.classes} vs "
                f"{first.arch} {first.classes}",
                source=str(p),
            )
    return models


def _checkpoint_fields(
    checkpoint: Any, path: Path
) -> tuple[str, int, tuple[str, ...], dict[str, torch.Tensor]]:
    def fail(what: str) -> ModelLoadError:
        return ModelLoadError(f"not a valve-id checkpoint: {what}", source=str(path))

    if not isinstance(checkpoint, dict):
        raise fail(f"expected a dict, found {type(checkpoint).__name__}")
    missing = {"arch", "num_classes", "classes", "state_dict"} - checkpoint.keys()
    if missing:
        raise fail(f"missing {', '.join(sorted(missing))}")
    if checkpoint.get("format", CHECKPOINT_FORMAT) != CHECKPOINT_FORMAT:
        raise fail(f"format {checkpoint['format']!r}, this valve-id reads {CHECKPOINT_FORMAT}")
    arch, num_classes = checkpoint["arch"], checkpoint["num_classes"]
    classes, state_dict = checkpoint["classes"], checkpoint["state_dict"]
    if arch not in _ARCHS:
        raise fail(f"unknown architecture {arch!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise fail(f"bad num_classes {num_classes!r}")
    if not isinstance(classes, list | tuple) or len(classes) != num_classes:
        raise fail(f"classes do not list {num_classes} names")
    if not isinstance(state_dict, dict):
        raise fail("state_dict is not a dict")
    return arch, num_classes, tuple(str(c) for c in classes), state_dict


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"
