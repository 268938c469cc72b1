"""Labelled images for a training run, and the decode-once cache of their network inputs.

A run trains on a *snapshot*: the list of :class:`LabelledImage` taken when it starts (from a
folder + ``manifest.csv`` such as the demo data set, or a Label Studio export). Every image is
decoded and prepared once (:func:`training.preprocess.prepare_image`) and kept in a cache
keyed by the file's content hash and the preprocessing parameters, so epochs, folds and later
runs never decode DICOM again.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from training.errors import DatasetError, ImageDecodeError
from training.preprocess import PreprocessParams, prepare_image

__all__ = [
    "MANIFEST_NAME",
    "LabelledImage",
    "PreparedImages",
    "content_hash",
    "load_items",
    "load_manifest",
    "prepare_images",
]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
"""File name of a data set's manifest inside its folder."""
_REQUIRED_COLUMNS = ("file", "label", "patient_id")
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

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def load_manifest(source: str | Path, classes: Sequence[str] | None = None) -> list[LabelledImage]:
    """Read ``manifest.csv`` (columns ``file,label,patient_id``; ``file`` relative to it).

    ``source`` is the manifest or its folder. With ``classes`` given, a label outside the
    vocabulary is an error naming it (a typo must not silently become a new class).
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
                path=str((path.parent / file).resolve()), label=label, group=group, key=file
            )
        )
    if unknown:
        raise DatasetError(
            f"{path}: label(s) not in the label config: {sorted(unknown)}; "
            f"known classes: {list(classes or [])}"
        )
    return items


def load_items(
    data: str | Path,
    classes: Sequence[str],
    download_dir: Path,
    *,
    image_key: str = "image",
    choices_name: str | None = None,
) -> list[LabelledImage]:
    """A run's snapshot from its ``data``: ``labelstudio:<project id>`` or a manifest/folder.

    A Label Studio project is exported now and its images are copied into ``download_dir``
    (:func:`training.labelstudio_source.load_project_items`); ``image_key`` and
    ``choices_name`` come from the label config. Anything else is read by
    :func:`load_manifest`.
    """
    from training.labelstudio_source import (  # deferred: it imports the SDK lazily too
        is_project_source,
        load_project_items,
        parse_project_source,
    )

    if is_project_source(str(data)):
        return load_project_items(
            parse_project_source(str(data)),
            classes,
            download_dir,
            image_key=image_key,
            choices_name=choices_name,
        )
    return load_manifest(data, classes)


def content_hash(path: str | Path) -> str:
    """sha256 of the file's bytes: identifies an image whatever its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _params_digest(params: PreprocessParams) -> str:
    """Only the parameters that change the prepared array (not the normalisation)."""
    relevant = {
        "size_px": params.size_px,
        "background_threshold": params.background_threshold,
        "min_foreground_fraction": params.min_foreground_fraction,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
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


def _prepare_one(item: LabelledImage, params: PreprocessParams, cache_dir: Path | None):
    digest = content_hash(item.path)
    cached = (
        cache_dir / _params_digest(params) / digest[:2] / f"{digest}.npy" if cache_dir else None
    )
    if cached is not None and cached.is_file():
        try:
            return digest, np.load(cached)
        except (OSError, ValueError):
            logger.warning("cache entry %s is unreadable; decoding again", cached.name)
    from training.dicom import load_image  # deferred: pydicom/pylibjpeg load on first use

    array = prepare_image(load_image(item.path), params).astype(np.float16)
    if cached is not None:
        _atomic_save(cached, array)
    return digest, array


def prepare_images(
    items: Iterable[LabelledImage],
    params: PreprocessParams,
    cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PreparedImages:
    """Decode and prepare every image once (cached by content hash + parameters).

    A file that cannot be read or decoded is recorded in ``failures`` and left out; the
    rest of the snapshot is still prepared.
    """
    todo = list(items)
    cache = Path(cache_dir) if cache_dir is not None else None
    kept: list[LabelledImage] = []
    arrays: list[np.ndarray] = []
    hashes: list[str] = []
    failures: dict[str, str] = {}
    for done, item in enumerate(todo, start=1):
        try:
            digest, array = _prepare_one(item, params, cache)
        except (ImageDecodeError, OSError) as exc:
            reason = (
                str(exc)
                if isinstance(exc, ImageDecodeError)
                else f"cannot read file: {exc.strerror}"
            )
            logger.warning("skipping %s: %s", item.key, reason)
            failures[item.key] = reason
        else:
            kept.append(item)
            arrays.append(array)
            hashes.append(digest)
        if progress is not None:
            progress(done, len(todo))
    size = params.size_px
    stacked = np.stack(arrays) if arrays else np.zeros((0, size, size), dtype=np.float16)
    return PreparedImages(items=kept, arrays=stacked, hashes=hashes, failures=failures)
