"""The simulation's self-contained HTML report: curves, labels saved, error detection.

Same conventions as the training report (:mod:`training.fitting.report`, whose styling, escaping,
plot embedding and random-initialisation banner it reuses): one file, inline CSS, plots as
base64 PNG drawn with matplotlib's object API, every string escaped.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from training.fitting.report import (
    _CSS,
    PLOT_DPI,
    _esc,
    _fmt,
    _img,
    _pm,
    _png,
    _pretrained_banner,
)

__all__ = ["write_simulation_report"]

logger = logging.getLogger(__name__)

_BASELINE_COLOUR = "#555555"
"""The random baseline is always grey."""
_COLOURS = ("#2f6fd6", "#d9480f", "#2b8a3e", "#862e9c", "#f08c00", "#0b7285", "#c2255c")
"""Line colours of the other strategies, in their order."""
_LABEL = {
    "random": "random",
    "entropy": "entropy",
    "margin": "margin",
    "least_confidence": "least confidence",
    "bald": "BALD",
    "coreset": "coreset (k-center)",
    "entropy_coreset": "entropy + k-center",
}


def _name(strategy: str) -> str:
    return _LABEL.get(strategy, strategy.replace("_", " "))


def write_simulation_report(results: Mapping[str, Any], out_html: Path) -> Path:
    """Write the report for ``results`` (the ``results.json`` dict); return its path."""
    summary = results["summary"]
    config = results["config"]
    classes = [str(c) for c in results["classes"]]
    title = "valve-id active-learning simulation"
    sections = [
        f"<h1>{_esc(title)}</h1>",
        _headline(results),
        _near_chance(summary),
        _pretrained_banner({"init": results.get("init") or {}}),
        _curve_section(summary),
        _recall_section(summary, classes),
        _labels_saved_section(summary),
        _auroc_section(summary),
        _class_mix_section(summary, classes),
        _setup_section(results, config),
        _methods(config),
    ]
    body = "\n".join(s for s in sections if s)
    document = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}\n"
        "</body></html>\n"
    )
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document, encoding="utf-8")
    logger.info("wrote simulation report %s (%d kB)", out.name, len(document) // 1024)
    return out


# --- sections ---------------------------------------------------------------------------


def _headline(results: Mapping[str, Any]) -> str:
    summary = results["summary"]
    saved = summary["labels_saved"]
    if saved.get("target") is None:
        return f'<p class="summary">{_esc(saved.get("note", ""))}</p>'
    parts = [
        f"Random sampling reached macro-F1 {_pm(saved['target'], saved.get('target_sd'))} "
        f"with {saved['baseline_labels']} labels."
    ]
    for name, row in saved["by_strategy"].items():
        if name == "random":
            continue
        if row["labels_needed"] is None:
            parts.append(f"{_esc(_name(name))}: not reached within the budget.")
        else:
            parts.append(
                f"{_esc(_name(name))}: reached it with {row['labels_needed']} labels "
                f"({row['labels_saved']} saved)."
            )
    return f'<p class="summary">{" ".join(parts)}</p>'


def _near_chance(summary: Mapping[str, Any]) -> str:
    if not summary.get("near_chance"):
        return ""
    return (
        '<div class="warning">The best strategy ended at macro-F1 '
        f"{_fmt(summary['best_final_macro_f1'])}, close to guessing "
        f"({_fmt(summary['chance_macro_f1'])} for equally likely classes): the models learned "
        "little, so differences between strategies here are mostly noise. Rerun with larger "
        "images, more epochs or ImageNet weights before drawing conclusions.</div>"
    )


def _curve_section(summary: Mapping[str, Any]) -> str:
    png = _curves_png(
        {name: c["macro_f1"] for name, c in summary["curves"].items()},
        {name: c["n_labels"] for name, c in summary["curves"].items()},
        "Macro-F1 on the held-out test split",
        target=summary["labels_saved"].get("target"),
        chance=summary.get("chance_macro_f1"),
    )
    return (
        "<h2>Learning curves</h2>"
        '<p class="note">Macro-F1 of each round\'s model on the held-out test split (patients '
        "no strategy ever saw) against the number of labels spent. Line: mean over seeds; "
        "band: ± 1 SD. Dashed: random sampling's final macro-F1 (the target of "
        '"labels saved"); dotted: guessing among equally likely classes.</p>'
        f"<figure>{_img(png, 'Macro-F1 learning curves')}</figure>"
    )


def _recall_section(summary: Mapping[str, Any], classes: Sequence[str]) -> str:
    curves = summary["curves"]
    colours = _colour_map(list(curves))
    ncols = min(2, len(classes))
    nrows = math.ceil(len(classes) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.4 * nrows + 0.4), dpi=PLOT_DPI)
    for i, cls in enumerate(classes):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for name, curve in curves.items():
            _band_plot(ax, curve["n_labels"], curve["recall"][cls], name, colours[name])
        ax.set_title(cls)
        ax.title.set_parse_math(False)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("Labels")
        ax.set_ylabel("Recall")
        ax.grid(alpha=0.3)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return (
        "<h2>Recall per valve model</h2>"
        '<p class="note">Share of each valve model\'s test X-rays recognised, mean ± SD over '
        "seeds. A strategy that finds the hard or rare model early lifts its curve first.</p>"
        f"<figure>{_img(_png(fig), 'Recall per class')}</figure>"
    )


def _labels_saved_section(summary: Mapping[str, Any]) -> str:
    saved = summary["labels_saved"]["by_strategy"]
    rows = []
    for name, curve in summary["curves"].items():
        row = saved.get(name, {})
        needed = row.get("labels_needed")
        auc = summary["auc"][name]
        final = curve["macro_f1"]
        rows.append(
            f'<tr><td class="l">{_esc(_name(name))}</td>'
            f"<td>{'not reached' if needed is None else needed}</td>"
            f"<td>{'–' if row.get('labels_saved') is None else row['labels_saved']}</td>"
            f"<td>{_esc(_paired_text(row.get('paired')))}</td>"
            f"<td>{_pm(auc['mean'], auc['sd'])}</td>"
            f"<td>{_pm(final['mean'][-1], final['sd'][-1])}</td></tr>"
        )
    return (
        "<h2>Labels saved and area under the curve</h2>"
        '<p class="note">Labels needed: the first label count at which the strategy\'s mean '
        "macro-F1 reaches random sampling's final mean. Saved: random's labels minus those. "
        "AUC: area under the macro-F1 curve divided by the label range (the mean macro-F1 over "
        "the budget, 1 = perfect from the start), mean ± SD over seeds. Per seed: the same "
        "comparison inside each seed (same seed set and test split), its mean and 95 % "
        "interval; a seed that never reached random's final value is counted as not reached.</p>"
        '<table><tr><th class="l">Strategy</th><th>Labels needed</th><th>Labels saved</th>'
        "<th>Saved per seed (mean, 95 % CI)</th>"
        f"<th>AUC (normalised)</th><th>Final macro-F1</th></tr>{''.join(rows)}</table>"
    )


def _paired_text(paired: Mapping[str, Any] | None) -> str:
    """``"20, 0, 40 → 20 [-30, 70]"``; seeds that never reached the target are named."""
    if not paired:
        return "–"
    seeds = ", ".join("not reached" if s is None else str(s) for s in paired["per_seed"])
    if paired["mean"] is None:
        return seeds
    text = f"{seeds} → {paired['mean']:.0f}"
    if paired["ci95"] is not None:
        lo, hi = paired["ci95"]
        text += f" [{lo:.0f}, {hi:.0f}]"
    return text


def _auroc_section(summary: Mapping[str, Any]) -> str:
    auroc = summary["error_detection_auroc"]
    measures = list(auroc["overall"])
    strategies = list(auroc["by_strategy"])
    head = (
        '<tr><th class="l">Measure</th>'
        + "".join(f"<th>final model of {_esc(_name(s))}</th>" for s in strategies)
        + "<th>all final models</th></tr>"
    )
    rows = []
    for m in measures:
        cells = "".join(
            f"<td>{_pm(auroc['by_strategy'][s][m]['mean'], auroc['by_strategy'][s][m]['sd'])}</td>"
            for s in strategies
        )
        overall = auroc["overall"][m]
        best = ' class="best"' if m == auroc.get("best") else ""
        rows.append(
            f'<tr{best}><td class="l">{_esc(_name(m))}</td>{cells}'
            f"<td>{_pm(overall['mean'], overall['sd'])}</td></tr>"
        )
    return (
        "<h2>Which uncertainty flags the errors?</h2>"
        '<p class="note">AUROC of each acquisition the backend can serve for telling the final '
        "model's wrong test predictions from its right ones (1 = every error is more uncertain "
        "than every correct answer, 0.5 = chance), mean ± SD over seeds. The highlighted "
        "measure is best over all final models.</p>"
        f"<table>{head}{''.join(rows)}</table>"
    )


def _class_mix_section(summary: Mapping[str, Any], classes: Sequence[str]) -> str:
    head = (
        '<tr><th class="l">Strategy</th>'
        + "".join(f"<th>{_esc(c)}</th>" for c in classes)
        + "</tr>"
    )
    rows = "".join(
        f'<tr><td class="l">{_esc(_name(name))}</td>'
        + "".join(f"<td>{curve['final_labelled_class_counts'][c]:.1f}</td>" for c in classes)
        + "</tr>"
        for name, curve in summary["curves"].items()
    )
    return (
        "<h2>What each strategy chose to label</h2>"
        '<p class="note">Labelled X-rays per valve model at the end of the budget, mean over '
        "seeds (seed set included).</p>"
        f"<table>{head}{rows}</table>"
    )


def _setup_section(results: Mapping[str, Any], config: Mapping[str, Any]) -> str:
    recipe = config["recipe"]
    test = results["test"]
    init = results.get("init") or {}
    shown = {
        "data": config["data"],
        "data snapshot sha256": results.get("data_sha256", "")[:16],
        "images": results["n_images"],
        "held-out test X-rays": f"{test['n']} ("
        + ", ".join(
            f"{c}: {n}" for c, n in zip(results["classes"], test["class_counts"], strict=True)
        )
        + ")",
        "strategies": ", ".join(_name(s) for s in config["strategies"]),
        "seeds per strategy": config["seeds"],
        "seed set / batch / budget": (
            f"{config['seed_size']} / {config['batch_size']} / {config['budget']} labels"
        ),
        "models per round": config["members"],
        "BALD from": (
            f"{config['members']} ensemble members"
            if config["members"] >= 2
            else f"{config['mc_passes']} MC-dropout passes of the head"
        ),
        "recipe": (
            f"{recipe['profile']} profile, {recipe['arch']}, {recipe['image_size_px']} px, "
            f"{recipe['epochs'] if recipe['pretrained'] else recipe['epochs_from_scratch']} "
            f"epochs, batch {recipe['batch_size']}, lr {recipe['lr_max']}"
        ),
        "initialisation": init.get("init", "–"),
        "run time": f"{results.get('elapsed_s', 0) / 60:.1f} min",
    }
    rows = "".join(
        f'<tr><th class="l">{_esc(k)}</th><td class="l">{_esc(v)}</td></tr>'
        for k, v in shown.items()
    )
    return f"<h2>Set-up</h2><table>{rows}</table>"


def _methods(config: Mapping[str, Any]) -> str:
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        '<h2>How this was computed</h2><p class="note">A patient-grouped, stratified test '
        "split is held out once. Each seed draws a stratified seed set; then every round "
        "trains the recipe on the labelled X-rays, scores the unlabelled pool with the "
        "strategy, and reveals the true labels of the top picks, until the budget is spent. "
        "The uncertainty strategies use the same acquisition functions (and the same "
        "ascending-score order) as the backend's review queue. Training seeds depend on the "
        "seed and round, not on the strategy, so curves differ by what was labelled. "
        "Everything is reproducible from config.json (on a CPU). SD is the sample standard "
        f"deviation across seeds. Report generated {generated}.</p>"
    )


# --- plots ------------------------------------------------------------------------------


def _colour_map(names: Sequence[str]) -> dict[str, str]:
    others = [n for n in names if n != "random"]
    colours = {n: _COLOURS[i % len(_COLOURS)] for i, n in enumerate(others)}
    return {n: colours.get(n, _BASELINE_COLOUR) for n in names}


def _band_plot(ax: Any, x: Sequence[int], curve: Mapping[str, Any], name: str, colour: str) -> None:
    mean = np.array([np.nan if v is None else v for v in curve["mean"]], dtype=np.float64)
    sd = np.array([0.0 if v is None else v for v in curve["sd"]], dtype=np.float64)
    ax.plot(x, mean, marker="o", ms=3, lw=1.6, color=colour, label=_name(name))
    low, high = np.clip(mean - sd, 0.0, 1.0), np.clip(mean + sd, 0.0, 1.0)
    ax.fill_between(x, low, high, color=colour, alpha=0.15, lw=0)


def _curves_png(
    curves: Mapping[str, Mapping[str, Any]],
    xs: Mapping[str, Sequence[int]],
    ylabel: str,
    *,
    target: float | None,
    chance: float | None = None,
) -> bytes:
    fig = Figure(figsize=(7.5, 4.3), dpi=PLOT_DPI)
    ax = fig.add_subplot()
    colours = _colour_map(list(curves))
    for name, curve in curves.items():
        _band_plot(ax, xs[name], curve, name, colours[name])
    if target is not None:
        ax.axhline(target, ls="--", lw=1, color="grey", label="random's final macro-F1")
    if chance is not None:
        ax.axhline(chance, ls=":", lw=1, color="black", label="guessing (1/K)")
    ax.set_xlabel("Labels spent (seed set included)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _png(fig)
