"""Held-out synthetic evaluation of a served version: class, valve location, unfamiliar valves.

Trains one version (the ``cpu`` profile by default, 5 folds, as the loop would) on a balanced
synthetic set of the four learnable valve models, serves it with the backend's predictor, and
scores it on X-rays it never saw, drawn by the same generator with other seeds:

* accuracy and macro-F1 on fresh X-rays of the four models;
* localisation: distance from the served valve keypoint to the generator's true centre
  (pixels of the original image, median and 95th percentile);
* novelty: AUROC of the served novelty between those X-rays and "Other valve" X-rays (geometries
  the version never saw), and the share of each that is flagged; a version trained with the
  ``combined`` measure is also served with each of its parts alone (the same networks), so
  one run compares the measures;
* pressure setting, per valve model: exact and within-one-step accuracy of the setting the
  version reads under the true model, a confusion matrix, and how often the whole reading
  (model and setting) is right;
* with ``--compare-test-views 1 4 8``: the same version served averaging each crop over 1, 4
  or 8 flips/turns (test-time augmentation), side by side: accuracy, macro-F1, and the time
  to predict the test set relative to the first.

``--size-range 1800 2600`` draws radiograph-sized X-rays; ``--reader-principal-axis`` trains
the version to read settings on the directed crop instead of each model's own frame, so two
runs compare the crops through the whole product.

A quality measurement, not a speed one: it prints what the served product would tell an
annotator on data the run did not train on. Synthetic X-rays only; nothing here says how a
version does on real radiographs. ``--quick`` trains the ``quick`` profile on a few tiny
images: it proves the code, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import Table, add_common_arguments, add_size_range_argument, emit

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class HeldoutOptions:
    profile: str = "cpu"
    n_train: int = 160
    n_test: int = 80
    n_other: int = 40
    n_folds: int = 5
    size_range_px: tuple[int, int] = (600, 1200)
    seed: int = 0
    overrides: tuple[tuple[str, Any], ...] = ()
    compare_test_views: tuple[int, ...] = ()


QUICK = HeldoutOptions(
    profile="quick",
    n_train=24,
    n_test=8,
    n_other=4,
    n_folds=2,
    size_range_px=(192, 256),
    overrides=(("n_folds", 2), ("pretrained", False), ("gradcam_per_class", 0)),
)


def _read_manifest(data: Path) -> list[dict[str, str]]:
    with open(data / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _auroc(inliers: np.ndarray, outliers: np.ndarray) -> float:
    """P(an outlier's novelty exceeds an inlier's), ties counted half."""
    if not len(inliers) or not len(outliers):
        return math.nan
    above = (outliers[:, None] > inliers[None, :]).mean()
    ties = (outliers[:, None] == inliers[None, :]).mean()
    return float(above + ties / 2)


def _train(options: HeldoutOptions, work: Path) -> Any:
    """Generate the training set, train one version in process, publish it; its registry."""
    from training.fitting.config import RecipeConfig
    from training.fitting.run import run_in_process
    from training.shared.dataset import load_manifest
    from training.shared.labels import load_label_config
    from training.shared.registry import ModelRegistry
    from training.synthetic import VALVE_CLASSES, generate_dataset

    train = work / "train"
    generate_dataset(
        train,
        options.n_train,
        seed=options.seed,
        class_mix={c: 1.0 for c in VALVE_CLASSES},
        size_range_px=options.size_range_px,
    )
    label_config = load_label_config(ROOT / "label_config.xml")
    recipe = RecipeConfig.from_profile(
        options.profile, **{"n_folds": options.n_folds, **dict(options.overrides)}
    )
    registry = ModelRegistry(work / "models")
    staging = registry.staging("heldout")
    run_in_process(
        staging,
        load_manifest(train, label_config.classes),
        label_config,
        recipe,
        source="synthetic",
        cache_dir=work / "cache",
        run_id="heldout",
    )
    registry.publish(staging, version_id="heldout")
    return registry


def _framed_folds(registry: Any) -> dict[str, int]:
    """Per valve model, how many of the version's folds read its setting in its own frame
    (the version's out-of-fold ``metrics.json``; empty where it reads no setting)."""
    import json

    metrics = json.loads((registry.versions_dir / "heldout" / "metrics.json").read_text())
    found = metrics.get("settings") or {}
    return {valve: int(entry.get("framed_folds", 0)) for valve, entry in found.items()}


def _novelty_measure(registry: Any) -> str:
    """The served version's novelty measure (``none`` where it has no novelty model)."""
    from training.shared.novelty import NOVELTY_FILE, Novelty

    path = registry.versions_dir / "heldout" / NOVELTY_FILE
    return Novelty.load(path).measure if path.is_file() else "none"


def _novelty_scores(
    known: list[tuple[dict[str, str], Any]], unknown: list[tuple[dict[str, str], Any]]
) -> dict[str, Any]:
    """AUROC, per-image novelty and flagged shares of served answers."""
    novelty_in = np.array([a.novelty for _, a in known if a.novelty is not None])
    novelty_out = np.array([a.novelty for _, a in unknown if a.novelty is not None])
    return {
        "novelty_auroc": _auroc(novelty_in, novelty_out),
        "novelty_known": [round(float(v), 4) for v in novelty_in],
        "novelty_other": [round(float(v), 4) for v in novelty_out],
        "flagged_known": float(np.mean([a.unfamiliar for _, a in known])) if known else None,
        "flagged_other": float(np.mean([a.unfamiliar for _, a in unknown])) if unknown else None,
    }


def _novelty_parts(registry: Any, test: Path, other: Path) -> dict[str, dict[str, Any]]:
    """A ``combined`` version served with each part of its novelty alone: the version's
    novelty file is swapped for the part's, then restored."""
    from backend.service.prediction import Prediction
    from training.shared.novelty import NOVELTY_FILE, Novelty

    path = registry.versions_dir / "heldout" / NOVELTY_FILE
    combined = Novelty.load(path)
    original = path.read_bytes()
    found: dict[str, dict[str, Any]] = {}
    try:
        for part in combined.parts:
            part.save(path)
            known = [(r, a) for r, a in _predict(registry, test) if isinstance(a, Prediction)]
            unknown = [(r, a) for r, a in _predict(registry, other) if isinstance(a, Prediction)]
            found[part.measure] = _novelty_scores(known, unknown)
    finally:
        path.write_bytes(original)
    return found


def _predict(
    registry: Any, data: Path, test_views: int | None = None
) -> list[tuple[dict[str, str], Any]]:
    from backend.service.predictor import Predictor

    rows = _read_manifest(data)
    # Every setting the version reads, proposed or not: this measures the reader.
    with Predictor(
        registry.root,
        device="cpu",
        refresh_interval_s=0.0,
        gate_settings=False,
        test_views=test_views,
    ) as predictor:
        answers = predictor.predict([(data / row["file"]).read_bytes() for row in rows])
    return list(zip(rows, answers, strict=True))


def run(options: HeldoutOptions, work: Path) -> tuple[list[Table], dict[str, Any]]:
    from sklearn.metrics import f1_score

    from backend.service.prediction import Prediction
    from training.synthetic import OTHER_VALVE, VALVE_CLASSES, generate_dataset

    registry = _train(options, work)
    test, other = work / "test", work / "other"
    generate_dataset(
        test,
        options.n_test,
        seed=options.seed + 1,
        class_mix={c: 1.0 for c in VALVE_CLASSES},
        size_range_px=options.size_range_px,
    )
    generate_dataset(
        other,
        options.n_other,
        seed=options.seed + 2,
        class_mix={OTHER_VALVE: 1.0},
        size_range_px=options.size_range_px,
    )
    known = [(row, a) for row, a in _predict(registry, test) if isinstance(a, Prediction)]
    unknown = [(row, a) for row, a in _predict(registry, other) if isinstance(a, Prediction)]
    truth = [row["label"] for row, _ in known]
    guess = [a.label for _, a in known]
    errors = [
        math.dist(a.centre_px, (float(row["valve_x"]), float(row["valve_y"])))
        for row, a in known
        if a.centre_px is not None
    ]
    sources = sorted({a.centre_source for _, a in known if a.centre_source})
    settings = _setting_results(known)
    result = {
        "options": {
            **{k: v for k, v in options.__dict__.items() if k != "overrides"},
            "overrides": dict(options.overrides),
        },
        "n_known": len(known),
        "n_other": len(unknown),
        "accuracy": float(np.mean([t == g for t, g in zip(truth, guess, strict=True)])),
        "f1_macro": float(f1_score(truth, guess, labels=list(VALVE_CLASSES), average="macro")),
        "location_source": sources,
        "location_median_px": float(np.median(errors)) if errors else None,
        "location_p95_px": float(np.percentile(errors, 95)) if errors else None,
        "novelty_measure": _novelty_measure(registry),
        **_novelty_scores(known, unknown),
        # For comparison: 1 - the served ensemble's top probability (calibrated), same X-rays.
        "top_probability_auroc": _auroc(
            np.array([1 - max(a.probs.values()) for _, a in known]),
            np.array([1 - max(a.probs.values()) for _, a in unknown]),
        ),
        "settings": settings,
        "framed_folds": _framed_folds(registry),
    }
    if result["novelty_measure"] == "combined":
        result["novelty_parts"] = _novelty_parts(registry, test, other)
    table = Table(
        f"Held-out synthetic X-rays: {options.profile} profile trained on {options.n_train}, "
        f"{options.n_folds} folds; tested on {len(known)} of the four models and "
        f"{len(unknown)} other valves",
        ["measure", "value"],
    )
    table.add_row("accuracy (four models)", f"{result['accuracy']:.3f}")
    table.add_row("macro-F1 (four models)", f"{result['f1_macro']:.3f}")
    located = ", ".join(sources) or "none"
    for name, key in (("median", "location_median_px"), ("95th percentile", "location_p95_px")):
        value = result[key]
        table.add_row(
            f"valve location error, {name} (px, {located})",
            "—" if value is None else f"{value:.1f}",
        )
    table.add_row(
        f"novelty AUROC (other valves vs the four; {result['novelty_measure']})",
        f"{result['novelty_auroc']:.3f}",
    )
    table.add_row(
        "AUROC of 1 - the top class probability instead (for comparison)",
        f"{result['top_probability_auroc']:.3f}",
    )
    for name, key in (("four models", "flagged_known"), ("other valves", "flagged_other")):
        value = result[key]
        table.add_row(f"flagged as unfamiliar: {name}", "—" if value is None else f"{value:.2f}")
    for measure, part in result.get("novelty_parts", {}).items():
        table.add_row(
            f"its {measure} part alone: AUROC / flagged, four models / other valves",
            f"{part['novelty_auroc']:.3f} / {part['flagged_known']:.2f} / "
            f"{part['flagged_other']:.2f}",
        )
    for valve, found in settings.items():
        table.add_row(
            f"setting, {valve}: exact / within one step / whole reading right (n={found['n']})",
            f"{found['exact']:.2f} / {found['within_one']:.2f} / {found['reading_right']:.2f}",
        )
    table.notes.append(
        "Synthetic X-rays from the demo generator (other seeds than training); the valve "
        "location is the served keypoint against the generator's true centre. Settings are "
        "read under the true valve model; 'whole reading right' needs the proposed model and "
        "its setting both right. Settings were validated on synthetic images only."
    )
    tables = [table]
    if options.compare_test_views:
        views_table, result["test_views"] = _compare_test_views(
            registry, test, options.compare_test_views
        )
        tables.append(views_table)
    return tables, result


def _compare_test_views(
    registry: Any, test: Path, counts: tuple[int, ...]
) -> tuple[Table, dict[str, Any]]:
    """The same version served with each count of averaged views, one after the other."""
    from sklearn.metrics import f1_score

    from backend.service.prediction import Prediction
    from training.synthetic import VALVE_CLASSES

    found: dict[str, Any] = {}
    for count in counts:
        start = time.perf_counter()
        answers = _predict(registry, test, test_views=count)
        seconds = time.perf_counter() - start
        known = [(row, a) for row, a in answers if isinstance(a, Prediction)]
        truth = [row["label"] for row, _ in known]
        guess = [a.label for _, a in known]
        found[str(count)] = {
            "n": len(known),
            "errors": sum(t != g for t, g in zip(truth, guess, strict=True)),
            "accuracy": float(np.mean([t == g for t, g in zip(truth, guess, strict=True)])),
            "f1_macro": float(f1_score(truth, guess, labels=list(VALVE_CLASSES), average="macro")),
            "seconds": seconds,
        }
    base = found[str(counts[0])]["seconds"]
    table = Table(
        "The same version, each crop averaged over 1-8 flips/turns at inference",
        ["views", "accuracy", "macro-F1", "errors", f"time to predict (× {counts[0]} view(s))"],
    )
    for count, row in found.items():
        table.add_row(
            count,
            f"{row['accuracy']:.3f}",
            f"{row['f1_macro']:.3f}",
            f"{row['errors']} of {row['n']}",
            f"{row['seconds'] / base:.2f}",
        )
    table.notes.append(
        "Views (training.shared.locate_classify.averaged_views): 1 = the crop as is, 2 = also "
        "mirrored across the valve's axis, 4 = also half-turned, 8 = every flip and quarter "
        "turn. The predictor is rebuilt for each and run one after the other on this machine."
    )
    return table, found


def _setting_results(known: list[tuple[dict[str, str], Any]]) -> dict[str, dict[str, Any]]:
    """Per valve model: :func:`setting_metrics` of the setting read under the true model,
    plus the share of X-rays whose proposed model and setting are both right."""
    from training.fitting.evaluation import setting_metrics
    from training.shared.labels import load_label_config

    config = load_label_config(ROOT / "label_config.xml")
    rows = [(row, a) for row, a in known if row.get("valve_setting")]
    valves = [row["label"] for row, _ in rows]
    truth = [row["valve_setting"] for row, _ in rows]
    read = [a.settings.get(row["label"], (None, 0.0))[0] for row, a in rows]
    found = setting_metrics(config.settings, valves, truth, read)
    for valve, entry in found.items():
        mine = [(row, a) for row, a in rows if row["label"] == valve]
        entry["reading_right"] = float(
            np.mean(
                [
                    a.label == valve
                    and a.setting is not None
                    and a.setting[0] == row["valve_setting"]
                    for row, a in mine
                ]
            )
        )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_common_arguments(parser)
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--n-folds", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--novelty-measure",
        default=None,
        help="train the version with this novelty measure (mahalanobis, energy, combined)",
    )
    add_size_range_argument(parser)
    parser.add_argument(
        "--reader-principal-axis",
        action="store_true",
        help="train the version to read settings on the directed crop, not in each valve "
        "model's own frame (recipe reader_template off), to compare the two",
    )
    parser.add_argument(
        "--compare-test-views",
        type=int,
        nargs="+",
        default=(),
        metavar="N",
        help="also serve the version averaging each crop over N views (1, 2, 4, 8) and compare",
    )
    args = parser.parse_args(argv)
    options = QUICK if args.quick else HeldoutOptions()
    if args.n_train:
        options = replace(options, n_train=args.n_train)
    if args.n_test:
        options = replace(options, n_test=args.n_test)
    if args.n_folds:
        options = replace(options, n_folds=args.n_folds)
    if args.seed is not None:
        options = replace(options, seed=args.seed)
    if args.compare_test_views:
        options = replace(options, compare_test_views=tuple(args.compare_test_views))
    if args.size_range:
        options = replace(options, size_range_px=(args.size_range[0], args.size_range[1]))
    if args.reader_principal_axis:
        options = replace(options, overrides=(*options.overrides, ("reader_template", False)))
    if args.novelty_measure:
        overrides = (*options.overrides, ("novelty_measure", args.novelty_measure))
        options = replace(options, overrides=overrides)
    with tempfile.TemporaryDirectory(prefix="valve-id-heldout-") as tmp:
        tables, result = run(options, Path(tmp))
    emit(tables, args.markdown)
    out = args.json or (args.markdown.with_suffix(".heldout.json") if args.markdown else None)
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
