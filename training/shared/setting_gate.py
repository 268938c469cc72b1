"""Which valve models' settings a version may propose: those it has shown it can read.

A pre-selected setting anchors the annotator. A reader that is right on one X-ray in ten
would pre-select a wrong setting nine times in ten, and its (low) probability would reorder
the review queue by noise. So a version proposes a model's setting only when its
out-of-fold reading of that model (``metrics.json["settings"]``, read under the true model,
:func:`training.fitting.evaluation.setting_metrics`) was exactly right on at least
:data:`MIN_EXACT` of at least :data:`MIN_SCORED` X-rays. The others are left for the
annotator to set; the report says which models passed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["MIN_EXACT", "MIN_SCORED", "proposed_settings"]

MIN_EXACT = 0.5
"""Least out-of-fold exact-setting accuracy for a model's setting to be proposed."""
MIN_SCORED = 10
"""Least out-of-fold X-rays with a labelled setting behind that accuracy."""


def proposed_settings(metrics: Mapping[str, Any] | None) -> frozenset[str]:
    """The valve models whose settings a version with these ``metrics`` proposes."""
    found = (metrics or {}).get("settings") or {}
    return frozenset(
        valve
        for valve, entry in found.items()
        if isinstance(entry, Mapping)
        and int(entry.get("n", 0)) >= MIN_SCORED
        and float(entry.get("exact", 0.0)) >= MIN_EXACT
    )
