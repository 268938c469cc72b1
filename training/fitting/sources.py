"""Where a run's labelled images come from: a Label Studio project or a manifest/folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from training.labelstudio.export import (
    is_project_source,
    load_project_items,
    parse_project_source,
)
from training.shared.dataset import LabelledImage, load_manifest
from training.shared.labels import SettingScale

__all__ = ["load_items"]


def load_items(
    data: str | Path,
    classes: Sequence[str],
    download_dir: Path,
    *,
    image_key: str = "image",
    choices_name: str | None = None,
    keypoint_name: str | None = None,
    keypoint_label: str | None = None,
    settings: Sequence[SettingScale] = (),
) -> list[LabelledImage]:
    """A run's snapshot from its ``data``: ``labelstudio:<project id>`` or a manifest/folder.

    A Label Studio project is exported now and its images are copied into ``download_dir``
    (:func:`training.labelstudio.export.load_project_items`); ``image_key``,
    ``choices_name``, ``keypoint_name``, ``keypoint_label`` and the setting scales
    ``settings`` come from the label config.
    Anything else is read by :func:`load_manifest`.
    """
    if is_project_source(str(data)):
        return load_project_items(
            parse_project_source(str(data)),
            classes,
            download_dir,
            image_key=image_key,
            choices_name=choices_name,
            keypoint_name=keypoint_name,
            keypoint_label=keypoint_label,
            settings=settings,
        )
    return load_manifest(data, classes)
