"""The paper's evaluation of out-of-fold (OOF) predictions, and a bit more: ``metrics.json``.

The recipe trains one model per patient-grouped fold and keeps, for every image, the logits
of the fold model that did *not* train on it. :func:`evaluate_oof` turns those into the
numbers of Vach et al. 2025 (Methods / Evaluation, Tables 2 and 3) and returns the
``metrics.json`` dict, a public contract read by the report, the backend and the CLI.

How each number is computed (where the paper is silent, the choice is stated here):

* **Per split** (Table 2): accuracy and *macro* precision / recall / F1 over the classes
  present in that split's ground truth (scikit-learn, ``zero_division=0``). A class absent
  from a split has no defined recall there, so it does not drag the macro mean down.
* **Mean ± SD** across splits: SD is the *sample* standard deviation (``ddof=1``,
  :data:`STD_DDOF`); ``null`` with a single split.
* **Per class** (Table 3): precision, recall, F1 and error rate (``1 - recall``: the share of
  that valve's X-rays given another label) computed per split, then mean ± SD over the
  splits *in which the class is present*. ``pooled`` holds the same values computed once on
  all OOF predictions together; ``support`` counts the class's images.
* **Uncertainty** (Table 3): entropy (nats), max softmax and margin (the paper's "softmax
  gap") of the uncalibrated softmax, averaged per *true* class within each split, then mean
  ± SD over splits. ``by_correctness`` pools all OOF predictions and splits them into
  correct and wrong. ``error_detection_auroc`` is the AUROC of each uncertainty (oriented
  higher = more uncertain, see :data:`training.shared.uncertainty.ACQUISITIONS`) for telling wrong
  predictions from correct ones, on the pooled OOF set; ``null`` when there are no errors or
  only errors. ``max_softmax`` is an alias of ``least_confidence`` (same ranking).
* **Confusion matrix**: pooled over all splits (the paper's Fig. 4), rows = true class,
  ``normalized`` divides each row by its count.
* **Calibration**: one temperature ``T`` fitted by minimising the NLL of ``softmax(z / T)``
  on all OOF logits. Measuring the ECE with that same ``T`` on the same data is optimistic,
  so ``ece_after`` is *cross-fitted*: each split is rescaled with a ``T`` fitted on the other
  splits' OOF logits (``null`` with one split); the in-sample value is kept as
  ``ece_after_in_sample``. ECE uses :data:`ECE_BINS` equal-width confidence bins.
  ``temperature_at_bound`` says whether ``T`` ended at an end of :data:`TEMPERATURE_BOUNDS`
  (``"lower"``, ``"upper"`` or ``null``; see :func:`temperature_bound`).
* **Degenerate measures**: an uncertainty whose OOF values (on the [0, 1] acquisition
  scale) span less than :data:`DEGENERATE_SPREAD` cannot rank predictions: it is constant,
  or all ~0 as for an overconfident model. ``uncertainty.measure_spread`` holds each
  measure's ``max - min``, ``uncertainty.degenerate_measures`` the degenerate ones.
* **Best acquisition** (``uncertainty.best_acquisition``): the measure with the highest
  error-detection AUROC among those whose AUROC is defined *and* that are not degenerate
  (ties broken by :data:`training.shared.uncertainty.ACQUISITIONS` order). There is no second-best
  fallback: when no measure qualifies (no errors, only errors, or every measure degenerate)
  it is ``null``, and a consumer uses its own default (the backend ranks by entropy).
* **Most often missed** (``most_missed``): the classes with the highest per-class mean error
  rate, *all* of them when several tie (:func:`most_missed`); ``null`` without errors.
* **Warnings** (``warnings``): a list of ``{"code", "message", ...details}`` dicts for
  numbers that must not be read at face value (:data:`WARNING_CODES`):
  ``below_chance`` (mean accuracy or macro-F1 at or below ``1/k`` for the ``k`` classes
  with images; one entry per metric), ``temperature_at_bound`` (calibration unreliable) and
  ``degenerate_uncertainty``. A healthy model has an empty list.
* **Pressure setting** (``settings``, only for versions that read settings): per valve
  model, how the setting read under the *true* model compares with the labelled one
  (:func:`setting_metrics`), so class errors (above) are not counted twice. Neighbouring
  values of a scale are one step apart, so ``within_one`` and ``mean_abs_steps`` measure
  how far off a wrong reading is.

All values are plain JSON: Python floats/ints/str, ``null`` instead of NaN.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from training.shared.labels import SettingScale
from training.shared.uncertainty import (
    ACQUISITIONS,
    bald,
    entropy,
    margin,
    max_softmax,
    softmax,
)

__all__ = [
    "DEGENERATE_SPREAD",
    "ECE_BINS",
    "METRICS_SCHEMA_VERSION",
    "STD_DDOF",
    "TEMPERATURE_BOUNDS",
    "TEMPERATURE_BOUND_TOL",
    "WARNING_CODES",
    "evaluate_oof",
    "expected_calibration_error",
    "fit_temperature",
    "most_missed",
    "reliability_bins",
    "setting_metrics",
    "temperature_bound",
    "write_metrics",
]

logger = logging.getLogger(__name__)

METRICS_SCHEMA_VERSION = 1
"""Version of the ``metrics.json`` layout; bump when a key changes meaning or moves."""
ECE_BINS = 15
"""Number of equal-width confidence bins on [0, 1] for ECE and the reliability diagram."""
STD_DDOF = 1
"""Delta degrees of freedom of the SD across splits (1 = sample SD; the paper does not say)."""
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)
"""Search interval for the temperature (dimensionless); the fit runs on ``log T``."""
TEMPERATURE_BOUND_TOL = 1e-3
"""A fitted ``T`` within this distance of a bound, in ``log T`` (≈ 0.1 %), sits at the bound."""
DEGENERATE_SPREAD = 1e-3
"""An uncertainty whose OOF values span (max - min) less than this, on its [0, 1] acquisition
scale, is degenerate: it cannot rank predictions (and is invisible at the report's precision)."""
WARNING_CODES: tuple[str, ...] = ("below_chance", "temperature_at_bound", "degenerate_uncertainty")
"""The ``code`` of each entry of ``metrics["warnings"]``."""
_TIE_TOL = 1e-9
"""Values closer than this count as equal: tied error rates, a metric "at" chance."""

_SPLIT_METRICS = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
_CLASS_METRICS = ("precision", "recall", "f1", "error_rate")


def evaluate_oof(
    y_true: np.ndarray,
    logits: np.ndarray,
    fold: np.ndarray,
    classes: Sequence[str],
    member_logits: np.ndarray | None = None,
    *,
    n_train_per_fold: Mapping[int, int] | Sequence[int] | None = None,
) -> dict[str, Any]:
    """Evaluate out-of-fold predictions; returns the ``metrics.json`` dict (module docstring).

    ``y_true`` ``(n,)`` class indices into ``classes``, ``logits`` ``(n, K)`` of the model that
    did not train on each image, ``fold`` ``(n,)`` its split id. ``member_logits``
    ``(m, n, K)`` (optional, e.g. several models or test-time augmentations per image) adds
    BALD. ``n_train_per_fold`` gives each split's training size, keyed by fold id or listed
    in ascending fold-id order; without it ``n_train = n - n_val``.
    """
    y, z, f = _validate(y_true, logits, fold, classes)
    k_classes = len(classes)
    probs = softmax(z)
    pred = probs.argmax(axis=1)
    folds = np.unique(f)
    member_probs = _member_probs(member_logits, z.shape)

    measures: dict[str, np.ndarray] = {
        "entropy": entropy(probs),
        "max_softmax": max_softmax(probs),
        "margin": margin(probs),
    }
    if member_probs is not None:
        measures["bald"] = bald(member_probs)

    splits: list[dict[str, Any]] = []
    class_rows: dict[int, list[dict[str, float]]] = {c: [] for c in range(k_classes)}
    unc_rows: dict[int, list[dict[str, float]]] = {c: [] for c in range(k_classes)}
    train_sizes = _train_sizes(n_train_per_fold, folds, f)
    for fold_id in folds:
        in_fold = f == fold_id
        yk, pk = y[in_fold], pred[in_fold]
        splits.append(
            {
                "fold": int(fold_id),
                **_split_metrics(yk, pk),
                "n_train": train_sizes[int(fold_id)],
                "n_val": int(in_fold.sum()),
            }
        )
        for c, row in _per_class(yk, pk, k_classes).items():
            class_rows[c].append(row)
            of_class = yk == c
            unc_rows[c].append(
                {name: float(v[in_fold][of_class].mean()) for name, v in measures.items()}
            )

    per_class: dict[str, Any] = {}
    pooled_rows = _per_class(y, pred, k_classes)
    for c, name in enumerate(classes):
        per_class[name] = {
            **_mean_std(class_rows[c], _CLASS_METRICS),
            "support": int((y == c).sum()),
            "n_splits": len(class_rows[c]),
            "pooled": pooled_rows.get(c, dict.fromkeys(_CLASS_METRICS)),
        }

    wrong = pred != y
    metrics: dict[str, Any] = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "classes": list(classes),
        "n_images": int(y.size),
        "n_folds": int(folds.size),
        "std_ddof": STD_DDOF,
        "splits": splits,
        **_across_splits(splits),
        "pooled": _split_metrics(y, pred),
        "per_class": per_class,
        "uncertainty": {
            "per_class": {
                name: _mean_std(unc_rows[c], tuple(measures)) for c, name in enumerate(classes)
            },
            "by_correctness": {
                "correct": _means(measures, ~wrong),
                "wrong": _means(measures, wrong),
            },
            **_error_detection(probs, member_probs, wrong),
        },
        "confusion_matrix": _confusion(y, pred, classes),
        "calibration": _calibration(z, y, f, folds),
    }
    metrics["most_missed"] = most_missed(per_class)
    metrics["warnings"] = _warnings(metrics, n_classes_learned=int(np.unique(y).size))
    logger.info(
        "evaluated %d OOF predictions over %d folds: mean accuracy %.3f",
        y.size,
        folds.size,
        metrics["mean"]["accuracy"],
    )
    return _json_clean(metrics)


def write_metrics(metrics: Mapping[str, Any], path: Path) -> Path:
    """Write ``metrics.json`` strictly (no NaN/Infinity, which browsers' JSON cannot read)."""
    path = Path(path)
    path.write_text(json.dumps(_json_clean(metrics), indent=2, allow_nan=False) + "\n")
    return path


def setting_metrics(
    scales: Sequence[SettingScale],
    valves: Sequence[str],
    true_settings: Sequence[str | None],
    predicted_settings: Sequence[str | None],
) -> dict[str, dict[str, Any]]:
    """Per valve model, the pressure setting read against the labelled one.

    ``valves`` is each item's *true* valve model, ``true_settings`` its labelled setting and
    ``predicted_settings`` the setting read under that true model (None: unknown / not
    read). Only items with both settings count. Returns, per model with at least one such
    item (in ``scales`` order; models without are absent): ``n``, ``exact`` (accuracy),
    ``within_one`` (share at most one scale step off), ``mean_abs_steps`` (mean
    ``|index difference|`` on the scale), ``values`` (the scale) and ``confusion``
    (``len(values)`` rows = true × columns = predicted, counts). A setting that is not a
    value of its model's scale is a :class:`ValueError` (the reader and the labels disagree).
    """
    n = len(valves)
    if len(true_settings) != n or len(predicted_settings) != n:
        raise ValueError(
            f"valves ({n}), true_settings ({len(true_settings)}) and predicted_settings "
            f"({len(predicted_settings)}) must have one entry per item"
        )
    out: dict[str, dict[str, Any]] = {}
    for scale in scales:
        index = {value: i for i, value in enumerate(scale.values)}
        pairs = [
            (t, p)
            for v, t, p in zip(valves, true_settings, predicted_settings, strict=True)
            if v == scale.valve and t is not None and p is not None
        ]
        if not pairs:
            continue
        off = sorted({s for pair in pairs for s in pair if s not in index})
        if off:
            raise ValueError(f"setting(s) {off} are not on the {scale.valve} scale")
        true_idx = np.array([index[t] for t, _ in pairs], dtype=np.int64)
        pred_idx = np.array([index[p] for _, p in pairs], dtype=np.int64)
        steps = np.abs(true_idx - pred_idx)
        k = len(scale.values)
        confusion = np.zeros((k, k), dtype=np.int64)
        np.add.at(confusion, (true_idx, pred_idx), 1)
        out[scale.valve] = {
            "n": len(pairs),
            "exact": float(np.mean(steps == 0)),
            "within_one": float(np.mean(steps <= 1)),
            "mean_abs_steps": float(steps.mean()),
            "values": list(scale.values),
            "confusion": confusion.tolist(),
        }
    return out


# --- calibration ------------------------------------------------------------------------


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature ``T`` minimising the mean NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    Bounded to :data:`TEMPERATURE_BOUNDS`; a perfectly separable set drives ``T`` towards the
    lower bound (sharper is always better there), outputs that carry no information about
    the answer drive it to the upper one. Either way the fit is not a calibration to trust:
    :func:`temperature_bound` detects it and :func:`evaluate_oof` warns.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if y.size == 0:
        return 1.0
    target = z[np.arange(y.size), y]

    def nll(log_t: float) -> float:
        t = np.exp(log_t)
        return float(np.mean(logsumexp(z / t, axis=1) - target / t))

    lo, hi = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    result = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(result.x))


def temperature_bound(temperature: float) -> str | None:
    """``"lower"`` or ``"upper"`` if ``temperature`` sits at that end of
    :data:`TEMPERATURE_BOUNDS` (within :data:`TEMPERATURE_BOUND_TOL` in ``log T``), else None.

    The bounded search never returns a bound exactly, only a value next to it.
    """
    log_t = np.log(float(temperature))
    lo, hi = TEMPERATURE_BOUNDS
    if log_t - np.log(lo) <= TEMPERATURE_BOUND_TOL:
        return "lower"
    if np.log(hi) - log_t <= TEMPERATURE_BOUND_TOL:
        return "upper"
    return None


def reliability_bins(
    probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS
) -> dict[str, list[Any]]:
    """Per confidence bin: mean confidence, accuracy and count (``null`` for empty bins).

    Bin ``b`` holds confidences in ``(b/B, (b+1)/B]``; a confidence of exactly 0 goes in bin 0.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    conf = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
        acc = np.where(count > 0, acc_sum / np.maximum(count, 1), np.nan)
    return {
        "bin_edges": edges.tolist(),
        "confidence": mean_conf.tolist(),
        "accuracy": acc.tolist(),
        "count": count.astype(int).tolist(),
    }


def expected_calibration_error(
    probs: np.ndarray, y_true: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """ECE: ``sum_b (n_b / n) |accuracy_b - confidence_b|`` over equal-width confidence bins."""
    bins = reliability_bins(probs, y_true, n_bins)
    count = np.asarray(bins["count"], dtype=np.float64)
    if count.sum() == 0:
        return 0.0
    gap = np.abs(np.asarray(bins["accuracy"]) - np.asarray(bins["confidence"]))
    return float(np.nansum(count * gap) / count.sum())


def _calibration(z: np.ndarray, y: np.ndarray, f: np.ndarray, folds: np.ndarray) -> dict:
    t_all = fit_temperature(z, y)
    p_before = softmax(z)
    p_in_sample = softmax(z, t_all)
    per_fold_t: list[dict[str, Any]] = []
    p_cross: np.ndarray | None = None
    if folds.size >= 2:
        p_cross = np.empty_like(p_before)
        for fold_id in folds:
            held_out = f == fold_id
            t_k = fit_temperature(z[~held_out], y[~held_out])
            per_fold_t.append({"fold": int(fold_id), "temperature": t_k})
            p_cross[held_out] = softmax(z[held_out], t_k)
    p_after = p_cross if p_cross is not None else p_in_sample
    return {
        "method": "temperature_scaling",
        "temperature": t_all,
        "temperature_bounds": list(TEMPERATURE_BOUNDS),
        "temperature_at_bound": temperature_bound(t_all),
        "cross_fitted_temperatures": per_fold_t,
        "n_bins": ECE_BINS,
        "ece_before": expected_calibration_error(p_before, y),
        "ece_after": (expected_calibration_error(p_cross, y) if p_cross is not None else None),
        "ece_after_in_sample": expected_calibration_error(p_in_sample, y),
        "nll_before": _nll(p_before, y),
        "nll_after": _nll(p_after, y),
        "reliability": {
            "before": reliability_bins(p_before, y),
            "after": reliability_bins(p_after, y),
            "after_source": "cross_fitted" if p_cross is not None else "in_sample",
        },
    }


def _nll(probs: np.ndarray, y: np.ndarray) -> float:
    p_true = probs[np.arange(y.size), y]
    return float(-np.mean(np.log(np.maximum(p_true, np.finfo(np.float64).tiny))))


# --- helpers ----------------------------------------------------------------------------


def _validate(
    y_true: np.ndarray, logits: np.ndarray, fold: np.ndarray, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    z = np.asarray(logits, dtype=np.float64)
    f = np.asarray(fold)
    k = len(classes)
    if k < 2:
        raise ValueError(f"need at least 2 classes, got {list(classes)}")
    if len(set(classes)) != k:
        raise ValueError(f"class names must be unique, got {list(classes)}")
    if z.ndim != 2 or z.shape[1] != k:
        raise ValueError(f"logits must be (n, {k}), got shape {z.shape}")
    if y.shape != (z.shape[0],) or f.shape != (z.shape[0],):
        raise ValueError(
            f"y_true {y.shape} and fold {f.shape} must be ({z.shape[0]},) like the logits"
        )
    if z.shape[0] == 0:
        raise ValueError("no predictions to evaluate")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= k:
        raise ValueError(f"y_true must hold class indices in [0, {k})")
    if not np.issubdtype(f.dtype, np.integer):
        raise ValueError("fold must hold integer split ids")
    if not np.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values")
    return y.astype(np.int64), z, f.astype(np.int64)


def _member_probs(member_logits: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if member_logits is None:
        return None
    ml = np.asarray(member_logits, dtype=np.float64)
    if ml.ndim != 3 or ml.shape[1:] != shape:
        raise ValueError(f"member_logits must be (m, {shape[0]}, {shape[1]}), got {ml.shape}")
    if not np.isfinite(ml).all():
        raise ValueError("member_logits contain NaN or infinite values")
    return softmax(ml)


def _train_sizes(
    given: Mapping[int, int] | Sequence[int] | None, folds: np.ndarray, f: np.ndarray
) -> dict[int, int]:
    if given is None:
        return {int(k): int((f != k).sum()) for k in folds}
    if isinstance(given, Mapping):
        return {int(k): int(given[int(k)]) for k in folds}
    if len(given) != folds.size:
        raise ValueError(f"n_train_per_fold has {len(given)} entries for {folds.size} folds")
    return {int(k): int(n) for k, n in zip(folds, given, strict=True)}


def _split_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro P/R/F1 over the classes present in ``y``."""
    present = np.unique(y)
    p, r, f1, _ = precision_recall_fscore_support(
        y, pred, labels=present, average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f1),
    }


def _per_class(y: np.ndarray, pred: np.ndarray, k: int) -> dict[int, dict[str, float]]:
    """Per-class P/R/F1/error rate for the classes present in ``y`` (keyed by class index)."""
    p, r, f1, support = precision_recall_fscore_support(
        y, pred, labels=np.arange(k), average=None, zero_division=0
    )
    return {
        c: {
            "precision": float(p[c]),
            "recall": float(r[c]),
            "f1": float(f1[c]),
            "error_rate": float(1.0 - r[c]),
        }
        for c in range(k)
        if support[c] > 0
    }


def _mean_std(rows: list[dict[str, float]], keys: Sequence[str]) -> dict[str, Any]:
    """``{key: mean, ..., "std": {key: sd}}`` over rows; ``None`` where undefined."""
    out: dict[str, Any] = {}
    std: dict[str, float | None] = {}
    for key in keys:
        values = np.array([row[key] for row in rows], dtype=np.float64)
        out[key] = float(values.mean()) if values.size else None
        std[key] = float(values.std(ddof=STD_DDOF)) if values.size > STD_DDOF else None
    out["std"] = std
    return out


def _across_splits(splits: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    summary = _mean_std(splits, _SPLIT_METRICS)
    std = summary.pop("std")
    return {"mean": summary, "std": std}


def _means(measures: Mapping[str, np.ndarray], mask: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {
        name: (float(v[mask].mean()) if mask.any() else None) for name, v in measures.items()
    }
    out["n"] = int(mask.sum())
    return out


def _error_detection(
    probs: np.ndarray, member_probs: np.ndarray | None, wrong: np.ndarray
) -> dict[str, Any]:
    """AUROC of each acquisition's uncertainty for flagging wrong predictions.

    Also each measure's spread over the OOF set and which are degenerate (spread below
    :data:`DEGENERATE_SPREAD`). ``best_acquisition`` is the highest defined AUROC among the
    non-degenerate measures, ties in :data:`~training.shared.uncertainty.ACQUISITIONS` order; None
    when no measure qualifies (a degenerate measure is never recommended, whatever its
    AUROC: its ranking rests on differences too small to mean anything).
    """
    defined = 0 < wrong.sum() < wrong.size
    auroc: dict[str, float | None] = {}
    spread: dict[str, float] = {}
    for name, acquisition in ACQUISITIONS.items():
        if name == "bald" and member_probs is None:
            continue
        u = acquisition(probs, member_probs)
        auroc[name] = float(roc_auc_score(wrong, u)) if defined else None
        spread[name] = float(u.max() - u.min())
    auroc["max_softmax"] = auroc["least_confidence"]
    spread["max_softmax"] = spread["least_confidence"]
    degenerate = [name for name, s in spread.items() if s < DEGENERATE_SPREAD]
    ranked = [
        (v, name)
        for name, v in auroc.items()
        if v is not None and name in ACQUISITIONS and name not in degenerate
    ]
    # max() keeps the first of equal AUROCs, i.e. ACQUISITIONS order breaks ties.
    best = max(ranked, key=lambda item: item[0])[1] if ranked else None
    return {
        "error_detection_auroc": auroc,
        "best_acquisition": best,
        "measure_spread": spread,
        "degenerate_measures": degenerate,
    }


def most_missed(per_class: Mapping[str, Mapping[str, Any]]) -> dict[str, Any] | None:
    """The class(es) with the highest mean error rate, every one of them on a tie.

    ``per_class`` is ``metrics["per_class"]``. Returns ``{"classes": [...], "error_rate":
    rate}`` (classes in vocabulary order), or None when no class has an error.
    """
    rates = {
        name: float(row["error_rate"])
        for name, row in per_class.items()
        if row.get("error_rate") is not None
    }
    if not rates or max(rates.values()) <= 0:
        return None
    worst = max(rates.values())
    tied = [name for name, rate in rates.items() if worst - rate <= _TIE_TOL]
    return {"classes": tied, "error_rate": worst}


def _warnings(metrics: Mapping[str, Any], *, n_classes_learned: int) -> list[dict[str, Any]]:
    """The ``warnings`` list: numbers that must not be read at face value (module docstring)."""
    out: list[dict[str, Any]] = []
    if n_classes_learned >= 2:
        chance = 1.0 / n_classes_learned
        for key, label in (("f1_macro", "macro-F1"), ("accuracy", "accuracy")):
            value = metrics["mean"][key]
            if value is None or value > chance + _TIE_TOL:
                continue
            at = abs(value - chance) <= _TIE_TOL
            digits = 2 if at or f"{value:.2f}" != f"{chance:.2f}" else 3
            out.append(
                {
                    "code": "below_chance",
                    "metric": key,
                    "value": value,
                    "chance": chance,
                    "n_classes": n_classes_learned,
                    "message": (
                        f"{label} {value:.{digits}f} is {'at' if at else 'below'} chance "
                        f"({chance:.{digits}f} for {n_classes_learned} classes): the model "
                        "does no better than guessing"
                    ),
                }
            )
    cal = metrics["calibration"]
    bound = cal["temperature_at_bound"]
    if bound is not None:
        t = cal["temperature"]
        limit = TEMPERATURE_BOUNDS[0 if bound == "lower" else 1]
        why = (
            "the out-of-fold outputs give it nothing to calibrate against (no or almost no errors)"
            if bound == "lower"
            else "the outputs carry (almost) no information about the answer"
        )
        out.append(
            {
                "code": "temperature_at_bound",
                "bound": bound,
                "temperature": t,
                "bounds": list(TEMPERATURE_BOUNDS),
                "message": (
                    f"temperature T = {t:.2f} at its {bound} search bound ({limit}); "
                    f"calibration unreliable: {why}"
                ),
            }
        )
    unc = metrics["uncertainty"]
    degenerate = unc["degenerate_measures"]
    if degenerate:
        spread = unc["measure_spread"]
        names = ", ".join(f"{name} (spread {spread[name]:.1e})" for name in degenerate)
        one = len(degenerate) == 1
        out.append(
            {
                "code": "degenerate_uncertainty",
                "measures": list(degenerate),
                "tolerance": DEGENERATE_SPREAD,
                "message": (
                    f"degenerate uncertainty: {names} {'varies' if one else 'vary'} by "
                    f"less than {DEGENERATE_SPREAD:g} (on the [0, 1] scale) over the "
                    f"out-of-fold predictions, so {'it' if one else 'they'} cannot tell wrong "
                    f"from correct answers and {'is' if one else 'are'} never chosen as the "
                    "best acquisition"
                ),
            }
        )
    return out


def _confusion(y: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    labels = np.arange(len(classes))
    counts = confusion_matrix(y, pred, labels=labels)
    normalized = confusion_matrix(y, pred, labels=labels, normalize="true")
    return {
        "labels": list(classes),
        "normalized": normalized.tolist(),
        "counts": counts.astype(int).tolist(),
    }


def _json_clean(obj: Any) -> Any:
    """Recursively turn numpy scalars/arrays into Python values and NaN/inf into ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_clean(obj.tolist())
    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, int | np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        value = float(obj)
        return value if np.isfinite(value) else None
    return obj
