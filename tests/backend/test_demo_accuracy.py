"""The demo's accuracy line: the served version's predictions on unlabelled tasks vs truth."""

from __future__ import annotations

from types import SimpleNamespace

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
