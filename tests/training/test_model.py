"""Tests for training.shared.model: shapes, the fastai-identical head, offline weights,
checkpoints."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from training.shared.errors import ModelLoadError, ValveIdError
from training.shared.model import (
    InitInfo,
    ValveNet,
    available_archs,
    build_model,
    layer_groups,
    load_checkpoint,
    load_fold_models,
    make_head,
    pretrained_weights_path,
    save_checkpoint,
)

SIZE_PX = 64
RESNET34_FILE = "resnet34-b627a593.pth"


@pytest.fixture
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TORCH_HOME pointing at an empty directory: no cached ImageNet weights."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _batch(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, SIZE_PX, SIZE_PX, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("num_classes", [4, 6])
def test_forward_shape(num_classes: int) -> None:
    model, info = build_model(num_classes, pretrained=False)
    model.eval()
    with torch.no_grad():
        out = model(_batch(3))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()
    assert info == InitInfo("resnet34", "random", None, "from scratch requested")


def test_body_is_resnet34_without_pool_and_fc() -> None:
    model, _ = build_model(4, pretrained=False)
    names = [type(m).__name__ for m in model.body]
    assert names == [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "MaxPool2d",
        "Sequential",
        "Sequential",
        "Sequential",
        "Sequential",
    ]
    # resnet34 = [3, 4, 6, 3] basic blocks
    assert [len(model.body[i]) for i in range(4, 8)] == [3, 4, 6, 3]
    groups = layer_groups(model)
    n_params = sum(1 for g in groups for _ in g.parameters())
    assert n_params == sum(1 for _ in model.parameters())


@pytest.mark.parametrize("num_classes", [4, 6])
def test_head_matches_fastai_create_head(num_classes: int) -> None:
    from fastai.vision.learner import create_head

    theirs = create_head(512, num_classes)
    ours = make_head(512, num_classes)
    assert len(ours) == len(theirs)
    kind = {"Flatten": "Flatten"}  # fastai's own Flatten vs nn.Flatten
    for a, b in zip(ours, theirs, strict=True):
        assert kind.get(type(a).__name__, type(a).__name__) == type(b).__name__
        if isinstance(a, nn.Linear):
            assert (a.in_features, a.out_features) == (b.in_features, b.out_features)
            assert a.bias is None and b.bias is None
        if isinstance(a, nn.BatchNorm1d):
            assert (a.num_features, a.eps, a.momentum) == (b.num_features, b.eps, b.momentum)
            assert torch.equal(a.bias, b.bias) and torch.equal(a.weight, b.weight)
        if isinstance(a, nn.Dropout):
            assert a.p == b.p
    # Same parameter names and shapes: a fastai head's state_dict loads into ours and back.
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()
    }
    theirs.load_state_dict(ours.state_dict())
    features = torch.randn(5, 512, 2, 2)
    ours.eval()
    theirs.eval()
    with torch.no_grad():
        assert torch.allclose(ours(features), theirs(features))


def test_missing_imagenet_file_falls_back_to_random(
    empty_torch_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    expected = empty_torch_home / "hub" / "checkpoints" / RESNET34_FILE
    assert pretrained_weights_path() == expected
    with caplog.at_level(logging.WARNING, logger="training.shared.model"):
        model, info = build_model(4)
    assert info.init == "random"
    assert info.weights_file == str(expected)
    assert str(expected) in info.reason and "worse accuracy" in info.reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(expected) in r.getMessage() for r in warnings)
    assert not expected.exists()  # nothing was downloaded
    assert info.to_dict() == {
        "arch": "resnet34",
        "init": "random",
        "weights_file": str(expected),
        "reason": info.reason,
        "weights_package": None,
        "weights_package_version": None,
        "weights_sha256": None,
    }
    assert model(_batch()).shape == (2, 4)


def _fake_imagenet_file(path: Path, arch=torchvision.models.resnet34) -> dict[str, torch.Tensor]:
    torch.manual_seed(1234)
    state = arch(weights=None).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _body_matches(model: ValveNet, state: dict[str, torch.Tensor], arch) -> bool:
    reference = arch(weights=None)
    reference.load_state_dict(state)
    ref_body = nn.Sequential(*list(reference.children())[:-2]).state_dict()
    ours = model.body.state_dict()
    return ours.keys() == ref_body.keys() and all(torch.equal(ours[k], ref_body[k]) for k in ours)


def test_cached_imagenet_file_is_loaded_through_torchvision(empty_torch_home: Path) -> None:
    path = empty_torch_home / "hub" / "checkpoints" / RESNET34_FILE
    state = _fake_imagenet_file(path)
    model, info = build_model(4)
    assert info.init == "imagenet"
    assert info.weights_file == str(path)
    assert _body_matches(model, state, torchvision.models.resnet34)
    # A fresh random model does not match: the check above can fail.
    random_model, _ = build_model(4, pretrained=False)
    assert not _body_matches(random_model, state, torchvision.models.resnet34)


def test_explicit_weights_path(tmp_path: Path, empty_torch_home: Path) -> None:
    path = tmp_path / "site" / "r18.pth"
    state = _fake_imagenet_file(path, torchvision.models.resnet18)
    model, info = build_model(6, arch="resnet18", weights_path=path)
    assert (info.arch, info.init, info.weights_file) == ("resnet18", "imagenet", str(path))
    assert _body_matches(model, state, torchvision.models.resnet18)
    with pytest.raises(ModelLoadError, match="not found"):
        build_model(6, arch="resnet18", weights_path=tmp_path / "nope.pth")


def test_corrupt_imagenet_file_raises(empty_torch_home: Path) -> None:
    path = empty_torch_home / "hub" / "checkpoints" / RESNET34_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ModelLoadError, match=RESNET34_FILE):
        build_model(4)


def test_unknown_arch() -> None:
    assert {"resnet18", "resnet34"} <= set(available_archs())
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model(4, arch="resnet9000", pretrained=False)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model, _ = build_model(4, pretrained=False, arch="resnet18")
    # Move BN running stats off their defaults so eval mode depends on them.
    model.train()
    with torch.no_grad():
        model(_batch(4))
    model.eval()
    classes = ["codman_hakim", "certas_plus", "sophy_sm8", "progav_2"]
    path = tmp_path / "weights" / "fold_0.pt"
    save_checkpoint(model, path, classes=classes)
    loaded = load_checkpoint(path)
    assert loaded.arch == "resnet18" and loaded.num_classes == 4
    assert loaded.classes == tuple(classes)
    assert not loaded.training
    x = _batch(3)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert list(tmp_path.joinpath("weights").iterdir()) == [path]  # no temp files left


def test_load_fold_models_orders_and_checks_folds(tmp_path: Path) -> None:
    classes = ["a", "b", "c", "d"]
    for k in (10, 2, 0):
        model, _ = build_model(4, pretrained=False, arch="resnet18")
        save_checkpoint(model, tmp_path / f"fold_{k}.pt", classes=classes)
    (tmp_path / "notes.txt").write_text("ignored")
    models = load_fold_models(tmp_path)
    assert len(models) == 3
    first = load_checkpoint(tmp_path / "fold_0.pt")
    assert all(
        torch.equal(a, b)
        for a, b in zip(models[0].state_dict().values(), first.state_dict().values(), strict=True)
    )
    other, _ = build_model(4, pretrained=False, arch="resnet18")
    save_checkpoint(other, tmp_path / "fold_3.pt", classes=["a", "b", "c", "x"])
    with pytest.raises(ModelLoadError, match="disagree"):
        load_fold_models(tmp_path)
    with pytest.raises(ModelLoadError, match="no fold"):
        load_fold_models(tmp_path / "empty")


def test_corrupt_and_mismatched_checkpoints(tmp_path: Path) -> None:
    model, _ = build_model(4, pretrained=False, arch="resnet18")
    good = tmp_path / "good.pt"
    save_checkpoint(model, good, classes=list("abcd"))

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01garbage")
    not_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_dict)
    mismatched = tmp_path / "mismatched.pt"
    torch.save(
        {"arch": "resnet18", "num_classes": 6, "classes": list("abcdef"), "state_dict": {}},
        mismatched,
    )
    wrong_head = tmp_path / "wrong_head.pt"
    torch.save(
        {
            "arch": "resnet18",
            "num_classes": 6,
            "classes": list("abcdef"),
            "state_dict": model.state_dict(),
        },
        wrong_head,
    )
    for path in (truncated, garbage, not_dict, mismatched, wrong_head, tmp_path / "missing.pt"):
        with pytest.raises(ModelLoadError) as excinfo:
            load_checkpoint(path)
        assert str(path) in str(excinfo.value)
        assert isinstance(excinfo.value, ValveIdError)


def test_importing_model_does_not_import_fastai() -> None:
    code = (
        "import sys, training.shared.model; assert 'fastai' not in sys.modules, 'fastai imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
