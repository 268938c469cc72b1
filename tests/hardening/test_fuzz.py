"""Fuzzing the HTTP API with hypothesis: whatever arrives, never a 500.

Bodies are generated two ways: arbitrary bytes and JSON, and JSON shaped like Label Studio's
payloads with every field swapped for something odd (wrong types, NaN, hostile URLs, broken
or exploding XML, impossible project keys). The app is the real one — real predictor on a
published version, real image fetcher, real retrainer on a real Redis (Label Studio's count is
the only stand-in) — run in-process, so a failure shows its traceback here.

Why not schemathesis against the OpenAPI document: the three POST endpoints read their bodies
themselves (Label Studio's payloads are lenient, see ``backend/service/labelstudio.py``), so the
document has no body schemas to generate from; the strategies below are that schema.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from redis import Redis
from retraining_fakes import FakeLabelStudio

from backend.loop.jobs import JobQueue
from backend.loop.retraining import HANDLED_ACTIONS, Retrainer
from backend.service.app import create_app
from backend.service.labelstudio import image_fetcher, label_studio_client
from backend.service.predictor import Predictor
from backend.settings import Settings
from training.labelstudio import NO_RETRY
from training.shared.registry import ModelRegistry

from .hardening_support import LABEL_CONFIG_XML, PROJECT, free_port, local_url

EXAMPLES = 300
"""Examples per endpoint: the three together take well under a minute on a 2-core CPU."""
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def client(
    tmp_path_factory: pytest.TempPathFactory,
    served_registry: ModelRegistry,
    image_root: Path,
    redis_url: str,
) -> Iterator[TestClient]:
    settings_ = Settings(
        state_dir=tmp_path_factory.mktemp("fuzz"),
        model_dir=served_registry.root,
        redis_url=redis_url,
        label_studio_url=f"http://127.0.0.1:{free_port()}",  # nobody answers there
        local_files_root=image_root,
    )
    redis = Redis.from_url(redis_url, socket_timeout=1.0)
    predictor = Predictor(served_registry.root, device="cpu")
    label_studio = label_studio_client(settings_, retry=NO_RETRY)
    app = create_app(
        settings_,
        predictor=predictor,
        fetcher=image_fetcher(settings_),
        label_studio=label_studio,
        redis=redis,
        retrainer=Retrainer(
            settings_, redis, queue=JobQueue(redis), label_studio=FakeLabelStudio(labelled=3)
        ),
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client
    predictor.close()


# ------------------------------------------------------------------------------ strategies

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)
)  # floats include NaN and ±Infinity, which Python's json writes and reads
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
hostile_urls = st.sampled_from(
    [
        local_url("inputs/good.png"),
        local_url("inputs/bomb.png"),
        local_url("../../etc/passwd"),
        local_url("/etc/passwd"),
        local_url("inputs/%00.png"),
        local_url("a" * 300),
        "/data/local-files/",
        "/data/upload/1/x.png",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "http://127.0.0.1@evil.example/x.png",
        "//evil.example/x.png",
        "gopher://127.0.0.1:6379/_FLUSHALL",
        "data:image/png;base64,iVBORw0KGgo=",
        "http://[::1]:6379/",
        "http://xn--nxasmq6b.example/x.png",
        " ",
        "\x00",
    ]
)
urls = st.one_of(
    hostile_urls,
    st.text(max_size=40),
    st.builds(local_url, st.text(max_size=30)),
    st.builds("http://{}/{}".format, st.text(max_size=15), st.text(max_size=15)),
)
ids = st.one_of(st.integers(), json_values)
tasks = st.fixed_dictionaries(
    {
        "id": ids,
        "data": st.one_of(
            st.dictionaries(
                st.sampled_from(["image", "img", "patient", ""]),
                st.one_of(urls, json_values),
                max_size=3,
            ),
            json_values,
        ),
    },
    optional={"annotations": json_values, "predictions": json_values, "meta": json_values},
)
project_keys = st.one_of(
    st.just(PROJECT),
    st.from_regex(r"\A[0-9]{1,25}(\.[0-9]{1,25})?\Z"),
    st.integers(),
    st.text(max_size=20),
    json_values,
)
_PARTS = ["<Choices", "</View>", 'name="valve"', 'value="$image"', "<Choice ", "toName"]
label_configs = st.one_of(
    st.none(),
    st.just(LABEL_CONFIG_XML),
    st.text(max_size=80),
    st.builds(
        lambda part, new: LABEL_CONFIG_XML.replace(part, new),
        st.sampled_from(_PARTS),
        st.sampled_from(["", "<", "&x;", '"', "<!-- ", "\x00", "<View>" * 50]),
    ),
    json_values,
)
predict_bodies = st.fixed_dictionaries(
    {"tasks": st.one_of(st.lists(tasks, max_size=4), json_values)},
    optional={"project": project_keys, "label_config": label_configs, "params": json_values},
)
setup_bodies = st.fixed_dictionaries(
    {},
    optional={
        "project": project_keys,
        "schema": label_configs,
        "hostname": json_values,
        "access_token": json_values,
        "extra_params": json_values,
    },
)
_CREATED_AT = st.one_of(st.just("2026-11-25T16:41:09.448213Z"), st.text(max_size=30), json_values)
webhook_projects = st.one_of(
    st.fixed_dictionaries({"id": ids}, optional={"created_at": _CREATED_AT}), json_values
)
regions = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(st.just("choices"), json_values),
        "value": st.one_of(st.fixed_dictionaries({"choices": json_values}), json_values),
    },
)
annotations = st.fixed_dictionaries(
    {},
    optional={
        "id": ids,
        "task": ids,
        "project": ids,
        "result": st.one_of(st.lists(regions, max_size=3), json_values),
        "was_cancelled": json_values,
    },
)
webhook_bodies = st.fixed_dictionaries(
    {"action": st.one_of(st.sampled_from(sorted(HANDLED_ACTIONS)), st.text(max_size=20))},
    optional={
        "project": webhook_projects,
        "annotation": st.one_of(annotations, json_values),
        "task": json_values,
        "tasks": st.one_of(st.lists(tasks, max_size=3), json_values),
        "annotations": st.one_of(st.lists(annotations, max_size=3), json_values),
    },
)


# Nearly valid payloads: right types, odd values (URLs, ids, keys, configs, labels).
valid_keys = st.one_of(st.just(PROJECT), st.from_regex(r"\A[0-9]{1,25}(\.[0-9]{1,25})?\Z"))
valid_configs = st.one_of(st.just(LABEL_CONFIG_XML), label_configs.filter(bool))
plain_tasks = st.fixed_dictionaries(
    {
        "id": st.integers(),
        "data": st.dictionaries(st.sampled_from(["image", "img", "patient"]), urls, max_size=3),
    }
)
near_predict = st.fixed_dictionaries(
    {"tasks": st.lists(plain_tasks, max_size=4)},
    optional={"project": valid_keys, "label_config": valid_configs},
)
near_setup = st.fixed_dictionaries(
    {"project": valid_keys, "schema": valid_configs},
    optional={"hostname": st.text(max_size=20), "access_token": st.text(max_size=20)},
)
plain_annotations = st.fixed_dictionaries(
    {
        "id": st.integers(),
        "task": st.integers(),
        "result": st.lists(
            st.fixed_dictionaries(
                {"type": st.just("choices"), "value": st.fixed_dictionaries(
                    {"choices": st.lists(st.text(max_size=20), max_size=2)})}
            ),
            max_size=2,
        ),
    },
    optional={"was_cancelled": st.booleans(), "project": st.integers()},
)  # fmt: skip
near_webhook = st.fixed_dictionaries(
    {
        "action": st.sampled_from(sorted(HANDLED_ACTIONS)),
        "project": st.fixed_dictionaries(
            {"id": st.integers()}, optional={"created_at": _CREATED_AT}
        ),
    },
    optional={
        "annotation": plain_annotations,
        "annotations": st.lists(plain_annotations, max_size=3),
        "tasks": st.lists(plain_tasks, max_size=3),
    },
)


def _bodies(
    shaped: st.SearchStrategy[Any], near: st.SearchStrategy[Any]
) -> st.SearchStrategy[bytes]:
    """Raw bytes, any JSON, a payload shaped like Label Studio's with odd values anywhere,
    or (most often) one with the right types and odd values."""
    return st.one_of(
        st.binary(max_size=64),
        json_values.map(lambda v: json.dumps(v).encode()),
        shaped.map(lambda v: json.dumps(v).encode()),
        *[near.map(lambda v: json.dumps(v).encode())] * 3,
    )


# ------------------------------------------------------------------------------ checks


def _check(response: Any, path: str, body: bytes) -> None:
    event(f"{path} answered {response.status_code}")  # --hypothesis-show-statistics
    assert response.status_code < 500, (path, body[:500], response.text[:500])
    assert response.status_code in {200, 400, 413, 422}, response.status_code
    answer = response.json()
    if response.status_code != 200:
        assert isinstance(answer["error"], str) and answer["error"]
        assert "Traceback" not in answer["error"]
        return
    sent = json.loads(body)
    if path == "/predict":
        assert len(answer["results"]) == len(sent["tasks"])  # one answer per task
        for result in answer["results"]:
            score = result.get("score")
            assert score is None or (math.isfinite(score) and 0.0 <= score <= 1.0)
    elif path == "/webhook":
        assert answer["status"] in {"accepted", "logged"}
    else:
        assert set(answer) == {"model_version"}


def _post(client: TestClient, path: str, body: bytes) -> None:
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    _check(response, path, body)


@FUZZ
@given(body=_bodies(predict_bodies, near_predict))
def test_predict_never_fails_with_a_500(client: TestClient, body: bytes) -> None:
    _post(client, "/predict", body)


@FUZZ
@given(body=_bodies(setup_bodies, near_setup))
def test_setup_never_fails_with_a_500(client: TestClient, body: bytes) -> None:
    _post(client, "/setup", body)


@FUZZ
@given(body=_bodies(webhook_bodies, near_webhook))
def test_webhook_never_fails_with_a_500(client: TestClient, body: bytes) -> None:
    _post(client, "/webhook", body)


@settings(max_examples=30, deadline=None, database=None)
@given(
    path=st.sampled_from(["/health", "/metrics", "/jobs"]),
    query=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)
def test_get_endpoints_ignore_whatever_query_they_get(
    client: TestClient, path: str, query: dict[str, str]
) -> None:
    assert client.get(path, params=query).status_code == 200


def test_every_endpoint_that_takes_a_body_is_fuzzed(client: TestClient) -> None:
    """A new POST endpoint must get its strategy here (this test names it until it does)."""
    schema = client.get("/openapi.json").json()
    posts = {path for path, methods in schema["paths"].items() if "post" in methods}
    assert posts == {"/predict", "/setup", "/webhook"}
