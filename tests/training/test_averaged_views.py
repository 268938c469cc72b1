"""Test-time views: a locate-then-classify version averages each crop over the flips/turns
its networks trained on, in every place that answers (serving, out-of-fold, novelty).

Small random networks (resnet18 bodies, no weights needed): the arithmetic is what is
checked here; that averaging helps is measured (``benchmarks/bench_heldout.py
--compare-test-views``, docs/TRAINING.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.fitting.config import RecipeConfig
from training.shared.locate_classify import (
    DIRECTED_VIEWS,
    UPRIGHT_VIEWS,
    LocateClassifyNet,
    TwoStageParams,
    averaged_views,
    dihedral,
)
from training.shared.model import load_checkpoint, save_checkpoint
from training.shared.novelty import features_and_logits

SMALL = {"backbone": "resnet18", "locator_px": 64, "crop_fraction": 0.3, "crop_px": 48}


def _net(views: int, **fields: object) -> LocateClassifyNet:
    torch.manual_seed(0)
    params = TwoStageParams(**{**SMALL, **fields}, test_views=averaged_views(views))
    return LocateClassifyNet(3, params).eval()


def test_views_are_taken_so_that_every_reader_can_use_the_first_ones() -> None:
    assert averaged_views(1) == (0,)
    assert set(averaged_views(2)) == set(DIRECTED_VIEWS)
    assert set(averaged_views(4)) == set(UPRIGHT_VIEWS)
    assert sorted(averaged_views(8)) == list(range(8))
    for wrong in (0, 3, 16):
        with pytest.raises(ValueError, match="1, 2, 4 or 8"):
            averaged_views(wrong)
    with pytest.raises(ValueError, match="start with 0"):
        TwoStageParams(test_views=(6, 0))


def test_the_answer_is_the_classifier_averaged_over_the_views() -> None:
    x = torch.randn(2, 3, 96, 96)
    centres = torch.tensor([[0.4, 0.5], [0.6, 0.45]])
    one, eight = _net(1), _net(8)
    with torch.no_grad():
        crops = eight.crop(x, centres)
        by_view = torch.stack([eight.classifier(dihedral(crops, k)) for k in range(8)])
        answer = eight.answer(x, centres)
        assert torch.allclose(answer.logits, by_view.mean(0), atol=1e-4)
        # forward and the novelty model's input agree with the answer
        assert torch.allclose(eight(x, centres), answer.logits, atol=1e-5)
        features, logits = features_and_logits(eight, x, centres)
        assert torch.allclose(features, answer.features, atol=1e-5)
        assert torch.allclose(logits, answer.logits, atol=1e-5)
        # one view: the crop as is (what versions before test views served)
        assert torch.allclose(one.answer(x, centres).logits, by_view[0], atol=1e-4)
        assert not torch.allclose(by_view.mean(0), by_view[0], atol=1e-3)


def test_the_reader_averages_only_the_views_it_trained_on() -> None:
    settings = (("a", ("lo", "hi")),)
    net = _net(8, settings=settings, reader_upright=True, reader_directed=True)
    assert net.params.reader_test_views() == (0, 6)
    assert _net(4, settings=settings, reader_upright=True).params.reader_test_views() == (
        0,
        6,
        2,
        4,
    )
    assert _net(2, settings=settings).params.reader_test_views() == (0, 6)
    x = torch.randn(2, 3, 96, 96)
    centres = torch.tensor([[0.5, 0.5], [0.55, 0.4]])
    with torch.no_grad():
        crops = net.reader_crop(x, centres)
        expected = torch.stack([net.reader(dihedral(crops, k)) for k in (0, 6)]).mean(0)
        reading = net.answer(x, centres).setting_logits
    assert reading is not None and torch.allclose(reading, expected, atol=1e-4)


def test_the_views_survive_the_checkpoint_and_old_ones_load_with_none(tmp_path: Path) -> None:
    net = _net(4)
    path = tmp_path / "fold_0.pt"
    save_checkpoint(net, path, classes=["a", "b", "c"])
    loaded = load_checkpoint(path)
    assert isinstance(loaded, LocateClassifyNet)
    assert loaded.params.test_views == averaged_views(4)
    fields = net.params.to_dict()
    fields.pop("test_views")
    assert TwoStageParams(**fields).test_views == (0,)
    # New versions average four (measured: docs/TRAINING.md, "Test-time views").
    assert RecipeConfig.from_profile("cpu").test_views == 4
