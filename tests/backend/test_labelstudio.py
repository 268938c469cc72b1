"""Label Studio payloads and our answers (backend/service/labelstudio.py).

The payload models are checked against every request Label Studio 1.23.2 really sent
(``payloads/``, recorded with long fields trimmed). The calls we make are tested with the
shared client in ``tests/training/test_labelstudio_client.py``; here only how the backend
builds it and the image fetcher from its settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from backend.service.labelstudio import (
    PredictRequest,
    PredictResponse,
    SetupRequest,
    TaskResult,
    WebhookEvent,
    choice_result,
    image_fetcher,
    keypoint_result,
    project_key,
    project_key_of,
)
from backend.settings import Settings, SettingsError
from training.labelstudio.export import keypoint_centre
from training.shared.errors import LabelConfigError
from training.shared.labels import load_label_config, parse_label_config

PAYLOADS = Path(__file__).parent / "payloads"
LS_URL = "http://ls.test:8080"
CONFIG = parse_label_config(
    '<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
    '<Choice value="Codman Hakim"/><Choice value="Codman Certas Plus"/>'
    '<Choice value="Sophysa Sophy SM8"/><Choice value="proGAV 2.0"/></Choices></View>'
)


def recorded(name: str) -> dict[str, Any]:
    return json.loads((PAYLOADS / name).read_text())


# --------------------------------------------------------------------------------------------
# Payloads


def test_every_recorded_payload_parses() -> None:
    setup = SetupRequest.model_validate(recorded("setup.json")["request"]["body"])
    assert (setup.project, setup.ls_id) == ("1.1795624869", 1)
    assert setup.label_config.startswith("<View>")
    assert "0123456789abcdef" not in repr(setup)  # the creator's token stays out of logs

    predict = PredictRequest.model_validate(recorded("predict.json")["request"]["body"])
    assert predict.project == "1.1795624869"
    assert [t.id for t in predict.tasks] == [1]
    assert predict.tasks[0].data == {"image": "/data/upload/1/4a003d21-valve_2.png"}
    assert predict.tasks[0].model_extra["inner_id"] == 1  # unknown keys are kept

    files = sorted(PAYLOADS.glob("webhook_*.json"))
    assert len(files) == 6
    for file in files:
        body = recorded(file.name)["request"]["body"]
        event = WebhookEvent.model_validate(body)
        assert event.action == file.stem.removeprefix("webhook_")
        assert event.project is not None and event.project.id == 1
    created = WebhookEvent.model_validate(
        recorded("webhook_ANNOTATION_CREATED.json")["request"]["body"]
    )
    assert created.annotation["id"] == 1 and created.task["id"] == 3
    deleted = WebhookEvent.model_validate(
        recorded("webhook_ANNOTATIONS_DELETED.json")["request"]["body"]
    )
    assert deleted.annotations == [{"id": 1}]
    tasks = WebhookEvent.model_validate(recorded("webhook_TASKS_CREATED.json")["request"]["body"])
    assert [t["id"] for t in tasks.tasks] == [6]


def test_malformed_payloads_are_refused() -> None:
    with pytest.raises(ValidationError):
        SetupRequest.model_validate({"project": "one.two", "schema": "<View/>"})
    with pytest.raises(ValidationError):
        SetupRequest.model_validate({"project": "1.2"})  # no schema
    with pytest.raises(ValidationError):
        PredictRequest.model_validate({"tasks": "not a list"})
    with pytest.raises(ValidationError):
        PredictRequest.model_validate({"tasks": [{"data": {}}]})  # no id
    with pytest.raises(ValidationError):
        WebhookEvent.model_validate({"project": {"id": 1}})  # no action


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1.1795624869", (1, "1.1795624869")), (7, (7, "7")), ("12", (12, "12"))],
)
def test_project_key_parses_label_studio_keys(value: Any, expected: tuple[int, str]) -> None:
    assert project_key(value) == expected


@pytest.mark.parametrize("value", ["", "abc", "1.", ".5", "1.x", "-1", "1.2.3"])
def test_project_key_refuses_anything_else(value: str) -> None:
    with pytest.raises(ValueError):
        project_key(value)


def test_project_key_is_rebuilt_from_a_webhook_project() -> None:
    # The recorded /setup said "1.1795624869"; the project was created that second.
    assert project_key_of({"id": 1, "created_at": "2026-11-25T16:41:09.448213Z"}) == "1.1795624869"
    assert project_key_of({"id": 1}) is None
    event = WebhookEvent.model_validate(
        {"action": "START_TRAINING", "project": {"id": 1, "created_at": "2026-11-25T16:41:09Z"}}
    )
    assert event.project_key == "1.1795624869"


def test_response_builders_give_the_recorded_shape() -> None:
    expected = recorded("predict.json")["response"]["body"]
    response = PredictResponse(
        results=[
            TaskResult(
                result=choice_result(CONFIG, "Codman Certas Plus"), score=0.37, model_version="v0"
            )
        ],
        model_version="v0",
    )
    assert response.to_json() == expected
    failed = PredictResponse(results=[TaskResult()], model_version="v0").to_json()
    assert failed == {"results": [{"result": []}], "model_version": "v0"}


def test_keypoint_result_is_label_studios_percent_shape_and_reads_back() -> None:
    config = load_label_config(Path(__file__).parents[2] / "label_config.xml")
    result = keypoint_result(config, 200.0, 150.0, 800, 600)
    assert result == [
        {
            "id": "valve-centre",
            "from_name": "valve_centre",
            "to_name": "image",
            "type": "keypointlabels",
            "original_width": 800,
            "original_height": 600,
            "image_rotation": 0,
            "value": {"x": 25.0, "y": 25.0, "width": 1.0, "keypointlabels": ["Valve"]},
        }
    ]
    annotation = {"result": choice_result(config, "proGAV 2.0") + result}
    assert keypoint_centre(annotation, config.keypoint_name, config.keypoint_label) == (
        pytest.approx(200.0),
        pytest.approx(150.0),
    )
    # What Label Studio's own schema for the tag accepts (label-studio-sdk's LabelInterface).
    from label_studio_sdk.label_interface import LabelInterface

    control = LabelInterface(
        (Path(__file__).parents[2] / "label_config.xml").read_text()
    ).get_control("valve_centre")
    assert control.validate_value(result[0]["value"])
    # The image's edges are inside; outside is refused, as is a config without the tag.
    assert keypoint_result(config, 800, 0, 800, 600)[0]["value"]["x"] == 100.0
    with pytest.raises(ValueError, match="outside"):
        keypoint_result(config, 800.5, 10, 800, 600)
    with pytest.raises(ValueError, match="positive"):
        keypoint_result(config, 0, 0, 0, 600)
    with pytest.raises(LabelConfigError, match="KeyPointLabels"):
        keypoint_result(CONFIG, 1, 1, 10, 10)


# --------------------------------------------------------------------------------------------
# The shared client and fetcher, from the settings


@pytest.mark.parametrize(
    "settings",
    [
        {"label_studio_url": "ftp://ls.test"},
        {"label_studio_url": "not a url"},
        {"label_studio_url": LS_URL, "allowed_hosts": ("bad host:x",)},
        {"label_studio_url": LS_URL, "allowed_hosts": ("user@host",)},
    ],
)
def test_bad_settings_fail_at_start_with_the_variable_name(settings: dict) -> None:
    with pytest.raises(SettingsError, match="LABEL_STUDIO_URL|VALVE_ID_ALLOWED_HOSTS"):
        image_fetcher(Settings(**settings))
