"""From per-round records to the numbers a team decides with: curves, AUC, labels saved.

Pure numpy on the ``runs`` of :func:`training.simulation.loop.run_simulation`:

* **Learning curves**: macro-F1, accuracy and per-class recall against labels spent, mean
  and sample SD (``ddof=1``; ``None`` with one seed) across replicates, at each round.
* **Area under the curve**: trapezoid area of each replicate's macro-F1 curve divided by the
  label range it spans, i.e. the mean macro-F1 over the budget (in [0, 1]); mean ± SD.
* **Labels saved** (the headline): random sampling's final mean macro-F1 is the target; a
  strategy *needs* the first label count at which its mean curve reaches it, and *saves*
  random's final label count minus that. ``None`` = not reached within the budget. Counts
  are those evaluated (multiples of the batch), never interpolated. The spread comes from the
  replicates, paired: in replicate *r* (same seed set, test split and training seeds for
  every strategy) a strategy saves random's labels minus the first count at which it reaches
  random's final macro-F1 *of that replicate*; the mean of those and a 95 % Student-t
  interval, defined when every replicate reached its target.
* **Error detection**: AUROC of each acquisition for flagging the final model's wrong test
  predictions, mean ± SD over replicates per strategy and over all final models.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["BASELINE", "CONFIDENCE", "NEAR_CHANCE_MARGIN", "STD_DDOF", "band", "summarize"]

BASELINE = "random"
"""The strategy whose final macro-F1 defines "labels saved"."""
STD_DDOF = 1
"""Sample standard deviation across replicates."""
NEAR_CHANCE_MARGIN = 0.10
"""A best final macro-F1 below ``1/K + 0.10`` is flagged: the models barely beat guessing."""
CONFIDENCE = 0.95
"""Level of the interval around the mean labels saved."""
_TOLERANCE = 1e-9


def band(values: np.ndarray) -> dict[str, list[float | None]]:
    """Mean and SD over axis 0 of a ``(replicates, points)`` array; NaN = undefined."""
    v = np.asarray(values, dtype=np.float64)
    defined = ~np.isnan(v)
    count = defined.sum(axis=0)
    mean = np.where(count > 0, np.nansum(v, axis=0) / np.maximum(count, 1), np.nan)
    sd = np.full(v.shape[1], np.nan)
    many = count > STD_DDOF
    if many.any():
        sd[many] = np.nanstd(v[:, many], axis=0, ddof=STD_DDOF)
    return {"mean": _clean(mean), "sd": _clean(sd)}


def _clean(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(x) else float(x) for x in values]


def _matrix(reps: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([[r[key] for r in rep["rounds"]] for rep in reps], dtype=np.float64)


def _x(reps: Sequence[Mapping[str, Any]]) -> list[int]:
    grids = {tuple(r["n_labels"] for r in rep["rounds"]) for rep in reps}
    if len(grids) != 1:
        raise ValueError(f"replicates were evaluated at different label counts: {sorted(grids)}")
    return list(grids.pop())


def _normalised_auc(x: Sequence[int], y: np.ndarray) -> float:
    xs = np.asarray(x, dtype=np.float64)
    if len(xs) < 2:
        return float(y[0])
    area = float(((y[1:] + y[:-1]) / 2.0 * np.diff(xs)).sum())
    return area / float(xs[-1] - xs[0])


def _mean_sd(values: Sequence[float | None]) -> dict[str, Any]:
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    b = band(v[:, None])
    return {"mean": b["mean"][0], "sd": b["sd"][0], "per_seed": list(values)}


def summarize(runs: Mapping[str, Sequence[Mapping[str, Any]]], classes: Sequence[str]) -> dict:
    """Curves, AUC, labels saved and error-detection AUROCs of a simulation's ``runs``."""
    curves: dict[str, Any] = {}
    auc: dict[str, Any] = {}
    for name, reps in runs.items():
        x = _x(reps)
        f1 = _matrix(reps, "macro_f1")
        recall = np.array(
            [
                [[np.nan if v is None else v for v in r["recall"]] for r in rep["rounds"]]
                for rep in reps
            ],
            dtype=np.float64,
        )
        counts = np.array([rep["rounds"][-1]["labelled_class_counts"] for rep in reps])
        curves[name] = {
            "n_labels": x,
            "macro_f1": band(f1),
            "accuracy": band(_matrix(reps, "accuracy")),
            "recall": {c: band(recall[:, :, i]) for i, c in enumerate(classes)},
            "final_labelled_class_counts": dict(
                zip(classes, counts.mean(axis=0).tolist(), strict=True)
            ),
        }
        auc[name] = _mean_sd([_normalised_auc(x, row) for row in f1])

    labels_saved = _labels_saved(curves)
    for name, row in labels_saved["by_strategy"].items():
        row["paired"] = _paired_labels_saved(runs[BASELINE], runs[name])
    auroc = _auroc(runs)
    finals = [c["macro_f1"]["mean"][-1] for c in curves.values()]
    best_final = max(finals) if finals else None
    chance = 1.0 / len(classes)
    return {
        "curves": curves,
        "auc": auc,
        "labels_saved": labels_saved,
        "error_detection_auroc": auroc,
        "chance_macro_f1": chance,
        "best_final_macro_f1": best_final,
        "near_chance": best_final is not None and best_final < chance + NEAR_CHANCE_MARGIN,
    }


def _labels_saved(curves: Mapping[str, Any]) -> dict[str, Any]:
    if BASELINE not in curves:
        return {"target": None, "note": f"no {BASELINE!r} baseline was run", "by_strategy": {}}
    base = curves[BASELINE]
    target = base["macro_f1"]["mean"][-1]
    base_labels = base["n_labels"][-1]
    by_strategy = {}
    for name, curve in curves.items():
        needed = next(
            (
                n
                for n, f in zip(curve["n_labels"], curve["macro_f1"]["mean"], strict=True)
                if f is not None and f >= target - _TOLERANCE
            ),
            None,
        )
        by_strategy[name] = {
            "labels_needed": needed,
            "labels_saved": None if needed is None else base_labels - needed,
        }
    return {
        "target": target,
        "target_sd": base["macro_f1"]["sd"][-1],
        "baseline_labels": base_labels,
        "by_strategy": by_strategy,
    }


def _first_reaching(rounds: Sequence[Mapping[str, Any]], target: float) -> int | None:
    return next((r["n_labels"] for r in rounds if r["macro_f1"] >= target - _TOLERANCE), None)


def _paired_labels_saved(
    baseline: Sequence[Mapping[str, Any]], reps: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Labels saved per replicate against random's own final macro-F1 in that replicate,
    their mean and a :data:`CONFIDENCE` Student-t interval (``None`` unless every replicate
    reached its target and there are at least two)."""
    from scipy import stats

    per_seed: list[int | None] = []
    for base, rep in zip(baseline, reps, strict=True):
        final = base["rounds"][-1]
        needed = _first_reaching(rep["rounds"], final["macro_f1"])
        per_seed.append(None if needed is None else final["n_labels"] - needed)
    reached = [s for s in per_seed if s is not None]
    mean = float(np.mean(reached)) if reached else None
    interval = None
    if len(reached) == len(per_seed) >= 2:
        values = np.asarray(reached, dtype=np.float64)
        half = float(
            stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1)
            * values.std(ddof=STD_DDOF)
            / np.sqrt(len(values))
        )
        interval = [float(values.mean()) - half, float(values.mean()) + half]
    return {"per_seed": per_seed, "reached": len(reached), "mean": mean, "ci95": interval}


def _auroc(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    per_strategy: dict[str, Any] = {}
    pooled: dict[str, list[float | None]] = {}
    for name, reps in runs.items():
        measures = list(reps[0]["final_auroc"])
        per_strategy[name] = {
            m: _mean_sd([rep["final_auroc"][m] for rep in reps]) for m in measures
        }
        for m in measures:
            pooled.setdefault(m, []).extend(rep["final_auroc"][m] for rep in reps)
    overall = {m: _mean_sd(v) for m, v in pooled.items()}
    ranked = [(v["mean"], m) for m, v in overall.items() if v["mean"] is not None]
    # max() keeps the first of equal means, i.e. ACQUISITIONS order breaks ties.
    best = max(ranked, key=lambda item: item[0])[1] if ranked else None
    return {"by_strategy": per_strategy, "overall": overall, "best": best}
