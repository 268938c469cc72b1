"""One synthetic skull radiograph with a valve, as a float image: :func:`render_xray`.

The drawing works like a radiograph. Anatomy, valve, catheters and a side marker add
attenuation (line integrals); the detector sees ``exp(-attenuation)`` under a smooth
exposure gradient (heel effect), blurred by a small PSF, with quantum noise; processing
takes the log, compresses the large-scale range (as CR workstations do, which keeps small
details such as the valve contrasty) and applies a soft-knee tone curve; the collimated
border is set to pure black.

Everything except the valve's geometry is drawn from one distribution for every class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from training.synthetic.raster import (
    SUPERSAMPLING,
    downsample,
    gaussian_blur,
    lowpass,
    paste,
    rotation,
    smooth_noise,
)
from training.synthetic.valves import (
    DRAWABLE_CLASSES,
    SETTING_SCALES,
    draw_valve,
    render_valve,
    setting_angle,
    valve_matrix,
)

__all__ = [
    "DEFAULT_SIZE_RANGE_PX",
    "PatientTraits",
    "check_size_range",
    "draw_patient_traits",
    "render_xray",
]

DEFAULT_SIZE_RANGE_PX: tuple[int, int] = (600, 1200)
"""Smallest and largest image side, pixels. Sides are drawn independently (not square)."""

_MIN_SIDE_PX = 64
"""Smallest image side: below it a valve has too few pixels to show its geometry."""
_VALVE_LENGTH_FRACTION = (0.07, 0.13)
"""Per-patient valve length (connector tip to tip) as a fraction of the image width."""
_VALVE_LENGTH_JITTER = (0.88, 1.12)
"""Per-image magnification jitter of the valve length (field of view, distance)."""
_MAX_TILT_DEG = 60.0
"""Largest out-of-plane tilt of the valve; the drawing is foreshortened by cos(tilt)."""
_NEAR_EDGE_PROBABILITY = 0.15
"""Fraction of images whose valve is put within a few pixels of a field edge."""
_NEAR_EDGE_GAP_PX = (1, 6)
"""Gap between the valve's bounding box and the field edge for near-edge valves, pixels."""
_EDGE_MARGIN_PX = 1
"""Smallest gap between the valve's bounding box and the field edge, pixels."""
_DRAWN_FRACTION = 0.01
"""A pixel belongs to the drawn valve if its attenuation exceeds this fraction of the peak."""

_NO_COLLIMATION_PROBABILITY = 0.15
"""Fraction of images without any black collimation border."""
_COLLIMATION_SIDE_PROBABILITY = 0.6
"""Otherwise, the probability that a given side has a border."""
_COLLIMATION_WIDTH_FRACTION = (0.02, 0.14)
"""Border width as a fraction of the image side it cuts."""


@dataclass(frozen=True)
class PatientTraits:
    """What stays the same across one patient's radiographs: one head, one shunt."""

    size_factor: float
    """Head size relative to an average head (≈ 0.9–1.1)."""
    aspect: float
    """Length / width of the skull seen from the side (≈ 1.1–1.3)."""
    bone_thickness: float
    """Calvarial thickness relative to the skull radius (≈ 0.035–0.06)."""
    bone_density: float
    """Bone attenuation relative to average (≈ 0.8–1.2)."""
    valve_length_fraction: float
    """Valve length relative to the image width, before per-image magnification."""
    faces_left: bool
    """In lateral views, whether the face points to the image's left."""
    valve_variant: float
    """Uniform [0, 1) draw choosing a model's variant (e.g. a proGAV with a gravitational
    unit in line); per patient, because a patient keeps one shunt."""


def draw_patient_traits(rng: np.random.Generator) -> PatientTraits:
    """Random patient traits; identical for every valve class."""
    return PatientTraits(
        size_factor=float(rng.uniform(0.9, 1.1)),
        aspect=float(rng.uniform(1.1, 1.3)),
        bone_thickness=float(rng.uniform(0.035, 0.06)),
        bone_density=float(rng.uniform(0.8, 1.2)),
        valve_length_fraction=float(rng.uniform(*_VALVE_LENGTH_FRACTION)),
        faces_left=bool(rng.random() < 0.5),
        valve_variant=float(rng.random()),
    )


@dataclass(frozen=True)
class _Head:
    cx: float
    cy: float
    a: float  # skull outer semi-axis along the head's long axis, pixels
    b: float
    angle: float  # rad
    view: str  # "lateral" or "ap"
    faces_left: bool

    def local(self, xx: np.ndarray, yy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image coordinates → head frame (x forward/along a, y down/along b), pixels."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = xx - self.cx, yy - self.cy
        hx = c * dx + s * dy
        hy = -s * dx + c * dy
        if self.view == "lateral" and self.faces_left:
            hx = -hx
        return hx, hy

    def contains(self, x: float, y: float, scale: float = 1.0) -> bool:
        hx, hy = self.local(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32))
        return float((hx / (self.a * scale)) ** 2 + (hy / (self.b * scale)) ** 2) <= 1.0


def _chord(hx: np.ndarray, hy: np.ndarray, a: float, b: float) -> np.ndarray:
    """Path length through an ellipsoid with semi-axes a, b (depth ≈ their mean), pixels."""
    r2 = (hx / a) ** 2 + (hy / b) ** 2
    return (a + b) * np.sqrt(np.clip(1.0 - r2, 0.0, None))


def _ridge(
    hx: np.ndarray,
    hy: np.ndarray,
    p0: tuple[float, float],
    p1: tuple[float, float],
    width: float,
) -> np.ndarray:
    """A soft bony ridge along segment p0–p1 (head frame, pixels): Gaussian cross-section."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((hx - x0) * dx + (hy - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    d2 = (hx - x0 - t * dx) ** 2 + (hy - y0 - t * dy) ** 2
    return np.exp(-d2 / (2 * width * width))


def _head_attenuation(
    rng: np.random.Generator, head: _Head, traits: PatientTraits, shape: tuple[int, int]
) -> np.ndarray:
    """Soft tissue + calvarium (diploe texture, a suture) + skull base, face and spine hints.

    Anatomy is smooth, so it is computed on a half-resolution grid and upsampled.
    """
    h, w = shape
    hs, ws = (h + 1) // 2, (w + 1) // 2
    grid = (hs, ws)
    yy, xx = np.mgrid[0:hs, 0:ws].astype(np.float32)
    hx, hy = head.local(2.0 * xx + 1.0, 2.0 * yy + 1.0)
    a, b = head.a, head.b
    th = traits.bone_thickness * (a + b) / 2
    depth = (a + b) / 2
    lateral = head.view == "lateral"

    # Scalp and brain: a soft ellipsoid a little larger than the skull; the neck below it.
    soft = _chord(hx, hy, a * 1.07, b * 1.09) / depth
    neck_x = -0.2 * a if lateral else 0.0
    neck_half = (0.42 if lateral else 0.5) * a + 0.15 * np.clip(hy - 0.7 * b, 0.0, None)
    neck = np.clip((neck_half - np.abs(hx - neck_x)) / (0.12 * a), 0.0, 1.0)
    neck *= np.clip((hy - 0.55 * b) / (0.3 * b), 0.0, 1.0)
    soft = np.maximum(soft, 1.15 * neck)

    # Calvarium: outer minus inner ellipsoid chord gives the bright tangential rim.
    bone = (_chord(hx, hy, a, b) - _chord(hx, hy, a - th, b - th)) / depth
    # Diploe: fine mottling seen en face, fading towards the smooth tangential rim.
    fine = 0.2 * np.clip(1.0 - bone / 0.35, 0.15, 1.0)
    texture = 1.0 + fine * smooth_noise(rng, grid, 3.0) + 0.12 * smooth_noise(rng, grid, 20.0)
    bone *= np.clip(texture, 0.3, None)

    # A suture: a wiggly dark line across the vault.
    if rng.random() < 0.7:
        pos = rng.uniform(-0.35, 0.2) * a
        wiggle = 0.02 * a * np.sin(hy / (0.02 * a) + rng.uniform(0, 6.3))
        wiggle += 0.008 * a * np.sin(hy / (0.006 * a))
        suture = np.exp(-((hx - pos - 0.25 * hy - wiggle) ** 2) / (2 * (0.004 * a + 1.0) ** 2))
        bone *= 1.0 - 0.4 * suture * (hy < 0.3 * b)

    inside = ((hx / a) ** 2 + (hy / b) ** 2) < 1.0
    base: np.ndarray = np.zeros(grid, dtype=np.float32)
    if lateral:
        # Anterior cranial fossa floor, then the dense petrous bone behind the sella.
        base += 0.8 * _ridge(hx, hy, (0.6 * a, 0.33 * b), (0.05 * a, 0.45 * b), 0.05 * b)
        base += 1.5 * _ridge(hx, hy, (-0.05 * a, 0.52 * b), (-0.45 * a, 0.62 * b), 0.08 * b)
        base *= inside
        # Facial skeleton: maxilla and the mandible's arc, orbit and sinus as darker holes.
        face = _chord(hx - 0.8 * a, hy - 0.68 * b, 0.3 * a, 0.32 * b) / depth
        face += 0.6 * _ridge(hx, hy, (-0.12 * a, 0.62 * b), (0.05 * a, 1.2 * b), 0.035 * a)
        face += 0.6 * _ridge(hx, hy, (0.05 * a, 1.2 * b), (0.75 * a, 1.3 * b), 0.035 * a)
        orbit = _chord(hx - 0.75 * a, hy - 0.3 * b, 0.14 * a, 0.14 * b) / depth
        sinus = _chord(hx - 0.85 * a, hy - 0.62 * b, 0.1 * a, 0.12 * b) / depth
        base += 0.6 * face - 0.9 * orbit - 0.9 * sinus
        soft = np.maximum(soft, _chord(hx - 0.7 * a, hy - 0.75 * b, 0.45 * a, 0.6 * b) / depth)
    else:
        for side in (-1, 1):
            base += 1.3 * _ridge(
                hx, hy, (0.12 * a * side, 0.32 * b), (0.75 * a * side, 0.5 * b), 0.06 * b
            )
            base += 0.3 * _ring_mask(hx - 0.33 * a * side, hy - 0.3 * b, 0.16 * a, 0.02 * a)
        base += 0.5 * _ridge(hx, hy, (0.0, 0.25 * b), (0.0, 0.75 * b), 0.02 * a)
        base *= inside
    # Cervical spine: a column of vertebral bodies under the skull base.
    spine = np.zeros(grid, dtype=np.float32)
    for k in range(5):
        y_k = (0.95 + 0.22 * k) * b
        spine += _ridge(hx, hy, (neck_x, y_k - 0.06 * b), (neck_x, y_k + 0.06 * b), 0.05 * a)
    base += 0.5 * spine * (hy > 0.8 * b)
    base = np.clip(base * (1.0 + 0.25 * smooth_noise(rng, grid, 3.0)), -0.5, None)

    mu = 0.5 * soft + 1.15 * traits.bone_density * (bone + 0.35 * base)
    full = Image.fromarray(mu.astype(np.float32), mode="F").resize(
        (w, h), Image.Resampling.BILINEAR
    )
    return np.asarray(full, dtype=np.float32).copy()


def _ring_mask(dx: np.ndarray, dy: np.ndarray, r: float, t: float) -> np.ndarray:
    """A soft ring of radius ``r`` (Gaussian cross-section of width ``t``), pixels."""
    return np.exp(-((np.hypot(dx, dy) - r) ** 2) / (2 * t * t))


def _bezier(
    p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, n: int = 48
) -> list[tuple[float, float]]:
    """``n`` points along the cubic Bézier curve p0 → p3 (control points p1, p2)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    pts = (
        (1 - t) ** 3 * np.asarray(p0)
        + 3 * (1 - t) ** 2 * t * np.asarray(p1)
        + 3 * (1 - t) * t**2 * np.asarray(p2)
        + t**3 * np.asarray(p3)
    )
    return [(float(x), float(y)) for x, y in pts]


def _tubing_attenuation(
    rng: np.random.Generator,
    shape: tuple[int, int],
    head: _Head,
    inlet: np.ndarray,
    inlet_dir: np.ndarray,
    outlet: np.ndarray,
    outlet_dir: np.ndarray,
    length_px: float,
) -> np.ndarray:
    """Catheters: the ventricular one from the inlet to a burr hole and into the brain, the
    distal one from the outlet down towards the neck and out of the field. Same for all
    classes; drawn at 2× supersampling as tram-track tubes, some with a radiopaque stripe."""
    h, w = shape
    ss = SUPERSAMPLING
    canvas = Image.new("L", (w * ss, h * ss), 0)  # 8-bit canvas: 4× less to convert than float
    draw = ImageDraw.Draw(canvas)
    outer = max(2.0, length_px * rng.uniform(0.045, 0.06))
    strength = rng.uniform(0.12, 0.25)
    striped = rng.random() < 0.5

    # Ventricular catheter: bend towards the vault, through a burr hole, into the brain.
    turn = rotation(rng.uniform(-0.9, 0.9))
    reach = length_px * rng.uniform(1.0, 2.5)
    hole = inlet + turn @ inlet_dir * reach
    centre = np.array([head.cx, head.cy])
    inward = centre - hole
    inward /= max(1e-6, float(np.linalg.norm(inward)))
    tip = hole + inward * min(head.a, head.b) * rng.uniform(0.25, 0.5)
    ventricular = _bezier(inlet, inlet + inlet_dir * reach * 0.5, hole - inward * reach * 0.3, hole)
    ventricular += _bezier(hole, hole + inward * 5, tip - inward * 5, tip, 12)[1:]

    # Distal catheter: leave the outlet, swing down (in the head frame) and off the image.
    down = np.array([-math.sin(head.angle), math.cos(head.angle)])
    far = outlet + outlet_dir * length_px * rng.uniform(0.8, 1.6)
    exit_point = far + down * (h + w)
    distal = _bezier(outlet, outlet + outlet_dir * length_px * 0.6, far, exit_point, 64)

    # Grey levels on the 8-bit canvas: wall 100, lumen 55, stripe 180 (scaled below).
    for path in (ventricular, distal):
        scaled = [(x * ss, y * ss) for x, y in path]
        draw.line(scaled, fill=100, width=int(round(outer * ss)), joint="curve")
        draw.line(scaled, fill=55, width=max(1, int(round(outer * ss * 0.5))), joint="curve")
        if striped:
            draw.line(scaled, fill=180, width=max(1, int(round(outer * ss * 0.2))))
    tubes = downsample(np.asarray(canvas, dtype=np.float32), ss) * np.float32(strength / 100.0)

    # The burr hole: a small round defect in the bone under the catheter's entry.
    r = outer * 1.6
    x0, x1 = max(0, int(hole[0] - r - 2)), min(w, int(hole[0] + r + 3))
    y0, y1 = max(0, int(hole[1] - r - 2)), min(h, int(hole[1] + r + 3))
    if x0 < x1 and y0 < y1:
        yy, xx = np.ogrid[y0:y1, x0:x1]
        defect = np.clip(r - np.hypot(xx + 0.5 - hole[0], yy + 0.5 - hole[1]), 0.0, 1.0)
        tubes[y0:y1, x0:x1] -= 0.25 * defect.astype(np.float32)
    return tubes


def _side_marker(
    rng: np.random.Generator, shape: tuple[int, int], field: tuple[int, int, int, int]
) -> np.ndarray | None:
    """A lead "L"/"R" marker in a corner of the field, or nothing."""
    if rng.random() >= 0.6:
        return None
    h, w = shape
    top, bottom, left, right = field
    size = int(max(12, 0.05 * min(h, w)))
    canvas = Image.new("F", (w, h), 0.0)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=size)
    margin = int(rng.integers(4, 4 + size))
    x = left + margin if rng.random() < 0.5 else right - margin - size
    y = top + margin if rng.random() < 0.5 else bottom - margin - int(size * 1.2)
    draw.rectangle([x - 3, y - 3, x + size + 3, y + int(size * 1.2) + 3], fill=0.35)
    draw.text((x + size * 0.15, y), "L" if rng.random() < 0.5 else "R", fill=2.2, font=font)
    return np.asarray(canvas, dtype=np.float32)


def _draw_field(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    """Collimated field as (top, bottom, left, right), half-open pixel bounds."""
    if rng.random() < _NO_COLLIMATION_PROBABILITY:
        return 0, h, 0, w
    cuts = []
    for side in (h, h, w, w):
        has = rng.random() < _COLLIMATION_SIDE_PROBABILITY
        cuts.append(int(side * rng.uniform(*_COLLIMATION_WIDTH_FRACTION)) if has else 0)
    return cuts[0], h - cuts[1], cuts[2], w - cuts[3]


def check_size_range(size_range_px: tuple[int, int]) -> None:
    """Refuse a (low, high) side range that is inverted or too small for a valve."""
    lo, hi = size_range_px
    if not _MIN_SIDE_PX <= lo <= hi:
        raise ValueError(
            f"size_range_px must satisfy {_MIN_SIDE_PX} <= low <= high, got {size_range_px}"
        )


def _draw_shape(rng: np.random.Generator, size_range_px: tuple[int, int]) -> tuple[int, int]:
    """(height, width): width uniform in the range, height from an aspect of 0.75–1.33."""
    lo, hi = size_range_px
    w = int(rng.integers(lo, hi + 1))
    h = int(np.clip(round(w * rng.uniform(0.75, 1.33)), lo, hi))
    return h, w


def _place_valve(
    rng: np.random.Generator,
    drawn: tuple[int, int, int, int],
    offset: tuple[float, float],
    field: tuple[int, int, int, int],
    head: _Head,
) -> tuple[tuple[int, int], bool]:
    """Whole-pixel shift that puts the drawn valve box inside the field: (shift, near_edge).

    ``drawn`` is the half-open box of the drawn valve before the shift, ``offset`` its
    sub-pixel centre. A few valves hug a field edge (a gap of a few pixels); the others
    prefer positions over the head, where shunt valves sit.
    """
    top, bottom, left, right = field
    x0, y0, x1, y1 = drawn
    m = _EDGE_MARGIN_PX
    x_lo, x_hi = left + m - x0, right - m - x1
    y_lo, y_hi = top + m - y0, bottom - m - y1
    if x_lo > x_hi or y_lo > y_hi:
        raise ValueError("the valve does not fit in the field; use larger images")
    if rng.random() < _NEAR_EDGE_PROBABILITY:
        gap = int(rng.integers(_NEAR_EDGE_GAP_PX[0], _NEAR_EDGE_GAP_PX[1] + 1))
        tx, ty = int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1))
        side = int(rng.integers(4))
        if side == 0:
            ty = top + gap - y0
        elif side == 1:
            ty = bottom - gap - y1
        elif side == 2:
            tx = left + gap - x0
        else:
            tx = right - gap - x1
        return (int(np.clip(tx, x_lo, x_hi)), int(np.clip(ty, y_lo, y_hi))), True
    for _ in range(30):
        tx, ty = int(rng.integers(x_lo, x_hi + 1)), int(rng.integers(y_lo, y_hi + 1))
        if head.contains(offset[0] + tx, offset[1] + ty, 1.05):
            break
    return (tx, ty), False


def render_xray(
    rng: np.random.Generator,
    label: str,
    *,
    shape: tuple[int, int] | None = None,
    size_range_px: tuple[int, int] = DEFAULT_SIZE_RANGE_PX,
    traits: PatientTraits | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Draw one skull radiograph with a ``label`` valve: (image, info).

    The image is float32 (height, width), bright bone, in [0, 1]: collimation borders are
    exactly 0, everything inside the field is above ~0.04. ``shape`` fixes (height, width);
    otherwise both are drawn from ``size_range_px``. ``traits`` carries the patient's traits
    (drawn if omitted). ``info`` describes what was drawn: ``field`` (top, bottom, left,
    right), the valve centre ``valve_x``/``valve_y`` (pixels, x = column), the half-open
    pixel box ``valve_bbox`` (x0, y0, x1, y1) of everything drawn for it (connectors
    included, tubing not), ``valve_angle_deg``, ``valve_tilt_deg``,
    ``valve_length_px``, ``valve_scale`` (length / image width), ``near_edge``, ``view``,
    the pressure setting ``valve_setting`` (its ``<Choice>`` value, :data:`SETTING_SCALES`)
    with its ``valve_setting_index`` (None for "Other valve", which has none) and
    ``valve_setting_deg``, the rotor angle drawn...
    """
    if label not in DRAWABLE_CLASSES:
        raise ValueError(f"unknown valve class {label!r}; expected one of {DRAWABLE_CLASSES}")
    check_size_range(size_range_px)
    traits = traits or draw_patient_traits(rng)
    h, w = shape if shape is not None else _draw_shape(rng, size_range_px)
    field = _draw_field(rng, h, w)
    top, bottom, left, right = field

    # Head pose: the skull fills most of the field, sometimes running off it.
    view = "lateral" if rng.random() < 0.6 else "ap"
    aspect = traits.aspect if view == "lateral" else 1.0 / rng.uniform(1.05, 1.2)
    radius = 0.5 * min(bottom - top, right - left) * rng.uniform(0.8, 1.0) * traits.size_factor
    head = _Head(
        cx=(left + right) / 2 + rng.uniform(-0.08, 0.08) * (right - left),
        cy=(top + bottom) / 2 + rng.uniform(-0.1, 0.05) * (bottom - top),
        a=radius * math.sqrt(aspect),
        b=radius / math.sqrt(aspect),
        angle=math.radians(rng.uniform(-15, 15)),
        view=view,
        faces_left=traits.faces_left,
    )
    mu = _head_attenuation(rng, head, traits, (h, w))

    # The valve: length, in-plane angle, out-of-plane tilt along a random axis, mirror side.
    length_px = traits.valve_length_fraction * w * rng.uniform(*_VALVE_LENGTH_JITTER)
    angle = rng.uniform(0.0, 2 * math.pi)
    tilt = math.radians(_MAX_TILT_DEG * rng.uniform(0.0, 1.0) ** 1.6)
    tilt_axis = rng.uniform(0.0, math.pi)
    mirror = bool(rng.random() < 0.5)
    setting = rng.uniform(0.0, 2 * math.pi)
    # The setting is discrete: the same draw picks one of the model's settings (so the random
    # stream, and everything else drawn, is what it was when the angle was continuous).
    scale = SETTING_SCALES.get(label)
    setting_index: int | None = None
    setting_value: str | None = None
    if scale is not None:
        setting_index = min(int(setting / (2 * math.pi) * len(scale)), len(scale) - 1)
        setting_value = scale[setting_index]
        setting = setting_angle(label, setting_index)
    drawing = draw_valve(label, setting, traits.valve_variant)
    matrix = valve_matrix(length_px, angle, tilt, tilt_axis, mirror)
    # Draw around a random sub-pixel origin, then shift by whole pixels into the field, so
    # the placement sees exactly what was drawn.
    offset = (float(rng.uniform(0.0, 1.0)), float(rng.uniform(0.0, 1.0)))
    valve, vx0, vy0 = render_valve(drawing, matrix, offset)
    # Same peak for every model *as the detector sees it* (after the PSF): otherwise small
    # bright markers would set a model-specific image maximum, and with it the brightness
    # of the whole skull after scaling.
    psf_sigma = rng.uniform(0.6, 1.1)
    peak = float(gaussian_blur(valve, psf_sigma).max())
    valve *= rng.uniform(2.2, 3.2) / max(peak, 1e-6)
    drawn_y, drawn_x = np.nonzero(valve > _DRAWN_FRACTION * float(valve.max()))
    drawn = (
        vx0 + int(drawn_x.min()),
        vy0 + int(drawn_y.min()),
        vx0 + int(drawn_x.max()) + 1,
        vy0 + int(drawn_y.max()) + 1,
    )
    (tx, ty), near_edge = _place_valve(rng, drawn, offset, field, head)
    paste(mu, valve, vx0 + tx, vy0 + ty)
    center = (offset[0] + tx, offset[1] + ty)
    drawn_bbox = (drawn[0] + tx, drawn[1] + ty, drawn[2] + tx, drawn[3] + ty)

    c = np.asarray(center)
    inlet = c + matrix @ np.array([-0.49, 0.0])
    outlet = c + matrix @ np.array([drawing.outlet_x - 0.01, 0.0])
    axis = matrix @ np.array([1.0, 0.0])
    axis /= np.linalg.norm(axis)
    mu += _tubing_attenuation(rng, (h, w), head, inlet, -axis, outlet, axis, length_px)
    marker = _side_marker(rng, (h, w), field)
    if marker is not None:
        mu += marker

    # Detector: exposure gradient (heel effect), PSF blur, quantum noise, log, processing.
    yy, xx = np.ogrid[0:h, 0:w]
    gx, gy = rng.uniform(-0.25, 0.25, size=2)
    gain = (1.0 + gx * (xx / w - 0.5) + gy * (yy / h - 0.5)).astype(np.float32)
    intensity = gaussian_blur(np.exp(-mu) * gain, psf_sigma)
    photons = rng.uniform(400.0, 3000.0)
    noise = rng.standard_normal((h, w), dtype=np.float32)
    intensity += noise * np.sqrt(np.maximum(intensity, 1e-4) / photons)
    signal = -np.log(np.clip(intensity, 1e-3, None))
    signal += 3.0 / math.sqrt(photons)  # keep the air noise above the floor
    # Processing as on a CR workstation: compress the large-scale range (subtract part of a
    # heavily blurred copy), which keeps small details such as the valve contrasty, then a
    # soft-knee tone curve.
    signal -= rng.uniform(0.3, 0.5) * lowpass(signal, 16)
    floor = rng.uniform(0.04, 0.1)
    knee = rng.uniform(1.1, 1.5)
    image = floor + (1.0 - floor) * np.tanh(np.clip(signal, 0.0, None) / knee)

    out = np.zeros((h, w), dtype=np.float32)
    out[top:bottom, left:right] = image[top:bottom, left:right]

    info: dict[str, Any] = {
        "height": h,
        "width": w,
        "field": field,
        "view": view,
        "valve_x": center[0],
        "valve_y": center[1],
        "valve_bbox": drawn_bbox,
        "valve_angle_deg": math.degrees(angle),
        "valve_tilt_deg": math.degrees(tilt),
        "valve_tilt_axis_deg": math.degrees(tilt_axis),
        "valve_mirrored": mirror,
        "valve_setting": setting_value,
        "valve_setting_index": setting_index,
        "valve_setting_deg": math.degrees(setting),
        "valve_length_px": length_px,
        "valve_scale": length_px / w,
        "near_edge": near_edge,
        "side_marker": marker is not None,
    }
    return out, info
