"""The pool-based simulation: hold out a test split, start from a seed set, then rounds of
train → score the pool → reveal the top-k → train again, until the label budget is spent.

Every round trains with the recipe's own :func:`training.fitting.recipe.train_fold` and scores with
:func:`training.shared.inference.predict_logits`, so the simulated queue is built from the same
network, the same preprocessing and the same acquisition code as the served one. How the
pieces are fixed, and why:

* **Test split**: one patient-grouped, stratified fold (``StratifiedGroupKFold``, about
  ``test_fraction`` of the images) chosen from ``config.seed``; the same for every strategy
  and replicate, so the curves differ only by what was labelled. No strategy sees it: it is
  never trained on, never scored for a selection, never a training run's validation split.
* **Seed set** per replicate: stratified by class, whole patients first (a quota per class,
  largest remainder), topped up image by image when patients with several images do not fit
  exactly, so that every curve starts at ``seed_size`` labels. All strategies of a replicate
  start from the same seed set, and its round-0 model is trained once and shared.
* **Training seeds** depend on (seed, replicate, round), not on the strategy: two strategies
  that labelled the same images get the same model (common random numbers), so the
  difference between curves is the selection, not the training noise.
* **Validation split**: ``train_fold`` monitors a validation split each epoch; it gets the
  first :data:`MONITOR_IMAGES` *labelled* images (monitoring only: the one-cycle schedule
  never reads it), never test images.
* **Uncertainty for BALD**: with ``members >= 2`` every round trains an ensemble (different
  seeds, same labels: the served fold ensemble's analogue) and ``probs`` is its mean; with
  one member, BALD's members are ``mc_passes`` MC-dropout passes of the head (Gal &
  Ghahramani 2016) over the deterministic body features, ``probs`` the deterministic output.
* **Features** for the batch-aware strategies are the head's 512-d penultimate activations
  (the last linear layer's input) of the first member.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn

from training.fitting.sources import load_items
from training.shared.dataset import LabelledImage, PreparedImages, prepare_images
from training.shared.errors import DatasetError
from training.shared.locate_classify import DESIGN as LOCATE_CLASSIFY
from training.shared.locate_classify import LocateClassifyNet
from training.shared.model import ValveNet
from training.shared.uncertainty import ACQUISITIONS, softmax
from training.simulation.config import SimulationConfig
from training.simulation.strategies import get_strategy

__all__ = [
    "CONFIG_FILE",
    "MONITOR_IMAGES",
    "REPORT_FILE",
    "RESULTS_FILE",
    "RoundScores",
    "SimulationData",
    "draw_seed_set",
    "error_detection_auroc",
    "evaluate_round",
    "held_out_split",
    "load_simulation_config",
    "run_simulation",
    "simulate",
    "snapshot_of",
]

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
RESULTS_FORMAT = 1
"""Version of the ``config.json`` / ``results.json`` layout."""
MONITOR_IMAGES = 8
"""Labelled images handed to ``train_fold`` as its (monitoring-only) validation split."""
SCORE_BATCH_SIZE = 64
"""Images per forward pass when scoring the whole data set after a round."""

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class SimulationData:
    """A fully labelled snapshot, prepared once: arrays, label ids, patients, ids, hashes."""

    arrays: np.ndarray
    """``(N, size, size)`` prepared images in [0, 1]
    (:func:`training.shared.preprocess.prepare_image`)."""
    labels: np.ndarray
    """``(N,)`` class ids, indices into ``classes``."""
    groups: np.ndarray
    """``(N,)`` patient ids (kept in memory only; written out as pseudonyms)."""
    keys: tuple[str, ...]
    """Item ids (manifest file entry or Label Studio task id): what results name."""
    classes: tuple[str, ...]
    hashes: tuple[str, ...] = ()
    """Content hash of each image file ('' when built from arrays directly)."""
    centres: np.ndarray | None = None
    """``(N, 2)`` valve centres as fractions of the prepared image, NaN where none was
    annotated (:attr:`training.shared.dataset.PreparedImages.centres`); ``None``: none at all."""

    def __post_init__(self) -> None:
        if self.centres is None:
            object.__setattr__(
                self, "centres", np.full((len(self.labels), 2), np.nan, dtype=np.float32)
            )

    @property
    def located(self) -> int:
        """Images with an annotated valve centre."""
        assert self.centres is not None
        return int((~np.isnan(self.centres).any(axis=1)).sum())

    @classmethod
    def from_prepared(cls, prepared: PreparedImages, classes: Sequence[str]) -> SimulationData:
        """The classes that have images, in vocabulary order (like a training run)."""
        present = {item.label for item in prepared.items}
        kept = tuple(c for c in classes if c in present)
        if len(kept) < 2:
            raise DatasetError(f"a simulation needs at least two classes; found {sorted(present)}")
        return cls(
            arrays=prepared.arrays,
            labels=np.array([kept.index(it.label) for it in prepared.items], dtype=np.int64),
            groups=np.array([it.group for it in prepared.items]),
            keys=tuple(it.key for it in prepared.items),
            classes=kept,
            hashes=tuple(prepared.hashes),
            centres=prepared.centres,
        )


@dataclass(frozen=True)
class RoundScores:
    """One round's model(s) applied to every image of the snapshot."""

    probs: np.ndarray
    """``(N, K)`` softmax: the ensemble mean, or the single model's deterministic output."""
    member_probs: np.ndarray | None
    """``(m, N, K)``: ensemble members, or MC-dropout passes when there is one member;
    ``None`` with one member and no MC passes (then nothing measures disagreement)."""
    features: np.ndarray
    """``(N, d)`` penultimate activations of the first member."""


# --- splits -----------------------------------------------------------------------------


def held_out_split(
    labels: np.ndarray, groups: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(candidates, test)`` positions: one stratified, patient-grouped fold held out."""
    n_splits = max(2, round(1.0 / test_fraction))
    n_groups = len(set(np.asarray(groups).tolist()))
    if n_groups < n_splits:
        raise DatasetError(
            f"{n_groups} patients cannot give a patient-grouped test split of "
            f"{test_fraction:.0%}; use more patients"
        )
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    candidates, test = next(splitter.split(np.zeros(len(labels)), labels, groups))
    return np.sort(candidates), np.sort(test)


def _quota(counts: np.ndarray, size: int) -> np.ndarray:
    """Largest-remainder allocation of ``size`` over classes by ``counts``, each at least 1
    when ``size`` allows (a class missing from the seed set cannot be predicted at all)."""
    present = counts > 0
    quota = np.zeros_like(counts)
    if size >= present.sum():
        quota[present] = 1
    rest = size - quota.sum()
    share = counts / counts.sum() * rest
    quota += np.floor(share).astype(counts.dtype)
    order = np.argsort(-(share - np.floor(share)), kind="stable")
    for c in order[: size - quota.sum()]:
        quota[c] += 1
    return np.minimum(quota, counts)


def draw_seed_set(
    labels: np.ndarray,
    groups: np.ndarray,
    candidates: np.ndarray,
    size: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """A stratified initial labelled set of ``size`` positions from ``candidates``.

    Whole patients are taken in random order while they fit the per-class quota; the set is
    then topped up image by image (still within the quota first) to exactly ``size``.
    """
    candidates = np.asarray(candidates)
    size = min(size, len(candidates))
    y = labels[candidates]
    quota = _quota(np.bincount(y, minlength=int(labels.max()) + 1), size)
    have = np.zeros_like(quota)
    chosen: list[int] = []
    patients = np.unique(groups[candidates])
    for patient in rng.permutation(patients):
        members = candidates[groups[candidates] == patient]
        add = np.bincount(labels[members], minlength=len(quota))
        if len(chosen) + len(members) <= size and np.all(have + add <= quota):
            chosen.extend(members.tolist())
            have += add
        if len(chosen) == size:
            break
    taken = set(chosen)
    for position in rng.permutation(candidates):  # top-up: quota first, then anything
        if len(chosen) == size:
            break
        if position not in taken and have[labels[position]] < quota[labels[position]]:
            chosen.append(int(position))
            taken.add(int(position))
            have[labels[position]] += 1
    for position in rng.permutation(candidates):
        if len(chosen) == size:
            break
        if position not in taken:
            chosen.append(int(position))
            taken.add(int(position))
    return np.sort(np.asarray(chosen, dtype=np.int64))


# --- one round: train, then score everything --------------------------------------------


class _ScoringNet(nn.Module):
    """One forward pass → ``[logits | penultimate features | MC-dropout logits ...]``.

    Wraps a trained network — a :class:`training.shared.model.ValveNet`, or a
    :class:`training.shared.locate_classify.LocateClassifyNet` whose classifier sees the crop
    around the
    *predicted* centre, as served — so that :func:`training.shared.inference.predict_logits` (which
    puts the model in eval mode) returns everything a strategy needs; the classifier head's
    dropout layers are switched on only for the MC passes, over body features computed once.
    It scores the crop as is, one view: the served version's averaged test views
    (:attr:`training.shared.locate_classify.TwoStageParams.test_views`) are left out here, where
    only the strategies' relative order matters and every strategy is scored alike.
    """

    def __init__(self, model: ValveNet | LocateClassifyNet, mc_passes: int) -> None:
        super().__init__()
        self.model, self.mc_passes = model, mc_passes
        self.classifier = model.classifier if isinstance(model, LocateClassifyNet) else model
        self.dropouts = [m for m in self.classifier.head if isinstance(m, nn.Dropout)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, LocateClassifyNet):
            x = self.model.crop(x, self.model.locate(x))
        body = self.classifier.body(x)
        head = self.classifier.head
        features = head[:-1](body)  # eval mode: dropout is the identity
        outputs = [head[-1](features), features]
        if self.mc_passes:
            for layer in self.dropouts:
                layer.train()
            try:
                outputs.extend(head(body) for _ in range(self.mc_passes))
            finally:
                for layer in self.dropouts:
                    layer.eval()
        return torch.cat([o.float() for o in outputs], dim=1)


def _training_seed(base: int, replicate: int, round_: int) -> int:
    """A training seed from (base, replicate, round), independent of the strategy."""
    return int(np.random.SeedSequence([base, replicate, round_]).generate_state(1)[0])


def _fit_and_score(
    data: SimulationData, labelled: np.ndarray, config: SimulationConfig, seed: int
) -> tuple[RoundScores, dict[str, Any]]:
    """Train ``config.members`` models on ``labelled``; score every image with them.

    ``config.recipe.design`` is settled (:func:`run_simulation`): the whole-image recipe, or
    locate-then-classify trained on the labelled images' valve centres (revealed with their
    labels, as an annotator places the keypoint with the class).
    """
    from training.fitting.recipe import (  # fastai: only when training
        FoldResult,
        pick_device,
        train_fold,
    )
    from training.fitting.two_stage import TwoStageFoldResult, train_two_stage_fold
    from training.shared.inference import predict_logits

    device = pick_device()
    recipe = config.recipe.with_overrides(seed=seed)
    params = recipe.preprocess_params()
    k = len(data.classes)
    labelled = np.sort(labelled)
    monitor = labelled[:MONITOR_IMAGES]
    mc_passes = config.mc_passes if config.members == 1 else 0
    member_logits, features, mc_logits, init = [], None, None, None
    for member in range(config.members):
        result: FoldResult | TwoStageFoldResult
        if recipe.design == LOCATE_CLASSIFY:
            assert data.centres is not None  # __post_init__ fills it
            result = train_two_stage_fold(
                data.arrays,
                data.labels,
                data.centres,
                labelled,
                monitor,
                k,
                recipe,
                fold=member,
                device=device,
            )
        else:
            result = train_fold(
                data.arrays, data.labels, labelled, monitor, k, recipe, fold=member, device=device
            )
        init = init or result.init.to_dict()
        net = _ScoringNet(result.model.to(device), mc_passes)
        torch.manual_seed(seed + member)  # MC-dropout masks are reproducible too
        out = predict_logits(
            net,
            data.arrays,
            params,
            device=device,
            batch_size=SCORE_BATCH_SIZE,
            mixed_precision=recipe.mixed_precision,
            channels_last=recipe.channels_last,
        )
        last = net.classifier.head[-1]
        assert isinstance(last, nn.Linear)  # make_head ends with the classes' Linear
        d = last.in_features
        member_logits.append(out[:, :k])
        if features is None:
            features = out[:, k : k + d]
            if mc_passes:
                mc_logits = out[:, k + d :].reshape(len(out), mc_passes, k).transpose(1, 0, 2)
    logits = np.stack(member_logits)
    member_probs: np.ndarray | None
    if config.members >= 2:
        member_probs = softmax(logits)
        probs = member_probs.mean(axis=0)
    else:
        probs = softmax(logits[0])
        member_probs = softmax(mc_logits) if mc_logits is not None else None
    assert features is not None and init is not None
    return RoundScores(probs, member_probs, np.asarray(features, dtype=np.float32)), init


# --- evaluation -------------------------------------------------------------------------


def evaluate_round(y_true: np.ndarray, probs: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Macro-F1 (over classes present in the test split), accuracy, recall per class id."""
    pred = probs.argmax(axis=1)
    present = np.unique(y_true)
    recall: list[float | None] = []
    for c in range(num_classes):
        mask = y_true == c
        recall.append(float((pred[mask] == c).mean()) if mask.any() else None)
    return {
        "macro_f1": float(f1_score(y_true, pred, labels=present, average="macro", zero_division=0)),
        "accuracy": float((pred == y_true).mean()),
        "recall": recall,
    }


def error_detection_auroc(
    y_true: np.ndarray, probs: np.ndarray, member_probs: np.ndarray | None
) -> dict[str, float | None]:
    """AUROC of each served acquisition's uncertainty for flagging wrong predictions
    (``None`` when undefined: no errors, only errors, or BALD without members)."""
    wrong = probs.argmax(axis=1) != y_true
    defined = 0 < wrong.sum() < wrong.size
    auroc: dict[str, float | None] = {}
    for name, acquisition in ACQUISITIONS.items():
        needs_members = name == "bald"
        if not defined or (needs_members and member_probs is None):
            auroc[name] = None
        else:
            auroc[name] = float(roc_auc_score(wrong, acquisition(probs, member_probs)))
    return auroc


def _members_at(scores: RoundScores, idx: np.ndarray) -> np.ndarray | None:
    return None if scores.member_probs is None else scores.member_probs[:, idx]


# --- the loop ---------------------------------------------------------------------------


def _strategy_rng(base: int, replicate: int, name: str) -> np.random.Generator:
    """A strategy's own generator: adding a strategy never changes another one's picks."""
    return np.random.default_rng([base, replicate, zlib.crc32(name.encode("utf-8"))])


def run_simulation(
    data: SimulationData, config: SimulationConfig, *, progress: ProgressFn | None = None
) -> dict[str, Any]:
    """Run every strategy for every replicate; return the per-round records and the split.

    ``runs[strategy][replicate]["rounds"]`` lists, per round, the labels spent, the test
    metrics and the keys revealed in that round; ``final_auroc`` is the error-detection
    AUROC of each acquisition from the last round's model on the test split.
    """
    k = len(data.classes)
    recipe = config.recipe.for_snapshot(data.located, len(data.labels))
    if recipe.design != config.recipe.design:
        logger.info(
            "simulation: %s design (%d of %d images have a valve centre)",
            recipe.design,
            data.located,
            len(data.labels),
        )
        config = config.with_overrides(recipe=recipe)
    candidates, test = held_out_split(data.labels, data.groups, config.test_fraction, config.seed)
    y_test = data.labels[test]
    if len(candidates) < config.budget:
        raise DatasetError(
            f"the budget ({config.budget} labels) exceeds the {len(candidates)} images outside "
            "the test split; lower --budget or use more data"
        )
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in config.strategies}
    init: dict[str, Any] | None = None
    started = time.monotonic()

    def record(
        labelled: np.ndarray, scores: RoundScores, picked: np.ndarray, round_: int
    ) -> dict[str, Any]:
        return {
            "round": round_,
            "n_labels": int(len(labelled)),
            **evaluate_round(y_test, scores.probs[test], k),
            "labelled_class_counts": np.bincount(data.labels[labelled], minlength=k).tolist(),
            "picked": [data.keys[i] for i in picked],
        }

    def report(**row: Any) -> None:
        row["elapsed_s"] = round(time.monotonic() - started, 1)
        logger.info("simulation %s", row)
        if progress is not None:
            progress(row)

    for replicate in range(config.seeds):
        seed_rng = np.random.default_rng([config.seed, replicate])
        seed_set = draw_seed_set(data.labels, data.groups, candidates, config.seed_size, seed_rng)
        first, init = _fit_and_score(
            data, seed_set, config, _training_seed(config.seed, replicate, 0)
        )
        for name in config.strategies:
            select = get_strategy(name)
            rng = _strategy_rng(config.seed, replicate, name)
            labelled, scores = seed_set, first
            rounds = [record(labelled, scores, np.zeros(0, dtype=np.int64), 0)]
            report(strategy=name, seed=replicate, round=0, **_brief(rounds[-1]))
            for round_ in range(1, config.rounds + 1):
                pool = np.setdiff1d(candidates, labelled)
                take = min(config.batch_size, config.budget - len(labelled), len(pool))
                picks = select(
                    scores.probs[pool],
                    _members_at(scores, pool),
                    scores.features[pool],
                    take,
                    rng,
                    labelled_features=scores.features[labelled],
                )
                if len(np.unique(picks)) != take:
                    raise RuntimeError(f"strategy {name!r} returned {picks}, not {take} distinct")
                chosen = pool[picks]
                labelled = np.sort(np.concatenate([labelled, chosen]))
                seed = _training_seed(config.seed, replicate, round_)
                scores, _ = _fit_and_score(data, labelled, config, seed)
                rounds.append(record(labelled, scores, chosen, round_))
                report(strategy=name, seed=replicate, round=round_, **_brief(rounds[-1]))
            runs[name].append(
                {
                    "replicate": replicate,
                    "seed_set": [data.keys[i] for i in seed_set],
                    "rounds": rounds,
                    "final_auroc": error_detection_auroc(
                        y_test, scores.probs[test], _members_at(scores, test)
                    ),
                }
            )
    return {
        "classes": list(data.classes),
        "n_images": len(data.labels),
        "test": {
            "n": int(len(test)),
            "class_counts": np.bincount(y_test, minlength=k).tolist(),
            "keys": [data.keys[i] for i in test],
        },
        "init": init,
        "design": config.recipe.design,
        "runs": runs,
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    return {"n_labels": row["n_labels"], "macro_f1": round(row["macro_f1"], 3)}


# --- the whole command: data → config.json, results.json, report.html -------------------


def _pseudonym(group: str) -> str:
    return hashlib.sha256(group.encode("utf-8")).hexdigest()[:16]


def snapshot_of(items: Sequence[LabelledImage], hashes: Sequence[str]) -> dict[str, Any]:
    """The data a simulation ran on, by content: per item key, label, pseudonymous patient
    and sha256, plus one digest over all of it (what a rerun checks first)."""
    rows = [
        {"key": it.key, "label": it.label, "group": _pseudonym(it.group), "sha256": h}
        for it, h in zip(items, hashes, strict=True)
    ]
    digest = hashlib.sha256()
    for row in rows:
        digest.update("\t".join(row.values()).encode("utf-8") + b"\n")
    return {"n_images": len(rows), "sha256": digest.hexdigest(), "items": rows}


def load_simulation_config(path: str | Path) -> tuple[SimulationConfig, dict[str, Any]]:
    """A saved ``config.json``: the configuration and the data snapshot it ran on."""
    import json

    saved = json.loads(Path(path).read_text(encoding="utf-8"))
    if saved.get("format") != RESULTS_FORMAT or "simulation" not in saved:
        raise DatasetError(f"{path} is not a valve-id simulation config.json")
    return SimulationConfig.from_dict(saved["simulation"]), saved["data_snapshot"]


def simulate(
    config: SimulationConfig,
    out_dir: str | Path,
    *,
    classes: Sequence[str],
    cache_dir: str | Path | None,
    download_dir: str | Path,
    image_key: str = "image",
    choices_name: str | None = None,
    expected_snapshot: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> Path:
    """Load ``config.data``, run the simulation, write ``config.json``, ``results.json`` and
    ``report.html`` into ``out_dir``; return the report's path.

    ``expected_snapshot`` (from a saved ``config.json``) makes a rerun refuse data that
    changed since: same configuration + same data = same selections and curves (on a CPU).
    """
    from training.fitting.run import write_json
    from training.simulation.analysis import summarize
    from training.simulation.report import write_simulation_report

    out = Path(out_dir)
    items = load_items(
        config.data, classes, Path(download_dir), image_key=image_key, choices_name=choices_name
    )
    prepared = prepare_images(items, config.recipe.preprocess_params(), cache_dir)
    snapshot = snapshot_of(prepared.items, prepared.hashes)
    if expected_snapshot is not None and expected_snapshot.get("sha256") != snapshot["sha256"]:
        raise DatasetError(
            "the data differ from the saved configuration's snapshot (images or labels "
            "changed); a rerun would not reproduce the saved results"
        )
    data = SimulationData.from_prepared(prepared, classes)
    write_json(
        out / CONFIG_FILE,
        {
            "format": RESULTS_FORMAT,
            "simulation": config.to_dict(),
            "classes": list(data.classes),
            "failures": prepared.failures,
            "data_snapshot": snapshot,
        },
    )
    results = run_simulation(data, config, progress=progress)
    results = {
        "format": RESULTS_FORMAT,
        "config": config.to_dict(),
        "data_sha256": snapshot["sha256"],
        **results,
        "summary": summarize(results["runs"], list(data.classes)),
    }
    write_json(out / RESULTS_FILE, results)
    return write_simulation_report(results, out / REPORT_FILE)
