"""The one pre-annotation path: each task's outcome, in order, one failure per task."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backend.service.labelstudio import Task
from backend.service.prediction import Prediction, PredictionError
from backend.service.prelabel import label_in_config, prelabel
from training.shared.labels import LabelConfig, load_label_config

CONFIG = load_label_config(Path(__file__).parents[2] / "label_config.xml")
HAKIM, CERTAS = "Codman Hakim", "Codman Certas Plus"


def _prediction(label: str, probs: dict[str, float], score: float = 0.6) -> Prediction:
    return Prediction(label, probs, score, {}, "v7", "hash")


class Predictor:
    """Answers by image bytes: b"ok" → Hakim, b"alien" → a class no project has, else error."""

    version = "v7"

    def __init__(self) -> None:
        self.calls: list[int] = []

    def predict(
        self, images: Sequence[bytes | BaseException]
    ) -> list[Prediction | PredictionError | None]:
        self.calls.append(len(images))
        out: list[Prediction | PredictionError | None] = []
        for image in images:
            if isinstance(image, BaseException):
                out.append(PredictionError(f"fetch failed: {image}"))
            elif image == b"ok":
                out.append(_prediction(HAKIM, {HAKIM: 0.6, CERTAS: 0.4}))
            elif image == b"alien":
                out.append(_prediction("Shunt X", {"Shunt X": 0.5, CERTAS: 0.3, HAKIM: 0.2}))
            elif image == b"nan":
                out.append(_prediction(HAKIM, {HAKIM: 1.0}, score=float("nan")))
            else:
                out.append(PredictionError("not an image"))
        return out


class Fetcher:
    def fetch(self, url: str) -> bytes:
        if url.startswith("refused"):
            raise ValueError("host refused")
        return url.removeprefix("img:").encode()


def test_each_task_gets_its_own_outcome_in_order() -> None:
    tasks = [
        Task(id=1, data={"image": "img:ok"}),
        {"id": 2, "data": {}},
        {"id": 3, "data": {"image": "refused://x"}},
        {"id": 4, "data": {"image": "img:garbage"}},
        {"id": 5, "data": {"image": "img:alien"}},
        {"id": 6, "data": {"image": "img:nan"}},
    ]
    predictor = Predictor()
    with ThreadPoolExecutor(2) as pool:
        answers = prelabel(tasks, config=CONFIG, predictor=predictor, fetcher=Fetcher(), pool=pool)
    assert [a.task_id for a in answers] == [1, 2, 3, 4, 5, 6]
    assert [a.outcome for a in answers] == [
        "ok", "no_image", "fetch_error", "predict_error", "ok", "predict_error",
    ]  # fmt: skip
    assert predictor.calls == [5]  # one call for the fetched ones; no URL, no image
    first, _, refused, garbage, alien, _ = answers
    assert (first.label, first.score, first.model_version) == (HAKIM, 0.6, "v7")
    assert first.result[0]["value"]["choices"] == [HAKIM]
    assert "host refused" in refused.reason and "not an image" in garbage.reason
    assert alien.label == CERTAS  # the most probable class the project has
    assert all(not a.result for a in answers if not a.ok)


def test_no_model_and_no_shared_class_are_outcomes_not_errors() -> None:
    class Unserved(Predictor):
        version = None

        def predict(self, images: Sequence[bytes | BaseException]) -> list[None]:  # type: ignore[override]
            return [None] * len(images)

    with ThreadPoolExecutor(1) as pool:
        (answer,) = prelabel(
            [{"id": 9, "data": {"image": "img:ok"}}],
            config=CONFIG,
            predictor=Unserved(),
            fetcher=Fetcher(),
            pool=pool,
        )
    assert answer.outcome == "no_model"
    assert label_in_config(_prediction("Shunt X", {"Shunt X": 1.0}), CONFIG) is None


def test_a_predictor_answering_the_wrong_count_is_a_bug_not_a_result() -> None:
    class Short(Predictor):
        def predict(self, images: Sequence[bytes | BaseException]) -> list[None]:  # type: ignore[override]
            return []

    with ThreadPoolExecutor(1) as pool, pytest.raises(RuntimeError, match="0 items for 1"):
        prelabel(
            [{"id": 1, "data": {"image": "img:ok"}}],
            config=CONFIG,
            predictor=Short(),
            fetcher=Fetcher(),
            pool=pool,
        )


def _located(centre: tuple[float, float] | None, size: tuple[int, int] = (800, 600)) -> Prediction:
    return Prediction(
        HAKIM, {HAKIM: 0.9, CERTAS: 0.1}, 0.7, {}, "v7", "hash", centre, size, "locator"
    )


def test_the_valve_centre_is_pre_annotated_as_an_editable_keypoint() -> None:
    from backend.service.prelabel import location_result

    choice, point = prelabel_result(_located((200.0, 450.0)))
    assert choice["value"] == {"choices": [HAKIM]}
    assert point["type"] == "keypointlabels"
    assert (point["from_name"], point["to_name"]) == (CONFIG.keypoint_name, CONFIG.image_name)
    assert (point["original_width"], point["original_height"]) == (800, 600)
    assert point["value"]["x"] == pytest.approx(25.0) and point["value"]["y"] == pytest.approx(75.0)
    assert point["value"]["keypointlabels"] == [CONFIG.keypoint_label]
    # A point the network put just outside the frame is kept on its edge, not dropped.
    edge = location_result(_located((-3.0, 601.0)), CONFIG)
    assert (edge[0]["value"]["x"], edge[0]["value"]["y"]) == (0.0, 100.0)


def test_no_keypoint_without_a_location_or_without_a_keypoint_tag() -> None:
    from dataclasses import replace

    from backend.service.prelabel import location_result

    assert location_result(_located(None), CONFIG) == []
    assert location_result(_located((float("nan"), 3.0)), CONFIG) == []
    no_tag = replace(CONFIG, keypoint_name=None, keypoint_label=None)
    assert location_result(_located((10.0, 10.0)), no_tag) == []


def prelabel_result(prediction: Prediction, config: LabelConfig = CONFIG) -> list[dict]:
    """The result :func:`prelabel` builds for one task that ``prediction`` answers."""

    class One:
        version = "v7"

        def predict(self, images: Sequence[bytes | BaseException]) -> list[Prediction]:
            return [prediction for _ in images]

    with ThreadPoolExecutor(1) as pool:
        (answer,) = prelabel(
            [Task(id=1, data={"image": "img:ok"})],
            config=config,
            predictor=One(),
            fetcher=Fetcher(),
            pool=pool,
        )
    assert answer.ok, answer
    return answer.result


def test_an_unfamiliar_valve_gets_a_note_and_keeps_the_model_s_best_class() -> None:
    from dataclasses import replace

    from backend.service.prelabel import note_result
    from training.shared.labels import NOTE_NAME

    with_note = replace(CONFIG, note_name=NOTE_NAME)
    odd = replace(_located(None), novelty=0.99, unfamiliar=True)
    (choice, note) = prelabel_result(odd, with_note)
    assert choice["value"] == {"choices": [HAKIM]}
    assert (note["type"], note["from_name"], note["to_name"]) == (
        "textarea",
        NOTE_NAME,
        CONFIG.image_name,
    )
    assert "99%" in note["value"]["text"][0]
    # Ordinary X-rays, and configs without the note, get no note.
    assert note_result(replace(odd, unfamiliar=False, novelty=0.5), with_note) == []
    assert note_result(odd, replace(CONFIG, note_name=None)) == []


def test_the_setting_read_under_the_proposed_model_is_pre_selected_with_its_probability() -> None:
    """Label Studio shows a model's setting <Choices> while that model is chosen: the result
    selects the read value there, scored by its probability, and the note says how sure."""
    from dataclasses import replace

    from training.shared.labels import NOTE_NAME

    scale = CONFIG.setting_scale(HAKIM)
    assert scale is not None
    reading = replace(_located(None), settings={HAKIM: ("120", 0.64), "proGAV 2.0": ("7", 0.9)})
    choice, setting, note = prelabel_result(reading, replace(CONFIG, note_name=NOTE_NAME))
    assert choice["value"] == {"choices": [HAKIM]}
    assert setting == {
        "value": {"choices": ["120"]},
        "from_name": scale.name,
        "to_name": CONFIG.image_name,
        "type": "choices",
        "score": pytest.approx(0.64),
    }
    assert "Setting 120: probability 64%" in note["value"]["text"][0]
    # A value off the project's scale, or a model the config has no scale for: no setting.
    off_scale = replace(reading, settings={HAKIM: ("999", 0.9)})
    assert [r["from_name"] for r in prelabel_result(off_scale, CONFIG)] == ["valve"]
