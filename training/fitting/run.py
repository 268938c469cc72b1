"""A training run in three stages over one staging directory: plan, folds, finalise.

The stages are separate so that RQ can run them as separate jobs (:mod:`training.fitting.jobs`):
one ``plan`` job, then one job per fold (in parallel on N GPU workers, or in sequence on
one), then a ``finalise`` job that evaluates, writes the report and publishes the version.
In-process training (:func:`run_in_process`) calls the same three functions in order.

The staging directory (from the registry, same filesystem as ``versions/``) becomes the
model version when published, so it holds exactly what serving loads::

    run.json          the plan: run id, recipe, classes, preprocessing, data snapshot
    splits.json       train/val item keys per fold (no patient in two folds)
    weights/fold_<k>.pt, oof/fold_<k>.npz, history/fold_<k>.json
    config.json       what serving reads (:class:`training.shared.version_config.VersionConfig`)
    metrics.json, report.html
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.shared.dataset import LabelledImage, PreparedImages, prepare_images
from training.shared.errors import DatasetError
from training.shared.labels import LabelConfig
from training.shared.novelty import (
    LEGACY_MEASURE,
    MEASURES,
    NOVELTY_FILE,
    FoldNovelty,
    Novelty,
    features_and_logits,
    parts_of,
)
from training.shared.preprocess import PreprocessParams
from training.shared.version_config import CONFIG_FILE, DataSummary, FoldEntry, VersionConfig

if TYPE_CHECKING:  # fastai and the two-stage network load only where a fold trains
    from training.fitting.recipe import FoldResult
    from training.fitting.two_stage import TwoStageFoldResult

__all__ = [
    "CONFIG_FILE",
    "RUN_FILE",
    "finalize_run",
    "localisation_error",
    "plan_run",
    "run_in_process",
    "train_fold_stage",
]

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
SPLITS_FILE = "splits.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"

ProgressFn = Callable[[dict[str, Any]], None]


SALIENCY_BATCH = 16
"""Images per Grad-CAM pass when scoring a whole-image fold's valve locations."""


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _pseudonym(group: str) -> str:
    """Patient groups are stored hashed: a registry never holds a raw patient id."""
    return hashlib.sha256(group.encode("utf-8")).hexdigest()[:16]


def plan_run(
    run_dir: Path,
    items: Sequence[LabelledImage],
    label_config: LabelConfig,
    config: Any,
    *,
    source: str,
    cache_dir: Path | None,
    run_id: str,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Decode/cache every image once, fix the classes and the folds; write ``run.json``.

    The classes are the label config's choices that have labelled images in this snapshot,
    in config order (a choice nobody has used yet cannot be learned; it is listed under
    ``unused_classes`` and becomes a class in the first run that has examples of it).
    """
    from training.fitting.splits import make_splits

    located = sum(1 for item in items if item.valve_xy is not None)
    config = config.for_snapshot(located, len(items))
    logger.info(
        "run %s: %s design (%d of %d images have a valve centre)",
        run_id,
        config.design,
        located,
        len(items),
    )
    params: PreprocessParams = config.preprocess_params()

    def on_image(done: int, total: int) -> None:
        if progress is not None and (done == total or done % 25 == 0):
            progress({"stage": "prepare", "done": done, "total": total})

    source_px = config.reader_source_px(bool(label_config.settings))
    prepared = prepare_images(items, params, cache_dir, progress=on_image, source_px=source_px)
    present = {item.label for item in prepared.items}
    classes = [c for c in label_config.classes if c in present]
    unknown = present - set(label_config.classes)
    if unknown:
        raise DatasetError(f"labels not in the label config: {sorted(unknown)}")
    if len(classes) < 2:
        raise DatasetError(
            f"training needs labelled images of at least two classes; found {sorted(present)}"
        )
    labels = np.array([classes.index(item.label) for item in prepared.items])
    groups = [item.group for item in prepared.items]
    splits = make_splits(labels, groups, config.n_folds, config.seed)

    snapshot = [
        {
            "key": it.key,
            "label": it.label,
            "group": _pseudonym(it.group),
            "sha256": h,
            "valve_xy": list(it.valve_xy) if it.valve_xy is not None else None,
            "setting": it.setting,
        }
        for it, h in zip(prepared.items, prepared.hashes, strict=True)
    ]
    # The setting scales of this run's classes; only the crop network reads settings.
    scales = [s for s in label_config.settings if s.valve in classes]
    if config.design != "locate_classify":
        scales = []
    plan = {
        "run_id": run_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "recipe": config.to_dict(),
        "preprocess": params.to_dict(),
        "classes": classes,
        "unused_classes": [c for c in label_config.classes if c not in present],
        "label_config_hash": label_config.config_hash,
        "settings": [{"valve": s.valve, "name": s.name, "values": list(s.values)} for s in scales],
        "snapshot": snapshot,
        "paths": [it.path for it in prepared.items],
        "failures": prepared.failures,
    }
    write_json(run_dir / RUN_FILE, plan)
    write_json(
        run_dir / SPLITS_FILE,
        [
            {
                "fold": k,
                "train": [prepared.items[i].key for i in tr],
                "val": [prepared.items[i].key for i in va],
            }
            for k, (tr, va) in enumerate(splits)
        ],
    )
    if prepared.failures:
        logger.warning("%d image(s) could not be decoded and are left out", len(prepared.failures))
    return plan


def _load_plan(
    run_dir: Path, cache_dir: Path | None, *, sources: bool = False
) -> tuple[dict, PreparedImages, np.ndarray]:
    """The plan, its prepared images (cache hits) and label ids, checked against the hashes;
    with ``sources``, also each image's source where the run's setting reader reads them."""
    from training.fitting.config import RecipeConfig

    plan = read_json(run_dir / RUN_FILE)
    params = PreprocessParams.from_dict(plan["preprocess"])
    items = [
        LabelledImage(
            path=p,
            label=s["label"],
            group=s["group"],
            key=s["key"],
            valve_xy=tuple(s["valve_xy"]) if s.get("valve_xy") else None,
            setting=s.get("setting"),
        )
        for p, s in zip(plan["paths"], plan["snapshot"], strict=True)
    ]
    recipe = RecipeConfig.from_dict(plan["recipe"])
    source_px = recipe.reader_source_px(bool(plan.get("settings"))) if sources else None
    prepared = prepare_images(items, params, cache_dir, source_px=source_px)
    if prepared.hashes != [s["sha256"] for s in plan["snapshot"]]:
        raise DatasetError("images changed on disk since the run was planned; start a new run")
    labels = np.array([plan["classes"].index(s["label"]) for s in plan["snapshot"]])
    return plan, prepared, labels


def _fold_indices(run_dir: Path, plan: dict, fold: int) -> tuple[np.ndarray, np.ndarray]:
    position = {s["key"]: i for i, s in enumerate(plan["snapshot"])}
    split = read_json(run_dir / SPLITS_FILE)[fold]
    return (
        np.array([position[k] for k in split["train"]]),
        np.array([position[k] for k in split["val"]]),
    )


def _setting_layout(plan: dict) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The run's setting scales as the network lays them out (plans before settings: none)."""
    return tuple((s["valve"], tuple(s["values"])) for s in plan.get("settings", []))


def _setting_metrics(plan: dict, y: np.ndarray, readings: np.ndarray) -> dict[str, Any]:
    """Out-of-fold setting accuracy per valve model, each setting read under the true model
    (the class errors are in the class metrics)."""
    from training.fitting.evaluation import setting_metrics
    from training.shared.labels import SettingScale
    from training.shared.locate_classify import setting_blocks

    scales = [SettingScale(s["valve"], s["name"], tuple(s["values"])) for s in plan["settings"]]
    blocks = setting_blocks(_setting_layout(plan))
    values_of = {s.valve: s.values for s in scales}
    valves = [plan["classes"][int(c)] for c in y]
    predicted: list[str | None] = []
    for i, valve in enumerate(valves):
        if valve not in blocks or not np.isfinite(readings[i]).all():
            predicted.append(None)
            continue
        predicted.append(values_of[valve][int(np.argmax(readings[i, blocks[valve]]))])
    truth = [s.get("setting") for s in plan["snapshot"]]
    return setting_metrics(scales, valves, truth, predicted)


def _framed_folds(histories: list[dict[str, Any]], valve: str) -> int:
    """How many folds read ``valve``'s setting in its template's frame (the rest on the
    directed crop: too few of its X-rays or settings in that fold)."""
    return sum(
        valve in row.get("framed", ())
        for h in histories
        for row in h.get("history", ())
        if row.get("stage") == "read"
    )


def train_fold_stage(
    run_dir: Path, fold: int, *, cache_dir: Path | None, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Train fold ``fold`` of a planned run; write its weights, OOF logits and history."""
    from training.fitting.config import RecipeConfig
    from training.fitting.recipe import pick_device, train_fold
    from training.shared.inference import precision_name
    from training.shared.model import save_checkpoint

    plan, prepared, labels = _load_plan(run_dir, cache_dir, sources=True)
    config = RecipeConfig.from_dict(plan["recipe"])
    train_idx, val_idx = _fold_indices(run_dir, plan, fold)
    extra: dict[str, np.ndarray] = {}
    device = pick_device()
    fold_args = (train_idx, val_idx, len(plan["classes"]), config)
    result: FoldResult | TwoStageFoldResult
    if config.design == "locate_classify":
        from training.fitting.two_stage import setting_targets, train_two_stage_fold

        layout = _setting_layout(plan)
        settings = [s.get("setting") for s in plan["snapshot"]]
        result = train_two_stage_fold(
            prepared.arrays,
            labels,
            prepared.centres,
            *fold_args,
            fold=fold,
            device=device,
            progress=progress,
            settings=setting_targets(plan["classes"], labels, settings, layout),
            setting_layout=layout,
            classes=plan["classes"],
            sources=prepared.sources,
        )
        extra["centres"] = result.val_centres
        if result.val_setting_logits is not None:
            extra["setting_logits"] = result.val_setting_logits
    elif config.design == "whole_image":
        result = train_fold(
            prepared.arrays, labels, *fold_args, fold=fold, device=device, progress=progress
        )
        if not np.isnan(prepared.centres[val_idx]).all():  # annotated centres to compare with
            params = PreprocessParams.from_dict(plan["preprocess"])
            extra["centres"] = _saliency_centres(result.model, prepared.arrays[val_idx], params)
    else:
        raise ValueError(f"unknown design {config.design!r}; known: whole_image, locate_classify")
    save_checkpoint(result.model, run_dir / "weights" / f"fold_{fold}.pt", classes=plan["classes"])
    # Novelty: this fold's feature statistics, and its held-out X-rays' distances (the
    # out-of-fold reference new X-rays are ranked against).
    params = PreprocessParams.from_dict(plan["preprocess"])
    trained_in = precision_name(device, config.mixed_precision)
    features, served_logits = _features_and_logits(
        result.model, prepared.arrays, params, trained_in
    )
    (run_dir / "novelty").mkdir(parents=True, exist_ok=True)
    for measure in parts_of(config.novelty_measure):
        novelty = FoldNovelty.fit(
            features[train_idx],
            labels[train_idx],
            len(plan["classes"]),
            features[val_idx],
            served_logits[val_idx],
            measure=measure,
        )
        Novelty((novelty,), np.zeros(0)).save(run_dir / "novelty" / f"fold_{fold}_{measure}.npz")
        extra[f"novelty_{measure}"] = novelty.distances(features[val_idx], served_logits[val_idx])
    oof = run_dir / "oof" / f"fold_{fold}.npz"
    oof.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"val_idx": val_idx, "logits": result.val_logits, **extra}
    np.savez(oof, **arrays)
    summary = {
        "fold": fold,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "init": result.init.to_dict(),
        "precision": trained_in,
        "class_weights": result.class_weights.tolist(),
        "history": result.history,
    }
    write_json(run_dir / "history" / f"fold_{fold}.json", summary)
    return summary


def _gradcam_examples(
    run_dir: Path, plan: dict, prepared: PreparedImages, y: np.ndarray, oof: dict, per_class: int
) -> list[dict[str, Any]]:
    """A few out-of-fold images per class with the saliency of the fold that scored them."""
    import torch

    from training.shared.inference import to_network_input
    from training.shared.model import load_checkpoint
    from training.shared.saliency import grad_cam

    params = PreprocessParams.from_dict(plan["preprocess"])
    examples: list[dict[str, Any]] = []
    models: dict[int, Any] = {}
    for c, name in enumerate(plan["classes"]):
        for i in np.flatnonzero(y == c)[:per_class]:
            fold = int(oof["fold"][i])
            if fold not in models:
                models[fold] = load_checkpoint(run_dir / "weights" / f"fold_{fold}.pt")
            model = models[fold]
            image = torch.from_numpy(prepared.arrays[i : i + 1].astype(np.float32))
            batch = to_network_input(image, params, channels_last=False)
            cam = grad_cam(model, batch, model.body[-1])[0]
            probs = oof["probs"][i]
            pred = int(np.argmax(probs))
            examples.append(
                {
                    "image": prepared.arrays[i].astype(np.float32),
                    "cam": cam,
                    "true": name,
                    "pred": plan["classes"][pred],
                    "prob": float(probs[pred]),
                }
            )
    return examples


def finalize_run(
    run_dir: Path, *, cache_dir: Path | None, version: str | None = None
) -> VersionConfig:
    """Gather the folds' OOF predictions, evaluate, write ``config.json`` and the report.

    Returns the version's config, as serving will read it. Publishing (the atomic rename into
    the registry and the promotion gate) is the caller's step, so a failure here leaves the
    registry untouched.
    """
    from training.fitting.evaluation import evaluate_oof, write_metrics
    from training.fitting.report import write_report
    from training.shared.uncertainty import softmax

    plan, prepared, y = _load_plan(run_dir, cache_dir)
    config_recipe = plan["recipe"]
    n_folds = config_recipe["n_folds"]
    logits = np.zeros((len(y), len(plan["classes"])), dtype=np.float32)
    centres = np.full((len(y), 2), np.nan, dtype=np.float32)
    novelty_measure = config_recipe.get("novelty_measure", LEGACY_MEASURE)  # older plans
    novelty_distance = {m: np.full(len(y), np.nan) for m in parts_of(novelty_measure)}
    total = sum(len(values) for _, values in _setting_layout(plan))
    readings = np.full((len(y), total), np.nan, dtype=np.float32)
    fold_of = np.full(len(y), -1)
    histories = []
    for k in range(n_folds):
        path = run_dir / "oof" / f"fold_{k}.npz"
        if not path.is_file():
            raise DatasetError(f"fold {k} has no out-of-fold predictions: the fold did not finish")
        with np.load(path) as data:
            logits[data["val_idx"]] = data["logits"]
            fold_of[data["val_idx"]] = k
            if "centres" in data:
                centres[data["val_idx"]] = data["centres"]
            for measure, distance in novelty_distance.items():
                if f"novelty_{measure}" in data:
                    distance[data["val_idx"]] = data[f"novelty_{measure}"]
            if "setting_logits" in data:
                readings[data["val_idx"]] = data["setting_logits"]
        histories.append(read_json(run_dir / "history" / f"fold_{k}.json"))
    if (fold_of < 0).any():
        raise DatasetError("some images have no out-of-fold prediction; the splits are incomplete")

    metrics = evaluate_oof(
        y, logits, fold_of, plan["classes"], n_train_per_fold=[h["n_train"] for h in histories]
    )
    if not np.isnan(centres).all():
        metrics["localisation"] = {
            **localisation_error(centres, prepared.centres, prepared.boxes),
            "source": "locator" if config_recipe.get("design") == "locate_classify" else "saliency",
        }
    if all(np.isfinite(d).all() for d in novelty_distance.values()):
        metrics["novelty"] = _write_novelty(run_dir, n_folds, novelty_distance)
    if total and np.isfinite(readings).any():
        metrics["settings"] = _setting_metrics(plan, y, readings)
        for valve, entry in metrics["settings"].items():
            entry["framed_folds"] = _framed_folds(histories, valve)
    write_metrics(metrics, run_dir / METRICS_FILE)
    temperature = float(metrics["calibration"]["temperature"])
    oof = {"fold": fold_of, "probs": softmax(logits)}
    examples = _gradcam_examples(
        run_dir, plan, prepared, y, oof, int(config_recipe.get("gradcam_per_class", 2))
    )
    init = histories[0]["init"]
    config = VersionConfig(
        version=version,
        run_id=plan["run_id"],
        created=plan["created"],
        arch=config_recipe["arch"],
        design=config_recipe.get("design", "whole_image"),
        classes=tuple(plan["classes"]),
        unused_classes=tuple(plan["unused_classes"]),
        label_config_hash=plan["label_config_hash"],
        preprocess=PreprocessParams.from_dict(plan["preprocess"]),
        recipe=config_recipe,
        temperature=temperature,
        init=init,
        folds=tuple(
            FoldEntry(
                fold=h["fold"],
                weights=f"weights/fold_{h['fold']}.pt",
                n_train=h["n_train"],
                n_val=h["n_val"],
                precision=h.get("precision"),
            )
            for h in histories
        ),
        data=DataSummary(
            source=plan["source"],
            n_images=len(y),
            n_failed=len(plan["failures"]),
            snapshot=RUN_FILE,
        ),
    )
    write_json(run_dir / CONFIG_FILE, config.to_dict())
    run_info = {
        "version": version or plan["run_id"],
        "created": plan["created"],
        "source": plan["source"],
        "profile": config_recipe["profile"],
        "profile_reason": config_recipe.get("profile_reason", ""),
        "design": config_recipe.get("design", "whole_image"),
        "n_images": len(y),
        "class_counts": {c: int((y == i).sum()) for i, c in enumerate(plan["classes"])},
        "init": init,
        "precision": ", ".join(sorted({h.get("precision") or "not recorded" for h in histories})),
        "image_size_px": plan["preprocess"]["size_px"],
        "epochs": config_recipe["epochs"]
        if config_recipe["pretrained"]
        else config_recipe["epochs_from_scratch"],
        "failed_images": len(plan["failures"]),
    }
    write_report(
        metrics,
        run_dir / REPORT_FILE,
        title="valve-id training report",
        run_info=run_info,
        gradcam_examples=examples,
        oof={"y_true": y, "probs": oof["probs"]},
    )
    return config


def _saliency_centres(model: Any, arrays: np.ndarray, params: PreprocessParams) -> np.ndarray:
    """Grad-CAM peaks ``(n, 2)`` (fractions of the prepared square) of a whole-image network:
    the location serving offers for such a version, scored here against the annotations."""
    import torch

    from training.shared.inference import iter_batches, to_network_input
    from training.shared.saliency import grad_cam, saliency_peaks

    device = next(model.parameters()).device
    peaks = np.full((len(arrays), 2), np.nan, dtype=np.float32)
    for part in iter_batches(len(arrays), SALIENCY_BATCH):
        images = torch.from_numpy(arrays[part].astype(np.float32)).to(device)
        batch = to_network_input(images, params, channels_last=False)
        peaks[part] = saliency_peaks(grad_cam(model, batch, model.body[-1]))
    return peaks


def _features_and_logits(
    model: Any, arrays: np.ndarray, params: PreprocessParams, trained_in: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(n, D)`` penultimate features and ``(n, K)`` logits of every prepared image, as a
    backend on this device (the CPU: the trainers hand their networks back there) computes
    them: in the precision the network was trained in where this device computes it, else fp32
    (as the predictor's fast path decides,
    :func:`~training.shared.inference.computes_as_trained`)."""
    import torch

    from training.shared.inference import (
        autocast_for,
        computes_as_trained,
        iter_batches,
        to_network_input,
    )

    device = next(model.parameters()).device
    model.eval()
    features, logits = [], []
    with torch.inference_mode(), autocast_for(device, computes_as_trained(device, {trained_in})):
        for part in iter_batches(len(arrays), SALIENCY_BATCH):
            images = torch.from_numpy(arrays[part].astype(np.float32)).to(device)
            batch = to_network_input(images, params, channels_last=False)
            found, answer = features_and_logits(model, batch)
            features.append(found.float().cpu().numpy())
            logits.append(answer.float().cpu().numpy())
    return np.concatenate(features), np.concatenate(logits)


def _write_novelty(run_dir: Path, n_folds: int, distances: dict[str, np.ndarray]) -> dict[str, Any]:
    """The version's novelty model (its folds + the out-of-fold reference; for ``combined``,
    one such model per measure and the reference of their mean), and its summary for
    metrics.json. ``distances``: each measure's out-of-fold distances."""
    parts = [
        Novelty(
            tuple(
                Novelty.load(run_dir / "novelty" / f"fold_{k}_{measure}.npz").folds[0]
                for k in range(n_folds)
            ),
            np.sort(distance),
        )
        for measure, distance in distances.items()
    ]
    novelty = parts[0] if len(parts) == 1 else Novelty.combine(parts, list(distances.values()))
    novelty.save(run_dir / NOVELTY_FILE)
    shutil.rmtree(run_dir / "novelty")  # the folds are in NOVELTY_FILE now
    reference = novelty.reference
    return {
        "measure": novelty.measure,
        "measure_description": MEASURES[novelty.measure],
        "file": NOVELTY_FILE,
        "flag_quantile": novelty.flag_quantile,
        "n_reference": len(reference),
        "reference_median": round(float(np.median(reference)), 4),
        "reference_flag_distance": round(float(np.quantile(reference, novelty.flag_quantile)), 4),
    }


def localisation_error(
    predicted: np.ndarray, annotated: np.ndarray, boxes: np.ndarray
) -> dict[str, Any]:
    """Out-of-fold valve-centre error in pixels of the original images (median, 95th pct).

    ``predicted``/``annotated`` are ``(N, 2)`` fractions of the prepared square (NaN where
    unknown); ``boxes`` the ``(N, 4)`` foreground boxes ``(top, bottom, left, right)`` the
    squares were cut from, which turn fractions back into original pixels.
    """
    both = ~(np.isnan(predicted).any(axis=1) | np.isnan(annotated).any(axis=1))
    if not both.any():
        return {"n": 0, "median_px": None, "p95_px": None}
    box = boxes[both].astype(np.float64)
    scale = np.stack([box[:, 3] - box[:, 2], box[:, 1] - box[:, 0]], axis=1)
    error = np.linalg.norm((predicted[both] - annotated[both]) * scale, axis=1)
    return {
        "n": int(both.sum()),
        "median_px": round(float(np.median(error)), 2),
        "p95_px": round(float(np.percentile(error, 95)), 2),
    }


def run_in_process(
    run_dir: Path,
    items: Sequence[LabelledImage],
    label_config: LabelConfig,
    config: Any,
    *,
    source: str,
    cache_dir: Path | None,
    run_id: str,
    progress: ProgressFn | None = None,
) -> VersionConfig:
    """All stages in this process, in order (what one worker does in sequence)."""
    plan_run(
        run_dir,
        items,
        label_config,
        config,
        source=source,
        cache_dir=cache_dir,
        run_id=run_id,
        progress=progress,
    )
    for fold in range(config.n_folds):
        train_fold_stage(run_dir, fold, cache_dir=cache_dir, progress=progress)
    return finalize_run(run_dir, cache_dir=cache_dir, version=run_id)
