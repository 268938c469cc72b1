"""The setting reader alone: can it read a valve's setting, and what does the crop's turn do?

A pressure setting is the rotor's angle *relative to the valve*. On crops at arbitrary angles
a CNN has to learn that difference from a few examples per setting; on crops turned so that
the valve lies one way it only has to read a direction. This benchmark trains the reader
network (ImageNet Lite0, as a ``cpu`` version does) on synthetic X-rays of one valve model
at a time, at the true valve centre (no locator, no classifier: the reader's own ceiling), in
three ways, and scores each on X-rays of another seed:

* ``unturned``: the window as it lies (what versions before ``reader_upright`` read), seen
  in all eight flips/turns during training;
* ``upright``: :func:`training.shared.locate_classify.upright_crop`, the valve's long axis
  estimated from the crop (what versions read now), seen in the four views that keep it;
* ``upright directed``: the same crop also turned so that the end its bright structure is
  skewed to lies right (``upright_crop(directed=True)``), seen in the two views that keep
  that end (:data:`~training.shared.locate_classify.DIRECTED_VIEWS`): only the face seen is
  left to the reader;
* ``true axis``: turned by the generator's own valve angle (the axis a better estimate, or
  an annotated one, would give), also in those four views; the valve's direction along the
  axis and the face seen are still left to the reader;
* ``true frame native``: the native crop turned by the generator's angle and unmirrored by
  its face, seen as is: the reader's ceiling when nothing about the frame is left to it;
* ``template frame native``: the native crop turned onto a template fitted on the training
  crops (:mod:`training.shared.template_frame`), face still left to the reader (measured: the
  axis 4-8 × closer than the principal axis, the Hakim read no better);
* ``template scaled native``: the template's frame *and zoom* (a scaled template fitted on
  crops twice the reader's window, :func:`scaled_template_crops`), the reader's crop cut
  around where the settings differ on that template (:func:`~training.shared.template_frame.
  setting_region`, learned from the training crops' labels) at that zoom: a crop of the
  rotor, whatever the valve's size on the X-ray; the face by the frame's face template
  (:func:`~training.shared.template_frame.fit_face`), so the reader sees each crop as is,
  as versions do since 2026-12-07 evening (before, the face was left to the reader: two views);
* ``true zoomed native``: the same region and crop in the generator's own frame, face and
  zoom (its drawn valve length): that reader's ceiling;
* ``upright pooled``: the upright crop read by :func:`view_pooled`, its features maxed
  over the four views, so it is invariant to which end and face it sees by construction
  (measured: no better than the plain reader given the same compute, so versions do not).

Per mode and valve model it reports the exact and within-one-step shares, and (in the JSON)
``mirror_reading``: the share read as the setting's mirror partner (-k of n, what the valve
seen from its other face would show), the error a reader makes when it cannot tell the face.
``--frames-only`` trains no reader: it compares the frames (:func:`frames`), the principal
axis's and the template's, with the generator's. ``--seeds`` repeats everything with other
training X-rays and initial heads; the table gives the mean and spread. ``--label-sigma``
trains on targets spread over neighbouring settings (:func:`soft_targets`),
``--reader-fraction`` and ``--reader-px`` change the crop's size and resolution (versions:
one-hot, the ``cpu`` profile's crop).

Each X-ray is squished to a square of ``prepared_px`` (the product also crops the
collimation first; the synthetic valve stays the same size either way) and cropped to
``reader_fraction`` of it, as the product's reader crop. Synthetic X-rays only; a quality
measurement, not a speed one. ``--quick`` runs a few tiny images: it proves the code.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import Table, add_common_arguments, add_size_range_argument, emit
from training.fitting.config import RecipeConfig

READER_MODES = (
    "unturned",
    "upright",
    "upright directed",
    "directed unsquished",
    "directed native",
    "true axis",
    "true frame native",
    "template frame native",
    "template scaled native",
    "true zoomed native",
    "upright pooled",
)


_CPU = RecipeConfig.from_profile("cpu")


@dataclass(frozen=True)
class ReaderOptions:
    """Defaults: the ``cpu`` profile's reader (its epochs, crop, batch and learning rate)."""

    models: tuple[str, ...] = (
        "Codman Hakim",
        "Codman Certas Plus",
        "Sophysa Sophy SM8",
        "proGAV 2.0",
    )
    n_train: int = 300
    n_test: int = 150
    epochs: int = _CPU.reader_epochs
    prepared_px: int = 768
    reader_fraction: float = _CPU.reader_fraction
    reader_px: int = _CPU.reader_px
    batch_size: int = _CPU.batch_size
    lr_max: float = _CPU.reader_lr_max
    label_sigma: float = 0.0
    """Targets: a Gaussian of this many steps over the scale (:func:`soft_targets`); 0 is
    one-hot, as versions train."""
    size_range_px: tuple[int, int] = (600, 1200)
    seeds: tuple[int, ...] = (0,)
    """Each seed draws its own training X-rays (test X-rays: seed + 1) and initialises the
    head anew; the table gives the mean (and spread) over them."""
    modes: tuple[str, ...] = READER_MODES
    frames_only: bool = False
    """Only compare the frames (:func:`frames`), no reader trained."""

    def __post_init__(self) -> None:
        if any(seed + 1 in self.seeds for seed in self.seeds):
            raise ValueError(
                f"seeds {self.seeds}: one seed's test X-rays (seed + 1) would be another's "
                "training X-rays; space the seeds at least 2 apart (e.g. 0 10 20)"
            )


QUICK = ReaderOptions(
    models=("Sophysa Sophy SM8",),
    n_train=12,
    n_test=6,
    epochs=1,
    prepared_px=256,
    reader_fraction=0.2,
    reader_px=48,
    batch_size=4,
    size_range_px=(256, 320),
)


def _draw(options: ReaderOptions, label: str, n: int, seed: int) -> dict[str, Any]:
    """``n`` prepared X-rays of ``label``: images, true centres and axis angles (both in the
    prepared square's coordinates), the sources the native crops cut, the axis angles on
    them (the generator's own), whether the valve shows its other face, the valve's length
    (a fraction of the X-ray's geometric-mean side), setting indices."""
    import torch
    import torch.nn.functional as F

    from training.shared.preprocess import native_source, source_side_px
    from training.synthetic.xray import render_xray

    rng = np.random.default_rng(seed)
    side = options.prepared_px
    images, originals, centres, angles, settings = [], [], [], [], []
    native_angles, mirrored, lengths = [], [], []
    for _ in range(n):
        image, info = render_xray(rng, label, size_range_px=options.size_range_px)
        h, w = image.shape
        # What a version keeps of the X-ray for its reader: its own pixels, capped where the
        # reader would shrink them anyway (the generator draws no collimation to crop).
        source = native_source(image, source_side_px(options.reader_px, options.reader_fraction))
        originals.append(torch.from_numpy(source.astype(np.float16)))
        square = F.interpolate(torch.from_numpy(image)[None, None], size=(side, side), mode="area")
        images.append(square[0, 0])
        centres.append([(info["valve_x"] + 0.5) / w, (info["valve_y"] + 0.5) / h])
        a = math.radians(info["valve_angle_deg"])  # the squish turns directions a little
        angles.append(math.atan2(math.sin(a) / h, math.cos(a) / w))
        native_angles.append(a)
        mirrored.append(bool(info["valve_mirrored"]))
        lengths.append(info["valve_length_px"] / math.sqrt(h * w))
        settings.append(int(info["valve_setting_index"]))
    return {
        "images": torch.stack(images),
        "originals": originals,
        "aspects": torch.tensor([o.shape[1] / o.shape[0] for o in originals]),
        "centres": torch.tensor(centres),
        "angles": torch.tensor(angles),
        "native_angles": torch.tensor(native_angles),
        "mirrored": torch.tensor(mirrored),
        "lengths": torch.tensor(lengths),
        "settings": torch.tensor(settings),
    }


def _product_params(options: ReaderOptions, mode: str) -> Any:
    """The checkpoint geometry whose reader crop ``mode`` is, or None for ``true axis`` (a
    turn no version can make: it needs the generator's angle)."""
    from training.shared.locate_classify import TwoStageParams

    turns = {
        "unturned": (False, False),
        "upright": (True, False),
        "upright pooled": (True, False),
        "upright directed": (True, True),
    }
    if mode not in turns:
        return None
    upright, directed = turns[mode]
    return TwoStageParams(
        reader_fraction=options.reader_fraction,
        reader_px=options.reader_px,
        reader_upright=upright,
        reader_directed=directed,
    )


def _crops_and_views(options: ReaderOptions, data: dict[str, Any], mode: str) -> tuple:
    """The reader's crops of ``data`` in ``mode`` and the views it trains in: the product's
    own (:meth:`TwoStageParams.reader_crop`, :meth:`~TwoStageParams.reader_views`) except
    for ``true axis``."""

    from training.shared.locate_classify import (
        DIRECTED_VIEWS,
        UPRIGHT_VIEWS,
        crop_around,
        native_crops,
        upright_crop,
    )

    size = (options.reader_fraction, options.reader_px)
    if mode == "directed unsquished":  # the squish undone on the prepared square
        at = (data["images"], data["centres"], *size)
        return upright_crop(*at, directed=True, aspects=data["aspects"]), DIRECTED_VIEWS
    if mode == "directed native":  # at the X-ray's own pixels, as versions read now
        crops = native_crops(data["originals"], data["centres"], *size, True, True)
        return crops, DIRECTED_VIEWS
    if mode == "true frame native":  # the generator's axis, end and face: the reader's ceiling
        return _native_turned(options, data, data["native_angles"], data["mirrored"]), (0,)
    params = _product_params(options, mode)
    if params is not None:
        return params.reader_crop(data["images"], data["centres"]), params.reader_views()
    if mode != "true axis":
        raise ValueError(f"no crops for reader mode {mode!r} here")
    args = (data["images"], data["centres"], options.reader_fraction, options.reader_px)
    return crop_around(*args, data["angles"]), UPRIGHT_VIEWS


def _native_turned(options: ReaderOptions, data: dict[str, Any], angles: Any, mirrored: Any) -> Any:
    """Native crops at the true centres turned by ``angles`` (rad, on the X-ray) and flipped
    across their x axis where ``mirrored``: the valve in one frame, if the angles are right.
    The reader's own window: half the wide crop's side, unzoomed (:func:`_native_framed`)."""
    import torch

    return _native_framed(options, data, (angles, mirrored, torch.ones(len(angles))), 0.0, 0.5)


def frame_error(
    angles: Any, mirrored: Any, data: dict[str, Any], scales: Any = None
) -> dict[str, float]:
    """How far a frame (``angles`` on the X-ray, ``mirrored`` or None where the face is left
    open) is from the generator's: the axis error's median and 90th percentile in degrees,
    and the share of crops given the face most of them got relative to the generator's. A
    frame is the generator's up to one constant turn and one flip, so the constant is found
    per face the generator drew (a flip reflects it). With ``scales`` (a zoom per crop, see
    :func:`training.shared.template_frame.turn`), also the zoom's relative error (median, 90th
    percentile) against the valve's drawn length, up to one constant factor. ``end_turned``:
    the share more than a quarter turn off, so turned end for end (a reading taken so is
    another setting's)."""
    import torch

    error = torch.zeros(len(angles))
    for face in (False, True):
        pick = data["mirrored"] == face
        if not pick.any():
            continue
        offset = angles[pick].float() - data["native_angles"][pick].float()
        constant = torch.atan2(offset.sin().mean(), offset.cos().mean())
        error[pick] = torch.atan2((offset - constant).sin(), (offset - constant).cos()).abs()
    found = {
        "axis_error_deg_median": float(error.rad2deg().median()),
        "axis_error_deg_p90": float(error.rad2deg().quantile(0.9)),
        "end_turned": float((error > math.pi / 2).float().mean()),
    }
    if mirrored is not None:
        flip = (mirrored ^ data["mirrored"]).float().mean().item()
        found["face_consistent"] = max(flip, 1.0 - flip)
    if scales is not None:
        ratio = (data["lengths"].float() / scales.float()).log()
        off = (ratio - ratio.median()).abs().exp() - 1
        found["scale_error_median"] = float(off.median())
        found["scale_error_p90"] = float(off.quantile(0.9))
    return found


def _unturned(options: ReaderOptions, data: dict[str, Any]) -> Any:
    from training.shared.locate_classify import native_crops

    size = (options.reader_fraction, options.reader_px)
    return native_crops(data["originals"], data["centres"], *size, False, False)


def _fitted_template(train_crops: Any) -> Any:
    """A template fitted on unturned training crops, started from their principal axes."""
    from training.shared.locate_classify import principal_axis
    from training.shared.template_frame import fit_template

    return fit_template(train_crops, principal_axis(train_crops, directed=True))


def template_frame_crops(
    options: ReaderOptions, train: dict[str, Any], test: dict[str, Any]
) -> tuple[Any, Any, dict[str, Any]]:
    """Train and test crops turned onto a template fitted on the training crops alone
    (:mod:`training.shared.template_frame`), and how far that frame is from the generator's
    on each (:func:`frame_error`)."""
    from training.shared.template_frame import align_to_template

    unturned = {"train": _unturned(options, train), "test": _unturned(options, test)}
    template = _fitted_template(unturned["train"])
    out, frame = [], {}
    for name, d in (("train", train), ("test", test)):
        angles, mirrored, _ = align_to_template(unturned[name], template)
        out.append(_native_turned(options, d, angles, mirrored))
        frame[name] = frame_error(angles, mirrored, d)
    return out[0], out[1], frame


def _wide(options: ReaderOptions, data: dict[str, Any]) -> Any:
    """The template search's windows, as versions cut them (:func:`~training.shared.
    locate_classify.wide_crops`)."""
    from training.shared.locate_classify import wide_crops

    return wide_crops(
        data["originals"], data["centres"], options.reader_fraction, options.reader_px
    )


def _native_framed(
    options: ReaderOptions, data: dict[str, Any], frame: tuple, x: float, half: float
) -> Any:
    """Native crops in a scaled frame (``frame``: angles, mirrored, scales on the windows
    of :func:`_wide`) centred ``x`` along its axis, ``half`` its half side, as versions cut
    them (:func:`~training.shared.locate_classify.framed_crops`)."""
    import torch

    from training.shared.locate_classify import ReaderFrames, framed_crops

    n = len(frame[0])
    region = (torch.full((n,), float(x)), torch.full((n,), float(half)))
    frames = ReaderFrames(*frame, *region)
    size = (options.reader_fraction, options.reader_px)
    return framed_crops(data["originals"], data["centres"], *size, frames)


def _scaled_error(frame: tuple, data: dict[str, Any]) -> dict[str, float]:
    angles, mirrored, scales = frame[:3]
    return frame_error(angles, mirrored, data, scales)


def scaled_template_crops(
    options: ReaderOptions, train: dict[str, Any], test: dict[str, Any], n_settings: int
) -> tuple[Any, Any, dict[str, Any]]:
    """Train and test crops of where the setting shows, as a version cuts them: a valve
    model's frame fitted on the training X-rays (:func:`~training.fitting.two_stage.
    fit_frame`: scaled template, each X-ray's turn, face and zoom, the setting region) and
    found on the test X-rays (:func:`~training.shared.locate_classify.frames_on`); both
    sets cut there from their own pixels. Also each frame's error against the generator's
    and the region found."""
    from training.fitting.two_stage import fit_frame
    from training.shared.locate_classify import frames_on

    fit = fit_frame(_wide(options, train), train["settings"], n_settings)
    if fit is None:
        raise ValueError("the training X-rays hold fewer than two settings: no setting region")
    template, x, half, found_train = fit
    found_test = tuple(frames_on(template, x, half, _wide(options, test))[:3])
    report: dict[str, Any] = {
        "train": _scaled_error(found_train, train),
        "test": _scaled_error(found_test, test),
        "setting_region": {"x": x, "half": half},
    }
    train_crops = _native_framed(options, train, found_train, x, half)
    test_crops = _native_framed(options, test, found_test, x, half)
    return train_crops, test_crops, report


def true_zoomed_crops(
    options: ReaderOptions, train: dict[str, Any], test: dict[str, Any], n_settings: int
) -> tuple[Any, Any, dict[str, Any]]:
    """:func:`scaled_template_crops` in the generator's frame: its angle, face and drawn
    valve length (relative to the training X-rays' median) instead of the template's; the
    region learned on the training X-rays in that frame."""
    from training.shared.template_frame import setting_region, turn

    sets = {"train": train, "test": test}
    typical = train["lengths"].float().median()
    found = {
        name: (d["native_angles"], d["mirrored"], d["lengths"].float() / typical)
        for name, d in sets.items()
    }
    framed = turn(_wide(options, train), *found["train"])
    x, half = setting_region(framed, train["settings"], n_settings)
    report: dict[str, Any] = {name: _scaled_error(found[name], d) for name, d in sets.items()}
    report["setting_region"] = {"x": x, "half": half}
    train_crops, test_crops = (
        _native_framed(options, d, found[n], x, half) for n, d in sets.items()
    )
    return train_crops, test_crops, report


def frames(options: ReaderOptions, train: dict[str, Any], test: dict[str, Any]) -> dict:
    """Each test crop's frame against the generator's (:func:`frame_error`): the directed
    principal axis (the face left to the reader); a template fitted on the training crops
    (the reader's window); the scaled template :func:`~training.fitting.two_stage.fit_frame`
    fits (also the zoom) by its search alone; and as versions find it
    (:func:`~training.shared.locate_classify.valve_frame`: the zoom by the scaled template,
    axis and end by fit_frame's template of the reader's window, the face by its face
    template; and without the face template, as versions of 2026-12-07 did). No training: a
    minute or two once the X-rays are drawn."""
    from training.fitting.two_stage import fit_frame
    from training.shared.locate_classify import principal_axis, valve_frame
    from training.shared.template_frame import align_to_template, scaled_alignment

    unturned = _unturned(options, test)
    angles, mirrored, _ = align_to_template(unturned, _fitted_template(_unturned(options, train)))
    wide_train, wide = _wide(options, train), _wide(options, test)
    fit = fit_frame(wide_train, train["settings"], int(train["settings"].max()) + 1)
    if fit is None:
        raise ValueError("the training X-rays hold fewer than two settings: no frame fitted")
    scaled_template = fit[0][0]
    return {
        "principal axis": frame_error(principal_axis(unturned, directed=True), None, test),
        "template": frame_error(angles, mirrored, test),
        "scaled template": _scaled_error(scaled_alignment(wide, scaled_template), test),
        "zoom by the scaled template, the rest by the window's (2026-12-07)": _scaled_error(
            valve_frame(wide, fit[0][:2]), test
        ),
        "versions: the same, the face by the face template": _scaled_error(
            valve_frame(wide, fit[0]), test
        ),
    }


def view_pooled(reader: Any, views: tuple[int, ...]) -> Any:
    """``reader`` answering the same for every one of ``views`` of its crop (TI-pooling,
    Laptev et al. 2016): the body sees all views, the head's pooled features are maxed over
    them, then classified once. The idea: an upright crop leaves open which end is the inflow
    and which face shows, so a plain reader must learn each setting in four views; pooled,
    one view's feature is enough. It costs the views' compute at every step."""
    import torch
    from torch import nn

    from training.shared.locate_classify import dihedral

    class ViewPooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.reader = reader

        def forward(self, crops: torch.Tensor) -> torch.Tensor:
            seen = torch.cat([dihedral(crops, k) for k in views])
            body = reader.body(seen.contiguous(memory_format=torch.channels_last))
            pooled = reader.head[:2](body)  # concat pooling, flattened: (views * B, 2F)
            return reader.head[2:](pooled.view(len(views), len(crops), -1).amax(0))

    return ViewPooled()


def soft_targets(n: int, sigma: float) -> np.ndarray:
    """``(n, n)``: row ``k`` the training target of setting ``k`` of ``n``: a Gaussian of
    ``sigma`` steps over its neighbours on the scale (no wrap), one-hot at 0. The idea
    (circular smooth labels, Yang & Yan, ECCV 2020, for angle classes): with 18-21 settings
    a few hundred X-rays give a handful per setting, and a neighbour looks almost alike, so
    each example could teach its neighbours too. Measured: it did not make the Hakim or the
    proGAV readable (docs/TRAINING.md), so versions train on one-hot targets."""
    steps = np.arange(n, dtype=np.float64)
    if sigma <= 0:
        return np.eye(n, dtype=np.float32)
    rows = np.exp(-0.5 * ((steps[None, :] - steps[:, None]) / sigma) ** 2)
    return (rows / rows.sum(1, keepdims=True)).astype(np.float32)


def _train_and_score(
    options: ReaderOptions,
    train: Any,
    y_train: Any,
    test: Any,
    y_test: Any,
    views: tuple,
    seed: int,
    pooled: bool = False,
) -> tuple[np.ndarray, float]:
    """A fresh ImageNet reader trained on ``train`` crops; its readings of ``test``. A
    ``pooled`` reader answers through :func:`view_pooled` over ``views``."""
    import torch

    from training.fitting.two_stage import CropTrainer
    from training.shared.inference import autocast_for
    from training.shared.locate_classify import dihedral
    from training.shared.model import build_model, get_arch

    torch.manual_seed(seed)
    n_settings = int(max(y_train.max(), y_test.max())) + 1
    reader, _ = build_model(n_settings, pretrained=True, arch="efficientnet_lite0")
    net = view_pooled(reader, views) if pooled else reader
    weights = get_arch("efficientnet_lite0").weights
    mean = torch.tensor(weights.mean).view(1, 3, 1, 1)
    std = torch.tensor(weights.std).view(1, 3, 1, 1)

    def network_input(crops: torch.Tensor) -> torch.Tensor:
        x = (crops.unsqueeze(1).expand(-1, 3, -1, -1) - mean) / std
        return x.contiguous(memory_format=torch.channels_last)

    autocast = autocast_for(torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    # The recipe's own loop on crops cut once: no jitter, the crop is the row.
    trainer = CropTrainer(
        train,
        np.zeros((len(train), 2), np.float32),
        0.0,
        options,
        network_input,
        autocast,
        generator,
        torch.device("cpu"),
    )
    losses: list[float] = []
    soft = torch.from_numpy(soft_targets(n_settings, options.label_sigma))
    trainer.fit(
        net.train(),
        np.arange(len(train)),
        lambda out, pick: -(soft[y_train[pick]] * out.log_softmax(1)).sum(1).mean(),
        lambda rows, _at: train[rows],
        options.epochs,
        lambda _epoch, loss: losses.append(loss),
        views,
    )
    net.eval()
    with torch.inference_mode(), autocast:
        # The test crops in one of the same views each (the reader must not rely on one).
        seen = [dihedral(c[None], views[i % len(views)])[0] for i, c in enumerate(test)]
        read = net(network_input(torch.stack(seen))).float().argmax(1).numpy()
    return read, losses[-1] if losses else math.nan


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean exact and within-one-step shares over the seeds' runs, their spread, and the runs."""
    exact = [r["exact"] for r in runs]
    return {
        "exact": float(np.mean(exact)),
        "exact_sd": float(np.std(exact, ddof=1)) if len(runs) > 1 else None,
        "within_one": float(np.mean([r["within_one"] for r in runs])),
        "runs": runs,
    }


def _cell(summary: dict[str, Any]) -> str:
    spread = "" if summary["exact_sd"] is None else f" ± {summary['exact_sd']:.2f}"
    return f"{summary['exact']:.2f}{spread} / {summary['within_one']:.2f}"


def run_frames(options: ReaderOptions) -> tuple[list[Table], dict[str, Any]]:
    """:func:`frames` per valve model and seed: how far the reader's frame is off."""
    results: dict[str, Any] = {"options": asdict(options), "models": {}}
    table = Table(
        f"The reader's frame against the generator's: {options.n_test} test X-rays per valve "
        f"model (template fitted on {options.n_train} others), {len(options.seeds)} seed(s)",
        [
            "valve model",
            "frame",
            "axis error median °",
            "axis error p90 °",
            "end for end",
            "face consistent",
            "zoom error median / p90",
        ],
    )
    for label in options.models:
        runs = []
        for seed in options.seeds:
            train = _draw(options, label, options.n_train, seed)
            test = _draw(options, label, options.n_test, seed + 1)
            runs.append({"seed": seed, **frames(options, train, test)})
        results["models"][label] = runs
        for name in [key for key in runs[0] if key != "seed"]:
            found = [r[name] for r in runs]
            face = [f["face_consistent"] for f in found if "face_consistent" in f]
            zoom = [
                (f["scale_error_median"], f["scale_error_p90"])
                for f in found
                if "scale_error_median" in f
            ]
            table.add_row(
                label,
                name,
                f"{np.mean([f['axis_error_deg_median'] for f in found]):.1f}",
                f"{np.mean([f['axis_error_deg_p90'] for f in found]):.1f}",
                f"{np.mean([f['end_turned'] for f in found]):.2f}",
                f"{np.mean(face):.2f}" if face else "left to the reader",
                " / ".join(f"{v:.0%}" for v in np.mean(zoom, 0)) if zoom else "not searched",
            )
    return [table], results


def run(options: ReaderOptions) -> tuple[list[Table], dict[str, Any]]:
    from training.shared.locate_classify import DIRECTED_VIEWS
    from training.synthetic.valves import SETTING_SCALES

    if options.frames_only:
        return run_frames(options)

    results: dict[str, Any] = {"options": asdict(options), "models": {}}
    table = Table(
        f"Setting reader alone (true centres): {options.n_train} training and "
        f"{options.n_test} test X-rays per valve model, {options.epochs} epochs, "
        f"{len(options.seeds)} seed(s)",
        ["valve model", "settings", "chance", *(f"{m}: exact / ±1" for m in options.modes)],
    )
    for label in options.models:
        n = len(SETTING_SCALES[label])
        found: dict[str, Any] = {mode: [] for mode in options.modes}
        for seed in options.seeds:
            train = _draw(options, label, options.n_train, seed)
            test = _draw(options, label, options.n_test, seed + 1)
            truth = test["settings"].numpy()
            for mode in options.modes:
                frame = None
                if mode == "template frame native":
                    train_crops, test_crops, frame = template_frame_crops(options, train, test)
                    views: tuple[int, ...] = DIRECTED_VIEWS  # the face is still unknown
                elif mode == "template scaled native":
                    train_crops, test_crops, frame = scaled_template_crops(options, train, test, n)
                    views = (0,)  # the face template names the face, as versions read
                elif mode == "true zoomed native":
                    train_crops, test_crops, frame = true_zoomed_crops(options, train, test, n)
                    views = (0,)  # the generator's face: nothing left to the reader
                else:
                    train_crops, views = _crops_and_views(options, train, mode)
                    test_crops, _ = _crops_and_views(options, test, mode)
                read, last_loss = _train_and_score(
                    options,
                    train_crops,
                    train["settings"],
                    test_crops,
                    test["settings"],
                    views,
                    seed,
                    pooled=mode == "upright pooled",
                )
                found[mode].append(
                    {
                        "seed": seed,
                        "exact": float(np.mean(read == truth)),
                        "within_one": float(np.mean(np.abs(read - truth) <= 1)),
                        "mirror_reading": float(np.mean((read != truth) & (read == -truth % n))),
                        "last_train_loss": last_loss,
                        **({"frame": frame} if frame else {}),
                    }
                )
        summary = {mode: _summary(runs) for mode, runs in found.items()}
        results["models"][label] = {"settings": n, **summary}
        table.add_row(label, n, f"{1 / n:.2f}", *(_cell(summary[m]) for m in options.modes))
    table.notes.append(
        "Synthetic X-rays of the demo generator; each model's reader trained and tested on its "
        "own X-rays (other seed for the test). 'upright' is what versions read now; 'true "
        "axis' turns by the generator's valve angle. Settings validated on synthetic images "
        "only."
    )
    return [table], results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_common_arguments(parser)
    parser.add_argument("--models", nargs="+", default=None, help="valve models to read")
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--n-test", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--lr-max", type=float, default=None, help="one-cycle peak rate")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="one run per seed")
    parser.add_argument(
        "--label-sigma", type=float, default=None, help="soft targets: Gaussian, in steps"
    )
    parser.add_argument("--reader-px", type=int, default=None, help="side the reader sees")
    parser.add_argument("--reader-fraction", type=float, default=None, help="crop / square side")
    add_size_range_argument(parser)
    parser.add_argument(
        "--modes", nargs="+", choices=READER_MODES, default=None, help="crops to compare"
    )
    parser.add_argument(
        "--frames-only", action="store_true", help="compare the frames, train no reader"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    options = QUICK if args.quick else ReaderOptions()
    if args.models:
        options = replace(options, models=tuple(args.models))
    if args.n_train:
        options = replace(options, n_train=args.n_train)
    if args.n_test:
        options = replace(options, n_test=args.n_test)
    if args.epochs:
        options = replace(options, epochs=args.epochs)
    if args.lr_max:
        options = replace(options, lr_max=args.lr_max)
    if args.modes:
        options = replace(options, modes=tuple(args.modes))
    if args.seeds:
        options = replace(options, seeds=tuple(args.seeds))
    if args.label_sigma is not None:
        options = replace(options, label_sigma=args.label_sigma)
    if args.reader_px:
        options = replace(options, reader_px=args.reader_px)
    if args.reader_fraction:
        options = replace(options, reader_fraction=args.reader_fraction)
    if args.size_range:
        options = replace(options, size_range_px=tuple(args.size_range))
    if args.frames_only:
        options = replace(options, frames_only=True)
    tables, results = run(options)
    emit(tables, args.markdown)
    out = args.json or (args.markdown.with_suffix(".reader.json") if args.markdown else None)
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
