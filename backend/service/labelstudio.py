"""Label Studio on the wire, backend side: the payloads it sends us, and our answers.

* **What Label Studio sends** (``/setup``, ``/predict``, ``/webhook``) as lenient pydantic
  models: only the fields valve-id uses are typed, everything else is kept
  (``extra="allow"``), so a newer Label Studio adding keys never breaks the backend. The
  response builders (:func:`choice_result`, :func:`keypoint_result`, :class:`PredictResponse`)
  produce the shapes
  recorded from Label Studio 1.23.2 (see ``tests/backend/payloads/``).
* **What we ask Label Studio** goes through :class:`training.labelstudio.LabelStudio` and
  task images through :class:`training.labelstudio.ImageFetcher`, shared with training and
  the operator tools; :func:`label_studio_client` and :func:`image_fetcher` build them from
  the backend's settings.

Project identity: Label Studio sends ``"<id>.<created_ts>"`` in ``/setup`` and ``/predict``
(project ids restart at 1 in every fresh instance, the creation time makes the key unique);
webhooks carry only the project object, from which :func:`project_key_of` rebuilds the key
when ``created_at`` is present.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.settings import Settings, SettingsError
from training.labelstudio import ImageFetcher, LabelStudio, Retry
from training.labelstudio.images import DEFAULT_MAX_BYTES
from training.shared.errors import LabelConfigError
from training.shared.labels import LabelConfig

__all__ = [
    "KEYPOINT_WIDTH_PERCENT",
    "PredictRequest",
    "PredictResponse",
    "SetupRequest",
    "Task",
    "TaskResult",
    "WebhookEvent",
    "WebhookProject",
    "choice_result",
    "configure_training",
    "image_fetcher",
    "keypoint_result",
    "label_studio_client",
    "project_key",
    "project_key_of",
]

KEYPOINT_WIDTH_PERCENT = 1.0
"""Drawn size of a keypoint :func:`keypoint_result` writes, percent of the image width."""


# --------------------------------------------------------------------------------------------
# Project keys


def project_key(value: str | int) -> tuple[int, str]:
    """``"<id>.<created_ts>"`` (or a plain id) → ``(ls_id, key)``; ``ValueError`` if neither."""
    text = str(value).strip()
    head, dot, tail = text.partition(".")
    if not head.isdigit() or (dot and not tail.isdigit()):
        raise ValueError(f"project {text[:40]!r} is neither '<id>.<timestamp>' nor an id")
    return int(head), text


def project_key_of(project: Mapping[str, Any]) -> str | None:
    """Rebuild ``"<id>.<created_ts>"`` from a project object (webhooks), if it has both."""
    ls_id, created = project.get("id"), project.get("created_at")
    if not isinstance(ls_id, int) or not isinstance(created, str):
        return None
    try:
        stamp = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return None
    return f"{ls_id}.{int(stamp.timestamp())}"


# --------------------------------------------------------------------------------------------
# What Label Studio sends


class _Lenient(BaseModel):
    """Typed where we read, permissive elsewhere: unknown keys are kept, never refused."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Task(_Lenient):
    """A task as Label Studio sends it; ``data`` holds the image URL under the config's key."""

    id: int
    data: dict[str, Any] = Field(default_factory=dict)


class SetupRequest(_Lenient):
    """``POST /setup``: sent on connect and before predictions."""

    project: str
    label_config: str = Field(alias="schema")
    hostname: str | None = None
    access_token: str | None = Field(default=None, repr=False)
    extra_params: dict[str, Any] | None = None

    @field_validator("project", mode="before")
    @classmethod
    def _check_project(cls, value: Any) -> Any:
        return _checked_key(value)

    @property
    def ls_id(self) -> int:
        return project_key(self.project)[0]


class PredictRequest(_Lenient):
    """``POST /predict``: the tasks to pre-annotate, one answer each, in order."""

    tasks: list[Task]
    project: str | None = None
    label_config: str | None = None
    params: dict[str, Any] | None = None

    @field_validator("project", mode="before")
    @classmethod
    def _check_project(cls, value: Any) -> Any:
        return _checked_key(value)


class WebhookProject(_Lenient):
    """The project object every webhook carries (about 50 keys; we read the id)."""

    id: int


class WebhookEvent(_Lenient):
    """``POST /webhook``: ``action`` plus whatever that action carries.

    ``ANNOTATION_CREATED``/``_UPDATED`` carry ``annotation`` and ``task``;
    ``ANNOTATIONS_DELETED`` only ``annotations`` ids; ``TASKS_CREATED`` ``tasks``;
    ``START_TRAINING`` and ``PROJECT_UPDATED`` the project alone.
    """

    action: str
    project: WebhookProject | None = None
    task: dict[str, Any] | None = None
    tasks: list[dict[str, Any]] | None = None
    annotation: dict[str, Any] | None = None
    annotations: list[dict[str, Any]] | None = None

    @property
    def project_key(self) -> str | None:
        """``"<id>.<created_ts>"`` when the project object has ``created_at``."""
        return project_key_of(self.project.model_dump()) if self.project else None


# --------------------------------------------------------------------------------------------
# What we answer


def choice_result(config: LabelConfig, label: str) -> list[dict[str, Any]]:
    """The ``result`` list pre-selecting ``label`` in the project's ``<Choices>``.

    ``value`` comes first: the Data Manager's "Prediction results" column shows the stored JSON
    cut after about three lines, so the review view shows the proposed class only if it leads
    (SQLite keeps this order; PostgreSQL's jsonb puts the shorter keys ``type`` and ``value``
    first anyway).
    """
    return [
        {
            "value": {"choices": [label]},
            "from_name": config.choices_name,
            "to_name": config.image_name,
            "type": "choices",
        }
    ]


def setting_result(
    config: LabelConfig, valve: str, value: str, score: float | None = None
) -> list[dict[str, Any]]:
    """The ``result`` list selecting ``value`` in ``valve``'s setting ``<Choices>`` (shown
    while that valve model is chosen), with the reading's probability as its ``score`` when
    given; empty when the config has no scale for ``valve`` or ``value`` is not on it."""
    scale = config.setting_scale(valve)
    if scale is None or value not in scale.values:
        return []
    result: dict[str, Any] = {
        "value": {"choices": [value]},
        "from_name": scale.name,
        "to_name": config.image_name,
        "type": "choices",
    }
    if score is not None:
        result["score"] = float(score)
    return [result]


def keypoint_result(
    config: LabelConfig, x_px: float, y_px: float, width_px: int, height_px: int
) -> list[dict[str, Any]]:
    """The ``result`` list marking the valve centre ``(x_px, y_px)`` with the config's
    ``<KeyPointLabels>`` (pixels of a ``width_px`` × ``height_px`` image, x = column).

    Label Studio stores a keypoint in percent of the image plus the image's size in pixels;
    :func:`training.labelstudio.export.keypoint_centre` reads it back. Raises
    :class:`LabelConfigError` when the config has no keypoint tag (or it has no label), and
    ``ValueError`` for a size that is not positive or a point outside the image.
    """
    if config.keypoint_name is None or config.keypoint_label is None:
        raise LabelConfigError("the labeling config has no <KeyPointLabels> tag with a <Label>")
    if width_px <= 0 or height_px <= 0:
        raise ValueError(f"image size must be positive, got {width_px} x {height_px}")
    if not (0.0 <= x_px <= width_px and 0.0 <= y_px <= height_px):
        raise ValueError(f"({x_px}, {y_px}) lies outside the {width_px} x {height_px} image")
    return [
        {
            "id": "valve-centre",
            "from_name": config.keypoint_name,
            "to_name": config.image_name,
            "type": "keypointlabels",
            "original_width": int(width_px),
            "original_height": int(height_px),
            "image_rotation": 0,
            "value": {
                "x": float(x_px) / width_px * 100.0,
                "y": float(y_px) / height_px * 100.0,
                "width": KEYPOINT_WIDTH_PERCENT,
                "keypointlabels": [config.keypoint_label],
            },
        }
    ]


class TaskResult(BaseModel):
    """One task's answer; a failed task has an empty ``result`` and no score."""

    result: list[dict[str, Any]] = Field(default_factory=list)
    score: float | None = None
    model_version: str | None = None


class PredictResponse(BaseModel):
    """``/predict``'s answer: one :class:`TaskResult` per task, in the request's order."""

    results: list[TaskResult]
    model_version: str

    def to_json(self) -> dict[str, Any]:
        """The wire shape (absent score/version are left out, not sent as null)."""
        return self.model_dump(exclude_none=True)


# --------------------------------------------------------------------------------------------
# What we ask Label Studio: the shared client and fetcher, from the backend's settings


def label_studio_client(
    settings: Settings, *, http: httpx.Client | None = None, retry: Retry | None = None
) -> LabelStudio:
    """The Label Studio client for ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``."""
    return LabelStudio(
        settings.label_studio_url, settings.label_studio_api_key, http=http, retry=retry
    )


def image_fetcher(
    settings: Settings,
    *,
    auth_headers: Callable[[], Mapping[str, str]] | None = None,
    http: httpx.Client | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ImageFetcher:
    """The task-image fetcher for ``/predict`` and the prelabel jobs: Label Studio, the
    ``VALVE_ID_ALLOWED_HOSTS`` and ``LOCAL_FILES_DOCUMENT_ROOT``, one try per image (an
    annotator is waiting), at most ``max_bytes``. A setting it cannot use is a
    :class:`SettingsError` naming the variable."""
    try:
        return ImageFetcher(
            settings.label_studio_url,
            local_files_root=settings.local_files_root,
            allowed_hosts=settings.allowed_hosts,
            auth_headers=auth_headers,
            http=http,
            max_bytes=max_bytes,
        )
    except ValueError as exc:
        raise SettingsError(str(exc)) from None


def configure_training(settings: Settings) -> None:
    """Point this process's training snapshots (``labelstudio:<id>``) at the configured Label
    Studio, under the same image rules as the backend's (the worker, ``valve-id train`` and
    ``valve-id simulate`` call it; training code never reads the settings)."""
    from training.labelstudio.export import configure

    configure(
        settings.label_studio_url,
        settings.label_studio_api_key,
        settings.local_files_root,
        settings.allowed_hosts,
    )


# --------------------------------------------------------------------------------------------
# helpers


def _checked_key(value: Any) -> Any:
    """Validate a ``project`` field; non-strings/ints are left for pydantic to refuse."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return value
    return project_key(value)[1]
