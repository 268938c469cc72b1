"""Patient-grouped, stratified cross-validation folds (the paper's leakage guard)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from training.shared.errors import DatasetError

__all__ = ["make_splits"]


def make_splits(
    labels: Sequence[int] | np.ndarray, groups: Sequence[str], n_folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified, patient-grouped folds: ``[(train_idx, val_idx), ...]``.

    No patient appears in two folds' validation sets, so a patient's images are never in
    train and validation at once (the paper's leakage guard).
    """
    y = np.asarray(labels)
    g = np.asarray(groups)
    n_groups = len(set(g.tolist()))
    if n_groups < n_folds:
        raise DatasetError(
            f"{n_groups} patients cannot fill {n_folds} patient-grouped folds; "
            "label more patients or lower n_folds"
        )
    largest_class = int(np.bincount(np.unique(y, return_inverse=True)[1]).max())
    if largest_class < n_folds:
        raise DatasetError(
            f"every class has fewer than {n_folds} labelled images (the largest has "
            f"{largest_class}); label more images or lower n_folds"
        )
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(np.sort(tr), np.sort(va)) for tr, va in splitter.split(np.zeros(len(y)), y, g)]
