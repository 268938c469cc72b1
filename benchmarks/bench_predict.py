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
HTTP path ≥ 3× fastai and ≥ 80 % of the compiled model-only rate. A second table checks the
fast path against fp32 on a *trained* model (ResNet-18, 64², trained here in about a minute).
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
    Served,
    class_names,
    deployment,
    network_batch,
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
    from training.dicom import load_image
    from training.preprocess import PreprocessParams, prepare_image

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


def agreement_table(options: PredictOptions, workdir: Path, *, with_compiled: bool) -> Table:
    """Top-1 agreement and |Δp| of the served fast path(s) vs eager fp32, trained model."""
    from backend.predictor import Prediction, Predictor

    model_dir = workdir / "trained-models"
    started = time.perf_counter()
    with _torch_threads(1):  # on a shared 2-core box one thread trains several times faster
        train_quadrant_version(
            model_dir,
            workdir,
            n_images=options.agreement_train_images,
            epochs=options.agreement_epochs,
        )
    train_s = time.perf_counter() - started
    images = _evaluation_pngs(options.agreement_eval_images, np.random.default_rng(1))

    def probs(results: list[Any]) -> np.ndarray:
        assert all(isinstance(r, Prediction) for r in results)
        classes = list(results[0].probs)  # the trained version's classes
        return np.array([[r.probs[c] for c in classes] for r in results])

    with Predictor(model_dir, device="cpu", fast_path=False) as exact:
        p32 = probs(exact.predict(images))
    paths = {"channels_last + bf16": False}
    if with_compiled:
        paths["+ compiled"] = True
    candidates = {}
    for name, compiled in paths.items():
        with Predictor(model_dir, device="cpu", fast_path=True, compile=compiled) as fast:
            candidates[name] = probs(fast.predict(images))

    top2 = np.sort(p32, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    n = len(images)
    table = Table(
        "Served fast path vs eager fp32 on a trained model", ["measure", *paths, "target"]
    )
    flips = {k: np.argmax(p32, axis=1) != np.argmax(v, axis=1) for k, v in candidates.items()}
    table.add_row(
        "top-1 agreement",
        *(f"{n - int(f.sum())}/{n}" for f in flips.values()),
        "100 %",
    )
    table.add_row(
        "flips away from a near-tie (gap ≥ 0.02)",
        *(int((f & (gap >= NEAR_TIE)).sum()) for f in flips.values()),
        "0",
    )
    table.add_row(
        "max abs Δ probability",
        *(f"{np.abs(p32 - v).max():.4f}" for v in candidates.values()),
        "< 0.1",
    )
    table.add_row(
        "mean abs Δ probability",
        *(f"{np.abs(p32 - v).mean():.5f}" for v in candidates.values()),
        "",
    )
    table.notes.append(
        f"ResNet-18 trained from scratch at 64² on quadrant images ({options.agreement_epochs} "
        f"epochs, 2 folds, {train_s:.0f} s); {n} unseen images, a third faint and a third "
        f"ambiguous: {int((gap < 0.99).sum())} fp32 answers have a top-2 gap under 0.99, "
        f"{int((gap < NEAR_TIE).sum())} are near-ties. The served ensemble mean is compared."
    )
    return table


# --- the run --------------------------------------------------------------------------------


def run(options: PredictOptions, workdir: Path) -> list[Table]:
    """Set everything up, run the interleaved rounds, return the tables."""
    import httpx

    from training.model import load_checkpoint

    n = options.n_images
    with (
        deployment(
            workdir,
            options.served,
            size_px=options.size_px,
            arch=options.arch,
            n_images=n,
        ) as deployed,
        httpx.Client(timeout=3600) as client,
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
        seconds = interleaved(contenders, options.rounds, on_round=_say_round)
        start_s = {s.name: deployed.start_s[s] for s in options.served}

    rate = {name: images[name] * forwards[name] / median(seconds[name]) for name in contenders}
    reference = "model only, compiled bf16" if compiled is not None else "model only, eager bf16"
    table = Table(
        f"/predict throughput: {n} tasks, {options.arch} at {options.size_px}², "
        f"median of {options.rounds} interleaved rounds",
        ["contender", "fwd/img", "img/s", "fwd/s", "× fastai", "% of model-only", "target"],
    )
    for name in contenders:
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
    if options.agreement:
        compiled_served = any(s.compiled for s in options.served)
        tables.append(agreement_table(options, workdir, with_compiled=compiled_served))
    return tables


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
    parser.add_argument("--no-agreement", action="store_true", help="skip the trained model")
    args = parser.parse_args(argv)
    options = QUICK if args.quick else PredictOptions()
    changes: dict[str, Any] = {}
    if args.rounds:
        changes["rounds"] = args.rounds
    if args.no_compiled:
        changes["served"] = tuple(s for s in options.served if not s.compiled)
    if args.no_agreement:
        changes["agreement"] = False
    if changes:
        options = replace(options, **changes)
    with tempfile.TemporaryDirectory(prefix="valve-id-bench-") as tmp:
        tables = run(options, Path(tmp))
    emit(tables, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
