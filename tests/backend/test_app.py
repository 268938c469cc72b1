"""The HTTP app (backend/service/app.py) and its model class (backend/service/valve_model.py).

Label Studio itself cannot run in a unit test (issue 5 adds the end-to-end suite), so the
requests it really sent (``payloads/``, recorded from Label Studio 1.23.2) are replayed
against the app. Parts are injected through ``create_app(...)``: most tests use small fakes
for the predictor, the image fetcher and the retrainer (the mechanics here do not depend on
a network); the last tests serve a real :class:`backend.service.predictor.Predictor` on a published
version, and the webhook tests hand events to a real :class:`backend.loop.retraining.Retrainer`
on a real Redis.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import logging
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from redis import Redis
from rq import Queue
from tiny_arch import TINY_ARCH

from backend.loop.jobs import JobQueue
from backend.loop.retraining import Retrainer
from backend.service.app import MAX_BODY_BYTES, MAX_TASKS_PER_PREDICT, create_app
from backend.service.labelstudio import label_studio_client
from backend.service.predictor import Prediction, PredictionError, Predictor
from backend.settings import Settings
from training.shared.errors import ImageFetchError, LabelStudioError
from training.shared.loop_state import DEFAULT_QUEUE, TRAINING_QUEUE
from training.shared.model import ValveNet, save_checkpoint
from training.shared.preprocess import PreprocessParams
from training.shared.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[2]
PAYLOADS = Path(__file__).parent / "payloads"
CLASSES = ["Codman Hakim", "Codman Certas Plus", "Sophysa Sophy SM8", "proGAV 2.0"]
VERSION = "20261125-120000-test"
# The recorded requests carry the config trimmed to "<Choices nam..."; this is the config the
# recording project used (Choices name="label", the four classes), so responses can be
# compared with the recorded ones exactly.
RECORDED_CONFIG = (
    '<View>\n  <Image name="image" value="$image"/>\n  <Choices name="label" toName="image">'
    + "".join(f'<Choice value="{c}"/>' for c in CLASSES)
    + "</Choices>\n</View>"
)


def recorded(name: str) -> dict[str, Any]:
    return json.loads((PAYLOADS / name).read_text())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Fakes (the seams of create_app)


class FakePredictor:
    """Answers from the bytes: ``IMG:<class>`` predicts that class; anything else is bad."""

    def __init__(self, version: str | None = VERSION, classes: list[str] = CLASSES) -> None:
        self.version = version
        self.classes = list(classes)
        self.load_error: str | None = None
        self.refreshes = 0
        self.seen: list[bytes | BaseException] = []
        self.hits = 0

    def refresh(self) -> bool:
        self.refreshes += 1
        return False

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "classes": self.classes}

    def stats(self) -> dict[str, int]:
        return {"cache_hits": self.hits, "cache_misses": len(self.seen) - self.hits}

    def predict(self, images: list[bytes | BaseException]) -> list[Any]:
        self.seen.extend(images)
        out: list[Any] = []
        for image in images:
            if isinstance(image, BaseException):
                out.append(PredictionError(f"fetch failed: {type(image).__name__}"))
            elif image.startswith(b"IMG:"):
                label = image[4:].decode()
                probs = {c: (0.7 if c == label else 0.3 / (len(self.classes) - 1))
                         for c in self.classes}  # fmt: skip
                out.append(Prediction(label, probs, 0.25, {"margin": 0.4}, self.version or "", "h"))
            else:
                out.append(PredictionError("not an image"))
        return out


class FakeFetcher:
    """URL → bytes from a dict; unknown URLs fail as a refused download would."""

    def __init__(self, images: dict[str, bytes] | None = None, delay_s: float = 0.0) -> None:
        self.images = images or {}
        self.delay_s = delay_s
        self.fetched: list[str] = []

    def fetch(self, url: str) -> bytes:
        time.sleep(self.delay_s)
        self.fetched.append(url)
        if url not in self.images:
            raise ImageFetchError("HTTP 404 from ls.test")
        return self.images[url]


@dataclass
class FakeRetrainer:
    """Records what the app hands over; ``fail`` raises like an unreachable Redis."""

    fail: bool = False
    delay_s: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    recorded: list[tuple[str, list[tuple[Any, str, str]]]] = field(default_factory=list)
    projects: list[tuple[int, str | None]] = field(default_factory=list)

    def on_webhook(self, event: dict[str, Any]) -> str:
        time.sleep(self.delay_s)
        if self.fail:
            raise ConnectionError("Redis unreachable")
        self.events.append(event)
        return "queued"

    @property
    def proposals(self) -> FakeRetrainer:
        """The fake also stands in for ``backend.loop.acceptance.Proposals``."""
        return self

    def record(self, project_key: str, items: Any) -> None:
        if self.fail:
            raise ConnectionError("Redis unreachable")
        self.recorded.append((project_key, list(items)))

    def register_project(self, ls_project_id: int, project_key: str | None = None) -> str:
        if self.fail:
            raise ConnectionError("Redis unreachable")
        self.projects.append((ls_project_id, project_key))
        return project_key or str(ls_project_id)

    def per_version(self) -> dict[str, dict[str, int]]:
        return {}


def settings_for(tmp_path: Path, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "redis_url": f"redis://127.0.0.1:{closed_port()}/0",
        "label_studio_url": "http://ls.test:8080",
    }
    values.update(changes)
    return Settings(**values)


def make_client(
    tmp_path: Path,
    *,
    predictor: Any = None,
    fetcher: Any = None,
    retrainer: Any = None,
    redis: Redis | None = None,
    raise_server_exceptions: bool = True,
    **settings: Any,
) -> TestClient:
    s = settings_for(tmp_path, **settings)
    app = create_app(
        s,
        predictor=predictor or FakePredictor(),
        fetcher=fetcher or FakeFetcher(),
        label_studio=label_studio_client(s),
        redis=redis,
        retrainer=retrainer or FakeRetrainer(),
    )
    return TestClient(app, raise_server_exceptions=raise_server_exceptions)


def predict_body(tasks: list[dict[str, Any]], config: str = RECORDED_CONFIG) -> dict[str, Any]:
    body = copy.deepcopy(recorded("predict.json")["request"]["body"])
    body["tasks"] = tasks
    body["label_config"] = config
    return body


# --------------------------------------------------------------------------------------------
# The recorded protocol


def test_health_answers_what_label_studio_expects(tmp_path: Path) -> None:
    request = recorded("health.json")["request"]
    with make_client(tmp_path) as client:
        response = client.request(request["method"], request["path"], headers=request["headers"])
    assert response.status_code == recorded("health.json")["response"]["status"]
    body = response.json()
    assert body["status"] == recorded("health.json")["response"]["body"]["status"] == "UP"
    assert body["model_version"] == VERSION and body["model_loaded"] is True
    assert body["model_dir"] == str(tmp_path / "state" / "models")
    assert body["load_error"] is None


def test_health_says_when_no_model_exists_yet(tmp_path: Path) -> None:
    with make_client(tmp_path, predictor=FakePredictor(version=None)) as client:
        body = client.get("/health").json()
    assert body["status"] == "UP"
    assert body["model_loaded"] is False and body["model_version"] is None


def test_recorded_setup_is_answered_with_the_served_version(tmp_path: Path) -> None:
    request = recorded("setup.json")["request"]
    body = dict(request["body"], schema=RECORDED_CONFIG)
    retrainer = FakeRetrainer()
    with make_client(tmp_path, retrainer=retrainer) as client:
        response = client.post("/setup", json=body, headers=request["headers"])
    assert response.status_code == 200
    expected = recorded("setup.json")["response"]["body"]
    assert set(response.json()) == set(expected)
    assert response.json() == {"model_version": VERSION}
    assert retrainer.projects == [(1, "1.1795624869")]

    with make_client(tmp_path, predictor=FakePredictor(version=None)) as client:
        assert client.post("/setup", json=body).json() == {"model_version": "none"}


def test_recorded_setup_with_its_trimmed_config_is_a_clear_400(tmp_path: Path) -> None:
    body = recorded("setup.json")["request"]["body"]  # schema ends in "<Choices nam..."
    with make_client(tmp_path) as client:
        response = client.post("/setup", json=body)
    assert response.status_code == 400
    assert "not valid XML" in response.json()["error"]


def test_recorded_predict_is_answered_in_the_recorded_shape(tmp_path: Path) -> None:
    request = recorded("predict.json")["request"]
    body = dict(request["body"], label_config=RECORDED_CONFIG)
    url = body["tasks"][0]["data"]["image"]
    fetcher = FakeFetcher({url: b"IMG:Codman Certas Plus"})
    retrainer = FakeRetrainer()
    with make_client(tmp_path, fetcher=fetcher, retrainer=retrainer) as client:
        response = client.post("/predict", json=body, headers=request["headers"])
    assert response.status_code == 200
    expected = recorded("predict.json")["response"]["body"]
    got = response.json()
    assert got == {
        "results": [dict(expected["results"][0], score=0.25, model_version=VERSION)],
        "model_version": VERSION,
    }
    assert got["results"][0]["result"] == expected["results"][0]["result"]
    assert fetcher.fetched == [url]
    assert retrainer.recorded == [("1.1795624869", [(1, "Codman Certas Plus", VERSION)])]


@pytest.mark.parametrize("name", sorted(p.name for p in PAYLOADS.glob("webhook_*.json")))
def test_recorded_webhooks_are_accepted_and_handed_over(tmp_path: Path, name: str) -> None:
    request = recorded(name)["request"]
    retrainer = FakeRetrainer()
    with make_client(tmp_path, retrainer=retrainer) as client:
        response = client.post("/webhook", json=request["body"], headers=request["headers"])
    assert response.status_code == 200  # Label Studio only looks for a 2xx
    assert response.json() == {"status": "accepted"}
    assert retrainer.events == [request["body"]]


# --------------------------------------------------------------------------------------------
# Predictions that are right, one per task, in order


def test_mixed_good_and_bad_tasks_get_one_result_each_in_order(tmp_path: Path) -> None:
    fetcher = FakeFetcher(
        {"/data/upload/1/a.png": b"IMG:proGAV 2.0",
         "/data/upload/1/c.png": b"garbage, not an image",
         "/data/upload/1/e.png": b"IMG:Codman Hakim"}
    )  # fmt: skip
    tasks = [
        {"id": 11, "data": {"image": "/data/upload/1/a.png"}},
        {"id": 12, "data": {"other": "/data/upload/1/b.png"}},  # no image key
        {"id": 13, "data": {"image": "/data/upload/1/c.png"}},  # corrupt image
        {"id": 14, "data": {"image": "/data/upload/1/missing.png"}},  # fetch fails
        {"id": 15, "data": {"image": "/data/upload/1/e.png"}},
        {"id": 16, "data": {"image": ""}},
    ]
    predictor = FakePredictor()
    retrainer = FakeRetrainer()
    with make_client(tmp_path, predictor=predictor, fetcher=fetcher, retrainer=retrainer) as client:
        response = client.post("/predict", json=predict_body(tasks))
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == len(tasks)
    labels = [r["result"][0]["value"]["choices"][0] if r["result"] else None for r in results]
    assert labels == ["proGAV 2.0", None, None, None, "Codman Hakim", None]
    for r in results:
        assert ("score" in r) == bool(r["result"])
    assert {r["result"][0]["from_name"] for r in results if r["result"]} == {"label"}
    assert isinstance(predictor.seen[2], ImageFetchError)  # the failed fetch, handed on
    assert retrainer.recorded == [
        ("1.1795624869", [(11, "proGAV 2.0", VERSION), (15, "Codman Hakim", VERSION)])
    ]


def test_a_class_the_project_lacks_is_never_proposed(tmp_path: Path) -> None:
    config = RECORDED_CONFIG.replace('<Choice value="Codman Hakim"/>', "")
    fetcher = FakeFetcher({"/a.png": b"IMG:Codman Hakim", "/b.png": b"IMG:proGAV 2.0"})
    tasks = [{"id": 1, "data": {"image": "/a.png"}}, {"id": 2, "data": {"image": "/b.png"}}]
    with make_client(tmp_path, fetcher=fetcher) as client:
        results = client.post("/predict", json=predict_body(tasks, config)).json()["results"]
    # Task 1's top class is unknown to the project: its most probable known class is proposed
    # (all three others tie at 0.1: the first in the config wins, deterministically).
    assert results[0]["result"][0]["value"]["choices"] == ["Codman Certas Plus"]
    assert results[1]["result"][0]["value"]["choices"] == ["proGAV 2.0"]

    only_new = RECORDED_CONFIG
    for c in CLASSES:
        only_new = only_new.replace(f'<Choice value="{c}"/>', "")
    only_new = only_new.replace("</Choices>", '<Choice value="A"/><Choice value="B"/></Choices>')
    with make_client(tmp_path, fetcher=fetcher) as client:
        results = client.post("/predict", json=predict_body(tasks, only_new)).json()["results"]
    assert results == [{"result": []}, {"result": []}]


def test_without_a_model_every_task_is_empty_and_nothing_is_fetched(tmp_path: Path) -> None:
    fetcher = FakeFetcher({"/a.png": b"IMG:Codman Hakim"})
    with make_client(tmp_path, predictor=FakePredictor(version=None), fetcher=fetcher) as client:
        body = client.post("/predict", json=predict_body([{"id": 1, "data": {"image": "/a.png"}}]))
    assert body.json() == {"results": [{"result": []}], "model_version": "none"}
    assert fetcher.fetched == []


def _notices(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "backend.service.valve_model"
        and r.levelno == logging.WARNING
        and text in r.getMessage()
    ]


def test_no_model_is_said_at_start_and_at_the_first_predict_not_on_every_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    body = predict_body([{"id": 1, "data": {"image": "/a.png"}}])
    with make_client(tmp_path, predictor=FakePredictor(version=None)) as client:
        at_start = _notices(caplog, "no model version")
        answers = [client.post("/predict", json=body).json() for _ in range(10)]
        health = client.get("/health").json()
    assert len(at_start) == 1
    assert str(tmp_path / "state" / "models") in at_start[0]
    assert "Start training" in at_start[0] and "valve-id train" in at_start[0]
    assert _notices(caplog, "no model version") == at_start * 2  # start + first /predict
    assert all(a["model_version"] == "none" for a in answers)
    assert health["model_loaded"] is False

    caplog.clear()
    with make_client(tmp_path) as client:  # a version is served: nothing to say
        client.post("/predict", json=body)
    assert _notices(caplog, "no model version") == []


def test_a_class_difference_is_logged_once_per_version_and_project(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    config = RECORDED_CONFIG.replace(
        "</Choices>", '<Choice value="Other valve"/><Choice value="Not assessable"/></Choices>'
    )
    predictor = FakePredictor()
    with make_client(tmp_path, predictor=predictor) as client:

        def setup(project: str) -> None:
            assert client.post("/setup", json={"project": project, "schema": config}).is_success

        for _ in range(12):
            setup("1.1700000000")
        once = _notices(caplog, "classes differ")
        predictor.version = "20261126-090000-next"
        setup("1.1700000000")
        setup("1.1700000000")
        setup("2.1700000000")
        setup("2.1700000000")
    assert len(once) == 1
    assert "['Other valve', 'Not assessable']" in once[0] and VERSION in once[0]
    logged = _notices(caplog, "classes differ")
    assert len(logged) == 3
    assert "1.1700000000" in logged[1] and "20261126-090000-next" in logged[1]
    assert "2.1700000000" in logged[2]


def test_predict_refreshes_the_model_first_and_uses_the_setup_config(tmp_path: Path) -> None:
    predictor = FakePredictor()
    fetcher = FakeFetcher({"/a.png": b"IMG:Codman Hakim"})
    config = RECORDED_CONFIG.replace('name="label"', 'name="valve"')
    with make_client(tmp_path, predictor=predictor, fetcher=fetcher) as client:
        client.post("/setup", json={"project": "4.1700000000", "schema": config})
        before = predictor.refreshes
        body = {"tasks": [{"id": 1, "data": {"image": "/a.png"}}], "project": "4.1700000000"}
        result = client.post("/predict", json=body).json()["results"][0]["result"][0]
    assert predictor.refreshes == before + 1
    assert result["from_name"] == "valve"  # the config /setup remembered for the project


def test_a_config_without_image_or_choices_is_a_clear_400(tmp_path: Path) -> None:
    no_choices = '<View><Image name="image" value="$image"/></View>'
    no_image = '<View><Text name="t" value="$text"/><Choices name="c" toName="t">' \
               '<Choice value="A"/><Choice value="B"/></Choices></View>'  # fmt: skip
    with make_client(tmp_path) as client:
        for config, missing in ((no_choices, "Choices"), (no_image, "Image")):
            response = client.post("/predict", json=predict_body([], config))
            assert response.status_code == 400
            assert missing in response.json()["error"]
            response = client.post("/setup", json={"project": "1.2", "schema": config})
            assert response.status_code == 400
            assert missing in response.json()["error"]


def test_too_many_tasks_are_refused_with_413(tmp_path: Path) -> None:
    tasks = [{"id": i, "data": {"image": "/a.png"}} for i in range(MAX_TASKS_PER_PREDICT + 1)]
    with make_client(tmp_path) as client:
        response = client.post("/predict", json=predict_body(tasks))
    assert response.status_code == 413
    assert str(MAX_TASKS_PER_PREDICT) in response.json()["error"]


SLOW_FETCH_S = 3.0
"""How long the slow image download of the event-loop test takes."""


def test_predict_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """While a slow /predict downloads images, /health still answers at once."""
    s = settings_for(tmp_path)
    app = create_app(
        s,
        predictor=FakePredictor(),
        fetcher=FakeFetcher({"/a.png": b"IMG:Codman Hakim"}, delay_s=SLOW_FETCH_S),
        label_studio=label_studio_client(s),
        retrainer=FakeRetrainer(),
    )

    async def scenario() -> tuple[float, float]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            started = time.perf_counter()
            slow = asyncio.create_task(
                client.post("/predict", json=predict_body([{"id": 1, "data": {"image": "/a.png"}}]))
            )
            await asyncio.sleep(0.1)
            health = await client.get("/health")
            health_done = time.perf_counter() - started
            assert health.status_code == 200
            assert (await slow).status_code == 200
            return health_done, time.perf_counter() - started

    health_done, predict_done = asyncio.run(scenario())
    # Blocked, /health would wait for the whole download; the margin is wide for busy CPUs.
    assert health_done < SLOW_FETCH_S / 2 < SLOW_FETCH_S <= predict_done


# --------------------------------------------------------------------------------------------
# Errors: never a 500 for bad input, never a secret in a body


@pytest.mark.parametrize("path", ["/predict", "/setup", "/webhook"])
def test_malformed_json_is_a_4xx_with_a_message(tmp_path: Path, path: str) -> None:
    with make_client(tmp_path) as client:
        for content in (b"{not json", b"", b"\xff\xfe"):
            response = client.post(
                path, content=content, headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, content
            assert response.json()["error"]
        for body in ([1, 2], {"tasks": "x"}, {"project": {"nested": 1}}, "text"):
            response = client.post(path, json=body)
            assert 400 <= response.status_code < 500, body
            assert "error" in response.json()


def test_wrong_types_name_the_field_but_never_echo_the_input(tmp_path: Path) -> None:
    with make_client(tmp_path) as client:
        response = client.post("/predict", json={"tasks": [{"id": "secret-ish", "data": {}}]})
    assert response.status_code == 422
    assert "tasks.0.id" in response.json()["error"]
    assert "secret-ish" not in response.text


def test_an_unexpected_error_is_a_500_without_details(tmp_path: Path) -> None:
    class Broken(FakePredictor):
        def predict(self, images: list[Any]) -> list[Any]:
            raise RuntimeError("password=hunter2 in a message")

    fetcher = FakeFetcher({"/a.png": b"IMG:Codman Hakim"})
    with make_client(
        tmp_path, predictor=Broken(), fetcher=fetcher, raise_server_exceptions=False
    ) as client:
        response = client.post(
            "/predict", json=predict_body([{"id": 1, "data": {"image": "/a.png"}}])
        )
    assert response.status_code == 500
    assert response.json() == {"error": "internal error; see the backend's log"}
    assert "hunter2" not in response.text and "Traceback" not in response.text


def test_valve_id_errors_map_to_their_status(tmp_path: Path) -> None:
    client = make_client(tmp_path)

    @client.app.get("/boom")  # type: ignore[attr-defined]
    async def boom() -> None:
        raise LabelStudioError("Label Studio get project 3: HTTP 503", status_code=503)

    response = client.get("/boom")
    assert response.status_code == 502
    assert response.json() == {"error": "Label Studio get project 3: HTTP 503"}


def test_oversize_bodies_are_refused_before_parsing(tmp_path: Path) -> None:
    big = b'{"tasks": [' + b" " * (MAX_BODY_BYTES + 1) + b"]}"
    with make_client(tmp_path) as client:
        declared = client.post(
            "/predict", content=big, headers={"content-type": "application/json"}
        )
        assert declared.status_code == 413
        assert "larger than 10 MB" in declared.json()["error"]

        def chunks() -> Any:  # no Content-Length: counted as it streams
            for start in range(0, len(big), 1 << 20):
                yield big[start : start + (1 << 20)]

        streamed = client.post(
            "/webhook", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413
        fine = client.post(
            "/webhook", json=recorded("webhook_START_TRAINING.json")["request"]["body"]
        )
        assert fine.status_code == 200


# --------------------------------------------------------------------------------------------
# Basic auth


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_basic_auth_protects_everything_but_health(tmp_path: Path) -> None:
    fetcher = FakeFetcher({"/a.png": b"IMG:Codman Hakim"})
    body = predict_body([{"id": 1, "data": {"image": "/a.png"}}])
    with make_client(
        tmp_path, fetcher=fetcher, basic_auth_user="ls", basic_auth_pass="pässwörd"
    ) as client:
        assert client.get("/health").status_code == 200
        for method, path in (("POST", "/predict"), ("POST", "/setup"), ("POST", "/webhook"),
                             ("GET", "/metrics"), ("GET", "/jobs")):  # fmt: skip
            response = client.request(method, path, json=body)
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"].startswith("Basic")
        for headers in (basic("ls", "wrong"), basic("other", "pässwörd"), basic("ls", ""),
                        {"Authorization": "Basic !!!"}, {"Authorization": "Bearer x"}):  # fmt: skip
            assert client.post("/predict", json=body, headers=headers).status_code == 401
        ok = client.post("/predict", json=body, headers=basic("ls", "pässwörd"))
        assert ok.status_code == 200
        assert ok.json()["results"][0]["result"]

    with make_client(tmp_path, fetcher=fetcher) as client:  # off: no credentials needed
        assert client.post("/predict", json=body).status_code == 200


# --------------------------------------------------------------------------------------------
# Webhook: fast whatever happens


def timed_webhooks(client: TestClient, n: int = 20) -> list[float]:
    body = recorded("webhook_ANNOTATION_CREATED.json")["request"]["body"]
    client.post("/webhook", json=body)  # warm-up (first request builds the thread pool)
    times = []
    for i in range(n):
        event = copy.deepcopy(body)
        event["annotation"]["id"] = 1000 + i
        started = time.perf_counter()
        response = client.post("/webhook", json=event)
        times.append(time.perf_counter() - started)
        assert response.status_code == 200
    return times


def test_webhook_is_fast_with_a_real_retrainer_on_a_real_redis(
    tmp_path: Path, redis_conn: Redis, redis_url: str
) -> None:
    s = settings_for(tmp_path, redis_url=redis_url)
    retrainer = Retrainer(s, redis_conn, queue=JobQueue(redis_conn))
    client = make_client(tmp_path, retrainer=retrainer, redis=redis_conn, redis_url=redis_url)
    with client:
        times = timed_webhooks(client)
        answer = client.post(
            "/webhook", json=recorded("webhook_START_TRAINING.json")["request"]["body"]
        ).json()
    assert statistics.median(times) < 0.050, times
    assert answer == {"status": "accepted"}
    assert Queue(DEFAULT_QUEUE, connection=redis_conn).count >= 1  # the events were handed on


def test_webhook_is_fast_and_200_when_redis_is_unreachable(tmp_path: Path) -> None:
    s = settings_for(tmp_path)  # REDIS_URL points at a closed port
    dead = Redis.from_url(s.redis_url, socket_timeout=0.2, socket_connect_timeout=0.2)
    retrainer = Retrainer(s, dead, queue=JobQueue(dead))
    with make_client(tmp_path, retrainer=retrainer, redis=dead) as client:
        times = timed_webhooks(client)
        answer = client.post(
            "/webhook", json=recorded("webhook_START_TRAINING.json")["request"]["body"]
        )
    assert statistics.median(times) < 0.050, times
    assert answer.status_code == 200 and answer.json() == {"status": "logged"}


def test_webhook_answers_within_budget_even_if_the_handoff_hangs(tmp_path: Path) -> None:
    slow = FakeRetrainer(delay_s=1.0)
    with make_client(tmp_path, retrainer=slow) as client:
        started = time.perf_counter()
        response = client.post(
            "/webhook", json=recorded("webhook_START_TRAINING.json")["request"]["body"]
        )
        elapsed = time.perf_counter() - started
    assert response.json() == {"status": "logged"}
    assert elapsed < 0.5


# --------------------------------------------------------------------------------------------
# /metrics and /jobs


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_parse_as_prometheus_text(
    tmp_path: Path, redis_conn: Redis, redis_url: str
) -> None:
    s = settings_for(tmp_path, redis_url=redis_url)
    retrainer = Retrainer(s, redis_conn, queue=JobQueue(redis_conn))
    fetcher = FakeFetcher({"/a.png": b"IMG:Codman Hakim", "/c.png": b"corrupt"})
    tasks = [
        {"id": 1, "data": {"image": "/a.png"}},
        {"id": 2, "data": {}},
        {"id": 3, "data": {"image": "/b.png"}},
        {"id": 4, "data": {"image": "/c.png"}},
    ]
    with make_client(
        tmp_path, fetcher=fetcher, retrainer=retrainer, redis=redis_conn, redis_url=redis_url
    ) as client:
        client.post("/predict", json=predict_body(tasks))
        client.post("/webhook", json=recorded("webhook_START_TRAINING.json")["request"]["body"])
        client.post("/webhook", json={"action": "SOMETHING_NEW", "project": {"id": 1}})
        # An annotator keeps the proposed class of task 1 (recorded at /predict above).
        event = copy.deepcopy(recorded("webhook_ANNOTATION_CREATED.json")["request"]["body"])
        event["project"]["created_at"] = "2026-11-25T16:41:09.448213Z"  # key 1.1795624869
        event["task"]["id"] = event["annotation"]["task"] = 1
        event["annotation"]["result"][0]["value"]["choices"] = ["Codman Hakim"]
        client.post("/webhook", json=event)
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    assert samples[("valve_id_predictions_total", (("outcome", "ok"),))] == 1
    assert samples[("valve_id_predictions_total", (("outcome", "no_image"),))] == 1
    assert samples[("valve_id_predictions_total", (("outcome", "fetch_error"),))] == 1
    assert samples[("valve_id_predictions_total", (("outcome", "predict_error"),))] == 1
    assert samples[("valve_id_predict_request_seconds_count", ())] == 1
    assert samples[("valve_id_webhook_events_total", (("action", "START_TRAINING"),))] == 1
    assert samples[("valve_id_webhook_events_total", (("action", "other"),))] == 1
    assert samples[("valve_id_model_info", (("version", VERSION),))] == 1
    assert samples[("valve_id_model_loaded", ())] == 1
    assert samples[("valve_id_predictor_cache_misses_total", ())] == 3
    assert samples[("valve_id_predictor_cache_hits_total", ())] == 0
    assert samples[("valve_id_acceptance_reviewed", (("version", VERSION),))] == 1
    assert samples[("valve_id_acceptance_accepted", (("version", VERSION),))] == 1
    assert samples[("valve_id_acceptance_rate", (("version", VERSION),))] == 1.0


def test_metrics_still_answer_when_redis_is_down(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    dead = Redis.from_url(s.redis_url, socket_timeout=0.2, socket_connect_timeout=0.2)
    retrainer = Retrainer(s, dead, queue=JobQueue(dead))
    with make_client(tmp_path, retrainer=retrainer, redis=dead) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert ("valve_id_model_loaded", ()) in metric_samples(response.text)


def test_jobs_lists_recent_runs_and_queue_lengths(
    tmp_path: Path, redis_conn: Redis, redis_url: str
) -> None:
    for run_id, status in (
        ("20261101-000000-aaaa", "published"),
        ("20261102-000000-bbbb", "running"),
    ):
        redis_conn.hset(f"valve-id:run:{run_id}", mapping={"status": status, "staging": "/x"})
    Queue(TRAINING_QUEUE, connection=redis_conn).enqueue("builtins.print", "x")
    with make_client(tmp_path, redis=redis_conn, redis_url=redis_url) as client:
        body = client.get("/jobs").json()
    assert [r["run_id"] for r in body["runs"]] == ["20261102-000000-bbbb", "20261101-000000-aaaa"]
    assert body["runs"][0]["status"] == "running"
    assert body["queues"] == {TRAINING_QUEUE: 1, DEFAULT_QUEUE: 0}


def test_jobs_is_a_503_when_redis_is_down(tmp_path: Path) -> None:
    s = settings_for(tmp_path)
    dead = Redis.from_url(s.redis_url, socket_timeout=0.2, socket_connect_timeout=0.2)
    with make_client(tmp_path, redis=dead) as client:
        response = client.get("/jobs")
    assert response.status_code == 503
    assert "Redis" in response.json()["error"]


def test_create_app_builds_every_missing_part_from_settings(tmp_path: Path) -> None:
    """No fakes: the real predictor (empty registry), fetcher, client, Redis, retrainer."""
    s = settings_for(tmp_path)
    with TestClient(create_app(s)) as client:
        health = client.get("/health").json()
        webhook = client.post(
            "/webhook", json=recorded("webhook_START_TRAINING.json")["request"]["body"]
        )
        predict = client.post(
            "/predict", json=predict_body([{"id": 1, "data": {"image": "/data/upload/1/a.png"}}])
        )
    assert health["status"] == "UP" and health["model_loaded"] is False
    assert webhook.status_code == 200 and webhook.json() == {"status": "logged"}  # Redis down
    assert predict.json() == {"results": [{"result": []}], "model_version": "none"}


@pytest.mark.slow
def test_run_serves_the_app_with_uvicorn(tmp_path: Path) -> None:
    """``run`` (what ``valve-id serve`` calls) starts a server that answers /health."""
    port = closed_port()
    code = (
        "from pathlib import Path; from backend.service.app import run; "
        "from backend.settings import Settings; "
        f"run(Settings(state_dir=Path({str(tmp_path)!r}), "
        f"redis_url='redis://127.0.0.1:{closed_port()}/0'), host='127.0.0.1', port={port})"
    )
    server = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0)
                break
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the server did not start within 60 s"
                time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert health.status_code == 200 and health.json()["status"] == "UP"


def test_the_app_never_imports_fastai() -> None:
    code = "import sys, backend.service.app; sys.exit('fastai' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


# --------------------------------------------------------------------------------------------
# The real predictor behind the app


def publish_version(registry: ModelRegistry, version_id: str, seed: int) -> None:
    """A servable version of tiny random models (serving mechanics, not accuracy)."""
    staging = registry.staging("test")
    torch.manual_seed(seed)
    for k in range(2):
        save_checkpoint(
            ValveNet(len(CLASSES), arch=TINY_ARCH), staging / "weights" / f"fold_{k}.pt",
            classes=CLASSES,
        )  # fmt: skip
    config = {
        "format": 1, "version": version_id, "classes": CLASSES,
        "preprocess": PreprocessParams(size_px=32).to_dict(), "temperature": 1.0,
        "arch": TINY_ARCH,
        "folds": [{"fold": k, "weights": f"weights/fold_{k}.pt"} for k in range(2)],
    }  # fmt: skip
    metrics = {"mean": {"f1_macro": 0.5}, "classes": CLASSES,
               "uncertainty": {"best_acquisition": "entropy"}}  # fmt: skip
    (staging / "config.json").write_text(json.dumps(config))
    (staging / "metrics.json").write_text(json.dumps(metrics))
    registry.publish(staging, version_id=version_id, tolerance=1.0)


def png(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((48, 48)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_the_real_predictor_serves_predict_and_hot_swaps(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "state" / "models")
    publish_version(registry, "20261125-100000-v001", seed=1)
    predictor = Predictor(registry.root, device="cpu", refresh_interval_s=0.0, fast_path=False)
    images = {f"/data/upload/1/{i}.png": png(i) for i in range(5)}
    images["/data/upload/1/bad.png"] = b"not an image at all"
    fetcher = FakeFetcher(images)
    tasks = [{"id": i, "data": {"image": url}} for i, url in enumerate(images, start=1)]
    with make_client(tmp_path, predictor=predictor, fetcher=fetcher) as client:
        assert client.get("/health").json()["model_version"] == "20261125-100000-v001"
        first = client.post("/predict", json=predict_body(tasks)).json()
        stats_after_first = predictor.stats()
        again = client.post("/predict", json=predict_body(tasks)).json()
        direct = predictor.predict([images[t["data"]["image"]] for t in tasks[:5]])

        publish_version(registry, "20261125-110000-v002", seed=2)  # promoted: served at once
        swapped = client.post("/predict", json=predict_body(tasks[:1])).json()
        health = client.get("/health").json()

    assert [bool(r["result"]) for r in first["results"]] == [True] * 5 + [False]
    for result, expected in zip(first["results"], direct, strict=False):
        assert result["result"][0]["value"]["choices"] == [expected.label]
        assert result["score"] == pytest.approx(expected.score)
        assert 0.0 <= result["score"] <= 1.0
        assert result["model_version"] == "20261125-100000-v001"
    assert again == first
    assert predictor.stats()["cache_hits"] >= stats_after_first["cache_hits"] + 5
    assert swapped["model_version"] == "20261125-110000-v002"
    assert swapped["results"][0]["model_version"] == "20261125-110000-v002"
    assert health["model_version"] == "20261125-110000-v002"
