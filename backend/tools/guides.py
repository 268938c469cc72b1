"""The reading guides' pictures, served by Label Studio like the task images.

``label_config.xml`` shows a valve model's reading guide while that model is chosen; each
guide's picture is an ``<Image value="/data/local-files/?d=valve-id-guides/<file>">``: a
fixed URL into Label Studio's local-files storage, the way task images are served (same
origin, the annotator's session, no SSRF guard involved). :func:`install_guides` puts the
pictures there for one project: it copies ``guides/`` (beside the labeling config) to
``LOCAL_FILES_DOCUMENT_ROOT/valve-id-guides`` and makes sure the project has a local-files
storage covering that folder (Label Studio serves a file only to users of a project whose
storage covers it). The storage is never synced: its files are pictures, not tasks.
"""

from __future__ import annotations

import logging
import os
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from training.labelstudio import LabelStudio

__all__ = ["GUIDES_SUBDIR", "GUIDE_URL_PREFIX", "guide_files", "install_guides"]

logger = logging.getLogger(__name__)

GUIDES_SUBDIR = "valve-id-guides"
"""Folder under ``LOCAL_FILES_DOCUMENT_ROOT`` holding the guide pictures (named in
``label_config.xml``'s guide URLs, so changing it means changing those too)."""
GUIDE_URL_PREFIX = f"/data/local-files/?d={GUIDES_SUBDIR}/"
"""How a guide picture's URL starts in the labeling config."""
_FILE_MODE = 0o644
"""Label Studio (often another user) must be able to read the pictures."""


def guide_files(label_config_xml: str) -> list[str]:
    """File names of the guide pictures a labeling config refers to, in config order."""
    names = []
    for el in ET.fromstring(label_config_xml).iter():
        value = el.get("value") or ""
        if el.tag.lower() == "image" and value.startswith(GUIDE_URL_PREFIX):
            (relative,) = parse_qs(urlparse(value).query)["d"]
            names.append(Path(relative).name)
    return names


def install_guides(
    client: LabelStudio, project_id: int, *, local_files_root: Path, source: Path
) -> Path:
    """Copy the pictures in ``source`` to ``<local_files_root>/valve-id-guides`` and give
    project ``project_id`` a local-files storage for that folder (once); the folder.

    Files already there with the same content are left alone, so running it again is free.
    """
    target = Path(local_files_root).expanduser().resolve() / GUIDES_SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    copied = 0
    for picture in sorted(Path(source).glob("*.png")):
        destination = target / picture.name
        if destination.is_file() and destination.read_bytes() == picture.read_bytes():
            continue
        shutil.copyfile(picture, destination)
        os.chmod(destination, _FILE_MODE)
        copied += 1
    for storage in client.local_storages(project_id):
        path = Path(storage["path"]).resolve() if storage.get("path") else None
        if path is not None and target.is_relative_to(path):
            break
    else:
        client.create_local_storage(
            project_id,
            str(target),
            title="valve-id reading guides",
            description="Reference pictures of the reading guides. Do not sync: not tasks.",
        )
        logger.info("created the reading guides' storage for project %s", project_id)
    logger.info("reading guides: %d picture(s) copied", copied)
    return target
