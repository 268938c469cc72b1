"""Manifests, and the decode-once cache of prepared images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import dataset
from training.dataset import LabelledImage, load_manifest, prepare_images
from training.errors import DatasetError
from training.preprocess import PreprocessParams


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

    import training.dicom

    def no_decoding(*_args: object, **_kwargs: object) -> np.ndarray:
        raise AssertionError("a cached image must not be decoded again")

    monkeypatch.setattr(training.dicom, "load_image", no_decoding)
    second = prepare_images([good], params, cache)
    np.testing.assert_array_equal(second.arrays, first.arrays)
    assert second.hashes == first.hashes == [dataset.content_hash(good.path)]

    # Other preprocessing parameters are another cache entry, never a stale hit.
    with pytest.raises(AssertionError, match="decoded again"):
        prepare_images([good], PreprocessParams(size_px=24), cache)
