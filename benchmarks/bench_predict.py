"""/predict throughput: our HTTP path vs. fastai's ``learn.predict`` vs. the model alone.

Contenders, all on the same synthetic radiographs (8-bit PNGs of 600–1200 px, as ``valve-id
import`` writes them), interleaved round by round:

* ``/predict`` of the real backend (``valve-id serve``) with a 1-model and a 5-fold version
  at 512²: one request of all tasks, images read through Label Studio's local-files route —
  fetch, decode, preprocess, forward passes, Redis bookkeeping and the JSON answer. Every
  round uses new image bytes, so the cache never answers.
* fastai ``learn.predict(PILImage)`` per image, how the paper's code would serve: a
  ``Learner`` around the same network with the paper's ``DataBlock`` (squish-resize to 512,
  ImageNet normalisation), fp32, one call per image.
* the model alone on pre-made input tensors, batch 16, channels_last + bf16 autocast, eager
  and compiled (``torch.compile``, inductor with freezing): the compute limit of the machine.

Rates are per network forward (a 5-fold ensemble does 5 per image). Targets (issue 6): the
HTTP path ≥ 3× fastai and ≥ 80 % of the compiled model-only rate.

A second table puts the ``cpu`` profile's networks (issue 12, item 6) beside the ResNet-34
version at equal ensemble size, in the same rounds: EfficientNet-Lite0 locate-then-classify
(prepared at 768², locator at 384², classifier on a 160² crop) and the whole-image Lite0 at
384², random weights (speed does not depend on them). Each is timed through ``/predict``
(the served bf16 fast path) and through an in-process :class:`backend.service.predictor.Predictor`
in bf16 and in eager fp32 (``fast_path=False``; a backend always serves the fast path), with
img/s ratios against ResNet-34 and the backends' RSS.

A third table checks the fast path against fp32 on *trained* models: a ResNet-18 (64², from
scratch) and the two Lite0 designs from their ImageNet weights, each trained here on
learnable synthetic images in under a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fixtures import (
    CPU_LOCATE_CLASSIFY,
    CPU_WHOLE_IMAGE,
    LOCATE_CLASSIFY,
    PRECISIONS,
    Served,
    VersionKind,
    class_names,
    deployment,
    in_process_predictors,
    network_batch,
    predict_all,
    quadrant_png,
    serving_model,
    train_quadrant_version,
)
from benchmarks.harness import (
    Table,
    add_common_arguments,
    emit,
    interleaved,
    median,
    proc_rss_mib,
    timed,
)

__all__ = ["PredictOptions", "main", "run"]

TARGET_VS_FASTAI = 3.0
"""The HTTP path's forwards/s over fastai's (issue 6)."""
TARGET_VS_MODEL = 0.80
"""The HTTP path's forwards/s over the compiled model-only rate (issue 6)."""
MODEL_BATCH = 16
"""Batch of the model-only contenders (the predictor's default batch)."""
NEAR_TIE = 0.02
"""Top-2 gap under which fp32 itself is a coin toss (a flip there is not an error)."""


@dataclass(frozen=True)
class PredictOptions:
    size_px: int = 512
    n_images: int = 32
    fastai_images: int = 8
    """Images per round for fastai (one call each, so fewer suffice for its rate)."""
    served: tuple[Served, ...] = (Served(1), Served(5), Served(1, True), Served(5, True))
    rounds: int = 3
    arch: str = "resnet34"
    compile: bool = True
    """Also time the compiled model-only contender (the target's reference)."""
    agreement: bool = True
    agreement_train_images: int = 64
    agreement_epochs: int = 8
    agreement_eval_images: int = 48
    agreement_lite0: bool = True
    """Also train the two Lite0 designs for the agreement table."""
    backbones: tuple[VersionKind, ...] = (CPU_LOCATE_CLASSIFY, CPU_WHOLE_IMAGE)
    """The cpu profile's networks timed beside ``arch`` at ``size_px`` (empty: none)."""
    backbone_folds: int = 5
    """Ensemble size of every version in the backbone table."""


QUICK = PredictOptions(
    size_px=64,
    n_images=4,
    fastai_images=2,
    served=(Served(2),),
    rounds=1,
    arch="resnet18",
    compile=False,
    agreement_train_images=16,
    agreement_epochs=1,
    agreement_eval_images=8,
    backbones=(
        VersionKind(
            arch="efficientnet_lite0", size_px=64, design=LOCATE_CLASSIFY, locator_px=64, crop_px=32
        ),
    ),
    backbone_folds=2,
)
FASTAI = "fastai learn.predict, fp32"


# --- the fastai baseline ------------------------------------------------------------------


class _LabelOf:
    """``get_y`` of the DataBlock: a file's label (items are paths)."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels

    def __call__(self, path: Path) -> str:
        return self.labels[str(path)]


def fastai_learner(paths: list[Path], labels: list[str], model: Any, size_px: int) -> Any:
    """A Learner as the paper's code builds it (DataBlock, squish resize, ImageNet stats)."""
    from fastai.vision.all import (
        CategoryBlock,
        CrossEntropyLossFlat,
        DataBlock,
        ImageBlock,
        Learner,
        Normalize,
        RandomSplitter,
        Resize,
        ResizeMethod,
        imagenet_stats,
    )

    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=list(class_names()))),
        get_y=_LabelOf({str(p): label for p, label in zip(paths, labels, strict=True)}),
        splitter=RandomSplitter(valid_pct=0.25, seed=0),
        item_tfms=Resize(size_px, method=ResizeMethod.Squish),
        batch_tfms=Normalize.from_stats(*imagenet_stats),
    )
    dls = block.dataloaders(
        list(paths), bs=min(MODEL_BATCH, len(paths)), num_workers=0, device="cpu"
    )
    return Learner(dls, model, loss_func=CrossEntropyLossFlat())


def fastai_predict_all(learn: Any, paths: list[Path]) -> None:
    from fastai.vision.all import PILImage

    with learn.no_bar():
        for path in paths:
            learn.predict(PILImage.create(path))


# --- the model alone ------------------------------------------------------------------------


def model_only_pass(model: Any, batch: Any) -> None:
    """One pass over ``batch`` in chunks of :data:`MODEL_BATCH`, bf16 autocast."""
    import torch

    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, len(batch), MODEL_BATCH):
            model(batch[start : start + MODEL_BATCH])


def prepared_images(pngs: list[bytes], size_px: int) -> np.ndarray:
    from training.shared.dicom import load_image
    from training.shared.preprocess import PreprocessParams, prepare_image

    params = PreprocessParams(size_px=size_px)
    return np.stack([prepare_image(load_image(png, name="bench"), params) for png in pngs])


# --- agreement on a trained model ---------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _evaluation_pngs(n: int, rng: np.random.Generator) -> list[bytes]:
    """A third clean, a third faint, a third with a rival square: not only saturated answers."""
    images = []
    for i in range(n):
        label, part = i % 4, i * 3 // n
        if part == 0:
            images.append(quadrant_png(label, rng))
        elif part == 1:
            images.append(quadrant_png(label, rng, contrast=float(rng.uniform(0.1, 0.3))))
        else:
            rival = (label + 1 + int(rng.integers(0, 3))) % 4
            strength = float(rng.uniform(0.6, 1.0))
            images.append(quadrant_png(label, rng, rival=rival, rival_strength=strength))
    return images


@dataclass(frozen=True)
class _TrainedVersion:
    name: str
    recipe: Any
    """A :class:`training.fitting.config.RecipeConfig`, or None for the ResNet-18 default."""
    compiled: bool
    """Also compare the compiled fast path."""


def _trained_versions(options: PredictOptions, with_compiled: bool) -> list[_TrainedVersion]:
    from training.fitting.config import RecipeConfig

    versions = [_TrainedVersion("ResNet-18 from scratch, 64²", None, with_compiled)]
    if options.agreement_lite0:
        lite0 = RecipeConfig.from_profile(
            "cpu", design="whole_image", image_size_px=64, batch_size=8, effective_batch_size=8
        )
        two_stage = RecipeConfig.from_profile(
            "cpu",
            design=LOCATE_CLASSIFY,
            image_size_px=96,
            locator_px=96,
            crop_fraction=0.5,
            crop_px=48,
            locator_epochs=60,
            batch_size=8,
        )
        versions += [
            _TrainedVersion("Lite0 whole image, ImageNet, 64²", lite0, False),
            _TrainedVersion("Lite0 locate→classify, ImageNet, 96² → crop 48²", two_stage, False),
        ]
    return versions


def agreement_table(options: PredictOptions, workdir: Path, *, with_compiled: bool) -> Table:
    """Top-1 agreement and |Δp| of the served fast path(s) vs eager fp32, trained models."""
    from backend.service.predictor import Prediction, Predictor

    images = _evaluation_pngs(options.agreement_eval_images, np.random.default_rng(1))

    def probs(results: list[Any]) -> np.ndarray:
        assert all(isinstance(r, Prediction) for r in results)
        classes = list(results[0].probs)  # the trained version's classes
        return np.array([[r.probs[c] for c in classes] for r in results])

    columns: list[str] = []
    exact: list[np.ndarray] = []  # fp32 answers, one per column
    fast: list[np.ndarray] = []
    trained_notes = []
    for i, version in enumerate(_trained_versions(options, with_compiled)):
        model_dir = workdir / f"trained-models-{i}"
        started = time.perf_counter()
        with _torch_threads(1):  # on a shared 2-core box one thread trains several times faster
            train_quadrant_version(
                model_dir,
                workdir,
                n_images=options.agreement_train_images,
                epochs=options.agreement_epochs,
                recipe=version.recipe,
            )
        trained_notes.append(f"{version.name} {time.perf_counter() - started:.0f} s")
        with Predictor(model_dir, device="cpu", fast_path=False) as predictor:
            p32 = probs(predictor.predict(images))
        for compiled in (False, True) if version.compiled else (False,):
            with Predictor(model_dir, device="cpu", fast_path=True, compile=compiled) as predictor:
                fast.append(probs(predictor.predict(images)))
                served_in = predictor.info()["mixed_precision"] or "float32"
            exact.append(p32)
            columns.append(f"{version.name}: {served_in}" + (" + compiled" if compiled else ""))

    n = len(images)
    table = Table(
        "Served fast path vs eager fp32 on trained models", ["measure", *columns, "target"]
    )
    flips = [np.argmax(e, axis=1) != np.argmax(f, axis=1) for e, f in zip(exact, fast, strict=True)]
    gaps = [np.diff(np.sort(e, axis=1)[:, -2:], axis=1)[:, 0] for e in exact]
    table.add_row("top-1 agreement", *(f"{n - int(f.sum())}/{n}" for f in flips), "100 %")
    table.add_row(
        "flips away from a near-tie (gap ≥ 0.02)",
        *(int((f & (g >= NEAR_TIE)).sum()) for f, g in zip(flips, gaps, strict=True)),
        "0",
    )
    table.add_row(
        "max abs Δ probability",
        *(f"{np.abs(e - f).max():.4f}" for e, f in zip(exact, fast, strict=True)),
        "< 0.1",
    )
    table.add_row(
        "mean abs Δ probability",
        *(f"{np.abs(e - f).mean():.5f}" for e, f in zip(exact, fast, strict=True)),
        "",
    )
    table.add_row(
        "fp32 answers with a top-2 gap < 0.99 / near-ties",
        *(f"{int((g < 0.99).sum())} / {int((g < NEAR_TIE).sum())}" for g in gaps),
        "",
    )
    table.notes.append(
        f"Each trained on {options.agreement_train_images} quadrant images through the real run "
        f"stages ({options.agreement_epochs} epochs, 2 folds; "
        + ", ".join(trained_notes)
        + f"); {n} unseen images, a third faint and a third ambiguous. Each column is the "
        "served fast path (channels_last; bf16 weights and autocast only for a version trained "
        "in bf16, else float32: the precision it names). The served ensemble mean is compared."
    )
    return table


# --- the run --------------------------------------------------------------------------------


def run(options: PredictOptions, workdir: Path) -> list[Table]:
    """Set everything up, run the interleaved rounds, return the tables."""
    import httpx

    from training.shared.model import load_checkpoint

    n = options.n_images
    reference_kind = VersionKind(arch=options.arch, size_px=options.size_px)
    kinds = (reference_kind, *options.backbones) if options.backbones else ()
    # The reference's row is the deployment's default version (kind None): one backend.
    by_backbone = tuple(Served(options.backbone_folds, kind=k) for k in options.backbones)
    by_backbone = (Served(options.backbone_folds), *by_backbone) if by_backbone else ()
    with (
        deployment(
            workdir,
            tuple(dict.fromkeys((*options.served, *by_backbone))),
            size_px=options.size_px,
            arch=options.arch,
            n_images=n,
        ) as deployed,
        httpx.Client(timeout=3600) as client,
        in_process_predictors(
            {k: deployed.model_dir(options.backbone_folds, kind=k) for k in kinds},
            batch_size=MODEL_BATCH,
        ) as predictors,
    ):
        # The model alone: fold 0 of a served version, on pre-made tensors.
        fold0 = deployed.fold_weights(options.served[0].folds)
        batch = network_batch(
            prepared_images([deployed.xrays.png(i) for i in range(n)], options.size_px),
            options.size_px,
        )
        eager = serving_model(load_checkpoint(fold0), compile=False)
        for _ in range(2):  # warm-up: the first passes are much slower here
            model_only_pass(eager, batch)
        compiled = None
        compile_s = 0.0
        if options.compile:
            compiled = serving_model(load_checkpoint(fold0), compile=True)
            started = time.perf_counter()
            model_only_pass(compiled, batch[:MODEL_BATCH])  # compiles for this batch shape
            compile_s = time.perf_counter() - started
            model_only_pass(compiled, batch)

        # fastai, fp32, as the paper's code would serve (one learn.predict per image).
        fastai_paths = [deployed.path(i, 0) for i in range(options.fastai_images)]
        labels = deployed.xrays.labels[: options.fastai_images]
        learn = fastai_learner(fastai_paths, labels, load_checkpoint(fold0), options.size_px)
        fastai_predict_all(learn, fastai_paths[:2])  # warm-up

        for backend in deployed.backends.values():
            backend.predict(client, deployed.tasks(0))  # warm-up (first batch, lazy init)
        for predictor in predictors.values():
            predict_all(predictor, [deployed.xrays.png(i) for i in range(n)])  # warm-up

        def http(served: Served) -> Any:
            def one_round(r: int) -> float:
                tasks = deployed.tasks(r + 1)  # new bytes every round: no cache hit
                started = time.perf_counter()
                deployed.backends[served].predict(client, tasks)
                return time.perf_counter() - started

            return one_round

        contenders = {
            FASTAI: timed(lambda: fastai_predict_all(learn, fastai_paths)),
            "model only, eager bf16": timed(lambda: model_only_pass(eager, batch)),
        }
        if compiled is not None:
            contenders["model only, compiled bf16"] = timed(
                lambda: model_only_pass(compiled, batch)
            )
        forwards = dict.fromkeys(contenders, 1)
        images = dict.fromkeys(contenders, n)
        images[FASTAI] = options.fastai_images
        for served in options.served:
            name = f"/predict, {served.name} version"
            contenders[name] = http(served)
            forwards[name] = served.folds
            images[name] = n

        # The cpu profile's networks beside the reference: /predict and in-process predictors.
        payloads: dict[int, list[bytes]] = {}

        def in_process(predictor: Any) -> Any:
            def one_round(r: int) -> float:
                if r not in payloads:  # new bytes every round (no cache hit), made untimed
                    payloads[r] = [deployed.xrays.png(i, r + 1) for i in range(n)]
                started = time.perf_counter()
                predict_all(predictor, payloads[r])
                return time.perf_counter() - started

            return one_round

        backbone_rows: dict[tuple[VersionKind, str], str] = {}
        for served in by_backbone:
            kind = deployed.kind(served)
            name = f"/predict, {served.name} version"
            backbone_rows[(kind, "http")] = name
            if name not in contenders:
                contenders[name] = http(served)
            for precision in PRECISIONS:
                name = f"Predictor in-process, {precision}, {served.name} version"
                backbone_rows[(kind, precision)] = name
                contenders[name] = in_process(predictors[(kind, precision)])
        for name in backbone_rows.values():
            forwards[name] = options.backbone_folds
            images[name] = n
        seconds = interleaved(contenders, options.rounds, on_round=_say_round)
        start_s = {s.name: deployed.start_s[s] for s in options.served}
        rss = {deployed.kind(s): proc_rss_mib(deployed.backends[s].pid) for s in by_backbone}

    rate = {name: images[name] * forwards[name] / median(seconds[name]) for name in contenders}
    served_names = {f"/predict, {s.name} version" for s in options.served}
    backbone_only = set(backbone_rows.values()) - served_names
    reference = "model only, compiled bf16" if compiled is not None else "model only, eager bf16"
    table = Table(
        f"/predict throughput: {n} tasks, {options.arch} at {options.size_px}², "
        f"median of {options.rounds} interleaved rounds",
        ["contender", "fwd/img", "img/s", "fwd/s", "× fastai", "% of model-only", "target"],
    )
    for name in contenders:
        if name in backbone_only:
            continue
        per_forward = rate[name]
        target = ""
        if name.startswith("/predict"):
            met = per_forward / rate[FASTAI] >= TARGET_VS_FASTAI and (
                per_forward / rate[reference] >= TARGET_VS_MODEL
            )
            target = "met" if met else "MISSED"
        table.add_row(
            name,
            forwards[name],
            f"{per_forward / forwards[name]:.2f}",
            f"{per_forward:.2f}",
            f"{per_forward / rate[FASTAI]:.2f}×",
            f"{100 * per_forward / rate[reference]:.0f} %",
            target,
        )
    table.notes.append(
        f"Rates per network forward (fwd/s); target for /predict: ≥ {TARGET_VS_FASTAI:g}× "
        f"fastai and ≥ {TARGET_VS_MODEL:.0%} of '{reference}'."
    )
    table.notes.append(
        f"fastai: {options.fastai_images} images per round, one learn.predict(PILImage) each. "
        f"Model only: batch {MODEL_BATCH} of pre-made tensors, channels_last, bf16 weights "
        "and autocast" + (f" (compiling took {compile_s:.0f} s)." if compiled is not None else ".")
    )
    table.notes.append(
        "/predict: one request of all tasks, new image bytes every round (no cache hit), wall "
        "time at the client. Backend start-up (load"
        + (", compile" if any(s.compiled for s in options.served) else "")
        + "): "
        + ", ".join(f"{name} {s:.0f} s" for name, s in start_s.items())
        + "."
    )
    tables = [table]
    if backbone_rows:
        tables.append(backbone_table(options, kinds, backbone_rows, rate, rss))
    if options.agreement:
        compiled_served = any(s.compiled for s in options.served)
        tables.append(agreement_table(options, workdir, with_compiled=compiled_served))
    return tables


def backbone_table(
    options: PredictOptions,
    kinds: tuple[VersionKind, ...],
    rows: dict[tuple[VersionKind, str], str],
    rate: dict[str, float],
    rss: dict[VersionKind, tuple[float, float]],
) -> Table:
    """img/s of each network by path, × the reference (first kind), and backend RSS."""
    folds = options.backbone_folds
    paths = {"http": "/predict", **{p: f"Predictor {p}" for p in PRECISIONS}}
    columns = ["version"]
    for label in paths.values():
        columns += [f"{label} img/s", "× " + kinds[0].name]
    columns += ["bf16 ÷ fp32", "backend RSS MiB (now / peak)"]
    table = Table(
        f"Serving speed by backbone: {folds}-model versions, {options.n_images} tasks, "
        f"median of {options.rounds} interleaved rounds",
        columns,
    )

    def img_s(kind: VersionKind, path: str) -> float:
        return rate[rows[(kind, path)]] / folds  # rates are per forward

    for kind in kinds:
        cells: list[str] = [kind.name]
        for path in paths:
            cells += [
                f"{img_s(kind, path):.2f}",
                f"{img_s(kind, path) / img_s(kinds[0], path):.2f}×",
            ]
        now, peak = rss[kind]
        cells += [f"{img_s(kind, 'bf16') / img_s(kind, 'fp32'):.2f}×", f"{now:.0f} / {peak:.0f}"]
        table.add_row(*cells)
    table.notes.append(
        "Random weights (speed does not depend on them), same images and rounds for all. "
        "/predict: the backend's served fast path (channels_last, bf16 weights and autocast), "
        "one request of all tasks, new bytes every round. Predictor: backend.service.predictor."
        "Predictor in this process (decode, preprocess, ensemble; no HTTP or Redis), bf16 = "
        "the same fast path, fp32 = fast_path=False (a backend cannot serve it)."
    )
    table.notes.append(
        "Locate→classify: prepared at the version's size, the locator sees the locator size, "
        "the classifier a crop of 25 % of the side resampled to the crop size; its forward is "
        "both networks. RSS of each version's `valve-id serve` process after the rounds."
    )
    return table


def _say_round(r: int, seconds: dict[str, float]) -> None:
    import sys

    text = ", ".join(f"{name} {s:.1f} s" for name, s in seconds.items())
    print(f"round {r + 1}: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_common_arguments(parser)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    parser.add_argument(
        "--no-compiled", action="store_true", help="skip the compiled backends (VALVE_ID_COMPILE)"
    )
    parser.add_argument("--no-agreement", action="store_true", help="skip the trained models")
    parser.add_argument(
        "--no-backbones", action="store_true", help="skip the cpu profile's Lite0 versions"
    )
    args = parser.parse_args(argv)
    options = QUICK if args.quick else PredictOptions()
    changes: dict[str, Any] = {}
    if args.rounds:
        changes["rounds"] = args.rounds
    if args.no_compiled:
        changes["served"] = tuple(s for s in options.served if not s.compiled)
    if args.no_agreement:
        changes["agreement"] = False
    if args.no_backbones:
        changes["backbones"] = ()
        changes["agreement_lite0"] = False
    if changes:
        options = replace(options, **changes)
    with tempfile.TemporaryDirectory(prefix="valve-id-bench-") as tmp:
        tables = run(options, Path(tmp))
    emit(tables, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
