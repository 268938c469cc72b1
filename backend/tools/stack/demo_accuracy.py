"""How right the served version is on the demo: the demo knows every X-ray's true valve.

The demo project's unlabelled tasks are what an annotator would review next; the backend
pre-annotated each with the served version. Comparing those predictions (as Label Studio
stores them) with the demo manifest's truth says whether the product works, not only the
loop: ``valve-id up`` and ``valve-id status`` print it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.shared.labels import SettingScale

__all__ = ["DemoAccuracy", "demo_accuracy"]


@dataclass(frozen=True)
class DemoAccuracy:
    """The served version's answers on the unlabelled demo tasks, against the truth."""

    version: str
    correct: int
    scored: int
    """Unlabelled tasks holding a prediction of ``version`` (re-scoring may still run)."""
    unlabelled: int
    location_errors_px: tuple[float, ...] = ()
    """Distance from each predicted valve keypoint to the true centre, pixels of the image."""
    setting_steps: tuple[int, ...] = ()
    """For each X-ray whose model was proposed right and whose true setting is known: how
    many steps of the scale the proposed setting is off (0: right)."""

    def setting_line(self) -> str:
        """How right the proposed settings are (empty if the version proposed none)."""
        steps = np.abs(np.asarray(self.setting_steps))
        if not len(steps):
            return ""
        return (
            f"; setting right on {int((steps == 0).sum())} of {len(steps)} with the right model "
            f"({float(np.mean(steps <= 1)):.2f} within one step; synthetic settings)"
        )

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None

    @property
    def median_location_error_px(self) -> float | None:
        errors = self.location_errors_px
        return float(np.median(errors)) if errors else None

    def location_line(self) -> str:
        """Where the version put the valve, against the true centres (empty if it never did)."""
        errors = self.location_errors_px
        if not errors:
            return ""
        return (
            f"; valve located {np.median(errors):.1f} px from its centre (median, "
            f"95th percentile {np.percentile(errors, 95):.1f} px, {len(errors)} X-rays)"
        )

    def line(self) -> str:
        if not self.scored:
            return (
                f"{self.version}: no unlabelled demo task holds its prediction yet "
                f"({self.unlabelled} to score)"
            )
        pending = (
            ""
            if self.scored == self.unlabelled
            else f"; {self.unlabelled - self.scored} still being scored"
        )
        return (
            f"{self.version} is right on {self.correct} of {self.scored} unlabelled demo "
            f"X-rays (accuracy {self.accuracy:.2f}{pending}){self.location_line()}"
            f"{self.setting_line()}"
        )


def _choice(prediction: Mapping[str, Any], choices_name: str) -> str | None:
    for result in prediction.get("result") or []:
        if result.get("from_name") == choices_name and result.get("type") == "choices":
            choices = (result.get("value") or {}).get("choices") or []
            return str(choices[0]) if choices else None
    return None


def _keypoint_px(
    prediction: Mapping[str, Any], keypoint_name: str | None
) -> tuple[float, float] | None:
    """The prediction's valve keypoint in pixels (Label Studio stores percent + the size)."""
    for result in prediction.get("result") or []:
        if result.get("type") != "keypointlabels" or result.get("from_name") != keypoint_name:
            continue
        value = result.get("value") or {}
        try:
            x = float(value["x"]) / 100.0 * float(result["original_width"])
            y = float(value["y"]) / 100.0 * float(result["original_height"])
        except (KeyError, TypeError, ValueError):
            return None
        return (x, y) if math.isfinite(x) and math.isfinite(y) else None
    return None


def demo_accuracy(
    tasks: Iterable[Mapping[str, Any]],
    truth: Mapping[str, Any],
    version: str,
    choices_name: str,
    keypoint_name: str | None = None,
    settings: Sequence[SettingScale] = (),
) -> DemoAccuracy:
    """Score ``version``'s predictions on the unlabelled ``tasks`` (Label Studio task dicts
    with ``predictions``) against ``truth`` (``source_uid`` → an object with ``label`` and,
    if known, ``valve_xy`` and ``setting``): the class, where its keypoint put the valve,
    and, on the config's setting scales, how far the proposed setting is off."""
    correct = scored = unlabelled = 0
    errors: list[float] = []
    steps: list[int] = []
    scales = {s.valve: s for s in settings}
    for task in tasks:
        if (task.get("total_annotations") or 0) > 0:
            continue
        image = truth.get(str((task.get("data") or {}).get("source_uid")))
        if image is None:
            continue
        unlabelled += 1
        ours = [p for p in task.get("predictions") or [] if str(p.get("model_version")) == version]
        answer = _choice(ours[-1], choices_name) if ours else None
        if answer is None:
            continue
        scored += 1
        correct += int(answer == image.label)
        point = _keypoint_px(ours[-1], keypoint_name) if keypoint_name else None
        true_xy = getattr(image, "valve_xy", None)
        if point is not None and true_xy is not None:
            errors.append(math.dist(point, true_xy))
        scale = scales.get(image.label) if answer == image.label else None
        true_setting = getattr(image, "setting", None)
        if scale is not None and true_setting in scale.values:
            read = _choice(ours[-1], scale.name)
            if read in scale.values:
                steps.append(scale.values.index(read) - scale.values.index(true_setting))
    return DemoAccuracy(version, correct, scored, unlabelled, tuple(errors), tuple(steps))
