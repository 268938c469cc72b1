"""The four valve models, and some that are none of them, as radiopacity drawings.

Each model is a list of parts in a valve-local frame: flow along +x, the inflow connector
tip at x = -0.5 and the outflow tip at x = +0.5 (one "valve length"), y across. A part is a
signed distance function, an opacity (relative to the metal parts) and a profile: "flat"
parts are metal sheets with an anti-aliased edge; "dome" parts are rounded silicone or
titanium bodies whose projected thickness falls to zero at their outline. Parts add up
(attenuation is additive); a negative opacity is a hole in a plate.

The drawings are inspired by the devices' radiographic appearance, not measured from them;
they only need to be distinct in the way the real ones are, and equally hard to see: the
four models have a similar total opacity, and the renderer scales every valve to the same
peak, so only geometry separates them.

Each model's pressure setting is discrete (:data:`SETTING_SCALES`, the ``<Choice>`` values
of its setting in ``label_config.xml``); setting k of n turns the rotor to 2πk/n
(:func:`setting_angle`). For the setting to be readable, no setting may look like another
(a rotor part that looks the same half a turn on needs a companion that does not), and a
mirrored valve (seen from its other side) may look like no setting of the unmirrored one:
every body has a part off its axis.

"Other valve" (:data:`OTHER_VALVE`) is a family of devices unlike the four, with the same
conventions and a similar total opacity: a fixed-pressure in-line tubular valve, a round
reservoir with a needle-stop plate, and a flat paddle with a bar magnet
(:data:`OTHER_VALVE_GEOMETRIES`; the patient's ``variant`` picks one). No model version
can learn them from the four; they test that valve-id flags a valve it has never seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from training.synthetic.raster import SUPERSAMPLING, downsample, rotation

__all__ = [
    "DRAWABLE_CLASSES",
    "OTHER_VALVE",
    "OTHER_VALVE_GEOMETRIES",
    "SETTING_SCALES",
    "VALVE_CLASSES",
    "ValveDrawing",
    "draw_valve",
    "other_valve_geometry",
    "render_valve",
    "setting_angle",
    "valve_matrix",
]

VALVE_CLASSES: tuple[str, ...] = (
    "Codman Hakim",
    "Codman Certas Plus",
    "Sophysa Sophy SM8",
    "proGAV 2.0",
)
"""The four learnable valve models, spelled exactly as the ``<Choice>`` values of
``label_config.xml``: the default class mix and every demo draw only these."""

SETTING_SCALES: dict[str, tuple[str, ...]] = {
    "Codman Hakim": tuple(str(p) for p in range(30, 201, 10)),  # mmH2O
    "Codman Certas Plus": tuple(str(k) for k in range(1, 9)),
    "Sophysa Sophy SM8": tuple(str(k) for k in range(1, 9)),  # rotor positions
    "proGAV 2.0": tuple(str(p) for p in range(21)),  # cmH2O
}
"""Each learnable model's settings, lowest first, spelled exactly as the ``<Choice>`` values of
its setting in ``label_config.xml``; the generator draws setting k at :func:`setting_angle`."""

OTHER_VALVE = "Other valve"
"""The ``<Choice>`` value for a valve that is none of :data:`VALVE_CLASSES`; drawn as one of
:data:`OTHER_VALVE_GEOMETRIES`, never in a mix unless asked for."""

DRAWABLE_CLASSES: tuple[str, ...] = (*VALVE_CLASSES, OTHER_VALVE)
"""Every label this generator can draw (the four models, then :data:`OTHER_VALVE`)."""

OTHER_VALVE_GEOMETRIES: tuple[str, ...] = ("in-line tubular", "round reservoir", "paddle")
"""The "Other valve" devices, in the order the per-patient ``variant`` picks them
(:func:`other_valve_geometry`)."""

_SILICONE = 0.16
"""Attenuation of the silicone housing relative to the valve's metal parts."""
_TITANIUM = 0.38
"""Attenuation of a titanium plate relative to the metal parts."""
_METAL = 0.85
"""Attenuation of rotor rings, springs and magnets."""
_MARKER = 1.2
"""Attenuation of tantalum markers (the brightest things in a valve)."""

Sdf = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""A signed distance function of valve-local coordinates (negative inside)."""


@dataclass(frozen=True)
class _Part:
    sdf: Sdf
    opacity: float
    dome_radius: float = 0.0  # 0: flat sheet; > 0: rounded body of this half-thickness


def _circle(cx: float, cy: float, r: float) -> Sdf:
    return lambda u, v: np.hypot(u - cx, v - cy) - r


def _ellipse(cx: float, cy: float, a: float, b: float) -> Sdf:
    return lambda u, v: (np.hypot((u - cx) / a, (v - cy) / b) - 1.0) * min(a, b)


def _box(cx: float, cy: float, hw: float, hh: float, r: float = 0.0, angle: float = 0.0) -> Sdf:
    c, s = math.cos(angle), math.sin(angle)

    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        du, dv = u - cx, v - cy
        qx = np.abs(c * du + s * dv) - (hw - r)
        qy = np.abs(-s * du + c * dv) - (hh - r)
        outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
        return outside + np.minimum(np.maximum(qx, qy), 0.0) - r

    return sdf


def _segment(x0: float, y0: float, x1: float, y1: float, r: float) -> Sdf:
    dx, dy = x1 - x0, y1 - y0
    length2 = dx * dx + dy * dy

    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        t = np.clip(((u - x0) * dx + (v - y0) * dy) / length2, 0.0, 1.0)
        return np.hypot(u - x0 - t * dx, v - y0 - t * dy) - r

    return sdf


def _ring(cx: float, cy: float, r: float, t: float) -> Sdf:
    return lambda u, v: np.abs(np.hypot(u - cx, v - cy) - r) - t / 2


def _arc(cx: float, cy: float, r: float, t: float, mid: float, half_span: float) -> Sdf:
    """A ring sector centred on angle ``mid`` (rad) spanning ± ``half_span``, round ends."""
    ends = [
        (cx + r * math.cos(mid + s * half_span), cy + r * math.sin(mid + s * half_span))
        for s in (-1, 1)
    ]

    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        du, dv = u - cx, v - cy
        off = np.abs(np.angle(np.exp(1j * (np.arctan2(dv, du) - mid))))
        on_arc = np.abs(np.hypot(du, dv) - r)
        to_end = np.minimum(*(np.hypot(u - ex, v - ey) for ex, ey in ends))
        return np.where(off <= half_span, on_arc, to_end) - t / 2

    return sdf


def _gear(cx: float, cy: float, r: float, t: float, teeth: int, tooth: float, phase: float) -> Sdf:
    """A ring whose outer edge carries ``teeth`` square-ish teeth of height ``tooth``."""

    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        du, dv = u - cx, v - cy
        rho = np.hypot(du, dv)
        wave = 0.5 + 0.5 * np.tanh(4.0 * np.sin(teeth * (np.arctan2(dv, du) - phase)))
        outer = r + t / 2 + tooth * wave
        return np.maximum(rho - outer, (r - t / 2) - rho)

    return sdf


def _spiral(
    cx: float, cy: float, r0: float, r1: float, turns: float, t: float, phase: float
) -> Sdf:
    """An Archimedean spiral from radius ``r0`` to ``r1`` (a cam track)."""
    pitch = (r1 - r0) / (turns * 2 * math.pi)
    max_turn = math.ceil(turns)

    def sdf(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        du, dv = u - cx, v - cy
        rho = np.hypot(du, dv)
        theta = np.mod(np.arctan2(dv, du) - phase, 2 * math.pi)
        k = np.clip(np.round((rho - r0 - pitch * theta) / (2 * math.pi * pitch)), 0, max_turn)
        track = r0 + pitch * (theta + 2 * math.pi * k)
        d = np.abs(rho - track)
        d = np.where(track > r1 + t, np.inf, d)
        return np.minimum(d, np.hypot(du - r1 * math.cos(phase), dv - r1 * math.sin(phase))) - t / 2

    return sdf


def _subtract(
    a: Sdf,
    b: Sdf,
) -> Sdf:
    return lambda u, v: np.maximum(a(u, v), -b(u, v))


def _union(a: Sdf, b: Sdf) -> Sdf:
    return lambda u, v: np.minimum(a(u, v), b(u, v))


def _polar(r: float, angle: float, cx: float = 0.0, cy: float = 0.0) -> tuple[float, float]:
    return cx + r * math.cos(angle), cy + r * math.sin(angle)


def setting_angle(label: str, index: int) -> float:
    """The rotor angle (rad, valve-local) of setting ``index`` of a ``label`` valve: a full
    turn shared evenly by its :data:`SETTING_SCALES` (k of n → 2πk/n), so neighbouring settings
    are one step apart and the highest is one step short of the lowest."""
    n = len(SETTING_SCALES[label])
    if not 0 <= index < n:
        raise ValueError(f"{label} has settings 0..{n - 1}, got {index}")
    return 2 * math.pi * index / n


def _connectors(x_body_in: float, x_body_out: float, x_out: float = 0.5) -> list[_Part]:
    """Inflow and outflow connector stubs, identical for every model."""
    return [
        _Part(_segment(-0.474, 0.0, x_body_in, 0.0, 0.026), _SILICONE * 1.6, 0.026),
        _Part(_segment(x_body_out, 0.0, x_out - 0.026, 0.0, 0.026), _SILICONE * 1.6, 0.026),
        _Part(_circle(-0.46, 0.0, 0.035), _SILICONE * 0.8, 0.03),  # barbs
        _Part(_circle(x_out - 0.04, 0.0, 0.035), _SILICONE * 0.8, 0.03),
    ]


@dataclass(frozen=True)
class ValveDrawing:
    parts: list[_Part]
    extent: tuple[float, float, float, float]  # x0, x1, y0, y1 in valve-local units
    outlet_x: float  # where the outflow tubing starts


def _codman_hakim(setting: float, variant: float) -> ValveDrawing:
    """Rounded-rectangular housing: a soft prechamber, a square titanium plate with a
    rotor ring carrying a spiral cam and a bright tab marker, a flat spring to a ball seat,
    a white reference bar, and a flat tail flange towards the outlet."""
    rc = (0.17, 0.0)
    parts = [
        _Part(_box(-0.17, 0.0, 0.25, 0.105, 0.1), _SILICONE * 1.3, 0.1),  # prechamber
        _Part(_box(0.355, 0.0, 0.075, 0.055, 0.04), _SILICONE * 0.7),  # flat tail
        _Part(_box(0.165, 0.0, 0.13, 0.1, 0.025), _TITANIUM),  # base plate
        _Part(_ring(*rc, 0.068, 0.02), _METAL),  # rotor
        _Part(_spiral(*rc, 0.015, 0.05, 1.4, 0.011, setting), _METAL * 0.9),  # cam
        _Part(_circle(*_polar(0.085, setting, *rc), 0.017), _MARKER),  # setting tab
        _Part(_segment(0.05, -0.045, 0.13, -0.06, 0.006), _METAL),  # flat spring
        _Part(_ring(0.045, 0.0, 0.022, 0.009), _METAL),  # ball seat
        _Part(_circle(0.045, 0.0, 0.011), _METAL * 0.6),  # ball
        _Part(_box(0.275, 0.0, 0.006, 0.065), _MARKER),  # reference bar
    ]
    return ValveDrawing(parts + _connectors(-0.42, 0.43), (-0.5, 0.5, -0.11, 0.11), 0.5)


def _codman_certas_plus(setting: float, variant: float) -> ValveDrawing:
    """Similar footprint to the Hakim, but a round titanium base with a coded ring of eight
    tantalum dots (one elongated reference mark), a twin magnet bar through the rotor hub
    with a tantalum ball in the sector it points to (the bar alone reads the same half a
    turn on), a chevron pointing to the outlet, and a right-hand marker off the valve axis
    (tells the valve from its mirror image)."""
    rc = (0.12, 0.0)
    parts = [
        _Part(_box(-0.05, 0.0, 0.36, 0.125, 0.12), _SILICONE * 1.3, 0.12),  # housing
        _Part(_circle(*rc, 0.125), _TITANIUM * 0.8),  # base
        _Part(_ring(*rc, 0.093, 0.013), _METAL * 0.8),  # rotor rim
        _Part(_circle(*rc, 0.016), _MARKER),  # hub
        _Part(_segment(-0.22, 0.0, -0.08, 0.0, 0.012), _METAL * 0.5),  # inflow channel
        _Part(_box(-0.15, 0.075, 0.035, 0.016, 0.006), _MARKER),  # right-hand marker
    ]
    for k in range(8):
        angle = k * math.pi / 4
        if k == 0:
            parts.append(
                _Part(_box(*_polar(0.112, angle, *rc), 0.02, 0.008, 0.004, angle), _MARKER)
            )
        else:
            parts.append(_Part(_circle(*_polar(0.112, angle, *rc), 0.01), _MARKER))
    normal = setting + math.pi / 2
    for side in (-1, 1):
        ox, oy = _polar(0.024 * side, normal)
        parts.append(_Part(_box(rc[0] + ox, rc[1] + oy, 0.068, 0.012, 0.004, setting), _METAL))
    parts += [
        _Part(_circle(*_polar(0.076, setting, *rc), 0.02), _MARKER),  # the rotor's ball
        _Part(_segment(0.255, -0.035, 0.29, 0.0, 0.007), _MARKER),
        _Part(_segment(0.255, 0.035, 0.29, 0.0, 0.007), _MARKER),
    ]
    return ValveDrawing(parts + _connectors(-0.41, 0.3), (-0.5, 0.5, -0.13, 0.13), 0.5)


def _sophysa_sophy_sm8(setting: float, variant: float) -> ValveDrawing:
    """An oval housing around a round rotor: a semicircular magnet arc with bright
    micro-magnets at both ends, a pointer from the pivot opposite the arc, a ring-shaped
    ball seat on the inflow side, and a short orientation bar off the valve axis on the
    outflow side (tells the valve from its mirror image)."""
    rc = (0.04, 0.0)
    end_a, end_b = setting - math.pi / 2, setting + math.pi / 2
    pointer = _polar(0.12, setting + math.pi, *rc)
    parts = [
        _Part(_ellipse(0.0, 0.0, 0.4, 0.24), _SILICONE * 0.45),  # flange
        _Part(_ellipse(0.0, 0.0, 0.33, 0.19), _SILICONE * 1.3, 0.15),  # body
        _Part(_circle(*rc, 0.13), _SILICONE * 1.2),  # rotor disc
        _Part(_arc(*rc, 0.095, 0.032, setting, math.pi / 2), _METAL),  # magnet arc
        _Part(_circle(*_polar(0.095, end_a, *rc), 0.024), _MARKER),
        _Part(_circle(*_polar(0.095, end_b, *rc), 0.024), _MARKER),
        _Part(_segment(*rc, *pointer, 0.009), _METAL),  # pointer
        _Part(_circle(*pointer, 0.017), _MARKER),
        _Part(_circle(*rc, 0.018), _MARKER),  # pivot
        _Part(_ring(-0.2, 0.0, 0.03, 0.011), _METAL * 0.9),  # ball seat
        _Part(_box(0.22, 0.09, 0.035, 0.016, 0.006), _MARKER),  # orientation bar
    ]
    return ValveDrawing(parts + _connectors(-0.33, 0.33), (-0.5, 0.5, -0.245, 0.245), 0.5)


def _progav_2(setting: float, variant: float) -> ValveDrawing:
    """A small titanium disc with a toothed rotor ring, four magnet dots in two pairs, two
    dark holes on the rotor's back side only (the magnets alone read the same half a turn
    on), and a dark crescent on the inflow side whose horns point to one side (tells the
    valve from its mirror image), held by a T-shaped bracket; for half the patients a
    gravitational unit (capsule with balls) follows in line."""
    front, back = setting, setting + math.pi
    titanium = _TITANIUM * 0.45  # thin sheet: keeps the valve's total opacity like the others
    parts = [
        _Part(_circle(0.0, 0.0, 0.19), _SILICONE * 0.7, 0.1),  # silicone coat
        _Part(_circle(0.0, 0.0, 0.15), titanium),  # titanium disc
        _Part(_box(-0.23, 0.0, 0.08, 0.03, 0.01), titanium),  # inflow neck
        _Part(_box(0.2, 0.0, 0.07, 0.035, 0.01), titanium),  # bracket stem
        _Part(_box(0.27, 0.0, 0.014, 0.09, 0.007), titanium * 1.5),  # bracket bar
        _Part(_gear(0.0, 0.0, 0.105, 0.016, 18, 0.015, setting), _METAL * 0.7),  # rotor
        _Part(_circle(0.0, 0.0, 0.02), _METAL * 0.6),  # axle
    ]
    for base in (front, back):
        for side in (-1, 1):
            parts.append(_Part(_circle(*_polar(0.062, base + side * 0.5), 0.018), _MARKER))
    for side in (-1, 1):
        parts.append(_Part(_circle(*_polar(0.07, back + side * 1.25), 0.015), -titanium))
    crescent = _subtract(_circle(-0.12, 0.0, 0.032), _circle(*_polar(0.02, 1.0, -0.12), 0.03))
    parts.append(_Part(crescent, -titanium))

    extent = (-0.5, 0.5, -0.2, 0.2)
    outlet = 0.5
    connectors = _connectors(-0.31, 0.28)
    if variant < 0.5:  # shunt assistant in line
        parts += [
            _Part(_segment(0.6, 0.0, 0.92, 0.0, 0.045), _TITANIUM * 0.5, 0.045),
            _Part(_segment(0.5, 0.0, 0.56, 0.0, 0.026), _SILICONE * 1.6, 0.026),
        ]
        parts += [_Part(_circle(x, 0.0, 0.02), _MARKER * 0.5) for x in (0.66, 0.72, 0.78, 0.84)]
        connectors += [_Part(_segment(0.96, 0.0, 0.974, 0.0, 0.026), _SILICONE * 1.6, 0.026)]
        extent, outlet = (-0.5, 1.0, -0.2, 0.2), 1.0
    return ValveDrawing(parts + connectors, extent, outlet)


# ----------------------------------------------------------------- "Other valve" devices


def _inline_tubular(setting: float, variant: float) -> ValveDrawing:
    """A fixed-pressure in-line valve: a slim silicone sleeve over a titanium tube (walls
    brighter than its bore), a small metal seat with a ball, a coil spring behind it, two
    end ferrules and one to three code dots for the pressure level. No rotor, no plate:
    ``setting`` is unused."""
    tube = _TITANIUM * 1.5
    parts = [
        _Part(_segment(-0.33, 0.0, 0.33, 0.0, 0.062), _SILICONE * 1.3, 0.062),  # sleeve
        _Part(_segment(-0.2, 0.0, 0.2, 0.0, 0.042), tube, 0.042),  # titanium tube...
        _Part(_segment(-0.2, 0.0, 0.2, 0.0, 0.03), -tube * 0.03 / 0.042, 0.03),  # ...its bore
        _Part(_box(-0.21, 0.0, 0.014, 0.046, 0.004), _METAL * 0.8),  # inflow ferrule
        _Part(_box(0.21, 0.0, 0.014, 0.046, 0.004), _METAL * 0.8),  # outflow ferrule
        _Part(_box(-0.12, 0.0, 0.01, 0.03, 0.003), _METAL),  # seat
        _Part(_circle(-0.095, 0.0, 0.02), _METAL * 0.9, 0.02),  # ball
    ]
    coil = np.linspace(-0.07, 0.13, 11)
    for k, (xa, xb) in enumerate(zip(coil[:-1], coil[1:], strict=True)):
        ya = 0.022 if k % 2 == 0 else -0.022
        parts.append(_Part(_segment(float(xa), ya, float(xb), -ya, 0.0045), _METAL * 0.8))
    for k in range(1 + int(variant * 9) % 3):  # pressure code
        parts.append(_Part(_circle(0.26 + 0.03 * k, 0.0, 0.011), _MARKER))
    return ValveDrawing(parts + _connectors(-0.33, 0.33), (-0.5, 0.5, -0.065, 0.065), 0.5)


def _round_reservoir(setting: float, variant: float) -> ValveDrawing:
    """A large round reservoir valve: a silicone dome over a flat titanium needle-stop
    plate, a central metal disc (the valve mechanism) with a small hub, an outlet nozzle
    with a marker, and for half the patients a stiffening ring at the dome's rim. Fixed
    pressure: ``setting`` is unused."""
    rc = (-0.06, 0.0)
    parts = [
        _Part(_circle(*rc, 0.25), _SILICONE, 0.14),  # dome
        _Part(_circle(*rc, 0.18), _TITANIUM * 0.55),  # needle-stop plate
        _Part(_ring(*rc, 0.18, 0.012), _TITANIUM * 0.5),  # plate's rolled edge
        _Part(_circle(*rc, 0.062), _METAL * 0.75),  # central disc
        _Part(_circle(*rc, 0.018), _MARKER * 0.7),  # hub
        _Part(_segment(0.19, 0.0, 0.3, 0.0, 0.04), _SILICONE * 1.2, 0.04),  # outlet nozzle
        _Part(_box(0.25, 0.0, 0.008, 0.03, 0.003), _MARKER * 0.8),  # outlet marker
    ]
    if variant * 3 % 1.0 < 0.5:
        parts.append(_Part(_ring(*rc, 0.232, 0.012), _METAL * 0.45))  # rim ring
    return ValveDrawing(parts + _connectors(-0.31, 0.3), (-0.5, 0.5, -0.255, 0.255), 0.5)


def _paddle(setting: float, variant: float) -> ValveDrawing:
    """A flat paddle-shaped programmable valve: a wide rounded head on the inflow side with
    a thin titanium disc and a bar magnet (one bar, or a pair) turned to the ``setting``,
    and a narrow flat handle carrying two in-line tantalum markers to the outlet."""
    head = (-0.14, 0.0)
    body = _union(_box(*head, 0.17, 0.17, 0.1), _box(0.16, 0.0, 0.16, 0.05, 0.03))
    parts = [
        _Part(body, _SILICONE),  # flat paddle
        _Part(_box(*head, 0.15, 0.15, 0.09), _SILICONE * 0.6, 0.08),  # head's thickening
        _Part(_circle(*head, 0.115), _TITANIUM * 0.45),  # disc
        _Part(_circle(0.12, 0.0, 0.018), _MARKER),  # in-line markers
        _Part(_circle(0.24, 0.0, 0.018), _MARKER),
    ]
    if variant * 3 % 1.0 < 0.5:
        parts.append(_Part(_box(*head, 0.095, 0.02, 0.006, setting), _METAL))
    else:
        for side in (-1, 1):
            ox, oy = _polar(0.03 * side, setting + math.pi / 2)
            parts.append(_Part(_box(head[0] + ox, oy, 0.085, 0.012, 0.004, setting), _METAL))
    return ValveDrawing(parts + _connectors(-0.3, 0.3), (-0.5, 0.5, -0.175, 0.175), 0.5)


_OTHER_DRAWERS: tuple[Callable[[float, float], ValveDrawing], ...] = (
    _inline_tubular,
    _round_reservoir,
    _paddle,
)


def other_valve_geometry(variant: float) -> str:
    """Which of :data:`OTHER_VALVE_GEOMETRIES` an "Other valve" patient with per-patient
    ``variant`` in [0, 1) has: equal thirds of the range, in order."""
    return OTHER_VALVE_GEOMETRIES[_other_index(variant)]


def _other_index(variant: float) -> int:
    return min(max(int(variant * len(_OTHER_DRAWERS)), 0), len(_OTHER_DRAWERS) - 1)


def _other_valve(setting: float, variant: float) -> ValveDrawing:
    """An "Other valve": the geometry ``variant`` picks; what is left of ``variant`` within
    its third picks that device's own variant."""
    return _OTHER_DRAWERS[_other_index(variant)](setting, variant)


_DRAWERS: Mapping[str, Callable[[float, float], ValveDrawing]] = {
    "Codman Hakim": _codman_hakim,
    "Codman Certas Plus": _codman_certas_plus,
    "Sophysa Sophy SM8": _sophysa_sophy_sm8,
    "proGAV 2.0": _progav_2,
    OTHER_VALVE: _other_valve,
}


def draw_valve(label: str, setting: float, variant: float) -> ValveDrawing:
    """The parts of a ``label`` valve: rotor/pointer at ``setting`` (rad; a model's own
    settings are at :func:`setting_angle`, "Other valve" devices have none to read), model
    variant chosen by ``variant`` in [0, 1) (per patient); for
    :data:`OTHER_VALVE` the variant also picks the device (:func:`other_valve_geometry`)."""
    try:
        drawer = _DRAWERS[label]
    except KeyError:
        raise ValueError(
            f"unknown valve class {label!r}; expected one of {DRAWABLE_CLASSES}"
        ) from None
    return drawer(setting, variant)


def valve_matrix(
    length_px: float, angle: float, tilt: float, tilt_axis: float, mirror: bool
) -> np.ndarray:
    """Valve-local units → image pixels (2×2): scale to ``length_px``, mirror (the valve seen
    from its other side), foreshorten by cos(``tilt``) across the in-plane axis at
    ``tilt_axis`` (out-of-plane tilt, rad), then turn by ``angle`` (rad)."""
    squash = rotation(tilt_axis) @ np.diag([math.cos(tilt), 1.0]) @ rotation(-tilt_axis)
    return rotation(angle) @ squash @ np.diag([length_px, -length_px if mirror else length_px])


def _extent_box(matrix: np.ndarray, extent: tuple[float, float, float, float]) -> np.ndarray:
    """Bounding box (x0, y0, x1, y1) of the local extent rectangle, relative to the centre."""
    x0, x1, y0, y1 = extent
    corners = matrix @ np.array([[x0, x1, x1, x0], [y0, y0, y1, y1]])
    return np.array([corners[0].min(), corners[1].min(), corners[0].max(), corners[1].max()])


def render_valve(
    drawing: ValveDrawing, matrix: np.ndarray, origin: tuple[float, float]
) -> tuple[np.ndarray, int, int]:
    """Attenuation of the valve on an image-aligned patch: (patch, x0, y0), unnormalised.

    ``matrix`` (from :func:`valve_matrix`) maps valve-local units to pixels; ``origin`` is
    the image position (x, y) of the local origin. The patch is not clipped to any image
    (x0, y0 may be negative), so what was drawn can be checked before it is pasted.
    """
    cx, cy = origin
    bx0, by0, bx1, by1 = _extent_box(matrix, drawing.extent)
    # A 3 px skirt holds the anti-aliased edge.
    x0, y0 = int(math.floor(cx + bx0)) - 3, int(math.floor(cy + by0)) - 3
    x1, y1 = int(math.ceil(cx + bx1)) + 3, int(math.ceil(cy + by1)) + 3
    ss = SUPERSAMPLING
    xs = x0 + (np.arange((x1 - x0) * ss, dtype=np.float64) + 0.5) / ss - cx
    ys = y0 + (np.arange((y1 - y0) * ss, dtype=np.float64) + 0.5) / ss - cy
    inv = np.linalg.inv(matrix)
    u = (inv[0, 0] * xs[None, :] + inv[0, 1] * ys[:, None]).astype(np.float32)
    v = (inv[1, 0] * xs[None, :] + inv[1, 1] * ys[:, None]).astype(np.float32)
    # Width of the anti-aliasing ramp: one sub-pixel, in local units (geometric mean of axes).
    sub_px_local = 1.0 / (ss * math.sqrt(abs(np.linalg.det(matrix))))
    total = np.zeros(u.shape, dtype=np.float32)
    for part in drawing.parts:
        d = part.sdf(u, v)
        if part.dome_radius > 0:
            x = np.clip(-d / part.dome_radius, 0.0, 1.0)
            cover = np.sqrt(x * (2.0 - x))
        else:
            cover = np.clip(0.5 - d / sub_px_local, 0.0, 1.0)
        total += part.opacity * cover
    np.maximum(total, 0.0, out=total)
    return downsample(total, ss), x0, y0
