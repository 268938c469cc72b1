"""One pre-annotation path: task → image → served version → the project's class → result.

``/predict`` (:meth:`backend.service.valve_model.ValveModel.predict`) and the jobs that pre-label
new tasks and re-score a project (:mod:`backend.loop.jobs`) all call :func:`prelabel`; they keep
only what is theirs: chunking and metrics, or paging, skipping and announcing the version.
So a task is fetched, predicted and mapped onto the project's classes by one set of rules,
and one task's failure (no URL, a refused download, an undecodable file) is that task's
:class:`Prelabel` outcome, never the batch's.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from backend.service.labelstudio import choice_result, keypoint_result, setting_result
from backend.service.prediction import Prediction, PredictionError
from training.shared.labels import LabelConfig

__all__ = [
    "FetcherLike",
    "Outcome",
    "Prelabel",
    "PredictorLike",
    "label_in_config",
    "location_result",
    "note_result",
    "prelabel",
    "setting_of",
    "task_id",
]

logger = logging.getLogger(__name__)

Outcome = Literal["ok", "no_image", "fetch_error", "predict_error", "unknown_class", "no_model"]
"""What became of one task (``/metrics`` counts ``/predict``'s by this name)."""


class PredictorLike(Protocol):
    """What pre-annotation needs from :class:`backend.service.predictor.Predictor`."""

    version: str | None

    def predict(
        self, images: Sequence[bytes | BaseException]
    ) -> Sequence[Prediction | PredictionError | None]: ...


class FetcherLike(Protocol):
    """What pre-annotation needs from :class:`training.labelstudio.ImageFetcher`."""

    def fetch(self, url: str) -> bytes: ...


@dataclass(frozen=True)
class Prelabel:
    """One task's pre-annotation, or why it has none (``reason``: hosts, statuses and
    formats, never paths or patient data)."""

    task_id: Any
    outcome: Outcome
    label: str | None = None
    score: float | None = None
    model_version: str | None = None
    result: list[dict[str, Any]] = field(default_factory=list)
    """The Label Studio result (a choice of ``label``, and the valve's centre as a keypoint
    when the config asks for one and the version found it); empty unless ``outcome`` is ok."""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


def prelabel(
    tasks: Sequence[Any],
    *,
    config: LabelConfig,
    predictor: PredictorLike,
    fetcher: FetcherLike,
    pool: Executor,
) -> list[Prelabel]:
    """One :class:`Prelabel` per task, in order.

    A task is a :class:`backend.service.labelstudio.Task`, a task mapping or an SDK task object;
    its image URL is ``data[config.image_key]``. Images download in ``pool`` (I/O bound),
    then the served version predicts the fetched ones in one call. A class the project's
    config lacks is replaced by the most probable class it has (:func:`label_in_config`).
    """
    answers: list[Prelabel | None] = [None] * len(tasks)
    wanted: list[tuple[int, str]] = []
    for index, task in enumerate(tasks):
        url = _data(task).get(config.image_key)
        if isinstance(url, str) and url.strip():
            wanted.append((index, url))
        else:
            answers[index] = Prelabel(
                task_id(task), "no_image", reason=f"no image URL in data.{config.image_key}"
            )
    if wanted:
        images = list(pool.map(lambda item: _fetch(fetcher, tasks[item[0]], item[1]), wanted))
        predictions = predictor.predict(images)
        if len(predictions) != len(images):
            raise RuntimeError(
                f"predictor answered {len(predictions)} items for {len(images)} images"
            )
        for (index, _), image, prediction in zip(wanted, images, predictions, strict=True):
            answers[index] = _answer(tasks[index], image, prediction, config, predictor.version)
    return [a for a in answers if a is not None]


def label_in_config(prediction: Prediction, config: LabelConfig) -> str | None:
    """The predicted class if the project has it, else the most probable class it has (the
    score stays the model's own uncertainty); None if they share no class."""
    if prediction.label in config.classes:
        return prediction.label
    known = {c: p for c, p in prediction.probs.items() if c in config.classes}
    return max(known, key=known.__getitem__) if known else None


def _answer(
    task: Any,
    image: bytes | BaseException,
    prediction: Prediction | PredictionError | None,
    config: LabelConfig,
    served: str | None,
) -> Prelabel:
    tid = task_id(task)
    failed: Outcome = "fetch_error" if isinstance(image, BaseException) else "predict_error"
    if prediction is None:
        return Prelabel(tid, "no_model", reason="no model version served")
    if isinstance(prediction, PredictionError):
        return Prelabel(tid, failed, reason=prediction.reason)
    if not math.isfinite(prediction.score):
        return Prelabel(tid, "predict_error", reason="score is not a finite number")
    label = label_in_config(prediction, config)
    if label is None:
        return Prelabel(
            tid,
            "unknown_class",
            reason=f"class {prediction.label!r} is not in the project's config",
        )
    return Prelabel(
        tid,
        "ok",
        label=label,
        score=float(prediction.score),
        model_version=prediction.model_version or served,
        result=(
            choice_result(config, label)
            + setting_of(prediction, config, label)
            + location_result(prediction, config)
            + note_result(prediction, config, label)
        ),
    )


def setting_of(prediction: Prediction, config: LabelConfig, label: str) -> list[dict[str, Any]]:
    """The pressure setting the version read under the proposed model ``label``, selected in
    that model's setting ``<Choices>`` with its probability as the result's score; nothing when
    the version reads no setting for it or the config has no scale for it."""
    reading = prediction.settings.get(label)
    if reading is None:
        return []
    value, probability = reading
    return setting_result(config, label, value, probability)


def note_result(
    prediction: Prediction, config: LabelConfig, label: str | None = None
) -> list[dict[str, Any]]:
    """valve-id's note in the config's ``model_note`` text area: how sure the proposed
    setting is, and, when the X-ray looks unlike every valve model the version learned, a
    request to consider "Other valve" (the proposed class stays the model's best guess).
    Nothing when there is neither, or the config has no note."""
    if config.note_name is None:
        return []
    lines = []
    label = prediction.label if label is None else label
    reading = prediction.settings.get(label)
    if reading is not None and setting_of(prediction, config, label):
        lines.append(f"Setting {reading[0]}: probability {reading[1]:.0%}.")
    if prediction.unfamiliar and prediction.novelty is not None:
        lines.append(
            f"Unlike every valve model this version learned: more unusual than "
            f"{prediction.novelty:.0%} of the labelled X-rays. Check whether it is another valve."
        )
    if not lines:
        return []
    return [
        {
            "value": {"text": [" ".join(lines)]},
            "from_name": config.note_name,
            "to_name": config.image_name,
            "type": "textarea",
        }
    ]


def location_result(prediction: Prediction, config: LabelConfig) -> list[dict[str, Any]]:
    """The valve's predicted centre as an editable keypoint, when the project's config has a
    ``<KeyPointLabels>`` tag and the version found one; else nothing.

    The annotator's eye goes straight to the valve, and the point they confirm or move is
    the valve centre the next run learns its locator from.
    """
    if config.keypoint_name is None or config.keypoint_label is None:
        return []
    if prediction.centre_px is None or prediction.image_size_px is None:
        return []
    width, height = prediction.image_size_px
    x, y = prediction.centre_px
    if width <= 0 or height <= 0 or not (math.isfinite(x) and math.isfinite(y)):
        return []
    return keypoint_result(config, min(max(x, 0.0), width), min(max(y, 0.0), height), width, height)


def _fetch(fetcher: FetcherLike, task: Any, url: str) -> bytes | Exception:
    try:
        return fetcher.fetch(url)
    except Exception as exc:  # handed to the predictor as this task's error
        logger.info("task %s: image not fetched (%s)", task_id(task), type(exc).__name__)
        return exc


def task_id(task: Any) -> Any:
    """A task's id, whether it is a model, a mapping or an SDK object."""
    return task.get("id") if isinstance(task, Mapping) else getattr(task, "id", None)


def _data(task: Any) -> Mapping[str, Any]:
    data = task.get("data") if isinstance(task, Mapping) else getattr(task, "data", None)
    return data if isinstance(data, Mapping) else {}
