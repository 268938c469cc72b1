"""A Label Studio project's labelled tasks, as the snapshot a training run learns from.

A run started with ``data="labelstudio:<project id>"`` trains on whatever Label Studio says
*at the moment the run starts*: the project's export (``GET /api/projects/{id}/export``,
through label-studio-sdk) is the source of truth, never the webhooks the backend happened to
see. Each labelled task becomes a :class:`~training.shared.dataset.LabelledImage`:

* **label**: the one class chosen by the task's *latest* non-cancelled annotation that chose
  one (:func:`latest_choice`; latest = most recently updated, so an annotator's correction
  wins). A task whose annotations are all cancelled (skipped) or empty is not labelled. A
  label outside ``classes`` means the label config changed under the run:
  :class:`DatasetError` names it.
* **valve_xy**: the valve centre the *same* annotation marked with the label config's
  ``<KeyPointLabels>`` (:func:`latest_annotation`), converted from Label Studio's percent of
  the image to pixels of the image file; None when that annotation has no (or more than one)
  such keypoint, or was made on a rotated view.
* **setting**: the valve's pressure setting the *same* annotation chose in the setting
  ``<Choices>`` of its valve model (:class:`~training.shared.labels.SettingScale`); None when
  the model has no scale or none was chosen. A value off the scale is left out with a
  warning naming the task: the item still trains the valve type.
* **group**: the task's ``patient`` (the pseudonym ``valve-id import`` writes); a task
  without one is its own group, and the count is logged.
* **key**: the task id. **path**: the image, copied into ``download_dir`` under a hash of
  its URL, so the snapshot does not change while the run prepares it.

The export and the images go through :mod:`training.labelstudio`, under the same rules as
the backend's: images from Label Studio (with its auth header) or an allowed host, local
files straight from ``LOCAL_FILES_DOCUMENT_ROOT`` when that folder is on this host,
redirects checked hop by hop; only the size cap differs (:data:`MAX_IMAGE_BYTES`: a DICOM
can be large). An image URL on a host the rules refuse fails the snapshot (the project
points somewhere valve-id does not fetch from); an image Label Studio lacks (404, 403, a
refused path or redirect, too large) leaves that task out with a warning. Connection errors
and 5xx answers are retried with backoff, then the run fails with "Label Studio unreachable".

The worker process calls :func:`configure` at start-up with the backend settings (training
code never reads the environment); label-studio-sdk is imported lazily.
No log line or message here carries a URL or patient data: tasks are named by id.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from training.labelstudio import ImageFetcher, LabelStudio, Retry
from training.shared.dataset import LabelledImage
from training.shared.errors import DatasetError, ImageFetchError, LabelStudioError
from training.shared.labels import SettingScale

__all__ = [
    "DEFAULT_IMAGE_KEY",
    "LABELSTUDIO_PREFIX",
    "MAX_IMAGE_BYTES",
    "PATIENT_KEY",
    "RETRY_DELAYS_S",
    "AnnotatedLabel",
    "LabelStudioSource",
    "configure",
    "configured_source",
    "is_project_source",
    "keypoint_centre",
    "latest_annotation",
    "latest_annotation_choice",
    "latest_choice",
    "load_project_items",
    "parse_project_source",
]

logger = logging.getLogger(__name__)

LABELSTUDIO_PREFIX = "labelstudio:"
"""A run's ``data`` of the form ``labelstudio:<project id>`` reads a Label Studio project."""
DEFAULT_IMAGE_KEY = "image"
"""Task data key of the image URL (``value="$image"`` in ``label_config.xml``)."""
PATIENT_KEY = "patient"
"""Task data key of the patient pseudonym written by ``valve-id import``."""
RETRY_DELAYS_S: tuple[float, ...] = (0.5, 1.0, 2.0)
"""Seconds to wait before each retry of a failed Label Studio request (so 4 attempts)."""
MAX_IMAGE_BYTES = 512 * 1024 * 1024
"""Largest image file downloaded, bytes (a radiograph is a few MB to a few tens of MB)."""

_EXTENSION = re.compile(r"^\.[a-z0-9]{1,5}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SHOWN_TASK_IDS = 10
"""How many task ids a warning lists before it says "and N more"."""


@dataclass(frozen=True, repr=False)
class LabelStudioSource:
    """Where the labelled data lives: the one Label Studio host and its credentials."""

    url: str
    """Label Studio base URL (``LABEL_STUDIO_URL``); images are fetched from this host only."""
    api_key: str
    """A legacy token or a Personal Access Token (``LABEL_STUDIO_API_KEY``)."""
    local_files_root: Path | None = None
    """``LOCAL_FILES_DOCUMENT_ROOT`` when it is on this host: local files are read directly."""
    allowed_hosts: tuple[str, ...] = ()
    """Image hosts besides Label Studio (``VALVE_ID_ALLOWED_HOSTS``), fetched without the key."""

    def __repr__(self) -> str:
        """Never print the key (sources end up in job arguments, logs and tracebacks)."""
        return f"LabelStudioSource(url={self.url!r}, local_files_root={self.local_files_root!r})"


_configured: LabelStudioSource | None = None


def configure(
    url: str,
    api_key: str,
    local_files_root: Path | None = None,
    allowed_hosts: Sequence[str] = (),
) -> None:
    """Set the Label Studio this process trains from (the worker calls it at start-up)."""
    global _configured
    _configured = LabelStudioSource(
        url=url,
        api_key=api_key,
        local_files_root=local_files_root,
        allowed_hosts=tuple(allowed_hosts),
    )


def configured_source() -> LabelStudioSource | None:
    """What :func:`configure` set, or None."""
    return _configured


def is_project_source(data: str) -> bool:
    """Whether a run's ``data`` names a Label Studio project rather than a manifest."""
    return str(data).startswith(LABELSTUDIO_PREFIX)


def parse_project_source(data: str) -> int:
    """``"labelstudio:12"`` → 12; anything else is a :class:`DatasetError`."""
    text = str(data)
    rest = text[len(LABELSTUDIO_PREFIX) :] if is_project_source(text) else ""
    if not rest.strip().isdigit() or int(rest) < 1:
        raise DatasetError(
            f"{text!r} is not a Label Studio data source; expected labelstudio:<project id>"
        )
    return int(rest)


def _timestamp(value: object) -> datetime:
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return _EPOCH
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return _EPOCH


def _single_choice(annotation: Mapping[str, Any], choices_name: str | None) -> str | None:
    """The one class an annotation chose (in ``choices_name`` if given), else None."""
    for result in annotation.get("result") or []:
        if not isinstance(result, Mapping) or result.get("type") != "choices":
            continue
        if choices_name is not None and result.get("from_name") != choices_name:
            continue
        values = (result.get("value") or {}).get("choices")
        if isinstance(values, list) and len(values) == 1 and isinstance(values[0], str):
            return values[0]
    return None


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def keypoint_centre(
    annotation: Mapping[str, Any],
    keypoint_name: str | None = None,
    keypoint_label: str | None = None,
) -> tuple[float, float] | None:
    """The valve centre an annotation marked, in pixels of the image file, else None.

    Reads the one ``keypointlabels`` result (from ``keypoint_name`` and carrying
    ``keypoint_label``, where given): Label Studio stores ``value.x``/``value.y`` in percent
    of the image and the image's ``original_width``/``original_height`` in pixels, so the
    centre is ``(x / 100 * original_width, y / 100 * original_height)``. None when there is
    no such result, more than one (which is meant is unclear), a value is missing or not a
    number, or the result was made on a rotated view (``image_rotation`` not a multiple of 360).
    """
    found = []
    for result in annotation.get("result") or []:
        if not isinstance(result, Mapping) or result.get("type") != "keypointlabels":
            continue
        if keypoint_name is not None and result.get("from_name") != keypoint_name:
            continue
        value = result.get("value")
        if not isinstance(value, Mapping):
            continue
        labels = value.get("keypointlabels")
        if keypoint_label is not None and not (
            isinstance(labels, list) and keypoint_label in labels
        ):
            continue
        found.append(result)
    if len(found) != 1:
        return None
    result = found[0]
    rotation = _number(result.get("image_rotation", 0))
    if rotation is None or rotation % 360 != 0:
        return None
    x, y = _number(result["value"].get("x")), _number(result["value"].get("y"))
    width, height = _number(result.get("original_width")), _number(result.get("original_height"))
    if x is None or y is None or not width or not height or width < 0 or height < 0:
        return None
    return x / 100.0 * width, y / 100.0 * height


@dataclass(frozen=True)
class AnnotatedLabel:
    """What a task's deciding annotation says (:func:`latest_annotation`)."""

    annotation_id: int
    label: str
    """The one class it chose."""
    valve_xy: tuple[float, float] | None
    """The valve centre it marked, pixels of the image file (:func:`keypoint_centre`)."""
    setting: str | None = None
    """The pressure setting it chose on its valve model's scale; None when it chose none or
    a value off the scale."""


def _setting(
    annotation: Mapping[str, Any], scale: SettingScale | None, task_id: object
) -> str | None:
    """The first choice of the annotation's ``scale.name`` result, if it is on the scale.

    A value off the scale (the config's scale changed, or an import wrote a typo) is logged
    and dropped rather than failing the snapshot: the valve type it came with still trains.
    """
    if scale is None:
        return None
    for result in annotation.get("result") or []:
        if not isinstance(result, Mapping) or result.get("type") != "choices":
            continue
        if result.get("from_name") != scale.name:
            continue
        values = (result.get("value") or {}).get("choices")
        if not isinstance(values, list) or not values:
            continue
        if values[0] in scale.values:
            return values[0]
        logger.warning(
            "task %s: setting %r is not on the %s scale; trained without a setting",
            task_id,
            values[0],
            scale.valve,
        )
        return None
    return None


def latest_annotation(
    annotations: Sequence[Mapping[str, Any]],
    choices_name: str | None = None,
    keypoint_name: str | None = None,
    keypoint_label: str | None = None,
    *,
    settings: Sequence[SettingScale] = (),
    task_id: object = None,
) -> AnnotatedLabel | None:
    """The one rule for a task's label: its newest non-cancelled annotation that chose a class.

    Newest = latest ``updated_at`` (then ``created_at``, then id), so a correction wins over
    the first answer. Cancelled (skipped) annotations, empty ones and ones choosing several
    classes do not count; None when no annotation counts (the task is not labelled). The
    valve centre comes from that same annotation, never from another one, so class and
    centre always belong together (an annotation without a keypoint: ``valve_xy`` None);
    so does the setting, read with the chosen class's scale among ``settings`` (the label
    config's :attr:`~training.shared.labels.LabelConfig.settings`; ``task_id`` names the task
    in the warning about a value off the scale). ``None`` names match any tag.
    """
    candidates = []
    for annotation in annotations:
        if not isinstance(annotation, Mapping) or annotation.get("was_cancelled"):
            continue
        chosen = _single_choice(annotation, choices_name)
        if chosen is None:
            continue
        when = _timestamp(annotation.get("updated_at") or annotation.get("created_at"))
        candidates.append((when, int(annotation.get("id") or 0), chosen, annotation))
    if not candidates:
        return None
    _, annotation_id, chosen, annotation = max(candidates, key=lambda c: (c[0], c[1]))
    centre = keypoint_centre(annotation, keypoint_name, keypoint_label)
    scale = next((s for s in settings if s.valve == chosen), None)
    return AnnotatedLabel(
        annotation_id=annotation_id,
        label=chosen,
        valve_xy=centre,
        setting=_setting(annotation, scale, task_id),
    )


def latest_choice(
    annotations: Sequence[Mapping[str, Any]], choices_name: str | None = None
) -> str | None:
    """A task's label by :func:`latest_annotation`'s rule; None when it is not labelled."""
    found = latest_annotation(annotations, choices_name)
    return None if found is None else found.label


def latest_annotation_choice(
    annotations: Sequence[Mapping[str, Any]], choices_name: str | None = None
) -> tuple[int, str] | None:
    """``(annotation id, class)`` of the annotation :func:`latest_annotation` reads."""
    found = latest_annotation(annotations, choices_name)
    return None if found is None else (found.annotation_id, found.label)


def _listing(task_ids: Sequence[object]) -> str:
    shown = ", ".join(str(t) for t in task_ids[:_SHOWN_TASK_IDS])
    more = len(task_ids) - _SHOWN_TASK_IDS
    return shown + (f" and {more} more" if more > 0 else "")


# ------------------------------------------------------------------------------ the images


def _target_name(url: str) -> str:
    """``<sha256 of the URL>.<ext>``: stable per image, never the original file name."""
    parts = urlsplit(url)
    names = parse_qs(parts.query).get("d") or [unquote(parts.path)]
    suffix = PurePosixPath(names[0]).suffix.lower()
    ext = suffix if _EXTENSION.match(suffix) else ".img"
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:32] + ext


def _fetch_image(
    fetcher: ImageFetcher, image_url: object, task_id: object, download_dir: Path
) -> Path | None:
    """Copy one task's image into ``download_dir``; None if Label Studio lacks it."""
    if not isinstance(image_url, str) or not image_url:
        raise DatasetError(
            f"task {task_id} has no image URL under the <Image> tag's data key; "
            "is the label config's image key right?"
        )
    try:
        url = fetcher.resolve(image_url)
    except ImageFetchError as exc:
        raise DatasetError(f"task {task_id}: {exc}") from None
    target = download_dir / _target_name(url)
    try:
        fetcher.save(image_url, target)
    except ImageFetchError as exc:
        if exc.transient:
            raise DatasetError(
                f"Label Studio unreachable while downloading the image of task {task_id}: {exc}"
            ) from exc
        logger.warning("task %s: left out, its image could not be fetched: %s", task_id, exc)
        return None
    return target


# ------------------------------------------------------------------------------ the snapshot


def load_project_items(
    project_id: int,
    classes: Sequence[str],
    download_dir: Path,
    *,
    image_key: str = DEFAULT_IMAGE_KEY,
    choices_name: str | None = None,
    keypoint_name: str | None = None,
    keypoint_label: str | None = None,
    settings: Sequence[SettingScale] = (),
    source: LabelStudioSource | None = None,
    client: LabelStudio | None = None,
    retry_delays_s: Sequence[float] = RETRY_DELAYS_S,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[int, int], None] | None = None,
) -> list[LabelledImage]:
    """Snapshot project ``project_id``: its labelled tasks, images copied to ``download_dir``.

    ``classes`` is the label config's full choice list; ``choices_name`` (the ``<Choices>``
    tag's name) restricts which annotation results count, ``image_key`` is the task data key
    of the image; ``keypoint_name``/``keypoint_label`` (the ``<KeyPointLabels>`` tag and its
    label) which keypoint is the valve centre (None: any keypoint result); ``settings`` (the
    label config's setting scales) where each valve model's pressure setting is read. ``source``
    defaults to what :func:`configure` set; ``client`` to a
    :class:`~training.labelstudio.LabelStudio` for it, retrying after ``retry_delays_s``.
    A task whose image Label Studio does not have (404, 403 ...) is left out with a warning;
    an unreachable Label Studio (after the retries) fails the snapshot.
    """
    source = source or _configured
    if source is None:
        raise DatasetError(
            "Label Studio is not configured for training: the worker calls "
            "training.labelstudio.export.configure() with LABEL_STUDIO_URL and "
            "LABEL_STUDIO_API_KEY at start-up"
        )
    if not source.url:
        raise DatasetError("no Label Studio URL configured (LABEL_STUDIO_URL)")
    if not source.api_key:
        raise DatasetError("no Label Studio API key configured (LABEL_STUDIO_API_KEY)")
    retry = Retry(tuple(retry_delays_s), sleep)
    if client is None:
        client = LabelStudio(source.url, source.api_key, retry=retry)
    try:
        tasks = client.export_tasks(project_id)
    except LabelStudioError as exc:
        raise DatasetError(str(exc)) from exc

    labelled: list[tuple[dict[str, Any], AnnotatedLabel]] = []
    unknown: dict[str, list[object]] = {}
    for task in tasks:
        found = latest_annotation(
            task.get("annotations") or [],
            choices_name,
            keypoint_name,
            keypoint_label,
            settings=settings,
            task_id=task.get("id"),
        )
        if found is None:
            continue
        if found.label not in classes:
            unknown.setdefault(found.label, []).append(task.get("id"))
            continue
        labelled.append((task, found))
    if unknown:
        detail = "; ".join(f"{label!r} (tasks {_listing(ids)})" for label, ids in unknown.items())
        raise DatasetError(
            f"project {project_id} has labels that are not choices of the label config: "
            f"{detail}; known classes: {list(classes)}"
        )

    try:
        fetcher = ImageFetcher(
            source.url,
            local_files_root=source.local_files_root,
            allowed_hosts=source.allowed_hosts,
            auth_headers=client.auth_headers,
            max_bytes=MAX_IMAGE_BYTES,
            retry=retry,
        )
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    download_dir = Path(download_dir)
    download_dir.mkdir(parents=True, exist_ok=True)
    items: list[LabelledImage] = []
    missing: list[object] = []
    no_patient = 0
    with fetcher:
        for done, (task, found) in enumerate(labelled, start=1):
            task_id = task.get("id")
            data = task.get("data") or {}
            path = _fetch_image(fetcher, data.get(image_key), task_id, download_dir)
            if path is None:
                missing.append(task_id)
            else:
                patient = data.get(PATIENT_KEY)
                if isinstance(patient, str | int) and str(patient).strip():
                    group = str(patient).strip()
                else:
                    group = f"task-{task_id}"
                    no_patient += 1
                items.append(
                    LabelledImage(
                        path=str(path),
                        label=found.label,
                        group=group,
                        key=str(task_id),
                        valve_xy=found.valve_xy,
                        setting=found.setting,
                    )
                )
            if progress is not None:
                progress(done, len(labelled))

    if missing:
        logger.warning(
            "project %s: %d labelled task(s) left out, their images could not be fetched: %s",
            project_id,
            len(missing),
            _listing(missing),
        )
    if no_patient:
        logger.info(
            "project %s: %d task(s) have no %r in their data; each is its own patient group",
            project_id,
            no_patient,
            PATIENT_KEY,
        )
    if labelled and not items:
        raise DatasetError(
            f"none of the {len(labelled)} labelled images of project {project_id} could be "
            "fetched from Label Studio"
        )
    logger.info(
        "project %s: %d labelled task(s) of %d exported, %d with a valve centre, "
        "%d with a pressure setting",
        project_id,
        len(items),
        len(tasks),
        sum(1 for item in items if item.valve_xy is not None),
        sum(1 for item in items if item.setting is not None),
    )
    return items
