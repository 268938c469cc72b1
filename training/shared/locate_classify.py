"""Locate, then classify: the network that finds the valve on the whole X-ray and classifies a
crop around it.

A shunt valve covers ~1 % of a skull radiograph. Squished whole to 384 px it is ~40 px wide,
and a classifier must learn both where to look and what it sees from a few hundred labels —
too much for a CPU budget (measured: docs/TRAINING.md, "The cpu profile"). Split in two, each
part is easy: the locator answers "where is the bright valve" (a class-agnostic question,
learned from the valve centres annotators place as a keypoint), and the classifier sees the
valve at native resolution, filling its input.

:class:`LocateClassifyNet` is one ``nn.Module`` from the prepared image to class logits,
so checkpoints, the fold ensemble, out-of-fold evaluation and serving treat it exactly like
:class:`training.shared.model.ValveNet`:

* locator: the backbone's ImageNet body up to stride 16, frozen, at ``locator_px``; a small
  trained head scores every cell of that feature map, and the soft-argmax of those scores is
  the centre (differentiable, sub-cell precise);
* crop: a ``crop_fraction`` × ``crop_fraction`` window of the prepared image around the
  centre, resampled to ``crop_px`` (``grid_sample``);
* classifier: a :class:`~training.shared.model.ValveNet` on the crop, fine-tuned;
* setting reader (when the labeling config has setting scales): a second
  :class:`~training.shared.model.ValveNet` on a tighter crop around the same centre
  (``reader_fraction``, magnified to ``reader_px``: the setting marks are a few pixels),
  one logit per setting of every scale laid end to end; a valve model's setting is the
  softmax over its own block (:meth:`LocateClassifyNet.setting_blocks`). It has its own
  body: sharing the classifier's cost class accuracy (measured: 0.79 against 0.91). With
  ``reader_upright`` its crop is turned so that the valve's long axis lies horizontal
  (:func:`upright_crop`): a setting is the rotor's angle *relative to the valve*, which a
  CNN fails to learn from a few hundred crops at arbitrary angles (measured: chance) but
  learns once the valve lies one way (docs/TRAINING.md, "The pressure setting").
  Where a version fitted a valve model's template (:attr:`TwoStageParams.reader_frames`),
  that model's setting is read on a crop in the template's frame instead: turned, faced and
  zoomed onto the template and cut where its settings differ (:func:`framed_crops`,
  :mod:`training.shared.template_frame`; the Hakim read 0.11 → 0.49 exact), its face named
  by a face template (a mirrored rotor looks like another setting).

Its recipe for one fold is :func:`training.fitting.two_stage.train_two_stage_fold`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from training.shared.model import ValveNet, get_arch
from training.shared.preprocess import PreprocessParams, normalize_image, source_side_px
from training.shared.template_frame import (
    ALIGN_PX,
    align_to_template,
    other_face,
    scaled_alignment,
    turn,
)

__all__ = [
    "DESIGN",
    "DIRECTED_VIEWS",
    "FRAME_WIDE",
    "CropAnswer",
    "LocateClassifyNet",
    "ReaderFrames",
    "SettingLayout",
    "TwoStageParams",
    "UPRIGHT_VIEWS",
    "crop_around",
    "dihedral",
    "face_frame",
    "framed_crops",
    "native_crops",
    "principal_axis",
    "setting_blocks",
    "soft_argmax",
    "TEST_VIEW_ORDER",
    "averaged_views",
    "reader_windows",
    "upright_crop",
    "valve_frame",
]

logger = logging.getLogger(__name__)

DESIGN = "locate_classify"
"""Checkpoint ``design`` name of :class:`LocateClassifyNet`."""
LOCATOR_HIDDEN = 64
"""Channels of the locator head's hidden layer."""
AXIS_QUANTILE = 0.8
""":func:`principal_axis` weighs the pixels brighter than this quantile of their crop (the
valve's metal and housing). Measured on 600 product-like crops (0.08 of a 768-px prepared
image): median axis error 4° (Certas Plus) and 9° (Sophy SM8), worse at 0.9 and above."""

FRAME_WIDE = 2.0
"""A template search sees this many reader windows' sides around the centre: room for a valve
up to the zoom search's largest (:data:`~training.shared.template_frame.SCALES`)."""

SettingLayout = tuple[tuple[str, tuple[str, ...]], ...]
"""``((valve model, its setting values lowest first), ...)``: the setting head's blocks."""
FrameRegions = tuple[tuple[str, float, float], ...]
"""``((valve model, x, half), ...)``: the models whose reader crop is cut in their template's
frame, and where on it (:func:`~training.shared.template_frame.setting_region`)."""


class ReaderFrames(NamedTuple):
    """Where each reader crop sits on its valve, one entry per crop (each ``(B,)``): the turn
    (rad, on the X-ray), the mirror, the zoom (:func:`~training.shared.template_frame.turn`),
    and the setting region's centre along the axis and half side (fractions of the zoomed
    search window's half side). A NaN angle: that crop has no frame (directed crop)."""

    angles: torch.Tensor
    mirrored: torch.Tensor
    scales: torch.Tensor
    x: torch.Tensor
    half: torch.Tensor

    @classmethod
    def none(cls, n: int) -> ReaderFrames:
        """``n`` crops without a frame."""
        nan = torch.full((n,), math.nan)
        return cls(nan, torch.zeros(n, dtype=torch.bool), nan.clone(), nan.clone(), nan.clone())

    def rows(self, index: Any) -> ReaderFrames:
        return ReaderFrames(*(t[index] for t in self))

    @property
    def framed(self) -> torch.Tensor:
        """``(B,)`` bool: which crops have a frame."""
        return ~self.angles.isnan()


def setting_blocks(layout: SettingLayout) -> dict[str, slice]:
    """Each valve model's block of the setting logits, the scales laid end to end."""
    blocks, start = {}, 0
    for valve, values in layout:
        blocks[valve] = slice(start, start + len(values))
        start += len(values)
    return blocks


@dataclass(frozen=True)
class TwoStageParams:
    """Geometry of the two stages; saved in every checkpoint of this design."""

    backbone: str = "efficientnet_lite0"
    locator_px: int = 384
    """Side of the whole image the locator sees."""
    crop_fraction: float = 0.18
    """Side of the crop, as a fraction of the prepared image's side."""
    crop_px: int = 160
    """Side of the crop the classifier sees."""
    locator_depth: int = 7
    """Body modules the locator keeps: Lite0's stem + stages 0-4, stride 16. Its 24 × 24 cells
    (at 384 px) placed centres within 6 px (median) on 768-px synthetic X-rays where the last,
    stride-32 map managed 24 px (docs/TRAINING.md, "The cpu profile")."""
    settings: SettingLayout = ()
    """The setting scales the network reads (empty: it reads none)."""
    reader_fraction: float = 0.08
    """Side of the setting reader's crop, as a fraction of the prepared image's side."""
    reader_px: int = 128
    """Side of the crop the setting reader sees."""
    reader_upright: bool = False
    """Turn the reader's crop so the valve's long axis lies horizontal (:func:`upright_crop`).
    False in checkpoints from before it existed, which were trained on unturned crops."""
    reader_directed: bool = False
    """With ``reader_upright``: also turn the end the valve's bright structure is skewed to
    to the right (``upright_crop(directed=True)``). False in checkpoints from before it
    existed."""
    reader_native: bool = False
    """The reader reads the X-ray at its own pixels and aspect (:func:`native_crops` of the
    unsquished foreground :func:`~training.shared.preprocess.prepare_image_with_source`
    keeps), not the squished prepared square: a rotor's angle relative to the valve is the
    X-ray's own, and a large radiograph's marks keep their pixels. False in checkpoints
    from before it existed."""
    reader_frames: FrameRegions = ()
    """The valve models whose setting is read on a crop in their template's frame (the
    templates are the network's ``frame_templates`` buffer, in this order) and that crop's
    region on it. Empty in checkpoints from before it existed and where none was fitted:
    every setting is read on the directed crop."""
    frame_window: bool = False
    """Each framed model also has a template of the reader's own window, unzoomed, which
    sets the frame's axis, face and end; the scaled template sets only the zoom
    (:func:`valve_frame`). False in checkpoints from before it existed (2026-12-07)."""
    frame_face: bool = False
    """Each framed model also has a face template, which sets the frame's face
    (:func:`valve_frame`); the reader then sees its crops only as they are
    (:meth:`reader_views`). False in checkpoints from before it existed (2026-12-07, evening)."""
    test_views: tuple[int, ...] = (0,)
    """The flips/turns (:func:`dihedral`) each crop is seen in at inference, the answers
    averaged (test-time augmentation; :func:`averaged_views`). The classifier trained on all
    eight; the reader uses those of its own :meth:`reader_views`. ``(0,)`` (none) in
    checkpoints from before it existed."""

    def __post_init__(self) -> None:
        # A checkpoint stores the layout as lists; keep it hashable and comparable.
        layout = tuple((str(v), tuple(str(x) for x in values)) for v, values in self.settings)
        object.__setattr__(self, "settings", layout)
        regions = tuple((str(v), float(x), float(h)) for v, x, h in self.reader_frames)
        object.__setattr__(self, "reader_frames", regions)
        views = tuple(int(k) for k in self.test_views)
        if not views or views[0] != 0 or not set(views) <= set(range(8)):
            raise ValueError(f"test_views must start with 0 and lie in 0-7, got {views}")
        object.__setattr__(self, "test_views", views)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def reader_views(self) -> tuple[int, ...]:
        """The flips/turns (:func:`dihedral`) the reader's crop may show a valve in, which it
        trains on: all eight unturned, those that keep the axis horizontal upright, those
        that also keep the end directed; only as it is where the frames name the face
        (:attr:`frame_face`; a model without a frame in such a version is read on its
        directed crop, which shows either face as the X-rays do)."""
        if self.frame_face:  # the frame names the face: a mirrored crop is another setting's
            return (0,)
        if not self.reader_upright:
            return tuple(range(8))
        return DIRECTED_VIEWS if self.reader_directed else UPRIGHT_VIEWS

    @property
    def source_px(self) -> int | None:
        """The geometric-mean side (pixels) the reader's sources need: its crop, ``reader_px``
        pixels for ``reader_fraction`` of that side, is then never shrunk. None when this
        version reads no setting or reads it on the prepared square."""
        if not self.settings or not self.reader_native:
            return None
        return source_side_px(self.reader_px, self.reader_fraction)

    def reader_test_views(self) -> tuple[int, ...]:
        """The :attr:`test_views` the reader trained on (always the crop as is)."""
        return tuple(k for k in self.test_views if k in self.reader_views())

    def reader_crop(
        self,
        images: torch.Tensor | None,
        centres: torch.Tensor,
        sources: Sequence[torch.Tensor] | None = None,
        frames: ReaderFrames | None = None,
    ) -> torch.Tensor:
        """The setting reader's window around ``centres``, turned as this version was trained
        (:func:`upright_crop` or :func:`crop_around`): of ``images`` (the prepared squares),
        or, where it reads at the X-ray's own pixels (:attr:`reader_native`), of
        ``sources`` (each ``(H, W)`` in [0, 1], the same crop unsquished; ``images`` is not
        read then and may be None). ``frames``: the crops that have one are cut in it
        (:func:`framed_crops`, own pixels only), the others as above."""
        size = (self.reader_fraction, self.reader_px)
        if self.reader_native:
            if sources is None:
                raise ValueError(
                    "this version reads settings at the X-ray's own pixels: pass each "
                    "image's source (prepare_image_with_source)"
                )
            if frames is None or not bool(frames.framed.any()):
                turns = (self.reader_upright, self.reader_directed)
                return native_crops(sources, centres, *size, *turns)
            framed = frames.framed.tolist()
            out = torch.empty(len(centres), self.reader_px, self.reader_px, device=centres.device)
            for has_frame in (True, False):
                rows = [i for i, f in enumerate(framed) if f == has_frame]
                if not rows:
                    continue
                picked = [sources[i] for i in rows]
                if has_frame:
                    at = frames.rows(torch.tensor(rows))
                    out[rows] = framed_crops(picked, centres[rows], *size, at)
                else:
                    out[rows] = self.reader_crop(None, centres[rows], picked)
            return out
        if frames is not None and bool(frames.framed.any()):
            raise ValueError("a reader frame is cut at the X-ray's own pixels (reader_native)")
        if images is None:
            raise ValueError("this version reads settings on the prepared square: pass the images")
        if not self.reader_upright:
            return crop_around(images, centres, *size)
        return upright_crop(images, centres, *size, directed=self.reader_directed)


class CropAnswer(NamedTuple):
    """Everything one pass over the valve's crop gives."""

    centres: torch.Tensor
    """``(B, 2)`` where the crop was taken, (x, y) in [0, 1] of the prepared image."""
    features: torch.Tensor
    """``(B, D)`` the classifier head's penultimate features (the novelty model's input)."""
    logits: torch.Tensor
    """``(B, K)`` class logits."""
    setting_logits: torch.Tensor | None
    """``(B, T)`` setting logits, the scales' blocks end to end; None without a reader."""


def soft_argmax(scores: torch.Tensor) -> torch.Tensor:
    """``(B, 1, h, w)`` cell scores → ``(B, 2)`` expected ``(x, y)`` in [0, 1] (cell centres)."""
    b, _, h, w = scores.shape
    p = torch.softmax(scores.float().reshape(b, -1), dim=-1).view(b, h, w)
    xs = (torch.arange(w, device=scores.device, dtype=p.dtype) + 0.5) / w
    ys = (torch.arange(h, device=scores.device, dtype=p.dtype) + 0.5) / h
    return torch.stack([(p.sum(1) * xs).sum(-1), (p.sum(2) * ys).sum(-1)], dim=-1)


def crop_around(
    images: torch.Tensor,
    centres: torch.Tensor,
    fraction: float,
    size_px: int,
    angles: torch.Tensor | None = None,
    aspects: torch.Tensor | None = None,
) -> torch.Tensor:
    """Square windows of ``fraction`` × side around ``centres`` ((x, y) in [0, 1]), resampled
    to ``size_px``; works on ``(B, C, H, W)`` and ``(B, H, W)``. Outside the image: edge
    values. ``angles`` ``(B,)`` (rad, x right, y down) turn each window so that the image
    direction at that angle becomes the crop's x axis.

    ``aspects`` ``(B,)``: width / height of the X-ray each image shows (its foreground before
    any squish; a source's own shape). The window is then square *on that X-ray*,
    ``fraction`` × the geometric mean of its sides: a squish undone, so angles (a rotor's,
    relative to the valve's axis) are the X-ray's own. Without it the window is square on
    the tensor.
    """
    squeeze = images.dim() == 3
    x = images.unsqueeze(1) if squeeze else images
    n = x.shape[0]
    theta = torch.zeros(n, 2, 3, dtype=torch.float32, device=x.device)
    fx = torch.full((n,), float(fraction), device=x.device)
    fy = fx.clone()
    if aspects is not None:
        root = aspects.float().to(x.device).sqrt()
        fx, fy = fx / root, fy * root
    if angles is None:
        theta[:, 0, 0] = fx
        theta[:, 1, 1] = fy
    else:
        cos, sin = angles.float().cos(), angles.float().sin()
        theta[:, 0, 0], theta[:, 0, 1] = cos * fx, -sin * fx
        theta[:, 1, 0], theta[:, 1, 1] = sin * fy, cos * fy
    theta[:, :, 2] = centres.float() * 2 - 1
    grid = F.affine_grid(theta, [n, x.shape[1], size_px, size_px], align_corners=False)
    out = F.grid_sample(x.float(), grid, align_corners=False, padding_mode="border")
    return out[:, 0] if squeeze else out


def principal_axis(
    crops: torch.Tensor, quantile: float = AXIS_QUANTILE, directed: bool = False
) -> torch.Tensor:
    """``(B, H, W)`` or ``(B, C, H, W)`` crops centred on a valve → ``(B,)`` the angle (rad,
    x right, y down, modulo π) of the long axis of their bright structure: the second moments
    of the brightness above the crop's ``quantile``, inside the inscribed disc (so turning
    the crop turns the answer). Any positive gain and offset of the pixels gives the same
    angle, so raw and normalised crops agree.

    ``directed``: modulo 2π instead, pointing along the axis to the side the bright structure
    is skewed to (its third moment along the axis is positive). A valve's two ends differ
    (connectors, housing, the rotor off centre), so this names an end of the valve: measured
    at the true centres of 60 synthetic X-rays per model whose axis it found, the same end
    of the valve on 97 % (Hakim), 95 % (Certas Plus), 78 % (Sophy SM8) and 67 % (proGAV 2.0).
    Which face is seen it cannot tell (the third moment across the axis named it on only
    50-78 %): the reader learns that (:func:`upright_crop`)."""
    x = crops.float().mean(1) if crops.dim() == 4 else crops.float()
    n, h, w = x.shape
    ys = torch.arange(h, dtype=torch.float32, device=x.device) - (h - 1) / 2
    xs = torch.arange(w, dtype=torch.float32, device=x.device) - (w - 1) / 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    inside = (xx.square() + yy.square() <= (min(h, w) / 2) ** 2).float()
    threshold = torch.quantile(x.reshape(n, -1), quantile, dim=1).view(n, 1, 1)
    weight = (x - threshold).clamp(min=0) * inside
    total = weight.sum((1, 2)).clamp(min=1e-8)
    mx, my = (weight * xx).sum((1, 2)) / total, (weight * yy).sum((1, 2)) / total
    dx, dy = xx - mx.view(n, 1, 1), yy - my.view(n, 1, 1)
    cxx = (weight * dx.square()).sum((1, 2)) / total
    cyy = (weight * dy.square()).sum((1, 2)) / total
    cxy = (weight * dx * dy).sum((1, 2)) / total
    axis = 0.5 * torch.atan2(2 * cxy, cxx - cyy)
    if not directed:
        return axis
    along = dx * axis.cos().view(n, 1, 1) + dy * axis.sin().view(n, 1, 1)
    skew = (weight * along.pow(3)).sum((1, 2))
    return torch.where(skew < 0, axis + math.pi, axis)


def native_crops(
    sources: Sequence[torch.Tensor],
    centres: torch.Tensor,
    fraction: float,
    size_px: int,
    upright: bool,
    directed: bool,
) -> torch.Tensor:
    """``(B, size_px, size_px)`` windows of the sources (``(H, W)`` each, any size and
    aspect: the X-rays' unsquished foreground), square on each X-ray, ``fraction`` × the
    geometric mean of its sides, around ``centres`` (fractions of the prepared square, which
    are the same fractions of its source), turned upright (and directed) as the reader was
    trained (:func:`upright_crop`) or not (:func:`crop_around`)."""
    if len(sources) != len(centres):
        raise ValueError(f"{len(sources)} sources for {len(centres)} centres")
    crops = []
    for source, (fx, fy) in zip(sources, centres.detach().float().cpu().tolist(), strict=True):
        window, centre, window_fraction = _window_around(source, fx, fy, fraction)
        image = window.to(centres.device).float()[None]
        aspect = torch.tensor([image.shape[-1] / image.shape[-2]], device=centres.device)
        at = (image, centre.to(centres.device), window_fraction, size_px)
        crop = upright_crop(*at, directed, aspect) if upright else crop_around(*at, None, aspect)
        crops.append(crop[0])
    if not crops:
        return torch.zeros(0, size_px, size_px, device=centres.device)
    return torch.stack(crops)


def _window_around(
    source: torch.Tensor, fx: float, fy: float, fraction: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The part of ``source`` ``(H, W)`` that any crop of ``fraction`` × its geometric-mean
    side around ``(fx, fy)``, turned to any angle, samples from; that centre as fractions of
    the part, and the fraction of the part's geometric-mean side that gives the same window.

    Cropping the part gives the same pixels as cropping the whole source (a window that
    leaves the source leaves it where the part does, so the border padding repeats the same
    edge) while converting and resampling only a few hundred pixels, not a whole radiograph.
    """
    height, width = source.shape[-2:]
    side = fraction * math.sqrt(height * width)
    reach = side * math.sqrt(0.5) + 2  # a turned square's half-diagonal, and bilinear's pixel
    cx, cy = fx * width, fy * height  # continuous pixel coordinates (align_corners=False)
    x0 = min(max(math.floor(cx - reach), 0), width - 1)
    x1 = max(min(math.ceil(cx + reach), width), x0 + 1)
    y0 = min(max(math.floor(cy - reach), 0), height - 1)
    y1 = max(min(math.ceil(cy + reach), height), y0 + 1)
    w, h = x1 - x0, y1 - y0
    centre = torch.tensor([[(cx - x0) / w, (cy - y0) / h]], dtype=torch.float32)
    return source[..., y0:y1, x0:x1], centre, side / math.sqrt(w * h)


def wide_crops(
    sources: Sequence[torch.Tensor], centres: torch.Tensor, fraction: float, size_px: int
) -> torch.Tensor:
    """Unturned native crops :data:`FRAME_WIDE` reader windows (``fraction``) wide: what a
    template search (:func:`~training.shared.template_frame.scaled_alignment`) looks at."""
    return native_crops(sources, centres, FRAME_WIDE * fraction, size_px, False, False)


def framed_crops(
    sources: Sequence[torch.Tensor],
    centres: torch.Tensor,
    fraction: float,
    size_px: int,
    frames: ReaderFrames,
) -> torch.Tensor:
    """``(B, size_px, size_px)`` crops of the sources in each crop's frame: the setting
    region (``frames.x`` along the turned axis, ``frames.half`` its half side, fractions of
    the zoomed search window's half side: the :data:`FRAME_WIDE` × ``fraction`` window of
    :func:`wide_crops` times the zoom) around ``centres``, turned by ``frames.angles`` and
    flipped across its axis where ``frames.mirrored``, cut from the X-ray's own pixels."""
    wide = FRAME_WIDE * fraction
    crops = []
    rows = zip(
        sources,
        centres.detach().float().cpu().tolist(),
        *(t.detach().float().cpu().tolist() for t in (frames.angles, frames.scales)),
        *(t.detach().float().cpu().tolist() for t in (frames.x, frames.half)),
        strict=True,
    )
    for source, (fx, fy), angle, zoom, x, half in rows:
        height, width = source.shape[-2:]
        shift = x * zoom * wide / 2 * math.sqrt(height * width)  # pixels along the axis
        cx = fx + shift * math.cos(angle) / width
        cy = fy + shift * math.sin(angle) / height
        window, centre, window_fraction = _window_around(source, cx, cy, half * zoom * wide)
        image = window.to(centres.device).float()[None]
        aspect = torch.tensor([image.shape[-1] / image.shape[-2]], device=centres.device)
        turn_by = torch.tensor([angle], device=centres.device)
        at = (image, centre.to(centres.device), window_fraction, size_px, turn_by, aspect)
        crops.append(crop_around(*at)[0])
    if not crops:
        return torch.zeros(0, size_px, size_px, device=centres.device)
    out = torch.stack(crops)
    mirrored = frames.mirrored.to(out.device).view(-1, 1, 1)
    return torch.where(mirrored, out.flip(-2), out)


def reader_windows(wide: torch.Tensor) -> torch.Tensor:
    """The middle half of :func:`wide_crops` ``wide``: the reader's own window, unturned."""
    side = wide.shape[-1]
    return wide[:, side // 4 : side - side // 4, side // 4 : side - side // 4]


def valve_frame(
    wide: torch.Tensor, templates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(angles, mirrored, scales)``: each of :func:`wide_crops` ``wide``'s frame on a valve
    model's ``templates``: ``(3, ALIGN_PX, ALIGN_PX)``, its scaled template (fitted on the
    wide windows), its window template (fitted on :func:`reader_windows`) and its face
    template (:func:`~training.shared.template_frame.fit_face`); ``(2, ...)``, the first two,
    which versions fitted on 2026-12-07 hold; or the scaled one alone, ``(ALIGN_PX,
    ALIGN_PX)``, which versions fitted before hold. Each is served as it was trained.

    The zoom is the scaled template's (:func:`~training.shared.template_frame.
    scaled_alignment`); the axis and end are the window template's
    (:func:`~training.shared.template_frame.align_to_template`), which sees the valve at
    twice the pixels. On 80 radiograph-sized synthetic test X-rays per model the axis error
    at the 90th percentile fell from 17-20° to 6.5° (Hakim, Certas Plus) and from 175° to
    21° (Sophy SM8), the share turned end for end from 0.04-0.05 to 0 and from 0.32 to 0.06
    (docs/TRAINING.md). The face is the face template's (:func:`face_frame`) where there is
    one: the window template picks it no better than a coin (0.55-0.60)."""
    if templates.dim() == 2:
        return scaled_alignment(wide, templates)
    _, _, scales = scaled_alignment(wide, templates[0])
    angles, mirrored, _ = align_to_template(reader_windows(wide), templates[1])
    if len(templates) < 3:
        return angles, mirrored, scales
    return face_frame(wide, (angles, mirrored, scales), templates[2])


def face_frame(
    wide: torch.Tensor, frame: tuple[torch.Tensor, torch.Tensor, torch.Tensor], face: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``frame`` (angles, mirrored, scales) of :func:`wide_crops` ``wide``, mirrored where
    the crop in it shows the other face than the ``face`` template's
    (:func:`~training.shared.template_frame.other_face`): what fitting and serving both
    do once the axis, end and zoom are found."""
    angles, mirrored, scales = frame
    return angles, mirrored ^ other_face(turn(wide, angles, mirrored, scales), face), scales


def frames_on(template: torch.Tensor, x: float, half: float, wide: torch.Tensor) -> ReaderFrames:
    """The frames of :func:`wide_crops` ``wide`` on a valve model's ``template``
    (:func:`valve_frame`), with its setting region ``(x, half)``."""
    angles, mirrored, scales = valve_frame(wide, template)
    n = len(wide)
    full = (torch.full((n,), x, device=wide.device), torch.full((n,), half, device=wide.device))
    return ReaderFrames(angles, mirrored, scales, *full)


def upright_crop(
    images: torch.Tensor,
    centres: torch.Tensor,
    fraction: float,
    size_px: int,
    directed: bool = False,
    aspects: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`crop_around`, turned so the valve's long axis (:func:`principal_axis` of the
    unturned window) lies horizontal: the crop the setting reader sees. Resampled once more
    from the image, not from the first crop, so its corners hold image, not padding. Left
    open: which end points where and which face shows (the axis is known modulo π), so the
    reader trains with exactly those four views (:data:`UPRIGHT_VIEWS`). ``directed`` also
    turns the skewed end to the right (``principal_axis(directed=True)``), which leaves only
    the face open (:data:`DIRECTED_VIEWS`)."""
    at = (images, centres, fraction, size_px)
    angles = principal_axis(crop_around(*at, aspects=aspects), directed=directed)
    return crop_around(*at, angles, aspects)


UPRIGHT_VIEWS = (0, 2, 4, 6)
"""The views of an upright crop that keep the axis horizontal, as indices of the eight
flips/turns (``k % 4`` quarter turns, then a mirror if ``k >= 4``): as is, half a turn, and
both mirrored. A quarter turn would stand the valve upright and undo :func:`upright_crop`."""
DIRECTED_VIEWS = (0, 6)
"""The views of a directed upright crop that keep its end where it is: as is, and mirrored
across the axis (the valve's other face). Half a turn would undo the direction."""


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """View ``k`` of the eight flips/turns of ``(..., H, W)``: ``k % 4`` quarter turns, then a
    mirror if ``k >= 4`` (a valve may lie at any angle and show either face)."""
    x = torch.rot90(x, k % 4, dims=(-2, -1))
    return x.flip(-1) if k >= 4 else x


TEST_VIEW_ORDER = (0, 6, 2, 4, 1, 3, 5, 7)
"""The order :func:`averaged_views` takes views in: the first two are :data:`DIRECTED_VIEWS`,
the first four :data:`UPRIGHT_VIEWS`, so an upright reader can use as many as the classifier."""


def averaged_views(count: int) -> tuple[int, ...]:
    """The first ``count`` (1, 2, 4 or 8) views of :data:`TEST_VIEW_ORDER`."""
    if count not in (1, 2, 4, 8):
        raise ValueError(f"test-time views must be 1, 2, 4 or 8, got {count}")
    return TEST_VIEW_ORDER[:count]


def _mean_over_views(
    net: Callable[[torch.Tensor], torch.Tensor], crops: torch.Tensor, views: tuple[int, ...]
) -> torch.Tensor:
    """``net``'s output ``(B, ...)`` averaged over ``crops`` seen in each of ``views``, one
    pass over all of them."""
    if views == (0,):
        return net(crops)
    stacked = torch.cat([dihedral(crops, k) for k in views])
    out = net(stacked.contiguous(memory_format=torch.channels_last))
    return out.view(len(views), len(crops), *out.shape[1:]).mean(0)


def _channels(body: nn.Module) -> int:
    """Channels ``body`` outputs (one dry run on a small zero image)."""
    was_training = body.training
    with torch.no_grad():
        channels = int(body.eval()(torch.zeros(1, 3, 64, 64)).shape[1])
    body.train(was_training)
    return channels


class LocateClassifyNet(nn.Module):
    """Prepared, normalised image ``(B, 3, S, S)`` → class logits ``(B, K)`` via the valve's crop.

    ``forward(x, centres)`` crops at given centres (training uses the annotated ones);
    without them it locates first. :meth:`locate` alone gives the centres.
    """

    def __init__(
        self,
        num_classes: int,
        params: TwoStageParams | None = None,
        *,
        classifier: ValveNet | None = None,
        locator_trunk: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.params = params or TwoStageParams()
        spec = get_arch(self.params.backbone)
        trunk = spec.make_trunk() if locator_trunk is None else locator_trunk
        self.arch = self.params.backbone
        self.num_classes = num_classes
        self.classes: tuple[str, ...] | None = None
        self.locator_body = nn.Sequential(*spec.body_of(trunk)[: self.params.locator_depth])
        self.locator_head = nn.Sequential(
            nn.Conv2d(_channels(self.locator_body), LOCATOR_HIDDEN, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(LOCATOR_HIDDEN, 1, 3, padding=1),
        )
        self.classifier = classifier or ValveNet(num_classes, arch=self.params.backbone)
        total = sum(len(values) for _, values in self.params.settings)
        self.reader = ValveNet(total, arch=self.params.backbone) if total else None
        weights = spec.weights  # what the backbone's inputs are normalised with
        self._reader_input = PreprocessParams(
            size_px=self.params.reader_px, mean=weights.mean, std=weights.std
        )
        if self.params.reader_frames:  # filled by load_state_dict or set_reader_frames
            per_model = (3,) if self.params.frame_face else (2,) if self.params.frame_window else ()
            shape = (len(self.params.reader_frames), *per_model, ALIGN_PX, ALIGN_PX)
            self.register_buffer("frame_templates", torch.zeros(shape))

    def set_reader_frames(self, frames: dict[str, tuple[torch.Tensor, float, float]]) -> None:
        """Read each of these valve models' settings in its template's frame: ``{valve
        model: (templates, x, half)}`` (fitted by the recipe, saved with the checkpoint);
        templates as :func:`valve_frame` takes them, the same kind for every model."""
        unknown = set(frames) - set(self.setting_blocks())
        if unknown:
            raise ValueError(f"no setting scale to frame for {sorted(unknown)}")
        kinds = {tuple(template.shape) for template, _, _ in frames.values()}
        if len(kinds) > 1:
            raise ValueError(f"every framed model needs the same kind of templates, got {kinds}")
        kind = next(iter(kinds), ())
        window, face = len(kind) == 3, len(kind) == 3 and kind[0] == 3
        regions = tuple((valve, x, half) for valve, (_, x, half) in frames.items())
        self.params = replace(
            self.params, reader_frames=regions, frame_window=window, frame_face=face
        )
        self._buffers.pop("frame_templates", None)
        if frames:  # none: the checkpoint keeps the layout of a version without frames
            templates = [template.float() for template, _, _ in frames.values()]
            device = next(self.parameters()).device
            self.register_buffer("frame_templates", torch.stack(templates).to(device))

    def find_frames(
        self,
        valve: str,
        centres: torch.Tensor,
        sources: Sequence[torch.Tensor],
        wide: torch.Tensor | None = None,
    ) -> ReaderFrames:
        """Each X-ray's frame on ``valve``'s template: its turn, face and zoom
        (:func:`~training.shared.template_frame.scaled_alignment` of :func:`wide_crops` at
        ``centres``; ``wide``: those crops, where already cut), with that model's setting
        region."""
        index = [v for v, _, _ in self.params.reader_frames].index(valve)
        _, x, half = self.params.reader_frames[index]
        template = self.get_buffer("frame_templates")[index]
        return frames_on(template, x, half, self._wide(centres, sources) if wide is None else wide)

    def _wide(self, centres: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
        return wide_crops(sources, centres, self.params.reader_fraction, self.params.reader_px)

    def setting_blocks(self) -> dict[str, slice]:
        """Each valve model's block of the setting logits."""
        return setting_blocks(self.params.settings)

    def answer(
        self,
        x: torch.Tensor,
        centres: torch.Tensor | None = None,
        sources: Sequence[torch.Tensor] | None = None,
        valves: Collection[str] | None = None,
    ) -> CropAnswer:
        """One pass: locate (unless ``centres`` are given), crop, classify and read (the
        reader of a :attr:`~TwoStageParams.reader_native` version needs ``sources``);
        ``valves``: read only these models' settings (:meth:`read`; none: no reading)."""
        if centres is None:
            centres = self.locate(x)
        features, logits = self.classify(self.crop(x, centres))
        reads = self.reader is not None and (valves is None or bool(valves))
        reading = self.read(x, centres, sources, valves) if reads else None
        return CropAnswer(centres, features, logits, reading)

    def read(
        self,
        x: torch.Tensor,
        centres: torch.Tensor,
        sources: Sequence[torch.Tensor] | None = None,
        valves: Collection[str] | None = None,
    ) -> torch.Tensor:
        """``(B, T)`` setting logits: each valve model's block read on its own crop, the
        framed models' in their template's frame (:meth:`find_frames`), the others on the
        directed crop, so every block is that model's reading whichever model is proposed.
        ``valves``: only these models' blocks (the rest NaN), so a server skips the frame
        searches and reader passes of settings it will not propose; None: every block."""
        if self.reader is None:
            raise ValueError("this version reads no setting")
        views = self.params.reader_test_views()
        blocks = self.setting_blocks()
        wanted = set(blocks) if valves is None else set(blocks) & set(valves)
        framed = [valve for valve, _, _ in self.params.reader_frames if valve in wanted]
        columns = sum(block.stop - block.start for block in blocks.values())
        out = torch.full((len(centres), columns), math.nan, device=centres.device)
        if wanted - set(framed):
            read = _mean_over_views(self.reader, self.reader_crop(x, centres, sources), views)
            for valve in wanted - set(framed):
                out[:, blocks[valve]] = read[:, blocks[valve]].to(out.dtype)
        if framed and sources is None:
            raise ValueError("a framed reader reads the X-ray's own pixels: pass the sources")
        # Every model searches the same windows: cut them once.
        wide = self._wide(centres, sources) if framed and sources is not None else None
        for valve in framed:
            assert sources is not None
            frames = self.find_frames(valve, centres, sources, wide)
            crops = self.reader_crop(x, centres, sources, frames)
            read = _mean_over_views(self.reader, crops, views)
            out[:, blocks[valve]] = read[:, blocks[valve]].to(out.dtype)
        return out

    def classify(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The classifier on valve crops: its penultimate features ``(B, D)`` (the novelty
        model's input) and logits ``(B, K)``, each averaged over the test views (linear last
        layer: the mean features give the mean logits)."""
        head = self.classifier.head
        body = self.classifier.body
        features = _mean_over_views(lambda c: head[:-1](body(c)), crops, self.params.test_views)
        return features, head[-1](features)

    def reader_crop(
        self,
        x: torch.Tensor,
        centres: torch.Tensor,
        sources: Sequence[torch.Tensor] | None = None,
        frames: ReaderFrames | None = None,
    ) -> torch.Tensor:
        """The reader's input: its crop of the network input ``x`` (normalised already), or of
        the ``sources`` (in [0, 1]: normalised here, as the prepared squares were); see
        :meth:`TwoStageParams.reader_crop`."""
        # Native crops are cut where the centres are: on the network's device, like x's.
        crops = self.params.reader_crop(x, centres.to(x.device), sources, frames)
        if self.params.reader_native:
            crops = normalize_image(crops, self._reader_input)
        return crops.to(x.dtype).contiguous(memory_format=torch.channels_last)

    @property
    def body(self) -> nn.Sequential:
        """The classifier's body (Grad-CAM looks at its last layer, on the crop)."""
        return self.classifier.body

    def locator_features(self, x: torch.Tensor) -> torch.Tensor:
        side = self.params.locator_px
        small = (
            x
            if x.shape[-1] == side
            else F.interpolate(
                x.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False
            )
        )
        return self.locator_body(small.contiguous(memory_format=torch.channels_last))

    def locate(self, x: torch.Tensor) -> torch.Tensor:
        """Valve centres ``(B, 2)``, (x, y) in [0, 1] of the prepared image."""
        return soft_argmax(self.locator_head(self.locator_features(x)))

    def crop(self, x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        crops = crop_around(x, centres, self.params.crop_fraction, self.params.crop_px)
        return crops.to(x.dtype).contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor, centres: torch.Tensor | None = None) -> torch.Tensor:
        if centres is None:
            centres = self.locate(x)
        return self.classify(self.crop(x, centres))[1]
