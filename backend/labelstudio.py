"""Label Studio on the wire: the payloads it sends us, and every call we make to it.

Two halves, one per direction:

* **What Label Studio sends** (``/setup``, ``/predict``, ``/webhook``) as lenient pydantic
  models: only the fields valve-id uses are typed, everything else is kept
  (``extra="allow"``), so a newer Label Studio adding keys never breaks the backend. The
  response builders (:func:`choice_result`, :func:`keypoint_result`, :class:`PredictResponse`)
  produce the shapes
  recorded from Label Studio 1.23.2 (see ``tests/backend/payloads/``).
* **What we ask Label Studio** goes through :class:`LabelStudio`, a thin wrapper over
  label-studio-sdk 2.1.2. The SDK handles both token kinds: a Personal Access Token (a JWT
  refresh token it exchanges for 5-minute access tokens) and a legacy token. Each method is
  one small call naming its API route; transient failures (connection errors, 5xx, 429) are
  retried with exponential backoff, then surface as :class:`LabelStudioError`, whose message
  never contains the API key.

Project identity: Label Studio sends ``"<id>.<created_ts>"`` in ``/setup`` and ``/predict``
(project ids restart at 1 in every fresh instance, the creation time makes the key unique);
webhooks carry only the project object, from which :func:`project_key_of` rebuilds the key
when ``created_at`` is present.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from backend.settings import Settings
from training.errors import LabelConfigError, LabelStudioError
from training.labels import LabelConfig
from training.labelstudio_source import latest_annotation_choice

__all__ = [
    "DEFAULT_ATTEMPTS",
    "DEFAULT_BACKOFF_S",
    "PREDICTION_BATCH",
    "REVIEW_VIEW_TITLE",
    "LabelStudio",
    "PredictRequest",
    "PredictResponse",
    "SetupRequest",
    "Task",
    "TaskResult",
    "WebhookEvent",
    "WebhookProject",
    "KEYPOINT_WIDTH_PERCENT",
    "choice_result",
    "keypoint_result",
    "project_key",
    "project_key_of",
]

logger = logging.getLogger(__name__)

DEFAULT_ATTEMPTS = 4
"""Tries per call before giving up (the first one included)."""
DEFAULT_BACKOFF_S = 0.5
"""Wait before the first retry, in seconds; doubled after each failed try (0.5, 1, 2)."""
DEFAULT_TIMEOUT_S = 30.0
"""Per-request timeout in seconds (an export of a large project can take a while)."""
MODEL_VERSION_ATTEMPTS = 6
"""Tries of ``PATCH model_version``: Label Studio refuses it (400) until a prediction of that
version is stored, which may lag the write that created it."""
PREDICTION_BATCH = 100
"""Predictions written per request to Label Studio."""
KEYPOINT_WIDTH_PERCENT = 1.0
"""Drawn size of a keypoint :func:`keypoint_result` writes, percent of the image width."""
REVIEW_VIEW_TITLE = "Review queue — most uncertain first"
"""Title of the saved Data Manager view valve-id creates and keeps valid."""

_RETRY_STATUSES = frozenset({408, 429})
_MAX_MESSAGE_BODY_CHARS = 200

# Data Manager column ids hidden by default in a new view; the prediction's class and score
# are left out of the "explore" list so the review queue shows what the model proposes and
# the number the queue is sorted by.
_REVIEW_VIEW_HIDDEN_COLUMNS = {
    "explore": [
        "tasks:inner_id",
        "tasks:annotations_results",
        "tasks:annotations_ids",
        "tasks:predictions_model_versions",
        "tasks:file_upload",
        "tasks:storage_filename",
        "tasks:created_at",
        "tasks:updated_at",
        "tasks:updated_by",
        "tasks:avg_lead_time",
        "tasks:draft_exists",
    ],
    "labeling": [
        "tasks:id",
        "tasks:inner_id",
        "tasks:completed_at",
        "tasks:cancelled_annotations",
        "tasks:total_predictions",
        "tasks:annotators",
        "tasks:annotations_results",
        "tasks:annotations_ids",
        "tasks:predictions_score",
        "tasks:predictions_model_versions",
        "tasks:predictions_results",
        "tasks:file_upload",
        "tasks:storage_filename",
        "tasks:created_at",
        "tasks:updated_at",
        "tasks:updated_by",
        "tasks:avg_lead_time",
        "tasks:draft_exists",
    ],
}

T = TypeVar("T")
PredictionItem = tuple[int, list[dict[str, Any]], float | None, str] | Mapping[str, Any]
"""One prediction to store: ``(task_id, result, score, model_version)`` or a mapping."""


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


def keypoint_result(
    config: LabelConfig, x_px: float, y_px: float, width_px: int, height_px: int
) -> list[dict[str, Any]]:
    """The ``result`` list marking the valve centre ``(x_px, y_px)`` with the config's
    ``<KeyPointLabels>`` (pixels of a ``width_px`` × ``height_px`` image, x = column).

    Label Studio stores a keypoint in percent of the image plus the image's size in pixels;
    :func:`training.labelstudio_source.keypoint_centre` reads it back. Raises
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
# What we ask Label Studio


class LabelStudio:
    """Every call valve-id makes to Label Studio, through label-studio-sdk.

    ``http`` is the seam for tests and special set-ups: any ``httpx.Client`` (a
    ``MockTransport`` stand-in in unit tests, a client with custom TLS in production). The SDK
    client is built on first use, so a backend starts even while Label Studio is down or the
    key is not set yet; the failure then surfaces per call as :class:`LabelStudioError`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        http: httpx.Client | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
        backoff_s: float = DEFAULT_BACKOFF_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = settings.label_studio_url.rstrip("/")
        self._api_key = settings.label_studio_api_key
        self._http = http
        self._attempts = max(1, attempts)
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        self._sleep = sleep
        self._sdk: Any = None
        self._sdk_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LabelStudio(url={self.url!r})"

    # -- plumbing ------------------------------------------------------------------------

    def _client(self) -> Any:
        with self._sdk_lock:
            if self._sdk is None:
                from label_studio_sdk import LabelStudio as SDK

                # max_retries=0: retries are ours (_call), with backoff we control and a
                # message we write; the SDK's own would multiply with them.
                self._sdk = SDK(
                    base_url=self.url,
                    api_key=self._api_key,
                    httpx_client=self._http or httpx.Client(timeout=self._timeout_s),
                    timeout=self._timeout_s,
                    max_retries=0,
                )
            return self._sdk

    def _call(
        self,
        what: str,
        fn: Callable[[Any], T],
        *,
        attempts: int | None = None,
        retry_on: frozenset[int] = frozenset(),
    ) -> T:
        """Run ``fn(sdk)``; retry transient failures with backoff; raise LabelStudioError."""
        from label_studio_sdk.core.api_error import ApiError
        from label_studio_sdk.core.parse_error import ParsingError

        tries = attempts or self._attempts
        for attempt in range(1, tries + 1):
            try:
                return fn(self._client())
            except ApiError as exc:
                status = exc.status_code
                transient = (
                    status is None
                    or status >= 500
                    or status in _RETRY_STATUSES
                    or status in retry_on
                )
                if not transient or attempt == tries:
                    message = f"Label Studio {what}: HTTP {status}{_brief(exc.body)}"
                    if attempt > 1:
                        message += f" (after {attempt} tries)"
                    raise LabelStudioError(self._scrub(message), status_code=status) from None
                logger.info(
                    "Label Studio %s: HTTP %s, retrying (%d/%d)", what, status, attempt, tries
                )
            except ParsingError as exc:
                raise LabelStudioError(
                    f"Label Studio {what}: unexpected answer (HTTP {exc.status_code}); "
                    "is LABEL_STUDIO_URL a Label Studio 1.x server?",
                    status_code=exc.status_code,
                ) from None
            except httpx.HTTPError as exc:
                if attempt == tries:
                    raise LabelStudioError(
                        f"cannot reach Label Studio at {self.url} ({what}): "
                        f"{type(exc).__name__} after {attempt} tries"
                    ) from None
                logger.info(
                    "Label Studio %s: %s, retrying (%d/%d)",
                    what,
                    type(exc).__name__,
                    attempt,
                    tries,
                )
            self._sleep(self._backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def _scrub(self, text: str) -> str:
        """Never let the key out, even if a server echoed it back in an error body."""
        return text.replace(self._api_key, "***") if self._api_key else text

    # -- calls -------------------------------------------------------------------------

    @staticmethod
    def choice_result(config: LabelConfig, label: str) -> list[dict[str, Any]]:
        """:func:`choice_result`, reachable from a client object (the jobs take one)."""
        return choice_result(config, label)

    def auth_headers(self) -> dict[str, str]:
        """``Authorization`` for downloading task images from Label Studio (``/data/...``).

        A legacy token gives ``Token <key>``; a Personal Access Token gives ``Bearer
        <access>``, where the SDK exchanges the PAT at ``POST /api/token/refresh/`` and caches
        the short-lived access token until it expires (the SDK's own request headers).
        """
        if not self._api_key:
            return {}
        headers = self._call("token refresh", lambda sdk: sdk._client_wrapper.get_headers())
        return {"Authorization": headers["Authorization"]}

    def project(self, project_id: int) -> dict[str, Any]:
        """The project object: ``GET /api/projects/{id}/``."""
        found = self._call(f"get project {project_id}", lambda sdk: sdk.projects.get(project_id))
        return found.model_dump() if hasattr(found, "model_dump") else dict(found)

    def label_config(self, project_id: int) -> str:
        """The project's labeling config XML: ``GET /api/projects/{id}/``."""
        return str(self.project(project_id).get("label_config") or "")

    def count_labelled_tasks(self, project_id: int) -> int:
        """Tasks with at least one non-cancelled annotation: ``GET /api/projects/{id}/``.

        Reads the project's ``num_tasks_with_annotations`` counter (one request, computed by
        Label Studio's database; ground-truth-marked annotations are not counted there), and
        ``finished_task_number`` if an older server lacks it. This is the source of truth
        for "how many labels exist", never our own webhook tally.
        """
        project = self.project(project_id)
        for key in ("num_tasks_with_annotations", "finished_task_number"):
            if isinstance(project.get(key), int):
                return int(project[key])
        raise LabelStudioError(f"Label Studio project {project_id} reports no labelled-task count")

    def labelled_tasks(
        self, project_id: int, choices_name: str | None = None
    ) -> Iterator[dict[str, Any]]:
        """Labelled tasks, latest choice each: ``GET /api/projects/{id}/export?export_type=JSON``.

        Yields ``{"id", "data", "label", "annotation_id"}`` where ``label`` is the single
        choice of the newest non-cancelled annotation (of the ``choices_name`` control when
        given). Tasks whose annotations were all cancelled, or chose nothing, are skipped.
        """
        raw = self._call(
            f"export project {project_id}",
            lambda sdk: b"".join(
                sdk.projects.exports.download_sync(project_id, export_type="JSON")
            ),
        )
        try:
            tasks = json.loads(raw)
        except ValueError:
            raise LabelStudioError(
                f"Label Studio export of project {project_id} is not JSON"
            ) from None
        for task in tasks if isinstance(tasks, list) else []:
            found = latest_annotation_choice(task.get("annotations") or [], choices_name)
            if found is not None:
                annotation_id, label = found
                yield {
                    "id": task.get("id"),
                    "data": task.get("data") or {},
                    "label": label,
                    "annotation_id": annotation_id,
                }

    def unlabelled_tasks(self, project_id: int, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Tasks without annotations, by ascending id: ``GET /api/tasks/?project=..&query=..``.

        Pages by id (``id > last seen``) rather than by page number, so a task labelled while
        we iterate shifts no later task out of reach. Yields ``{"id", "data"}``.
        """
        last_id = 0
        while True:
            query = {
                "filters": {
                    "conjunction": "and",
                    "items": [
                        _filter("tasks:total_annotations", "equal", 0),
                        _filter("tasks:id", "greater", last_id),
                    ],
                },
                "ordering": ["tasks:id"],
            }
            encoded = json.dumps(query)
            page = self._call(
                f"list tasks of project {project_id}",
                lambda sdk, q=encoded: _page_items(
                    sdk, project=project_id, page_size=page_size, query=q
                ),
            )
            if not page:
                return
            yield from page
            new_last = max(int(t["id"]) for t in page)
            if len(page) < page_size or new_last <= last_id:
                return
            last_id = new_last

    def count_unlabelled_tasks(self, project_id: int) -> int:
        """Tasks without annotations: the ``total`` of a one-task page of ``GET /api/tasks/``."""
        query = json.dumps(
            {
                "filters": {
                    "conjunction": "and",
                    "items": [_filter("tasks:total_annotations", "equal", 0)],
                }
            }
        )
        total = self._call(
            f"count unlabelled tasks of project {project_id}",
            lambda sdk: (
                sdk.tasks.list(
                    project=project_id, page=1, page_size=1, fields="task_only", query=query
                ).response.total
            ),
        )
        return int(total)

    def create_predictions(
        self,
        project_id: int,
        items: Sequence[PredictionItem],
    ) -> int:
        """Store predictions, 100 per request: ``POST /api/projects/{id}/import/predictions``.

        Each item is ``(task_id, result, score, model_version)`` or a mapping with those
        keys (``task``, ``result``, ``score``, ``model_version``); a ``None`` score is left
        out. Returns how many were sent.
        """
        rows = [_prediction_row(item) for item in items]
        sent = 0
        for start in range(0, len(rows), PREDICTION_BATCH):
            batch = rows[start : start + PREDICTION_BATCH]
            self._call(
                f"import {len(batch)} predictions into project {project_id}",
                lambda sdk, b=batch: sdk.projects.import_predictions(project_id, request=b),
            )
            sent += len(batch)
        return sent

    def set_model_version(self, project_id: int, version: str) -> None:
        """Make ``version`` the project's model version: ``PATCH /api/projects/{id}/``.

        The review queue's ``predictions_score`` and the annotator's pre-fill only count
        predictions of the project's ``model_version``, so this follows every version change.
        Label Studio refuses it (400) until a prediction of that version exists; such a 400
        is retried a few times with backoff before it becomes an error.
        """
        self._call(
            f"set model_version of project {project_id}",
            lambda sdk: sdk.projects.update(project_id, model_version=version),
            attempts=max(self._attempts, MODEL_VERSION_ATTEMPTS),
            retry_on=frozenset({400}),
        )

    def ensure_review_view(self, project_id: int) -> int:
        """Create or refresh the saved review-queue view; returns its id.

        ``GET /api/dm/views/?project=`` to find it by title, then ``PATCH
        /api/dm/views/{id}/`` or ``POST /api/dm/views/``. The view lists unlabelled tasks by
        ascending prediction score (most uncertain first) and shows the score column.
        Idempotent: calling it again rewrites the same view.
        """
        data = {
            "title": REVIEW_VIEW_TITLE,
            "type": "list",
            "target": "tasks",
            "filters": {
                "conjunction": "and",
                "items": [_filter("tasks:total_annotations", "equal", 0)],
            },
            "ordering": ["tasks:predictions_score"],
            "hiddenColumns": _REVIEW_VIEW_HIDDEN_COLUMNS,
        }
        views = self._call(
            f"list views of project {project_id}", lambda sdk: sdk.views.list(project=project_id)
        )
        for view in views or []:
            view_data = getattr(view, "data", None) or {}
            if isinstance(view_data, dict) and view_data.get("title") == REVIEW_VIEW_TITLE:
                self._call(
                    f"update view {view.id}",
                    lambda sdk, vid=str(view.id): sdk.views.update(
                        vid, project=project_id, data=data
                    ),
                )
                return int(view.id)
        created = self._call(
            f"create review view in project {project_id}",
            lambda sdk: sdk.views.create(project=project_id, data=data),
        )
        return int(created.id)


# --------------------------------------------------------------------------------------------
# helpers


def _prediction_row(item: PredictionItem) -> dict[str, Any]:
    if isinstance(item, Mapping):
        task_id, result = item["task"], item["result"]
        score, version = item.get("score"), item.get("model_version")
    else:
        task_id, result, score, version = item
    row: dict[str, Any] = {"task": int(task_id), "result": list(result)}
    if score is not None:
        row["score"] = float(score)
    if version is not None:
        row["model_version"] = str(version)
    return row


def _checked_key(value: Any) -> Any:
    """Validate a ``project`` field; non-strings/ints are left for pydantic to refuse."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return value
    return project_key(value)[1]


def _filter(column: str, operator: str, value: Any) -> dict[str, Any]:
    return {"filter": f"filter:{column}", "operator": operator, "type": "Number", "value": value}


def _page_items(sdk: Any, *, project: int, page_size: int, query: str) -> list[dict[str, Any]]:
    """One page of ``/api/tasks/`` as plain dicts (a 404 past the end is an empty page)."""
    from label_studio_sdk.core.api_error import ApiError

    try:
        pager = sdk.tasks.list(
            project=project, page=1, page_size=page_size, fields="task_only", query=query
        )
    except ApiError as exc:
        if exc.status_code == 404:
            return []
        raise
    out = []
    for item in pager.items or []:
        task = item.model_dump() if hasattr(item, "model_dump") else dict(item)
        out.append({"id": task["id"], "data": task.get("data") or {}})
    return out


def _brief(body: Any) -> str:
    """A short, single-line rendering of an error body for messages."""
    if body in (None, "", {}):
        return ""
    text = body if isinstance(body, str) else json.dumps(body, default=str)
    text = " ".join(text.split())
    if len(text) > _MAX_MESSAGE_BODY_CHARS:
        text = text[:_MAX_MESSAGE_BODY_CHARS] + "…"
    return f": {text}"
