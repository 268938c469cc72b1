"""A Label Studio project's labelled tasks, as the snapshot a training run learns from.

A run started with ``data="labelstudio:<project id>"`` trains on whatever Label Studio says
*at the moment the run starts*: the project's export (``GET /api/projects/{id}/export``,
through label-studio-sdk) is the source of truth, never the webhooks the backend happened to
see. Each labelled task becomes a :class:`~training.dataset.LabelledImage`:

* **label**: the one class chosen by the task's *latest* non-cancelled annotation that chose
  one (:func:`latest_choice`; latest = most recently updated, so an annotator's correction
  wins). A task whose annotations are all cancelled (skipped) or empty is not labelled. A
  label outside ``classes`` means the label config changed under the run:
  :class:`DatasetError` names it.
* **valve_xy**: the valve centre the *same* annotation marked with the label config's
  ``<KeyPointLabels>`` (:func:`latest_annotation`), converted from Label Studio's percent of
  the image to pixels of the image file; None when that annotation has no (or more than one)
  such keypoint, or was made on a rotated view.
* **group**: the task's ``patient`` (the pseudonym ``valve-id import`` writes); a task
  without one is its own group, and the count is logged.
* **key**: the task id. **path**: the image, copied into ``download_dir`` under a hash of
  its URL, so the snapshot does not change while the run prepares it.

Images come only from the configured Label Studio host, with the SDK's auth header (a
legacy ``Token`` or the ``Bearer`` access token the SDK obtained for a Personal Access
Token); redirects are not followed, any other host is refused. A local-files URL is read
straight from ``LOCAL_FILES_DOCUMENT_ROOT`` when that folder is on this host, with the path
confined to it. Connection errors and 5xx answers are retried with backoff, then the run
fails with "Label Studio unreachable".

The worker process calls :func:`configure` at start-up with the backend settings (training
code never reads the environment); label-studio-sdk and httpx are imported lazily.
No log line or message here carries a URL or patient data: tasks are named by id.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

from training.dataset import LabelledImage
from training.errors import DatasetError

if TYPE_CHECKING:  # pragma: no cover
    import httpx
    from label_studio_sdk import LabelStudio

__all__ = [
    "DEFAULT_IMAGE_KEY",
    "DOWNLOAD_TIMEOUT_S",
    "EXPORT_TIMEOUT_S",
    "LABELSTUDIO_PREFIX",
    "MAX_IMAGE_BYTES",
    "PATIENT_KEY",
    "RETRY_DELAYS_S",
    "AnnotatedLabel",
    "LabelStudioSource",
    "auth_headers",
    "configure",
    "configured_source",
    "is_project_source",
    "keypoint_centre",
    "latest_annotation",
    "latest_annotation_choice",
    "latest_choice",
    "load_project_items",
    "make_sdk_client",
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
EXPORT_TIMEOUT_S = 300.0
"""Seconds Label Studio may take to build a project's export (large projects are slow)."""
DOWNLOAD_TIMEOUT_S = 60.0
"""Seconds to connect / between bytes of one image download."""
MAX_IMAGE_BYTES = 512 * 1024 * 1024
"""Largest image file downloaded, bytes (a radiograph is a few MB to a few tens of MB)."""

_CHUNK_BYTES = 1 << 20
_EXTENSION = re.compile(r"^\.[a-z0-9]{1,5}$")
_LOCAL_FILES_PATH = "/data/local-files"
_RETRY_STATUSES = frozenset({408, 429})
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

    def __repr__(self) -> str:
        """Never print the key (sources end up in job arguments, logs and tracebacks)."""
        return f"LabelStudioSource(url={self.url!r}, local_files_root={self.local_files_root!r})"


_configured: LabelStudioSource | None = None


def configure(url: str, api_key: str, local_files_root: Path | None = None) -> None:
    """Set the Label Studio this process trains from (the worker calls it at start-up)."""
    global _configured
    _configured = LabelStudioSource(url=url, api_key=api_key, local_files_root=local_files_root)


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


def make_sdk_client(url: str, api_key: str, *, timeout_s: float = 60.0) -> LabelStudio:
    """A label-studio-sdk client; it tells a legacy token from a Personal Access Token itself.

    With a PAT (a JWT refresh token) the SDK exchanges it for a short-lived access token at
    ``/api/token/refresh/`` and renews it when it expires.
    """
    if not url:
        raise DatasetError("no Label Studio URL configured (LABEL_STUDIO_URL)")
    if not api_key:
        raise DatasetError("no Label Studio API key configured (LABEL_STUDIO_API_KEY)")
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    try:
        return LabelStudio(base_url=url.rstrip("/"), api_key=api_key, timeout=timeout_s)
    except ApiError as exc:  # an expired Personal Access Token is refused right here
        raise DatasetError(
            f"LABEL_STUDIO_API_KEY cannot be used: {_api_error_detail(exc)}"
        ) from exc


def _api_error_detail(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        return body["detail"]
    status = getattr(exc, "status_code", None)
    return f"HTTP {status}" if status is not None else type(exc).__name__


def auth_headers(client: LabelStudio) -> dict[str, str]:
    """The ``Authorization`` header the SDK itself sends (``Token …`` or ``Bearer …``).

    label-studio-sdk 2.1.2 has no public accessor for it; its client wrapper builds every
    request's headers with ``get_headers()``, refreshing a PAT's access token when needed,
    so this stays right for both token kinds.
    """
    wrapper = getattr(client, "_client_wrapper", None)
    if wrapper is None or not hasattr(wrapper, "get_headers"):
        raise DatasetError("this label-studio-sdk version does not expose its auth headers")
    headers = wrapper.get_headers()
    return {k: v for k, v in headers.items() if k.lower() == "authorization"}


# ------------------------------------------------------------------------------ retrying


class _Transient(Exception):
    """A download answered with a status worth retrying (5xx, 408, 429)."""

    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        super().__init__(f"HTTP {status_code}")


def _with_retries(
    action: Callable[[], Any],
    what: str,
    delays_s: Sequence[float],
    sleep: Callable[[float], None],
) -> Any:
    """Run ``action``; on a transient failure wait ``delays_s[i]`` and try again."""
    import httpx
    from label_studio_sdk.core.api_error import ApiError

    attempts = len(delays_s) + 1
    for attempt in range(attempts):
        try:
            return action()
        except (httpx.TransportError, _Transient, ApiError) as exc:
            status = getattr(exc, "status_code", None)
            if not isinstance(exc, httpx.TransportError) and not _is_transient_status(status):
                raise DatasetError(
                    f"Label Studio refused {what}: HTTP {status}"
                    + (" (check LABEL_STUDIO_API_KEY)" if status in (401, 403) else "")
                ) from exc
            if attempt == attempts - 1:
                raise DatasetError(
                    f"Label Studio unreachable while {what} ({attempts} attempts): {_describe(exc)}"
                ) from exc
            logger.warning(
                "Label Studio request failed while %s (%s); retrying in %.1f s",
                what,
                _describe(exc),
                delays_s[attempt],
            )
            sleep(delays_s[attempt])
    raise AssertionError("unreachable")  # pragma: no cover


def _is_transient_status(status: int | None) -> bool:
    return status is not None and (status >= 500 or status in _RETRY_STATUSES)


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"HTTP {status}"
    return type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------ the export


def _export_tasks(
    client: LabelStudio,
    project_id: int,
    delays_s: Sequence[float],
    sleep: Callable[[float], None],
) -> list[dict[str, Any]]:
    """The project's annotated tasks as Label Studio exports them (JSON)."""

    def download() -> bytes:
        chunks = client.projects.exports.download_sync(
            id=project_id,
            export_type="JSON",
            download_all_tasks=False,
            request_options={"timeout_in_seconds": EXPORT_TIMEOUT_S, "max_retries": 0},
        )
        return b"".join(chunks)

    raw = _with_retries(download, f"exporting project {project_id}", delays_s, sleep)
    try:
        tasks = json.loads(raw)
    except ValueError as exc:
        raise DatasetError(f"the export of project {project_id} is not JSON") from exc
    if not isinstance(tasks, list):
        raise DatasetError(f"the export of project {project_id} is not a list of tasks")
    return [t for t in tasks if isinstance(t, dict)]


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


def latest_annotation(
    annotations: Sequence[Mapping[str, Any]],
    choices_name: str | None = None,
    keypoint_name: str | None = None,
    keypoint_label: str | None = None,
) -> AnnotatedLabel | None:
    """The one rule for a task's label: its newest non-cancelled annotation that chose a class.

    Newest = latest ``updated_at`` (then ``created_at``, then id), so a correction wins over
    the first answer. Cancelled (skipped) annotations, empty ones and ones choosing several
    classes do not count; None when no annotation counts (the task is not labelled). The
    valve centre comes from that same annotation, never from another one, so class and
    centre always belong together (an annotation without a keypoint: ``valve_xy`` None).
    ``None`` names match any tag.
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
    return AnnotatedLabel(annotation_id=annotation_id, label=chosen, valve_xy=centre)


def latest_choice(
    annotations: Sequence[Mapping[str, Any]], choices_name: str | None = None
) -> str | None:
    """A task's label by :func:`latest_annotation`'s rule; None when it is not labelled."""
    found = latest_annotation(annotations, choices_name)
    return None if found is None else found.label


def latest_annotation_choice(
    annotations: Sequence[Mapping[str, Any]], choices_name: str | None = None
) -> tuple[int, str] | None:
    """``(annotation id, class)`` of the annotation :func:`latest_annotation` reads.

    The backend's label counting uses the same rule, so what it counts as labelled is what a
    training snapshot trains on.
    """
    found = latest_annotation(annotations, choices_name)
    return None if found is None else (found.annotation_id, found.label)


def _listing(task_ids: Sequence[object]) -> str:
    shown = ", ".join(str(t) for t in task_ids[:_SHOWN_TASK_IDS])
    more = len(task_ids) - _SHOWN_TASK_IDS
    return shown + (f" and {more} more" if more > 0 else "")


# ------------------------------------------------------------------------------ the images


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def _resolve_url(image_url: str, base_url: str, task_id: object) -> str:
    """Absolute URL on the Label Studio host; any other host or scheme is refused."""
    base = base_url.rstrip("/") + "/"
    absolute = urljoin(base, image_url.lstrip("/")) if image_url.startswith("/") else image_url
    scheme, host, port = _origin(absolute)
    if scheme not in ("http", "https"):
        raise DatasetError(
            f"task {task_id}: its image is not an http(s) URL on Label Studio "
            "(valve-id reads uploaded and local-files images only)"
        )
    if (scheme, host, port) != _origin(base):
        raise DatasetError(
            f"task {task_id}: its image is on host {host!r}, not on the configured Label Studio "
            f"host {_origin(base)[1]!r}; valve-id fetches images from Label Studio only"
        )
    return absolute


def _local_file(url: str, base_url: str, root: Path | None) -> Path | None:
    """The file a ``/data/local-files/?d=…`` URL names under ``root``, if it is there."""
    if root is None:
        return None
    parts = urlsplit(url)
    base_path = urlsplit(base_url).path.rstrip("/")
    path = parts.path[len(base_path) :] if parts.path.startswith(base_path) else parts.path
    if path.rstrip("/") != _LOCAL_FILES_PATH:
        return None
    values = parse_qs(parts.query).get("d")
    if not values:
        return None
    relative = PurePosixPath(unquote(values[0]))
    if relative.is_absolute() or ".." in relative.parts:
        return None
    root = root.resolve()
    candidate = (root / relative).resolve()
    if not candidate.is_relative_to(root) or candidate == root or not candidate.is_file():
        return None
    return candidate


def _target_name(url: str) -> str:
    """``<sha256 of the URL>.<ext>``: stable per image, never the original file name."""
    parts = urlsplit(url)
    names = parse_qs(parts.query).get("d") or [unquote(parts.path)]
    suffix = PurePosixPath(names[0]).suffix.lower()
    ext = suffix if _EXTENSION.match(suffix) else ".img"
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:32] + ext


def _atomic_write(target: Path, chunks: Iterator[bytes]) -> None:
    """Write ``chunks`` to a temporary file beside ``target``, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".download-", suffix=".tmp")
    try:
        written = 0
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                written += len(chunk)
                if written > MAX_IMAGE_BYTES:
                    raise _TooLarge
                fh.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _TooLarge(Exception):
    """An image larger than :data:`MAX_IMAGE_BYTES`."""


class _Missing(Exception):
    """Label Studio answered this one image with a client error (404, 403, a redirect ...)."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"HTTP {status}")


def _copy_local(source: Path, target: Path) -> None:
    if target.is_file() and target.stat().st_size == source.stat().st_size:
        return
    if source.stat().st_size > MAX_IMAGE_BYTES:
        raise _TooLarge

    def chunks() -> Iterator[bytes]:
        with source.open("rb") as fh:
            while chunk := fh.read(_CHUNK_BYTES):
                yield chunk

    _atomic_write(target, chunks())


def _download(http: httpx.Client, url: str, headers: Mapping[str, str], target: Path) -> None:
    """GET ``url`` into ``target`` (kept when it already has the announced size)."""
    with http.stream("GET", url, headers=dict(headers)) as response:
        status = response.status_code
        if status >= 500 or status in _RETRY_STATUSES:
            raise _Transient(status)
        if status != 200:
            raise _Missing(status)
        length = response.headers.get("content-length")
        if length is not None and length.isdigit():
            if int(length) > MAX_IMAGE_BYTES:
                raise _TooLarge
            if target.is_file() and target.stat().st_size == int(length):
                return
        _atomic_write(target, response.iter_bytes(_CHUNK_BYTES))


def _fetch_image(
    image_url: object,
    task_id: object,
    source: LabelStudioSource,
    download_dir: Path,
    fetch: Callable[[str, Path], None],
    delays_s: Sequence[float],
    sleep: Callable[[float], None],
) -> Path | None:
    """Copy one task's image into ``download_dir``; None if Label Studio lacks it."""
    if not isinstance(image_url, str) or not image_url:
        raise DatasetError(
            f"task {task_id} has no image URL under the <Image> tag's data key; "
            "is the label config's image key right?"
        )
    url = _resolve_url(image_url, source.url, task_id)
    target = download_dir / _target_name(url)
    try:
        local = _local_file(url, source.url, source.local_files_root)
        if local is not None:
            _copy_local(local, target)
        else:
            _with_retries(
                lambda: fetch(url, target),
                f"downloading the image of task {task_id}",
                delays_s,
                sleep,
            )
    except _Missing as exc:
        logger.warning("task %s: Label Studio has no image for it (HTTP %s)", task_id, exc.status)
        return None
    except _TooLarge:
        logger.warning("task %s: its image is larger than %d bytes", task_id, MAX_IMAGE_BYTES)
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
    label) which keypoint is the valve centre (None: any keypoint result). ``source``
    defaults to what :func:`configure` set; ``client`` to an SDK client for it. A task whose
    image Label Studio does not have (404, 403 ...) is left out with a warning; an
    unreachable Label Studio (after the retries) fails the snapshot.
    """
    source = source or _configured
    if source is None:
        raise DatasetError(
            "Label Studio is not configured for training: the worker calls "
            "training.labelstudio_source.configure() with LABEL_STUDIO_URL and "
            "LABEL_STUDIO_API_KEY at start-up"
        )
    if client is None:
        client = make_sdk_client(source.url, source.api_key)
    tasks = _export_tasks(client, project_id, retry_delays_s, sleep)

    labelled: list[tuple[dict[str, Any], AnnotatedLabel]] = []
    unknown: dict[str, list[object]] = {}
    for task in tasks:
        found = latest_annotation(
            task.get("annotations") or [], choices_name, keypoint_name, keypoint_label
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

    import httpx

    download_dir = Path(download_dir)
    download_dir.mkdir(parents=True, exist_ok=True)
    items: list[LabelledImage] = []
    missing: list[object] = []
    no_patient = 0
    with httpx.Client(timeout=DOWNLOAD_TIMEOUT_S, follow_redirects=False) as http:

        def fetch(url: str, target: Path) -> None:
            _download(http, url, auth_headers(client), target)

        for done, (task, found) in enumerate(labelled, start=1):
            task_id = task.get("id")
            data = task.get("data") or {}
            path = _fetch_image(
                data.get(image_key), task_id, source, download_dir, fetch, retry_delays_s, sleep
            )
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
        "project %s: %d labelled task(s) of %d exported, %d with a valve centre",
        project_id,
        len(items),
        len(tasks),
        sum(1 for item in items if item.valve_xy is not None),
    )
    return items
