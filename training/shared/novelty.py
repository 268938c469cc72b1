"""Novelty: how unlike every learned valve model an X-ray looks.

A classifier answers one of the classes it knows, confidently, even for a valve it never saw
("Other valve" has no examples until annotators label some). Its softmax cannot say so; its
features can. Each fold network's penultimate features (the input of its last linear layer)
of the labelled X-rays it trained on give one mean per class and a shared covariance
(Ledoit-Wolf shrinkage: a few hundred X-rays, 512 dimensions). An X-ray's distance is the
Mahalanobis distance to the nearest class mean (Lee et al., NeurIPS 2018), divided by the
median distance of the fold's own held-out X-rays, so folds are comparable.

Fitted on out-of-fold predictions: the reference is every labelled X-ray's distance under the
fold that did not train on it, exactly how a new X-ray is seen. Its **novelty** is the
fraction of that reference it exceeds (0.97: more unusual than 97 % of the labelled X-rays),
averaged over the folds' distances; above :data:`FLAG_QUANTILE` it is flagged. So about 5 % of
ordinary X-rays are flagged by construction, and a valve unlike all learned models should be.

numpy at serving (torch only through the model it is given); scikit-learn only to fit.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.shared.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

__all__ = [
    "FLAG_QUANTILE",
    "NOVELTY_FILE",
    "FoldNovelty",
    "Novelty",
    "features_and_logits",
]

NOVELTY_FILE = "novelty.npz"
"""A version's novelty model, beside ``config.json`` (absent in versions that predate it)."""
FLAG_QUANTILE = 0.95
"""Novelty at or above which an X-ray is flagged as unlike every learned valve model."""


def features_and_logits(
    model: Any, x: torch.Tensor, centres: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's penultimate features ``(B, D)`` and its logits ``(B, K)``.

    Works for :class:`training.shared.model.ValveNet` and for
    :class:`training.shared.locate_classify.LocateClassifyNet` (its classifier, on the crop
    around ``centres``, or around where it locates the valve): the same answer as
    ``model(x)``, split before the last layer.
    """
    if hasattr(model, "classify"):  # locate, then classify the crop (in its test views)
        where = model.locate(x) if centres is None else centres
        return model.classify(model.crop(x, where))
    head = model.head
    features = head[:-1](model.body(x))
    return features, head[-1](features)


@dataclass(frozen=True)
class FoldNovelty:
    """One fold's class means, shared precision, and the scale of its held-out distances."""

    means: np.ndarray
    """``(K, D)``: one row per class the fold saw in training (NaN rows for absent ones)."""
    precision: np.ndarray
    """``(D, D)``: inverse of the shared, shrunk within-class covariance."""
    scale: float
    """Median distance of the fold's held-out X-rays: distances are reported in its units."""

    def distances(self, features: np.ndarray) -> np.ndarray:
        """``(n,)`` distance to the nearest class mean, in units of :attr:`scale`."""
        f = np.asarray(features, dtype=np.float64)
        best = np.full(len(f), np.inf)
        for mean in self.means:
            if not np.isfinite(mean).all():
                continue
            d = f - mean
            best = np.minimum(best, np.einsum("nd,de,ne->n", d, self.precision, d))
        return np.sqrt(np.maximum(best, 0.0)) / self.scale

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        held_out: np.ndarray,
    ) -> FoldNovelty:
        """From a fold's training ``features``/``labels``; ``held_out`` (its validation
        X-rays' features) fixes the scale."""
        from sklearn.covariance import LedoitWolf

        f = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        means = np.full((num_classes, f.shape[1]), np.nan)
        for c in np.unique(y):
            means[int(c)] = f[y == c].mean(axis=0)
        centred = f - means[y]
        precision = LedoitWolf(assume_centered=True).fit(centred).get_precision()
        unscaled = cls(means, precision, 1.0).distances(held_out)
        scale = float(np.median(unscaled)) if len(unscaled) else 1.0
        return cls(means, precision, scale if scale > 0 else 1.0)


@dataclass(frozen=True)
class Novelty:
    """A version's novelty model: one :class:`FoldNovelty` per fold and the out-of-fold
    reference distances."""

    folds: tuple[FoldNovelty, ...]
    reference: np.ndarray
    """Sorted out-of-fold distances of the labelled X-rays."""
    flag_quantile: float = FLAG_QUANTILE

    def score(self, member_features: Sequence[np.ndarray]) -> np.ndarray:
        """``(n,)`` novelty in [0, 1] from each fold network's features of the same images."""
        if len(member_features) != len(self.folds):
            raise ValueError(f"{len(member_features)} feature sets for {len(self.folds)} folds")
        distance = np.mean(
            [fold.distances(f) for fold, f in zip(self.folds, member_features, strict=True)],
            axis=0,
        )
        return self.rank(distance)

    def rank(self, distance: np.ndarray) -> np.ndarray:
        """The fraction of the reference each distance exceeds."""
        below = np.searchsorted(self.reference, np.asarray(distance), side="right")
        return below / max(len(self.reference), 1)

    def save(self, path: str | os.PathLike[str]) -> None:
        np.savez(
            path,
            means=np.stack([f.means for f in self.folds]).astype(np.float32),
            precisions=np.stack([f.precision for f in self.folds]).astype(np.float32),
            scales=np.array([f.scale for f in self.folds]),
            reference=np.sort(self.reference),
            flag_quantile=np.array(self.flag_quantile),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Novelty:
        try:
            with np.load(Path(path)) as data:
                arrays: dict[str, Any] = {k: data[k] for k in data.files}
            folds = tuple(
                FoldNovelty(m.astype(np.float64), p.astype(np.float64), float(s))
                for m, p, s in zip(
                    arrays["means"], arrays["precisions"], arrays["scales"], strict=True
                )
            )
            return cls(folds, np.sort(arrays["reference"]), float(arrays["flag_quantile"]))
        except (OSError, KeyError, ValueError) as exc:
            raise ModelLoadError(
                f"{NOVELTY_FILE} is unreadable ({exc})", source=str(path)
            ) from None
