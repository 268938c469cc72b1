"""Novelty: fitted on out-of-fold features, it flags what lies away from every learned class."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from training.shared.errors import ModelLoadError
from training.shared.locate_classify import LocateClassifyNet, TwoStageParams
from training.shared.model import ValveNet
from training.shared.novelty import (
    COMBINED_PARTS,
    FLAG_QUANTILE,
    FoldNovelty,
    Novelty,
    features_and_logits,
    free_energy,
    parts_of,
)

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
        fold = FoldNovelty.fit(
            features[~val], labels[~val], K, features[val], measure="mahalanobis"
        )
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
    loaded = Novelty.load(_saved(novelty, tmp_path / "novelty.npz"))
    probe = _features(np.random.default_rng(5), np.arange(20) % K, shift=0.5)
    assert loaded.score([probe] * 3) == pytest.approx(novelty.score([probe] * 3), abs=1e-4)
    (tmp_path / "broken.npz").write_bytes(b"not an npz")
    with pytest.raises(ModelLoadError, match="novelty.npz is unreadable"):
        Novelty.load(tmp_path / "broken.npz")
    with pytest.raises(ValueError, match="feature sets"):
        novelty.score([probe])


def _logits(rng: np.random.Generator, labels: np.ndarray, margin: float) -> np.ndarray:
    """A fold network's logits: its class stands ``margin`` above the rest (plus noise)."""
    z = rng.standard_normal((len(labels), K))
    z[np.arange(len(labels)), labels] += margin
    return z


def _energy_folds(rng: np.random.Generator, n_folds: int = 3) -> Novelty:
    """An energy novelty model fitted as a run fits it: each fold's held-out logits only."""
    labels = np.arange(300) % K
    folds, distances = [], np.zeros(len(labels))
    for k in range(n_folds):
        val = np.arange(len(labels)) % n_folds == k
        held_out = _logits(rng, labels[val], margin=8.0 + k)  # folds differ in logit scale
        fold = FoldNovelty.fit(
            np.zeros((0, 1)), labels[~val], K, np.zeros((0, 1)), held_out, measure="energy"
        )
        folds.append(fold)
        distances[val] = fold.distances(np.zeros((val.sum(), 1)), held_out)
    return Novelty(tuple(folds), np.sort(distances))


def test_free_energy_is_minus_logsumexp_and_stable_for_large_logits() -> None:
    z = np.array([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]])
    assert free_energy(z)[0] == pytest.approx(-np.log(np.exp(z[0]).sum()))
    assert free_energy(z)[1] == pytest.approx(-1000.0)


def test_energy_flags_a_crop_no_class_stands_out_for() -> None:
    """The energy measure: an X-ray whose logits name no class clearly (what a valve unlike
    every learned model gives, measured in docs/TRAINING.md) is flagged; confident ones are
    flagged at about the construction rate."""
    novelty = _energy_folds(np.random.default_rng(1))
    assert novelty.measure == "energy"
    assert np.median(novelty.reference) == pytest.approx(0.0, abs=0.1)  # centred per fold
    rng = np.random.default_rng(2)
    labels = np.arange(200) % K
    confident = [_logits(rng, labels, margin=8.0 + k) for k in range(3)]
    undecided = [_logits(rng, labels, margin=1.0) for _ in range(3)]
    features = [np.zeros((len(labels), 1))] * 3
    score_in = novelty.score(features, confident)
    score_out = novelty.score(features, undecided)
    assert float((score_in >= FLAG_QUANTILE).mean()) <= 0.15
    assert float((score_out >= FLAG_QUANTILE).mean()) >= 0.9
    assert _auroc(score_in, score_out) >= 0.95
    with pytest.raises(ValueError, match="needs the fold network's logits"):
        novelty.score(features)


def test_an_energy_model_round_trips_and_an_older_file_loads_as_mahalanobis(
    tmp_path: Path,
) -> None:
    energy = _energy_folds(np.random.default_rng(1))
    loaded = Novelty.load(_saved(energy, tmp_path / "energy.npz"))
    assert loaded.measure == "energy"
    probe = [_logits(np.random.default_rng(5), np.arange(20) % K, margin=3.0)] * 3
    features = [np.zeros((20, 1))] * 3
    assert loaded.score(features, probe) == pytest.approx(energy.score(features, probe))
    # A version published before the energy measure: no "measure" or "centres" arrays.
    old = _folds(np.random.default_rng(1))
    with np.load(_saved(old, tmp_path / "new.npz")) as data:
        kept = {k: data[k] for k in data.files if k not in ("measure", "centres")}
    np.savez(tmp_path / "old.npz", **kept)
    assert Novelty.load(tmp_path / "old.npz").measure == "mahalanobis"
    features_probe = _features(np.random.default_rng(5), np.arange(20) % K, shift=0.5)
    assert Novelty.load(tmp_path / "old.npz").score([features_probe] * 3) == pytest.approx(
        old.score([features_probe] * 3), abs=1e-4
    )


def _saved(novelty: Novelty, path: Path) -> Path:
    novelty.save(path)
    return path


def test_a_version_s_folds_share_one_measure_and_the_recipe_knows_only_real_ones() -> None:
    from training.fitting.config import RecipeConfig

    mixed = (
        _folds(np.random.default_rng(1)).folds[0],
        _energy_folds(np.random.default_rng(1)).folds[0],
    )
    with pytest.raises(ValueError, match="share one novelty measure"):
        Novelty(mixed, np.zeros(1))
    assert RecipeConfig.from_profile("cpu").novelty_measure == "combined"
    with pytest.raises(ValueError, match="novelty_measure must be one of"):
        RecipeConfig.from_profile("cpu", novelty_measure="softmax")
    with pytest.raises(ValueError, match="unknown novelty measure"):
        FoldNovelty.fit(np.zeros((2, 1)), np.zeros(2), K, np.zeros((1, 1)), measure="softmax")


def _combined(rng: np.random.Generator, n_folds: int = 3) -> Novelty:
    """A combined novelty model fitted as a run fits it: every fold fits both measures on the
    same X-rays, and the reference is the out-of-fold mean of their ranks."""
    labels = np.arange(300) % K
    features = _features(rng, labels)
    logits = _logits(rng, labels, margin=8.0)
    parts = []
    for measure in COMBINED_PARTS:
        folds, distances = [], np.zeros(len(labels))
        for k in range(n_folds):
            val = np.arange(len(labels)) % n_folds == k
            fold = FoldNovelty.fit(
                features[~val], labels[~val], K, features[val], logits[val], measure=measure
            )
            folds.append(fold)
            distances[val] = fold.distances(features[val], logits[val])
        parts.append((Novelty(tuple(folds), np.sort(distances)), distances))
    return Novelty.combine([p for p, _ in parts], [d for _, d in parts])


def test_combined_catches_what_either_measure_alone_misses() -> None:
    """Two kinds of unfamiliar X-ray: features off every class but a confident answer (only
    the Mahalanobis part sees it) and ordinary features with no class standing out (only
    energy sees it). Together they separate both from ordinary X-rays better than either."""
    novelty = _combined(np.random.default_rng(1))
    assert novelty.measure == "combined"
    assert [p.measure for p in novelty.parts] == list(COMBINED_PARTS)
    rng = np.random.default_rng(2)
    labels = np.arange(200) % K
    ordinary = ([_features(rng, labels)] * 3, [_logits(rng, labels, margin=8.0)] * 3)
    odd_shape = ([_features(rng, labels, shift=2.5)] * 3, [_logits(rng, labels, margin=8.0)] * 3)
    undecided = ([_features(rng, labels)] * 3, [_logits(rng, labels, margin=1.0)] * 3)
    score_in = novelty.score(*ordinary)
    score_out = np.concatenate([novelty.score(*odd_shape), novelty.score(*undecided)])
    combined = _auroc(score_in, score_out)
    for part in novelty.parts:
        alone = _auroc(
            part.score(*ordinary),
            np.concatenate([part.score(*odd_shape), part.score(*undecided)]),
        )
        assert alone <= 0.8 and combined > alone + 0.05, (part.measure, combined, alone)
    assert combined >= 0.8
    # Out of fold, the labelled X-rays are the reference: about 10 % lie above the flag.
    assert float((score_in >= FLAG_QUANTILE).mean()) <= 0.2


def test_a_combined_model_round_trips_and_is_made_of_its_parts_only(tmp_path: Path) -> None:
    novelty = _combined(np.random.default_rng(1))
    loaded = Novelty.load(_saved(novelty, tmp_path / "novelty.npz"))
    assert loaded.measure == "combined" and loaded.flag_quantile == novelty.flag_quantile
    rng = np.random.default_rng(5)
    labels = np.arange(20) % K
    probe = ([_features(rng, labels, shift=0.5)] * 3, [_logits(rng, labels, margin=2.0)] * 3)
    assert loaded.score(*probe) == pytest.approx(novelty.score(*probe), abs=1e-4)
    for part, again in zip(novelty.parts, loaded.parts, strict=True):
        assert again.measure == part.measure
        assert again.score(*probe) == pytest.approx(part.score(*probe), abs=1e-4)
    with pytest.raises(ValueError, match="made of"):
        Novelty(novelty.parts[0].folds, np.zeros(1), parts=novelty.parts)
    with pytest.raises(ValueError, match="made of"):
        Novelty((), np.zeros(1), parts=novelty.parts[::-1])
    with pytest.raises(ValueError, match="one measure at a time"):
        FoldNovelty.fit(np.zeros((2, 1)), np.zeros(2), K, np.zeros((1, 1)), measure="combined")
    assert parts_of("combined") == COMBINED_PARTS and parts_of("energy") == ("energy",)
    from training.fitting.config import RecipeConfig

    assert RecipeConfig.from_profile("cpu", novelty_measure="combined").novelty_measure == (
        "combined"
    )


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


@pytest.mark.slow
def test_a_run_with_the_combined_measure_serves_the_mean_of_its_parts(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    """Through the recipe: every fold fits both measures, the version's file holds both
    parts and the out-of-fold reference of their mean, and the backend serves that."""
    from backend.service.prediction import Prediction
    from backend.service.predictor import Predictor
    from training.fitting.config import RecipeConfig
    from training.fitting.run import run_in_process
    from training.shared.dataset import load_manifest
    from training.shared.labels import load_label_config
    from training.shared.registry import ModelRegistry

    label_config = load_label_config(Path(__file__).resolve().parents[2] / "label_config.xml")
    recipe = RecipeConfig.from_profile("quick", novelty_measure="combined", gradcam_per_class=0)
    registry = ModelRegistry(tmp_path / "models")
    staging = registry.staging("combined")
    run_in_process(
        staging,
        load_manifest(tiny_dataset, label_config.classes),
        label_config,
        recipe,
        source="synthetic",
        cache_dir=None,
        run_id="combined",
    )
    metrics = json.loads((staging / "metrics.json").read_text())
    assert metrics["novelty"]["measure"] == "combined"
    assert metrics["novelty"]["n_reference"] == 40
    novelty = Novelty.load(staging / "novelty.npz")
    assert [p.measure for p in novelty.parts] == list(COMBINED_PARTS)
    for part in novelty.parts:  # each part: one fold model per fold, all 40 X-rays out of fold
        assert len(part.folds) == 5 and len(part.reference) == 40
    # Out of fold, each X-ray's combined novelty is its rank in that same reference.
    assert 0.0 < float(np.median(novelty.reference)) < 1.0
    registry.publish(staging, version_id="combined")
    images = sorted((tiny_dataset / "images").iterdir())[:4]
    with Predictor(registry.root, device="cpu", refresh_interval_s=0.0) as predictor:
        answers = predictor.predict([p.read_bytes() for p in images])
    for answer in answers:
        assert isinstance(answer, Prediction) and answer.novelty is not None
        assert 0.0 <= answer.novelty <= 1.0
        assert answer.unfamiliar == (answer.novelty >= novelty.flag_quantile)
