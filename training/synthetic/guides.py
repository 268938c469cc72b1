"""Reference pictures of the reading guides: the generator's own valve drawings, captioned.

Label Studio shows a valve model's reading guide when that model is chosen
(``label_config.xml``, docs/READING_GUIDES.md). Its picture is drawn here from the same
geometry the synthetic X-rays use (:mod:`training.synthetic.valves`): a schematic, not a
photograph or an X-ray of the real device, and captioned so. ``guides/`` in the repository
holds the output; regenerate it with ``python -m training.synthetic.guides guides``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from training.synthetic.valves import draw_valve, render_valve, valve_matrix

__all__ = [
    "GUIDE_HEIGHT_PX",
    "GUIDE_PICTURES",
    "GUIDE_WIDTH_PX",
    "draw_guide_picture",
    "write_guide_pictures",
]

GUIDE_PICTURES: Mapping[str, str] = {
    "Codman Hakim": "codman-hakim.png",
    "Codman Certas Plus": "codman-certas-plus.png",
    "Sophysa Sophy SM8": "sophysa-sophy-sm8.png",
    "proGAV 2.0": "progav-2.0.png",
}
"""Valve class (a ``<Choice>`` value) → file name of its reference picture."""
GUIDE_WIDTH_PX = 240
"""Picture width: the answer column of the labeling config is 260 px wide."""
GUIDE_HEIGHT_PX = 150
"""Picture height, caption included."""
_VALVE_LENGTH_PX = 210.0
"""Connector tip to connector tip, in pixels of the picture."""
_CAPTION_PX = 16
_BACKGROUND = 28
"""Grey level around the valve: dark, as on a radiograph (metal shows bright)."""
_CAPTION = "SCHEMATIC drawing - not the real device"


def draw_guide_picture(label: str) -> Image.Image:
    """The reference picture of ``label``: its synthetic drawing, flow left to right, rotor
    at setting 0, no in-line accessory, white on dark like a radiograph, with a caption."""
    drawing = draw_valve(label, setting=0.0, variant=0.9)
    matrix = valve_matrix(_VALVE_LENGTH_PX, angle=0.0, tilt=0.0, tilt_axis=0.0, mirror=False)
    body_h = GUIDE_HEIGHT_PX - _CAPTION_PX
    origin = (GUIDE_WIDTH_PX / 2, body_h / 2 + 6)
    patch, x0, y0 = render_valve(drawing, matrix, origin)
    canvas = np.full((GUIDE_HEIGHT_PX, GUIDE_WIDTH_PX), float(_BACKGROUND), dtype=np.float32)
    # A gamma below 1 lifts the faint silicone housing next to the bright metal parts.
    scaled = _BACKGROUND + (255 - _BACKGROUND) * (patch / max(float(patch.max()), 1e-6)) ** 0.7
    ys, xs = (
        slice(max(y0, 0), min(y0 + patch.shape[0], body_h)),
        slice(max(x0, 0), min(x0 + patch.shape[1], GUIDE_WIDTH_PX)),
    )
    canvas[ys, xs] = np.maximum(
        canvas[ys, xs], scaled[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    )
    picture = Image.fromarray(np.round(canvas).astype(np.uint8), mode="L").convert("RGB")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    draw.text((4, 2), "inflow", fill=(190, 190, 190), font=font)
    draw.text((GUIDE_WIDTH_PX - 46, 2), "outflow", fill=(190, 190, 190), font=font)
    draw.rectangle((0, body_h, GUIDE_WIDTH_PX, GUIDE_HEIGHT_PX), fill=(255, 236, 179))
    draw.text((4, body_h + 2), _CAPTION, fill=(60, 40, 0), font=font)
    return picture


def write_guide_pictures(folder: str | Path) -> list[Path]:
    """Write every reference picture into ``folder`` (created); the paths written."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for label, name in GUIDE_PICTURES.items():
        path = target / name
        draw_guide_picture(label).save(path, optimize=True)
        written.append(path)
    return written


if __name__ == "__main__":  # python -m training.synthetic.guides <folder>
    for written_path in write_guide_pictures(sys.argv[1] if len(sys.argv) > 1 else "guides"):
        print(written_path)
