"""The recipe of one locate-then-classify fold (plain PyTorch, CPU-sized).

The network is :class:`training.shared.locate_classify.LocateClassifyNet` (shared with serving);
this module trains it: the locator head on cached frozen features, then the crop classifier.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.shared.inference import autocast_for
from training.shared.locate_classify import (
    LocateClassifyNet,
    ReaderFrames,
    SettingLayout,
    TwoStageParams,
    averaged_views,
    crop_around,
    dihedral,
    face_frame,
    principal_axis,
    reader_windows,
    setting_blocks,
    soft_argmax,
    valve_frame,
    wide_crops,
)
from training.shared.model import InitInfo, build_model

__all__ = [
    "CropTrainer",
    "MIN_FRAME_XRAYS",
    "TwoStageFoldResult",
    "fit_frame",
    "fit_reader_frames",
    "setting_mask",
    "setting_targets",
    "train_two_stage_fold",
]

logger = logging.getLogger(__name__)

LOCATOR_LR = 1e-3
"""AdamW rate of the locator head (on cached features: hundreds of cheap passes)."""
LOCATOR_BATCH = 32
"""Feature maps per locator-head step."""
MIN_FRAME_XRAYS = 8
"""Fewest training X-rays of a valve model its template is fitted from; a model with fewer
(or with fewer than two of its settings labelled) is read on the directed crop."""
FRAME_CHUNK = 64
"""X-rays whose search windows are cut and aligned at once while frames are fitted."""
MIN_ONE_CYCLE_STEPS = 10
"""Fewer optimiser steps (tiny test runs) train at a constant rate: one-cycle needs a warm-up
and an annealing phase of at least one step each."""


# --- the recipe of one fold ------------------------------------------------------------------

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class TwoStageFoldResult:
    """One fold: the network, out-of-fold logits and centres, and how it went."""

    model: LocateClassifyNet
    val_logits: np.ndarray
    val_centres: np.ndarray
    """``(n_val, 2)`` predicted centres, (x, y) in [0, 1] of the prepared image."""
    history: list[dict[str, Any]]
    init: InitInfo
    class_weights: np.ndarray
    val_setting_logits: np.ndarray | None = None
    """``(n_val, T)`` out-of-fold setting logits; None when the run reads no settings."""


def setting_targets(
    classes: list[str], labels: np.ndarray, settings: list[str | None], layout: SettingLayout
) -> np.ndarray:
    """Each image's setting as a column of the setting logits; -1 where it has none (or its
    valve model has no scale, or the value is not on it): it still trains the valve type."""
    columns: dict[tuple[str, str], int] = {}
    for valve, values in layout:
        for value in values:
            columns[(valve, value)] = len(columns)
    return np.array(
        [
            -1 if setting is None else columns.get((classes[int(y)], setting), -1)
            for y, setting in zip(labels, settings, strict=True)
        ],
        dtype=np.int64,
    )


def setting_mask(classes: list[str], layout: SettingLayout) -> np.ndarray:
    """``(K, T)`` bool: which setting columns belong to each class's scale (none for a class
    without one). A setting is read under its valve model: softmax over that block only."""
    total = sum(len(values) for _, values in layout)
    mask = np.zeros((len(classes), total), dtype=bool)
    for valve, block in setting_blocks(layout).items():
        if valve in classes:
            mask[classes.index(valve), block] = True
    return mask


def fit_reader_frames(
    model: LocateClassifyNet,
    classes: list[str],
    labels: np.ndarray,
    settings: np.ndarray,
    rows: np.ndarray,
    centres: np.ndarray,
    sources_of: Callable[[np.ndarray], Sequence[torch.Tensor] | None],
) -> ReaderFrames:
    """Fit each valve model's template and setting region on the training ``rows`` and set
    them on ``model`` (:meth:`~LocateClassifyNet.set_reader_frames`); return every image's
    frame (NaN angle where its model has none or the row is not in ``rows``), found as
    serving finds it, at ``centres``.

    The template needs only the valve model (every X-ray of it in ``rows``); the region
    needs settings (``settings``: setting-logit columns, -1 where unknown), at least two of
    them. A model with fewer than :data:`MIN_FRAME_XRAYS` X-rays is left unframed."""
    params = model.params
    blocks = setting_blocks(params.settings)
    found = ReaderFrames.none(len(labels))
    fitted: dict[str, tuple[torch.Tensor, float, float]] = {}
    for valve, block in blocks.items():
        if valve not in classes:
            continue
        mine = rows[labels[rows] == classes.index(valve)]
        if len(mine) < MIN_FRAME_XRAYS:
            continue
        wide = _wide_of(model, mine, centres, sources_of)
        column = torch.from_numpy(settings[mine])
        scale = torch.where(column >= 0, column - block.start, -1)
        fit = fit_frame(wide, scale, block.stop - block.start)
        if fit is None:
            logger.info("no reader frame for %s: fewer than two of its settings labelled", valve)
            continue
        template, x, half, (angles, mirrored, scales) = fit
        fitted[valve] = (template, x, half)
        at = torch.from_numpy(mine)
        found.angles[at] = angles.float().cpu()
        found.mirrored[at] = mirrored.cpu()
        found.scales[at] = scales.float().cpu()
        found.x[at] = x
        found.half[at] = half
        logger.info("reader frame for %s: region x %.2f, half %.2f", valve, x, half)
    model.set_reader_frames(fitted)
    return found


def fit_frame(
    wide: torch.Tensor, scale: torch.Tensor, n_settings: int
) -> tuple[torch.Tensor, float, float, tuple[torch.Tensor, ...]] | None:
    """One valve model's frame from the search windows (:func:`~training.shared.
    locate_classify.wide_crops`) of its training X-rays and their settings (indices on its
    scale, -1 unknown): ``(templates, x, half, (angles, mirrored, scales))``: the scaled
    template, the reader-window template (each started from the directed principal axes)
    and the face template, stacked; the setting region on the scaled frame; and each
    window's frame (:func:`~training.shared.locate_classify.valve_frame`, as serving finds
    it). None where fewer than two settings are known (no region to learn)."""
    from training.shared.template_frame import fit_face, fit_template, setting_region, turn

    known = scale >= 0
    if len(scale[known].unique()) < 2:
        return None
    scaled = fit_template(wide, principal_axis(wide, directed=True), scaled=True)
    windows = reader_windows(wide)
    window = fit_template(windows, principal_axis(windows, directed=True))
    found = valve_frame(wide, torch.stack([scaled, window]))  # the face still open
    framed = turn(wide, *found)
    x, half = setting_region(framed[known], scale[known], n_settings)  # either face alike
    face = fit_face(framed, x, half)
    return torch.stack([scaled, window, face]), x, half, face_frame(wide, found, face)


def _wide_of(
    model: LocateClassifyNet,
    rows: np.ndarray,
    centres: np.ndarray,
    sources_of: Callable[[np.ndarray], Sequence[torch.Tensor] | None],
) -> torch.Tensor:
    """The template search's windows of ``rows`` at ``centres``, cut a chunk at a time."""
    parts = []
    for start in range(0, len(rows), FRAME_CHUNK):
        chunk = rows[start : start + FRAME_CHUNK]
        sources = sources_of(chunk)
        if sources is None:
            raise ValueError("a reader frame is fitted on the X-rays' own pixels: pass sources")
        at = torch.from_numpy(centres[chunk]).float()
        parts.append(wide_crops(sources, at, model.params.reader_fraction, model.params.reader_px))
    return torch.cat(parts)


class CropTrainer:
    """The crop networks' fitting loop: AdamW one-cycle over crops around each image's centre
    (jittered by about the locator's error), dihedral + brightness augmentation."""

    def __init__(
        self,
        images: torch.Tensor,
        centres: np.ndarray,
        jitter: float,
        config: Any,
        network_input: Callable[[torch.Tensor], torch.Tensor],
        autocast: Any,
        generator: torch.Generator,
        device: torch.device,
    ) -> None:
        self.images, self.centres, self.jitter = images, centres, jitter
        self.config, self.network_input, self.autocast = config, network_input, autocast
        self.generator, self.device = generator, device

    def fit(
        self,
        net: nn.Module,
        train_idx: np.ndarray,
        loss_of: Callable[[torch.Tensor, np.ndarray], torch.Tensor],
        crop: Callable[[np.ndarray, torch.Tensor], torch.Tensor],
        epochs: int,
        on_epoch: Callable[[int, float], None],
        views: tuple[int, ...] = tuple(range(8)),
        lr_max: float | None = None,
    ) -> None:
        """``epochs`` passes over ``train_idx``; ``loss_of(float outputs, picked rows)``.
        ``crop(rows, centres)`` cuts the network's input from those images (in [0, 1]) around
        the (jittered) centres; each batch is seen in one of
        ``views`` (:func:`dihedral` indices); the one-cycle peak is ``lr_max`` (default: the
        recipe's)."""
        config, generator = self.config, self.generator
        lr = config.lr_max if lr_max is None else lr_max
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        bs = config.batch_size
        steps = epochs * math.ceil(len(train_idx) / bs)
        schedule: torch.optim.lr_scheduler.LRScheduler = (
            torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.25)
            if steps >= MIN_ONE_CYCLE_STEPS
            else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
        )
        for epoch in range(epochs):
            order = train_idx[torch.randperm(len(train_idx), generator=generator).numpy()]
            total, seen = 0.0, 0
            for start in range(0, len(order), bs):
                pick = order[start : start + bs]
                if len(pick) < 2:  # the head's BatchNorm needs two images (fastai drops it too)
                    continue
                shift = torch.randn(len(pick), 2, generator=generator) * self.jitter
                at = torch.from_numpy(self.centres[pick]) + shift
                crops = crop(pick, at)
                view = views[int(torch.randint(len(views), (1,), generator=generator))]
                crops = dihedral(crops, view)
                gain = 1 + (torch.rand(len(pick), 1, 1, generator=generator) - 0.5) * 0.4
                crops = (crops * gain).clamp(0, 1)
                batch = self.network_input(crops).contiguous(memory_format=torch.channels_last)
                with self.autocast:
                    out = net(batch)
                loss = loss_of(out.float(), pick)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(pick)
                seen += len(pick)
            on_epoch(epoch + 1, total / max(seen, 1))


def train_two_stage_fold(
    images: np.ndarray,
    labels: np.ndarray,
    centres: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    num_classes: int,
    config: Any,
    *,
    fold: int = 0,
    device: torch.device | None = None,
    progress: ProgressFn | None = None,
    settings: np.ndarray | None = None,
    setting_layout: SettingLayout = (),
    classes: list[str] | None = None,
    sources: Sequence[np.ndarray] | None = None,
) -> TwoStageFoldResult:
    """Train the locator head, then the crop classifier, of one fold; score its validation.

    ``centres`` is ``(N, 2)`` with NaN where no annotator placed the valve. The locator
    learns from the training images that have a centre; the classifier trains on crops at
    the annotated centre (jittered by about the locator's error) where there is one, at the
    locator's prediction elsewhere. Validation crops always use the prediction, as serving
    does, so the out-of-fold numbers include localisation errors. ``sources`` (each image's
    unsquished foreground, :func:`~training.shared.preprocess.prepare_image_with_source`)
    are what a ``reader_native`` setting reader reads.
    """
    from training.fitting.recipe import class_weights, pick_device, seed_everything
    from training.shared.inference import to_network_input

    device = device or pick_device()
    seed_everything(config.seed + fold)
    prep = config.preprocess_params()
    params = TwoStageParams(
        backbone=config.arch,
        locator_px=config.locator_px,
        crop_fraction=config.crop_fraction,
        crop_px=config.crop_px,
        settings=setting_layout if config.reader_epochs > 0 else (),
        reader_fraction=config.reader_fraction,
        reader_px=config.reader_px,
        reader_upright=config.reader_upright,
        reader_directed=config.reader_directed,
        reader_native=config.reader_native,
        test_views=averaged_views(config.test_views),
    )
    if params.source_px is not None and sources is None:
        raise ValueError("a reader_native setting reader needs each image's source")
    classifier, init = build_model(num_classes, pretrained=config.pretrained, arch=config.arch)
    locator_base, _ = build_model(1, pretrained=config.pretrained, arch=config.arch)
    model = LocateClassifyNet(num_classes, params, classifier=classifier)
    model.locator_body = nn.Sequential(*list(locator_base.body)[: params.locator_depth])
    if model.reader is not None:  # ImageNet-initialised too (the net builds it blank)
        model.reader, _ = build_model(
            model.reader.num_classes, pretrained=config.pretrained, arch=config.arch
        )
    model = model.to(device)
    weights = class_weights(labels[train_idx], num_classes)
    autocast = autocast_for(device, config.mixed_precision)
    all_images = torch.from_numpy(np.ascontiguousarray(images))

    def sources_of(rows: np.ndarray) -> list[torch.Tensor] | None:
        """The rows' sources, fetched per batch (a cache's are read on use, not held)."""
        if sources is None:
            return None
        return [torch.from_numpy(np.asarray(sources[int(i)])) for i in rows]

    known = ~np.isnan(centres).any(axis=1)
    history: list[dict[str, Any]] = []

    def network_input(batch: torch.Tensor) -> torch.Tensor:
        return to_network_input(batch.to(device), prep, channels_last=False)

    # 1. Locator: frozen ImageNet body, its features computed once (and mirrored).
    model.locator_body.eval().requires_grad_(False)
    loc_train = train_idx[known[train_idx]]

    @torch.inference_mode()
    def features(idx: np.ndarray, mirror: bool = False) -> torch.Tensor:
        out = []
        for start in range(0, len(idx), config.batch_size):
            batch = all_images[idx[start : start + config.batch_size]].float()
            batch = batch.flip(-1) if mirror else batch
            with autocast:
                out.append(model.locator_features(network_input(batch)).float())
        return torch.cat(out) if out else torch.zeros(0)

    if len(loc_train) == 0:
        raise ValueError("no training image of this fold has a valve centre to learn from")
    feats = torch.cat([features(loc_train), features(loc_train, mirror=True)])
    target = torch.from_numpy(centres[loc_train]).float()
    target = torch.cat([target, torch.stack([1 - target[:, 0], target[:, 1]], dim=1)]).to(device)
    head = model.locator_head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=LOCATOR_LR, weight_decay=1e-3)
    for epoch in range(config.locator_epochs):
        order = torch.randperm(len(feats))
        total = 0.0
        for start in range(0, len(order), LOCATOR_BATCH):
            rows = order[start : start + LOCATOR_BATCH]
            loss = F.l1_loss(soft_argmax(head(feats[rows])), target[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(rows)
        if epoch + 1 == config.locator_epochs:
            history.append({"fold": fold, "stage": "locate", "train_l1": total / len(feats)})
    head.eval()

    @torch.inference_mode()
    def predicted_centres(idx: np.ndarray) -> np.ndarray:
        if len(idx) == 0:
            return np.zeros((0, 2), dtype=np.float32)
        return soft_argmax(head(features(idx))).cpu().numpy().astype(np.float32)

    crop_centres = centres.astype(np.float32).copy()
    unknown_train = train_idx[~known[train_idx]]
    crop_centres[unknown_train] = predicted_centres(unknown_train)
    val_centres = predicted_centres(val_idx)
    with torch.inference_mode():  # the training images' own features, not mirrored
        fitted = soft_argmax(head(feats[: len(loc_train)])).cpu().numpy()
    residual = np.linalg.norm(fitted - centres[loc_train], axis=1)
    jitter = max(float(np.median(residual)), config.crop_jitter)
    logger.info("fold %d: locator trained (%d images with a centre)", fold, len(loc_train))

    # 2. Classifier on crops: weighted CE, AdamW one-cycle, dihedral + brightness augmentation.
    clf = model.classifier.to(memory_format=torch.channels_last).train()
    loss_fn = nn.CrossEntropyLoss(weight=torch.from_numpy(weights).to(device))
    y_all = torch.from_numpy(labels.astype(np.int64))
    generator = torch.Generator().manual_seed(config.seed + fold)
    crops = CropTrainer(
        all_images, crop_centres, jitter, config, network_input, autocast, generator, device
    )

    def on_epoch(epoch: int, loss: float) -> None:
        row = {"fold": fold, "epoch": epoch, "epochs": config.epochs, "train_loss": loss}
        history.append(row)
        logger.info("fold %d epoch %d/%d %s", fold, epoch, config.epochs, row)
        if progress is not None:
            progress(row)

    crops.fit(
        clf,
        train_idx,
        lambda out, pick: loss_fn(out, y_all[pick].to(device)),
        lambda rows, at: crop_around(
            all_images[rows].float(), at, params.crop_fraction, params.crop_px
        ),
        config.epochs,
        on_epoch,
    )

    # 2b. Setting reader: its own network on a tighter, magnified crop, trained on the images
    # that have a setting; cross-entropy within the true valve model's block. The crop is
    # seen in the views that keep what its frame fixed (TwoStageParams.reader_views): all
    # eight unturned, those that keep the axis upright; as it is once a face template names
    # the face (a rotor seen mirrored looks like another setting's).
    reader = model.reader
    if reader is not None:
        if classes is None or settings is None:
            raise ValueError("a setting layout needs the classes and each image's setting")
        allowed = torch.from_numpy(setting_mask(classes, setting_layout)).to(device)
        targets = torch.from_numpy(settings.astype(np.int64))
        readable = train_idx[settings[train_idx] >= 0]
        losses: list[float] = []
        frames = ReaderFrames.none(len(labels))
        if config.reader_template and params.reader_native:
            frames = fit_reader_frames(
                model, classes, labels, settings, train_idx, crop_centres, sources_of
            )

        def read_loss(out: torch.Tensor, pick: np.ndarray) -> torch.Tensor:
            blocked = out.masked_fill(~allowed[y_all[pick].to(device)], float("-inf"))
            return F.cross_entropy(blocked, targets[pick].to(device))

        crops.fit(
            reader.to(memory_format=torch.channels_last).train(),
            readable,
            read_loss,
            lambda rows, at: params.reader_crop(
                None if params.reader_native else all_images[rows].float(),
                at,
                sources_of(rows),
                frames.rows(torch.from_numpy(rows)),
            ),
            config.reader_epochs if len(readable) >= 2 else 0,
            lambda _epoch, loss: losses.append(loss),
            params.reader_views(),
            config.reader_lr_max,
        )
        framed = [valve for valve, _, _ in model.params.reader_frames]
        row = {"fold": fold, "stage": "read", "n_train": len(readable), "framed": framed}
        history.append({**row, "train_loss": losses[-1]} if losses else row)

    # 3. Out-of-fold: crops at the predicted centres, as serving does.
    model.eval()
    bs = config.batch_size
    val_logits, val_readings = [], []
    with torch.inference_mode():
        for start in range(0, len(val_idx), bs):
            pick = val_idx[start : start + bs]
            batch = network_input(all_images[pick].float())
            with autocast:
                at = torch.from_numpy(val_centres[start : start + bs])
                answer = model.answer(batch, at, sources_of(pick))
            val_logits.append(answer.logits.float().cpu())
            if answer.setting_logits is not None:
                val_readings.append(answer.setting_logits.float().cpu())
    logits = torch.cat(val_logits).numpy() if val_logits else np.zeros((0, num_classes), np.float32)
    readings = None
    if reader is not None:
        columns = sum(len(values) for _, values in setting_layout)
        readings = torch.cat(val_readings).numpy() if val_readings else np.zeros((0, columns))
    model = model.to("cpu").eval().requires_grad_(True)
    return TwoStageFoldResult(model, logits, val_centres, history, init, weights, readings)
