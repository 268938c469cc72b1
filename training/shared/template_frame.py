"""A valve model's own frame: crops turned onto a template learned from that model's crops.

A setting is the rotor's angle relative to the valve, so the reader needs the valve's frame:
its axis, which end is which, and which face shows. :func:`~training.shared.locate_classify.
principal_axis` estimates the axis from the crop's second moments, which is poor where a
valve's bright part is nearly square or round. Here each valve model gets a template
instead: the mean of its crops once they are aligned to each other (iterated from the
principal-axis alignment, as single-particle averaging does), and each crop is turned (and
mirrored) onto it by an exhaustive search (normalised cross-correlation inside the inscribed
disc). The housing, connectors and fixed markers are the same in every crop of a model, so
they dominate the mean; the rotor, which differs by setting, averages out. It needs no
labels beyond the valve model, so a project's own X-rays give its templates.

Measured on radiograph-sized synthetic X-rays (``benchmarks/bench_setting_reader.py
--frames-only``, docs/TRAINING.md): the axis error's median and 90th percentile fell from
6.5°/48° to 1.7°/5.9° (Hakim), 8.2°/28° to 1.9°/5.9° (Certas Plus) and 7.6°/103° to
4.0°/17° (Sophy SM8); the proGAV, whose drawing turns nearly everything with its setting,
stayed at 14-15°/170°. The face it does not tell (the mirror the search picks agrees with the
generator's on half the X-rays): the marks that would are a pixel or two wide.

With a zoom search as well (:func:`scaled_alignment`, ``fit_template(scaled=True)``) and the
crop cut where the settings differ (:func:`setting_region`), the Hakim's reader alone went
from 0.11 to 0.49 exact and the Certas Plus's from 0.39 to 0.57 (``bench_setting_reader``
mode ``template scaled native``, 300 training X-rays, docs/TRAINING.md): the window's size,
not its turn, was what kept the Hakim unread (the Sophy SM8 read worse, 0.61 to 0.52: its
scaled template turned a third of its X-rays end for end). Since 2026-12-07 afternoon a
version also fits each model's template on the reader's own window, unzoomed, which sets the
frame's axis, face and end, the scaled template only its zoom
(:func:`~training.shared.locate_classify.valve_frame`): it sees the valve at twice the
pixels, and the Sophy SM8 turned end for end fell to 0.06. Versions read this way since
2026-12-07: the recipe fits a template and region per valve model on each fold's training
X-rays (:func:`training.fitting.two_stage.fit_reader_frames`), the checkpoint keeps them, and
the network reads each model's setting in its own frame
(:meth:`training.shared.locate_classify.LocateClassifyNet.read`).

Neither template tells the face (agreement with the generator's 0.55-0.60): a valve's two
faces differ in a mark a few pixels wide, which the skull's shades and the rotor outweigh in
a template's correlation. Since 2026-12-07 (evening) a third template per model does
(:func:`fit_face`): the sparse, high-passed pattern that differs between the two sides of
the axis, outside the setting region, found without labels; the reader then sees each crop
as it is, not also mirrored (0.94 of Hakim, 0.91 of Certas Plus and 0.80 of Sophy SM8 test
X-rays shown in one face).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2.functional import gaussian_blur

__all__ = [
    "SCALES",
    "align_to_template",
    "face_signal",
    "fit_face",
    "fit_template",
    "other_face",
    "scale_to_template",
    "scaled_alignment",
    "setting_region",
    "turn",
]

SEARCH_STEP_DEG = 3.0
"""Finest angle step of the search (degrees); refinement is not needed below a tenth of a
setting step (17-45°)."""
COARSE_STEP_DEG = 9.0
"""Angle step of the search's first, coarse pass (degrees; a multiple of the fine step)."""
ALIGN_PX = 64
"""Side the crops are shrunk to for the search (the housing's outline needs no more)."""
FIT_ROUNDS = 5
"""Rounds of align-then-average when a template is fitted."""
SCALES = torch.exp(torch.linspace(math.log(0.6), math.log(1.6), 15))
"""Zooms a scaled search tries (7 % apart): a valve's length on synthetic X-rays varies about
2.5-fold relative to the X-ray's side, so the crops handed in must show up to 1.6 × the
template's valve."""


FACE_BLUR_PX = 2.5
"""The face signal is high-passed: this Gaussian's sigma (pixels at :data:`ALIGN_PX`) is
subtracted. The skull behind a valve differs between its two sides by smooth shades that
outweigh any small marker; a face mark is a few pixels (measured: without it the face found
agreed with the generator's on 0.55 of the test X-rays, with it 0.91 for the Certas Plus)."""
FACE_SHARE = 0.02
"""The face template keeps this share of its pixels, the strongest (a sparse template: the
marks that tell the faces apart are small; the rest of the window is noise)."""
FACE_ROUNDS = 30
"""Rounds of the face template's sign iteration."""
REGION_MARGIN = 1.2
"""The face template ignores the setting region (:func:`setting_region`) widened by this:
there the rotor, which differs by setting, makes either face look like some setting's."""
FACE_RADIUS = 0.65
"""The face template looks only this far from the centre (a fraction of the framed window's
half side): beyond the valve's ends the tubing bends to either side, consistently enough to
outweigh a mark (measured on the Hakim: 0.56 of its X-rays shown in the generator's face
with the whole window, 0.89 within 0.5-0.7; the Certas Plus and Sophy SM8 alike either way)."""


def turn(
    crops: torch.Tensor,
    angles: torch.Tensor,
    mirrored: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(B, S, S)`` crops turned by ``angles`` (rad, so that the image direction at that angle
    becomes the x axis, as :func:`~training.shared.locate_classify.crop_around` turns), then
    flipped across the x axis where ``mirrored``. ``scales`` ``(B,)``: the turned crop shows
    that many times the original's side around its centre (below 1 zooms in)."""
    n, s = crops.shape[0], crops.shape[-1]
    cos, sin = angles.float().cos(), angles.float().sin()
    if scales is not None:
        cos, sin = cos * scales.float(), sin * scales.float()
    theta = torch.zeros(n, 2, 3, dtype=torch.float32, device=crops.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    grid = F.affine_grid(theta, [n, 1, s, s], align_corners=False)
    out = F.grid_sample(crops.float()[:, None], grid, align_corners=False, padding_mode="border")
    out = out[:, 0]
    return torch.where(mirrored.view(n, 1, 1), out.flip(-2), out)


def _grid(side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(yy, xx)`` of a ``side``-px square's pixel centres, fractions of its half side."""
    c = (torch.arange(side, device=device, dtype=torch.float32) - (side - 1) / 2) / (side / 2)
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return yy, xx


def _disc(side: int, device: torch.device) -> torch.Tensor:
    yy, xx = _grid(side, device)
    return (xx.square() + yy.square() <= 1.0).float()


def _standardised(x: torch.Tensor, disc: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit norm inside ``disc``, zero outside: a dot product is then the NCC."""
    n = disc.sum()
    mean = (x * disc).sum((-2, -1), keepdim=True) / n
    centred = (x - mean) * disc
    return centred / centred.square().sum((-2, -1), keepdim=True).sqrt().clamp(min=1e-6)


def _small(crops: torch.Tensor) -> torch.Tensor:
    if crops.shape[-1] == ALIGN_PX:
        return crops.float()
    return F.interpolate(crops.float()[:, None], size=(ALIGN_PX, ALIGN_PX), mode="area")[:, 0]


def _scores(part: torch.Tensor, angles: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``(b, m, k)``: NCC of each of ``b`` crops turned by each of its ``angles`` ``(b, m, k)``
    with ``targets[j]`` ``(m, S, S)`` for the angles of row ``j``. Each crop is turned once
    per angle; a mirrored view is a turned crop flipped across its x axis (see :func:`turn`),
    which the flipped template scores the same (the disc is symmetric)."""
    b, m, k = angles.shape
    flat = angles.reshape(-1)
    tiled = part.repeat_interleave(m * k, 0)
    seen = _standardised(
        turn(tiled, flat, torch.zeros_like(flat, dtype=torch.bool)),
        _disc(part.shape[-1], part.device),
    )
    return (seen.view(b, m, k, *seen.shape[-2:]) * targets[None, :, None]).sum((-2, -1))


def align_to_template(
    crops: torch.Tensor,
    template: torch.Tensor,
    chunk: int = 32,
    scales: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B, S, S)`` crops centred on a valve → ``(angles, mirrored, score)``, each ``(B,)``:
    the turn (see :func:`turn`) and mirror that best match ``template`` ``(ALIGN_PX,
    ALIGN_PX)``, and that match's normalised cross-correlation (1 = identical). ``scales``:
    each crop zoomed so first (a zoom about the centre commutes with a turn, so the angles
    are the unzoomed crop's too).

    Coarse to fine: every :data:`COARSE_STEP_DEG` for each face, then every
    :data:`SEARCH_STEP_DEG` around the best of each. Against the exhaustive search every
    3° (2.4 × the turns) it found the same face on every one of 60 test X-rays per model
    (Hakim, Certas Plus, Sophy SM8; radiograph-sized synthetic X-rays) and the same angle
    on 100 %, 97 % and 97 %; where not, the two were near ties (NCC 0.005 apart)."""
    small = _small(crops)
    if scales is not None:
        flat = torch.zeros(len(small), device=small.device)
        small = turn(small, flat, flat.bool(), scales)
    disc = _disc(ALIGN_PX, small.device)
    target = _standardised(template.float(), disc)
    targets = torch.stack([target, target.flip(-2)])  # as is, and the other face
    coarse = torch.arange(0.0, 360.0, COARSE_STEP_DEG, device=small.device).deg2rad()
    reach = COARSE_STEP_DEG - SEARCH_STEP_DEG
    fine = torch.arange(-reach, reach + 1e-3, SEARCH_STEP_DEG, device=small.device).deg2rad()
    best_angle, best_mirror, best_score = [], [], []
    for start in range(0, len(small), chunk):
        part = small[start : start + chunk]
        b = len(part)
        first = _scores(part, coarse.expand(b, 2, -1), targets)  # (b, 2 faces, coarse)
        around = coarse[first.argmax(2)][:, :, None] + fine  # (b, 2, fine) about each best
        score, index = _scores(part, around, targets).view(b, -1).max(1)
        best_mirror.append(index >= len(fine))
        best_angle.append(around.view(b, -1).gather(1, index[:, None])[:, 0] % (2 * math.pi))
        best_score.append(score)
    return torch.cat(best_angle), torch.cat(best_mirror), torch.cat(best_score)


def scale_to_template(
    crops: torch.Tensor, template: torch.Tensor, angles: torch.Tensor, mirrored: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, S, S)`` crops already aligned in turn and face (``angles``, ``mirrored`` from
    :func:`align_to_template`) → ``(scales, score)``: the zoom of :data:`SCALES` at which
    each best matches ``template`` (see :func:`turn`), and that match's NCC. Searched after
    the turn: the housing's outline finds the axis at any zoom, and one search over both
    would cost :data:`SCALES` times as much."""
    small = _small(crops)
    disc = _disc(ALIGN_PX, small.device)
    target = _standardised(template.float(), disc)
    zooms = SCALES.to(small.device)
    k = len(zooms)
    seen = turn(
        small.repeat_interleave(k, 0),
        angles.repeat_interleave(k),
        mirrored.repeat_interleave(k),
        zooms.repeat(len(small)),
    )
    scores = (_standardised(seen, disc) * target).sum((-2, -1)).view(len(small), k)
    score, index = scores.max(1)
    return zooms[index], score


def scaled_alignment(
    crops: torch.Tensor, template: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(angles, mirrored, scales)`` of each crop on ``template``: turn and face at the
    template's zoom, the zoom at that turn, then turn and face again at that zoom and the zoom
    once more (a valve far from the template's size is turned poorly at its zoom)."""
    angles, mirrored, _ = align_to_template(crops, template)
    scales, _ = scale_to_template(crops, template, angles, mirrored)
    angles, mirrored, _ = align_to_template(crops, template, scales=scales)
    scales, _ = scale_to_template(crops, template, angles, mirrored)
    return angles, mirrored, scales


def fit_template(
    crops: torch.Tensor, start_angles: torch.Tensor, scaled: bool = False
) -> torch.Tensor:
    """A valve model's template ``(ALIGN_PX, ALIGN_PX)`` from ``(B, S, S)`` crops centred on
    its valves: their mean once turned by ``start_angles`` (the principal axes), then
    :data:`FIT_ROUNDS` rounds of aligning every crop to the mean and averaging again. The
    mean of standardised crops, so no one bright X-ray outweighs the rest. ``scaled``: each
    round also zooms every crop onto the mean (:func:`scale_to_template`), so valves drawn
    at different sizes add up to one sharp template (the crops must show the largest whole)."""
    small = _small(crops)
    disc = _disc(ALIGN_PX, small.device)
    unmirrored = torch.zeros(len(small), dtype=torch.bool, device=small.device)
    template = _standardised(turn(small, start_angles, unmirrored), disc).mean(0)
    for _ in range(FIT_ROUNDS):
        if scaled:
            angles, mirrored, scales = scaled_alignment(small, template)
            template = _standardised(turn(small, angles, mirrored, scales), disc).mean(0)
        else:
            angles, mirrored, _ = align_to_template(small, template)
            template = _standardised(turn(small, angles, mirrored), disc).mean(0)
    return template


def setting_region(
    framed: torch.Tensor, settings: torch.Tensor, n_settings: int
) -> tuple[float, float]:
    """Where on a valve its setting shows, learned from ``(B, S, S)`` crops in one frame
    (turned, zoomed) and their setting indices: ``(x, half)``, the centre along the frame's
    x axis and the half side of a square holding it, both as fractions of the crops' half
    side. The weight is how much the per-setting means differ (their variance over
    settings), above its 90th percentile; half is the radius that holds 80 % of it. The
    face is pooled (each crop and its flip across the axis), so the region sits on the axis
    whichever face the frame chose, and a valve model needs no drawing of its rotor."""
    both = torch.cat([framed.float(), framed.float().flip(-2)])
    labels = torch.cat([settings, settings])
    flat = both.reshape(len(both), -1)
    z = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp(min=1e-6)).view(
        both.shape
    )
    present = [k for k in range(n_settings) if bool((labels == k).any())]
    if len(present) < 2:
        raise ValueError(f"the setting region needs crops of 2 or more settings, got {present}")
    variance = torch.stack([z[labels == k].mean(0) for k in present]).var(0)
    weight = (variance - torch.quantile(variance.flatten(), 0.9)).clamp(min=0)
    side = framed.shape[-1]
    yy, xx = _grid(side, weight.device)
    total = weight.sum().clamp(min=1e-12)
    x = float((weight * xx).sum() / total)
    radius = ((xx - x).square() + yy.square()).sqrt().flatten()
    order = radius.argsort()
    held = weight.flatten()[order].cumsum(0) / total
    half = float(radius[order][int((held >= 0.8).nonzero()[0, 0])])
    return x, max(half, 2.0 / side)


def face_signal(framed: torch.Tensor) -> torch.Tensor:
    """``(B, ALIGN_PX, ALIGN_PX)``: what in each framed crop (axis and end found, face open)
    differs between its two sides of the axis: the standardised crop minus its flip across
    the x axis, high-passed (:data:`FACE_BLUR_PX`), inside the disc. Seen from its other
    face a valve gives the negative of this."""
    small = _small(framed)
    disc = _disc(ALIGN_PX, small.device)
    odd = _standardised(small, disc)
    odd = odd - odd.flip(-2)
    radius = math.ceil(3 * FACE_BLUR_PX)
    smooth = gaussian_blur(odd[:, None], [2 * radius + 1] * 2, [FACE_BLUR_PX] * 2)[:, 0]
    return (odd - smooth) * disc


def fit_face(framed: torch.Tensor, x: float, half: float) -> torch.Tensor:
    """A valve model's face template ``(ALIGN_PX, ALIGN_PX)`` from ``(B, S, S)`` crops of it
    in one frame whose face is still open (:func:`align_to_template` picks it by a template
    that cannot tell, as the faces of a valve differ only in marks a few pixels wide).

    A valve's fixed off-axis marks (the Certas Plus's right-hand marker, the Sophy SM8's
    orientation bar) show in every crop's :func:`face_signal` with one sign or the other,
    by the face it shows; the rotor is left out (the setting region ``(x, half)`` on this
    frame, :data:`REGION_MARGIN` wider), and so is the tubing (beyond :data:`FACE_RADIUS`);
    the skull's shades are high-passed away. The
    template is the direction most crops agree with up to their sign: started from the first
    principal component, then each crop signed by it and the template their signed mean,
    sparse (:data:`FACE_SHARE`), :data:`FACE_ROUNDS` times (an L1 principal component). No
    labels beyond the valve model. Which face is the template's is arbitrary, but the same
    for every crop, which is all the reader needs. Measured on radiograph-sized synthetic
    X-rays (150 training, 80 test per model): the face found agreed with the generator's on
    0.94 (Hakim), 0.91 (Certas Plus) and 0.80 (Sophy SM8) of the test X-rays, against
    0.50-0.60 with the window template's; the proGAV 2.0, whose frame is not found
    (:func:`~training.shared.locate_classify.valve_frame`), stays at 0.54."""
    signal = face_signal(framed)
    yy, xx = _grid(ALIGN_PX, signal.device)
    outside = ((xx - x).square() + yy.square()).sqrt() > half * REGION_MARGIN
    on_valve = (xx.square() + yy.square()).sqrt() < FACE_RADIUS
    flat = (signal * (outside & on_valve)).flatten(1)
    face = torch.linalg.svd(flat, full_matrices=False)[2][0]
    keep = max(1, round(FACE_SHARE * face.numel()))
    for _ in range(FACE_ROUNDS):
        face = (torch.sign(flat @ face)[:, None] * flat).mean(0)
        weakest = face.abs().argsort()[: face.numel() - keep]
        face[weakest] = 0.0
        face = face / face.norm().clamp(min=1e-12)
    return face.view(ALIGN_PX, ALIGN_PX)


def other_face(framed: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: which framed crops show the other face than ``face``'s
    (:func:`fit_face`), so their frame must be mirrored."""
    return (face_signal(framed) * face).sum((-2, -1)) < 0
