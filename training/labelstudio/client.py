"""Every call valve-id makes to Label Studio's API, through label-studio-sdk.

The backend (label counts, predictions, the review view), a training run (the project's
export), ``valve-id import`` (projects, local-files storage, tasks) and the local stack's
bootstrap (ML backend, webhooks, seed annotations) all talk through one :class:`LabelStudio`,
so there is one retry rule (:mod:`training.labelstudio.retry`), one error type
(:class:`~training.shared.errors.LabelStudioError`, carrying the HTTP status) and one way to
authenticate. label-studio-sdk 2.1.2 handles both token kinds: a Personal Access Token (a
JWT refresh token it exchanges for 5-minute access tokens) and a legacy token. No message
ever contains the API key, even when Label Studio echoes it back in an error body.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import httpx

from training.labelstudio.retry import Retry, is_transient_status
from training.shared.errors import LabelStudioError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "EXPORT_TIMEOUT_S",
    "MODEL_VERSION_ATTEMPTS",
    "PREDICTION_BATCH",
    "REVIEW_VIEW_TITLE",
    "LabelStudio",
    "PredictionItem",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 30.0
"""Per-request timeout in seconds."""
EXPORT_TIMEOUT_S = 300.0
"""Seconds Label Studio may take to build a project's export (large projects are slow)."""
MODEL_VERSION_ATTEMPTS = 6
"""Tries of ``PATCH model_version``: Label Studio refuses it (400) until a prediction of that
version is stored, which may lag the write that created it."""
PREDICTION_BATCH = 100
"""Predictions written per request to Label Studio."""
REVIEW_VIEW_TITLE = "Review queue — most uncertain first"
"""Title of the saved Data Manager view valve-id creates and keeps valid."""

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


class LabelStudio:
    """One Label Studio server, reached at ``url`` with ``api_key``.

    ``http`` is the seam for tests and special set-ups: any ``httpx.Client`` (a
    ``MockTransport`` stand-in in unit tests, a client with custom TLS in production).
    ``retry`` says how transient failures are retried. The SDK client is built on first use,
    so a backend starts even while Label Studio is down or the key is not set yet; the failure
    then surfaces per call as :class:`LabelStudioError`.
    """

    def __init__(
        self,
        url: str,
        api_key: str,
        *,
        http: httpx.Client | None = None,
        retry: Retry | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.url = url.rstrip("/")
        self._api_key = api_key
        self._http = http
        self._retry = retry or Retry()
        self._timeout_s = timeout_s
        self._sdk: Any = None
        self._sdk_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LabelStudio(url={self.url!r})"

    def close(self) -> None:
        """Close the HTTP client (an injected one too: the caller handed it over)."""
        if self._http is not None:
            self._http.close()

    # -- plumbing ------------------------------------------------------------------------

    def _client(self) -> Any:
        with self._sdk_lock:
            if self._sdk is None:
                from label_studio_sdk import LabelStudio as SDK

                if self._http is None:
                    self._http = httpx.Client(timeout=self._timeout_s)
                # max_retries=0: retries are ours (_call), with backoff we control and a
                # message we write; the SDK's own would multiply with them.
                self._sdk = SDK(
                    base_url=self.url,
                    api_key=self._api_key,
                    httpx_client=self._http,
                    timeout=self._timeout_s,
                    max_retries=0,
                )
            return self._sdk

    def _call(
        self,
        what: str,
        fn: Callable[[Any], T],
        *,
        retry: Retry | None = None,
        retry_on: frozenset[int] = frozenset(),
    ) -> T:
        """Run ``fn(sdk)`` under the retry rule; any failure becomes :class:`LabelStudioError`.

        ``what`` names the call for messages ("exporting project 3"); ``retry_on`` adds
        statuses that are transient for this call only.
        """
        from label_studio_sdk.core.api_error import ApiError
        from label_studio_sdk.core.parse_error import ParsingError

        if not self._api_key:  # say so here instead of asking the server for a 401
            raise LabelStudioError(
                f"no Label Studio API key configured while {what}: set LABEL_STUDIO_API_KEY "
                "to an admin's token (Label Studio: Account & Settings → Access Token)"
            )

        def transient(exc: Exception) -> bool:
            if isinstance(exc, ApiError):
                return is_transient_status(exc.status_code) or exc.status_code in retry_on
            return isinstance(exc, httpx.HTTPError)

        def error(exc: Exception, tries: int) -> Exception:
            tried = f"{tries} attempts" if tries > 1 else ""
            if isinstance(exc, ParsingError):
                return LabelStudioError(
                    f"unexpected answer from Label Studio while {what} (HTTP "
                    f"{exc.status_code}); is LABEL_STUDIO_URL a Label Studio 1.x server?",
                    status_code=exc.status_code,
                )
            if isinstance(exc, ApiError):
                status = exc.status_code
                head = "unreachable while" if is_transient_status(status) else "refused"
                hint = " (check LABEL_STUDIO_API_KEY)" if status in (401, 403) else ""
                message = f"Label Studio {head} {what}: HTTP {status}{hint}{_brief(exc.body)}"
                message += f" ({tried})" if tried else ""
                return LabelStudioError(self._scrub(message), status_code=status)
            why = ", ".join(part for part in (type(exc).__name__, tried) if part)
            return LabelStudioError(
                f"Label Studio unreachable while {what}: cannot reach Label Studio at "
                f"{self.url} ({why})"
            )

        return (retry or self._retry).call(
            lambda: fn(self._client()),
            what=what,
            catch=(ApiError, ParsingError, httpx.HTTPError),
            transient=transient,
            error=error,
        )

    def _scrub(self, text: str) -> str:
        """Never let the key out, even if a server echoed it back in an error body."""
        return text.replace(self._api_key, "***") if self._api_key else text

    # -- authentication ------------------------------------------------------------------

    def auth_headers(self) -> dict[str, str]:
        """``Authorization`` for downloading task images from Label Studio (``/data/...``).

        A legacy token gives ``Token <key>``; a Personal Access Token gives ``Bearer
        <access>``, where the SDK exchanges the PAT at ``POST /api/token/refresh/`` and caches
        the short-lived access token until it expires (the SDK's own request headers;
        label-studio-sdk 2.1.2 has no public accessor for them).
        """
        if not self._api_key:
            return {}
        headers = self._call(
            "refreshing the access token", lambda sdk: sdk._client_wrapper.get_headers()
        )
        return {"Authorization": headers["Authorization"]}

    # -- projects ----------------------------------------------------------------------

    def project(self, project_id: int) -> dict[str, Any]:
        """The project object: ``GET /api/projects/{id}/``."""
        found = self._call(
            f"reading project {project_id}", lambda sdk: sdk.projects.get(project_id)
        )
        return found.model_dump() if hasattr(found, "model_dump") else dict(found)

    def label_config(self, project_id: int) -> str:
        """The project's labeling config XML: ``GET /api/projects/{id}/``."""
        return str(self.project(project_id).get("label_config") or "")

    def create_project(self, title: str, label_config: str) -> int:
        """A new project: ``POST /api/projects/``; returns its id."""
        created = self._call(
            "creating the project",
            lambda sdk: sdk.projects.create(title=title, label_config=label_config),
        )
        if created.id is None:
            raise LabelStudioError("Label Studio created the project but returned no id")
        return int(created.id)

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

    def export_tasks(self, project_id: int) -> list[dict[str, Any]]:
        """The project's annotated tasks, as Label Studio exports them (JSON):
        ``GET /api/projects/{id}/export?export_type=JSON``."""
        raw = self._call(
            f"exporting project {project_id}",
            lambda sdk: b"".join(
                sdk.projects.exports.download_sync(
                    id=project_id,
                    export_type="JSON",
                    download_all_tasks=False,
                    request_options={"timeout_in_seconds": EXPORT_TIMEOUT_S, "max_retries": 0},
                )
            ),
        )
        try:
            tasks = json.loads(raw)
        except ValueError:
            raise LabelStudioError(f"the export of project {project_id} is not JSON") from None
        if not isinstance(tasks, list):
            raise LabelStudioError(f"the export of project {project_id} is not a list of tasks")
        return [t for t in tasks if isinstance(t, dict)]

    # -- tasks -------------------------------------------------------------------------

    def task_data(self, project_id: int) -> Iterator[dict[str, Any]]:
        """Every task's ``data``, all pages: ``GET /api/tasks/?project=..&fields=task_only``."""
        tasks = self._call(
            f"listing the tasks of project {project_id}",
            lambda sdk: [
                getattr(task, "data", None) or {}
                for task in sdk.tasks.list(project=project_id, fields="task_only")
            ],
        )
        yield from (data for data in tasks if isinstance(data, dict))

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
                f"listing the tasks of project {project_id}",
                partial(_page_items, project=project_id, page_size=page_size, query=encoded),
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
            f"counting the unlabelled tasks of project {project_id}",
            lambda sdk: (
                sdk.tasks.list(
                    project=project_id, page=1, page_size=1, fields="task_only", query=query
                ).response.total
            ),
        )
        return int(total)

    def import_tasks(self, project_id: int, data: Sequence[Mapping[str, Any]]) -> None:
        """Create one task per ``data`` dict: ``POST /api/projects/{id}/import``."""
        self._call(
            f"creating {len(data)} task(s) in project {project_id}",
            lambda sdk: sdk.projects.import_tasks(
                id=project_id, request=[{"data": dict(d)} for d in data]
            ),
        )

    # -- local-files storage -------------------------------------------------------------

    def local_storages(self, project_id: int) -> list[dict[str, Any]]:
        """The project's local-files storages: ``GET /api/storages/localfiles/?project=``."""
        found = self._call(
            f"listing the local-files storages of project {project_id}",
            lambda sdk: sdk.import_storage.local.list(project=project_id),
        )
        return [s.model_dump() if hasattr(s, "model_dump") else dict(s) for s in found or []]

    def create_local_storage(
        self, project_id: int, path: str, *, title: str, description: str
    ) -> None:
        """A local-files storage serving ``path`` (never synced: ``POST /api/storages/
        localfiles/``; ``use_blob_urls`` so each file is its own task's image)."""
        self._call(
            f"creating a local-files storage in project {project_id}",
            lambda sdk: sdk.import_storage.local.create(
                project=project_id,
                path=path,
                title=title,
                description=description,
                use_blob_urls=True,
            ),
        )

    # -- predictions and the review queue ------------------------------------------------

    def create_predictions(self, project_id: int, items: Sequence[PredictionItem]) -> int:
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
                f"importing {len(batch)} predictions into project {project_id}",
                partial(_import_predictions, project_id=project_id, rows=batch),
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
            f"setting the model_version of project {project_id}",
            lambda sdk: sdk.projects.update(project_id, model_version=version),
            retry=self._retry.at_least(MODEL_VERSION_ATTEMPTS),
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
            f"listing the views of project {project_id}",
            lambda sdk: sdk.views.list(project=project_id),
        )
        for view in views or []:
            view_data = getattr(view, "data", None) or {}
            if isinstance(view_data, dict) and view_data.get("title") == REVIEW_VIEW_TITLE:
                self._call(
                    f"updating view {view.id}",
                    partial(_update_view, view_id=str(view.id), project_id=project_id, data=data),
                )
                return int(view.id)
        created = self._call(
            f"creating the review view in project {project_id}",
            lambda sdk: sdk.views.create(project=project_id, data=data),
        )
        return int(created.id)

    # -- any other route -----------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """A REST call the SDK has no method for (or types too narrowly), e.g. the ML
        backend and webhook settings: ``path`` below the base URL, ``kwargs`` as for httpx
        (``params``, ``json``). Same auth, retries and errors as every other call; returns
        the JSON answer (its text if not JSON, None when empty)."""
        from label_studio_sdk.core.api_error import ApiError

        def send(sdk: Any) -> httpx.Response:
            answer = self._http.request(  # type: ignore[union-attr]  # built by _client()
                method,
                self.url + path,
                headers={"Authorization": sdk._client_wrapper.get_headers()["Authorization"]},
                **kwargs,
            )
            if answer.status_code >= 400:
                raise ApiError(status_code=answer.status_code, body=answer.text)
            return answer

        answer = self._call(f"calling {method} {path.split('?')[0]}", send)
        if not answer.content:
            return None
        try:
            return answer.json()
        except ValueError:
            return answer.text


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


def _import_predictions(sdk: Any, *, project_id: int, rows: list[dict[str, Any]]) -> Any:
    return sdk.projects.import_predictions(project_id, request=rows)


def _update_view(sdk: Any, *, view_id: str, project_id: int, data: dict[str, Any]) -> Any:
    return sdk.views.update(view_id, project=project_id, data=data)


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
