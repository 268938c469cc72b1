"""Training throughput: the recipe's real data pipeline vs the model-only step rate.

Contenders, same network (ResNet-34), image size (512²), batch, precision and gradient
accumulation, alternated round by round:

* **recipe**: :func:`training.fitting.recipe.train_fold` itself — the fastai ``Learner``, its
  loaders over the prepared images, the augmentation + normalisation callback, gradient
  accumulation, bf16 autocast on a CPU with native bf16, else fp32 (fp16 AMP +
  channels_last on CUDA), metrics. Its epoch-end progress callback is the clock: epoch 1
  is warm-up, the later ones are timed (each includes validating one small batch, as every
  real epoch does).
* **model only**: a plain torch loop over pre-made, normalised input tensors already on the
  device — forward, weighted cross-entropy, backward, Adam every 64 images — i.e. what the
  hardware does when nothing else is in the way.

Target (issue 6): recipe ≥ 90 % of model-only (the loader keeps up). ``--device cuda`` runs
the same comparison on a GPU (batch 32, the paper's); on the CPU the default batch is 8 to
keep a 512² ResNet-34's activations within a few GB of RAM.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from benchmarks.harness import Table, add_common_arguments, emit, median, verdict

__all__ = ["TrainingOptions", "main", "run"]

TARGET_FRACTION = 0.90
"""Recipe images/s over model-only images/s (issue 6)."""
VAL_IMAGES = 2
"""Validation images per fold of the recipe run (validated every epoch, kept tiny)."""


@dataclass(frozen=True)
class TrainingOptions:
    device: str = "cpu"
    size_px: int = 512
    batch_size: int | None = None
    """None: 8 on the CPU, 32 (the paper's) on CUDA."""
    train_images: int = 32
    epochs: int = 3
    """Recipe epochs per round; the first is warm-up."""
    rounds: int = 2
    arch: str = "resnet34"


QUICK = TrainingOptions(
    size_px=32, batch_size=4, train_images=8, epochs=2, rounds=1, arch="resnet18"
)


def _batch_size(options: TrainingOptions) -> int:
    if options.batch_size:
        return options.batch_size
    return 32 if options.device.startswith("cuda") else 8


def _data(options: TrainingOptions) -> tuple[np.ndarray, np.ndarray]:
    """Prepared float16 synthetic radiographs (as the run's cache holds them) and labels."""
    from benchmarks.fixtures import XrayImages
    from training.shared.preprocess import PreprocessParams, prepare_image

    n = options.train_images + VAL_IMAGES
    xrays = XrayImages(n, seed=0)
    params = PreprocessParams(size_px=options.size_px)
    images = np.stack([prepare_image(a.astype(np.float32) / 255, params) for a in xrays.arrays])
    labels = np.arange(n) % 4
    return images.astype(np.float16), labels


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recipe_rate(options: TrainingOptions, images: np.ndarray, labels: np.ndarray) -> float:
    """Images/s of the recipe's epochs after the first."""
    import torch

    from training.fitting.config import RecipeConfig
    from training.fitting.recipe import train_fold

    device = torch.device(options.device)
    config = RecipeConfig.from_profile(
        "paper",
        image_size_px=options.size_px,
        pretrained=False,
        epochs_from_scratch=options.epochs,
        batch_size=_batch_size(options),
        arch=options.arch,
        gradcam_per_class=0,
    )
    stamps: list[float] = []

    def progress(_row: dict[str, Any]) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    n_train = options.train_images
    train_fold(
        images,
        labels,
        np.arange(n_train),
        np.arange(n_train, n_train + VAL_IMAGES),
        4,
        config,
        device=device,
        progress=progress,
    )
    timed_images = n_train * (len(stamps) - 1)
    return timed_images / (stamps[-1] - stamps[0])


def model_only_rate(options: TrainingOptions, images: np.ndarray, labels: np.ndarray) -> float:
    """Images/s of a plain torch training loop on pre-made device tensors."""
    import torch

    from training.fitting.config import RecipeConfig
    from training.fitting.recipe import class_weights
    from training.shared.inference import autocast_for, to_network_input
    from training.shared.model import ValveNet
    from training.shared.preprocess import PreprocessParams

    device = torch.device(options.device)
    config = RecipeConfig.from_profile("paper", image_size_px=options.size_px)
    bs = _batch_size(options)
    n_train = options.train_images
    params = PreprocessParams(size_px=options.size_px)
    x = to_network_input(torch.from_numpy(images[:n_train]).to(device), params, channels_last=True)
    y = torch.from_numpy(labels[:n_train].astype(np.int64)).to(device)
    weights = torch.from_numpy(class_weights(labels[:n_train], 4)).to(device)
    model = ValveNet(4, arch=options.arch).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    use_cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_cuda else None
    accumulate = max(1, config.effective_batch_size // bs)
    step = 0

    def one_batch(start: int) -> None:
        nonlocal step
        xb, yb = x[start : start + bs], y[start : start + bs]
        with autocast_for(device):  # the recipe's precision on this device
            loss = loss_fn(model(xb).float(), yb)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        step += 1
        if step % accumulate == 0:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    starts = list(range(0, n_train - bs + 1, bs))  # drop_last, as the recipe's loader
    for start in starts:  # warm-up: one epoch's worth
        one_batch(start)
    _sync(device)
    began = time.perf_counter()
    epochs = max(1, options.epochs - 1)
    for _ in range(epochs):
        for start in starts:
            one_batch(start)
    _sync(device)
    return epochs * len(starts) * bs / (time.perf_counter() - began)


def run(options: TrainingOptions) -> list[Table]:
    import torch

    images, labels = _data(options)
    rates: dict[str, list[float]] = {"recipe (fastai Learner + loaders + augmentation)": []}
    rates["model only (plain torch loop, pre-made tensors)"] = []
    names = list(rates)
    for r in range(options.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            fn = recipe_rate if name.startswith("recipe") else model_only_rate
            rates[name].append(fn(options, images, labels))
    recipe, model_only = (median(rates[n]) for n in names)
    precision = "fp16 AMP" if options.device.startswith("cuda") else "bf16 autocast"
    device_name = (
        torch.cuda.get_device_name(torch.device(options.device))
        if options.device.startswith("cuda")
        else "CPU"
    )
    table = Table(
        f"Training throughput on {device_name}: {options.arch} at {options.size_px}², batch "
        f"{_batch_size(options)}, {precision}, channels_last, median of {options.rounds} rounds",
        ["contender", "images/s", "% of model-only", f"target ≥ {TARGET_FRACTION:.0%}"],
    )
    table.add_row(
        names[0],
        f"{recipe:.2f}",
        f"{100 * recipe / model_only:.0f} %",
        verdict(recipe / model_only, TARGET_FRACTION),
    )
    table.add_row(names[1], f"{model_only:.2f}", "100 %", "")
    table.notes.append(
        f"{options.train_images} training images per epoch, gradient accumulation to 64; "
        f"recipe: {options.epochs} epochs per round, the first not timed, each timed epoch "
        f"also validates {VAL_IMAGES} images; model only: one warm-up epoch, then "
        f"{max(1, options.epochs - 1)} timed. Per-round rates: "
        + "; ".join(f"{n.split(' ')[0]} {', '.join(f'{v:.2f}' for v in rates[n])}" for n in names)
    )
    return [table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_common_arguments(parser)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<n>")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    options = QUICK if args.quick else TrainingOptions()
    options = replace(options, device=args.device)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: no CUDA device on this machine")
    if args.batch_size:
        options = replace(options, batch_size=args.batch_size)
    if args.rounds:
        options = replace(options, rounds=args.rounds)
    with tempfile.TemporaryDirectory(prefix="valve-id-bench-"):
        tables = run(options)
    emit(tables, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
