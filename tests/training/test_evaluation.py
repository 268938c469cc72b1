"""``evaluate_oof`` on constructed out-of-fold predictions with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from training.fitting.evaluation import (
    DEGENERATE_SPREAD,
    ECE_BINS,
    TEMPERATURE_BOUND_TOL,
    TEMPERATURE_BOUNDS,
    WARNING_CODES,
    evaluate_oof,
    expected_calibration_error,
    fit_temperature,
    most_missed,
    reliability_bins,
    setting_metrics,
    temperature_bound,
    write_metrics,
)
from training.shared.labels import SettingScale
from training.shared.uncertainty import ACQUISITIONS, entropy, margin, softmax

CLASSES = ["hakim", "certas", "sm8"]

# Two splits, hand-checked:
# fold 0: truth 0 0 1 1 2 2, predicted 0 0 1 2 2 2  -> accuracy 5/6
# fold 1: truth 0 0 0 1 2,   predicted 0 1 0 1 2    -> accuracy 4/5
Y = np.array([0, 0, 1, 1, 2, 2, 0, 0, 0, 1, 2])
PRED = np.array([0, 0, 1, 2, 2, 2, 0, 1, 0, 1, 2])
FOLD = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1])


def _logits_for(pred: np.ndarray, k: int = 3, strength: float = 4.0) -> np.ndarray:
    return strength * np.eye(k)[pred]


def _strict_json(metrics: dict) -> dict:
    return json.loads(json.dumps(metrics, allow_nan=False))


def test_per_split_metrics_match_hand_values_and_sklearn() -> None:
    m = evaluate_oof(Y, _logits_for(PRED), FOLD, CLASSES)
    s0, s1 = m["splits"]
    assert s0["fold"] == 0 and s1["fold"] == 1
    assert s0["accuracy"] == pytest.approx(5 / 6)
    assert s1["accuracy"] == pytest.approx(4 / 5)
    # fold 0 per class P/R: (1, 1), (1, 1/2), (2/3, 1)
    assert s0["precision_macro"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert s0["recall_macro"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert s0["f1_macro"] == pytest.approx((1 + 2 / 3 + 0.8) / 3)
    # fold 1 per class P/R: (1, 2/3), (1/2, 1), (1, 1)
    assert s1["precision_macro"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert s1["recall_macro"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert s1["f1_macro"] == pytest.approx((0.8 + 2 / 3 + 1) / 3)
    for split, fold_id in ((s0, 0), (s1, 1)):
        mask = fold_id == FOLD
        p, r, f, _ = precision_recall_fscore_support(
            Y[mask], PRED[mask], average="macro", zero_division=0
        )
        assert split["accuracy"] == pytest.approx(accuracy_score(Y[mask], PRED[mask]))
        assert (split["precision_macro"], split["recall_macro"], split["f1_macro"]) == (
            pytest.approx(p),
            pytest.approx(r),
            pytest.approx(f),
        )
    assert (s0["n_val"], s0["n_train"], s1["n_val"], s1["n_train"]) == (6, 5, 5, 6)
    assert m["n_images"] == 11 and m["n_folds"] == 2 and m["classes"] == CLASSES


def test_mean_and_sample_sd_across_splits() -> None:
    m = evaluate_oof(Y, _logits_for(PRED), FOLD, CLASSES)
    accs = [5 / 6, 4 / 5]
    assert m["mean"]["accuracy"] == pytest.approx(np.mean(accs))
    assert m["std"]["accuracy"] == pytest.approx(np.std(accs, ddof=1))
    assert m["std"]["accuracy"] == pytest.approx((5 / 6 - 4 / 5) / math.sqrt(2))
    assert m["pooled"]["accuracy"] == pytest.approx(9 / 11)


def test_per_class_values_and_error_rate() -> None:
    m = evaluate_oof(Y, _logits_for(PRED), FOLD, CLASSES)
    certas = m["per_class"]["certas"]
    # recall per split 1/2 and 1 -> error rates 1/2 and 0.
    assert certas["recall"] == pytest.approx(0.75)
    assert certas["error_rate"] == pytest.approx(0.25)
    assert certas["std"]["error_rate"] == pytest.approx(np.std([0.5, 0.0], ddof=1))
    assert certas["precision"] == pytest.approx((1 + 0.5) / 2)
    assert certas["support"] == 3 and certas["n_splits"] == 2
    hakim = m["per_class"]["hakim"]
    assert hakim["error_rate"] == pytest.approx((0 + 1 / 3) / 2)
    # pooled over both splits: certas truth at 2, 3, 9; predicted certas at 2, 7, 9.
    assert certas["pooled"]["recall"] == pytest.approx(2 / 3)
    assert certas["pooled"]["precision"] == pytest.approx(2 / 3)
    assert certas["pooled"]["error_rate"] == pytest.approx(1 / 3)


def test_confusion_matrix_is_pooled_and_row_normalised() -> None:
    m = evaluate_oof(Y, _logits_for(PRED), FOLD, CLASSES)
    cm = m["confusion_matrix"]
    assert cm["labels"] == CLASSES
    assert cm["counts"] == [[4, 1, 0], [0, 2, 1], [0, 0, 3]]
    np.testing.assert_allclose(cm["normalized"], [[0.8, 0.2, 0], [0, 2 / 3, 1 / 3], [0, 0, 1]])


def test_uncertainty_means_per_true_class_are_averaged_over_splits() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(Y.size, 3)) * 2
    m = evaluate_oof(Y, logits, FOLD, CLASSES)
    probs = softmax(logits)
    h, g = entropy(probs), margin(probs)
    for c, name in enumerate(CLASSES):
        per_split_h = [h[(k == FOLD) & (c == Y)].mean() for k in (0, 1)]
        per_split_g = [g[(k == FOLD) & (c == Y)].mean() for k in (0, 1)]
        row = m["uncertainty"]["per_class"][name]
        assert row["entropy"] == pytest.approx(np.mean(per_split_h))
        assert row["margin"] == pytest.approx(np.mean(per_split_g))
        assert row["std"]["entropy"] == pytest.approx(np.std(per_split_h, ddof=1))
    wrong = probs.argmax(1) != Y
    by = m["uncertainty"]["by_correctness"]
    assert by["wrong"]["n"] == wrong.sum()
    assert by["wrong"]["entropy"] == pytest.approx(h[wrong].mean())
    assert by["correct"]["max_softmax"] == pytest.approx(probs.max(1)[~wrong].mean())


def test_auroc_is_one_when_uncertainty_is_higher_exactly_on_errors() -> None:
    n = 40
    y = np.arange(n) % 3
    fold = np.arange(n) % 4
    pred = y.copy()
    wrong_idx = np.arange(0, n, 5)
    pred[wrong_idx] = (y[wrong_idx] + 1) % 3
    probs = np.full((n, 3), 0.02)
    probs[np.arange(n), pred] = 0.96  # confident and right ...
    probs[wrong_idx] = 0.3  # ... or hesitant and wrong
    probs[wrong_idx, pred[wrong_idx]] = 0.4
    m = evaluate_oof(y, np.log(probs), fold, CLASSES)
    auroc = m["uncertainty"]["error_detection_auroc"]
    for name in ("entropy", "max_softmax", "margin", "least_confidence"):
        assert auroc[name] == pytest.approx(1.0), name
    assert m["uncertainty"]["best_acquisition"] in ACQUISITIONS
    assert "bald" not in auroc


def test_auroc_orientation_is_not_flipped() -> None:
    # The opposite world: the model is hesitant when right and confident when wrong.
    y = np.array([0, 1, 2, 0, 1, 2])
    pred = np.array([0, 1, 2, 1, 2, 0])
    probs = np.full((6, 3), 0.01)
    probs[np.arange(6), pred] = 0.98
    probs[:3] = [0.4, 0.3, 0.3]
    probs[1] = [0.3, 0.4, 0.3]
    probs[2] = [0.3, 0.3, 0.4]
    m = evaluate_oof(y, np.log(probs), np.array([0, 0, 0, 1, 1, 1]), CLASSES)
    assert m["uncertainty"]["error_detection_auroc"]["entropy"] == pytest.approx(0.0)


def test_bald_auroc_with_ensemble_members() -> None:
    n = 30
    y = np.arange(n) % 2
    pred = y.copy()
    wrong = np.arange(n) % 6 == 0
    pred[wrong] = 1 - y[wrong]
    logits = 3.0 * (2 * np.eye(2)[pred] - 1)
    members = np.stack([logits, logits.copy()])
    members[1, wrong] = -members[1, wrong]  # members disagree exactly on the errors
    m = evaluate_oof(y, logits, np.arange(n) % 3, ["a", "b"], member_logits=members)
    assert m["uncertainty"]["error_detection_auroc"]["bald"] == pytest.approx(1.0)
    assert "bald" in m["uncertainty"]["per_class"]["a"]
    assert m["uncertainty"]["best_acquisition"] == "bald"


def test_all_correct_gives_null_auroc_and_strict_json() -> None:
    y = np.array([0, 1, 0, 1, 0, 1])
    m = evaluate_oof(y, _logits_for(y, k=2), np.array([0, 0, 1, 1, 2, 2]), ["a", "b"])
    assert all(v is None for v in m["uncertainty"]["error_detection_auroc"].values())
    assert m["uncertainty"]["best_acquisition"] is None
    assert m["uncertainty"]["by_correctness"]["wrong"] == {
        "entropy": None,
        "max_softmax": None,
        "margin": None,
        "n": 0,
    }
    assert m["mean"]["accuracy"] == 1.0 and m["std"]["accuracy"] == 0.0
    assert _strict_json(m) == m


def test_all_wrong_gives_null_auroc() -> None:
    y = np.array([0, 1, 0, 1])
    m = evaluate_oof(y, _logits_for(1 - y, k=2), np.array([0, 0, 1, 1]), ["a", "b"])
    assert m["uncertainty"]["error_detection_auroc"]["entropy"] is None
    assert m["mean"]["accuracy"] == 0.0


def test_class_absent_from_a_split_does_not_drag_the_macro_mean() -> None:
    y = np.array([0, 1, 2, 0, 1, 0, 1])
    fold = np.array([0, 0, 0, 1, 1, 1, 1])
    m = evaluate_oof(y, _logits_for(y), fold, CLASSES)
    assert m["splits"][1]["f1_macro"] == 1.0
    sm8 = m["per_class"]["sm8"]
    assert sm8["n_splits"] == 1 and sm8["support"] == 1
    assert sm8["recall"] == 1.0 and sm8["std"]["recall"] is None
    assert m["uncertainty"]["per_class"]["sm8"]["std"]["entropy"] is None
    assert _strict_json(m) == m


def test_class_absent_everywhere_and_single_class_present() -> None:
    y = np.zeros(6, dtype=int)
    pred = np.array([0, 0, 0, 0, 1, 0])
    m = evaluate_oof(y, _logits_for(pred), np.array([0, 0, 1, 1, 2, 2]), CLASSES)
    sm8 = m["per_class"]["sm8"]
    assert sm8["support"] == 0 and sm8["n_splits"] == 0 and sm8["recall"] is None
    assert sm8["pooled"]["recall"] is None
    assert m["uncertainty"]["per_class"]["sm8"]["entropy"] is None
    assert m["splits"][2]["accuracy"] == 0.5
    assert m["confusion_matrix"]["normalized"][2] == [0.0, 0.0, 0.0]
    assert _strict_json(m) == m


def test_single_split_has_null_sd_and_no_cross_fitted_ece() -> None:
    y = np.array([0, 1, 1, 0, 1])
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0], [0.0, 3.0]])
    m = evaluate_oof(y, logits, np.zeros(5, dtype=int), ["a", "b"])
    assert m["std"] == dict.fromkeys(("accuracy", "precision_macro", "recall_macro", "f1_macro"))
    cal = m["calibration"]
    assert cal["ece_after"] is None and cal["ece_after_in_sample"] is not None
    assert cal["reliability"]["after_source"] == "in_sample"
    assert _strict_json(m) == m


def test_n_train_per_fold_mapping_or_sequence() -> None:
    m = evaluate_oof(Y, _logits_for(PRED), FOLD, CLASSES, n_train_per_fold={0: 50, 1: 60})
    assert [s["n_train"] for s in m["splits"]] == [50, 60]
    m = evaluate_oof(Y, _logits_for(PRED), FOLD, CLASSES, n_train_per_fold=[7, 8])
    assert [s["n_train"] for s in m["splits"]] == [7, 8]
    with pytest.raises(ValueError):
        evaluate_oof(Y, _logits_for(PRED), FOLD, CLASSES, n_train_per_fold=[7])


def test_temperature_scaling_recovers_overconfidence() -> None:
    rng = np.random.default_rng(0)
    n, k = 20_000, 4
    true_logits = rng.normal(scale=1.5, size=(n, k))
    p_true = softmax(true_logits)
    y = (rng.random((n, 1)) > p_true.cumsum(axis=1)).sum(axis=1)  # sample y ~ p_true
    overconfident = 2.0 * true_logits
    assert fit_temperature(overconfident, y) == pytest.approx(2.0, abs=0.1)
    m = evaluate_oof(y, overconfident, np.arange(n) % 5, ["a", "b", "c", "d"])
    cal = m["calibration"]
    assert cal["temperature"] == pytest.approx(2.0, abs=0.1)
    assert cal["n_bins"] == ECE_BINS
    assert cal["ece_after"] < cal["ece_before"] / 2
    assert cal["nll_after"] < cal["nll_before"]
    assert len(cal["cross_fitted_temperatures"]) == 5
    for entry in cal["cross_fitted_temperatures"]:
        assert entry["temperature"] == pytest.approx(2.0, abs=0.15)
    rel = cal["reliability"]["before"]
    assert len(rel["bin_edges"]) == ECE_BINS + 1 and sum(rel["count"]) == n
    assert _strict_json(m) == m


def test_ece_hand_example() -> None:
    # Two items at confidence 0.8 (one right), two at 0.6 (both right):
    # ECE = 0.5 * |0.5 - 0.8| + 0.5 * |1 - 0.6| = 0.35
    probs = np.array([[0.8, 0.2], [0.8, 0.2], [0.6, 0.4], [0.4, 0.6]])
    y = np.array([0, 1, 0, 1])
    assert expected_calibration_error(probs, y) == pytest.approx(0.35)
    bins = reliability_bins(probs, y, n_bins=5)
    assert bins["count"] == [0, 0, 2, 2, 0]
    assert bins["accuracy"][2] == 1.0 and bins["accuracy"][3] == 0.5
    assert math.isnan(bins["accuracy"][0])


def test_rejects_inconsistent_inputs() -> None:
    with pytest.raises(ValueError, match="logits"):
        evaluate_oof(Y, np.zeros((Y.size, 2)), FOLD, CLASSES)
    with pytest.raises(ValueError, match="class indices"):
        evaluate_oof(Y + 1, _logits_for(PRED), FOLD, CLASSES)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_oof(Y, np.full((Y.size, 3), np.nan), FOLD, CLASSES)
    with pytest.raises(ValueError, match="member_logits"):
        evaluate_oof(Y, _logits_for(PRED), FOLD, CLASSES, member_logits=np.zeros((2, 3, 3)))


def test_write_metrics_is_strict_json(tmp_path: Path) -> None:
    m = evaluate_oof(Y, _logits_for(PRED), FOLD, CLASSES)
    m["extra"] = float("nan")
    path = write_metrics(m, tmp_path / "metrics.json")
    loaded = json.loads(path.read_text())
    assert loaded["extra"] is None
    assert loaded["splits"] == m["splits"]


# --- warnings: numbers that must not be read at face value (issue 12, item 4) --------------

FOUR = ["a", "b", "c", "d"]


def _chance_level_oof(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An overconfident chance-level model, like the report that prompted these warnings.

    20 X-rays per class, 4 folds. Classes a and b are always mistaken for each other (100 %
    error each, a tie); c and d are right on 5 of 20. Every prediction has a logit gap of
    30-35 (wrong ones the smaller gap), so every OOF entropy is ~1e-12: "0.00" in the
    report, yet its AUROC is a perfect 1.0 on those meaningless differences.
    """
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(4), 20)
    pred = np.array([1, 0, 3, 2])[y]
    right = np.isin(y, [2, 3]) & (np.arange(80) % 20 < 5)
    pred[right] = y[right]
    gap = np.where(pred == y, 35.0, 30.0) + rng.uniform(0, 0.5, y.size)
    logits = gap[:, None] * np.eye(4)[pred]
    return y, logits, np.arange(80) % 4


def _codes(metrics: dict) -> list[str]:
    return [w["code"] for w in metrics["warnings"]]


def test_a_healthy_model_has_no_warnings() -> None:
    rng = np.random.default_rng(1)
    n = 90
    y = np.arange(n) % 3
    logits = rng.normal(size=(n, 3))
    logits[np.arange(n), y] += 2.5
    m = evaluate_oof(y, logits, (np.arange(n) // 3) % 3, CLASSES)
    assert m["warnings"] == []
    assert m["uncertainty"]["degenerate_measures"] == []
    assert m["uncertainty"]["best_acquisition"] in ACQUISITIONS
    assert m["calibration"]["temperature_at_bound"] is None
    assert m["calibration"]["temperature_bounds"] == list(TEMPERATURE_BOUNDS)
    assert len(m["most_missed"]["classes"]) == 1
    assert _strict_json(m) == m


def test_the_chance_level_model_raises_every_flag() -> None:
    y, logits, fold = _chance_level_oof()
    m = evaluate_oof(y, logits, fold, FOUR)
    assert _codes(m) == [
        "below_chance",
        "below_chance",
        "temperature_at_bound",
        "degenerate_uncertainty",
    ]
    assert set(_codes(m)) <= set(WARNING_CODES)
    assert m["most_missed"] == {"classes": ["a", "b"], "error_rate": 1.0}
    assert m["uncertainty"]["best_acquisition"] is None
    assert all(w["message"] for w in m["warnings"])
    assert _strict_json(m) == m


def test_macro_f1_and_accuracy_below_chance_are_flagged() -> None:
    y, logits, fold = _chance_level_oof()
    m = evaluate_oof(y, logits, fold, FOUR)
    below = {w["metric"]: w for w in m["warnings"] if w["code"] == "below_chance"}
    assert set(below) == {"f1_macro", "accuracy"}
    f1 = below["f1_macro"]
    assert f1["value"] == pytest.approx(m["mean"]["f1_macro"]) and f1["value"] < 0.25
    assert (f1["chance"], f1["n_classes"]) == (0.25, 4)
    assert f"macro-F1 {f1['value']:.2f} is below chance (0.25 for 4 classes)" in f1["message"]
    assert below["accuracy"]["message"].startswith(
        f"accuracy {m['mean']['accuracy']:.2f} is below chance (0.25 for 4 classes)"
    )


def test_chance_counts_the_classes_with_images_and_at_chance_is_flagged() -> None:
    # A 4-class vocabulary with one class never labelled: k = 3. Everything predicted as
    # class 0 gives accuracy 1/3 (at chance) and macro-F1 (0.5 + 0 + 0) / 3 (below).
    y = np.arange(30) % 3
    fold = (np.arange(30) // 3) % 2  # 5 X-rays of each class per fold
    m = evaluate_oof(y, _logits_for(np.zeros(30, int), k=4), fold, FOUR)
    below = {w["metric"]: w for w in m["warnings"] if w["code"] == "below_chance"}
    assert below["accuracy"]["n_classes"] == 3
    assert below["accuracy"]["chance"] == pytest.approx(1 / 3)
    assert "accuracy 0.33 is at chance (0.33 for 3 classes)" in below["accuracy"]["message"]
    assert "macro-F1 0.17 is below chance (0.33 for 3 classes)" in below["f1_macro"]["message"]


def test_temperature_at_its_search_bound_is_flagged() -> None:
    y, logits, fold = _chance_level_oof()
    m = evaluate_oof(y, logits, fold, FOUR)
    cal = m["calibration"]
    assert cal["temperature"] == pytest.approx(TEMPERATURE_BOUNDS[1], rel=TEMPERATURE_BOUND_TOL)
    assert cal["temperature_at_bound"] == "upper"
    (warning,) = [w for w in m["warnings"] if w["code"] == "temperature_at_bound"]
    assert warning["bound"] == "upper" and warning["bounds"] == list(TEMPERATURE_BOUNDS)
    assert f"upper search bound ({TEMPERATURE_BOUNDS[1]})" in warning["message"]
    assert "calibration unreliable" in warning["message"]


def test_temperature_at_the_lower_bound_is_flagged_too() -> None:
    # Always right with small logits: sharper is always better, T runs to the lower bound.
    y = np.arange(40) % 4
    m = evaluate_oof(y, _logits_for(y, k=4, strength=0.1), np.arange(40) % 4, FOUR)
    assert m["calibration"]["temperature_at_bound"] == "lower"
    (warning,) = [w for w in m["warnings"] if w["code"] == "temperature_at_bound"]
    assert f"lower search bound ({TEMPERATURE_BOUNDS[0]})" in warning["message"]


def test_temperature_bound_uses_the_search_interval() -> None:
    lo, hi = TEMPERATURE_BOUNDS
    assert temperature_bound(lo) == "lower" and temperature_bound(hi) == "upper"
    assert temperature_bound(hi * np.exp(-TEMPERATURE_BOUND_TOL / 2)) == "upper"
    assert temperature_bound(hi * np.exp(-2 * TEMPERATURE_BOUND_TOL)) is None
    assert temperature_bound(1.0) is None and temperature_bound(np.sqrt(lo * hi)) is None


def test_tied_most_missed_classes_are_all_named() -> None:
    y, logits, fold = _chance_level_oof()
    assert evaluate_oof(y, logits, fold, FOUR)["most_missed"]["classes"] == ["a", "b"]
    per_class = {
        "x": {"error_rate": 0.5},
        "y": {"error_rate": 0.5 + 1e-12},
        "z": {"error_rate": 0.2},
        "w": {"error_rate": None},
    }
    assert most_missed(per_class) == {"classes": ["x", "y"], "error_rate": 0.5 + 1e-12}
    assert most_missed({"x": {"error_rate": 0.0}}) is None
    m = evaluate_oof(Y, _logits_for(PRED), FOLD, CLASSES)
    assert m["most_missed"] == {"classes": ["certas"], "error_rate": pytest.approx(0.25)}


def test_degenerate_entropy_is_flagged_and_never_the_best_acquisition() -> None:
    y, logits, fold = _chance_level_oof()
    m = evaluate_oof(y, logits, fold, FOUR)
    unc = m["uncertainty"]
    # The meaningless 1e-12 differences rank the errors perfectly ...
    assert unc["error_detection_auroc"]["entropy"] == pytest.approx(1.0)
    assert unc["by_correctness"]["wrong"]["entropy"] < 1e-9
    # ... yet entropy (and every other measure here) is degenerate, so none is recommended.
    assert {"entropy", "margin", "least_confidence", "max_softmax"} == set(
        unc["degenerate_measures"]
    )
    assert all(s < DEGENERATE_SPREAD for s in unc["measure_spread"].values())
    assert unc["best_acquisition"] is None
    (warning,) = [w for w in m["warnings"] if w["code"] == "degenerate_uncertainty"]
    assert warning["measures"] == unc["degenerate_measures"]
    assert warning["message"].startswith("degenerate uncertainty: entropy (spread")


def test_best_acquisition_falls_back_to_the_best_non_degenerate_measure() -> None:
    # Same overconfident model plus an ensemble that disagrees on half of the errors: BALD
    # varies (AUROC < 1), the softmax measures are degenerate (AUROC 1 on noise).
    y, logits, fold = _chance_level_oof()
    wrong = logits.argmax(1) != y
    members = np.stack([logits, logits.copy()])
    flip = wrong & (np.arange(y.size) % 2 == 0)
    members[1, flip] = 30.0 * np.eye(4)[y[flip]]
    m = evaluate_oof(y, logits, fold, FOUR, member_logits=members)
    unc = m["uncertainty"]
    assert "bald" not in unc["degenerate_measures"]
    assert unc["error_detection_auroc"]["bald"] < unc["error_detection_auroc"]["entropy"]
    assert unc["best_acquisition"] == "bald"


# --- pressure settings ------------------------------------------------------------------

HAKIM = SettingScale("Codman Hakim", "setting_hakim", ("30", "40", "50", "60"))
PROGAV = SettingScale("proGAV 2.0", "setting_progav", ("0", "1", "2"))


def test_setting_metrics_exact_within_one_step_and_confusion() -> None:
    valves = ["Codman Hakim"] * 5 + ["proGAV 2.0"] * 2
    true = ["30", "40", "50", "60", "30", "0", "2"]
    pred = ["30", "50", "40", "30", "30", "0", "2"]  # exact, +1, -1, -3 steps, exact
    out = setting_metrics([HAKIM, PROGAV], valves, true, pred)
    hakim = out["Codman Hakim"]
    assert hakim["n"] == 5
    assert hakim["exact"] == pytest.approx(2 / 5)
    assert hakim["within_one"] == pytest.approx(4 / 5)  # scale neighbours count as within one
    assert hakim["mean_abs_steps"] == pytest.approx((0 + 1 + 1 + 3 + 0) / 5)
    assert hakim["values"] == ["30", "40", "50", "60"]
    assert hakim["confusion"] == [  # rows true, columns predicted
        [2, 0, 0, 0],
        [0, 0, 1, 0],
        [0, 1, 0, 0],
        [1, 0, 0, 0],
    ]
    assert out["proGAV 2.0"] == {
        "n": 2,
        "exact": 1.0,
        "within_one": 1.0,
        "mean_abs_steps": 0.0,
        "values": ["0", "1", "2"],
        "confusion": [[1, 0, 0], [0, 0, 0], [0, 0, 1]],
    }
    json.dumps(out, allow_nan=False)  # plain JSON for metrics.json


def test_setting_metrics_count_only_items_with_both_settings() -> None:
    valves = ["Codman Hakim", "Codman Hakim", "Codman Hakim", "proGAV 2.0", "Other valve"]
    true = ["40", None, "50", None, "1"]
    pred = [None, "40", "60", "1", "1"]
    out = setting_metrics([HAKIM, PROGAV], valves, true, pred)
    assert list(out) == ["Codman Hakim"]  # proGAV has no scored item, Other valve no scale
    assert (out["Codman Hakim"]["n"], out["Codman Hakim"]["within_one"]) == (1, 1.0)
    assert setting_metrics([HAKIM], [], [], []) == {}


def test_setting_metrics_refuse_values_off_the_scale_and_ragged_input() -> None:
    with pytest.raises(ValueError, match="not on the Codman Hakim scale"):
        setting_metrics([HAKIM], ["Codman Hakim"], ["35"], ["30"])
    with pytest.raises(ValueError, match="one entry per item"):
        setting_metrics([HAKIM], ["Codman Hakim"], ["30", "40"], ["30"])
