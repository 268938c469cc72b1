"""Uncertainty measures and acquisition functions on hand-computable distributions."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from training.shared.uncertainty import (
    ACQUISITIONS,
    bald,
    entropy,
    least_confidence,
    margin,
    max_softmax,
    normalized_entropy,
    ranking_score,
    score_from_uncertainty,
    softmax,
)


@pytest.mark.parametrize("k", [2, 3, 4, 10])
def test_uniform_distribution_has_entropy_log_k(k: int) -> None:
    p = np.full((1, k), 1.0 / k)
    assert entropy(p)[0] == pytest.approx(math.log(k))
    assert normalized_entropy(p)[0] == pytest.approx(1.0)
    assert least_confidence(p)[0] == pytest.approx(1.0)
    assert margin(p)[0] == pytest.approx(0.0)


@pytest.mark.parametrize("k", [2, 4, 10])
def test_one_hot_has_zero_entropy_and_full_margin(k: int) -> None:
    p = np.eye(k)
    np.testing.assert_array_equal(entropy(p), np.zeros(k))
    np.testing.assert_array_equal(normalized_entropy(p), np.zeros(k))
    np.testing.assert_array_equal(margin(p), np.ones(k))
    np.testing.assert_array_equal(max_softmax(p), np.ones(k))
    np.testing.assert_array_equal(least_confidence(p), np.zeros(k))


def test_hand_computed_values() -> None:
    p = np.array([[0.5, 0.3, 0.2], [0.0, 0.25, 0.75]])
    expected_h0 = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    expected_h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(entropy(p), [expected_h0, expected_h1])
    np.testing.assert_allclose(
        normalized_entropy(p), np.array([expected_h0, expected_h1]) / math.log(3)
    )
    np.testing.assert_allclose(margin(p), [0.2, 0.5])
    np.testing.assert_allclose(max_softmax(p), [0.5, 0.75])
    np.testing.assert_allclose(least_confidence(p), [0.5 * 1.5, 0.25 * 1.5])


def test_softmax_is_stable_and_tempered() -> None:
    z = np.array([[1000.0, 0.0], [0.0, math.log(3.0)]])
    p = softmax(z)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[1], [0.25, 0.75])
    # Temperature 2 on logits [0, 2 log 3] gives the same as T=1 on [0, log 3].
    np.testing.assert_allclose(
        softmax([[0.0, 2 * math.log(3.0)]], temperature=2.0)[0], [0.25, 0.75]
    )
    with pytest.raises(ValueError):
        softmax(z, temperature=0.0)


def test_bald_is_zero_when_members_agree() -> None:
    member = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    stacked = np.stack([member, member, member])
    np.testing.assert_allclose(bald(stacked), [0.0, 0.0], atol=1e-12)


def test_bald_is_log2_when_two_members_confidently_disagree() -> None:
    stacked = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    # H(mean) = H(0.5, 0.5) = log 2, each member has entropy 0.
    assert bald(stacked)[0] == pytest.approx(math.log(2))
    assert ACQUISITIONS["bald"](stacked.mean(axis=0), stacked)[0] == pytest.approx(1.0)


def test_bald_needs_members() -> None:
    with pytest.raises(ValueError, match="member"):
        ACQUISITIONS["bald"](np.eye(3), None)


def test_ranking_score_ascending_puts_most_uncertain_first() -> None:
    p = np.array([[0.98, 0.01, 0.01], [0.34, 0.33, 0.33], [0.6, 0.3, 0.1], [0.5, 0.49, 0.01]])
    for name in ("entropy", "margin", "least_confidence"):
        scores = ranking_score(name, p)
        assert scores.min() >= 0.0 and scores.max() <= 1.0
        # The near-uniform row is the most uncertain for all three, the peaked row the least.
        order = np.argsort(scores)
        assert order[0] == 1, name
        assert order[-1] == 0, name
    np.testing.assert_allclose(ranking_score("margin", p), margin(p))
    np.testing.assert_allclose(ranking_score("entropy", p), 1.0 - normalized_entropy(p))
    # least confidence is scored by the proposed class's probability (what an annotator reads
    # as the model's confidence), in the same order as 1 - least_confidence.
    np.testing.assert_allclose(ranking_score("least_confidence", p), p.max(axis=1))
    np.testing.assert_array_equal(
        np.argsort(ranking_score("least_confidence", p), kind="stable"),
        np.argsort(1.0 - least_confidence(p), kind="stable"),
    )
    # margin ranks the two-way tie (row 3) before the wider spread (row 2).
    assert ranking_score("margin", p)[3] < ranking_score("margin", p)[2]


def test_ranking_score_bald_orders_disagreement_first() -> None:
    agree = np.array([[0.9, 0.1], [0.9, 0.1]])
    disagree = np.array([[0.95, 0.05], [0.05, 0.95]])
    members = np.stack([agree, disagree], axis=1)  # (m=2, n=2, K=2)
    scores = ranking_score("bald", members.mean(axis=0), members)
    assert scores[1] < scores[0]
    assert scores[0] == pytest.approx(1.0)


def test_unknown_acquisition_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown acquisition"):
        ranking_score("random-guess", np.eye(2))


def test_score_from_uncertainty_clips() -> None:
    np.testing.assert_allclose(score_from_uncertainty([0.0, 0.25, 1.0, 1.2]), [1.0, 0.75, 0.0, 0.0])


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float64,
        st.tuples(st.integers(1, 6), st.integers(2, 10)),
        elements=st.floats(0.0, 1.0),
    )
)
def test_measures_stay_in_bounds_with_zeros(raw: np.ndarray) -> None:
    raw = raw + (raw.sum(axis=1, keepdims=True) == 0)  # avoid all-zero rows
    p = raw / raw.sum(axis=1, keepdims=True)
    k = p.shape[1]
    h = entropy(p)
    assert np.isfinite(h).all()
    assert (h >= 0).all() and (h <= math.log(k) + 1e-12).all()
    for name in ("entropy", "margin", "least_confidence"):
        u = ACQUISITIONS[name](p, None)
        assert np.isfinite(u).all() and (u >= 0).all() and (u <= 1).all()
    members = np.stack([p, p[::-1]])
    mi = bald(members)
    assert np.isfinite(mi).all() and (mi >= 0).all() and (mi <= math.log(k) + 1e-12).all()


def test_module_does_not_import_torch() -> None:
    code = "import sys, training.shared.uncertainty; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
