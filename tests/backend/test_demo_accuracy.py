"""The demo's accuracy line: the served version's predictions on unlabelled tasks vs truth."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from backend.tools.stack.demo_accuracy import demo_accuracy


def _task(uid: str, *, labelled: bool = False, **predicted: str) -> dict:
    predictions = [
        {
            "model_version": version,
            "result": [{"from_name": "valve", "type": "choices", "value": {"choices": [choice]}}],
        }
        for version, choice in predicted.items()
    ]
    return {
        "data": {"source_uid": uid},
        "total_annotations": int(labelled),
        "predictions": predictions,
    }


def test_only_unlabelled_tasks_and_the_served_version_count() -> None:
    truth = {u: SimpleNamespace(label=label) for u, label in (("a", "A"), ("b", "B"), ("c", "C"))}
    tasks = [
        _task("a", v2="A", v1="B"),  # right with v2 (v1's older answer is ignored)
        _task("b", v2="A"),  # wrong
        _task("c", v1="C"),  # not scored by v2 yet
        _task("a", labelled=True, v2="B"),  # labelled: not counted
        _task("zzz", v2="A"),  # not a demo image
    ]
    scored = demo_accuracy(tasks, truth, "v2", "valve")
    assert (scored.correct, scored.scored, scored.unlabelled) == (1, 2, 3)
    assert scored.accuracy == 0.5
    assert "right on 1 of 2 unlabelled demo X-rays (accuracy 0.50; 1 still being scored)" in (
        scored.line()
    )
    none = demo_accuracy(tasks, truth, "v3", "valve")
    assert none.accuracy is None and "no unlabelled demo task holds its prediction" in none.line()


def test_the_valve_keypoint_is_scored_against_the_true_centre() -> None:
    truth = {
        "a": SimpleNamespace(label="A", valve_xy=(100.0, 50.0)),
        "b": SimpleNamespace(label="B", valve_xy=(10.0, 10.0)),
        "c": SimpleNamespace(label="C", valve_xy=None),  # centre unknown: class only
    }
    point = {
        "from_name": "valve_centre",
        "type": "keypointlabels",
        "original_width": 200,
        "original_height": 100,
        "value": {"x": 53.0, "y": 54.0, "keypointlabels": ["Valve"]},  # (106, 54)
    }
    tasks = [_task("a", v2="A"), _task("b", v2="B"), _task("c", v2="C")]
    for task in tasks:
        task["predictions"][0]["result"].append(point)
    scored = demo_accuracy(tasks, truth, "v2", "valve", "valve_centre")
    assert scored.accuracy == 1.0
    assert scored.location_errors_px == (
        pytest.approx(((106 - 100) ** 2 + (54 - 50) ** 2) ** 0.5),
        pytest.approx(((106 - 10) ** 2 + (54 - 10) ** 2) ** 0.5),
    )
    assert "valve located" in scored.line() and "2 X-rays" in scored.line()
    # Without a keypoint tag to read, nothing is claimed about the location.
    assert demo_accuracy(tasks, truth, "v2", "valve").location_line() == ""


def test_the_proposed_setting_is_scored_in_steps_where_the_model_is_right() -> None:
    from training.shared.labels import SettingScale

    scale = SettingScale("A", "setting_a", ("1", "2", "3", "4"))
    truth = {
        "a": SimpleNamespace(label="A", setting="2"),
        "b": SimpleNamespace(label="A", setting="4"),
        "c": SimpleNamespace(label="A", setting="1"),  # model wrong: its setting is not scored
        "d": SimpleNamespace(label="B", setting=None),  # no scale for B
    }
    tasks = [_task("a", v2="A"), _task("b", v2="A"), _task("c", v2="B"), _task("d", v2="B")]
    for task, read in zip(tasks, ("2", "3", "1", None), strict=True):
        if read is not None:
            task["predictions"][0]["result"].append(
                {"from_name": "setting_a", "type": "choices", "value": {"choices": [read]}}
            )
    scored = demo_accuracy(tasks, truth, "v2", "valve", settings=(scale,))
    assert scored.setting_steps == (0, -1)
    assert "setting right on 1 of 2 with the right model (1.00 within one step" in scored.line()
    # A config without scales claims nothing about settings.
    assert demo_accuracy(tasks, truth, "v2", "valve").setting_line() == ""
