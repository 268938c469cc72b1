"""Labelled images for a training run, and the decode-once cache of their network inputs.

A run trains on a *snapshot*: the list of :class:`LabelledImage` taken when it starts (from a
folder + ``manifest.csv`` such as the demo data set, or a Label Studio export). Every image is
decoded and prepared once (:func:`training.shared.preprocess.prepare_image`) and kept in a cache
keyed by the file's content hash and the preprocessing parameters, so epochs, folds and later
runs never decode DICOM again. Beside each cached array sits the foreground crop it was made
with (``<hash>.box.json``), so a known valve centre maps into the prepared square without
decoding again (:attr:`PreparedImages.centres`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from training.shared.errors import DatasetError, ImageDecodeError
from training.shared.parallel import ordered_map
from training.shared.preprocess import (
    PreprocessParams,
    prepare_image_with_source,
    to_prepared_fraction,
)

__all__ = [
    "MANIFEST_NAME",
    "CachedSources",
    "LabelledImage",
    "PreparedImages",
    "content_hash",
    "load_manifest",
    "prepare_images",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
"""File name of a data set's manifest inside its folder."""
_REQUIRED_COLUMNS = ("file", "label", "patient_id")
_CENTRE_COLUMNS = ("valve_x", "valve_y")
"""Optional manifest columns: the valve centre in pixels of the image file (x = column)."""
_SETTING_COLUMN = "valve_setting"
"""Optional manifest column: the valve's pressure setting, a value of its model's scale."""
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class LabelledImage:
    """One labelled X-ray of a training snapshot."""

    path: str
    """Absolute path of the image file (DICOM, PNG or JPEG)."""
    label: str
    """Class name, as in the label config."""
    group: str
    """Patient (pseudonymous) id: images of one patient never sit in two folds."""
    key: str
    """Stable id of the item (Label Studio task id, or the manifest's file entry)."""
    valve_xy: tuple[float, float] | None = None
    """Valve centre ``(x, y)`` in pixels of the image file (x = column, y = row, origin
    top-left, continuous: pixel column ``i`` spans ``[i, i + 1)``); None when unknown."""
    setting: str | None = None
    """The valve's pressure setting, a value of its model's scale
    (:meth:`~training.shared.labels.LabelConfig.setting_scale`); None when unknown."""

    def __post_init__(self) -> None:
        if self.valve_xy is not None:
            x, y = (float(v) for v in self.valve_xy)
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError(f"valve_xy must be finite, got {self.valve_xy!r}")
            object.__setattr__(self, "valve_xy", (x, y))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``valve_xy`` is ``[x, y]`` or None, ``setting`` a string or None."""
        return {
            "path": self.path,
            "label": self.label,
            "group": self.group,
            "key": self.key,
            "valve_xy": None if self.valve_xy is None else list(self.valve_xy),
            "setting": self.setting,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelledImage:
        """Rebuild from :meth:`to_dict` output (a missing ``valve_xy`` or ``setting`` is None)."""
        xy = data.get("valve_xy")
        setting = data.get("setting")
        return cls(
            path=str(data["path"]),
            label=str(data["label"]),
            group=str(data["group"]),
            key=str(data["key"]),
            valve_xy=None if xy is None else (float(xy[0]), float(xy[1])),
            setting=None if setting is None else str(setting),
        )


def _centre(row: Mapping[str, Any], where: str) -> tuple[float, float] | None:
    """The optional ``valve_x``/``valve_y`` of a manifest row: both empty → None."""
    texts = [(row.get(c) or "").strip() for c in _CENTRE_COLUMNS]
    if not any(texts):
        return None
    if not all(texts):
        raise DatasetError(f"{where}: valve_x and valve_y must be set together (or both empty)")
    try:
        x, y = (float(t) for t in texts)
    except ValueError:
        raise DatasetError(
            f"{where}: valve_x/valve_y must be numbers (pixels), got {texts[0]!r}, {texts[1]!r}"
        ) from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise DatasetError(f"{where}: valve_x/valve_y must be finite numbers")
    return x, y


def load_manifest(source: str | Path, classes: Sequence[str] | None = None) -> list[LabelledImage]:
    """Read ``manifest.csv`` (columns ``file,label,patient_id``; ``file`` relative to it).

    ``source`` is the manifest or its folder. With ``classes`` given, a label outside the
    vocabulary is an error naming it (a typo must not silently become a new class). The
    optional columns ``valve_x``, ``valve_y`` (pixels of the image file, as the synthetic
    generator writes them) become :attr:`LabelledImage.valve_xy`, the optional
    ``valve_setting`` :attr:`LabelledImage.setting`; empty or absent → None.
    """
    path = Path(source)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(
            f"no manifest at {path} (expected a CSV with {', '.join(_REQUIRED_COLUMNS)})"
        )
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in _REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
        rows = list(reader)
    if not rows:
        raise DatasetError(f"{path}: manifest has no rows")

    items: list[LabelledImage] = []
    unknown: set[str] = set()
    for line, row in enumerate(rows, start=2):
        file, label, group = (row[c].strip() for c in _REQUIRED_COLUMNS)
        if not file or not label or not group:
            raise DatasetError(f"{path}:{line}: file, label and patient_id must all be set")
        if classes is not None and label not in classes:
            unknown.add(label)
        items.append(
            LabelledImage(
                path=str((path.parent / file).resolve()),
                label=label,
                group=group,
                key=file,
                valve_xy=_centre(row, f"{path}:{line}"),
                setting=(row.get(_SETTING_COLUMN) or "").strip() or None,
            )
        )
    if unknown:
        raise DatasetError(
            f"{path}: label(s) not in the label config: {sorted(unknown)}; "
            f"known classes: {list(classes or [])}"
        )
    return items


def content_hash(path: str | Path) -> str:
    """sha256 of the file's bytes: identifies an image whatever its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


CACHE_VERSION = 1
"""Part of every cache key: bump it when decoding (:mod:`training.shared.dicom`) or preparing
(:mod:`training.shared.preprocess`) changes what a file becomes, so that no run trains on
arrays the serving code would no longer make from the same file."""


def _params_digest(params: PreprocessParams) -> str:
    """The code's version and the parameters that change the prepared array (not the
    normalisation)."""
    relevant = {
        "version": CACHE_VERSION,
        "size_px": params.size_px,
        "background_threshold": params.background_threshold,
        "min_foreground_fraction": params.min_foreground_fraction,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda fh: np.save(fh, array))


_Box = tuple[int, int, int, int]
"""``(top, bottom, left, right)``, half-open, pixels of the decoded image."""


def _box_path(cached: Path) -> Path:
    """``<hash>.box.json`` beside ``<hash>.npy``: the crop the cached array was made with."""
    return cached.with_name(cached.name[: -len(".npy")] + ".box.json")


def _save_box(path: Path, box: _Box, shape: tuple[int, int]) -> None:
    """``{"box": [top, bottom, left, right], "shape": [height, width]}`` of the decoded image."""
    body = json.dumps({"box": [int(v) for v in box], "shape": [int(v) for v in shape]})
    _atomic_write(path, lambda fh: fh.write(body.encode("utf-8")))


def _load_box(path: Path) -> _Box | None:
    """The cached crop, or None when absent or unreadable (an older cache: decode again)."""
    try:
        values = json.loads(path.read_text(encoding="utf-8"))["box"]
        top, bottom, left, right = (int(v) for v in values)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (0 <= top < bottom and 0 <= left < right):
        return None
    return top, bottom, left, right


class CachedSources(Sequence[np.ndarray]):
    """Sources read from the cache each time one is used, not held in memory.

    A radiograph's source is up to ``source_side_px``² float16 (5 MB at the cpu profile's
    1600 px): a thousand held at once would be gigabytes, for a reader that samples a window
    of a few hundred pixels around the valve from each. Each item is memory-mapped
    copy-on-write (writable for torch, never written back) and unmapped once dropped, so
    only the pages a crop touches are read.
    """

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:  # type: ignore[override]
        return np.load(self.paths[index], mmap_mode="c")


@dataclass(init=False)  # own __init__: ``centres``/``boxes`` may be left out (all unknown)
class PreparedImages:
    """Network-ready arrays of a snapshot, with the items that could not be used."""

    items: list[LabelledImage]
    """The usable items, in the order of ``arrays``."""
    arrays: np.ndarray
    """``(N, size, size)`` float16 in [0, 1] (what :func:`prepare_image` returns)."""
    hashes: list[str]
    """Content hash of each usable item's file."""
    failures: dict[str, str]
    """``item key → reason`` for images that could not be decoded (they fail alone)."""
    centres: np.ndarray
    """``(N, 2)`` float32: each item's valve centre ``(x, y)`` as fractions in [0, 1] of the
    prepared square (x across columns, y down rows; continuous, so prepared pixel column
    ``j`` spans ``[j / size, (j + 1) / size)``); NaN where the centre is unknown. A centre
    outside the foreground crop is clipped to the nearest edge. All NaN when not given."""

    boxes: np.ndarray
    """``(N, 4)`` float32 foreground crop ``(top, bottom, left, right)`` in pixels of each
    decoded image (turns prepared fractions back into original pixels); NaN where unknown."""

    sources: Sequence[np.ndarray] | None
    """Each item's foreground at its own pixels, unsquished (float16 in [0, 1],
    :func:`~training.shared.preprocess.native_source`): what a setting reader that reads
    at the X-ray's own pixels crops. None unless asked for (``prepare_images(source_px=)``);
    with a cache folder read from it on use (:class:`CachedSources`), else held."""

    def __init__(
        self,
        items: list[LabelledImage],
        arrays: np.ndarray,
        hashes: list[str],
        failures: dict[str, str],
        centres: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        sources: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.items = items
        self.arrays = arrays
        self.hashes = hashes
        self.failures = failures
        if centres is None:
            centres = np.full((len(items), 2), np.nan, dtype=np.float32)
        self.centres = centres
        if boxes is None:
            boxes = np.full((len(items), 4), np.nan, dtype=np.float32)
        self.boxes = boxes
        self.sources = sources


class _Prepared(NamedTuple):
    """One image of a snapshot, ready: what :func:`_prepare_one` gives."""

    digest: str
    array: np.ndarray
    box: _Box | None
    source: np.ndarray | Path | None
    """The source itself, or (with a cache folder) the cache file that holds it."""


def _source_path(cached: Path, source_px: int) -> Path:
    """``<hash>.source<px>.npy`` beside ``<hash>.npy``: the unsquished foreground (float16)."""
    return cached.with_name(cached.name[: -len(".npy")] + f".source{source_px}.npy")


def _readable_array(path: Path) -> bool:
    """Whether ``path`` holds an array (its header is read, not its data)."""
    if not path.is_file():
        return False
    try:
        np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        logger.warning("cache entry %s is unreadable; decoding again", path.name)
        return False
    return True


def _load_array(path: Path) -> np.ndarray | None:
    """A cached array, or None when absent or unreadable (then the image is decoded again)."""
    if not path.is_file():
        return None
    try:
        return np.load(path)
    except (OSError, ValueError):
        logger.warning("cache entry %s is unreadable; decoding again", path.name)
        return None


def _prepare_one(
    item: LabelledImage, params: PreprocessParams, cache_dir: Path | None, source_px: int | None
) -> _Prepared:
    """The prepared array, its crop box and, with ``source_px``, its source; the box is None
    only when the item has no centre and the cache has no box for it (it is not worth a
    decode then)."""
    digest = content_hash(item.path)
    cached = (
        cache_dir / _params_digest(params) / digest[:2] / f"{digest}.npy" if cache_dir else None
    )
    if cached is not None:
        array = _load_array(cached)
        box = _load_box(_box_path(cached))
        source = None if source_px is None else _source_path(cached, source_px)
        complete = (box is not None or item.valve_xy is None) and (
            source is None or _readable_array(source)
        )
        if array is not None and complete:
            return _Prepared(digest, array, box, source)
        # Not cached, or cached before crops or sources were kept: decode (once more).
    array, box, shape, decoded = _decode(item, params, source_px)
    if cached is None:
        return _Prepared(digest, array, box, decoded)
    _atomic_save(cached, array)
    _save_box(_box_path(cached), box, shape)
    if decoded is None or source_px is None:  # (both or neither: source_px asks for it)
        return _Prepared(digest, array, box, None)
    source_file = _source_path(cached, source_px)
    _atomic_save(source_file, decoded)
    return _Prepared(digest, array, box, source_file)


def _prepare_or_reason(
    job: tuple[LabelledImage, PreprocessParams, Path | None, int | None],
) -> _Prepared | str:
    """:func:`_prepare_one`, or why the file cannot be used: one bad file fails itself, not
    the snapshot (and a reason crosses process boundaries where an exception may not)."""
    try:
        return _prepare_one(*job)
    except ImageDecodeError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read file: {exc.strerror}"


def _decode(
    item: LabelledImage, params: PreprocessParams, source_px: int | None
) -> tuple[np.ndarray, _Box, tuple[int, int], np.ndarray | None]:
    """Prepared float16 array, its crop box, the decoded image's (height, width) and, with
    ``source_px``, the unsquished foreground (float16)."""
    from training.shared.dicom import load_image  # deferred: pydicom/pylibjpeg load on first use

    image = load_image(item.path)
    array, box, source = prepare_image_with_source(image, params, source_px)
    shape = (int(image.shape[0]), int(image.shape[1]))
    kept = None if source is None else source.astype(np.float16)
    return array.astype(np.float16), box, shape, kept


def _fraction(item: LabelledImage, box: _Box | None) -> tuple[float, float]:
    if item.valve_xy is None or box is None:
        return math.nan, math.nan
    return to_prepared_fraction(item.valve_xy[0], item.valve_xy[1], box)


def prepare_images(
    items: Iterable[LabelledImage],
    params: PreprocessParams,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    source_px: int | None = None,
) -> PreparedImages:
    """Decode and prepare every image once (cached by content hash + parameters).

    A file that cannot be read or decoded is recorded in ``failures`` and left out; the
    rest of the snapshot is still prepared. Items with a ``valve_xy`` get their centre in
    the prepared square (:attr:`PreparedImages.centres`) from the crop cached beside the array.
    ``workers`` processes decode (default :func:`training.shared.parallel.default_workers`);
    the result is the same whatever their number. With ``source_px`` each image's
    unsquished foreground is kept too (:attr:`PreparedImages.sources`; cached beside, and
    then read from the cache when used rather than held).
    """
    todo = list(items)
    cache = Path(cache_dir) if cache_dir is not None else None
    kept: list[LabelledImage] = []
    arrays: list[np.ndarray] = []
    hashes: list[str] = []
    centres: list[tuple[float, float]] = []
    boxes: list[tuple[float, ...]] = []
    sources: list[np.ndarray] = []
    cached_sources: list[Path] = []
    failures: dict[str, str] = {}
    jobs = [(item, params, cache, source_px) for item in todo]
    results = ordered_map(_prepare_or_reason, jobs, workers)
    for done, (item, result) in enumerate(zip(todo, results, strict=True), start=1):
        if isinstance(result, str):
            logger.warning("skipping %s: %s", item.key, result)
            failures[item.key] = result
        else:
            digest, array, box, source = result
            if isinstance(source, Path):
                cached_sources.append(source)
            elif source is not None:
                sources.append(source)
            kept.append(item)
            arrays.append(array)
            hashes.append(digest)
            centres.append(_fraction(item, box))
            boxes.append(tuple(box) if box is not None else (math.nan,) * 4)
        if progress is not None:
            progress(done, len(todo))
    size = params.size_px
    stacked = np.stack(arrays) if arrays else np.zeros((0, size, size), dtype=np.float16)
    return PreparedImages(
        items=kept,
        arrays=stacked,
        hashes=hashes,
        failures=failures,
        centres=np.asarray(centres, dtype=np.float32).reshape(len(kept), 2),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(len(kept), 4),
        sources=(
            None
            if source_px is None
            else CachedSources(cached_sources)
            if cache is not None
            else sources
        ),
    )
