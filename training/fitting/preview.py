"""A contact sheet of a data set, as the network sees it, for a person to eyeball.

Each tile is one image decoded (:func:`training.shared.dicom.load_image`) and prepared
(:func:`training.shared.preprocess.prepare_image`: crop the black border, squish to a square),
titled with its class. A glance shows whether the crop worked, whether the valve is still
visible after the squish, and whether the classes look as they should.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.shared.dataset import LabelledImage, load_manifest
from training.shared.errors import DatasetError, ImageDecodeError
from training.shared.preprocess import PreprocessParams, prepare_image

__all__ = ["TILE_INCHES", "write_preview"]

logger = logging.getLogger(__name__)

TILE_INCHES = 2.6
"""Size of one tile in the figure, inches."""
_DPI = 100
"""Resolution of the written PNG, dots per inch (a 512 px input shows at ~260 px)."""


def _pick(items: Sequence[LabelledImage], per_class: int) -> dict[str, list[LabelledImage]]:
    """The first ``per_class`` items of each class, classes in order of first appearance."""
    picked: dict[str, list[LabelledImage]] = {}
    for item in items:
        chosen = picked.setdefault(item.label, [])
        if len(chosen) < per_class:
            chosen.append(item)
    return picked


def write_preview(
    manifest: Path,
    out_png: Path,
    per_class: int = 4,
    *,
    params: PreprocessParams | None = None,
    classes: Sequence[str] | None = None,
) -> Path:
    """Write a grid (one row per class, ``per_class`` tiles) of prepared images; return it.

    ``manifest`` is a ``manifest.csv`` (or its folder). ``classes`` orders the rows (and
    restricts them); by default rows follow the manifest. A file that cannot be decoded
    becomes a tile saying so, rather than failing the whole sheet.
    """
    # Imported here: matplotlib is only needed for this. Figure + the Agg canvas, not pyplot,
    # so no global backend or figure state is touched in the caller's process.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from training.shared.dicom import load_image

    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    params = params or PreprocessParams()
    picked = _pick(load_manifest(manifest), per_class)
    rows = list(classes) if classes is not None else list(picked)
    if not any(picked.get(label) for label in rows):
        raise DatasetError(f"{manifest}: no images of the requested classes to preview")

    fig = Figure(figsize=(per_class * TILE_INCHES, len(rows) * (TILE_INCHES + 0.3)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), per_class, squeeze=False)
    for r, label in enumerate(rows):
        for c in range(per_class):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            items = picked.get(label, [])
            if c >= len(items):
                ax.set_axis_off()
                continue
            item = items[c]
            try:
                tile = prepare_image(load_image(item.path), params)
            except ImageDecodeError as exc:
                logger.warning("preview: cannot decode %s: %s", item.key, exc)
                tile = np.zeros((params.size_px, params.size_px), dtype=np.float32)
                ax.text(0.5, 0.5, "cannot decode", color="red", ha="center", transform=ax.transAxes)
            ax.imshow(tile, cmap="gray", vmin=0.0, vmax=1.0, interpolation="antialiased")
            ax.set_title(f"{label}\n{Path(item.key).name}", fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=_DPI)
    return out_png
