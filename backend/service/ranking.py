"""The acquisition setting → a per-task score; ascending score = most uncertain first.

Label Studio sorts the review queue by ``predictions_score`` ascending, so the score is
``1 - uncertainty`` (:func:`training.shared.uncertainty.ranking_score`): the task the model knows
least about comes first. This module only adds what serving needs around that function:
resolving the ``auto`` setting from a version's training report, BALD's fallback when there
is no ensemble to disagree, the pressure setting's own uncertainty (:func:`with_setting`),
and a deterministic task order.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Hashable, Mapping
from typing import Any, TypeVar

import numpy as np

from backend.settings import SettingsError
from training.shared.uncertainty import ACQUISITIONS, ranking_score

__all__ = [
    "AUTO",
    "FALLBACK_ACQUISITION",
    "rank_tasks",
    "resolve_acquisition",
    "score",
    "validate_acquisition",
    "with_setting",
]

logger = logging.getLogger(__name__)

AUTO = "auto"
"""Setting value meaning: use the acquisition the served version's report found best."""
FALLBACK_ACQUISITION = "entropy"
"""Used when ``auto`` finds no usable recommendation, and for BALD without an ensemble: the
paper's own uncertainty measure (normalised softmax entropy)."""

_ENSEMBLE_ONLY = frozenset({"bald"})
"""Acquisitions that measure disagreement between members and are 0 for a single model."""
_warned_single_member = threading.Event()

TaskId = TypeVar("TaskId", bound=Hashable)


def validate_acquisition(setting: str) -> str:
    """``setting`` lower-cased if it is ``auto`` or a known acquisition, else a clear error."""
    name = setting.strip().lower()
    if name != AUTO and name not in ACQUISITIONS:
        valid = ", ".join([AUTO, *sorted(ACQUISITIONS)])
        raise SettingsError(
            f"VALVE_ID_ACQUISITION={setting!r} is not known; choose one of: {valid}"
        )
    return name


def resolve_acquisition(setting: str, metrics: Mapping[str, Any] | None) -> str:
    """The acquisition to score with: the setting itself, or for ``auto`` the version's
    ``metrics["uncertainty"]["best_acquisition"]`` (the measure that flagged wrong
    out-of-fold predictions best), falling back to entropy when the report names none."""
    name = validate_acquisition(setting)
    if name != AUTO:
        return name
    uncertainty = (metrics or {}).get("uncertainty")
    best = uncertainty.get("best_acquisition") if isinstance(uncertainty, Mapping) else None
    if isinstance(best, str) and best in ACQUISITIONS:
        return best
    logger.info(
        "the model version's report recommends no acquisition (%r); ranking by %s",
        best,
        FALLBACK_ACQUISITION,
    )
    return FALLBACK_ACQUISITION


def score(name: str, probs: np.ndarray, member_probs: np.ndarray | None = None) -> np.ndarray:
    """Ranking score ``(n,)`` in [0, 1] for acquisition ``name``; sort ascending to label first.

    ``probs`` is ``(n, K)``, ``member_probs`` ``(m, n, K)``. BALD with fewer than two members
    would score every task equally (no disagreement possible), so it falls back to entropy,
    logged once per process.
    """
    members = 0 if member_probs is None else np.asarray(member_probs).shape[0]
    if name in _ENSEMBLE_ONLY and members < 2:
        if not _warned_single_member.is_set():
            _warned_single_member.set()
            logger.warning(
                "acquisition %r needs an ensemble of at least 2 models, this version has %d; "
                "ranking by %s instead",
                name,
                members,
                FALLBACK_ACQUISITION,
            )
        name = FALLBACK_ACQUISITION
    return ranking_score(name, probs, member_probs)


def with_setting(scores: np.ndarray, setting_probability: np.ndarray) -> np.ndarray:
    """Scores that also count the pressure setting's uncertainty: each score times the
    probability of the setting read under the proposed valve model (1 where none is read).

    The reading the radiologist needs is model *and* setting; an X-ray whose model is clear
    but whose setting is a guess still has something to teach, so it moves up the queue.
    """
    sure = np.clip(np.nan_to_num(np.asarray(setting_probability, float), nan=1.0), 0.0, 1.0)
    return np.asarray(scores, float) * sure


def rank_tasks(scores: Mapping[TaskId, float]) -> list[TaskId]:
    """Task ids, most uncertain (lowest score) first; equal scores by task id, so the order is
    reproducible. A NaN score (no usable prediction) sorts last."""

    def key(task_id: TaskId) -> tuple[bool, float, Any]:
        value = float(scores[task_id])
        return (math.isnan(value), 0.0 if math.isnan(value) else value, task_id)

    return sorted(scores, key=key)
