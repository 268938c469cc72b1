"""Which unlabelled X-rays to reveal next: the active-learning strategies, by name.

Every strategy has one signature, ``(probs, member_probs, features, k, rng, *,
labelled_features=None) -> indices``: ``probs`` ``(n, K)`` is the model's (ensemble-mean)
softmax on the unlabelled pool, ``member_probs`` ``(m, n, K)`` the members' (ensemble models
or MC-dropout passes), ``features`` ``(n, d)`` penultimate-layer activations of the pool,
``labelled_features`` ``(l, d)`` those of the labelled set, ``k`` the batch size and ``rng`` a
seeded :class:`numpy.random.Generator`. The result is ``k`` distinct pool positions, in the
order they were chosen.

The uncertainty strategies are **the acquisitions the backend serves**: one per name in
:data:`training.shared.uncertainty.ACQUISITIONS` (``entropy``, ``margin``, ``least_confidence``,
``bald``), each taking the ``k`` lowest :func:`training.shared.uncertainty.ranking_score` values,
which is the order Label Studio's review queue shows (ascending score, ties by position like
the backend's ties by task id). So ``VALVE_ID_ACQUISITION=<name>`` and ``--strategies <name>``
mean the same thing. Added here: ``random`` (the baseline) and two batch-aware strategies that
avoid spending a batch on ``k`` near-duplicates:

* ``coreset``: k-center greedy on penultimate features (Sener & Savarese, ICLR 2018): each
  pick is the pool image farthest from everything labelled or already picked;
* ``entropy_coreset``: k-center greedy restricted to the ``UNCERTAIN_CANDIDATES_PER_PICK * k``
  most uncertain images by entropy (uncertainty first, then diversity among them).

And two for the cold start, where uncertainty sampling is known to lose to random because a
model trained on a handful of labels is confidently wrong about whole regions of the data:

* ``typiclust``: TypiClust (Hacohen, Dekel & Weinshall, ICML 2022): cluster labelled + pool
  features into ``labelled + k`` clusters, then repeatedly take the most *typical* pool image
  (highest inverse mean distance to its nearest neighbours) of the largest cluster that holds
  the fewest labels: typical, diverse examples first;
* ``tcm``: TypiClust while fewer than ``COLD_START_LABELS_PER_CLASS`` labels per class exist,
  margin afterwards (Doucet et al., "Bridging diversity and uncertainty in active learning
  with self-supervised pre-training", 2023).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Protocol

import numpy as np

from training.shared.uncertainty import ACQUISITIONS, ranking_score

__all__ = [
    "COLD_START_LABELS_PER_CLASS",
    "STRATEGIES",
    "UNCERTAIN_CANDIDATES_PER_PICK",
    "Strategy",
    "get_strategy",
    "k_center_greedy",
    "select_coreset",
    "select_entropy_coreset",
    "select_random",
    "select_tcm",
    "select_typiclust",
    "typicality",
]

UNCERTAIN_CANDIDATES_PER_PICK = 3
"""``entropy_coreset`` draws its ``k`` picks from the ``3 k`` most uncertain pool images."""
TYPICALITY_NEIGHBOURS = 20
"""Neighbours whose mean distance defines an image's typicality (TypiClust's value)."""
MAX_CLUSTERS = 500
"""TypiClust's cap on the number of clusters."""
COLD_START_LABELS_PER_CLASS = 10
"""``tcm`` picks by TypiClust until the labelled set holds this many labels per class."""


class Strategy(Protocol):
    """Picks ``k`` pool positions to label next (see the module docstring)."""

    def __call__(
        self,
        probs: np.ndarray,
        member_probs: np.ndarray | None,
        features: np.ndarray | None,
        k: int,
        rng: np.random.Generator,
        *,
        labelled_features: np.ndarray | None = None,
    ) -> np.ndarray: ...


def _check_k(n: int, k: int) -> int:
    if k < 0:
        raise ValueError(f"cannot pick {k} items")
    return min(k, n)


def select_random(
    probs: np.ndarray,
    member_probs: np.ndarray | None,
    features: np.ndarray | None,
    k: int,
    rng: np.random.Generator,
    *,
    labelled_features: np.ndarray | None = None,
) -> np.ndarray:
    """``k`` pool positions uniformly at random: the baseline every strategy must beat."""
    n = len(probs)
    return rng.choice(n, size=_check_k(n, k), replace=False).astype(np.int64)


def _by_acquisition(name: str) -> Strategy:
    """The ``k`` most uncertain pool items by the backend's acquisition ``name``."""

    def select(
        probs: np.ndarray,
        member_probs: np.ndarray | None,
        features: np.ndarray | None,
        k: int,
        rng: np.random.Generator,
        *,
        labelled_features: np.ndarray | None = None,
    ) -> np.ndarray:
        k = _check_k(len(probs), k)
        # Exactly what the review queue shows first: ascending score, ties by position.
        score = ranking_score(name, probs, member_probs)
        return np.argsort(score, kind="stable")[:k].astype(np.int64)

    select.__name__ = f"select_{name}"
    select.__doc__ = f"The ``k`` pool items the backend's ``{name}`` acquisition ranks first."
    return select


def k_center_greedy(
    features: np.ndarray,
    k: int,
    centres: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Greedy k-center: repeatedly take the point farthest from all centres chosen so far.

    ``centres`` (``(l, d)``, e.g. the labelled set) start the cover; without any, the first
    pick is drawn with ``rng`` (position 0 without one). The greedy choice is a
    2-approximation of the minimax cover radius (Gonzalez 1985). Euclidean distances.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (n, d), got shape {x.shape}")
    k = _check_k(len(x), k)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    picks: list[int] = []
    if centres is not None and len(centres):
        c = np.asarray(centres, dtype=np.float64)
        if c.ndim != 2 or c.shape[1] != x.shape[1]:
            raise ValueError(f"centres {c.shape} do not match features {x.shape}")
        nearest = _min_sq_distance(x, c)
    else:
        first = int(rng.integers(len(x))) if rng is not None else 0
        picks.append(first)
        nearest = _min_sq_distance(x, x[first : first + 1])
    while len(picks) < k:
        nearest[picks] = -np.inf  # never pick a point twice (duplicates have distance 0)
        pick = int(np.argmax(nearest))
        picks.append(pick)
        nearest = np.minimum(nearest, _min_sq_distance(x, x[pick : pick + 1]))
    return np.asarray(picks, dtype=np.int64)


def _min_sq_distance(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of each row of ``x`` to its nearest row of ``c``."""
    d = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0).min(axis=1)


def _need_features(features: np.ndarray | None, n: int, name: str) -> np.ndarray:
    if features is None or len(features) != n:
        raise ValueError(f"the {name!r} strategy needs one feature vector per pool item")
    return features


def select_coreset(
    probs: np.ndarray,
    member_probs: np.ndarray | None,
    features: np.ndarray | None,
    k: int,
    rng: np.random.Generator,
    *,
    labelled_features: np.ndarray | None = None,
) -> np.ndarray:
    """k-center greedy on penultimate features, the labelled set as the first centres."""
    x = _need_features(features, len(probs), "coreset")
    return k_center_greedy(x, k, labelled_features, rng)


def select_entropy_coreset(
    probs: np.ndarray,
    member_probs: np.ndarray | None,
    features: np.ndarray | None,
    k: int,
    rng: np.random.Generator,
    *,
    labelled_features: np.ndarray | None = None,
) -> np.ndarray:
    """Uncertainty, then diversity: k-center greedy among the most uncertain (entropy)."""
    x = _need_features(features, len(probs), "entropy_coreset")
    k = _check_k(len(probs), k)
    n_candidates = min(len(probs), UNCERTAIN_CANDIDATES_PER_PICK * k)
    candidates = np.argsort(ranking_score("entropy", probs), kind="stable")[:n_candidates]
    return candidates[k_center_greedy(x[candidates], k, labelled_features, rng)]


def typicality(features: np.ndarray, neighbours: int = TYPICALITY_NEIGHBOURS) -> np.ndarray:
    """Inverse mean Euclidean distance of each row to its ``neighbours`` nearest other rows
    (a density estimate: high = typical). A lone row gets 0."""
    x = np.asarray(features, dtype=np.float64)
    n = len(x)
    if n < 2:
        return np.zeros(n)
    d = np.sqrt(np.maximum((x * x).sum(1)[:, None] - 2.0 * x @ x.T + (x * x).sum(1)[None], 0.0))
    np.fill_diagonal(d, np.inf)
    m = min(neighbours, n - 1)
    nearest = np.sort(d, axis=1)[:, :m]
    return 1.0 / (nearest.mean(axis=1) + 1e-12)


def select_typiclust(
    probs: np.ndarray,
    member_probs: np.ndarray | None,
    features: np.ndarray | None,
    k: int,
    rng: np.random.Generator,
    *,
    labelled_features: np.ndarray | None = None,
) -> np.ndarray:
    """TypiClust: the most typical pool image of each large, uncovered cluster."""
    from sklearn.cluster import KMeans

    x = _need_features(features, len(probs), "typiclust")
    k = _check_k(len(x), k)
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    labelled = np.zeros((0, x.shape[1])) if labelled_features is None else labelled_features
    everything = np.concatenate([np.asarray(labelled, dtype=np.float64), x]).astype(np.float64)
    n_clusters = min(len(labelled) + k, MAX_CLUSTERS, len(everything))
    seed = int(rng.integers(2**31 - 1))
    assign = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed).fit_predict(everything)
    labelled_in = np.bincount(assign[: len(labelled)], minlength=n_clusters)
    pool_of = assign[len(labelled) :]
    size = np.bincount(assign, minlength=n_clusters)
    taken = np.zeros(len(x), dtype=bool)
    picks: list[int] = []
    while len(picks) < k:
        free = np.array([np.any((pool_of == c) & ~taken) for c in range(n_clusters)])
        # Fewest labels first, then the largest cluster (TypiClust's order).
        order = np.lexsort((-size, labelled_in))
        cluster = next(int(c) for c in order if free[c])
        members = np.flatnonzero((pool_of == cluster) & ~taken)
        everyone = np.flatnonzero(assign == cluster)  # typicality within the whole cluster
        density = typicality(everything[everyone])
        pool_density = density[np.searchsorted(everyone, members + len(labelled))]
        pick = int(members[int(np.argmax(pool_density))])
        picks.append(pick)
        taken[pick] = True
        labelled_in[cluster] += 1
    return np.asarray(picks, dtype=np.int64)


def select_tcm(
    probs: np.ndarray,
    member_probs: np.ndarray | None,
    features: np.ndarray | None,
    k: int,
    rng: np.random.Generator,
    *,
    labelled_features: np.ndarray | None = None,
) -> np.ndarray:
    """TypiClust at the cold start, margin once there are enough labels per class."""
    n_labelled = 0 if labelled_features is None else len(labelled_features)
    if n_labelled < COLD_START_LABELS_PER_CLASS * probs.shape[1]:
        return select_typiclust(
            probs, member_probs, features, k, rng, labelled_features=labelled_features
        )
    return _REGISTRY["margin"](probs, member_probs, features, k, rng)


_REGISTRY: dict[str, Strategy] = {
    "random": select_random,
    **{name: _by_acquisition(name) for name in ACQUISITIONS},
    "coreset": select_coreset,
    "entropy_coreset": select_entropy_coreset,
    "typiclust": select_typiclust,
    "tcm": select_tcm,
}

STRATEGIES: Mapping[str, Strategy] = MappingProxyType(_REGISTRY)
"""Strategy name → function. The uncertainty names are the backend's acquisition names."""


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name``; ``ValueError`` naming the known ones otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}"
        ) from None
