"""The paper's recipe: folds, class weights, augmentation placement, one fold's mechanics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import training.fitting.recipe as recipe
from training.fitting.config import PROFILES, RecipeConfig
from training.fitting.recipe import _AugmentAndNormalize, class_weights, train_fold
from training.fitting.splits import make_splits
from training.shared.errors import DatasetError
from training.shared.inference import to_network_input


def test_profiles_and_overrides_are_explicit() -> None:
    paper = RecipeConfig.from_profile("paper")
    assert (paper.image_size_px, paper.epochs, paper.epochs_from_scratch) == (512, 50, 80)
    assert (paper.lr_max, paper.batch_size, paper.effective_batch_size, paper.n_folds) == (
        3e-3,
        32,
        64,
        5,
    )
    quick = RecipeConfig.from_profile("quick", epochs=2)
    assert quick.profile == "quick" and quick.epochs == 2 and quick.image_size_px == 64
    assert RecipeConfig.from_dict(quick.to_dict()) == quick
    assert RecipeConfig.from_profile("paper", pretrained=False).train_epochs == 80
    with pytest.raises(ValueError, match="unknown profile"):
        RecipeConfig.from_profile("fast")
    with pytest.raises(ValueError, match="unknown recipe settings"):
        RecipeConfig.from_profile("quick", learning_rate=1.0)
    assert set(PROFILES) == {"paper", "cpu", "quick"}


def test_cpu_profile_defaults_are_the_measured_ones() -> None:
    """The values docs/TRAINING.md "The cpu profile" was measured with; change both together."""
    cpu = RecipeConfig.from_profile("cpu")
    assert (cpu.arch, cpu.pretrained, cpu.design) == ("efficientnet_lite0", True, "auto")
    assert (cpu.image_size_px, cpu.locator_px, cpu.crop_fraction, cpu.crop_px) == (
        768,
        384,
        0.18,
        160,
    )
    assert (cpu.epochs, cpu.locator_epochs, cpu.lr_max, cpu.batch_size) == (24, 300, 1e-3, 16)
    assert (cpu.freeze_epochs, cpu.body_lr_ratio, cpu.n_folds) == (0, 1.0, 5)
    assert cpu.min_located_fraction == 0.8
    # fp32 even on a bf16 CPU (measured: Lite0 learns less in bf16 autocast); the paper's
    # ResNet-34 keeps mixed precision (fp16 AMP on its GPU).
    assert cpu.mixed_precision is False
    assert RecipeConfig.from_profile("paper").mixed_precision is True
    # The Lite0 weights want [-1, 1] inputs: the version's preprocessing says so.
    params = cpu.preprocess_params()
    assert params.mean == (0.5, 0.5, 0.5) and params.std == (0.5, 0.5, 0.5)
    paper = RecipeConfig.from_profile("paper").preprocess_params()
    assert paper.mean == (0.485, 0.456, 0.406)


def test_auto_design_follows_how_many_images_carry_a_valve_centre() -> None:
    cpu = RecipeConfig.from_profile("cpu")
    assert cpu.for_snapshot(80, 100).design == "locate_classify"
    assert cpu.for_snapshot(80, 100).image_size_px == 768
    whole = cpu.for_snapshot(79, 100)
    assert (whole.design, whole.image_size_px, whole.epochs) == ("whole_image", 384, 8)
    assert cpu.for_snapshot(0, 0).design == "whole_image"
    fixed = RecipeConfig.from_profile("cpu", design="whole_image")
    assert fixed.for_snapshot(100, 100) is fixed


def test_auto_profile_is_paper_only_with_cuda_and_the_resnet_file() -> None:
    from training.fitting.config import choose_profile, recipe_request, resolve_recipe

    assert choose_profile(cuda=True, resnet_weights=True)[0] == "paper"
    for cuda, weights in ((True, False), (False, True), (False, False)):
        name, why = choose_profile(cuda=cuda, resnet_weights=weights)
        assert name == "cpu" and why.startswith("auto: ")
    assert "no CUDA device" in choose_profile(cuda=False, resnet_weights=True)[1]
    assert "ResNet-34" in choose_profile(cuda=True, resnet_weights=False)[1]
    # Enqueued, "auto" travels unresolved and the worker decides; overrides survive.
    request = recipe_request("auto", epochs=3, seed=None)
    assert request == {"profile": "auto", "overrides": {"epochs": 3}, "n_folds": 5}
    resolved = resolve_recipe(request)
    assert resolved.profile in {"paper", "cpu"} and resolved.epochs == 3
    assert resolved.profile_reason.startswith("auto: ")
    assert resolve_recipe(recipe_request("quick")) == RecipeConfig.from_profile("quick")
    with pytest.raises(ValueError, match="unknown recipe settings"):
        recipe_request("auto", learning_rate=1.0)


def test_splits_never_put_a_patient_in_two_folds_and_cover_everything() -> None:
    rng = np.random.default_rng(0)
    groups = [f"p{i}" for i in rng.integers(0, 60, 150)]
    labels = rng.choice(4, size=150, p=[0.6, 0.2, 0.1, 0.1])
    splits = make_splits(labels, groups, n_folds=5, seed=3)
    assert len(splits) == 5
    seen_val = np.concatenate([va for _, va in splits])
    assert sorted(seen_val.tolist()) == list(range(150))
    for train, val in splits:
        assert not {groups[i] for i in train} & {groups[i] for i in val}
        assert set(train.tolist()) | set(val.tolist()) == set(range(150))
    assert make_splits(labels, groups, 5, 3)[0][1].tolist() == splits[0][1].tolist()


def test_splits_refuse_fewer_patients_than_folds() -> None:
    with pytest.raises(DatasetError, match="patients"):
        make_splits([0, 1, 0, 1], ["a", "a", "b", "c"], n_folds=5, seed=0)


def test_splits_refuse_classes_all_smaller_than_the_fold_count() -> None:
    labels = [0, 0, 0, 1, 1, 1, 2, 2]
    with pytest.raises(DatasetError, match="fewer than 5 labelled images"):
        make_splits(labels, [f"p{i}" for i in range(8)], n_folds=5, seed=0)


def test_class_weights_are_inverse_frequency_in_vocabulary_order() -> None:
    # Vocabulary order (0, 1, 2) differs from frequency order (1 most common, then 2, then 0).
    train = np.array([0] * 2 + [1] * 8 + [2] * 4)
    weights = class_weights(train, 3)
    np.testing.assert_allclose(weights, [14 / (3 * 2), 14 / (3 * 8), 14 / (3 * 4)], rtol=1e-6)
    assert weights[0] > weights[2] > weights[1]
    # A class missing from the training fold is never a target there; weight 1 keeps the
    # validation loss finite when a batch holds only such images.
    np.testing.assert_allclose(class_weights(np.array([0, 0, 2]), 3), [0.75, 1.0, 1.5])


def _toy_images(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    labels = np.array([0] * (n // 2) + [1] * (n // 4) + [2] * (n - n // 2 - n // 4))
    images = (rng.random((n, size, size)) * 0.3).astype(np.float16)
    for i, y in enumerate(labels):
        images[i, 8 + 16 * y : 20 + 16 * y, 8:40] = 1.0
    return images, labels, [f"p{i // 2}" for i in range(n)]


def test_class_weights_of_a_fold_come_from_its_training_split_only() -> None:
    images, labels, _ = _toy_images(24)  # 12 × class 0, 6 × class 1, 6 × class 2
    val_idx = np.array([0, 1, 2, 3, 4, 5, 18, 19])  # the validation fold is not stratified
    train_idx = np.setdiff1d(np.arange(24), val_idx)
    config = RecipeConfig.from_profile("quick", pretrained=False, epochs_from_scratch=1)
    result = train_fold(images, labels, train_idx, val_idx, 3, config, fold=0)
    expected = class_weights(labels[train_idx], 3)
    np.testing.assert_allclose(result.class_weights, expected)
    whole_data = class_weights(labels, 3)
    assert not np.allclose(result.class_weights, whole_data), "fold weights must not be global"
    assert result.val_logits.shape == (len(val_idx), 3)
    assert np.isfinite(result.val_logits).all()
    assert [row["epoch"] for row in result.history] == [1]
    assert {"train_loss", "valid_loss"} <= set(result.history[0])
    assert result.init.init == "random" and "scratch" in result.init.reason


def test_validation_batches_get_normalisation_only_and_training_batches_are_augmented() -> None:
    config = RecipeConfig.from_profile("quick")
    params = config.preprocess_params()
    callback = _AugmentAndNormalize(params, config)
    x = torch.from_numpy(_toy_images(8)[0].astype(np.float32))

    class _FakeLearn:
        def __init__(self, training: bool) -> None:
            self.xb, self.training = (x.clone(),), training

    for training in (False, True):
        callback.learn = _FakeLearn(training)  # type: ignore[assignment]
        torch.manual_seed(0)
        callback.before_batch()
        out = callback.learn.xb[0]
        expected = to_network_input(x, params, channels_last=config.channels_last)
        assert out.shape == (8, 3, 64, 64)
        if training:
            assert not torch.allclose(out, expected), "training batches must be augmented"
        else:
            torch.testing.assert_close(out, expected)


def test_a_validation_split_of_a_class_unseen_in_training_keeps_finite_numbers() -> None:
    images, labels, _ = _toy_images(16)  # 8 × class 0, 4 × class 1, 4 × class 2
    val_idx = np.flatnonzero(labels == 2)  # validation holds only a class training never saw
    train_idx = np.flatnonzero(labels != 2)
    config = RecipeConfig.from_profile("quick", pretrained=False, batch_size=4)
    result = train_fold(images, labels, train_idx, val_idx, 3, config, fold=0)
    assert result.class_weights[2] == 1.0
    for row in result.history:
        assert row["valid_loss"] is not None and np.isfinite(row["valid_loss"])
    assert np.isfinite(result.val_logits).all()


def test_the_learner_trains_with_the_folds_class_weights_in_vocabulary_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Imbalanced, and vocabulary order (0, 1, 2) differs from frequency order (1, 2, 0).
    labels = np.array([0] * 2 + [1] * 8 + [2] * 4 + [0, 1])
    images = (np.random.default_rng(5).random((labels.size, 32, 32)) * 0.3).astype(np.float16)
    train_idx, val_idx = np.arange(14), np.arange(14, 16)
    learners: list = []

    class _RecordingLearner(recipe.Learner):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            learners.append(self)

    monkeypatch.setattr(recipe, "Learner", _RecordingLearner)
    config = RecipeConfig.from_profile(
        "quick", image_size_px=32, pretrained=False, epochs_from_scratch=1, batch_size=4
    )
    result = train_fold(images, labels, train_idx, val_idx, 3, config, fold=0)

    expected = np.array([14 / (3 * 2), 14 / (3 * 8), 14 / (3 * 4)], dtype=np.float32)
    np.testing.assert_allclose(result.class_weights, expected, rtol=1e-6)
    (learn,) = learners
    # What the loss the Learner used computes, whatever loss class carries the weights:
    # the class-weighted mean cross-entropy, not the plain one.
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.3, 1.0], [1.0, 1.0, 0.0]])
    targets = torch.tensor([0, 1, 2, 1])
    got = learn.loss_func(logits, targets)
    weighted = torch.nn.functional.cross_entropy(logits, targets, weight=torch.tensor(expected))
    plain = torch.nn.functional.cross_entropy(logits, targets)
    assert not torch.isclose(weighted, plain)
    torch.testing.assert_close(got.float(), weighted)
