"""Novelty: how unlike every learned valve model an X-ray looks.

A classifier answers one of the classes it knows, even for a valve it never saw ("Other
valve" has no examples until annotators label some). Each fold network gives every X-ray a
*distance* from what it learned (:data:`MEASURES`):

* ``energy`` (Liu et al., NeurIPS 2020): the free energy ``-logsumexp`` of the
  fold network's logits. Large where no class's logit stands out, so where the crop matches
  none of the learned valves; it needs nothing fitted but its scale. Standardised per fold by
  the median and interquartile range of the fold's own held-out X-rays' energies.
* ``mahalanobis`` (Lee et al., NeurIPS 2018): the distance of the network's penultimate
  features (the input of its last linear layer) to the nearest class mean under one shared
  covariance (Ledoit-Wolf shrinkage: a few hundred X-rays, 512 dimensions), fitted on the
  fold's training X-rays and divided by the median distance of its held-out X-rays.
* ``combined`` (the default): both of the above, each ranked against its own out-of-fold
  reference, and the mean of the two ranks ranked again against the same mean out of fold.
  The two see different things (a crop unlike the learned ones; no class standing out) and
  agree little (correlation 0.3 on held-out synthetic X-rays), so together they separate
  better than either.

Measured on held-out synthetic X-rays (docs/TRAINING.md, "Unfamiliar valves"), versions
trained in fp32 separated "Other valve" devices from the four models with an AUROC of
0.91-0.93 combined, 0.82-0.84 by the features' distance alone and 0.81-0.89 by energy alone
(two seeds, the same networks).

Fitted on out-of-fold predictions: the reference is every labelled X-ray's distance under the
fold that did not train on it, exactly how a new X-ray is seen. Its **novelty** is the
fraction of that reference it exceeds (0.97: more unusual than 97 % of the labelled X-rays);
from :data:`FLAG_QUANTILE` on it is flagged. About 10 % of the labelled X-rays lie there out of
fold; of new ordinary X-rays, served by all folds at once, 3-14 % did (measured, combined),
and 65-68 % of valves unlike all learned models.

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
    "COMBINED_PARTS",
    "DEFAULT_MEASURE",
    "LEGACY_MEASURE",
    "FLAG_QUANTILE",
    "MEASURES",
    "NOVELTY_FILE",
    "FoldNovelty",
    "Novelty",
    "features_and_logits",
    "free_energy",
    "parts_of",
]

NOVELTY_FILE = "novelty.npz"
"""A version's novelty model, beside ``config.json`` (absent in versions that predate it)."""
FLAG_QUANTILE = 0.90
"""Novelty at or above which an X-ray is flagged as unlike every learned valve model. Not
0.95: the reference's top few percent are labelled X-rays a fold got wrong, whose distances
few new X-rays reach: on held-out synthetic X-rays (combined, fp32, two seeds) 0.95 flagged
0-6 % of the ordinary X-rays and 23-47 % of other valves, 0.90 3-14 % and 65-68 %
(docs/TRAINING.md, "Unfamiliar valves")."""
MEASURES: dict[str, str] = {
    "energy": "free energy (-logsumexp) of the network's logits",
    "mahalanobis": "Mahalanobis distance of penultimate features to the nearest class mean",
    "combined": "mean of the Mahalanobis and energy novelties, ranked against its own "
    "out-of-fold values",
}
"""The distances a version's novelty can be measured by, and what each is (for reports)."""
DEFAULT_MEASURE = "combined"
"""Measured the best of the three on held-out synthetic X-rays (docs/TRAINING.md)."""
LEGACY_MEASURE = "mahalanobis"
"""What a ``novelty.npz`` written before the measure was recorded holds."""
COMBINED_PARTS = ("mahalanobis", "energy")
"""The measures a ``combined`` novelty is made of, in the order it stores them."""


def parts_of(measure: str) -> tuple[str, ...]:
    """The single measures each fold fits for a version whose novelty is ``measure``."""
    if measure not in MEASURES:
        raise ValueError(f"unknown novelty measure {measure!r}; choose from {sorted(MEASURES)}")
    return COMBINED_PARTS if measure == "combined" else (measure,)


def free_energy(logits: np.ndarray) -> np.ndarray:
    """``(n,)`` ``-logsumexp`` over each row of ``(n, K)`` logits (stable in float64). Written
    out rather than ``scipy.special.logsumexp``: serving imports no scipy (its memory)."""
    z = np.asarray(logits, dtype=np.float64)
    top = z.max(axis=1, keepdims=True)
    return -(top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))


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
    """One fold's distance: its measure, what was fitted for it, and its scale."""

    means: np.ndarray
    """``(K, D)``: one row per class the fold saw in training (NaN rows for absent ones);
    ``(0, 0)`` for the ``energy`` measure, which needs none."""
    precision: np.ndarray
    """``(D, D)``: inverse of the shared, shrunk within-class covariance (``(0, 0)``: energy)."""
    scale: float
    """Spread of the fold's held-out distances: distances are reported in its units."""
    measure: str = "mahalanobis"
    """One of :data:`MEASURES` (files from before energy existed hold Mahalanobis ones)."""
    centre: float = 0.0
    """Subtracted before scaling: the median held-out energy (0 for Mahalanobis, whose
    distances are ratios to their median)."""

    def distances(self, features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        """``(n,)`` distances of X-rays with these ``features`` ``(n, D)`` and ``logits``
        ``(n, K)`` from what the fold learned, in units of :attr:`scale`."""
        if self.measure == "energy":
            if logits is None:
                raise ValueError("the energy measure needs the fold network's logits")
            return (free_energy(logits) - self.centre) / self.scale
        f = np.asarray(features, dtype=np.float64)
        best = np.full(len(f), np.inf)
        for mean in self.means:
            if not np.isfinite(mean).all():
                continue
            d = f - mean
            best = np.minimum(best, np.einsum("nd,de,ne->n", d, self.precision, d))
        return (np.sqrt(np.maximum(best, 0.0)) - self.centre) / self.scale

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        held_out: np.ndarray,
        held_out_logits: np.ndarray | None = None,
        *,
        measure: str,
    ) -> FoldNovelty:
        """From a fold's training ``features``/``labels`` (Mahalanobis) or nothing (energy);
        its validation X-rays (``held_out`` features and logits) fix the scale."""
        if parts_of(measure) != (measure,):
            raise ValueError(f"a fold fits one measure at a time, not {measure!r}")
        if measure == "energy":
            if held_out_logits is None:
                raise ValueError("the energy measure needs the held-out X-rays' logits")
            energy = free_energy(held_out_logits)
            if not len(energy):
                return cls(np.zeros((0, 0)), np.zeros((0, 0)), 1.0, measure)
            low, centre, high = np.quantile(energy, [0.25, 0.5, 0.75])
            spread = float(high - low)
            return cls(
                np.zeros((0, 0)),
                np.zeros((0, 0)),
                spread if spread > 0 else 1.0,
                measure,
                float(centre),
            )
        from sklearn.covariance import LedoitWolf

        f = np.asarray(features, dtype=np.float64)
        y = np.asarray(labels)
        means = np.full((num_classes, f.shape[1]), np.nan)
        for c in np.unique(y):
            means[int(c)] = f[y == c].mean(axis=0)
        centred = f - means[y]
        precision = LedoitWolf(assume_centered=True).fit(centred).get_precision()
        unscaled = cls(means, precision, 1.0, measure).distances(held_out)
        scale = float(np.median(unscaled)) if len(unscaled) else 1.0
        return cls(means, precision, scale if scale > 0 else 1.0, measure)


@dataclass(frozen=True)
class Novelty:
    """A version's novelty model: one :class:`FoldNovelty` per fold and the out-of-fold
    reference distances; or, for the ``combined`` measure, its :attr:`parts` (one such
    model per measure) and the reference of their mean novelty."""

    folds: tuple[FoldNovelty, ...]
    reference: np.ndarray
    """Sorted out-of-fold distances of the labelled X-rays (``combined``: their mean
    novelty over the parts)."""
    flag_quantile: float = FLAG_QUANTILE
    parts: tuple[Novelty, ...] = ()
    """``combined`` only: a single-measure model per :data:`COMBINED_PARTS` entry."""

    def __post_init__(self) -> None:
        if len({fold.measure for fold in self.folds}) > 1:
            raise ValueError("a version's folds must share one novelty measure")
        if self.parts and (
            self.folds or tuple(part.measure for part in self.parts) != COMBINED_PARTS
        ):
            raise ValueError(f"a combined novelty is made of {COMBINED_PARTS} models alone")
        if len({len(part.folds) for part in self.parts}) > 1:
            raise ValueError("a combined novelty's parts must score the same folds")

    @classmethod
    def combine(cls, parts: Sequence[Novelty], part_distances: Sequence[np.ndarray]) -> Novelty:
        """The ``combined`` model of single-measure ``parts`` (ordered as
        :data:`COMBINED_PARTS`), from each labelled X-ray's out-of-fold distance under each."""
        mean = np.mean(
            [part.rank(d) for part, d in zip(parts, part_distances, strict=True)], axis=0
        )
        return cls((), np.sort(mean), parts=tuple(parts))

    @property
    def n_folds(self) -> int:
        """How many fold networks the model scores (each part scores all of them)."""
        return len(self.parts[0].folds) if self.parts else len(self.folds)

    @property
    def measure(self) -> str:
        """The model's measure (:data:`MEASURES`)."""
        if self.parts:
            return "combined"
        return self.folds[0].measure if self.folds else LEGACY_MEASURE

    def score(
        self,
        member_features: Sequence[np.ndarray],
        member_logits: Sequence[np.ndarray] | np.ndarray | None = None,
    ) -> np.ndarray:
        """``(n,)`` novelty in [0, 1] from each fold network's features and logits of the
        same images."""
        if self.parts:
            return self.rank(
                np.mean([p.score(member_features, member_logits) for p in self.parts], axis=0)
            )
        if len(member_features) != len(self.folds):
            raise ValueError(f"{len(member_features)} feature sets for {len(self.folds)} folds")
        logits = [None] * len(self.folds) if member_logits is None else list(member_logits)
        if len(logits) != len(self.folds):
            raise ValueError(f"{len(logits)} logit sets for {len(self.folds)} folds")
        if self.measure == "energy":
            return self.rank(self._ensemble_energy(logits))
        distance = np.mean(
            [
                fold.distances(f, z)
                for fold, f, z in zip(self.folds, member_features, logits, strict=True)
            ],
            axis=0,
        )
        return self.rank(distance)

    def _ensemble_energy(self, member_logits: Sequence[np.ndarray | None]) -> np.ndarray:
        """The energy of the folds' *mean* logits, standardised by the folds' mean centre and
        scale. Where the folds agree (an X-ray like those they learned) it is about one
        fold's energy, so the one-fold out-of-fold reference fits it; where they disagree
        (as on a valve none of them learned) the mean names no class clearly and its energy
        rises. Averaging the folds' energies instead shrinks every X-ray's spread below the
        reference's, and nothing reached the flag (docs/TRAINING.md)."""
        if any(z is None for z in member_logits):
            raise ValueError("the energy measure needs the fold network's logits")
        mean = np.mean([np.asarray(z, dtype=np.float64) for z in member_logits], axis=0)
        centre = float(np.mean([fold.centre for fold in self.folds]))
        scale = float(np.mean([fold.scale for fold in self.folds]))
        return (free_energy(mean) - centre) / scale

    def rank(self, distance: np.ndarray) -> np.ndarray:
        """The fraction of the reference each distance exceeds."""
        below = np.searchsorted(self.reference, np.asarray(distance), side="right")
        return below / max(len(self.reference), 1)

    def save(self, path: str | os.PathLike[str]) -> None:
        arrays: dict[str, Any] = {
            "measure": np.array(self.measure),
            "flag_quantile": np.array(self.flag_quantile),
        }
        if not self.parts:
            arrays.update(self._arrays())
        else:  # the mean's reference, then each part under its measure's prefix
            arrays["reference"] = np.sort(self.reference)
            for part in self.parts:
                arrays.update({f"{part.measure}_{k}": v for k, v in part._arrays().items()})
        np.savez(path, **arrays)

    def _arrays(self) -> dict[str, np.ndarray]:
        """A single-measure model's folds and reference, as stored."""
        return {
            "means": np.stack([f.means for f in self.folds]).astype(np.float32),
            "precisions": np.stack([f.precision for f in self.folds]).astype(np.float32),
            "scales": np.array([f.scale for f in self.folds]),
            "centres": np.array([f.centre for f in self.folds]),
            "reference": np.sort(self.reference),
        }

    @classmethod
    def _from_arrays(
        cls,
        arrays: dict[str, Any],
        measure: str,
        prefix: str = "",
        flag_quantile: float = FLAG_QUANTILE,
    ) -> Novelty:
        # Files written before the energy measure hold Mahalanobis folds, uncentred.
        scales = arrays[f"{prefix}scales"]
        centres = arrays.get(f"{prefix}centres", np.zeros(len(scales)))
        folds = tuple(
            FoldNovelty(m.astype(np.float64), p.astype(np.float64), float(s), measure, float(c))
            for m, p, s, c in zip(
                arrays[f"{prefix}means"],
                arrays[f"{prefix}precisions"],
                scales,
                centres,
                strict=True,
            )
        )
        return cls(folds, np.sort(arrays[f"{prefix}reference"]), flag_quantile)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Novelty:
        try:
            with np.load(Path(path)) as data:
                arrays: dict[str, Any] = {k: data[k] for k in data.files}
            measure = str(arrays.get("measure", LEGACY_MEASURE))
            flag_quantile = float(arrays["flag_quantile"])
            if measure not in MEASURES:
                raise ValueError(f"unknown measure {measure!r}")
            if measure != "combined":
                return cls._from_arrays(arrays, measure, flag_quantile=flag_quantile)
            parts = tuple(cls._from_arrays(arrays, m, f"{m}_") for m in COMBINED_PARTS)
            return cls((), np.sort(arrays["reference"]), flag_quantile, parts)
        except (OSError, KeyError, ValueError) as exc:
            raise ModelLoadError(
                f"{NOVELTY_FILE} is unreadable ({exc})", source=str(path)
            ) from None
