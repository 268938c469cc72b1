"""The active-learning simulation: strategies, splits, the headline numbers, a real tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from toy_images import ring_or_cross, toy_recipe

from training.fitting.config import RecipeConfig
from training.shared.errors import DatasetError
from training.shared.labels import load_label_config
from training.shared.uncertainty import ACQUISITIONS, ranking_score
from training.simulation import STRATEGIES, SimulationConfig, get_strategy
from training.simulation.analysis import summarize
from training.simulation.loop import (
    CONFIG_FILE,
    REPORT_FILE,
    RESULTS_FILE,
    SimulationData,
    draw_seed_set,
    error_detection_auroc,
    held_out_split,
    load_simulation_config,
    run_simulation,
    simulate,
)
from training.simulation.strategies import k_center_greedy

LABEL_CONFIG = Path(__file__).resolve().parents[2] / "label_config.xml"
K = 4


# --- strategies on constructed pools (fast, deterministic) ------------------------------


def _pool_with_rare_ambiguous_class(
    n: int = 200, n_rare: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities where the rare class's items are near-uniform (the model cannot tell)
    and everything else is predicted with confidence; members disagree on the rare ones."""
    rng = np.random.default_rng(seed)
    rare = np.zeros(n, dtype=bool)
    rare[rng.choice(n, n_rare, replace=False)] = True
    probs = np.empty((n, K))
    members = np.empty((5, n, K))
    for i in range(n):
        if rare[i]:
            p = np.full(K, 1.0 / K) + rng.normal(0.0, 0.01, K)
            probs[i] = np.abs(p) / np.abs(p).sum()
            for m in range(5):  # each member confident, in a different class
                members[m, i] = np.full(K, 0.02)
                members[m, i, (m + i) % K] = 1 - 0.02 * (K - 1)
        else:
            top = rng.uniform(0.7, 0.99)
            p = np.full(K, (1 - top) / (K - 1))
            p[rng.integers(K)] = top
            probs[i] = p
            members[:, i] = p  # members agree
    features = rng.normal(size=(n, 8))
    return probs, members, features, rare


@pytest.mark.parametrize(
    ("name", "at_least"),
    [
        ("entropy", 8),
        ("margin", 8),
        ("least_confidence", 8),
        ("bald", 8),
        # Diversity among the 3k most uncertain (10 of which are the rare items): about a third.
        ("entropy_coreset", 3),
    ],
)
def test_uncertainty_strategies_pick_the_rare_ambiguous_class_more_often_than_random(
    name: str, at_least: int
) -> None:
    probs, members, features, rare = _pool_with_rare_ambiguous_class()
    k = 10
    picks = get_strategy(name)(
        probs, members, features, k, np.random.default_rng(1), labelled_features=features[:3]
    )
    assert len(set(picks.tolist())) == k
    hits = int(rare[picks].sum())
    random_hits = [
        int(
            rare[
                get_strategy("random")(probs, members, features, k, np.random.default_rng(s))
            ].sum()
        )
        for s in range(200)
    ]
    # Random sampling finds k * 10/200 = 0.5 of them on average; the measure finds most.
    assert np.mean(random_hits) < 1.5
    assert hits >= at_least, f"{name} found only {hits} of the 10 ambiguous items"


def test_acquisition_strategies_are_the_backends_queue_order() -> None:
    assert set(ACQUISITIONS) <= set(STRATEGIES), "every served acquisition is a strategy"
    probs, members, features, _ = _pool_with_rare_ambiguous_class(n=50, seed=3)
    for name in ACQUISITIONS:
        picks = STRATEGIES[name](probs, members, features, 7, np.random.default_rng(0))
        expected = np.argsort(ranking_score(name, probs, members), kind="stable")[:7]
        assert picks.tolist() == expected.tolist()


def test_random_strategy_is_reproducible_and_distinct() -> None:
    probs = np.full((30, K), 0.25)
    a = STRATEGIES["random"](probs, None, None, 10, np.random.default_rng(5))
    b = STRATEGIES["random"](probs, None, None, 10, np.random.default_rng(5))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10
    assert len(STRATEGIES["random"](probs, None, None, 99, np.random.default_rng(0))) == 30


def test_coreset_picks_spread_out_points_not_near_duplicates() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [20, 20]], dtype=np.float64)
    cluster = np.repeat(np.arange(5), 20)
    features = centres[cluster] + rng.normal(0, 0.1, (100, 2))
    labelled = centres[:1] + rng.normal(0, 0.1, (3, 2))  # cluster 0 is already covered
    probs = np.full((100, K), 0.25)
    picks = STRATEGIES["coreset"](probs, None, features, 4, rng, labelled_features=labelled)
    assert sorted(cluster[picks].tolist()) == [1, 2, 3, 4], "one pick per uncovered cluster"

    # The k-center property: the greedy cover radius is at most twice any k-subset's, so it
    # beats random picks of the same size (here by far, the clusters are tight).
    def radius(idx: np.ndarray) -> float:
        d = np.linalg.norm(features[:, None] - features[idx][None], axis=2)
        return float(d.min(axis=1).max())

    greedy = k_center_greedy(features, 5, rng=np.random.default_rng(0))
    random_radii = [
        radius(np.random.default_rng(s).choice(100, 5, replace=False)) for s in range(50)
    ]
    assert radius(greedy) <= min(random_radii)
    assert radius(greedy) < 1.0  # every point is within one cluster's width of a pick

    duplicates = np.zeros((10, 3))
    assert len(set(k_center_greedy(duplicates, 4).tolist())) == 4, "never the same point twice"


def test_typiclust_takes_the_typical_member_of_each_uncovered_cluster() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]], dtype=np.float64)
    cluster = np.repeat(np.arange(4), 25)
    features = centres[cluster] + rng.normal(0, 0.5, (100, 2))
    outliers = np.array([3, 28, 53, 78])  # one far-off member per cluster: diverse, atypical
    features[outliers] = centres[cluster[outliers]] + 4.0
    labelled = centres[:1] + rng.normal(0, 0.1, (5, 2))  # cluster 0 is covered
    probs = np.full((100, K), 0.25)
    picks = STRATEGIES["typiclust"](
        probs, None, features, 3, np.random.default_rng(1), labelled_features=labelled
    )
    assert sorted(cluster[picks].tolist()) == [1, 2, 3], "one pick per uncovered cluster"
    assert not set(picks.tolist()) & set(outliers.tolist()), "typical, not outlying"
    for p in picks:  # the pick sits near its cluster's centre
        assert np.linalg.norm(features[p] - centres[cluster[p]]) < 0.6


def test_tcm_is_typiclust_at_the_cold_start_then_margin() -> None:
    from training.simulation.strategies import COLD_START_LABELS_PER_CLASS

    rng = np.random.default_rng(0)
    features = rng.normal(size=(60, 3))
    probs = rng.dirichlet(np.ones(K), size=60)
    few = features[:5]
    cold = STRATEGIES["tcm"](
        probs, None, features, 6, np.random.default_rng(2), labelled_features=few
    )
    typi = STRATEGIES["typiclust"](
        probs, None, features, 6, np.random.default_rng(2), labelled_features=few
    )
    assert cold.tolist() == typi.tolist()
    many = rng.normal(size=(COLD_START_LABELS_PER_CLASS * K, 3))
    warm = STRATEGIES["tcm"](probs, None, features, 6, rng, labelled_features=many)
    assert warm.tolist() == STRATEGIES["margin"](probs, None, features, 6, rng).tolist()


def test_unknown_strategy_and_bad_budgets_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy"):
        get_strategy("uncertainty")
    with pytest.raises(ValueError, match="unknown strategies"):
        SimulationConfig(data="x", strategies=("entropy", "best"))
    with pytest.raises(ValueError, match="budget"):
        SimulationConfig(data="x", budget=20, seed_size=20)
    with pytest.raises(ValueError, match="BALD"):
        SimulationConfig(data="x", strategies=("bald",), members=1, mc_passes=0)
    config = SimulationConfig(data="x", budget=115, seed_size=20, batch_size=20)
    assert config.rounds == 5  # 20 → 40 → ... → 100 → 115
    assert SimulationConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# --- splits -----------------------------------------------------------------------------


def test_test_split_is_patient_grouped_and_the_seed_set_is_stratified() -> None:
    rng = np.random.default_rng(0)
    groups = np.array([f"p{i}" for i in rng.integers(0, 70, 200)])
    labels = rng.choice(K, size=200, p=[0.4, 0.3, 0.2, 0.1])
    candidates, test = held_out_split(labels, groups, 0.25, seed=3)
    assert not set(groups[test]) & set(groups[candidates]), "no patient on both sides"
    assert sorted([*candidates, *test]) == list(range(200))
    assert 0.15 < len(test) / 200 < 0.35
    assert set(labels[test]) == set(range(K))

    seed_set = draw_seed_set(labels, groups, candidates, 12, np.random.default_rng(1))
    assert len(seed_set) == 12 and set(seed_set) <= set(candidates)
    assert set(labels[seed_set]) == set(range(K)), "every class in the seed set"
    again = draw_seed_set(labels, groups, candidates, 12, np.random.default_rng(1))
    assert again.tolist() == seed_set.tolist()

    with pytest.raises(DatasetError, match="patients"):
        held_out_split(np.array([0, 1, 0]), np.array(["a", "a", "b"]), 0.25, seed=0)


def test_error_detection_auroc_orients_uncertainty_and_skips_bald_without_members() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.55, 0.45], [0.5, 0.5]])
    y = np.array([0, 0, 1, 1])  # the two uncertain predictions are the wrong ones
    auroc = error_detection_auroc(y, probs, None)
    assert auroc["entropy"] == auroc["margin"] == 1.0
    assert auroc["bald"] is None
    assert error_detection_auroc(np.array([0, 0, 0, 0]), probs, None)["entropy"] is None


# --- the headline numbers ---------------------------------------------------------------


def _run(curve: list[float], xs: list[int]) -> dict:
    return {
        "rounds": [
            {
                "n_labels": x,
                "macro_f1": f,
                "accuracy": f,
                "recall": [f, None],
                "labelled_class_counts": [x // 2, x - x // 2],
            }
            for x, f in zip(xs, curve, strict=True)
        ],
        "final_auroc": {"entropy": 0.7, "bald": 0.6},
    }


def test_labels_saved_auc_and_spread_are_computed_from_the_curves() -> None:
    xs = [10, 20, 30, 40]
    runs = {
        "random": [_run([0.2, 0.3, 0.4, 0.5], xs), _run([0.2, 0.3, 0.4, 0.7], xs)],
        "entropy": [_run([0.2, 0.5, 0.6, 0.7], xs), _run([0.2, 0.7, 0.7, 0.7], xs)],
        "coreset": [_run([0.2, 0.3, 0.4, 0.5], xs), _run([0.2, 0.3, 0.4, 0.55], xs)],
    }
    summary = summarize(runs, ["a", "b"])
    saved = summary["labels_saved"]
    assert saved["target"] == pytest.approx(0.6)
    by = {name: dict(row) for name, row in saved["by_strategy"].items()}
    paired = {name: row.pop("paired") for name, row in by.items()}
    assert by["random"] == {"labels_needed": 40, "labels_saved": 0}
    assert by["entropy"] == {"labels_needed": 20, "labels_saved": 20}
    assert by["coreset"] == {"labels_needed": None, "labels_saved": None}
    # Paired per seed: entropy reaches random's own final (0.5, then 0.7) at 20 labels in both.
    assert paired["entropy"]["per_seed"] == [20, 20]
    assert paired["entropy"]["mean"] == 20 and paired["entropy"]["ci95"] == [20.0, 20.0]
    assert paired["coreset"]["per_seed"] == [0, None]
    assert paired["coreset"]["reached"] == 1 and paired["coreset"]["ci95"] is None
    # AUC: trapezoid / label range; first random run: (0.25 + 0.35 + 0.45) * 10 / 30 = 0.35.
    assert summary["auc"]["random"]["per_seed"][0] == pytest.approx(0.35)
    band = summary["curves"]["random"]["macro_f1"]
    assert band["mean"][-1] == pytest.approx(0.6)
    assert band["sd"][-1] == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert summary["curves"]["random"]["recall"]["b"]["mean"] == [None] * 4
    assert summary["error_detection_auroc"]["best"] == "entropy"
    assert summary["near_chance"] is False


# --- real training: a tiny simulation end to end, and its reproducibility ---------------


def _quick_recipe(size: int = 32) -> RecipeConfig:
    return RecipeConfig.from_profile(
        "quick", image_size_px=size, pretrained=False, arch="resnet18", epochs_from_scratch=1
    )


def _toy_data(n: int = 48, size: int = 32) -> SimulationData:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % K
    images = (rng.random((n, size, size)) * 0.3).astype(np.float16)
    for i, y in enumerate(labels):
        images[i, 2 + 7 * y : 8 + 7 * y, 4:28] = 1.0
    return SimulationData(
        arrays=images,
        labels=labels,
        groups=np.array([f"p{i // 2}" for i in range(n)]),
        keys=tuple(f"item{i}" for i in range(n)),
        classes=("a", "b", "c", "d"),
    )


@pytest.mark.slow
def test_same_configuration_gives_the_same_selections_and_curves() -> None:
    config = SimulationConfig(
        data="toy",
        strategies=("bald", "coreset"),
        seeds=1,
        budget=12,
        batch_size=4,
        seed_size=8,
        members=2,  # BALD from a two-model ensemble (the end-to-end test uses MC dropout)
        recipe=_quick_recipe(),
    )
    first = run_simulation(_toy_data(), config)
    again = run_simulation(_toy_data(), SimulationConfig.from_dict(config.to_dict()))
    for name in config.strategies:
        a, b = first["runs"][name][0], again["runs"][name][0]
        assert [r["picked"] for r in a["rounds"]] == [r["picked"] for r in b["rounds"]]
        assert len(a["rounds"][1]["picked"]) == 4
        assert [r["macro_f1"] for r in a["rounds"]] == [r["macro_f1"] for r in b["rounds"]]
        assert a["final_auroc"] == b["final_auroc"]
    test_keys = set(first["test"]["keys"])
    for name in config.strategies:
        run = first["runs"][name][0]
        picked = {k for r in run["rounds"] for k in r["picked"]}
        assert not (picked | set(run["seed_set"])) & test_keys, "the test split is never picked"


@pytest.mark.slow
def test_locate_classify_rounds_learn_from_the_revealed_centres() -> None:
    """The cpu profile's design in a simulation: real Lite0 ImageNet weights, toy images
    whose class is the valve-like object's shape and whose position varies."""
    n = 64
    images, labels, centres = ring_or_cross(n, seed=3)
    data = SimulationData(
        arrays=images,
        labels=labels,
        groups=np.array([f"p{i}" for i in range(n)]),
        keys=tuple(f"item{i}" for i in range(n)),
        classes=("ring", "cross"),
        centres=centres,
    )
    recipe = toy_recipe()
    config = SimulationConfig(
        data="toy",
        strategies=("random", "tcm"),
        seeds=1,
        budget=40,
        batch_size=8,
        seed_size=32,
        mc_passes=4,
        recipe=recipe,
    )
    results = run_simulation(data, config)
    assert results["design"] == "locate_classify", "every image has a centre"
    final = [results["runs"][s][0]["rounds"][-1]["macro_f1"] for s in config.strategies]
    assert min(final) >= 0.8, final
    assert results["init"]["init"] == "imagenet"

    no_centres = SimulationData(
        arrays=images, labels=labels, groups=data.groups, keys=data.keys, classes=data.classes
    )
    assert no_centres.located == 0
    assert recipe.for_snapshot(no_centres.located, n).design == "whole_image"


@pytest.mark.slow
def test_a_tiny_simulation_runs_end_to_end_and_writes_report_and_json(
    tiny_dataset: Path, tmp_path: Path
) -> None:
    config = SimulationConfig(
        data=str(tiny_dataset),
        strategies=("random", "entropy"),
        seeds=1,
        budget=12,
        batch_size=4,
        seed_size=8,
        recipe=_quick_recipe(),
    )
    out = tmp_path / "sim"
    report = simulate(
        config,
        out,
        classes=load_label_config(LABEL_CONFIG).classes,
        cache_dir=tmp_path / "cache",
        download_dir=tmp_path / "downloads",
    )
    assert report == out / REPORT_FILE
    html = report.read_text(encoding="utf-8")
    assert "Learning curves" in html and "Labels saved" in html
    assert html.count("data:image/png;base64,") >= 2
    assert "<script" not in html and 'src="http' not in html, "self-contained"

    results = json.loads((out / RESULTS_FILE).read_text(encoding="utf-8"))
    for name in config.strategies:
        (run,) = results["runs"][name]
        assert [r["n_labels"] for r in run["rounds"]] == [8, 12]
        assert 0.0 <= run["rounds"][-1]["macro_f1"] <= 1.0
        assert set(run["final_auroc"]) == set(ACQUISITIONS)
    summary = results["summary"]
    assert summary["curves"]["entropy"]["n_labels"] == [8, 12]
    assert "entropy" in summary["labels_saved"]["by_strategy"]

    saved, snapshot = load_simulation_config(out / CONFIG_FILE)
    assert saved == config
    assert snapshot["n_images"] == 40 and len(snapshot["sha256"]) == 64
    assert all(len(row["group"]) == 16 for row in snapshot["items"]), "patients pseudonymised"
    with pytest.raises(DatasetError, match="snapshot"):
        simulate(
            config,
            tmp_path / "changed",
            classes=load_label_config(LABEL_CONFIG).classes,
            cache_dir=tmp_path / "cache",
            download_dir=tmp_path / "downloads",
            expected_snapshot={**snapshot, "sha256": "0" * 64},
        )
