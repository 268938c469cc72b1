"""Uncertainty of a classifier's softmax output, and acquisition functions built on it.

Pure numpy (no torch): the backend imports this module to rank Label Studio tasks, the
evaluation (:mod:`training.fitting.evaluation`) uses it for the paper's Table 3, and the
active-learning simulation reuses the same acquisition functions.

Shapes: ``probs`` is ``(n, K)`` (rows sum to 1), ``member_probs`` is ``(m, n, K)`` for an
ensemble of ``m`` members (folds, MC-dropout passes, test-time augmentations). ``K >= 2``.
Logarithms are natural, so entropies are in nats and bounded by ``log K``.

Two orientations are used, and named so:

* an **uncertainty** (``ACQUISITIONS``): higher = more uncertain, normalised to [0, 1];
* a **ranking score** (:func:`ranking_score`): ``1 - uncertainty``, in [0, 1], so that
  sorting *ascending* puts the most uncertain item first (Label Studio sorts tasks by
  prediction score).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = [
    "ACQUISITIONS",
    "CONFIDENCE_SCORED",
    "Acquisition",
    "bald",
    "entropy",
    "least_confidence",
    "margin",
    "max_softmax",
    "normalized_entropy",
    "ranking_score",
    "score_from_uncertainty",
    "softmax",
]

_TINY = np.finfo(np.float64).tiny
"""Smallest positive float64; ``p * log(max(p, tiny))`` is exactly 0 for ``p == 0``."""


def _as_probs(probs: np.ndarray) -> np.ndarray:
    """Validate a ``(..., K)`` probability array and return it as float64."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim < 1 or p.shape[-1] < 2:
        raise ValueError(f"probabilities need a class axis with K >= 2, got shape {p.shape}")
    return p


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``softmax(z / T)`` along the last axis, computed stably (max subtracted first).

    ``T > 1`` softens (less confident), ``T < 1`` sharpens; ``T = 1`` is the plain softmax.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy ``H(p) = -sum_k p_k log p_k`` in nats, with ``0 log 0 = 0``.

    0 for a one-hot distribution, ``log K`` for the uniform one. Shape ``(..., K) -> (...)``.
    """
    p = _as_probs(probs)
    h = -(p * np.log(np.maximum(p, _TINY))).sum(axis=-1)
    return np.maximum(h, 0.0)


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """``H(p) / log K`` in [0, 1], so that values are comparable across class counts."""
    p = _as_probs(probs)
    return np.clip(entropy(p) / np.log(p.shape[-1]), 0.0, 1.0)


def max_softmax(probs: np.ndarray) -> np.ndarray:
    """Maximum softmax probability ``max_k p_k`` (the paper's "max softmax score")."""
    return _as_probs(probs).max(axis=-1)


def margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability, ``p_(1) - p_(2)`` in [0, 1] (the paper's "softmax gap").

    Small margin = the model hesitates between two classes.
    """
    p = _as_probs(probs)
    top2 = np.partition(p, -2, axis=-1)[..., -2:]
    return np.clip(top2[..., 1] - top2[..., 0], 0.0, 1.0)


def least_confidence(probs: np.ndarray) -> np.ndarray:
    """``1 - max_k p_k`` rescaled by ``K / (K - 1)`` to [0, 1] (1 for the uniform distribution).

    The rescaling is monotone, so rankings equal those of ``1 - max softmax``.
    """
    p = _as_probs(probs)
    k = p.shape[-1]
    return np.clip((1.0 - p.max(axis=-1)) * k / (k - 1), 0.0, 1.0)


def bald(member_probs: np.ndarray) -> np.ndarray:
    """BALD / mutual information between prediction and model (Houlsby et al. 2011).

    ``I = H(mean_m p_m) - mean_m H(p_m)`` over ensemble members ``m``, in nats.
    0 when all members agree (whatever their entropy), large when members are each
    confident but disagree. Bounded by ``log K``. Shape ``(m, n, K) -> (n,)``.
    """
    mp = _as_probs(member_probs)
    if mp.ndim != 3:
        raise ValueError(f"member probabilities must be (m, n, K), got shape {mp.shape}")
    mi = entropy(mp.mean(axis=0)) - entropy(mp).mean(axis=0)
    return np.clip(mi, 0.0, np.log(mp.shape[-1]))


Acquisition = Callable[[np.ndarray, np.ndarray | None], np.ndarray]
"""``(probs (n, K), member_probs (m, n, K) | None) -> uncertainty (n,)`` in [0, 1]."""


def _acq_entropy(probs: np.ndarray, member_probs: np.ndarray | None = None) -> np.ndarray:
    return normalized_entropy(probs)


def _acq_margin(probs: np.ndarray, member_probs: np.ndarray | None = None) -> np.ndarray:
    return 1.0 - margin(probs)


def _acq_least_confidence(probs: np.ndarray, member_probs: np.ndarray | None = None) -> np.ndarray:
    return least_confidence(probs)


def _acq_bald(probs: np.ndarray, member_probs: np.ndarray | None = None) -> np.ndarray:
    if member_probs is None:
        raise ValueError("the 'bald' acquisition needs ensemble member probabilities")
    mp = _as_probs(member_probs)
    p = _as_probs(probs)
    if mp.ndim != 3 or mp.shape[1:] != p.shape:
        raise ValueError(f"member probabilities {mp.shape} do not match probabilities {p.shape}")
    return np.clip(bald(mp) / np.log(mp.shape[-1]), 0.0, 1.0)


ACQUISITIONS: dict[str, Acquisition] = {
    "entropy": _acq_entropy,
    "margin": _acq_margin,
    "least_confidence": _acq_least_confidence,
    "bald": _acq_bald,
}
"""Acquisition functions by name; each returns an uncertainty in [0, 1], higher = more uncertain.

* ``entropy``: ``H(p) / log K``;
* ``margin``: ``1 - (p_(1) - p_(2))``;
* ``least_confidence``: ``(1 - p_(1)) * K / (K - 1)``;
* ``bald``: ``I / log K`` (needs ``member_probs``; ``log K`` bounds the mutual information).
"""


CONFIDENCE_SCORED = "least_confidence"
"""The acquisition whose ranking score is the proposed class's (calibrated) probability."""


def score_from_uncertainty(uncertainty: np.ndarray) -> np.ndarray:
    """Ranking score ``1 - u`` from a [0, 1] uncertainty: ascending = most uncertain first."""
    return np.clip(1.0 - np.asarray(uncertainty, dtype=np.float64), 0.0, 1.0)


def ranking_score(
    name: str, probs: np.ndarray, member_probs: np.ndarray | None = None
) -> np.ndarray:
    """Score in [0, 1] per item for acquisition ``name``; sort ascending to label first.

    E.g. ``entropy`` gives ``1 - H(p)/log K``, ``margin`` gives the margin itself. For
    ``least_confidence`` the score is the proposed class's probability ``p_(1)`` itself: the
    same order as ``1 - least_confidence`` (a monotone rescaling), and the number a reader
    takes Label Studio's displayed prediction score for — the model's confidence in its answer.
    """
    try:
        acquisition = ACQUISITIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown acquisition {name!r}; choose one of {sorted(ACQUISITIONS)}"
        ) from None
    if name == CONFIDENCE_SCORED:
        return np.clip(_as_probs(probs).max(axis=-1).astype(np.float64), 0.0, 1.0)
    return score_from_uncertainty(acquisition(probs, member_probs))
