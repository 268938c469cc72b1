"""bf16 autocast vs fp32 on this CPU: why mixed precision depends on the hardware.

The ``cpu`` profile's network (EfficientNet-Lite0, channels_last) at its whole-image size,
one training step (forward, cross-entropy, backward, Adam) and one forward pass of a batch,
each in bf16 autocast and in fp32, alternated round by round. On a CPU with AVX512-BF16 or
AMX bf16 pays; without them oneDNN emulates it and it costs many times fp32.
:func:`training.shared.inference.autocast_dtype` (what training and serving use) picks fp32 there;
the table says what it picked on this machine and what the other choice would have cost.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from benchmarks.harness import Table, add_common_arguments, emit, interleaved, median, timed

__all__ = ["PrecisionOptions", "main", "run"]


@dataclass(frozen=True)
class PrecisionOptions:
    size_px: int = 384
    batch: int = 8
    rounds: int = 3
    arch: str = "efficientnet_lite0"


QUICK = PrecisionOptions(size_px=64, batch=2, rounds=1)


def run(options: PrecisionOptions) -> list[Table]:
    import torch

    from training.shared.inference import autocast_dtype
    from training.shared.model import ValveNet

    torch.manual_seed(0)
    device = torch.device("cpu")
    model = ValveNet(4, arch=options.arch).to(memory_format=torch.channels_last)
    x = torch.randn(options.batch, 3, options.size_px, options.size_px)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (options.batch,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)

    def step(bf16: bool) -> None:
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    @torch.inference_mode()
    def forward(bf16: bool) -> None:
        model.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            model(x)

    picked = "bf16" if autocast_dtype(device) == torch.bfloat16 else "fp32"
    table = Table(
        f"bf16 autocast vs fp32 on this CPU ({options.arch} at {options.size_px}², "
        f"batch {options.batch}, median of {options.rounds} interleaved rounds)",
        ["pass", "bf16 s", "fp32 s", "bf16 ÷ fp32 time", "valve-id uses"],
    )
    for name, fn in (("training step", step), ("forward (serving)", forward)):
        fn(True)  # warm-up: oneDNN builds its kernels on first use
        fn(False)
        times = interleaved(
            {"bf16": timed(lambda fn=fn: fn(True)), "fp32": timed(lambda fn=fn: fn(False))},
            options.rounds,
        )
        bf16, fp32 = median(times["bf16"]), median(times["fp32"])
        table.add_row(name, f"{bf16:.2f}", f"{fp32:.2f}", f"{bf16 / fp32:.2f}×", picked)
    table.notes.append(
        "valve-id uses bf16 only where the CPU computes it natively (AVX512-BF16 or AMX): "
        "training.shared.inference.autocast_dtype."
    )
    return [table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_common_arguments(parser)
    parser.add_argument("--size-px", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    options = QUICK if args.quick else PrecisionOptions()
    for name in ("size_px", "batch", "rounds"):
        if getattr(args, name) is not None:
            options = replace(options, **{name: getattr(args, name)})
    emit(run(options), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
