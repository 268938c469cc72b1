"""The served version: input order, per-image errors, cache, hot-swap, ensemble, fast path.

Most tests serve versions made of a tiny registered architecture with random weights (the
mechanics do not depend on the network's size or accuracy, and it keeps the file fast). The
fast-path test trains a real ResNet-18 through the training pipeline, because agreement of
bf16 with fp32 only means something on a model that has learned something.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from tiny_arch import TINY_ARCH
from torch import nn

from backend.service import predictor as predictor_module
from backend.service.predictor import Prediction, PredictionError, Predictor
from backend.service.ranking import rank_tasks
from backend.settings import SettingsError
from training.shared.dicom import load_image
from training.shared.errors import ImageFetchError
from training.shared.model import (
    ValveNet,
    load_checkpoint,
    save_checkpoint,
)
from training.shared.preprocess import PreprocessParams, prepare_image
from training.shared.registry import ModelRegistry
from training.shared.uncertainty import margin, normalized_entropy, softmax

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["Codman Hakim", "Codman Certas Plus", "Sophysa Sophy SM8", "proGAV 2.0"]
SIZE_PX = 32


# --- helpers ------------------------------------------------------------------------------


def _png(seed: int, size: int = 40) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((size, size)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _publish(
    registry: ModelRegistry,
    version_id: str,
    *,
    seed: int = 0,
    f1: float = 0.8,
    n_folds: int = 2,
    temperature: float = 2.0,
    best_acquisition: str | None = "margin",
    corrupt_fold: int | None = None,
) -> Path:
    """Publish a version of random tiny models (distinct weights per seed and fold)."""
    staging = registry.staging("test")
    torch.manual_seed(seed)
    for k in range(n_folds):
        model = ValveNet(len(CLASSES), arch=TINY_ARCH)
        save_checkpoint(model, staging / "weights" / f"fold_{k}.pt", classes=CLASSES)
    if corrupt_fold is not None:  # truncated, as by a full disk or a killed copy
        broken = staging / "weights" / f"fold_{corrupt_fold}.pt"
        broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    config = {
        "format": 1,
        "version": version_id,
        "classes": CLASSES,
        "preprocess": PreprocessParams(size_px=SIZE_PX).to_dict(),
        "temperature": temperature,
        "arch": TINY_ARCH,
        "folds": [{"fold": k, "weights": f"weights/fold_{k}.pt"} for k in range(n_folds)],
    }
    metrics = {
        "mean": {"f1_macro": f1},
        "classes": CLASSES,
        "uncertainty": {"best_acquisition": best_acquisition},
    }
    (staging / "config.json").write_text(json.dumps(config))
    (staging / "metrics.json").write_text(json.dumps(metrics))
    return registry.publish(staging, version_id=version_id).path


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "models")


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take the bf16 fast path as a CPU with AVX512-BF16/AMX would, on any CPU (emulated
    bf16 is slow but computes the same), so its tests run on every machine."""
    import training.shared.inference

    monkeypatch.setattr(training.shared.inference, "cpu_has_native_bf16", lambda: True)


@pytest.fixture
def forward_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of every predicting forward pass (inference mode) of every fold model the
    predictor loads; the Grad-CAM pass that locates the valve (with gradients) is not one."""
    calls: list[int] = []
    real = predictor_module.load_fold_models

    def count(_module: object, inputs: tuple[torch.Tensor, ...], _out: object) -> None:
        if torch.is_inference_mode_enabled():
            calls.append(len(inputs[0]))

    def counting(*args: object, **kwargs: object) -> list[ValveNet]:
        models = real(*args, **kwargs)  # type: ignore[arg-type]
        for model in models:
            model.register_forward_hook(count)
        return models

    monkeypatch.setattr(predictor_module, "load_fold_models", counting)
    return calls


def _wait_for_version(predictor: Predictor, version: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while predictor.version != version and time.monotonic() < deadline:
        time.sleep(0.01)
    assert predictor.version == version, predictor.load_error


def _predictor(registry: ModelRegistry, **kwargs: object) -> Predictor:
    kwargs.setdefault("refresh_interval_s", 0.0)
    return Predictor(registry.root, device="cpu", **kwargs)  # type: ignore[arg-type]


# --- inputs and errors ------------------------------------------------------------------


def test_predictions_come_in_input_order_and_bad_images_fail_alone(
    registry: ModelRegistry,
) -> None:
    _publish(registry, "v1")
    good_a, good_b = _png(1), _png(2)
    inputs: list[bytes | BaseException] = [
        good_a,
        good_a[: len(good_a) // 2],  # truncated PNG
        b"<!DOCTYPE html><html><body>Sign in to Label Studio</body></html>",
        ImageFetchError("Label Studio refused the image (HTTP 401): check LABEL_STUDIO_API_KEY"),
        bytes(range(256)) * 4,  # garbage
        b"",
        good_b,
    ]
    with _predictor(registry) as predictor:
        results = predictor.predict(inputs)
    assert len(results) == len(inputs)
    kinds = [type(r).__name__ for r in results]
    assert kinds == ["Prediction"] + ["PredictionError"] * 5 + ["Prediction"]
    reasons = [r.reason for r in results if isinstance(r, PredictionError)]
    assert "truncated" in reasons[0] or "cannot" in reasons[0] or "not" in reasons[0]
    assert "neither a DICOM file nor a PNG or JPEG image" in reasons[1]
    assert reasons[2] == "Label Studio refused the image (HTTP 401): check LABEL_STUDIO_API_KEY"
    assert "neither a DICOM file nor a PNG or JPEG image" in reasons[3]
    assert "image" in reasons[4]  # empty input
    assert all(reason and "Traceback" not in reason for reason in reasons)
    a, b = results[0], results[-1]
    assert isinstance(a, Prediction) and isinstance(b, Prediction)
    assert a.content_hash != b.content_hash and a.probs != b.probs
    for prediction in (a, b):
        assert prediction.model_version == "v1"
        assert set(prediction.probs) == set(CLASSES)
        assert sum(prediction.probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert prediction.label == max(prediction.probs, key=prediction.probs.get)
        assert 0.0 <= prediction.score <= 1.0
        assert set(prediction.uncertainty) == {
            "entropy",
            "normalized_entropy",
            "margin",
            "max_softmax",
            "bald",
        }


def test_a_truncated_png_gets_a_readable_reason(registry: ModelRegistry) -> None:
    _publish(registry, "v1")
    png = _png(3)
    with _predictor(registry) as predictor:
        (result,) = predictor.predict([png[:60]])
    assert isinstance(result, PredictionError)
    assert result.reason.startswith("image: ")  # names the input, then says what is wrong
    assert len(result.reason) < 400


# --- cache ------------------------------------------------------------------------------


def test_a_repeated_image_is_served_from_the_cache_without_a_forward_pass(
    registry: ModelRegistry, forward_calls: list[int]
) -> None:
    _publish(registry, "v1")
    images = [_png(1), _png(2), _png(3)]
    with _predictor(registry) as predictor:
        first = predictor.predict(images)
        calls_after_first = len(forward_calls)
        assert calls_after_first == 2  # one batch through each of the two folds
        second = predictor.predict(list(reversed(images)))
        assert len(forward_calls) == calls_after_first  # the model was not called again
        assert second == list(reversed(first))
        stats = predictor.stats()
    assert stats["cache_hits"] == 3 and stats["cache_misses"] == 3
    assert stats["images_inferred"] == 3 and stats["cache_entries"] == 3


def test_duplicates_in_one_request_are_inferred_once(
    registry: ModelRegistry, forward_calls: list[int]
) -> None:
    _publish(registry, "v1")
    png = _png(7)
    with _predictor(registry) as predictor:
        results = predictor.predict([png, png, _png(8), png])
        stats = predictor.stats()
    assert results[0] == results[1] == results[3]
    assert forward_calls == [2, 2]  # two distinct images, once per fold
    assert stats["images_inferred"] == 2


def test_the_cache_is_a_bounded_lru(registry: ModelRegistry, forward_calls: list[int]) -> None:
    _publish(registry, "v1")
    a, b, c = _png(1), _png(2), _png(3)
    with _predictor(registry, cache_size=2) as predictor:
        predictor.predict([a])
        predictor.predict([b])
        predictor.predict([a])  # a is now the most recently used
        predictor.predict([c])  # evicts b
        assert predictor.stats()["cache_entries"] == 2
        before = len(forward_calls)
        predictor.predict([a])
        assert len(forward_calls) == before  # still cached
        predictor.predict([b])
        assert len(forward_calls) == before + 2  # evicted: recomputed (two folds)


# --- versions ------------------------------------------------------------------------------


def test_a_promoted_version_is_served_after_refresh_without_a_new_predictor(
    registry: ModelRegistry, forward_calls: list[int]
) -> None:
    _publish(registry, "v1", seed=1)
    png = _png(5)
    with _predictor(registry) as predictor:
        (old,) = predictor.predict([png])
        assert isinstance(old, Prediction) and old.model_version == "v1"
        _publish(registry, "v2", seed=2, f1=0.9)
        assert predictor.refresh() is True
        assert predictor.version == "v2"
        calls = len(forward_calls)
        (new,) = predictor.predict([png])
        stats = predictor.stats()
    assert isinstance(new, Prediction)
    assert new.model_version == "v2" and new.content_hash == old.content_hash
    assert new.probs != old.probs
    assert len(forward_calls) == calls + 2  # a cache miss: the new version computed it
    assert stats["cache_misses"] == 2 and stats["cache_hits"] == 0


def test_predict_picks_up_a_new_version_without_waiting_for_it(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    _publish(registry, "v1", seed=1)
    release = threading.Event()
    real_load = predictor_module._load_served

    def slow_load(*args: object, **kwargs: object) -> object:
        release.wait(30)  # a big ensemble loading, or compiling
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    with _predictor(registry) as predictor:
        monkeypatch.setattr(predictor_module, "_load_served", slow_load)
        _publish(registry, "v2", seed=2, f1=0.9)
        started = time.monotonic()
        (during,) = predictor.predict([_png(1)])
        assert time.monotonic() - started < 10  # did not wait for the load
        assert isinstance(during, Prediction) and during.model_version == "v1"
        release.set()
        _wait_for_version(predictor, "v2")
        (after,) = predictor.predict([_png(1)])
    assert isinstance(after, Prediction) and after.model_version == "v2"


def test_refresh_looks_at_most_once_per_interval(registry: ModelRegistry) -> None:
    _publish(registry, "v1", seed=1)
    with _predictor(registry, refresh_interval_s=3600) as predictor:
        _publish(registry, "v2", seed=2, f1=0.9)
        assert predictor.refresh() is False
        (result,) = predictor.predict([_png(1)])
        assert isinstance(result, Prediction) and result.model_version == "v1"
        assert predictor.refresh(force=True) is True
        assert predictor.version == "v2"


def test_a_corrupt_new_version_keeps_the_previous_one_in_service(
    registry: ModelRegistry,
) -> None:
    _publish(registry, "v1", seed=1)
    with _predictor(registry) as predictor:
        assert predictor.load_error is None
        _publish(registry, "v2", seed=2, f1=0.9, corrupt_fold=1)
        assert registry.current() == "v2"
        assert predictor.refresh() is False
        assert predictor.version == "v1"
        error = predictor.load_error
        assert error is not None
        assert error.startswith("version v2 could not be loaded: ")
        assert "fold_1.pt" in error and "cannot read checkpoint" in error
        assert predictor.info()["load_error"] == error
        (result,) = predictor.predict([_png(1)])
        assert isinstance(result, Prediction) and result.model_version == "v1"

        registry.rollback()  # pointing back at the served version clears the error
        assert predictor.refresh() is False
        assert predictor.version == "v1" and predictor.load_error is None
        registry.promote("v2")  # the broken version again: fails again, v1 stays
        predictor.refresh()
        assert predictor.version == "v1" and "v2" in (predictor.load_error or "")

        _publish(registry, "v3", seed=3, f1=0.9)  # a good one fixes it
        assert predictor.refresh() is True
        assert predictor.version == "v3" and predictor.load_error is None


def test_fold_classes_must_match_config(registry: ModelRegistry) -> None:
    path = _publish(registry, "v1")
    config = json.loads((path / "config.json").read_text())
    assert config["classes"] == CLASSES
    other = ModelRegistry(registry.root.parent / "other")
    staging = other.staging("test")
    torch.manual_seed(0)
    for k in range(2):
        save_checkpoint(
            ValveNet(4, arch=TINY_ARCH), staging / "weights" / f"fold_{k}.pt", classes="ABCD"
        )
    (staging / "config.json").write_text(json.dumps(config))
    (staging / "metrics.json").write_text(
        json.dumps({"mean": {"f1_macro": 0.5}, "classes": CLASSES})
    )
    other.publish(staging, version_id="mismatch")
    with _predictor(other) as predictor:
        assert predictor.version is None
        assert "differ from config.json" in (predictor.load_error or "")


def test_without_any_version_results_are_none_until_one_is_published(
    registry: ModelRegistry,
) -> None:
    with _predictor(registry) as predictor:
        assert predictor.version is None and predictor.load_error is None
        assert predictor.predict([_png(1), ImageFetchError("x")]) == [None, None]
        assert predictor.predict([]) == []
        info = predictor.info()
        assert info["version"] is None and info["n_models"] == 0 and info["classes"] == []
        _publish(registry, "v1")  # the first training run finishes
        predictor.predict([_png(1)])  # notices it; loads it in the background
        _wait_for_version(predictor, "v1")
        (result,) = predictor.predict([_png(1)])
        assert isinstance(result, Prediction) and result.model_version == "v1"


def test_a_corrupt_first_version_serves_nothing_and_says_why(registry: ModelRegistry) -> None:
    _publish(registry, "v1", corrupt_fold=0)
    with _predictor(registry) as predictor:
        assert predictor.version is None
        assert (predictor.load_error or "").startswith("version v1 could not be loaded")
        assert predictor.predict([_png(1)]) == [None]


# --- the numbers --------------------------------------------------------------------------


def test_probs_are_the_mean_of_the_members_temperature_scaled_softmax(
    registry: ModelRegistry,
) -> None:
    path = _publish(registry, "v1", seed=4, n_folds=3, temperature=2.5)
    images = [_png(10), _png(11)]
    with _predictor(registry, fast_path=False) as predictor:
        results = predictor.predict(images)
    params = PreprocessParams(size_px=SIZE_PX)
    batch = np.stack([prepare_image(load_image(b), params) for b in images])
    x = torch.from_numpy(batch)[:, None].expand(-1, 3, -1, -1)
    x = (x - torch.tensor(params.mean)[:, None, None]) / torch.tensor(params.std)[:, None, None]
    members = []
    for k in range(3):
        model = load_checkpoint(path / "weights" / f"fold_{k}.pt")
        with torch.no_grad():
            members.append(softmax(model(x).numpy(), temperature=2.5))
    expected = np.mean(members, axis=0)
    assert not np.allclose(members[0], members[1], atol=1e-3)  # the mean is not trivial
    for result, row in zip(results, expected, strict=True):
        assert isinstance(result, Prediction)
        np.testing.assert_allclose([result.probs[c] for c in CLASSES], row, atol=1e-5)
        assert result.uncertainty["bald"] > 0  # members disagree somewhat


def test_an_energy_novelty_is_the_energy_of_the_members_mean_logits(
    registry: ModelRegistry, tmp_path: Path
) -> None:
    """What a version's ``novelty.npz`` (energy measure) makes the backend serve: the members'
    mean logits' free energy, standardised by the folds' centre and scale, ranked against the
    out-of-fold reference; flagged from the version's flag quantile on."""
    from training.shared.novelty import FoldNovelty, Novelty, free_energy

    staged = _publish(registry, "v0", seed=6, n_folds=2)
    images = [_png(12), _png(13), _png(14)]
    params = PreprocessParams(size_px=SIZE_PX)
    batch = np.stack([prepare_image(load_image(b), params) for b in images])
    x = torch.from_numpy(batch)[:, None].expand(-1, 3, -1, -1)
    x = (x - torch.tensor(params.mean)[:, None, None]) / torch.tensor(params.std)[:, None, None]
    with torch.no_grad():
        logits = [load_checkpoint(staged / "weights" / f"fold_{k}.pt")(x).numpy() for k in range(2)]
    energy = free_energy(np.mean(logits, axis=0))
    # A reference that puts the most unusual image above 99 % of it, the others at 80 %.
    folds = tuple(
        FoldNovelty(np.zeros((0, 0)), np.zeros((0, 0)), 0.5, "energy", c) for c in (0.1, -0.1)
    )
    distances = (energy - 0.0) / 0.5
    top, second = np.sort(distances)[-1], np.sort(distances)[-2]
    gap = (top - second) / 10  # far wider than fp32 rounding between two forward passes
    reference = np.r_[
        np.full(80, distances.min() - 1), np.linspace(second + gap, top - gap, 19), 1e9
    ]
    novelty = Novelty(folds, reference)
    staging = registry.staging("energy")
    for name in ("config.json", "metrics.json"):
        (staging / name).write_bytes((staged / name).read_bytes())
    for k in range(2):
        (staging / "weights" / f"fold_{k}.pt").parent.mkdir(parents=True, exist_ok=True)
        (staging / "weights" / f"fold_{k}.pt").write_bytes(
            (staged / "weights" / f"fold_{k}.pt").read_bytes()
        )
    novelty.save(staging / "novelty.npz")
    registry.publish(staging, version_id="v1")
    with _predictor(registry, fast_path=False) as predictor:
        results = predictor.predict(images)
    expected = novelty.rank(distances)
    flag = novelty.flag_quantile
    assert sorted(expected)[-1] >= flag > sorted(expected)[-2]  # the check can tell them apart
    for result, value in zip(results, expected, strict=True):
        assert isinstance(result, Prediction)
        assert result.novelty == pytest.approx(value)
        assert result.unfamiliar == (value >= flag)


@pytest.mark.parametrize(
    ("setting", "best", "expected"),
    [("auto", "margin", "margin"), ("auto", None, "entropy"), ("entropy", "margin", "entropy")],
)
def test_score_follows_the_acquisition_and_sorts_like_rank_tasks(
    registry: ModelRegistry, setting: str, best: str | None, expected: str
) -> None:
    _publish(registry, "v1", best_acquisition=best, temperature=0.3)
    images = [_png(i) for i in range(12)]
    with _predictor(registry, acquisition=setting) as predictor:
        assert predictor.info()["acquisition"] == expected
        results = predictor.predict(images)
    predictions = [r for r in results if isinstance(r, Prediction)]
    assert len(predictions) == len(images)
    probs = np.array([[p.probs[c] for c in CLASSES] for p in predictions])
    uncertainty = (1 - margin(probs)) if expected == "margin" else normalized_entropy(probs)
    np.testing.assert_allclose([p.score for p in predictions], 1 - uncertainty, atol=1e-6)
    by_score = rank_tasks({i: p.score for i, p in enumerate(predictions)})
    by_uncertainty = sorted(range(len(predictions)), key=lambda i: -uncertainty[i])
    assert by_score == by_uncertainty
    assert len({round(p.score, 6) for p in predictions}) > 1  # the order is not vacuous


def test_the_default_score_is_the_calibrated_probability_of_the_proposed_class(
    registry: ModelRegistry,
) -> None:
    """What Label Studio shows as the prediction's score (a percentage) is what an annotator
    reads it as: the model's calibrated probability for the class it pre-selects."""
    from backend.settings import Settings

    _publish(registry, "v1", best_acquisition="margin", temperature=0.3)
    acquisition = Settings().acquisition
    assert acquisition == "least_confidence"
    with _predictor(registry, acquisition=acquisition) as predictor:
        results = predictor.predict([_png(i) for i in range(12)])
    predictions = [r for r in results if isinstance(r, Prediction)]
    assert len(predictions) == 12
    for p in predictions:
        assert p.label == max(p.probs, key=p.probs.__getitem__)
        assert p.score == pytest.approx(p.probs[p.label], abs=1e-9)
    assert len({round(p.score, 6) for p in predictions}) > 1


def test_an_unknown_acquisition_is_refused_at_start(registry: ModelRegistry) -> None:
    with pytest.raises(SettingsError, match="entropy"):
        Predictor(registry.root, acquisition="random")


def test_info_describes_the_served_version(registry: ModelRegistry, native_bf16: None) -> None:
    _publish(registry, "v1", n_folds=3)
    with _predictor(registry) as predictor:
        info = predictor.info()
    assert info == {
        "version": "v1",
        "classes": CLASSES,
        "acquisition": "margin",
        "load_error": None,
        "n_models": 3,
        "device": "cpu",
        "fast_path": True,
        "mixed_precision": "bfloat16",
        "compiled": False,
    }


def test_a_cpu_without_native_bf16_serves_fp32(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Emulated bf16 is many times slower than fp32 (an AVX2-only CPU: 33× per forward), so
    the fast path there keeps channels_last and fp32 weights and computes in fp32."""
    import training.shared.inference

    monkeypatch.setattr(training.shared.inference, "cpu_has_native_bf16", lambda: False)
    _publish(registry, "v1", n_folds=2)
    with _predictor(registry) as predictor:
        assert predictor.info()["mixed_precision"] is None
        assert predictor.info()["fast_path"] is True
    from backend.service.predictor import _for_serving

    served = _for_serving(ValveNet(len(CLASSES), arch="resnet18"), fast_path=True, compile=False)
    assert all(p.dtype == torch.float32 for p in served.parameters())


def test_concurrent_requests_during_a_swap_each_see_one_whole_version(
    registry: ModelRegistry,
) -> None:
    _publish(registry, "v1", seed=1, f1=0.8)
    _publish(registry, "v2", seed=2, f1=0.1)  # kept out by the promotion gate
    assert registry.current() == "v1"
    images = [_png(i) for i in range(6)]
    reference = {}
    for version in ("v1", "v2"):
        registry.promote(version)
        with _predictor(registry, fast_path=False, cache_size=0) as single:
            reference[version] = single.predict(images)
    registry.promote("v1")

    outcomes: list[list[Prediction | PredictionError | None]] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    with _predictor(registry, fast_path=False, cache_size=0) as predictor:

        def worker() -> None:
            try:
                while not stop.is_set():
                    outcomes.append(predictor.predict(images))
            except BaseException as exc:  # reported below
                failures.append(exc)

        def seen(version: str) -> int:
            return sum(1 for o in list(outcomes) if getattr(o[0], "model_version", "") == version)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while seen("v1") < 2 and time.monotonic() < deadline and not failures:
            time.sleep(0.01)
        registry.promote("v2")  # the swap happens while requests are in flight
        while seen("v2") < 4 and time.monotonic() < deadline and not failures:
            time.sleep(0.01)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not failures
    assert seen("v1") >= 2 and seen("v2") >= 4
    for outcome in outcomes:
        versions = {r.model_version for r in outcome if isinstance(r, Prediction)}
        assert len(versions) == 1, versions  # never a mix within one request
        (version,) = versions
        for got, want in zip(outcome, reference[version], strict=True):
            assert isinstance(got, Prediction) and isinstance(want, Prediction)
            for c in CLASSES:
                assert got.probs[c] == pytest.approx(want.probs[c], abs=1e-5)


def test_serving_modules_do_not_import_fastai() -> None:
    code = (
        "import sys\n"
        "import backend.service.predictor, backend.service.labelstudio, backend.service.ranking\n"
        "import training.labelstudio\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'fastai', 'fastcore'})\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- the fast path on a trained model -----------------------------------------------------

TRAIN_IMAGE_PX = 96
"""Side of the synthetic training images; the recipe squishes them to the quick profile's 64."""
N_TRAIN = 64
N_EVAL = 48
NEAR_TIE = 0.02
"""Top-2 probability gap under which fp32 itself is a coin toss; bf16 may pick either."""
MAX_PROB_DIFF = 0.1
"""Largest |p_bf16 - p_fp32| accepted. bf16 keeps ~3 significant digits of each logit; where
the softmax is steep (undecided images) that moves a probability by a few hundredths."""


def _quadrant_png(
    label: int,
    rng: np.random.Generator,
    *,
    contrast: float = 1.0,
    rival: int | None = None,
    rival_strength: float = 0.0,
) -> bytes:
    """A dim frame with one bright square; its quadrant is the class (a clear signal).

    ``contrast`` < 1 makes the square fainter; ``rival`` adds a second square in another
    class's quadrant, ``rival_strength`` (0–1) as bright as the first: ambiguous images, so
    the comparison also covers answers that are not saturated.
    """
    size = TRAIN_IMAGE_PX
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    frame = int(rng.integers(30, 60))
    draw.rectangle([2, 2, size - 3, size - 3], fill=frame)
    brightness = frame + contrast * (int(rng.integers(150, 196)) - frame)
    squares = [(label, brightness)]
    if rival is not None:
        squares.append((rival, frame + rival_strength * (brightness - frame)))
    for quadrant, level in squares:
        x0 = 8 + (quadrant % 2) * (size // 2) + int(rng.integers(0, 6))
        y0 = 8 + (quadrant // 2) * (size // 2) + int(rng.integers(0, 6))
        draw.rectangle([x0, y0, x0 + size // 3, y0 + size // 3], fill=int(level))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Torch on one intra-op thread while the block runs.

    On a 2-core machine shared with other processes, torch's two OpenMP threads wait on each
    other: a fold here took 83 s with two threads and 5 s with one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained_registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    """A ResNet-18 trained from scratch (2 folds, quick profile) on quadrant images."""
    from training.fitting.config import RecipeConfig
    from training.fitting.run import run_in_process
    from training.shared.dataset import load_manifest
    from training.shared.labels import load_label_config

    data = tmp_path_factory.mktemp("quadrants")
    (data / "images").mkdir()
    rng = np.random.default_rng(0)
    with open(data / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "patient_id"])
        for i in range(N_TRAIN):
            (data / "images" / f"{i}.png").write_bytes(_quadrant_png(i % 4, rng))
            writer.writerow([f"images/{i}.png", CLASSES[i % 4], f"patient-{i}"])
    label_config = load_label_config(ROOT / "label_config.xml")
    recipe = RecipeConfig.from_profile(
        "quick",
        arch="resnet18",
        pretrained=False,
        epochs_from_scratch=8,
        n_folds=2,
        augment=False,
        gradcam_per_class=0,
    )
    registry = ModelRegistry(tmp_path_factory.mktemp("trained") / "models")
    staging = registry.staging("trained")
    with _one_torch_thread():
        run_in_process(
            staging,
            load_manifest(data, label_config.classes),
            label_config,
            recipe,
            source="quadrants",
            cache_dir=None,
            run_id="trained-1",
        )
    # Separable out-of-fold predictions drive the fitted temperature to its lower bound
    # (0.05; the report flags it), which saturates every answer, faint ones included. The
    # comparison is about numerics, not calibration: serve the raw softmax.
    # The fast-path tests compare bf16 with fp32 on this network whatever this machine
    # trained it in: served like a version that predates the precision record, in bf16.
    config = json.loads((staging / "config.json").read_text())
    folds = [{**fold, "precision": None} for fold in config["folds"]]
    (staging / "config.json").write_text(json.dumps({**config, "temperature": 1.0, "folds": folds}))
    registry.publish(staging, version_id="trained-1")
    return registry


def _evaluation_set(rng: np.random.Generator) -> tuple[list[bytes], np.ndarray]:
    """N_EVAL fresh images: a third clean, a third faint, a third with a rival square."""
    images, labels = [], []
    for i in range(N_EVAL):
        label, part = i % 4, i * 3 // N_EVAL
        if part == 0:
            images.append(_quadrant_png(label, rng))
        elif part == 1:
            images.append(_quadrant_png(label, rng, contrast=(0.1, 0.15, 0.2)[i % 3]))
        else:
            rival = (label + 1 + i % 3) % 4
            strength = (0.7, 0.8, 0.9)[i % 3]
            images.append(_quadrant_png(label, rng, rival=rival, rival_strength=strength))
        labels.append(label)
    return images, np.array(labels)


def _probs(results: list[Prediction | PredictionError | None]) -> np.ndarray:
    assert all(isinstance(r, Prediction) for r in results)
    return np.array([[r.probs[c] for c in CLASSES] for r in results])  # type: ignore[union-attr]


def _assert_agrees_with_fp32(registry: ModelRegistry, what: str, **fast_options: object) -> None:
    """Serve the same version eagerly in fp32 and with ``fast_options``; compare top-1."""
    images, labels = _evaluation_set(np.random.default_rng(1))
    with _one_torch_thread():
        with Predictor(registry.root, device="cpu", fast_path=False) as exact:
            reference = exact.predict(images)
        with Predictor(registry.root, device="cpu", **fast_options) as fast:  # type: ignore[arg-type]
            assert fast.info()["n_models"] == 2
            candidate = fast.predict(images)
    p32, p16 = _probs(reference), _probs(candidate)

    clean = slice(0, N_EVAL // 3)
    accuracy = float((p32[clean].argmax(1) == labels[clean]).mean())
    assert accuracy >= 0.9, f"the model did not learn (accuracy {accuracy:.2f} on clean images)"
    top2 = np.sort(p32, axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    unsaturated = int(((gap > NEAR_TIE) & (gap < 0.99)).sum())
    assert unsaturated >= 3, "too few undecided answers for the comparison to mean much"

    disagree = np.flatnonzero(p32.argmax(1) != p16.argmax(1))
    assert all(gap[i] < NEAR_TIE for i in disagree), (disagree, gap[disagree])
    max_diff = float(np.abs(p32 - p16).max())
    score_diff = max(abs(a.score - b.score) for a, b in zip(reference, candidate, strict=True))  # type: ignore[union-attr]
    print(
        f"\n{what} vs fp32 on {N_EVAL} images: top-1 agreement "
        f"{N_EVAL - len(disagree)}/{N_EVAL} ({len(disagree)} flips, each at a near-tie); "
        f"{int((gap < NEAR_TIE).sum())} near-ties, {unsaturated} with a top-2 gap in "
        f"({NEAR_TIE}, 0.99); max |Δp| {max_diff:.4f}, mean |Δp| {np.abs(p32 - p16).mean():.5f}, "
        f"max |Δscore| {score_diff:.4f}; fp32 accuracy on clean images {accuracy:.3f}"
    )
    assert max_diff < MAX_PROB_DIFF


@pytest.mark.slow
def test_fast_path_agrees_with_fp32_on_a_trained_model(
    trained_registry: ModelRegistry, native_bf16: None
) -> None:
    """channels_last + bf16 autocast vs eager fp32: the same top-1 except at near-ties.

    What the predictor serves (temperature-scaled ensemble mean) is compared, on images the
    model never saw; the faint and two-square ones give answers that are not saturated, so
    the comparison is not decided by probabilities of exactly 0 and 1.
    """
    _assert_agrees_with_fp32(trained_registry, "channels_last + bf16", fast_path=True)


@pytest.mark.slow
def test_compiled_path_agrees_with_fp32_on_a_trained_model(
    trained_registry: ModelRegistry, native_bf16: None
) -> None:
    """``compile=True`` (inductor, freezing) on top of the fast path: the same criterion.

    Off by default (compiling takes ~20 s here even for a ResNet-18 at 64 px), but whoever
    turns it on gets a path that this test has checked.
    """
    _assert_agrees_with_fp32(
        trained_registry, "compiled channels_last + bf16", fast_path=True, compile=True
    )


def test_fast_path_stores_weights_in_bf16_with_bit_identical_answers(native_bf16: None) -> None:
    """Weights cast once at load give exactly what autocast's per-forward casts gave."""
    import copy

    from backend.service.predictor import _for_serving

    torch.manual_seed(0)
    model = ValveNet(len(CLASSES), arch="resnet18").eval().requires_grad_(False)
    for layer in model.modules():  # running statistics that are not the identity
        if isinstance(layer, nn.BatchNorm2d):
            layer.running_mean.uniform_(-0.1, 0.1)
            layer.running_var.uniform_(0.5, 1.5)
    reference = copy.deepcopy(model).to(memory_format=torch.channels_last)
    served = _for_serving(copy.deepcopy(model), fast_path=True, compile=False)
    convs = [m for m in served.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert convs and all(m.weight.dtype == torch.bfloat16 for m in convs)
    norms = [m for m in served.modules() if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d)]
    assert all(m.weight.dtype == torch.float32 for m in norms)
    x = torch.randn(3, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(reference(x).float(), served(x).float())


# --- the locate-then-classify design --------------------------------------------------------


class _LooksAtBrightness(nn.Module):
    """A network whose evidence is known: class 0's logit is the mean brightness, so its
    Grad-CAM map is the image itself and the peak is the brightest spot."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(conv.weight, 1.0)
        self.body = nn.Sequential(conv)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 4))
        with torch.no_grad():
            self.head[2].weight.copy_(torch.tensor([[1.0], [0.0], [0.0], [0.0]]))
            self.head[2].bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
        self.classes = tuple(CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_a_whole_image_version_answers_where_its_saliency_peaks(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a locator the Grad-CAM peak is the location, mapped back through the crop
    into the uploaded image's own pixels (a bright disc in a black margin)."""
    _publish(registry, "v1")
    monkeypatch.setattr(
        predictor_module, "load_fold_models", lambda *a, **k: [_LooksAtBrightness() for _ in "ab"]
    )
    canvas = np.zeros((70, 90), np.uint8)
    canvas[10:60, 20:80] = 40  # the "skull": what the preprocessing crops to
    yy, xx = np.mgrid[0:70, 0:90]
    canvas[(xx - 62) ** 2 + (yy - 22) ** 2 <= 16] = 250  # the "valve" at (62, 22)
    buf = io.BytesIO()
    Image.fromarray(canvas, mode="L").save(buf, format="PNG")
    with _predictor(registry, fast_path=False) as predictor:
        (result,) = predictor.predict([buf.getvalue()])
        with _predictor(registry, fast_path=False, locate=False) as quiet:
            (unlocated,) = quiet.predict([buf.getvalue()])
    assert isinstance(result, Prediction) and result.centre_px is not None
    assert result.centre_source == "saliency" and result.image_size_px == (90, 70)
    assert result.centre_px == pytest.approx((62, 22), abs=1.5)
    assert isinstance(unlocated, Prediction) and unlocated.centre_px is None


def test_a_locator_s_centre_is_answered_in_pixels_of_the_original_image(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The locator answers in fractions of the prepared (cropped, squished) square; the
    prediction carries the point in the uploaded image's own pixels."""
    from training.shared.locate_classify import LocateClassifyNet
    from training.shared.preprocess import prepare_image_with_box

    _publish_two_stage(registry, "v2c")
    where = torch.tensor([0.25, 0.75])
    monkeypatch.setattr(
        LocateClassifyNet, "locate", lambda self, x: where.expand(len(x), 2).to(x.dtype)
    )
    canvas = np.zeros((40, 60), np.uint8)
    canvas[10:30, 15:50] = (np.random.default_rng(3).random((20, 35)) * 200 + 55).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(canvas, mode="L").save(buf, format="PNG")
    with _predictor(registry, fast_path=False) as predictor:
        (result,) = predictor.predict([buf.getvalue()])
    assert isinstance(result, Prediction)
    _, (top, bottom, left, right) = prepare_image_with_box(
        load_image(buf.getvalue()), PreprocessParams(size_px=SIZE_PX)
    )
    assert (top, bottom, left, right) == (10, 30, 15, 50)
    assert result.centre_source == "locator" and result.image_size_px == (60, 40)
    assert result.centre_px == pytest.approx((15 + 0.25 * 35, 10 + 0.75 * 20), abs=1e-4)


def _publish_two_stage(
    registry: ModelRegistry,
    version: str,
    settings: tuple[tuple[str, tuple[str, ...]], ...] = (),
    read: dict[str, dict[str, float]] | None = None,
    native: bool | tuple[bool, bool] = False,
    precision: str | None = None,
) -> None:
    from dataclasses import replace

    from training.shared.locate_classify import LocateClassifyNet, TwoStageParams

    staging = registry.staging(version)
    params = TwoStageParams(
        backbone=TINY_ARCH,
        locator_px=16,
        crop_fraction=0.5,
        crop_px=16,
        settings=settings,
        reader_fraction=0.4,
        reader_px=16,
    )
    torch.manual_seed(5)
    for k in range(2):
        fold_native = native if isinstance(native, bool) else native[k]
        model = LocateClassifyNet(len(CLASSES), replace(params, reader_native=fold_native))
        save_checkpoint(model, staging / "weights" / f"fold_{k}.pt", classes=CLASSES)
    config = {
        "format": 1,
        "version": version,
        "classes": CLASSES,
        "preprocess": PreprocessParams(size_px=SIZE_PX).to_dict(),
        "temperature": 1.5,
        "arch": TINY_ARCH,
        "design": "locate_classify",
        "folds": [
            {"fold": k, "weights": f"weights/fold_{k}.pt", "precision": precision} for k in range(2)
        ],
    }
    (staging / "config.json").write_text(json.dumps(config))
    metrics = {"mean": {"f1_macro": 0.5}, "classes": CLASSES, "uncertainty": {}}
    if read is not None:
        metrics["settings"] = read
    (staging / "metrics.json").write_text(json.dumps(metrics))
    registry.publish(staging, version_id=version)


def test_folds_that_read_settings_differently_are_not_served(registry: ModelRegistry) -> None:
    """The version serves its folds' reading (scales, square or own pixels) from the first
    fold; folds that disagree (runs mixed by hand, or a run straddling an upgrade) would
    fail every request, so the version fails to load instead, with one line."""
    scale = ("1", "2", "3")
    _publish_two_stage(registry, "vmix", ((CLASSES[0], scale),), native=(False, True))
    with _predictor(registry) as predictor:
        assert predictor.version is None
        assert "fold networks read settings differently" in (predictor.load_error or "")


def test_a_locate_then_classify_version_is_served_like_any_other(
    registry: ModelRegistry, native_bf16: None
) -> None:
    """The cpu profile's two-stage network loads from its checkpoints alone and answers with
    the same ensemble rule; the fast path (channels_last, bf16) agrees with fp32."""
    _publish_two_stage(registry, "v2s")
    images = [_png(seed) for seed in range(6)]
    with _predictor(registry) as predictor:
        fast = predictor.predict(images)
    with _predictor(registry, fast_path=False) as predictor:
        exact = predictor.predict(images)
    assert all(isinstance(r, Prediction) for r in fast + exact)
    assert {r.model_version for r in fast} == {"v2s"}
    for a, b in zip(fast, exact, strict=True):
        assert sum(a.probs.values()) == pytest.approx(1.0, abs=1e-4)
        assert max(abs(a.probs[c] - b.probs[c]) for c in CLASSES) < 0.05


def test_a_version_is_served_in_the_precision_its_folds_were_trained_in(
    registry: ModelRegistry, native_bf16: None
) -> None:
    """On a bf16 CPU the fast path computes in bf16 only what was trained in bf16 (or did not
    record it); a version trained in fp32 (another machine) is served in fp32, weights
    included, and answers as the eager fp32 path does."""
    images = [_png(seed) for seed in range(4)]
    for version, precision, served_in in (
        ("vbf16", "bfloat16", "bfloat16"),
        ("vold", None, "bfloat16"),
        ("vfp32", "float32", None),
        ("vfp16", "float16", None),
    ):
        _publish_two_stage(registry, version, precision=precision)
        with _predictor(registry) as predictor:
            assert predictor.version == version
            assert predictor.info()["mixed_precision"] == served_in, version
            weights = {
                m.weight.dtype
                for model in predictor._state.models  # type: ignore[union-attr]
                for m in model.modules()
                if isinstance(m, nn.Conv2d)
            }
            assert weights == {torch.bfloat16 if served_in else torch.float32}, version
            fast = _probs(predictor.predict(images))
        with _predictor(registry, fast_path=False) as predictor:
            exact = _probs(predictor.predict(images))
        if served_in is None:
            np.testing.assert_allclose(fast, exact, atol=1e-5)


def test_a_version_that_reads_settings_answers_each_scale_and_ranks_by_both(
    registry: ModelRegistry,
) -> None:
    """Each scale's most probable setting and its probability (the members' mean softmax
    within the block), for the models the version read well out of fold; the score is the
    class score times the proposed model's setting probability, so an uncertain setting
    moves the X-ray up the review queue."""
    from backend.service.ranking import score

    scale = ("1", "2", "3")
    layout = ((CLASSES[0], scale), (CLASSES[1], scale))
    # Out of fold it read the first model's settings well, the second's no better than chance.
    read = {CLASSES[0]: {"n": 30, "exact": 0.8}, CLASSES[1]: {"n": 30, "exact": 0.3}}
    _publish_two_stage(registry, "vset", settings=layout, read=read)
    images = [_png(seed) for seed in range(4)]
    with _predictor(registry, fast_path=False, acquisition="least_confidence") as predictor:
        results = predictor.predict(images)
    for r in results:
        assert isinstance(r, Prediction) and set(r.settings) == {CLASSES[0]}
        value, probability = r.settings[CLASSES[0]]
        assert value in scale and 1 / 3 <= probability <= 1.0
        sure = probability if r.label == CLASSES[0] else 1.0
        assert r.setting == (r.settings.get(r.label))
        probs = np.array([[r.probs[c] for c in CLASSES]])
        assert r.score == pytest.approx(float(score("least_confidence", probs)[0]) * sure, abs=1e-4)


def test_without_the_gate_every_scale_is_answered(registry: ModelRegistry) -> None:
    """For measuring a reader (benchmarks), the version's own gate can be switched off."""
    scale = ("1", "2", "3")
    read = {CLASSES[0]: {"n": 30, "exact": 0.8}, CLASSES[1]: {"n": 30, "exact": 0.3}}
    _publish_two_stage(registry, "vall", ((CLASSES[0], scale), (CLASSES[1], scale)), read)
    with _predictor(registry, fast_path=False, gate_settings=False) as predictor:
        (result,) = predictor.predict([_png(1)])
    assert isinstance(result, Prediction) and set(result.settings) == set(CLASSES[:2])


def test_a_version_that_proposes_no_setting_reads_none(
    registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the gate proposes none of the version's settings, the reader never runs and no
    X-ray's own pixels are kept for it (a framed model's reading costs a template search per
    X-ray); where it proposes one, only that model's block is asked for."""
    from training.shared.locate_classify import LocateClassifyNet

    scale = ("1", "2", "3")
    layout = ((CLASSES[0], scale), (CLASSES[1], scale))
    asked: list[object] = []
    read = LocateClassifyNet.read

    def spy(self: LocateClassifyNet, *args: object, **kwargs: object) -> torch.Tensor:
        asked.append(kwargs.get("valves", args[3] if len(args) > 3 else None))
        return read(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(LocateClassifyNet, "read", spy)
    poor = {CLASSES[0]: {"n": 30, "exact": 0.3}, CLASSES[1]: {"n": 30, "exact": 0.3}}
    _publish_two_stage(registry, "vnone", layout, poor, native=True)
    with _predictor(registry, fast_path=False) as predictor:
        assert predictor._state is not None and predictor._state.source_px is None
        results = predictor.predict([_png(1), _png(2)])
    assert all(isinstance(r, Prediction) and r.settings == {} for r in results)
    assert asked == []
    good = {CLASSES[0]: {"n": 30, "exact": 0.8}, CLASSES[1]: {"n": 30, "exact": 0.3}}
    _publish_two_stage(registry, "vone", layout, good, native=True)
    with _predictor(registry, fast_path=False) as predictor:
        assert predictor._state is not None and predictor._state.source_px is not None
        (result,) = predictor.predict([_png(3)])
    assert isinstance(result, Prediction) and set(result.settings) == {CLASSES[0]}
    assert asked and all(valves == frozenset({CLASSES[0]}) for valves in asked)


def test_a_version_reading_at_the_xrays_own_pixels_reads_each_images_own_source(
    registry: ModelRegistry,
) -> None:
    """A ``reader_native`` version: the predictor keeps each X-ray's unsquished foreground and
    hands it to the reader beside its own image, so the served setting probabilities are the
    fold networks' readings of those sources (computed here by hand, image by image)."""
    from training.shared.inference import to_network_input
    from training.shared.preprocess import prepare_image_with_source

    scale = ("1", "2", "3")
    _publish_two_stage(registry, "vnat", ((CLASSES[0], scale),), native=True)
    rng = np.random.default_rng(7)
    images = []
    for height, width in ((40, 64), (72, 36), (50, 50)):  # landscape, portrait, square
        buf = io.BytesIO()
        pixels = (rng.random((height, width)) * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        images.append(buf.getvalue())
    with _predictor(registry, fast_path=False, gate_settings=False) as predictor:
        results = predictor.predict(images)
    folder = registry.version_path("vnat") / "weights"
    models = [load_checkpoint(folder / f"fold_{k}.pt").eval() for k in range(2)]
    params = PreprocessParams(size_px=SIZE_PX)
    source_px = models[0].params.source_px
    assert source_px == 40  # 16 px for 0.4 of the side
    for data, result in zip(images, results, strict=True):
        prepared, _, source = prepare_image_with_source(load_image(data), params, source_px)
        assert source is not None
        x = to_network_input(torch.from_numpy(prepared[None]), params, channels_last=False)
        with torch.no_grad():
            readings = [
                m.answer(x, None, [torch.from_numpy(source.astype(np.float16))]).setting_logits
                for m in models
            ]
        probs = np.mean([softmax(r.numpy())[0] for r in readings], axis=0)
        assert isinstance(result, Prediction)
        value, probability = result.settings[CLASSES[0]]
        assert value == scale[int(np.argmax(probs))]
        assert probability == pytest.approx(float(probs.max()), abs=1e-4)
