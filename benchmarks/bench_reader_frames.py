"""What reading each valve model's setting in its own frame costs a served answer.

A version with reader frames (:attr:`~training.shared.locate_classify.TwoStageParams.
reader_frames`) reads every framed model's block on that model's own crop: per X-ray and model
a template search (two turn-and-face searches and two zoom searches on a 64-px window, then a
turn-and-face search on the reader's own window, then the face template's check) and one more
pass of the reader (the crop as it is: the frame names the face). Timed here,
side by side in interleaved rounds, on one fold of the ``cpu`` profile's network as it serves
(768² prepared, locator 384², classifier crop 160², reader crop 128² of the X-ray's own
pixels, the profile's test views, fp32), with the demo's four setting scales and random
weights and templates (speed does not depend on them):

* ``directed``: every setting read on the one directed crop (versions before 2026-12-07, and
  ``--reader-principal-axis``);
* ``own frame``: each of the four models read in its frame (versions now);
* ``frame search alone``: the four template searches without any network, to tell the
  search from the extra reader passes;
* ``own frame, one model proposed``: a server reads only the settings its version's gate
  proposes (:meth:`~training.shared.locate_classify.LocateClassifyNet.read` ``valves``), here
  one framed model's;
* ``no setting proposed``: the gate proposes none, so nothing is read (the classifier alone).

Rates are per X-ray for one fold; a served version runs each of its folds. Speed only: what the
frames do for the reading is measured in ``bench_setting_reader`` (docs/TRAINING.md).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

from benchmarks.harness import Table, add_common_arguments, emit, interleaved, median, timed

__all__ = ["FrameCostOptions", "main", "run"]


@dataclass(frozen=True)
class FrameCostOptions:
    batch: int = 16
    rounds: int = 5
    prepared_px: int = 768
    source_px: int = 1600
    """Geometric-mean side of each X-ray's own pixels, as the ``cpu`` profile keeps them."""


QUICK = FrameCostOptions(batch=2, rounds=1, prepared_px=128, source_px=256)


def run(options: FrameCostOptions) -> list[Table]:
    import copy

    import torch

    from training.fitting.config import RecipeConfig
    from training.shared.locate_classify import (
        LocateClassifyNet,
        TwoStageParams,
        averaged_views,
    )
    from training.shared.template_frame import ALIGN_PX
    from training.synthetic.valves import SETTING_SCALES

    torch.manual_seed(0)
    recipe = RecipeConfig.from_profile("cpu")
    layout = tuple((valve, tuple(values)) for valve, values in SETTING_SCALES.items())
    params = TwoStageParams(
        backbone=recipe.arch,
        locator_px=min(recipe.locator_px, options.prepared_px),
        crop_fraction=recipe.crop_fraction,
        crop_px=recipe.crop_px,
        settings=layout,
        reader_fraction=recipe.reader_fraction,
        reader_px=recipe.reader_px,
        reader_upright=recipe.reader_upright,
        reader_directed=recipe.reader_directed,
        reader_native=True,
        test_views=averaged_views(recipe.test_views),
    )
    directed = LocateClassifyNet(4, params).eval()
    framed = copy.deepcopy(directed)
    framed.set_reader_frames(
        {valve: (torch.randn(3, ALIGN_PX, ALIGN_PX), 0.3, 0.3) for valve, _ in layout}
    )
    n = options.batch
    x = torch.randn(n, 3, options.prepared_px, options.prepared_px)
    height = int(options.source_px * math.sqrt(3 / 4))
    width = int(options.source_px * math.sqrt(4 / 3))  # a 4:3 X-ray
    sources = [torch.rand(height, width) for _ in range(n)]
    centres = torch.rand(n, 2) * 0.6 + 0.2

    @torch.inference_mode()
    def answer(net: LocateClassifyNet, valves: set[str] | None = None) -> None:
        net.answer(x, centres, sources, valves)

    @torch.inference_mode()
    def search() -> None:
        for valve, _ in layout:
            framed.find_frames(valve, centres, sources)

    contenders = {
        "directed": timed(lambda: answer(directed)),
        "own frame": timed(lambda: answer(framed)),
        "frame search alone": timed(search),
        "own frame, one model proposed": timed(lambda: answer(framed, {layout[0][0]})),
        "no setting proposed": timed(lambda: answer(framed, set())),
    }
    for contender in contenders.values():  # warm-up: oneDNN builds its kernels on first use
        contender(0)
    times = interleaved(contenders, options.rounds)
    base = median(times["directed"])
    table = Table(
        f"Reading the setting in each model's own frame: one fold of the cpu profile, "
        f"{len(layout)} setting scales, batch {n}, median of {options.rounds} interleaved rounds",
        ["answer", "s per batch", "X-rays/s", "time ÷ directed"],
    )
    for name, values in times.items():
        seconds = median(values)
        table.add_row(name, f"{seconds:.2f}", f"{n / seconds:.1f}", f"{seconds / base:.2f}×")
    table.notes.append(
        "Random weights and templates, fp32 (the cpu profile's serving precision). Answered "
        "at given centres: classifier and reader passes; the locator, the same for both, is "
        "left out."
    )
    return [table]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    emit(run(QUICK if args.quick else FrameCostOptions()), args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
