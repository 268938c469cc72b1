"""A self-contained HTML report of a model version, written for the radiologist who uses it.

One file, no external resources: inline CSS, plots and Grad-CAM images embedded as base64
PNG, so it can be mailed, archived with the model version, or opened offline. It shows
what :func:`training.fitting.evaluation.evaluate_oof` measured, laid out like the paper (Vach et
al. 2025): per-split table (Table 2), per-class and uncertainty tables (Table 3),
normalised confusion matrix (Fig. 4), saliency maps (Fig. 5), plus what the paper did not
report: error detection by uncertainty, calibration (temperature scaling) and, for versions
that read it, the valve's pressure setting.

Numbers that must not be read at face value carry a visible warning next to them, rendered
from ``metrics["warnings"]`` (see :mod:`training.fitting.evaluation`): a mean accuracy or macro-F1
at or below chance under the summary, a degenerate uncertainty measure at the top of the
uncertainty section (marked "degenerate" in the error-detection table and never
highlighted as the best), a temperature at its search bound above the calibration table.
Warning codes without a section of their own appear under the summary, so none is dropped.

Every string that reaches the HTML is escaped (class names come from the user's Label
Studio config). Plots use matplotlib's object API (:class:`matplotlib.figure.Figure`, Agg
canvas), so no pyplot state or GUI backend is touched.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from training.shared.novelty import LEGACY_MEASURE
from training.shared.setting_gate import MIN_EXACT, MIN_SCORED, proposed_settings
from training.shared.uncertainty import normalized_entropy, softmax

__all__ = ["GALLERY_IMAGE_PX", "GALLERY_PER_CLASS", "PLOT_DPI", "write_report"]

logger = logging.getLogger(__name__)

GALLERY_IMAGE_PX = 256
"""Longest side, pixels, of each Grad-CAM gallery image (keeps the HTML small)."""
GALLERY_PER_CLASS = 4
"""At most this many Grad-CAM examples are shown per true class."""
PLOT_DPI = 100
"""Resolution of the embedded plots, dots per inch."""

_PAPER_TL = "accuracy 0.98 ± 0.01, macro F1 0.93 ± 0.04"
_PAPER_NO_TL = "accuracy 0.93 ± 0.03, macro F1 0.87 ± 0.08"
_BEST_ROW = ' class="best"'
_SECTION_WARNINGS = {
    "summary": ("below_chance",),
    "uncertainty": ("degenerate_uncertainty",),
    "calibration": ("temperature_at_bound",),
}
"""Which ``metrics["warnings"]`` codes each section shows; any other code goes to the summary."""

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;
max-width:62em;padding:0 1em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
.summary{font-size:1.2em;background:#eef5ff;border-left:5px solid #2f6fd6;padding:.7em 1em}
.warning{background:#fff1e6;border:2px solid #d9480f;color:#7a2500;padding:.7em 1em;
font-weight:600;margin:1em 0}
table{border-collapse:collapse;margin:.6em 0}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:right}th{background:#f3f3f3}td.l,th.l{text-align:left}tr.mean td{font-weight:700}
.best{background:#e6f6e6}.note{color:#555;font-size:.9em}
table.cm td,table.cm th{padding:.1em .35em;font-size:.85em}
.gallery{display:flex;flex-wrap:wrap;gap:1em}.card{border:1px solid #ddd;padding:.4em;
width:min(100%,520px)}.card img{width:100%;height:auto}.wrong{border-color:#d9480f}
figure{margin:.5em 0}img.plot{max-width:100%;height:auto}
"""


def write_report(
    metrics: Mapping[str, Any],
    out_html: Path,
    *,
    title: str,
    run_info: Mapping[str, Any],
    gradcam_examples: Sequence[Mapping[str, Any]] | None = None,
    oof: Mapping[str, Any] | None = None,
) -> Path:
    """Write the report to ``out_html`` and return its path.

    ``metrics`` is the ``metrics.json`` dict. ``run_info`` is shown as given (date,
    version, data size, class counts, ...); ``run_info["pretrained"] is False``, or an
    ``InitInfo`` dict ``run_info["init"]`` with ``init == "random"``, adds a warning banner
    (random initialisation). ``gradcam_examples`` are dicts with ``image``
    ``(H, W)`` in [0, 1], ``cam`` ``(H, W)``, ``true``, ``pred`` (class names) and ``prob``
    (the predicted class's probability). ``oof`` (optional) with ``y_true`` ``(n,)`` and
    ``logits`` ``(n, K)`` (or ``probs``) adds a histogram of uncertainty for correct vs wrong
    predictions.
    """
    classes = [str(c) for c in metrics["classes"]]
    sections = [
        f"<h1>{_esc(title)}</h1>",
        _summary(metrics),
        _warning_boxes(metrics, _SECTION_WARNINGS["summary"], placed_elsewhere=False),
        _pretrained_banner(run_info),
        _run_info(metrics, run_info),
        _splits_section(metrics),
        _per_class_section(metrics, classes),
        _confusion_section(metrics),
        _localisation_section(metrics),
        _settings_section(metrics),
        _novelty_section(metrics),
        _uncertainty_section(metrics, classes, oof),
        _calibration_section(metrics),
        _gallery_section(gradcam_examples or [], classes),
        _methods_note(metrics),
    ]
    body = "\n".join(s for s in sections if s)
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
        "</body></html>\n"
    )
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    logger.info("wrote report %s (%d kB)", out.name, len(document) // 1024)
    return out


# --- sections ---------------------------------------------------------------------------


def _summary(metrics: Mapping[str, Any]) -> str:
    mean, std = metrics["mean"], metrics["std"]
    n_folds = int(metrics.get("n_folds", len(metrics["splits"])))
    fold_word = "fold" if n_folds == 1 else "folds"
    sd = f", SD {_pct(std['accuracy'])}" if std.get("accuracy") is not None else ""
    parts = [
        f"Identifies the valve model correctly in {_pct(mean['accuracy'])} of held-out X-rays "
        f"(mean over {n_folds} {fold_word}{sd}; {metrics['n_images']} X-rays in total).",
        f"Macro-averaged F1 score: {_pm(mean['f1_macro'], std.get('f1_macro'))}.",
    ]
    missed = _most_missed(metrics)
    if missed is not None:
        names, rate = [str(c) for c in missed["classes"]], missed["error_rate"]
        if len(names) == 1:
            parts.append(f"Most often missed: {_esc(names[0])} ({_pct(rate)} of its X-rays).")
        else:
            parts.append(
                f"Most often missed, tied: {_esc(_and(names))} ({_pct(rate)} of the X-rays "
                "of each)."
            )
    unc = metrics.get("uncertainty", {})
    best = _best_acquisition(unc)
    if best is not None:
        auc = unc["error_detection_auroc"][best]
        parts.append(
            f"Uncertainty ({_esc(best.replace('_', ' '))}) separates wrong from correct "
            f"answers with AUROC {_fmt(auc)}."
        )
    return f'<p class="summary">{" ".join(parts)}</p>'


def _best_acquisition(unc: Mapping[str, Any]) -> str | None:
    """The recommended measure, unless it is degenerate (never highlight one)."""
    best = unc.get("best_acquisition")
    return None if best in (unc.get("degenerate_measures") or ()) else best


def _most_missed(metrics: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """``metrics["most_missed"]``; computed from ``per_class`` for metrics that predate it."""
    if "most_missed" in metrics:
        return metrics["most_missed"]
    from training.fitting.evaluation import most_missed  # sklearn/scipy: only for older metrics

    return most_missed(metrics["per_class"])


def _warning_boxes(
    metrics: Mapping[str, Any], codes: Collection[str], *, placed_elsewhere: bool = True
) -> str:
    """Warning boxes for the ``metrics["warnings"]`` entries with these codes.

    With ``placed_elsewhere=False`` also those whose code no section places (so a code added
    to the metrics later still shows).
    """
    placed = {code for section in _SECTION_WARNINGS.values() for code in section}
    boxes = [
        f'<div class="warning" data-warning="{_esc(w.get("code", ""))}">Warning: '
        f"{_esc(w.get('message', w.get('code', '')))}</div>"
        for w in metrics.get("warnings") or []
        if w.get("code") in codes or (not placed_elsewhere and w.get("code") not in placed)
    ]
    return "".join(boxes)


def _random_init(run_info: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether the body started from random weights, and the recorded reason if any.

    Reads ``run_info["pretrained"] is False`` or an ``InitInfo`` dict under
    ``run_info["init"]`` with ``init == "random"`` (:mod:`training.shared.model`).
    """
    init = run_info.get("init")
    if isinstance(init, Mapping) and init.get("init") == "random":
        return True, str(init.get("reason") or "")
    return run_info.get("pretrained") is False, ""


def _pretrained_banner(run_info: Mapping[str, Any]) -> str:
    is_random, reason = _random_init(run_info)
    if not is_random:
        return ""
    why = f" Reason recorded: {_esc(reason)}" if reason else ""
    return (
        '<div class="warning">Warning: this model was trained from random initialisation, '
        "not from ImageNet weights. In the paper, transfer learning was clearly better "
        f"({_PAPER_TL} with ImageNet weights vs {_PAPER_NO_TL} without). Prefer a model "
        f"trained with ImageNet weights.{why}</div>"
    )


def _run_info(metrics: Mapping[str, Any], run_info: Mapping[str, Any]) -> str:
    rows = []
    for key, value in run_info.items():
        if key == "pretrained" and isinstance(value, bool):
            shown = "ImageNet weights (transfer learning)" if value else "random initialisation"
        else:
            shown = _plain(value)
        rows.append(
            f'<tr><th class="l">{_esc(str(key).replace("_", " "))}</th>'
            f'<td class="l">{_esc(shown)}</td></tr>'
        )
    support = ", ".join(f"{name}: {row['support']}" for name, row in metrics["per_class"].items())
    rows.append(
        f'<tr><th class="l">evaluated X-rays per class</th><td class="l">{_esc(support)}</td></tr>'
    )
    return f"<h2>Run</h2><table>{''.join(rows)}</table>"


def _localisation_section(metrics: Mapping[str, Any]) -> str:
    """Where the version places the valve (the pre-annotation's keypoint), against the
    annotated valve centres."""
    found = metrics.get("localisation")
    if not found:
        return ""
    if not found.get("n"):
        return "<h2>Valve location</h2><p>No X-ray with an annotated centre was scored.</p>"
    if found.get("source") == "saliency":
        how = (
            "This whole-image version has no locator: the location is the peak of its Grad-CAM "
            "map, what the pre-annotation marks until a run learns a locator from the centres "
            "annotators confirm or move."
        )
    else:
        how = (
            "The classifier saw the crop around the predicted centre, so these misses are "
            "part of the accuracy above."
        )
    return (
        "<h2>Valve location</h2><p>Out-of-fold distance between the predicted and the "
        f"annotated valve centre, over {_esc(found['n'])} X-rays, in pixels of the original "
        f"image: median <b>{_fmt(found['median_px'])}</b>, 95th percentile "
        f"<b>{_fmt(found['p95_px'])}</b>. {how}</p>"
    )


def _crop_of(row: Mapping[str, Any], n_folds: int) -> str:
    """Which crop a model's setting was read on, over the folds (absent in older runs)."""
    if "framed_folds" not in row:
        return "–"
    folds = int(row["framed_folds"])
    return f"own frame ({folds} of {n_folds} folds)" if folds else "directed"


def _settings_section(metrics: Mapping[str, Any]) -> str:
    """How well the version reads the pressure setting (``metrics["settings"]``, from
    :func:`training.fitting.evaluation.setting_metrics`), per valve model."""
    found = metrics.get("settings")
    if found is None:
        return ""
    heading = "<h2>Pressure setting (validated on synthetic images only)</h2>"
    note = (
        '<p class="note">Settings were validated on synthetic images only; how well they are '
        "read on real X-rays is not known yet. The setting is read under the true valve "
        "model, so a wrongly identified model does not count again here (class errors are "
        "reported above). One step = one value up or down the model's scale.</p>"
    )
    if not found:
        return f"{heading}<p>No X-ray with a labelled setting was scored.</p>{note}"
    proposed = proposed_settings(metrics)
    n_folds = int(metrics.get("n_folds", len(metrics.get("splits", ()))))
    rows = "".join(
        f'<tr><td class="l">{_esc(name)}</td><td>{_esc(row["n"])}</td>'
        f"<td>{_pct(row['exact'])}</td><td>{_pct(row['within_one'])}</td>"
        f"<td>{_fmt(row['mean_abs_steps'])}</td>"
        f"<td>{_crop_of(row, n_folds)}</td>"
        f"<td>{'yes' if name in proposed else 'no'}</td></tr>"
        for name, row in found.items()
    )
    gate = (
        f'<p class="note">Proposed: whether the pre-annotation selects this model\'s setting. '
        f"Only a model read exactly right on at least {MIN_EXACT:.0%} of at least "
        f"{MIN_SCORED} X-rays is; the others are left for the annotator "
        "(training/shared/setting_gate.py).</p>"
    )
    matrices = "".join(
        f"<h3>{_esc(name)}</h3>{_setting_confusion(row['values'], row['confusion'])}"
        for name, row in found.items()
    )
    return (
        f"{heading}{note}"
        '<table><tr><th class="l">Valve model</th><th>X-rays</th><th>Exact</th>'
        f"<th>Within one step</th><th>Mean |steps|</th><th>Crop</th><th>Proposed</th></tr>"
        f"{rows}</table>{gate}"
        '<p class="note">Crop: where the reader looked. "Own frame": turned, faced and '
        "zoomed onto a template of the model fitted on the fold's training X-rays, cut where "
        'its settings differ; "directed": the crop turned along the valve\'s principal axis '
        "(too few of the model's X-rays or settings to fit a template; docs/TRAINING.md).</p>"
        '<p class="note">Confusion of the settings, all splits pooled. Rows: labelled '
        "setting; columns: setting read; each cell counts X-rays (empty = none), the "
        "diagonal (exact) highlighted.</p>"
        f"{matrices}"
    )


def _setting_confusion(values: Sequence[str], counts: Sequence[Sequence[int]]) -> str:
    """A compact count table over one scale (rows true, columns read)."""
    head = '<tr><th class="l">labelled ↓ read →</th>' + "".join(
        f"<th>{_esc(v)}</th>" for v in values
    )
    rows = "".join(
        f'<tr><th class="l">{_esc(value)}</th>'
        + "".join(
            f"<td{_BEST_ROW if i == j else ''}>{_esc(c) if c else ''}</td>"
            for j, c in enumerate(counts[i])
        )
        + "</tr>"
        for i, value in enumerate(values)
    )
    return f'<table class="cm">{head}</tr>{rows}</table>'


NOVELTY_MEASURE_TEXT = {
    "energy": (
        "the free energy of the fold networks' mean logits (high where no learned class "
        "stands out, as where the folds disagree)"
    ),
    "mahalanobis": (
        "the distance of the network's penultimate features to the nearest learned class "
        "(Mahalanobis, shared covariance)"
    ),
    "combined": (
        "the mean of two novelties, each against its own out-of-fold reference: the "
        "distance of the network's penultimate features to the nearest learned class, and "
        "the free energy of the fold networks' mean logits"
    ),
}
"""How each novelty measure reads in the report (:data:`training.shared.novelty.MEASURES`)."""
NOVELTY_MEASURED = {
    "combined": (
        "it separated other valves from the learned ones with an AUROC of 0.91-0.93 and "
        "flagged 65-68 % of them, and 3-14 % of ordinary X-rays (two seeds; either part "
        "alone 0.81-0.89)"
    ),
    "energy": (
        "it separated other valves from the learned ones with an AUROC of 0.81-0.89 and "
        "flagged 35-60 % of them, and 7-17 % of ordinary X-rays (the default measure, "
        "combined, did better)"
    ),
    "mahalanobis": (
        "it separated other valves from the learned ones with an AUROC of 0.82-0.88 and "
        "flagged 33-53 % of them, and 0-5 % of ordinary X-rays (the default measure, "
        "combined, did better; 0.62 for a version trained in bf16)"
    ),
}
"""What docs/TRAINING.md measured for each, on held-out synthetic X-rays (fp32 versions)."""


def _novelty_section(metrics: Mapping[str, Any]) -> str:
    """How the version flags an X-ray unlike every valve model it learned."""
    found = metrics.get("novelty")
    if not found:
        return ""
    share = round(100 * (1 - float(found["flag_quantile"])))
    measure = str(found.get("measure", LEGACY_MEASURE))  # older versions: Mahalanobis only
    measured = NOVELTY_MEASURED.get(measure, "it is not yet measured")
    return (
        "<h2>Unfamiliar valves</h2><p>Each served X-ray gets a <b>novelty</b>: the fraction "
        "of the labelled X-rays it is more unusual than, measured as "
        f"{_esc(NOVELTY_MEASURE_TEXT.get(measure, measure))}, against the out-of-fold values "
        f"of all {_esc(found['n_reference'])} labelled X-rays. From "
        f"{_fmt(found['flag_quantile'])} up it is flagged as possibly a valve model this "
        'version never learned ("Other valve") and leads the review queue; about '
        f"{share} % of the labelled X-rays lie above it out of fold. On synthetic X-rays "
        f"{measured} (docs/TRAINING.md, synthetic images only): read a flag as a hint, and "
        "its absence as no proof.</p>"
    )


def _splits_section(metrics: Mapping[str, Any]) -> str:
    head = (
        '<tr><th class="l">Split</th><th>Training X-rays</th><th>Validation X-rays</th>'
        "<th>Precision</th><th>Recall</th><th>Accuracy</th><th>F1 score</th></tr>"
    )
    keys = ("precision_macro", "recall_macro", "accuracy", "f1_macro")
    rows = [
        f'<tr><td class="l">Split {_esc(s["fold"])}</td><td>{_esc(s["n_train"])}</td>'
        f"<td>{_esc(s['n_val'])}</td>" + "".join(f"<td>{_fmt(s[k])}</td>" for k in keys) + "</tr>"
        for s in metrics["splits"]
    ]
    mean, std = metrics["mean"], metrics["std"]
    rows.append(
        '<tr class="mean"><td class="l">Mean ± SD</td><td></td><td></td>'
        + "".join(f"<td>{_pm(mean[k], std.get(k))}</td>" for k in keys)
        + "</tr>"
    )
    return (
        "<h2>Performance per cross-validation split</h2>"
        '<p class="note">Each split\'s model is tested on X-rays of patients it never saw. '
        "Precision, recall and F1 are macro-averaged (every valve model counts equally, "
        "however rare).</p>"
        f"<table>{head}{''.join(rows)}</table>"
    )


def _per_class_section(metrics: Mapping[str, Any], classes: Sequence[str]) -> str:
    head = (
        '<tr><th class="l">Valve model</th><th>X-rays</th><th>Precision</th><th>Recall</th>'
        "<th>F1 score</th><th>Error rate</th></tr>"
    )
    rows = []
    for name in classes:
        row = metrics["per_class"][name]
        sd = row.get("std", {})
        rows.append(
            f'<tr><td class="l">{_esc(name)}</td><td>{_esc(row["support"])}</td>'
            + "".join(
                f"<td>{_pm(row[k], sd.get(k))}</td>"
                for k in ("precision", "recall", "f1", "error_rate")
            )
            + "</tr>"
        )
    return (
        "<h2>Performance per valve model</h2>"
        '<p class="note">Mean ± SD over the splits containing the valve model. Precision: '
        "of the X-rays labelled with this model, the share that are right. Recall: of the "
        "X-rays showing it, the share recognised. Error rate = 1 − recall.</p>"
        f"<table>{head}{''.join(rows)}</table>"
    )


def _confusion_section(metrics: Mapping[str, Any]) -> str:
    cm = metrics["confusion_matrix"]
    png = _confusion_png(cm["normalized"], cm["counts"], cm["labels"])
    return (
        "<h2>Confusion matrix</h2>"
        '<p class="note">All splits pooled. Rows: true valve model; columns: predicted. '
        "Each cell shows the share of the row's X-rays (and their number).</p>"
        f"<figure>{_img(png, 'Normalised confusion matrix')}</figure>"
    )


def _uncertainty_section(
    metrics: Mapping[str, Any], classes: Sequence[str], oof: Mapping[str, Any] | None
) -> str:
    unc = metrics.get("uncertainty")
    if not unc:
        return ""
    measures = [m for m in ("entropy", "max_softmax", "margin", "bald") if m in _first(unc)]
    label = {
        "entropy": "Entropy",
        "max_softmax": "Max softmax",
        "margin": "Softmax gap",
        "bald": "BALD",
    }
    head = (
        '<tr><th class="l">True valve model</th>'
        + "".join(f"<th>{label[m]}</th>" for m in measures)
        + "</tr>"
    )
    rows = []
    for name in classes:
        row = unc["per_class"][name]
        sd = row.get("std", {})
        rows.append(
            f'<tr><td class="l">{_esc(name)}</td>'
            + "".join(f"<td>{_pm(row[m], sd.get(m))}</td>" for m in measures)
            + "</tr>"
        )
    by = unc["by_correctness"]
    corr_rows = "".join(
        f'<tr><td class="l">{kind} ({by[kind]["n"]})</td>'
        + "".join(f"<td>{_fmt(by[kind][m])}</td>" for m in measures)
        + "</tr>"
        for kind in ("correct", "wrong")
    )
    corr_head = (
        '<tr><th class="l">Predictions</th>'
        + "".join(f"<th>{label[m]}</th>" for m in measures)
        + "</tr>"
    )
    best = _best_acquisition(unc)
    degenerate = set(unc.get("degenerate_measures") or ())
    auc_rows = "".join(
        f'<tr{_BEST_ROW if name == best else ""}><td class="l">'
        f"{_esc(name.replace('_', ' '))}"
        f"{' (degenerate)' if name in degenerate else ''}</td><td>{_fmt(value)}</td></tr>"
        for name, value in unc["error_detection_auroc"].items()
    )
    hist = ""
    if oof is not None:
        hist = f"<figure>{_img(_uncertainty_hist_png(oof), 'Uncertainty histogram')}</figure>"
    return (
        "<h2>Uncertainty</h2>"
        '<p class="note">Computed from the model\'s softmax output. Entropy: 0 = certain, '
        "higher = less certain. Max softmax: the probability of the chosen valve model. "
        "Softmax gap: chosen minus runner-up probability (small = hesitating between "
        "two). Mean ± SD over splits, per true valve model.</p>"
        f"{_warning_boxes(metrics, _SECTION_WARNINGS['uncertainty'])}"
        f"<table>{head}{''.join(rows)}</table>"
        "<h3>Correct vs wrong predictions</h3>"
        f"<table>{corr_head}{corr_rows}</table>"
        "<h3>Can uncertainty flag the errors?</h3>"
        '<p class="note">AUROC of each uncertainty measure for telling wrong from correct '
        "predictions (1.0 = every wrong answer is more uncertain than every right one; "
        "0.5 = no better than chance; – = not defined: no errors, or only errors). The "
        "best measure is highlighted; it is the natural choice for ordering X-rays to "
        "review. A degenerate measure (nearly the same value for every X-ray) is never "
        "highlighted, whatever its AUROC.</p>"
        f'<table><tr><th class="l">Measure</th><th>AUROC</th></tr>{auc_rows}</table>{hist}'
    )


def _calibration_section(metrics: Mapping[str, Any]) -> str:
    cal = metrics.get("calibration")
    if not cal:
        return ""
    rel = cal["reliability"]
    png = _reliability_png(rel["before"], rel["after"], float(cal["temperature"]))
    source = "cross-fitted" if rel.get("after_source") == "cross_fitted" else "in-sample"
    return (
        "<h2>Calibration</h2>"
        '<p class="note">Is a displayed probability of 90 % right 90 % of the time? '
        "Expected calibration error (ECE) measures the gap (0 = perfect). Temperature "
        "scaling divides the network's outputs by one number T fitted to the held-out "
        f"predictions; it never changes which valve model is predicted. ECE after scaling "
        f"is {source}.</p>"
        f"{_warning_boxes(metrics, _SECTION_WARNINGS['calibration'])}"
        '<table><tr><th class="l">Temperature T</th><th>ECE before</th><th>ECE after</th>'
        "<th>ECE after (in-sample)</th></tr>"
        f'<tr><td class="l">{_fmt(cal["temperature"])}</td><td>{_fmt(cal["ece_before"], 3)}'
        f"</td><td>{_fmt(cal['ece_after'], 3)}</td>"
        f"<td>{_fmt(cal['ece_after_in_sample'], 3)}</td></tr></table>"
        f"<figure>{_img(png, 'Reliability diagram')}</figure>"
    )


def _gallery_section(examples: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> str:
    if not examples:
        return ""
    by_class: dict[str, list[Mapping[str, Any]]] = {}
    for example in examples:
        by_class.setdefault(str(example["true"]), []).append(example)
    order = [c for c in classes if c in by_class] + [c for c in by_class if c not in classes]
    parts = [
        "<h2>Saliency maps (Grad-CAM)</h2>",
        '<p class="note">Left: the preprocessed X-ray; right: the regions that drove the '
        "prediction (red = strongest). A map that lights up the valve is reassuring; one "
        "that lights up elsewhere suggests the answer rests on something else.</p>",
    ]
    for name in order:
        shown = by_class[name][:GALLERY_PER_CLASS]
        cards = []
        for example in shown:
            right = str(example["pred"]) == name
            verdict = "correct" if right else "wrong"
            caption = (
                f"true: {_esc(name)} · predicted: {_esc(example['pred'])} "
                f"({_pct(float(example['prob']))}) · {verdict}"
            )
            png = _gallery_png(example["image"], example["cam"])
            cards.append(
                f'<div class="card{"" if right else " wrong"}">'
                f"{_img(png, 'Grad-CAM: ' + name)}<div>{caption}</div></div>"
            )
        parts.append(f'<h3>{_esc(name)}</h3><div class="gallery">{"".join(cards)}</div>')
    return "\n".join(parts)


def _methods_note(metrics: Mapping[str, Any]) -> str:
    ddof = metrics.get("std_ddof", 1)
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<h2>How these numbers were computed</h2><p class="note">Patient-grouped, '
        "stratified cross-validation: each X-ray is scored by the one model that did not "
        "train on it (out-of-fold). Per-split metrics are averaged over splits; SD is the "
        f"{'sample' if ddof == 1 else f'ddof={ddof}'} standard deviation across splits. "
        "Confusion matrix, correct-vs-wrong uncertainty and AUROCs pool all out-of-fold "
        f"predictions. Report generated {generated}.</p>"
    )


# --- plots ------------------------------------------------------------------------------


def _confusion_png(
    normalized: Sequence[Sequence[float]], counts: Sequence[Sequence[int]], labels: Sequence[str]
) -> bytes:
    norm = np.asarray(normalized, dtype=np.float64)
    k = norm.shape[0]
    side = 2.2 + 1.1 * k
    fig = Figure(figsize=(side + 1.0, side), dpi=PLOT_DPI)
    ax = fig.add_subplot()
    image = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    for i in range(k):
        for j in range(k):
            colour = "white" if norm[i, j] > 0.5 else "black"
            ax.text(
                j,
                i,
                f"{norm[i, j]:.2f}\n({counts[i][j]})",
                ha="center",
                va="center",
                color=colour,
                fontsize=9,
            )
    ax.set_xticks(range(k), labels=labels, rotation=30, ha="right")
    ax.set_yticks(range(k), labels=labels)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    _no_math(ax)
    fig.tight_layout()
    return _png(fig)


def _reliability_png(
    before: Mapping[str, Any], after: Mapping[str, Any], temperature: float
) -> bytes:
    fig = Figure(figsize=(9.0, 4.0), dpi=PLOT_DPI)
    edges = np.asarray(before["bin_edges"], dtype=np.float64)
    width = np.diff(edges)
    panels = ((before, "Before scaling (T = 1)"), (after, f"After scaling (T = {temperature:.2f})"))
    for position, (bins, name) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, 2, position)
        acc = np.array([np.nan if a is None else a for a in bins["accuracy"]], dtype=np.float64)
        ax.bar(
            edges[:-1],
            np.nan_to_num(acc),
            width=width,
            align="edge",
            color="#2f6fd6",
            edgecolor="white",
            label="accuracy in bin",
        )
        ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("Confidence (max probability)")
        ax.set_ylabel("Accuracy")
        ax.set_title(name)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _uncertainty_hist_png(oof: Mapping[str, Any]) -> bytes:
    y = np.asarray(oof["y_true"], dtype=np.int64)
    if "probs" in oof:
        probs = np.asarray(oof["probs"], dtype=np.float64)
    else:
        probs = softmax(np.asarray(oof["logits"], dtype=np.float64))
    u = normalized_entropy(probs)
    wrong = probs.argmax(axis=1) != y
    fig = Figure(figsize=(6.0, 3.2), dpi=PLOT_DPI)
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 21).tolist()  # matplotlib's stubs take a sequence, not an array
    ax.hist(
        u[~wrong],
        bins=bins,
        alpha=0.7,
        label=f"correct ({int((~wrong).sum())})",
        color="#2f6fd6",
        density=True,
    )
    if wrong.any():
        ax.hist(
            u[wrong],
            bins=bins,
            alpha=0.7,
            label=f"wrong ({int(wrong.sum())})",
            color="#d9480f",
            density=True,
        )
    ax.set_xlabel("Normalised entropy (0 = certain, 1 = undecided)")
    ax.set_ylabel("Density")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def _gallery_png(image_01: np.ndarray, cam: np.ndarray) -> bytes:
    from training.fitting.gradcam import overlay  # imports torch: only when there is a gallery

    image = np.clip(np.asarray(image_01, dtype=np.float32), 0.0, 1.0)
    if image.ndim != 2:
        raise ValueError(f"Grad-CAM example image must be (H, W), got {image.shape}")
    h, w = image.shape
    scale = min(1.0, GALLERY_IMAGE_PX / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    small_cam = np.asarray(
        Image.fromarray(np.asarray(cam, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR)
    )
    gray = np.round(np.clip(small, 0.0, 1.0) * 255.0).astype(np.uint8)
    pair = np.concatenate(
        [
            np.repeat(gray[..., None], 3, axis=2),
            np.full((size[1], 4, 3), 255, np.uint8),
            overlay(small, small_cam),
        ],
        axis=1,
    )
    buffer = io.BytesIO()
    Image.fromarray(pair).save(buffer, format="PNG")
    return buffer.getvalue()


def _no_math(ax: Any) -> None:
    """Show tick labels literally: a ``$`` in a class name must not start mathtext."""
    for text in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        text.set_parse_math(False)


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=PLOT_DPI)
    return buffer.getvalue()


# --- formatting -------------------------------------------------------------------------


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pm(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "–"
    return _fmt(mean) if sd is None else f"{mean:.2f} ± {sd:.2f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100.0 * value:.0f} %"


def _and(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_plain(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value)
    return str(value)


def _first(unc: Mapping[str, Any]) -> Mapping[str, Any]:
    """The uncertainty entry of any class (they all carry the same measures)."""
    per_class = unc.get("per_class") or {}
    return next(iter(per_class.values()), {})
