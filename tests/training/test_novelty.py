"""Novelty: fitted on out-of-fold features, it flags what lies away from every learned class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training.shared.errors import ModelLoadError
from training.shared.locate_classify import LocateClassifyNet, TwoStageParams
from training.shared.model import ValveNet
from training.shared.novelty import FLAG_QUANTILE, FoldNovelty, Novelty, features_and_logits

DIM, K = 64, 4
MIXING = np.eye(DIM) + 0.3 * np.random.default_rng(0).standard_normal((DIM, DIM))
"""Correlates the feature dimensions (what the shared covariance is for)."""


def _features(rng: np.random.Generator, labels: np.ndarray, shift: float = 0.0) -> np.ndarray:
    """Class clusters in a correlated feature space; ``shift`` moves every point off them."""
    centres = np.eye(K, DIM) * 6.0
    noise = rng.standard_normal((len(labels), DIM)) @ MIXING.T
    return centres[labels] + noise + shift * np.ones(DIM) / np.sqrt(DIM) * 8.0


def _folds(rng: np.random.Generator, n_folds: int = 3) -> Novelty:
    """A version's novelty model, fitted as a run fits it (each fold on the others' X-rays,
    its held-out ones forming the reference)."""
    labels = np.arange(300) % K
    features = _features(rng, labels)
    folds, distances = [], np.zeros(len(labels))
    for k in range(n_folds):
        val = np.arange(len(labels)) % n_folds == k
        fold = FoldNovelty.fit(features[~val], labels[~val], K, features[val])
        folds.append(fold)
        distances[val] = fold.distances(features[val])
    return Novelty(tuple(folds), np.sort(distances))


def _auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """P(an outlier scores above an inlier), ties counted half."""
    above = (outliers[:, None] > inliers[None, :]).mean()
    ties = (outliers[:, None] == inliers[None, :]).mean()
    return float(above + ties / 2)


def test_unlike_every_class_is_flagged_and_ordinary_x_rays_rarely_are() -> None:
    novelty = _folds(np.random.default_rng(1))
    rng = np.random.default_rng(2)
    fresh_labels = np.arange(200) % K
    # Each fold network sees the same new X-ray: here, the same features for every fold.
    inliers = _features(rng, fresh_labels)
    outliers = _features(rng, fresh_labels, shift=2.5)
    score_in = novelty.score([inliers] * 3)
    score_out = novelty.score([outliers] * 3)
    assert score_in.min() >= 0.0 and score_out.max() <= 1.0
    flagged_in = float((score_in >= FLAG_QUANTILE).mean())
    flagged_out = float((score_out >= FLAG_QUANTILE).mean())
    assert flagged_in <= 0.15, flagged_in  # ~5 % by construction, plus sampling noise
    assert flagged_out >= 0.9, flagged_out
    assert _auroc(score_in, score_out) >= 0.95


def test_the_reference_is_out_of_fold_so_held_out_x_rays_sit_at_their_median() -> None:
    novelty = _folds(np.random.default_rng(1))
    for fold in novelty.folds:
        assert fold.scale > 0
    assert np.median(novelty.reference) == pytest.approx(1.0, abs=0.05)
    assert novelty.rank(np.array([0.0, np.inf])).tolist() == [0.0, 1.0]


def test_a_version_s_novelty_model_round_trips_and_a_broken_file_is_a_load_error(
    tmp_path: Path,
) -> None:
    novelty = _folds(np.random.default_rng(1))
    novelty.save(tmp_path / "novelty.npz")
    loaded = Novelty.load(tmp_path / "novelty.npz")
    probe = _features(np.random.default_rng(5), np.arange(20) % K, shift=0.5)
    assert loaded.score([probe] * 3) == pytest.approx(novelty.score([probe] * 3), abs=1e-4)
    (tmp_path / "broken.npz").write_bytes(b"not an npz")
    with pytest.raises(ModelLoadError, match="novelty.npz is unreadable"):
        Novelty.load(tmp_path / "broken.npz")
    with pytest.raises(ValueError, match="feature sets"):
        novelty.score([probe])


@pytest.mark.parametrize("design", ["whole_image", "locate_classify"])
def test_features_and_logits_split_the_network_before_its_last_layer(design: str) -> None:
    torch.manual_seed(0)
    if design == "whole_image":
        model: torch.nn.Module = ValveNet(K, arch="resnet18")
    else:
        params = TwoStageParams(backbone="resnet18", locator_px=32, crop_px=32, locator_depth=6)
        model = LocateClassifyNet(K, params)
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        features, logits = features_and_logits(model, x)
        assert features.shape == (3, 512)
        assert torch.allclose(logits, model(x), atol=1e-5)
