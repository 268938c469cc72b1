"""``config.json``, the contract between a training run and everything that serves its version.

A run's finalise stage writes one :class:`VersionConfig`; the predictor and ``valve-id models``
read it back. It is one typed value (as timm's ``PretrainedCfg`` is for a checkpoint), so the
writer and the readers cannot disagree on a key, a type or a default, and a malformed file
fails with one :class:`~training.shared.errors.ModelLoadError` naming the field, not a ``KeyError``
deep in the predictor.

The layout on disk is the one every published version already has::

    {"format": 1, "version", "run_id", "created", "arch", "design", "classes",
     "unused_classes", "label_config_hash", "preprocess", "recipe", "temperature",
     "init", "folds": [{"fold", "weights", "n_train", "n_val"}],
     "data": {"source", "n_images", "n_failed", "snapshot"}}

Serving needs only ``classes`` and ``preprocess``. Everything else may be missing, as in
versions written before it existed and in hand-built test versions: ``temperature`` is then
1 (no scaling), ``folds`` unknown (the checkpoints found are served), the rest ``None`` or
empty. Unknown keys are ignored, so an older backend still serves a newer version. A field
that is present must have its type, even one serving ignores: a wrong type means the file
was not written by a run, and nothing else in it can be trusted either.

Free of torch and fastai: the serving path imports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from training.shared.errors import ModelLoadError
from training.shared.preprocess import PreprocessParams

__all__ = [
    "CONFIG_FILE",
    "CONFIG_FORMAT",
    "DataSummary",
    "FoldEntry",
    "VersionConfig",
    "read_version_file",
]

CONFIG_FILE = "config.json"
CONFIG_FORMAT = 1
"""Version of the ``config.json`` layout."""

_T = TypeVar("_T")


class _Malformed(ValueError):
    """One field of ``config.json`` with the wrong type or value (becomes a ModelLoadError)."""


@dataclass(frozen=True)
class FoldEntry:
    """One fold's checkpoint, relative to the version folder."""

    fold: int
    weights: str
    n_train: int | None = None
    n_val: int | None = None
    precision: str | None = None
    """What it was trained in (:func:`training.shared.inference.precision_name`); serving
    computes in the same. None: not recorded (versions before 2026-12-06)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # the fields, in the order config.json lists them

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FoldEntry:
        return cls(
            fold=_required(data, "fold", _integer),
            weights=_required(data, "weights", _string),
            n_train=_optional(data, "n_train", _integer),
            n_val=_optional(data, "n_val", _integer),
            precision=_optional(data, "precision", _string),
        )


@dataclass(frozen=True)
class DataSummary:
    """Which data the version was trained on; the full snapshot is in ``snapshot``."""

    source: str
    n_images: int
    n_failed: int
    snapshot: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # the fields, in the order config.json lists them

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataSummary:
        return cls(
            source=_required(data, "source", _string),
            n_images=_required(data, "n_images", _integer),
            n_failed=_required(data, "n_failed", _integer),
            snapshot=_required(data, "snapshot", _string),
        )


@dataclass(frozen=True)
class VersionConfig:
    """What a model version is, as serving needs it (see the module docstring).

    ``recipe`` and ``init`` are kept as the JSON objects
    :class:`training.fitting.config.RecipeConfig`
    and :class:`training.shared.model.InitInfo` wrote: serving does not use them, and an old
    version's recipe need not fit today's ``RecipeConfig``.
    """

    classes: tuple[str, ...]
    """The network's outputs, in order."""
    preprocess: PreprocessParams
    """The preprocessing the folds were trained with; serving applies the same."""
    temperature: float = 1.0
    """Calibration temperature fitted on the out-of-fold logits (1 = none)."""
    folds: tuple[FoldEntry, ...] | None = None
    """The fold checkpoints; ``None`` when not recorded."""
    format: int = CONFIG_FORMAT
    version: str | None = None
    run_id: str | None = None
    created: str | None = None
    arch: str | None = None
    design: str | None = None
    unused_classes: tuple[str, ...] = ()
    """Label config choices without labelled images when the run was planned."""
    label_config_hash: str | None = None
    recipe: dict[str, Any] | None = field(default=None, hash=False)
    init: dict[str, Any] | None = field(default=None, hash=False)
    data: DataSummary | None = None

    def __post_init__(self) -> None:
        if not self.classes:
            raise ValueError("classes must name at least one class")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct, got {list(self.classes)}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature {self.temperature} is not positive")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object ``config.json`` holds, keys in the order runs have always written."""
        return {
            "format": self.format,
            "version": self.version,
            "run_id": self.run_id,
            "created": self.created,
            "arch": self.arch,
            "design": self.design,
            "classes": list(self.classes),
            "unused_classes": list(self.unused_classes),
            "label_config_hash": self.label_config_hash,
            "preprocess": self.preprocess.to_dict(),
            "recipe": self.recipe,
            "temperature": self.temperature,
            "init": self.init,
            "folds": None if self.folds is None else [f.to_dict() for f in self.folds],
            "data": None if self.data is None else self.data.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Any, *, source: str | None = None) -> VersionConfig:
        """Parse a ``config.json`` object; :class:`ModelLoadError` names the bad field.

        ``source`` (the file or version folder) is put in front of the message.
        """
        try:
            if not isinstance(data, Mapping):
                raise _Malformed(f"must hold a JSON object, not {_json_type(data)}")
            return cls(
                classes=_required(data, "classes", _strings),
                preprocess=_required(data, "preprocess", _preprocess),
                temperature=_optional(data, "temperature", _number, default=1.0),
                folds=_optional(data, "folds", _list_of(FoldEntry.from_dict)),
                format=_optional(data, "format", _integer, default=CONFIG_FORMAT),
                version=_optional(data, "version", _string),
                run_id=_optional(data, "run_id", _string),
                created=_optional(data, "created", _string),
                arch=_optional(data, "arch", _string),
                design=_optional(data, "design", _string),
                unused_classes=_optional(data, "unused_classes", _strings, default=()),
                label_config_hash=_optional(data, "label_config_hash", _string),
                recipe=_optional(data, "recipe", _object),
                init=_optional(data, "init", _object),
                data=_optional(data, "data", _nested(DataSummary.from_dict)),
            )
        except (ValueError, TypeError) as exc:  # _Malformed, or a value check
            raise ModelLoadError(f"unusable {CONFIG_FILE}: {exc}", source=source) from exc

    @classmethod
    def read(cls, version_dir: Path) -> VersionConfig:
        """The config of the version in ``version_dir``; :class:`ModelLoadError` if unusable."""
        return cls.from_dict(read_version_file(version_dir / CONFIG_FILE), source=str(version_dir))


def read_version_file(path: Path) -> dict[str, Any]:
    """A JSON object file of a model version; :class:`ModelLoadError` when it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path.name} ({exc})", source=str(path)) from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path.name} is not a JSON object", source=str(path))
    return data


# --- field parsers: each returns the typed value or raises _Malformed ---------------------


def _required(data: Mapping[str, Any], key: str, parse: Callable[[Any], _T]) -> _T:
    if key not in data:
        raise _Malformed(f"{key} is missing")
    return _field(key, data[key], parse)


def _optional(
    data: Mapping[str, Any], key: str, parse: Callable[[Any], _T], default: Any = None
) -> Any:
    """``default`` when the key is absent or null (versions that predate the field)."""
    value = data.get(key)
    return default if value is None else _field(key, value, parse)


def _field(key: str, value: Any, parse: Callable[[Any], _T]) -> _T:
    try:
        return parse(value)
    except (TypeError, ValueError) as exc:  # _Malformed included
        raise _Malformed(_at(key, exc)) from None


def _at(where: str, exc: Exception) -> str:
    """``folds[1].weights must be ...``: the path to the bad value, then what is wrong."""
    text = str(exc)
    return f"{where}{text}" if text.startswith((".", "[")) else f"{where} {text}"


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Malformed(f"must be a string, not {_json_type(value)}")
    return value


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Malformed(f"must be an integer, not {_json_type(value)}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Malformed(f"must be a number, not {_json_type(value)}")
    return float(value)


def _strings(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Malformed("must be a list of non-empty strings")
    return tuple(value)


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Malformed(f"must be an object, not {_json_type(value)}")
    return value


def _preprocess(value: Any) -> PreprocessParams:
    return PreprocessParams.from_dict(_object(value))


def _nested(parse: Callable[[Mapping[str, Any]], _T]) -> Callable[[Any], _T]:
    def parse_object(value: Any) -> _T:
        obj = _object(value)
        try:
            return parse(obj)
        except _Malformed as exc:
            raise _Malformed(f".{exc}") from None

    return parse_object


def _list_of(parse: Callable[[Mapping[str, Any]], _T]) -> Callable[[Any], tuple[_T, ...]]:
    def parse_list(value: Any) -> tuple[_T, ...]:
        if not isinstance(value, list):
            raise _Malformed(f"must be a list, not {_json_type(value)}")
        items = []
        for i, item in enumerate(value):
            try:
                items.append(_nested(parse)(item))
            except _Malformed as exc:
                raise _Malformed(_at(f"[{i}]", exc)) from None
        return tuple(items)

    return parse_list
