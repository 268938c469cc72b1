"""``valve-id import``: X-rays from a folder become de-identified PNGs and Label Studio tasks.

Every image found under the folder (DICOM recognised by content, whatever its name; PNG/JPEG
only when ``manifest.csv`` gives its ``patient_id``) is decoded with the foundation's
:func:`training.shared.dicom.load_image` (bright bone, the stored VOI window applied), scaled to the
full 8-bit range and written as a grayscale PNG **without any metadata chunk** into a folder
of Label Studio's local-files storage. Its task holds three things and nothing else::

    {"image": "/data/local-files/?d=<path under LOCAL_FILES_DOCUMENT_ROOT>",
     "patient": "pt-<16 hex>",          # HMAC-SHA256(VALVE_ID_PSEUDONYM_KEY, PatientID)
     "source_uid": "<32 hex>"}          # HMAC of the SOP Instance UID (or of the raster's bytes)

So the same patient always maps to the same pseudonym (patient-grouped folds keep working)
while nobody without the key can go back to the Patient ID, and no name, birth date,
accession number, institution or other DICOM text ever reaches Label Studio. File names are
the ``source_uid`` too: original names often carry patient names.

Re-importing is safe: before creating anything the project's tasks are read and every
``source_uid`` already there is skipped, so a second run (or a run after a partial one)
creates no duplicates. The key of the HMAC is also the key of the dedupe: changing
``VALVE_ID_PSEUDONYM_KEY`` makes old and new imports look unrelated.

The local-files storage is created (or found) only so that Label Studio serves the files; it
is never *synced*: a sync would create bare tasks without ``patient`` and ``source_uid``
beside ours. Label Studio must see the folder under the same path as this process (same
host, or a volume mounted at the same path).

A file that cannot be read or decoded fails alone and is listed in the report; the rest are
imported. Log lines carry counts, never file names or patient data.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from backend.settings import Settings, SettingsError
from backend.tools.guides import install_guides
from training.labelstudio import LabelStudio
from training.labelstudio.export import PATIENT_KEY
from training.shared.dataset import MANIFEST_NAME, content_hash
from training.shared.dicom import DICOM_MAGIC, DICOM_MAGIC_OFFSET, JPEG_MAGIC, PNG_MAGIC
from training.shared.errors import (
    DatasetError,
    ImageDecodeError,
    LabelConfigError,
    LabelStudioError,
)
from training.shared.labels import parse_label_config

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = [
    "DEFAULT_PROJECT_TITLE",
    "DEFAULT_STORAGE_SUBDIR",
    "IMPORT_BATCH_SIZE",
    "MIN_PSEUDONYM_KEY_CHARS",
    "PSEUDONYM_HEX_CHARS",
    "PSEUDONYM_PREFIX",
    "SOURCE_UID_KEY",
    "Destination",
    "FoundImage",
    "ImportReport",
    "check_pseudonym_key",
    "dicom_identity",
    "import_folder",
    "log_report",
    "make_task",
    "open_destination",
    "pseudonymize",
    "send_tasks",
    "source_uid",
    "storage_folder",
]

logger = logging.getLogger(__name__)

DEFAULT_PROJECT_TITLE = "valve-id"
"""Title of a project made by ``valve-id import --create``."""
DEFAULT_STORAGE_SUBDIR = "valve-id"
"""Folder under ``LOCAL_FILES_DOCUMENT_ROOT`` the PNGs go to unless ``--storage-dir`` says."""
IMPORT_BATCH_SIZE = 50
"""Tasks sent to Label Studio per import request (one ``TASKS_CREATED`` webhook each)."""
MIN_PSEUDONYM_KEY_CHARS = 16
"""Shortest pseudonym key accepted: Patient IDs are guessable, only the key protects them."""
PSEUDONYM_PREFIX = "pt-"
"""Marks a task's ``patient`` value as a valve-id pseudonym."""
PSEUDONYM_HEX_CHARS = 16
"""Hex digits of the HMAC kept in a pseudonym (64 bits: no collisions at hospital scale)."""
SOURCE_UID_KEY = "source_uid"
"""Task data key of the keyed hash that identifies the imported file (the dedupe key)."""

_SOURCE_UID_HEX_CHARS = 32
_SNIFF_BYTES = DICOM_MAGIC_OFFSET + len(DICOM_MAGIC)
_DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
"""Media Storage Directory Storage (PS3.4 F): a DICOMDIR index, not an image."""
_PNG_FILE_MODE = 0o644
"""Label Studio (often another user, in a container) must be able to read the PNGs."""

ProgressFn = Callable[[int, int], None]


@dataclass
class ImportReport:
    """What one ``valve-id import`` did."""

    project_id: int
    """The Label Studio project the tasks went to (new with ``--create``)."""
    created: int = 0
    """Tasks created."""
    skipped_duplicates: int = 0
    """Images already in the project (same ``source_uid``), or twice in the folder."""
    failed: dict[str, str] = field(default_factory=dict)
    """File (relative to the imported folder) → why it was not imported."""
    ignored: int = 0
    """Files that are not images at all (notes, DICOMDIR, ...)."""
    without_patient: int = 0
    """Images imported without a patient id (each becomes its own group in training)."""
    burned_in: int = 0
    """Images whose header says text is burned into the pixels (Burned In Annotation YES):
    that text cannot be removed here, and annotators will see it."""


class _Refused(Exception):
    """This file cannot be imported; the message says why (no patient data in it)."""


@dataclass(frozen=True)
class FoundImage:
    """An image (a file or a PACS instance), identified but not yet decoded."""

    uid: str
    """Its ``source_uid``: the dedupe key every import source shares."""
    patient_id: str | None
    burned_in: bool = False


@dataclass
class Destination:
    """Where tasks go: one project, its image key, the PNG folder, and what it already holds.

    Shared by the folder and the PACS import so both write the same PNGs and the same
    three-key tasks, and dedupe against the same ``source_uid`` set."""

    client: LabelStudio
    project_id: int
    image_key: str
    folder: Path
    """The PNG folder (absolute, below ``LOCAL_FILES_DOCUMENT_ROOT``)."""
    relative: str
    """``folder`` relative to ``LOCAL_FILES_DOCUMENT_ROOT`` (POSIX), for the task's URL."""
    key: str
    """The pseudonym key (HMAC key of ``patient`` and ``source_uid``)."""
    known: set[str] = field(default_factory=set)
    """``source_uid`` of every task in the project, plus those created since."""


# ------------------------------------------------------------------------------ pseudonyms


def _keyed_hash(key: str, domain: str, value: str) -> str:
    message = f"{domain}\x00{value}".encode()
    return hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()


def pseudonymize(patient_id: str, key: str) -> str:
    """Stable pseudonym of a Patient ID: ``pt-`` + HMAC-SHA256(key, id), truncated."""
    return (
        PSEUDONYM_PREFIX + _keyed_hash(key, "patient-id", patient_id.strip())[:PSEUDONYM_HEX_CHARS]
    )


def source_uid(kind: str, value: str, key: str) -> str:
    """Dedupe key of an imported file: keyed hash of its SOP Instance UID (``kind="sop"``)
    or of its content hash (``kind="sha256"``); keyed, so it cannot be looked up."""
    return _keyed_hash(key, kind, value)[:_SOURCE_UID_HEX_CHARS]


def check_pseudonym_key(settings: Settings) -> str:
    """The pseudonym key, refused when unset or too short (before anything is written)."""
    key = settings.pseudonym_key
    if not key:
        raise SettingsError(
            "VALVE_ID_PSEUDONYM_KEY is not set: valve-id import needs a secret key to turn "
            "Patient IDs into pseudonyms. Generate one once (e.g. openssl rand -hex 32), keep "
            "it secret and reuse it for every import: the same key gives the same pseudonyms"
        )
    if len(key) < MIN_PSEUDONYM_KEY_CHARS:
        raise SettingsError(
            f"VALVE_ID_PSEUDONYM_KEY is shorter than {MIN_PSEUDONYM_KEY_CHARS} characters; "
            "Patient IDs are easy to guess, so a short key would not protect them"
        )
    return key


# ------------------------------------------------------------------------------ the folder


def storage_folder(settings: Settings, storage_root: Path | None) -> tuple[Path, str]:
    """The PNG folder and its path relative to ``LOCAL_FILES_DOCUMENT_ROOT`` (POSIX)."""
    if settings.local_files_root is None:
        raise SettingsError(
            "LOCAL_FILES_DOCUMENT_ROOT is not set: valve-id import writes the PNGs into a "
            "Label Studio local-files storage below it (the same value Label Studio has)"
        )
    root = settings.local_files_root.expanduser().resolve()
    target = (storage_root or root / DEFAULT_STORAGE_SUBDIR).expanduser().resolve()
    if target == root or not target.is_relative_to(root):
        raise SettingsError(
            f"the storage folder {target} must be a subfolder of LOCAL_FILES_DOCUMENT_ROOT "
            f"({root}): Label Studio only serves local files below it"
        )
    target.mkdir(parents=True, exist_ok=True)
    return target, target.relative_to(root).as_posix()


def _read_manifest(source_dir: Path) -> dict[Path, str]:
    """``manifest.csv`` (``file,patient_id``; other columns ignored) → resolved path → id."""
    path = source_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in ("file", "patient_id") if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: manifest lacks column(s) {', '.join(missing)}")
        patients: dict[Path, str] = {}
        for line, row in enumerate(reader, start=2):
            file, patient = (row.get("file") or "").strip(), (row.get("patient_id") or "").strip()
            if not file:
                raise DatasetError(f"{path}:{line}: the file column is empty")
            if patient:
                patients[(source_dir / file).resolve()] = patient
    return patients


def _walk(source_dir: Path, skip: Path) -> Iterator[Path]:
    """Every regular file below ``source_dir`` in a stable order, except the manifest and
    anything inside ``skip`` (the storage folder, if it lies inside the imported one)."""
    manifest = (source_dir / MANIFEST_NAME).resolve()
    for path in sorted(source_dir.rglob("*")):
        resolved = path.resolve()
        if not path.is_file() or resolved == manifest or resolved.is_relative_to(skip):
            continue
        yield path


def _head(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(_SNIFF_BYTES)


def _identify(path: Path, name: str, manifest: dict[Path, str], key: str) -> FoundImage | None:
    """Recognise the file by content; None for a file that is not an image at all."""
    from training.shared.dicom import read_dicom_header

    head = _head(path)
    listed = manifest.get(path.resolve())
    if head.startswith((PNG_MAGIC, JPEG_MAGIC)):
        if listed is None:
            raise _Refused(
                "a PNG/JPEG needs its patient_id in manifest.csv (it has no header to take "
                "the patient from)"
            )
        return FoundImage(uid=source_uid("sha256", content_hash(path), key), patient_id=listed)
    try:
        header = read_dicom_header(path, name=name)
    except ImageDecodeError:
        looks_dicom = head[DICOM_MAGIC_OFFSET:] == DICOM_MAGIC
        if looks_dicom or path.suffix.lower() in _DICOM_SUFFIXES or path.resolve() in manifest:
            raise
        return None
    if str(header.get("SOPClassUID") or "") == _DICOMDIR_SOP_CLASS:
        return None
    return dicom_identity(header, key, content=lambda: content_hash(path), listed=listed)


def dicom_identity(
    header: Dataset, key: str, *, content: Callable[[], str], listed: str | None = None
) -> FoundImage:
    """A DICOM's dedupe key and patient, the same for a file and a PACS instance.

    The ``source_uid`` is keyed on the SOP Instance UID, so the same instance imported from a
    folder and from the PACS is one task; ``content()`` (the bytes' hash) only stands in for
    an instance without one. ``listed`` is the manifest's patient id, used when the header
    has none."""
    sop = str(header.get("SOPInstanceUID") or "").strip()
    uid = source_uid("sop", sop, key) if sop else source_uid("sha256", content(), key)
    patient_id = str(header.get("PatientID") or "").strip() or listed
    burned_in = str(header.get("BurnedInAnnotation") or "").strip().upper() == "YES"
    return FoundImage(uid=uid, patient_id=patient_id, burned_in=burned_in)


def _importable(path: Path, name: str, manifest: dict[Path, str], key: str) -> bool:
    """Whether the import would try this file: DICOM, or a PNG/JPEG the manifest lists (a
    broken or unreadable X-ray counts: the import then says why it failed)."""
    try:
        return _identify(path, name, manifest, key) is not None
    except _Refused:
        return False
    except (ImageDecodeError, OSError):
        return True


def _check_something_to_import(
    source_dir: Path, files: list[Path], manifest: dict[Path, str], key: str
) -> None:
    """Refuse a folder with nothing importable before Label Studio is touched (``--create``
    would leave an empty project behind); stops at the first importable file."""
    if any(_importable(p, p.relative_to(source_dir).as_posix(), manifest, key) for p in files):
        return
    found = f"{len(files)} file(s), none of them an X-ray valve-id imports" if files else "no file"
    raise DatasetError(
        f"nothing importable in {source_dir} ({found}): valve-id imports DICOM files, and "
        f"PNG/JPEG files listed in {MANIFEST_NAME} (columns file,patient_id)"
    )


# ------------------------------------------------------------------------------ the PNG


def _png_bytes(image: np.ndarray) -> bytes:
    """8-bit grayscale PNG of the image's full range, with no text, EXIF or other chunk."""
    lo, hi = float(image.min()), float(image.max())
    if hi > lo:
        scaled = np.rint((image - lo) * (255.0 / (hi - lo)))
        pixels = np.clip(scaled, 0, 255).astype(np.uint8)
    else:
        pixels = np.zeros(image.shape, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", pnginfo=None)
    return buffer.getvalue()


def _write_png(target: Path, data: bytes) -> None:
    """Atomic: Label Studio never serves half a file, a crash leaves none behind."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".import-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _PNG_FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------ Label Studio


@contextmanager
def _talking_to_label_studio() -> Iterator[None]:
    """Label Studio's refusals and silences (after the client's retries, the message naming
    the call) as the import's :class:`DatasetError`."""
    try:
        yield
    except LabelStudioError as exc:
        hint = "; is LABEL_STUDIO_URL right and Label Studio running?"
        raise DatasetError(f"{exc}{hint if exc.status_code is None else ''}") from exc


def _project_image_key(client: LabelStudio, project_id: int) -> str:
    with _talking_to_label_studio():
        try:
            config = client.label_config(project_id)
        except LabelStudioError as exc:
            if exc.status_code == 404:
                raise DatasetError(f"Label Studio has no project {project_id}") from exc
            raise
    try:
        return parse_label_config(config).image_key
    except LabelConfigError as exc:
        raise DatasetError(f"project {project_id} cannot take X-rays: {exc}") from exc


def _create_project(client: LabelStudio, settings: Settings, title: str) -> tuple[int, str]:
    xml = settings.label_config.read_text(encoding="utf-8")
    image_key = parse_label_config(xml).image_key
    project_id = client.create_project(title, xml)
    logger.info("created Label Studio project %s", project_id)
    return project_id, image_key


def _ensure_storage(client: LabelStudio, project_id: int, folder: Path) -> None:
    """A local-files storage covering ``folder``, so Label Studio serves its files."""
    for storage in client.local_storages(project_id):
        path = Path(storage["path"]).resolve() if storage.get("path") else None
        if path is not None and folder.is_relative_to(path):
            return
    client.create_local_storage(
        project_id,
        str(folder),
        title="valve-id import",
        description="PNGs written by valve-id import. Do not sync: valve-id creates the tasks.",
    )
    logger.info("created a local-files storage for project %s", project_id)


def _existing_uids(client: LabelStudio, project_id: int) -> set[str]:
    uids: set[str] = set()
    for data in client.task_data(project_id):
        uid = data.get(SOURCE_UID_KEY)
        if isinstance(uid, str):
            uids.add(uid)
    return uids


def open_destination(
    settings: Settings,
    client: LabelStudio,
    *,
    project_id: int | None,
    create: bool,
    folder: Path,
    relative: str,
    key: str,
    title: str = DEFAULT_PROJECT_TITLE,
) -> Destination:
    """The project (found, or made with ``create``), its storage and its ``source_uid`` set.

    The first call that touches Label Studio; callers check everything local before it, so
    a refused import never leaves an empty project behind."""
    if create == (project_id is not None):
        raise ValueError("give either a project id or create=True, not both or neither")
    if create:
        with _talking_to_label_studio():
            project_id, image_key = _create_project(client, settings, title)
    else:
        assert project_id is not None
        image_key = _project_image_key(client, project_id)
    with _talking_to_label_studio():
        _ensure_storage(client, project_id, folder)
        _install_guides(settings, client, project_id)
        known = _existing_uids(client, project_id)
    return Destination(client, project_id, image_key, folder, relative, key, known)


def _install_guides(settings: Settings, client: LabelStudio, project_id: int) -> None:
    """The reading guides' pictures for this project (docs/READING_GUIDES.md), from the
    ``guides/`` folder beside the labeling config, when there is one."""
    source = settings.label_config.parent / "guides"
    if settings.local_files_root is not None and source.is_dir():
        install_guides(
            client, project_id, local_files_root=settings.local_files_root, source=source
        )


def send_tasks(
    destination: Destination,
    batch: list[tuple[str, dict[str, Any]]],
    report: ImportReport,
) -> None:
    """Create one batch of tasks; a refused batch fails its images, an unreachable LS stops.

    Label Studio answers each batch with one ``TASKS_CREATED`` webhook, which is what makes
    the backend pre-annotate the new tasks (whichever import made them)."""
    if not batch:
        return
    try:
        destination.client.import_tasks(destination.project_id, [d for _, d in batch])
    except LabelStudioError as exc:
        if exc.status_code is None:
            raise DatasetError(
                f"{exc}; {report.created} created so far. Run the same import again to "
                "finish: images already imported are skipped"
            ) from exc
        for name, _ in batch:
            report.failed[name] = f"Label Studio refused the task (HTTP {exc.status_code})"
    else:
        report.created += len(batch)
    batch.clear()


def make_task(
    destination: Destination, found: FoundImage, decode: Callable[[], np.ndarray]
) -> dict[str, Any]:
    """Write the image's PNG (unless an interrupted run already did) and return its task
    data: the image URL, ``source_uid`` and, with a Patient ID, its pseudonym; nothing else.

    ``decode`` is only called when the PNG is missing; it raises :class:`ImageDecodeError`
    for an image that cannot be imported."""
    target = destination.folder / f"{found.uid}.png"
    if not target.is_file():  # written by an earlier, interrupted run: same bytes
        _write_png(target, _png_bytes(decode()))
    destination.known.add(found.uid)
    url = "/data/local-files/?d=" + quote(f"{destination.relative}/{target.name}", safe="/")
    task: dict[str, Any] = {destination.image_key: url, SOURCE_UID_KEY: found.uid}
    if found.patient_id:
        task[PATIENT_KEY] = pseudonymize(found.patient_id, destination.key)
    return task


def log_report(report: ImportReport, source: str = "import") -> None:
    """Counts only: no file name, UID or patient data reaches the log."""
    logger.info(
        "%s into project %s: %d created, %d duplicates skipped, %d failed, %d ignored",
        source,
        report.project_id,
        report.created,
        report.skipped_duplicates,
        len(report.failed),
        report.ignored,
    )
    if report.burned_in:
        logger.warning(
            "%d image(s) declare text burned into the pixels (Burned In Annotation YES); "
            "it cannot be removed by valve-id and annotators will see it",
            report.burned_in,
        )
    if report.without_patient:
        logger.warning(
            "%d image(s) had no Patient ID: each will be its own group in training",
            report.without_patient,
        )


# ------------------------------------------------------------------------------ the import


def import_folder(
    source_dir: Path,
    *,
    project_id: int | None,
    create: bool,
    settings: Settings,
    client: LabelStudio,
    storage_root: Path | None = None,
    title: str = DEFAULT_PROJECT_TITLE,
    progress: ProgressFn | None = None,
) -> ImportReport:
    """Import every X-ray below ``source_dir`` into project ``project_id`` (or a new one).

    ``storage_root`` is the PNG folder, a strict subfolder of ``LOCAL_FILES_DOCUMENT_ROOT``
    (default ``<root>/valve-id``). ``progress(done, total)`` is called after each file.
    Raises :class:`SettingsError` without a usable pseudonym key or storage folder, and
    :class:`DatasetError` for a folder with nothing importable, before anything is written
    or sent.
    """
    if create == (project_id is not None):
        raise ValueError("give either a project id or create=True, not both or neither")
    key = check_pseudonym_key(settings)
    folder, relative = storage_folder(settings, storage_root)
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise DatasetError(f"{source_dir} is not a folder")
    manifest = _read_manifest(source_dir)
    files = list(_walk(source_dir, folder))
    _check_something_to_import(source_dir, files, manifest, key)
    destination = open_destination(
        settings,
        client,
        project_id=project_id,
        create=create,
        folder=folder,
        relative=relative,
        key=key,
        title=title,
    )

    report = ImportReport(project_id=destination.project_id)
    batch: list[tuple[str, dict[str, Any]]] = []
    for done, path in enumerate(files, start=1):
        name = path.relative_to(source_dir).as_posix()
        try:
            task = _import_one(path, name, manifest, destination)
        except (ImageDecodeError, _Refused) as exc:
            report.failed[name] = str(exc)
        except OSError as exc:
            report.failed[name] = f"cannot be read: {exc.strerror or type(exc).__name__}"
        else:
            if isinstance(task, str):
                if task == "ignored":
                    report.ignored += 1
                else:  # "duplicate"
                    report.skipped_duplicates += 1
            else:
                data, burned_in = task
                report.without_patient += PATIENT_KEY not in data
                report.burned_in += burned_in
                batch.append((name, data))
                if len(batch) >= IMPORT_BATCH_SIZE:
                    send_tasks(destination, batch, report)
        if progress is not None:
            progress(done, len(files))
    send_tasks(destination, batch, report)
    log_report(report)
    return report


def _import_one(
    path: Path, name: str, manifest: dict[Path, str], destination: Destination
) -> tuple[dict[str, Any], bool] | str:
    """One file → (its task data, burned-in text?), or ``"ignored"`` / ``"duplicate"``."""
    from training.shared.dicom import load_image

    found = _identify(path, name, manifest, destination.key)
    if found is None:
        return "ignored"
    if found.uid in destination.known:
        return "duplicate"
    task = make_task(destination, found, lambda: load_image(path, name=name))
    return task, found.burned_in
