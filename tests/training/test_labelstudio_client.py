"""Every call to Label Studio's API (training/labelstudio/client.py).

A real Label Studio cannot run inside a unit test (``tests/e2e`` drives one), so the client is
tested against a stand-in: an ``httpx.MockTransport`` handed to label-studio-sdk as its HTTP
client, answering the few routes valve-id uses in Label Studio's shapes and recording every
request, so the tests can assert the exact routes and bodies our methods send.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

import httpx
import jwt
import pytest

from training.labelstudio import LabelStudio, Retry
from training.labelstudio.client import MODEL_VERSION_ATTEMPTS, PREDICTION_BATCH, REVIEW_VIEW_TITLE
from training.shared.errors import LabelStudioError, ValveIdError

LS_URL = "http://ls.test:8080"
LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"


# --------------------------------------------------------------------------------------------
# The stand-in Label Studio


class StandIn:
    """Answers Label Studio's routes from in-memory state; records each request."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.project: dict[str, Any] = {
            "id": 3,
            "title": "Valve ID",
            "label_config": "<View>...</View>",
            "num_tasks_with_annotations": 7,
            "finished_task_number": 6,
            "model_version": "",
        }
        self.tasks: list[dict[str, Any]] = []
        self.export: list[dict[str, Any]] = []
        self.views: list[dict[str, Any]] = []
        self.predictions: list[dict[str, Any]] = []
        self.refuse_model_version = 0
        self.failures: list[int | Exception] = []  # served before anything else, in order
        self.refreshes = 0
        self.after_tasks_page: Callable[[], None] | None = None

    def client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.MockTransport(self.handle))

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.failures:
            failure = self.failures.pop(0)
            if isinstance(failure, Exception):
                raise failure
            echo = request.headers.get("authorization", "")
            return httpx.Response(failure, json={"detail": f"failed for {echo}"})
        path, method = request.url.path, request.method
        body = json.loads(request.content) if request.content else None
        if path == "/api/token/refresh/" and method == "POST":
            self.refreshes += 1
            access = jwt.encode(
                {"token_type": "access", "exp": int(time.time()) + 300, "n": self.refreshes},
                "k" * 32,
                algorithm="HS256",
            )
            return httpx.Response(200, json={"access": access})
        if path == "/api/projects/3/" and method == "GET":
            return httpx.Response(200, json=self.project)
        if path == "/api/projects/3/" and method == "PATCH":
            if self.refuse_model_version:
                self.refuse_model_version -= 1
                return httpx.Response(400, json={"model_version": ["no predictions yet"]})
            self.project.update(body)
            return httpx.Response(200, json=self.project)
        if path == "/api/projects/3/export" and method == "GET":
            return httpx.Response(200, content=json.dumps(self.export).encode())
        if path == "/api/projects/3/import/predictions" and method == "POST":
            self.predictions.extend(body)
            return httpx.Response(201, json={"created": len(body)})
        if path == "/api/tasks/" and method == "GET":
            return self._tasks(request)
        if path == "/api/dm/views/" and method == "GET":
            return httpx.Response(200, json=self.views)
        if path == "/api/dm/views/" and method == "POST":
            view = {"id": 40 + len(self.views), "project": body["project"], "data": body["data"]}
            self.views.append(view)
            return httpx.Response(201, json=view)
        if path.startswith("/api/dm/views/") and method == "PATCH":
            view_id = int(path.rstrip("/").rsplit("/", 1)[1])
            view = next(v for v in self.views if v["id"] == view_id)
            view["data"] = body["data"]
            return httpx.Response(200, json=view)
        return httpx.Response(404, json={"detail": "Not found."})

    def _tasks(self, request: httpx.Request) -> httpx.Response:
        """The Data Manager filters valve-id sends, applied as Label Studio would."""
        query = parse_qs(request.url.query.decode())
        page, size = int(query["page"][0]), int(query["page_size"][0])
        selected = list(self.tasks)
        for item in json.loads(query.get("query", ["{}"])[0]).get("filters", {}).get("items", []):
            field = item["filter"].removeprefix("filter:tasks:")
            if item["operator"] == "equal":
                selected = [t for t in selected if t[field] == item["value"]]
            elif item["operator"] == "greater":
                selected = [t for t in selected if t[field] > item["value"]]
        selected.sort(key=lambda t: t["id"])
        chunk = selected[(page - 1) * size : page * size]
        if not chunk and page > 1:
            return httpx.Response(404, json={"detail": "Invalid page."})
        answer = httpx.Response(
            200,
            json={
                "tasks": chunk,
                "total": len(selected),
                "total_annotations": 0,
                "total_predictions": 0,
            },
        )
        if self.after_tasks_page is not None:
            self.after_tasks_page()
        return answer

    def sent(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]


@pytest.fixture
def standin() -> StandIn:
    return StandIn()


def client_for(
    standin: StandIn,
    key: str = LEGACY_KEY,
    *,
    attempts: int = 4,
    backoff_s: float = 0.5,
    sleep: Callable[[float], None] = lambda s: None,
) -> LabelStudio:
    retry = Retry.exponential(attempts, backoff_s, sleep)
    return LabelStudio(LS_URL, key, http=standin.client(), retry=retry)


# --------------------------------------------------------------------------------------------
# Calls


def test_label_config_and_labelled_count_read_the_project(standin: StandIn) -> None:
    ls = client_for(standin)
    assert ls.label_config(3) == "<View>...</View>"
    assert ls.count_labelled_tasks(3) == 7
    gets = standin.sent("GET", "/api/projects/3/")
    assert len(gets) == 2
    assert all(r.headers["authorization"] == f"Token {LEGACY_KEY}" for r in gets)
    del standin.project["num_tasks_with_annotations"]  # an older server: fall back
    assert ls.count_labelled_tasks(3) == 6
    del standin.project["finished_task_number"]
    with pytest.raises(LabelStudioError, match="no labelled-task count"):
        ls.count_labelled_tasks(3)


def test_unlabelled_tasks_page_by_id_and_miss_none_when_labels_arrive(standin: StandIn) -> None:
    standin.tasks = [
        {"id": i, "data": {"image": f"/{i}.png"}, "total_annotations": int(i % 4 == 0)}
        for i in range(1, 26)
    ]
    expected = [t["id"] for t in standin.tasks if t["total_annotations"] == 0]

    def annotate_an_early_task() -> None:
        # Someone labels task 1 while we iterate: page-number paging would now skip one.
        standin.tasks[0]["total_annotations"] = 1

    standin.after_tasks_page = annotate_an_early_task
    ls = client_for(standin)
    got = list(ls.unlabelled_tasks(3, page_size=5))
    assert [t["id"] for t in got] == expected
    assert got[0] == {"id": 1, "data": {"image": "/1.png"}}
    first = parse_qs(standin.sent("GET", "/api/tasks/")[0].url.query.decode())
    assert first["project"] == ["3"] and first["page"] == ["1"] and first["page_size"] == ["5"]
    assert first["fields"] == ["task_only"]
    assert json.loads(first["query"][0]) == {
        "filters": {
            "conjunction": "and",
            "items": [
                {"filter": "filter:tasks:total_annotations", "operator": "equal",
                 "type": "Number", "value": 0},
                {"filter": "filter:tasks:id", "operator": "greater", "type": "Number", "value": 0},
            ],
        },
        "ordering": ["tasks:id"],
    }  # fmt: skip
    standin.after_tasks_page = None
    assert ls.count_unlabelled_tasks(3) == len(expected) - 1  # task 1 is labelled now


def test_predictions_are_written_in_batches(standin: StandIn) -> None:
    result = [
        {"value": {"choices": ["proGAV 2.0"]}, "from_name": "label", "to_name": "image",
         "type": "choices"}
    ]  # fmt: skip
    items: list[Any] = [(i, result, i / 1000, "v7") for i in range(1, 251)]
    items[3] = {"task": 4, "result": result, "score": None, "model_version": "v7"}
    sent = client_for(standin).create_predictions(3, items)
    assert sent == 250
    posts = standin.sent("POST", "/api/projects/3/import/predictions")
    assert [len(json.loads(p.content)) for p in posts] == [PREDICTION_BATCH, PREDICTION_BATCH, 50]
    assert standin.predictions[0] == {
        "task": 1, "result": result, "score": 0.001, "model_version": "v7"
    }  # fmt: skip
    assert standin.predictions[3] == {"task": 4, "result": result, "model_version": "v7"}
    assert [p["task"] for p in standin.predictions] == list(range(1, 251))


def test_model_version_is_retried_until_label_studio_accepts_it(standin: StandIn) -> None:
    sleeps: list[float] = []
    standin.refuse_model_version = 2
    client_for(standin, sleep=sleeps.append, backoff_s=0.1).set_model_version(3, "v7")
    patches = standin.sent("PATCH", "/api/projects/3/")
    assert [json.loads(p.content) for p in patches] == [{"model_version": "v7"}] * 3
    assert standin.project["model_version"] == "v7"
    assert sleeps == [0.1, 0.2]  # exponential backoff

    standin.refuse_model_version = 100
    with pytest.raises(LabelStudioError, match="HTTP 400") as caught:
        client_for(standin).set_model_version(3, "v8")
    assert caught.value.status_code == 400
    assert len(standin.sent("PATCH", "/api/projects/3/")) == 3 + MODEL_VERSION_ATTEMPTS


def test_review_view_is_created_once_then_kept_valid(standin: StandIn) -> None:
    standin.views = [{"id": 7, "project": 3, "data": {"title": "Default"}}]
    ls = client_for(standin)
    view_id = ls.ensure_review_view(3)
    (post,) = standin.sent("POST", "/api/dm/views/")
    body = json.loads(post.content)
    assert body["project"] == 3
    data = body["data"]
    assert data["title"] == REVIEW_VIEW_TITLE
    assert data["ordering"] == ["tasks:predictions_score"]  # ascending: most uncertain first
    assert data["filters"] == {
        "conjunction": "and",
        "items": [{"filter": "filter:tasks:total_annotations", "operator": "equal",
                   "type": "Number", "value": 0}],
    }  # fmt: skip
    assert "tasks:predictions_score" not in data["hiddenColumns"]["explore"]
    assert "tasks:predictions_results" not in data["hiddenColumns"]["explore"], "the class"

    standin.views[-1]["data"]["ordering"] = ["-tasks:id"]  # someone changed it in the UI
    assert ls.ensure_review_view(3) == view_id
    assert len(standin.sent("POST", "/api/dm/views/")) == 1  # not created twice
    (patch,) = standin.sent("PATCH", f"/api/dm/views/{view_id}/")
    assert json.loads(patch.content)["data"]["ordering"] == ["tasks:predictions_score"]
    assert standin.views[-1]["data"]["ordering"] == ["tasks:predictions_score"]
    assert {v["id"] for v in standin.views} == {7, view_id}


def test_transient_failures_are_retried_then_succeed(standin: StandIn) -> None:
    sleeps: list[float] = []
    standin.failures = [503, httpx.ConnectError("refused"), 502]
    assert client_for(standin, sleep=sleeps.append, backoff_s=0.5).label_config(3)
    assert len(standin.sent("GET", "/api/projects/3/")) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_a_refusal_is_not_retried_and_names_the_call_never_the_key(standin: StandIn) -> None:
    standin.failures = [401]  # its body echoes the Authorization header
    with pytest.raises(LabelStudioError) as caught:
        client_for(standin).count_labelled_tasks(3)
    assert len(standin.requests) == 1
    message = str(caught.value)
    assert "HTTP 401" in message and "project 3" in message
    assert LEGACY_KEY not in message
    assert caught.value.status_code == 401
    assert isinstance(caught.value, ValveIdError)


def test_an_unreachable_label_studio_gives_a_clear_error(standin: StandIn) -> None:
    standin.failures = [httpx.ConnectError("connection refused")] * 10
    with pytest.raises(LabelStudioError, match="cannot reach Label Studio at http://ls.test:8080"):
        client_for(standin, attempts=3).label_config(3)
    assert len(standin.requests) == 3


def test_no_api_key_is_said_without_asking_the_server(standin: StandIn) -> None:
    with pytest.raises(LabelStudioError, match="no Label Studio API key configured while"):
        client_for(standin, key="").label_config(3)
    assert standin.requests == []


def test_legacy_token_headers_for_image_downloads(standin: StandIn) -> None:
    assert client_for(standin).auth_headers() == {"Authorization": f"Token {LEGACY_KEY}"}
    assert client_for(standin, key="").auth_headers() == {}
    assert standin.requests == []  # a legacy token needs no request


@pytest.mark.filterwarnings("ignore:The `parse_obj` method is deprecated")  # inside the SDK
def test_personal_access_token_is_exchanged_for_short_lived_access_tokens(
    standin: StandIn,
) -> None:
    pat = jwt.encode(
        {"token_type": "refresh", "exp": int(time.time()) + 3600}, "p" * 32, algorithm="HS256"
    )
    ls = client_for(standin, key=pat)
    headers = ls.auth_headers()
    scheme, access = headers["Authorization"].split(" ")
    assert scheme == "Bearer" and access != pat
    assert jwt.decode(access, options={"verify_signature": False})["token_type"] == "access"
    (refresh,) = standin.sent("POST", "/api/token/refresh/")
    assert json.loads(refresh.content) == {"refresh": pat}

    assert ls.label_config(3)
    (get,) = standin.sent("GET", "/api/projects/3/")
    assert get.headers["authorization"] == f"Bearer {access}"
    assert ls.auth_headers() == headers
    assert standin.refreshes == 1  # cached until it expires


def test_an_expired_personal_access_token_is_a_clear_error(standin: StandIn) -> None:
    expired = jwt.encode(
        {"token_type": "refresh", "exp": int(time.time()) - 10}, "p" * 32, algorithm="HS256"
    )
    with pytest.raises(LabelStudioError, match="HTTP 401.*expired") as caught:
        client_for(standin, key=expired).label_config(3)
    assert expired not in str(caught.value)
    assert standin.requests == []
