"""The setting reader at the X-ray's own pixels: its source, its crops, and what it reads.

The prepared square squishes each X-ray (the paper's preprocessing), which bends the angle of
a rotor relative to its valve and shrinks a clinical radiograph's marks ~3×. A version whose
recipe says ``reader_native`` crops the unsquished foreground instead (docs/TRAINING.md,
"The pressure setting"). These tests check the geometry on drawn shapes and the path from a
file to a reading.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from training.fitting.config import RecipeConfig
from training.shared.locate_classify import (
    LocateClassifyNet,
    TwoStageParams,
    crop_around,
    native_crops,
    principal_axis,
    upright_crop,
)
from training.shared.model import load_checkpoint, save_checkpoint
from training.shared.preprocess import (
    PreprocessParams,
    native_source,
    prepare_image_with_box,
    prepare_image_with_source,
    source_side_px,
    squish,
    to_prepared_fraction,
)


def _disc(height: int, width: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    image = np.full((height, width), 0.2, dtype=np.float32)
    image[np.hypot(xx - cx, yy - cy) <= r] = 0.9
    return image


def _extents(crop: torch.Tensor) -> tuple[int, int]:
    """(width, height) in pixels of the bright shape in a crop."""
    bright = crop.numpy() > 0.55
    return int(bright.any(0).sum()), int(bright.any(1).sum())


def test_a_window_with_the_aspect_is_square_on_the_xray() -> None:
    """A round valve on a landscape X-ray is an ellipse on the prepared square; the window
    that knows the X-ray's aspect shows it round again, at the same place."""
    height, width = 200, 300
    xray = _disc(height, width, cx=120, cy=90, r=20)
    square = torch.tensor(squish(xray, 128))[None]
    centre = torch.tensor([[120 / width, 90 / height]])
    squished = crop_around(square, centre, 0.3, 64)[0]
    w, h = _extents(squished)
    assert w < 0.8 * h  # 1.5 × narrower on the square
    unsquished = crop_around(square, centre, 0.3, 64, aspects=torch.tensor([width / height]))[0]
    w, h = _extents(unsquished)
    assert abs(w - h) <= 2, (w, h)
    # The window is fraction × the geometric mean of the sides: 0.3 × 245 px = 73 px on the
    # X-ray for a 40-px disc, so the disc fills 40 / 73 of the 64-px crop.
    assert abs(w - 64 * 40 / (0.3 * math.sqrt(height * width))) <= 2


def test_native_crops_read_each_source_at_the_prepared_squares_fractions() -> None:
    """Sources of any size and aspect: the crop is centred where the fraction says and
    square on that source; turned upright it lays a bar horizontal, as on the square."""
    sources, centres = [], []
    for height, width, (cx, cy) in ((200, 300, (120, 90)), (320, 160, (40, 250))):
        sources.append(torch.from_numpy(_disc(height, width, cx, cy, r=15)))
        centres.append([cx / width, cy / height])
    crops = native_crops(sources, torch.tensor(centres), 0.3, 64, upright=False, directed=False)
    assert crops.shape == (2, 64, 64)
    for crop in crops:
        w, h = _extents(crop)
        assert abs(w - h) <= 2
        rows, cols = np.nonzero(crop.numpy() > 0.55)
        assert abs(rows.mean() - 31.5) < 1.5 and abs(cols.mean() - 31.5) < 1.5
    # A bar at 30° on a portrait source comes out horizontal from an upright crop.
    height, width = 240, 160
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    a = math.radians(30)
    u = (xx - 80) * math.cos(a) + (yy - 120) * math.sin(a)
    v = -(xx - 80) * math.sin(a) + (yy - 120) * math.cos(a)
    bar = np.where((u / 30) ** 2 + (v / 6) ** 2 <= 1, 0.9, 0.2).astype(np.float32)
    centre = torch.tensor([[0.5, 0.5]])
    plain = native_crops([torch.from_numpy(bar)], centre, 0.4, 64, upright=False, directed=False)
    assert abs(math.degrees(float(principal_axis(plain)[0])) - 30) < 3
    turned = native_crops([torch.from_numpy(bar)], centre, 0.4, 64, upright=True, directed=False)
    assert abs(math.degrees(float(principal_axis(turned)[0]))) < 3
    with pytest.raises(ValueError, match="2 sources for 1 centres"):
        native_crops(sources, centre, 0.3, 64, upright=False, directed=False)


def _whole_source_crops(
    sources: list[torch.Tensor],
    centres: torch.Tensor,
    fraction: float,
    px: int,
    directed: bool | None,
) -> list[torch.Tensor]:
    """The reference: each crop cut from the whole source (what native_crops did before it
    cut only the part a crop can reach)."""
    out = []
    for source, centre in zip(sources, centres, strict=True):
        image = source.float()[None]
        aspect = torch.tensor([image.shape[-1] / image.shape[-2]])
        at = (image, centre[None], fraction, px)
        out.append(
            (
                upright_crop(*at, directed, aspect)
                if directed is not None
                else crop_around(*at, None, aspect)
            )[0]
        )
    return out


@pytest.mark.parametrize("upright", [False, True])
def test_native_crops_equal_crops_of_the_whole_source_wherever_the_centre_lies(
    upright: bool,
) -> None:
    """native_crops converts and samples only the part of a radiograph its window can reach
    at any angle; that must give the same pixels as the whole source, also where the window
    leaves the X-ray (centres on and beyond the edges, as jitter and a stray locator give)."""
    generator = torch.Generator().manual_seed(3)
    sources, centres = [], []
    for height, width in ((600, 900), (1000, 400), (257, 263), (40, 1200)):
        coarse = torch.rand(1, 1, height // 4 + 2, width // 4 + 2, generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0, 0]
        image[height // 3 : height // 2, width // 4 : width // 2] += 0.5  # a structure to turn
        # Turned upright only inside the X-ray: a window of border padding has no axis.
        inside = [[0.5, 0.5], [0.3, 0.8], [0.85, 0.37]]
        edges = [[0.0, 0.0], [1.0, 0.37], [0.3, 1.0], [-0.05, 0.6], [0.98, 1.04]]
        at_least = inside if upright else inside + edges
        sources += [image.clamp(0, 1).half()] * len(at_least)
        centres += at_least
    at = torch.tensor(centres)
    for fraction in (0.08, 0.3):
        got = native_crops(sources, at, fraction, 32, upright=upright, directed=upright)
        expected = _whole_source_crops(sources, at, fraction, 32, True if upright else None)
        for crop, reference in zip(got, expected, strict=True):
            if upright:  # the axes agree to ~1e-4 rad, which moves a crop a little
                assert torch.allclose(crop, reference, atol=2e-3)
            else:
                assert torch.allclose(crop, reference, atol=2e-4)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_suite.sh runs it)"
)
def test_on_cuda_the_reader_reads_sources_for_centres_from_the_cpu() -> None:
    """The out-of-fold pass hands the network its input on the GPU and centres from the CPU;
    the native crops must land on the network's device (they once stayed on the CPU, and
    every fold of a GPU run with setting scales died after training its reader)."""
    layout = (("a", ("1", "2")),)
    params = TwoStageParams(
        locator_px=64,
        crop_fraction=0.3,
        crop_px=48,
        reader_px=32,
        settings=layout,
        reader_native=True,
    )
    net = LocateClassifyNet(2, params).eval().cuda()
    x = torch.rand(2, 3, 96, 96, device="cuda")
    with torch.inference_mode():
        answer = net.answer(x, torch.tensor([[0.4, 0.6], [0.5, 0.5]]), [torch.rand(90, 120)] * 2)
    assert answer.setting_logits is not None
    assert answer.setting_logits.device.type == "cuda"


def test_the_source_is_the_foreground_at_its_own_pixels_and_capped_where_unused() -> None:
    params = PreprocessParams(size_px=64)
    image = np.zeros((300, 500), dtype=np.float32)
    image[40:260, 60:460] = 0.5  # the exposed field; black collimation around it
    image[100, 300] = 1.0  # a mark at (x, y) = (300.5, 100.5) of the file
    prepared, box, source = prepare_image_with_source(image, params, 1000)
    top, bottom, left, right = box
    assert source is not None and source.shape == (bottom - top, right - left)
    assert source[100 - top, 300 - left] == 1.0 and source.max() == 1.0
    expected, expected_box = prepare_image_with_box(image, params)
    assert box == expected_box and np.array_equal(prepared, expected)
    # The mark lies at the same fractions of the source as of the prepared square.
    fx, fy = to_prepared_fraction(300.5, 100.5, box)
    assert (fx * source.shape[1], fy * source.shape[0]) == pytest.approx((240.5, 60.5))
    assert prepare_image_with_source(image, params, None)[2] is None
    # Larger than the reader can use: shrunk to that geometric-mean side, aspect kept.
    big = native_source(np.random.default_rng(0).random((3000, 2000), dtype=np.float32), 1600)
    assert abs(math.sqrt(big.size) - 1600) < 2
    assert big.shape[1] / big.shape[0] == pytest.approx(2000 / 3000, abs=0.002)
    assert big.min() >= 0.0 and big.max() <= 1.0
    small = np.random.default_rng(1).random((500, 400), dtype=np.float32)
    assert np.array_equal(native_source(small, 1600), small)
    # The cpu profile's reader (128 px for 0.08 of the side) needs 1600.
    assert source_side_px(128, 0.08) == 1600


def test_a_native_version_keeps_its_design_and_asks_for_sources(tmp_path: Path) -> None:
    layout = (("a", ("1", "2", "3")),)
    geometry = {"locator_px": 64, "crop_fraction": 0.3, "crop_px": 48, "reader_px": 32}
    native = TwoStageParams(**geometry, settings=layout, reader_native=True, reader_upright=True)
    assert native.source_px == math.ceil(32 / 0.08)
    assert TwoStageParams(**geometry, settings=layout).source_px is None  # reads the square
    assert TwoStageParams(**geometry, reader_native=True).source_px is None  # reads nothing
    model = LocateClassifyNet(3, native).eval()
    x = torch.randn(2, 3, 96, 96)
    sources = [torch.rand(120, 80), torch.rand(70, 140)]
    with torch.no_grad():
        before = model.answer(x, sources=sources)
        with pytest.raises(ValueError, match="own pixels"):
            model.answer(x)
    assert before.setting_logits is not None and before.setting_logits.shape == (2, 3)
    path = tmp_path / "fold_0.pt"
    save_checkpoint(model, path, classes=["a", "b", "c"])
    loaded = load_checkpoint(path)
    assert isinstance(loaded, LocateClassifyNet) and loaded.params.reader_native
    with torch.no_grad():
        after = loaded.answer(x, sources=sources)
    assert torch.allclose(after.setting_logits, before.setting_logits, atol=1e-5)
    # Checkpoints from before it existed read the prepared square, as they were trained.
    fields = native.to_dict()
    fields.pop("reader_native")
    assert TwoStageParams(**fields).reader_native is False
    assert RecipeConfig.from_profile("cpu").reader_native


def test_the_reader_sees_its_source_normalised_as_the_square_is() -> None:
    """The network's input is normalised (the backbone's mean and std); sources are kept in
    [0, 1] and normalised where cropped, so a square source reads as the square does."""
    layout = (("a", ("1", "2")),)
    geometry = {"locator_px": 64, "crop_fraction": 0.3, "crop_px": 48, "reader_px": 32}
    on_square = TwoStageParams(**geometry, settings=layout)
    net = LocateClassifyNet(2, on_square).eval()
    prepared = torch.rand(2, 96, 96)
    params = PreprocessParams(size_px=96, mean=(0.5,) * 3, std=(0.5,) * 3)  # Lite0's
    from training.shared.preprocess import normalize_image

    x = normalize_image(prepared, params)
    centres = torch.tensor([[0.4, 0.6], [0.5, 0.5]])
    expected = net.reader_crop(x, centres)
    net.params = TwoStageParams(**geometry, settings=layout, reader_native=True)
    got = net.reader_crop(x, centres, list(prepared))
    assert torch.allclose(got, expected, atol=1e-4)


def test_the_recipe_keeps_sources_only_for_a_native_setting_reader() -> None:
    cpu = RecipeConfig.from_profile("cpu", design="locate_classify")
    assert cpu.reader_source_px(reads_settings=True) == 1600
    assert cpu.reader_source_px(reads_settings=False) is None
    assert cpu.with_overrides(reader_native=False).reader_source_px(True) is None
    assert cpu.with_overrides(reader_epochs=0).reader_source_px(True) is None
    assert cpu.with_overrides(design="whole_image").reader_source_px(True) is None


@pytest.mark.slow
def test_a_run_keeps_each_xrays_source_and_its_version_reads_them(tmp_path: Path) -> None:
    """The whole path on synthetic DICOM files: a locate-then-classify run with setting
    scales caches each X-ray's source beside its prepared square, its folds' readers read
    them (in and out of fold), and the published version reads a new X-ray's own."""
    from backend.service.predictor import Prediction, Predictor
    from training.fitting.run import run_in_process
    from training.shared.dataset import load_manifest
    from training.shared.labels import load_label_config
    from training.shared.registry import ModelRegistry
    from training.synthetic import VALVE_CLASSES, generate_dataset

    root = Path(__file__).resolve().parents[2]
    data = tmp_path / "data"
    mix = {c: 1.0 for c in VALVE_CLASSES}
    generate_dataset(data, 16, seed=3, class_mix=mix, size_range_px=(192, 256), workers=1)
    label_config = load_label_config(root / "label_config.xml")
    recipe = RecipeConfig.from_profile(
        "cpu",
        design="locate_classify",
        image_size_px=192,
        locator_px=96,
        locator_epochs=2,
        crop_fraction=0.25,
        crop_px=48,
        epochs=1,
        reader_epochs=1,
        reader_fraction=0.2,
        reader_px=32,
        n_folds=2,
        gradcam_per_class=0,
    )
    registry = ModelRegistry(tmp_path / "models")
    staging = registry.staging("native")
    cache = tmp_path / "cache"
    items = load_manifest(data, label_config.classes)
    run_in_process(
        staging, items, label_config, recipe, source="t", cache_dir=cache, run_id="native"
    )
    assert len(list(cache.rglob("*.source160.npy"))) == len(items)  # 32 px / 0.2
    fold = load_checkpoint(staging / "weights" / "fold_0.pt")
    assert isinstance(fold, LocateClassifyNet) and fold.params.reader_native
    assert fold.params.source_px == 160 and fold.params.settings
    registry.publish(staging, version_id="native")
    image = Path(items[0].path).read_bytes()
    with Predictor(registry.root, device="cpu", gate_settings=False) as predictor:
        (result,) = predictor.predict([image])
    assert isinstance(result, Prediction)
    assert set(result.settings) == {valve for valve, _ in fold.params.settings}
