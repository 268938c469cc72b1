"""Learning curves: macro-F1 on a held-out split against the number of labelled images.

How much does each design learn from 40, 80, 160 or 320 labelled radiographs when every one
gets the same CPU time (issue 12, item 5)? Contenders:

* ``locate_classify``: the ``cpu`` profile's locate-then-classify design
  (:func:`training.fitting.two_stage.train_two_stage_fold`: frozen Lite0 locator + soft-argmax head
  at 384 px, Lite0 classifier on a 25 % crop at 160 px, prepared images at 768 px);
* ``whole384`` / ``whole512``: the ``cpu`` profile's whole-image fallback (Lite0 from ImageNet
  weights, :func:`training.fitting.recipe.train_fold`) at 384 and 512 px;
* ``lite0_scratch``: the same whole-image Lite0 at 384 px from random weights;
* ``resnet34_scratch``: the paper's recipe (ResNet-34) from random weights at 384 px, batch 16
  (no gradient accumulation: accumulated to 64, 40 labels would give one optimiser step every
  other epoch). torchvision's ImageNet file is not on the CPU machines, so there "paper" with
  ``pretrained=True`` would start from random weights as well.

Data: the synthetic generator's balanced set. A training pool (seed :data:`POOL_SEED`) and a
test split of fixed size (seed :data:`TEST_SEED`: other synthetic patients; any patient id
also in the pool is dropped from it) are generated once; the test split is never trained on.
Per seed, the labelled subsets are nested and class-stratified (the first 40 of a seeded,
class-interleaved order of the pool are in the first 80, ...); the seed also seeds the
training (initialisation, shuffling).

**One model per point**, trained on the labelled subset and scored on the test split: the
benchmark measures how a recipe learns, not the 5-fold ensemble a run publishes (whose
out-of-fold numbers come from 4/5 of the labels per model).

**Equal wall time**: every contender gets the same training budget (``--budget-s``) at each
(labels, seed) point. It is first trained for :data:`CALIBRATION_EPOCHS` epochs on that very
training set, timing the end of each epoch: the time between the last two is its epoch time,
the rest before the first is its fixed cost (building the model; for locate-then-classify the
whole locator stage). Then a fresh model trains ``epochs = max(1, (budget - fixed) // epoch
time)`` epochs. Calibrating at every point keeps the budget fair when the machine's load
changes during a run of hours; each contender also runs once, untimed, on a few images before
the first point (one-time costs of the process must not shrink its first budget). The
table's "train s" is the measured time to the end of the last epoch (it exceeds the budget
where even one epoch does); the JSON file also holds the calibration and scoring times.

Scoring: locate-then-classify gets the test split as its validation set: its out-of-fold step
scores it once, with crops at the *predicted* centres, as serving does. The whole-image
recipe (fastai) validates after every epoch, which on 96 test images would eat much of a
small training set's budget, so it validates on :data:`FASTAI_VAL_IMAGES` test images per
epoch and the test split is scored once at the end with
:func:`training.shared.inference.predict_logits`, the function ``train_fold`` scores its own
validation images with.

Results: a Markdown table (mean ± SD over seeds of macro-F1, accuracy, per-class recall,
training seconds and epochs) and a JSON file with every point (written after each one;
``--resume`` continues an interrupted run). ``--quick`` is a tiny smoke run (64 px images,
8 and 16 labels, one seed, two contenders, a 2 s budget) whose numbers mean nothing.

Not part of ``run_all`` (the defaults take most of a working day on 2 cores: 5 contenders ×
4 label counts × 3 seeds × (300 s budget + calibration)). Run it on its own, with a data
folder to keep the generated and prepared images between runs::

    .venv/bin/python -m benchmarks.bench_learning --data-dir ~/valve-id-learning \
        --markdown learning.md --json learning.json     # add --resume after an interruption
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import Table, add_common_arguments, emit, machine

__all__ = ["CONTENDERS", "Contender", "LearningOptions", "main", "run"]

TITLE = "Learning curves (macro-F1 on the held-out split)"
POOL_SEED = 12_005
"""Generator seed of the training pool."""
TEST_SEED = 12_105
"""Generator seed of the test split (other patients than the pool's)."""
CALIBRATION_EPOCHS = 2
"""Epochs of the timing run: the first includes warm-up, the second is the epoch time."""
FASTAI_VAL_IMAGES = 2
"""Test images the whole-image recipe validates on after every epoch (fastai needs some)."""
WARM_UP_IMAGES = 8
"""Training images of each contender's untimed warm-up run."""
RESULTS_FORMAT = 1
"""Version of the JSON results layout."""


@dataclass(frozen=True)
class Contender:
    """A recipe to train: a profile of :class:`training.fitting.config.RecipeConfig` plus
    overrides."""

    key: str
    profile: str
    overrides: tuple[tuple[str, Any], ...] = ()

    def config(self, seed: int, extra: Mapping[str, Any]) -> Any:
        from training.fitting.config import RecipeConfig

        values = {**dict(self.overrides), **extra, "seed": seed}
        return RecipeConfig.from_profile(self.profile, **values)


CONTENDERS: dict[str, Contender] = {
    c.key: c
    for c in (
        Contender("locate_classify", "cpu", (("design", "locate_classify"),)),
        Contender("whole384", "cpu", (("design", "whole_image"), ("image_size_px", 384))),
        Contender("whole512", "cpu", (("design", "whole_image"), ("image_size_px", 512))),
        Contender(
            "lite0_scratch",
            "cpu",
            (("design", "whole_image"), ("image_size_px", 384), ("pretrained", False)),
        ),
        Contender(
            "resnet34_scratch",
            "paper",
            (
                ("pretrained", False),
                ("image_size_px", 384),
                ("batch_size", 16),
                ("effective_batch_size", 16),
            ),
        ),
    )
}
"""Every contender, by the key ``--contenders`` takes."""


@dataclass(frozen=True)
class LearningOptions:
    labels: tuple[int, ...] = (40, 80, 160, 320)
    seeds: tuple[int, ...] = (0, 1, 2)
    budget_s: float = 300.0
    """Training wall time of every contender at every (labels, seed) point, seconds."""
    contenders: tuple[str, ...] = tuple(CONTENDERS)
    test_size: int = 96
    pool_size: int = 400
    """Images of the training pool: more than the largest label count, so that the seeds
    draw different training sets there too."""
    size_range_px: tuple[int, int] | None = None
    """Synthetic image sides; None = the generator's default (600–1200 px)."""
    overrides: tuple[tuple[str, Any], ...] = ()
    """Recipe settings applied to every contender (the quick run's tiny sizes)."""
    calibration_epochs: int = CALIBRATION_EPOCHS
    threads: int | None = None
    """torch intra-op threads while training (None: torch's default, one per core)."""
    device: str | None = None
    """None: CUDA when available, else the CPU (as the recipe picks)."""
    data_dir: Path | None = None
    """Where the pool, the test split and their prepared-image cache live (reused if there)."""
    json_path: Path | None = None
    resume: bool = False


QUICK = LearningOptions(
    labels=(8, 16),
    seeds=(0,),
    budget_s=2.0,
    contenders=("locate_classify", "whole384"),
    test_size=8,
    pool_size=16,
    size_range_px=(64, 96),
    overrides=(
        ("image_size_px", 64),
        ("locator_px", 64),
        ("crop_px", 32),
        ("locator_epochs", 5),
        ("batch_size", 8),
        ("effective_batch_size", 8),
    ),
    threads=1,
)


# --- data -----------------------------------------------------------------------------------


@dataclass
class _Split:
    """Prepared images of one split at one size, with labels and valve centres."""

    arrays: np.ndarray
    labels: np.ndarray
    centres: np.ndarray
    groups: list[str]


def _generate(folder: Path, n: int, seed: int, size_range_px: tuple[int, int] | None) -> None:
    """Generate the balanced set into ``folder`` once; refuse a folder made differently."""
    from training.synthetic import BALANCED_CLASS_MIX, generate_dataset

    meta_path = folder / "bench_learning.json"
    meta = {"n": n, "seed": seed, "size_range_px": list(size_range_px or [])}
    if (folder / "manifest.csv").exists():
        found = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if found != meta:
            raise SystemExit(
                f"{folder} holds a data set made with {found}, not {meta}: choose another "
                "--data-dir or the same --pool-size/--test-size"
            )
        return
    kwargs: dict[str, Any] = {"class_mix": BALANCED_CLASS_MIX}
    if size_range_px:
        kwargs["size_range_px"] = size_range_px
    started = time.perf_counter()
    generate_dataset(folder, n, seed=seed, **kwargs)
    meta_path.write_text(json.dumps(meta))
    _say(f"generated {n} images (seed {seed}) in {time.perf_counter() - started:.0f} s")


class _Data:
    """The pool and the test split, prepared once per image size."""

    def __init__(self, root: Path, options: LearningOptions) -> None:
        from training.shared.dataset import load_manifest
        from training.synthetic import VALVE_CLASSES

        _generate(root / "pool", options.pool_size, POOL_SEED, options.size_range_px)
        _generate(root / "test", options.test_size, TEST_SEED, options.size_range_px)
        self.classes = list(VALVE_CLASSES)
        self.cache = root / "cache"
        self.pool_items = load_manifest(root / "pool", self.classes)
        test_items = load_manifest(root / "test", self.classes)
        pool_groups = {item.group for item in self.pool_items}
        self.test_items = [item for item in test_items if item.group not in pool_groups]
        self.dropped = len(test_items) - len(self.test_items)
        self._prepared: dict[int, tuple[_Split, _Split]] = {}

    def at(self, size_px: int) -> tuple[_Split, _Split]:
        if size_px not in self._prepared:
            from training.shared.dataset import prepare_images
            from training.shared.preprocess import PreprocessParams

            started = time.perf_counter()
            splits = []
            for items in (self.pool_items, self.test_items):
                prepared = prepare_images(items, PreprocessParams(size_px=size_px), self.cache)
                if prepared.failures:
                    raise RuntimeError(f"undecodable synthetic images: {prepared.failures}")
                splits.append(
                    _Split(
                        prepared.arrays,
                        np.array([self.classes.index(it.label) for it in prepared.items]),
                        prepared.centres,
                        [it.group for it in prepared.items],
                    )
                )
            self._prepared[size_px] = (splits[0], splits[1])
            _say(f"prepared {size_px}² images in {time.perf_counter() - started:.0f} s")
        return self._prepared[size_px]


def labelled_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Pool indices in a seeded order whose every prefix is class-stratified (round robin
    over the classes, each class shuffled): the first ``n`` are the labelled set of size n."""
    rng = np.random.default_rng([seed, 12])
    per_class = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
    order = []
    for i in range(max(len(p) for p in per_class)):
        order += [p[i] for p in per_class if i < len(p)]
    return np.array(order, dtype=np.int64)


# --- one training ---------------------------------------------------------------------------


@dataclass
class _Trained:
    epoch_ends_s: list[float]
    """Seconds from the call to the end of each epoch."""
    total_s: float
    logits: np.ndarray | None
    init: str


def _train(
    config: Any,
    images: np.ndarray,
    labels: np.ndarray,
    centres: np.ndarray,
    n_train: int,
    num_classes: int,
    device: Any,
    *,
    score: bool,
) -> _Trained:
    """Train ``config`` on the first ``n_train`` images; with ``score``, logits of the rest."""
    from training.shared.inference import predict_logits

    config = _clear_of_four_steps(config, n_train)
    train_idx = np.arange(n_train)
    test_idx = np.arange(n_train, len(images))
    stamps: list[float] = []
    started = time.perf_counter()

    def progress(_row: dict[str, Any]) -> None:
        stamps.append(time.perf_counter() - started)

    logits = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn on 2-image validation sets, torch.jit notes
        if config.design == "locate_classify":
            from training.fitting.two_stage import train_two_stage_fold

            val_idx = test_idx if score else test_idx[:FASTAI_VAL_IMAGES]
            result = train_two_stage_fold(
                images,
                labels,
                centres,
                train_idx,
                val_idx,
                num_classes,
                config,
                device=device,
                progress=progress,
            )
            logits = result.val_logits if score else None
        else:
            from training.fitting.recipe import train_fold

            result = train_fold(
                images,
                labels,
                train_idx,
                test_idx[:FASTAI_VAL_IMAGES],
                num_classes,
                config,
                device=device,
                progress=progress,
            )
            if score:
                logits = predict_logits(
                    result.model.to(device),
                    images[test_idx],
                    config.preprocess_params(),
                    device=device,
                    batch_size=config.batch_size,
                    mixed_precision=config.mixed_precision,
                    channels_last=config.channels_last,
                )
    return _Trained(stamps, time.perf_counter() - started, logits, result.init.init)


def _clear_of_four_steps(config: Any, n_train: int) -> Any:
    """One more epoch where locate→classify would take exactly 4 optimiser steps.

    ``train_two_stage_fold``'s ``OneCycleLR(pct_start=0.25)`` then has a warm-up phase of
    length 0 and torch divides by zero; it happens only with tiny sets and epoch counts
    (the quick run; a full run's 40 labels make 3 steps per epoch).
    """
    if config.design != "locate_classify":
        return config
    if config.epochs * math.ceil(n_train / config.batch_size) != 4:
        return config
    return config.with_overrides(epochs=config.epochs + 1)


def plan_epochs(epoch_ends_s: Sequence[float], budget_s: float) -> tuple[int, float, float]:
    """``(epochs, epoch_s, fixed_s)`` for ``budget_s`` from a calibration run's epoch ends.

    Epoch time: between the last two ends (one epoch only: all of its time). Fixed cost:
    what the first end leaves when one epoch time is taken off it.
    """
    if not epoch_ends_s:
        raise ValueError("the calibration run reported no epoch")
    if len(epoch_ends_s) >= 2:
        epoch_s = epoch_ends_s[-1] - epoch_ends_s[-2]
        fixed_s = max(0.0, epoch_ends_s[0] - epoch_s)
    else:
        epoch_s, fixed_s = epoch_ends_s[0], 0.0
    epoch_s = max(epoch_s, 1e-3)
    return max(1, int((budget_s - fixed_s) // epoch_s)), epoch_s, fixed_s


def _scores(y: np.ndarray, logits: np.ndarray, num_classes: int) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    pred = logits.argmax(axis=1)
    k = list(range(num_classes))
    return {
        "f1_macro": float(f1_score(y, pred, labels=k, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y, pred)),
        "recall": [
            float(r) for r in recall_score(y, pred, labels=k, average=None, zero_division=0)
        ],
    }


def run_point(
    contender: Contender,
    n_labels: int,
    seed: int,
    data: _Data,
    options: LearningOptions,
    device: Any,
) -> dict[str, Any]:
    """Calibrate, train and score one contender at one (labels, seed) point; its record."""
    from training.shared.inference import precision_name

    config = contender.config(seed, dict(options.overrides))
    pool, test = data.at(config.image_size_px)
    chosen = labelled_order(pool.labels, seed)[:n_labels]
    images = np.concatenate([pool.arrays[chosen], test.arrays])
    labels = np.concatenate([pool.labels[chosen], test.labels])
    centres = np.concatenate([pool.centres[chosen], test.centres])
    k = len(data.classes)

    calibration = config.with_overrides(
        epochs=options.calibration_epochs, epochs_from_scratch=options.calibration_epochs
    )
    timing = _train(calibration, images, labels, centres, n_labels, k, device, score=False)
    epochs, epoch_s, fixed_s = plan_epochs(timing.epoch_ends_s, options.budget_s)

    config = config.with_overrides(epochs=epochs, epochs_from_scratch=epochs)
    trained = _train(config, images, labels, centres, n_labels, k, device, score=True)
    assert trained.logits is not None
    epochs = len(trained.epoch_ends_s)
    return {
        "contender": contender.key,
        "description": describe(config),
        "labels": n_labels,
        "seed": seed,
        "epochs": epochs,
        "epoch_s": round(epoch_s, 3),
        "fixed_s": round(fixed_s, 3),
        "calibration_s": round(timing.total_s, 3),
        "train_s": round(trained.epoch_ends_s[-1], 3),
        "total_s": round(trained.total_s, 3),
        "init": trained.init,
        "precision": precision_name(device, config.mixed_precision),
        # Per point: a --resume run may continue on another machine or day.
        "machine": machine(),
        "n_test": len(test.labels),
        **_scores(test.labels, trained.logits, k),
    }


def warm_up(contender: Contender, data: _Data, options: LearningOptions, device: Any) -> None:
    """One epoch on a few images, untimed: the process's first call of a recipe pays one-time
    costs (lazy imports, kernel selection, weight files) that must not shrink its first
    budget."""
    config = contender.config(0, dict(options.overrides)).with_overrides(
        epochs=1, epochs_from_scratch=1
    )
    pool, test = data.at(config.image_size_px)
    chosen = labelled_order(pool.labels, 0)[:WARM_UP_IMAGES]
    images = np.concatenate([pool.arrays[chosen], test.arrays[:FASTAI_VAL_IMAGES]])
    labels = np.concatenate([pool.labels[chosen], test.labels[:FASTAI_VAL_IMAGES]])
    centres = np.concatenate([pool.centres[chosen], test.centres[:FASTAI_VAL_IMAGES]])
    _train(config, images, labels, centres, len(chosen), len(data.classes), device, score=False)


def describe(config: Any) -> str:
    """A contender's row label from its effective recipe."""
    name = {"efficientnet_lite0": "Lite0", "resnet34": "ResNet-34"}.get(config.arch, config.arch)
    init = "ImageNet" if config.pretrained else "from scratch"
    if config.design == "locate_classify":
        return (
            f"{name} locate→classify ({config.image_size_px}², locator {config.locator_px}², "
            f"crop {config.crop_px}²), {init}"
        )
    return f"{name} whole image {config.image_size_px}², {init}, batch {config.batch_size}"


# --- the run --------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _options_fingerprint(options: LearningOptions) -> dict[str, Any]:
    """What must match for ``--resume`` to continue a results file."""
    return {
        "budget_s": options.budget_s,
        "test_size": options.test_size,
        "pool_size": options.pool_size,
        "size_range_px": list(options.size_range_px or []),
        "overrides": [list(o) for o in options.overrides],
        "calibration_epochs": options.calibration_epochs,
    }


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
    os.replace(tmp, path)


def _load_previous(options: LearningOptions) -> list[dict[str, Any]]:
    if not (options.resume and options.json_path and options.json_path.exists()):
        return []
    previous = json.loads(options.json_path.read_text(encoding="utf-8"))
    if previous.get("options") != _options_fingerprint(options):
        raise SystemExit(
            f"--resume: {options.json_path} was made with {previous.get('options')}, "
            f"not {_options_fingerprint(options)}"
        )
    return list(previous.get("records", []))


def run(options: LearningOptions, workdir: Path) -> list[Table]:
    import torch

    from training.fitting.recipe import pick_device

    unknown = set(options.contenders) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"unknown contender(s) {sorted(unknown)}; choose from {list(CONTENDERS)}")
    if max(options.labels) > options.pool_size:
        raise SystemExit(f"--labels up to {max(options.labels)} need --pool-size ≥ that")
    device = torch.device(options.device) if options.device else pick_device()
    data = _Data(options.data_dir or workdir / "data", options)
    records = _load_previous(options)
    done = {(r["contender"], r["labels"], r["seed"]) for r in records}
    header = {
        "format": RESULTS_FORMAT,
        "machine": machine(),
        "options": _options_fingerprint(options),
        "classes": data.classes,
        "pool_seed": POOL_SEED,
        "test_seed": TEST_SEED,
        "test_images": len(data.test_items),
        "test_dropped_shared_patients": data.dropped,
    }
    with _torch_threads(options.threads):
        todo = [
            key
            for key in options.contenders
            if any((key, n, s) not in done for n in options.labels for s in options.seeds)
        ]
        for key in todo:
            started = time.perf_counter()
            warm_up(CONTENDERS[key], data, options, device)
            _say(f"{key}: warmed up in {time.perf_counter() - started:.0f} s")
        for seed in options.seeds:
            for n_labels in options.labels:
                # All contenders of a point back to back: a busy spell slows them alike.
                for key in options.contenders:
                    if (key, n_labels, seed) in done:
                        continue
                    record = run_point(CONTENDERS[key], n_labels, seed, data, options, device)
                    records.append(record)
                    _say(
                        f"{key}, {n_labels} labels, seed {seed}: {record['epochs']} epochs "
                        f"({record['epoch_s']:.1f} s each + {record['fixed_s']:.1f} s fixed), "
                        f"train {record['train_s']:.0f} s, macro-F1 {record['f1_macro']:.3f}"
                    )
                    if options.json_path is not None:
                        _write_json(options.json_path, {**header, "records": records})
    if options.json_path is not None:
        _write_json(options.json_path, {**header, "records": records})
    return [learning_table(records, data.classes, options, header)]


def _mean_sd(values: Sequence[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _epochs(values: Sequence[int]) -> str:
    """Mean ± SD of the epochs trained, with their range (whole numbers when they agree)."""
    low, high = min(values), max(values)
    if low == high:
        return str(low)
    return f"{_mean_sd(values, 1)} ({low}–{high})"


def learning_table(
    records: Sequence[dict[str, Any]],
    classes: Sequence[str],
    options: LearningOptions,
    header: Mapping[str, Any],
) -> Table:
    table = Table(
        TITLE,
        [
            "contender",
            "labels",
            "precision",
            "macro-F1",
            "accuracy",
            *(f"recall {c}" for c in classes),
            "train s",
            "epochs",
        ],
    )
    for key in options.contenders:
        for n_labels in options.labels:
            rows = [
                r
                for r in records
                if r["contender"] == key and r["labels"] == n_labels and r["seed"] in options.seeds
            ]
            if not rows:
                continue
            recalls = [[r["recall"][c] for r in rows] for c in range(len(classes))]
            table.add_row(
                rows[0]["description"],
                n_labels,
                # Records older than the field: bf16 autocast where the CPU had bf16 units.
                " / ".join(sorted({r.get("precision", "not recorded") for r in rows})),
                _mean_sd([r["f1_macro"] for r in rows], 3),
                _mean_sd([r["accuracy"] for r in rows], 3),
                *(_mean_sd(values, 2) for values in recalls),
                _mean_sd([r["train_s"] for r in rows], 0),
                _epochs([r["epochs"] for r in rows]),
            )
    seeds = ", ".join(map(str, options.seeds))
    table.notes.append(
        f"Synthetic balanced set: labelled subsets of a {options.pool_size}-image pool "
        f"(seed {POOL_SEED}), nested and class-stratified per seed; test split "
        f"{header['test_images']} images of other patients (seed {TEST_SEED}), never trained "
        f"on. Mean ± SD over seeds {seeds} (subset and initialisation)."
    )
    table.notes.append(
        f"Equal wall time: {options.budget_s:g} s of training per point. Each contender first "
        f"trains {options.calibration_epochs} epochs on that training set; epoch time = "
        "between the last two epoch ends, fixed cost = the rest (the locator stage, building "
        "the model); epochs = max(1, (budget - fixed) // epoch time). 'train s' = measured "
        "time to the end of the last epoch."
    )
    table.notes.append(
        "One model per point on the labelled subset, not the 5-fold ensemble a run publishes. "
        "Locate→classify is scored at its predicted centres (as served); whole-image models "
        f"validate on {FASTAI_VAL_IMAGES} test images per epoch and score the split once at "
        "the end."
    )
    return table


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_common_arguments(parser)
    parser.add_argument("--labels", type=_ints, default=None, help="e.g. 40,80,160,320")
    parser.add_argument("--seeds", type=_ints, default=None, help="e.g. 0,1,2")
    parser.add_argument("--budget-s", type=float, default=None, help="training s per point")
    parser.add_argument(
        "--contenders", default=None, help=f"comma-separated subset of {','.join(CONTENDERS)}"
    )
    parser.add_argument("--test-size", type=int, default=None, help="held-out images")
    parser.add_argument("--pool-size", type=int, default=None, help="images to draw labels from")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="generate here once, reuse afterwards"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="results file (default: beside --markdown, else ./bench_learning.json)",
    )
    parser.add_argument("--resume", action="store_true", help="skip points already in --json")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: what exists)")
    parser.add_argument("--calibration-epochs", type=int, default=None)
    args = parser.parse_args(argv)
    options = QUICK if args.quick else LearningOptions()
    changes: dict[str, Any] = {}
    for name in ("labels", "seeds", "budget_s", "test_size", "pool_size", "data_dir"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    for name in ("threads", "device", "calibration_epochs"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    if args.contenders:
        changes["contenders"] = tuple(c.strip() for c in args.contenders.split(",") if c.strip())
    if "labels" in changes and "pool_size" not in changes:
        changes["pool_size"] = max(options.pool_size, max(changes["labels"]))
    if args.calibration_epochs is not None and args.calibration_epochs < 1:
        parser.error("--calibration-epochs must be at least 1")
    json_path = args.json
    if json_path is None:
        json_path = (
            args.markdown.with_suffix(".learning.json")
            if args.markdown is not None
            else Path("bench_learning.json")
        )
    options = replace(options, json_path=json_path, resume=args.resume, **changes)
    with tempfile.TemporaryDirectory(prefix="valve-id-bench-") as tmp:
        tables = run(options, Path(tmp))
    emit(tables, args.markdown)
    _say(f"results: {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
