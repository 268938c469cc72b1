"""The benchmark scripts run: each in its ``--quick`` mode, which proves the code, not speed.

No timing is asserted (benchmarks are not timed tests; see ``benchmarks/__init__.py``). Each
benchmark runs in-process through its ``main`` (the backends and re-scoring scales it starts
are subprocesses anyway), writes its tables as Markdown, and the test checks that the tables
came out with rows in them.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from benchmarks.run_all import BENCHMARKS

pytestmark = pytest.mark.slow

EXPECTED_TITLES = {
    "predict": [
        "/predict throughput",
        "Serving speed by backbone",
        "Served fast path vs eager fp32 on trained models",
    ],
    "latency": ["Single-task /predict latency", "Single-task latency by backbone"],
    "cache": ["Cache: unchanged tasks vs first time"],
    "rescore": ["Re-scoring:", "Re-scoring: does it scale?"],
    "training": ["Training throughput on CPU"],
    "memory": ["Backend RSS (MiB)"],
    "precision": ["bf16 autocast vs fp32 on this CPU"],
    "reader_frames": ["Reading the setting in each model's own frame"],
    "paper_profile": ["Paper profile on", "What it learnt: out-of-fold over"],
    "learning": ["Learning curves (macro-F1 on the held-out split)"],
    "heldout": ["Held-out synthetic X-rays", "The same version, each crop averaged"],
    "setting_reader": ["Setting reader alone (true centres)"],
}
NOT_IN_RUN_ALL = ("paper_profile", "learning", "heldout", "setting_reader")
"""Benchmarks ``run_all`` leaves out: paper_profile needs a GPU, learning runs for hours,
heldout trains a whole version (about 20 minutes on 2 cores), setting_reader sixteen readers
(about 75 minutes on 2 cores)."""


@pytest.mark.parametrize("name", [*BENCHMARKS, *NOT_IN_RUN_ALL])
def test_benchmark_runs_in_quick_mode(name: str, tmp_path: Path) -> None:
    module = importlib.import_module(f"benchmarks.bench_{name}")
    markdown = tmp_path / "results.md"
    extra = ["--compare-test-views", "1", "2"] if name == "heldout" else []
    assert module.main(["--quick", "--markdown", str(markdown), *extra]) == 0
    text = markdown.read_text(encoding="utf-8")
    for title in EXPECTED_TITLES[name]:
        assert f"**{title}" in text, f"{title!r} missing from:\n{text}"
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) > len(EXPECTED_TITLES[name]), "tables without data rows"
    if name == "learning":  # its results file lands beside the Markdown
        import json

        results = json.loads(markdown.with_suffix(".learning.json").read_text(encoding="utf-8"))
        assert results["records"] and all("f1_macro" in r for r in results["records"])
        # fp32 and bf16 runs learn differently (docs/TRAINING.md#precision): never unlabelled.
        assert {r["precision"] for r in results["records"]} <= {"float32", "bfloat16", "float16"}


def test_run_all_refuses_an_unknown_benchmark() -> None:
    from benchmarks import run_all

    with pytest.raises(SystemExit) as exc:
        run_all.main(["--only", "no-such-benchmark"])
    assert exc.value.code == 2


def test_the_paper_profile_refuses_to_run_without_a_gpu_unless_asked(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal only applies without one")
    from benchmarks import bench_paper_profile

    with pytest.raises(SystemExit, match="no CUDA device"):
        bench_paper_profile.run(bench_paper_profile.PaperProfileOptions(), tmp_path)


def test_the_paper_profile_resumes_from_the_stages_a_stopped_call_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call stopped in fold 1 (a device session's time limit) leaves the plan and fold 0;
    the next call with the same --workdir trains only fold 1 and finalises."""
    from dataclasses import replace

    from benchmarks import bench_paper_profile
    from training.fitting import run as run_module

    real_fold = run_module.train_fold_stage
    trained: list[int] = []
    planned: list[bool] = []
    real_plan = run_module.plan_run

    def fold(run_dir: Path, k: int, **kwargs: object) -> dict:
        if k == 1 and -1 not in trained:
            trained.append(-1)  # the first attempt at fold 1 is stopped
            raise KeyboardInterrupt
        trained.append(k)
        return real_fold(run_dir, k, **kwargs)  # type: ignore[arg-type]

    def plan(*args: object, **kwargs: object) -> dict:
        planned.append(True)
        return real_plan(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(run_module, "train_fold_stage", fold)
    monkeypatch.setattr(run_module, "plan_run", plan)
    options = replace(bench_paper_profile.QUICK, resumable=True, keep_dir=tmp_path / "kept")
    with pytest.raises(KeyboardInterrupt):
        bench_paper_profile.run(options, tmp_path / "work")
    assert trained == [0, -1] and planned == [True]

    tables = bench_paper_profile.run(options, tmp_path / "work")
    assert trained == [0, -1, 1], "fold 0 was trained again, or fold 1 not at all"
    assert planned == [True], "the plan stage ran again"
    stages = [row[0] for row in tables[0].rows]
    assert stages[:3] == ["plan (decode + cache every image once)", "fold 0", "fold 1"]
    assert (tmp_path / "kept" / "metrics.json").is_file()
    assert not (tmp_path / "work" / "stages-quick.json").exists(), "a finished run resumes"


def test_the_view_pooled_reader_reads_every_upright_view_alike() -> None:
    """The benchmark's ``upright pooled`` reader is invariant to the view its crop arrives in
    by construction; the same network read plainly is not (so the check can fail)."""
    import torch

    from benchmarks.bench_setting_reader import view_pooled
    from training.shared.locate_classify import UPRIGHT_VIEWS, dihedral
    from training.shared.model import ValveNet

    torch.manual_seed(0)
    reader = ValveNet(3, arch="resnet18").eval()
    pooled = view_pooled(reader, UPRIGHT_VIEWS).eval()
    crops = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        reference = pooled(crops)
        for k in UPRIGHT_VIEWS:
            assert torch.allclose(pooled(dihedral(crops, k)), reference, atol=1e-4), k
        assert not torch.allclose(reader(dihedral(crops, 4)), reader(crops), atol=1e-4)
    assert {n for n, _ in pooled.named_parameters()} == {
        f"reader.{n}" for n, _ in reader.named_parameters()
    }


def test_the_setting_readers_soft_targets_spread_over_neighbouring_settings() -> None:
    """``--label-sigma``: each row a distribution peaked at its own setting, neighbours alike
    on both sides, the scale's ends not neighbours (no wrap); sigma 0 is one-hot, as versions
    train, so the benchmark's default loss is the plain cross-entropy."""
    import numpy as np

    from benchmarks.bench_setting_reader import soft_targets

    soft = soft_targets(6, 1.0)
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-6)
    assert soft[2, 1] == pytest.approx(soft[2, 3])
    assert soft[2, 2] > soft[2, 1] > soft[2, 0] > 0
    assert soft[0, 5] < soft[0, 1]
    np.testing.assert_array_equal(soft_targets(6, 0.0), np.eye(6))


def test_the_setting_reader_refuses_seeds_whose_test_x_rays_another_trains_on() -> None:
    """A seed's test X-rays are drawn with seed + 1: seeds 0 and 1 would test one reader on
    the other's training X-rays, and the mean over seeds would flatter both."""
    from benchmarks.bench_setting_reader import ReaderOptions

    with pytest.raises(ValueError, match="at least 2 apart"):
        ReaderOptions(seeds=(0, 1))
    assert ReaderOptions(seeds=(0, 10, 20)).seeds == (0, 10, 20)


def test_the_setting_reader_compares_frames_without_training(tmp_path: Path) -> None:
    """``--frames-only``: per valve model a row for the principal axis, the template and the
    scaled template (its search alone; zoom by it, the rest by a template of the reader's
    window; and as versions find it, the face by a face template too), the templates' face
    share a
    number (they search the mirror), the axis's left open, the zoom's error only where it
    is searched, every frame's share turned end for end."""
    from benchmarks.bench_setting_reader import main

    markdown = tmp_path / "frames.md"
    out = tmp_path / "frames.json"
    assert main(["--quick", "--frames-only", "--markdown", str(markdown), "--json", str(out)]) == 0
    assert "**The reader's frame against the generator's" in markdown.read_text(encoding="utf-8")
    import json

    (run,) = json.loads(out.read_text(encoding="utf-8"))["models"]["Sophysa Sophy SM8"]
    assert "face_consistent" not in run["principal axis"]
    assert 0.5 <= run["template"]["face_consistent"] <= 1.0
    assert "scale_error_median" not in run["template"]
    zoom = run["scaled template"]
    assert 0.0 <= zoom["scale_error_median"] <= zoom["scale_error_p90"]
    window = run["zoom by the scaled template, the rest by the window's (2026-12-07)"]
    versions = run["versions: the same, the face by the face template"]
    assert versions["axis_error_deg_median"] == window["axis_error_deg_median"]  # face alone
    assert 0.0 <= versions["scale_error_median"] <= versions["scale_error_p90"]
    assert 0.5 <= versions["face_consistent"] <= 1.0
    assert len(run) == 6  # the seed and five frames
    for name, frame in run.items():
        if name == "seed":
            continue
        assert 0.0 <= frame["axis_error_deg_median"] <= frame["axis_error_deg_p90"] <= 180.0
        assert 0.0 <= frame["end_turned"] <= 1.0


@pytest.mark.parametrize("mode", ["template scaled native", "true zoomed native"])
def test_the_setting_reader_reads_where_the_setting_shows(tmp_path: Path, mode: str) -> None:
    """``template scaled native`` and its ceiling ``true zoomed native``: the reader trains on
    crops of the region the training settings say is the rotor, and the JSON says where that
    region is and how far each frame is off (the generator's own: not at all)."""
    import json

    from benchmarks.bench_setting_reader import main

    out = tmp_path / "scaled.json"
    assert main(["--quick", "--modes", mode, "--json", str(out)]) == 0
    model = json.loads(out.read_text(encoding="utf-8"))["models"]["Sophysa Sophy SM8"]
    (run,) = model[mode]["runs"]
    region = run["frame"]["setting_region"]
    assert -1.0 <= region["x"] <= 1.0 and 0.0 < region["half"] <= 1.5
    for name in ("train", "test"):
        frame = run["frame"][name]
        assert 0.0 <= frame["scale_error_median"] <= frame["scale_error_p90"]
        if mode == "true zoomed native":
            assert frame["axis_error_deg_median"] < 0.01 and frame["scale_error_p90"] < 1e-4
    assert 0.0 <= run["exact"] <= run["within_one"] <= 1.0


def test_heldout_passes_the_crop_and_size_it_is_asked_for(tmp_path: Path) -> None:
    """``--reader-principal-axis`` and ``--size-range`` reach the recipe and the drawing, and
    the result says per model how many folds read it in its own frame (the quick run reads
    no setting, so that is empty here; tests/training/test_reader_frames.py checks frames)."""
    import json

    from benchmarks.bench_heldout import main

    out = tmp_path / "heldout.json"
    argv = ["--quick", "--reader-principal-axis", "--size-range", "200", "240", "--json", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["options"]["overrides"]["reader_template"] is False
    assert result["options"]["size_range_px"] == [200, 240]
    assert isinstance(result["framed_folds"], dict)
