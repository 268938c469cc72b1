"""Stand-ins for retraining and backend-job tests.

A real Label Studio cannot run inside a unit test (issue 5 adds the end-to-end suite against
one), so :class:`FakeLabelStudio` plays the few calls retraining and re-scoring make, with a
settable labelled count and a log of every call; :class:`FakePredictor` and
:class:`FakeFetcher` stand in for the served model and the image download. Redis and RQ are
real everywhere. Webhook bodies are the ones Label Studio 1.23.2 really sent (``payloads/``).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from redis import Redis
from rq import SimpleWorker

from training.fitting.jobs import TrainingRun, enqueue_training

PAYLOADS = Path(__file__).parent / "payloads"
LABEL_CONFIG_XML = (Path(__file__).parents[2] / "label_config.xml").read_text()
PROJECT_CREATED_AT = "2026-11-25T16:41:09.448213Z"
"""A ``created_at`` for the project objects (the recorded bodies were trimmed of it)."""
PROJECT_KEY = "1.1795624869"
"""``f"{id}.{int(created_at.timestamp())}"`` for project 1 at that time: the very key the
recorded ``/setup`` and ``/predict`` requests carry."""


def webhook(action: str, **changes: Any) -> dict[str, Any]:
    """The recorded webhook body for ``action``, with the project's ``created_at`` added."""
    body = json.loads((PAYLOADS / f"webhook_{action}.json").read_text())["request"]["body"]
    body = copy.deepcopy(body)
    body["project"]["created_at"] = PROJECT_CREATED_AT
    body.update(changes)
    return body


def annotation_event(
    annotation_id: int,
    task_id: int,
    label: str,
    *,
    action: str = "ANNOTATION_CREATED",
    cancelled: bool = False,
) -> dict[str, Any]:
    """A recorded annotation webhook for another annotation / task / choice."""
    body = webhook(action)
    body["annotation"]["id"] = annotation_id
    body["annotation"]["task"] = task_id
    body["annotation"]["was_cancelled"] = cancelled
    body["annotation"]["result"][0]["value"]["choices"] = [label]
    body["task"]["id"] = task_id
    return body


class FakeLabelStudio:
    """Label Studio's answers for one project, settable; every call is logged in order."""

    def __init__(self, labelled: int = 0, unlabelled: list[dict[str, Any]] | None = None) -> None:
        self.labelled = labelled
        self.unlabelled = unlabelled or []
        self.calls: list[tuple[str, Any]] = []
        self.tasks_yielded = 0
        self.refuse_model_version = 0  # how many set_model_version calls to refuse first
        self.latency_s = 0.0  # a real server takes a while to count: lets callers overlap
        self._lock = threading.Lock()

    def _log(self, name: str, value: Any = None) -> None:
        with self._lock:
            self.calls.append((name, value))

    def count_labelled_tasks(self, project_id: int) -> int:
        self._log("count_labelled_tasks", project_id)
        time.sleep(self.latency_s)
        return self.labelled

    def label_config(self, project_id: int) -> str:
        return LABEL_CONFIG_XML

    def count_unlabelled_tasks(self, project_id: int) -> int:
        return len(self.unlabelled)

    def unlabelled_tasks(self, project_id: int) -> Iterator[dict[str, Any]]:
        """Yields lazily, as the SDK's pager does, so streaming can be observed."""
        for task in self.unlabelled:
            self.tasks_yielded += 1
            yield task

    def create_predictions(self, project_id: int, items: list[dict[str, Any]]) -> None:
        self._log("create_predictions", (project_id, list(items), self.tasks_yielded))

    def set_model_version(self, project_id: int, version: str) -> None:
        if self.refuse_model_version:
            self.refuse_model_version -= 1
            self._log("set_model_version_refused", (project_id, version))
            raise RuntimeError("400: no predictions of this version yet")
        self._log("set_model_version", (project_id, version))

    def ensure_review_view(self, project_id: int) -> None:
        self._log("ensure_review_view", project_id)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": "Token test"}

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def written(self) -> list[dict[str, Any]]:
        return [item for name, v in self.calls if name == "create_predictions" for item in v[1]]


class FakeFetcher:
    """Image bytes per URL; URLs containing ``broken`` fail to download."""

    def __init__(self) -> None:
        self.fetched: list[str] = []
        self._lock = threading.Lock()

    def fetch(self, url: str) -> bytes:
        with self._lock:
            self.fetched.append(url)
        if "broken" in url:
            raise ConnectionError("image host unreachable")
        return f"img:{url}".encode()


class FakePredictor:
    """A served "model" with :class:`backend.service.predictor.Predictor`'s surface: the class is a
    function of the image bytes, ``corrupt`` bytes fail to decode, and with no version
    served every answer is None. It answers with the real Prediction/PredictionError types.
    """

    CLASSES = ("Codman Hakim", "Codman Certas Plus", "Sophysa Sophy SM8", "proGAV 2.0")

    def __init__(self, version: str | None = "v1") -> None:
        self.version = version
        self.load_error: str | None = None
        self.refreshes = 0
        self.batches: list[int] = []

    def refresh(self, *, force: bool = False) -> bool:
        self.refreshes += 1
        return False

    def label_for(self, image: bytes) -> str:
        return self.CLASSES[sum(image) % len(self.CLASSES)]

    def predict(self, images: list[bytes | BaseException]) -> list[Any]:
        from backend.service.predictor import Prediction, PredictionError

        self.batches.append(len(images))
        if self.version is None:
            return [None] * len(images)
        out: list[Any] = []
        for image in images:
            if isinstance(image, BaseException):
                out.append(PredictionError(f"fetch failed: {type(image).__name__}"))
            elif b"corrupt" in image:
                out.append(PredictionError("not an image"))
            else:
                label = self.label_for(image)
                probs = {c: (0.7 if c == label else 0.1) for c in self.CLASSES}
                out.append(
                    Prediction(label, probs, 0.5, {}, str(self.version), f"hash-{len(image)}")
                )
        return out


class RecordingEnqueue:
    """The real :func:`training.fitting.jobs.enqueue_training` (jobs land on the training queue and
    are not executed), with the run ids it returned kept in order."""

    def __init__(self) -> None:
        self.runs: list[str] = []
        self.kwargs: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, connection: Redis, **kwargs: Any) -> TrainingRun:
        run = enqueue_training(connection, **kwargs)
        with self._lock:
            self.runs.append(run.run_id)
            self.kwargs.append(kwargs)
        return run


def finish_run(
    redis: Redis, run_id: str, status: str = "published", *, promoted: bool = True
) -> None:
    """Write the run record's outcome the way ``training.fitting.jobs`` does when a run ends."""
    fields = {"status": status}
    if status == "published":
        fields.update(version=run_id, promoted=str(int(promoted)), reason="test")
    else:
        fields.update(reason="fold failed: test")
    redis.hset(f"valve-id:run:{run_id}", mapping=fields)


class QuietWorker(SimpleWorker):
    """``rq.SimpleWorker`` (jobs run in this process) without the command channel: a burst
    in a test needs no remote "stop" commands, and unsubscribing costs rq a 1 s join."""

    def subscribe(self) -> None:
        pass
