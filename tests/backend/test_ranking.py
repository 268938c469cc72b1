"""The acquisition setting and the score: ascending score = most uncertain first."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from backend.service import ranking
from backend.service.ranking import rank_tasks, resolve_acquisition, score, validate_acquisition
from backend.settings import SettingsError
from training.shared.uncertainty import ACQUISITIONS, normalized_entropy

NEAR_UNIFORM = [0.26, 0.25, 0.25, 0.24]
CONFIDENT = [0.97, 0.01, 0.01, 0.01]


def test_auto_takes_the_reports_best_acquisition() -> None:
    metrics = {"uncertainty": {"best_acquisition": "margin"}}
    assert resolve_acquisition("auto", metrics) == "margin"
    assert resolve_acquisition("AUTO", metrics) == "margin"


@pytest.mark.parametrize(
    "metrics",
    [None, {}, {"uncertainty": {}}, {"uncertainty": {"best_acquisition": None}}],
)
def test_auto_without_a_recommendation_falls_back_to_entropy(metrics: dict | None) -> None:
    assert resolve_acquisition("auto", metrics) == "entropy"


def test_auto_ignores_a_recommendation_it_does_not_know() -> None:
    assert resolve_acquisition("auto", {"uncertainty": {"best_acquisition": "magic"}}) == "entropy"


def test_an_explicit_setting_wins_over_the_report() -> None:
    metrics = {"uncertainty": {"best_acquisition": "margin"}}
    assert resolve_acquisition("bald", metrics) == "bald"
    assert resolve_acquisition(" Entropy ", metrics) == "entropy"


def test_an_unknown_setting_lists_the_valid_names() -> None:
    with pytest.raises(SettingsError) as info:
        validate_acquisition("max-entropy")
    message = str(info.value)
    assert "VALVE_ID_ACQUISITION" in message and "'max-entropy'" in message
    for name in ["auto", *ACQUISITIONS]:
        assert name in message
    with pytest.raises(SettingsError):
        resolve_acquisition("random", None)


@pytest.mark.parametrize("name", sorted(ACQUISITIONS))
def test_a_near_uniform_prediction_ranks_before_a_confident_one(name: str) -> None:
    # The uncertain item's members disagree, the confident item's agree.
    members = np.array(
        [
            [CONFIDENT, [0.70, 0.10, 0.10, 0.10]],
            [CONFIDENT, [0.10, 0.70, 0.10, 0.10]],
            [CONFIDENT, [0.10, 0.10, 0.70, 0.10]],
            [CONFIDENT, [0.14, 0.10, 0.10, 0.66]],
        ]
    )
    probs = members.mean(axis=0)
    np.testing.assert_allclose(probs, [CONFIDENT, NEAR_UNIFORM])
    scores = score(name, probs, members)
    assert scores.shape == (2,)
    assert np.all((scores >= 0) & (scores <= 1))
    assert scores[1] < scores[0]
    assert rank_tasks({"confident": scores[0], "uncertain": scores[1]}) == [
        "uncertain",
        "confident",
    ]


def test_bald_ranks_disagreeing_members_first_where_entropy_cannot_tell() -> None:
    # Both items have the same mean prediction (so the same entropy), but only in the second
    # do the members disagree: BALD must put it first.
    agree = [[0.5, 0.5], [0.5, 0.5]]
    disagree = [[0.95, 0.05], [0.05, 0.95]]
    members = np.array([[agree[0], disagree[0]], [agree[1], disagree[1]]])
    probs = members.mean(axis=0)
    np.testing.assert_allclose(probs[0], probs[1])
    entropy_scores = score("entropy", probs, members)
    assert entropy_scores[0] == pytest.approx(entropy_scores[1])
    bald_scores = score("bald", probs, members)
    assert bald_scores[1] < bald_scores[0]
    assert bald_scores[0] == pytest.approx(1.0)  # agreeing members: no mutual information


def test_bald_with_a_single_model_falls_back_to_entropy_and_says_so_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ranking, "_warned_single_member", type(ranking._warned_single_member)())
    probs = np.array([CONFIDENT, NEAR_UNIFORM])
    with caplog.at_level(logging.WARNING, logger="backend.service.ranking"):
        first = score("bald", probs, probs[None])
        second = score("bald", probs, None)
    np.testing.assert_allclose(first, 1.0 - normalized_entropy(probs))
    np.testing.assert_allclose(second, first)
    warnings = [r for r in caplog.records if "ensemble" in r.getMessage()]
    assert len(warnings) == 1


def test_score_is_one_minus_the_acquisitions_uncertainty() -> None:
    probs = np.array([NEAR_UNIFORM, CONFIDENT, [0.5, 0.5, 0.0, 0.0]])
    np.testing.assert_allclose(score("entropy", probs), 1.0 - normalized_entropy(probs))
    np.testing.assert_allclose(score("margin", probs), [0.01, 0.96, 0.0], atol=1e-12)


def test_rank_tasks_orders_ascending_with_ties_by_id_and_nan_last() -> None:
    scores = {7: 0.5, 3: 0.1, 5: 0.5, 1: float("nan"), 2: 0.9, 4: 0.1}
    assert rank_tasks(scores) == [3, 4, 5, 7, 2, 1]
    assert rank_tasks({}) == []


def test_an_uncertain_setting_moves_an_x_ray_up_the_queue() -> None:
    from backend.service.ranking import with_setting

    scores = np.array([0.9, 0.9, 0.5])
    adjusted = with_setting(scores, np.array([1.0, 0.3, np.nan]))
    assert adjusted.tolist() == pytest.approx([0.9, 0.27, 0.5])  # NaN: no setting read
    assert rank_tasks(dict(enumerate(adjusted))) == [1, 2, 0]
