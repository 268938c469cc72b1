"""Manifests, and the decode-once cache of prepared images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.shared import dataset
from training.shared.dataset import CachedSources, LabelledImage, load_manifest, prepare_images
from training.shared.errors import DatasetError
from training.shared.preprocess import PreprocessParams


def _png(path: Path, value: int = 200) -> Path:
    img = np.zeros((40, 60), dtype=np.uint8)
    img[10:30, 10:50] = value
    Image.fromarray(img).save(path)
    return path


def _manifest(folder: Path, rows: list[str], header: str = "file,label,patient_id") -> Path:
    path = folder / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_manifest_rows_become_items_with_absolute_paths(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _manifest(tmp_path, ["a.png,Codman Hakim,P1", "a.png,proGAV 2.0,P2"])
    items = load_manifest(tmp_path, classes=["Codman Hakim", "proGAV 2.0"])
    assert [(i.label, i.group, i.key) for i in items] == [
        ("Codman Hakim", "P1", "a.png"),
        ("proGAV 2.0", "P2", "a.png"),
    ]
    assert Path(items[0].path).is_absolute() and Path(items[0].path).is_file()


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([], "file,label,patient_id", "no rows"),
        (["a.png,Codman Hakim"], "file,label", "patient_id"),
        (["a.png,,P1"], "file,label,patient_id", "must all be set"),
        (["a.png,Codman Hakimm,P1"], "file,label,patient_id", "Codman Hakimm"),
    ],
)
def test_bad_manifests_are_refused_with_the_reason(
    tmp_path: Path, rows: list[str], header: str, message: str
) -> None:
    _manifest(tmp_path, rows, header)
    with pytest.raises(DatasetError, match=message):
        load_manifest(tmp_path, classes=["Codman Hakim"])


def test_missing_manifest_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no manifest"):
        load_manifest(tmp_path)


def test_images_are_decoded_once_and_a_corrupt_one_fails_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = LabelledImage(str(_png(tmp_path / "good.png")), "Codman Hakim", "P1", "good")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    bad = LabelledImage(str(tmp_path / "bad.png"), "Codman Hakim", "P2", "bad")
    gone = LabelledImage(str(tmp_path / "missing.png"), "Codman Hakim", "P3", "gone")
    params = PreprocessParams(size_px=16)
    cache = tmp_path / "cache"

    first = prepare_images([good, bad, gone], params, cache)
    assert [i.key for i in first.items] == ["good"]
    assert set(first.failures) == {"bad", "gone"}
    assert first.arrays.shape == (1, 16, 16) and first.arrays.dtype == np.float16

    import training.shared.dicom

    def no_decoding(*_args: object, **_kwargs: object) -> np.ndarray:
        raise AssertionError("a cached image must not be decoded again")

    monkeypatch.setattr(training.shared.dicom, "load_image", no_decoding)
    second = prepare_images([good], params, cache)
    np.testing.assert_array_equal(second.arrays, first.arrays)
    assert second.hashes == first.hashes == [dataset.content_hash(good.path)]

    # Other preprocessing parameters are another cache entry, never a stale hit.
    with pytest.raises(AssertionError, match="decoded again"):
        prepare_images([good], PreprocessParams(size_px=24), cache)


def test_worker_processes_prepare_the_same_arrays_and_fail_the_same_files(
    tmp_path: Path,
) -> None:
    """Decoding in two spawned processes gives what one process gives, and a corrupt or
    missing file still fails alone, with its reason (it crosses the process boundary)."""
    pngs = [_png(tmp_path / f"{k}.png", 40 * k + 20) for k in range(5)]
    items = [LabelledImage(str(p), "Codman Hakim", f"P{k}", str(k)) for k, p in enumerate(pngs)]
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    items.insert(2, LabelledImage(str(tmp_path / "bad.png"), "Codman Hakim", "Pb", "bad"))
    items.append(LabelledImage(str(tmp_path / "missing.png"), "Codman Hakim", "Pm", "gone"))
    params = PreprocessParams(size_px=16)

    one = prepare_images(items, params, workers=1)
    two = prepare_images(items, params, tmp_path / "cache", workers=2)
    assert [i.key for i in two.items] == [i.key for i in one.items] == ["0", "1", "2", "3", "4"]
    np.testing.assert_array_equal(two.arrays, one.arrays)
    assert two.hashes == one.hashes
    assert two.failures == one.failures and set(two.failures) == {"bad", "gone"}
    assert two.failures["gone"].startswith("cannot read file")


# ------------------------------------------------------------------------------ valve centres


def test_manifest_valve_centre_columns_are_optional_pixels(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _manifest(
        tmp_path,
        ["a.png,Codman Hakim,P1,12.5,30", "a.png,Codman Hakim,P2,,", "a.png,Codman Hakim,P3, 7 ,8"],
        header="file,label,patient_id,valve_x,valve_y",
    )
    items = load_manifest(tmp_path, classes=["Codman Hakim"])
    assert [i.valve_xy for i in items] == [(12.5, 30.0), None, (7.0, 8.0)]
    _manifest(tmp_path, ["a.png,Codman Hakim,P1"])  # no such columns at all
    assert load_manifest(tmp_path)[0].valve_xy is None


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("a.png,Codman Hakim,P2,12px,30", r"manifest\.csv:3: valve_x/valve_y must be numbers"),
        ("a.png,Codman Hakim,P2,12,", r"manifest\.csv:3: valve_x and valve_y must be set together"),
        ("a.png,Codman Hakim,P2,nan,3", r"manifest\.csv:3: valve_x/valve_y must be finite"),
    ],
)
def test_a_bad_valve_centre_names_the_file_and_line(tmp_path: Path, row: str, message: str) -> None:
    _png(tmp_path / "a.png")
    _manifest(
        tmp_path, ["a.png,Codman Hakim,P1,1,2", row], header="file,label,patient_id,valve_x,valve_y"
    )
    with pytest.raises(DatasetError, match=message):
        load_manifest(tmp_path)


def test_labelled_image_travels_as_json_with_its_centre() -> None:
    import json

    with_centre = LabelledImage("/x/a.png", "Codman Hakim", "P1", "a", valve_xy=(3, 4.5))
    assert with_centre.valve_xy == (3.0, 4.5)
    as_json = json.loads(json.dumps(with_centre.to_dict()))
    assert as_json["valve_xy"] == [3.0, 4.5]
    assert LabelledImage.from_dict(as_json) == with_centre
    plain = LabelledImage("/x/b.png", "Codman Hakim", "P1", "b")
    assert plain.to_dict()["valve_xy"] is None
    assert LabelledImage.from_dict(json.loads(json.dumps(plain.to_dict()))) == plain
    old = {"path": "/x/b.png", "label": "Codman Hakim", "group": "P1", "key": "b"}
    assert LabelledImage.from_dict(old) == plain  # written before centres existed
    with pytest.raises(ValueError, match="finite"):
        LabelledImage("/x/a.png", "Codman Hakim", "P1", "a", valve_xy=(float("nan"), 1.0))


def test_manifest_valve_setting_column_is_optional(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _manifest(
        tmp_path,
        ["a.png,Codman Hakim,P1,120", "a.png,Codman Hakim,P2,", "a.png,Codman Hakim,P3, 30 "],
        header="file,label,patient_id,valve_setting",
    )
    items = load_manifest(tmp_path, classes=["Codman Hakim"])
    assert [i.setting for i in items] == ["120", None, "30"]
    _manifest(tmp_path, ["a.png,Codman Hakim,P1"])  # no such column at all
    assert load_manifest(tmp_path)[0].setting is None


def test_labelled_image_travels_as_json_with_its_setting() -> None:
    import json

    item = LabelledImage("/x/a.png", "Codman Hakim", "P1", "a", setting="120")
    as_json = json.loads(json.dumps(item.to_dict()))
    assert as_json["setting"] == "120"
    assert LabelledImage.from_dict(as_json) == item
    plain = LabelledImage("/x/b.png", "Codman Hakim", "P1", "b")
    assert plain.setting is None and plain.to_dict()["setting"] is None
    old = {"path": "/x/b.png", "label": "Codman Hakim", "group": "P1", "key": "b"}
    assert LabelledImage.from_dict(old) == plain  # written before settings existed


def _items_with_centres(tmp_path: Path) -> list[LabelledImage]:
    # _png: 40 x 60, foreground rows 10..30, columns 10..50 (the crop).
    path = str(_png(tmp_path / "a.png"))
    other = str(_png(tmp_path / "b.png", value=120))
    return [
        LabelledImage(path, "Codman Hakim", "P1", "mid", valve_xy=(30.0, 20.0)),
        LabelledImage(other, "Codman Hakim", "P2", "unknown"),
        LabelledImage(path, "Codman Hakim", "P3", "corner", valve_xy=(10.0, 25.0)),
        LabelledImage(path, "Codman Hakim", "P4", "outside", valve_xy=(59.0, 2.0)),
    ]


def test_centres_are_fractions_of_the_prepared_square_nan_when_unknown(tmp_path: Path) -> None:
    items = _items_with_centres(tmp_path)
    for cache in (None, tmp_path / "cache"):
        prepared = prepare_images(items, PreprocessParams(size_px=16), cache)
        assert prepared.centres.shape == (4, 2) and prepared.centres.dtype == np.float32
        np.testing.assert_allclose(prepared.centres[0], [0.5, 0.5])
        assert np.isnan(prepared.centres[1]).all()
        np.testing.assert_allclose(prepared.centres[2], [0.0, 0.75])
        np.testing.assert_allclose(prepared.centres[3], [1.0, 0.0])  # clipped to the crop


def test_centres_follow_the_kept_items_when_one_fails(tmp_path: Path) -> None:
    good = LabelledImage(str(_png(tmp_path / "g.png")), "Codman Hakim", "P1", "g", (30.0, 20.0))
    gone = LabelledImage(str(tmp_path / "missing.png"), "Codman Hakim", "P2", "x", (1.0, 1.0))
    prepared = prepare_images([gone, good], PreprocessParams(size_px=16))
    assert [i.key for i in prepared.items] == ["g"]
    np.testing.assert_allclose(prepared.centres, [[0.5, 0.5]])
    empty = prepare_images([gone], PreprocessParams(size_px=16))
    assert empty.centres.shape == (0, 2)


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files decoded from now on, in order."""
    import training.shared.dicom

    decodes: list[str] = []
    real = training.shared.dicom.load_image

    def counting(path: object, *args: object, **kwargs: object) -> np.ndarray:
        decodes.append(Path(str(path)).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(training.shared.dicom, "load_image", counting)
    return decodes


def test_the_crop_is_cached_beside_the_array_and_old_entries_still_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    items = _items_with_centres(tmp_path)
    params = PreprocessParams(size_px=16)
    cache = tmp_path / "cache"
    first = prepare_images(items, params, cache)
    boxes = sorted(cache.rglob("*.box.json"))
    assert len(boxes) == 2 and len(sorted(cache.rglob("*.npy"))) == 2
    digest = dataset.content_hash(items[0].path)
    entry = json.loads((next(cache.rglob(f"{digest}.box.json"))).read_text())
    assert entry == {"box": [10, 30, 10, 50], "shape": [40, 60]}

    # An entry written before crops were cached (no box.json): an item without a centre
    # never needs it, an item with one decodes once to get it, then never again.
    for box in boxes:
        box.unlink()
    decodes = _count_decodes(monkeypatch)
    without = prepare_images([items[1]], params, cache)
    assert decodes == [] and np.isnan(without.centres).all()
    again = prepare_images(items, params, cache)
    assert decodes == ["a.png"]
    np.testing.assert_array_equal(again.arrays, first.arrays)
    np.testing.assert_array_equal(again.centres, first.centres)
    prepare_images(items, params, cache)
    assert decodes == ["a.png"]

    # A damaged box file counts as missing.
    next(cache.rglob(f"{digest}.box.json")).write_text("{not json")
    np.testing.assert_array_equal(prepare_images(items, params, cache).centres, first.centres)
    assert decodes == ["a.png", "a.png"]


def test_a_new_cache_version_decodes_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arrays cached by older decoding or preparing code are not reused after it changed."""
    items = _items_with_centres(tmp_path)
    params, cache = PreprocessParams(size_px=16), tmp_path / "cache"
    prepare_images(items, params, cache)
    decodes = _count_decodes(monkeypatch)
    prepare_images(items, params, cache)
    assert decodes == []
    monkeypatch.setattr(dataset, "CACHE_VERSION", dataset.CACHE_VERSION + 1)
    prepare_images(items, params, cache)
    assert set(decodes) == {"a.png", "b.png"}


def test_prepared_images_without_centres_given_are_all_unknown() -> None:
    prepared = dataset.PreparedImages(
        items=[LabelledImage("/a.png", "Codman Hakim", "P1", "a")],
        arrays=np.zeros((1, 8, 8), np.float16),
        hashes=["0" * 64],
        failures={},
    )
    assert prepared.centres.shape == (1, 2) and np.isnan(prepared.centres).all()


def test_synthetic_manifest_centres_reach_the_prepared_square(tmp_path: Path) -> None:
    from training.shared.dicom import load_image
    from training.shared.preprocess import foreground_box, scale_to_unit_range
    from training.synthetic import generate_dataset

    manifest = generate_dataset(tmp_path / "demo", 3, seed=5, size_range_px=(96, 128))
    items = load_manifest(manifest)
    assert all(item.valve_xy is not None for item in items)
    params = PreprocessParams(size_px=32)
    prepared = prepare_images(items, params, tmp_path / "cache")
    for item, centre in zip(prepared.items, prepared.centres, strict=True):
        unit = scale_to_unit_range(load_image(item.path))
        top, bottom, left, right = foreground_box(
            unit, params.background_threshold, params.min_foreground_fraction
        )
        x, y = item.valve_xy
        expected = ((x - left) / (right - left), (y - top) / (bottom - top))
        np.testing.assert_allclose(centre, np.clip(expected, 0, 1), rtol=1e-6)
        assert centre.min() >= 0.0 and centre.max() <= 1.0


def test_sources_are_kept_only_when_asked_cached_beside_and_follow_the_kept_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run whose setting reader reads at the X-ray's own pixels asks for each image's
    unsquished foreground; it is cached beside the array, and an entry cached before (or
    for another side) is decoded once more to get it."""

    items = _items_with_centres(tmp_path)
    gone = LabelledImage(str(tmp_path / "missing.png"), "Codman Hakim", "P9", "gone")
    params = PreprocessParams(size_px=16)
    cache = tmp_path / "cache"
    plain = prepare_images(items, params, cache)
    assert plain.sources is None and not list(cache.rglob("*.source*.npy"))
    decodes = _count_decodes(monkeypatch)
    with_sources = prepare_images([gone, *items], params, cache, source_px=1000)
    assert set(decodes) == {"a.png", "b.png"}  # once per file, for its source
    assert [i.key for i in with_sources.items] == [i.key for i in items]
    assert with_sources.sources is not None and len(with_sources.sources) == 4
    # With a cache folder the sources stay there (a radiograph's is megabytes), read on use.
    assert isinstance(with_sources.sources, CachedSources)
    assert all(isinstance(s, np.memmap) for s in with_sources.sources)
    # _png: the foreground is rows 10..30, columns 10..50, at its own 20 x 40 pixels.
    assert all(s.shape == (20, 40) and s.dtype == np.float16 for s in with_sources.sources)
    assert float(with_sources.sources[0].max()) == 1.0
    np.testing.assert_array_equal(with_sources.arrays, plain.arrays)
    again = prepare_images(items, params, cache, source_px=1000)
    assert set(decodes) == {"a.png", "b.png"}  # cached now
    for got, kept in zip(again.sources or [], with_sources.sources, strict=True):
        np.testing.assert_array_equal(got, kept)
    shrunk = prepare_images(items[:1], params, cache, source_px=10)  # another side
    assert shrunk.sources is not None and shrunk.sources[0].shape == (7, 14)
    assert len(decodes) == 3
