"""``valve-id import --pacs``: X-rays from a PACS over DICOMweb become the same tasks a folder
import makes.

Query (QIDO-RS, PS3.18 §10.6): studies by date range (``StudyDate``, one query per
``ModalitiesInStudy``), then their instances by ``Modality``; ``StudyDescription`` and
``BodyPartExamined`` wildcards are matched on the answers (see :func:`_matches`). Each
instance's ``source_uid`` is computed from its SOP Instance UID *before* it is fetched,
exactly as the folder import keys a DICOM file, so an instance already in the project
(from either import) or already handled is never retrieved again. Retrieve (WADO-RS,
§10.4) asks for the instance as stored (``transfer-syntax=*``): the project's own decoder
(:func:`training.shared.dicom.load_image`) handles the compression, as it does for a file,
and the PNG and task come from the same helpers (:func:`backend.tools.importer.make_task`),
so both imports de-identify identically.

Watch mode polls every ``interval_s``. Its state (``<state>/pacs/project-<id>-<url hash>.json``)
holds the ``source_uid`` of every instance handled (imported, or failed for good) and a
cursor, the date of the last complete poll; a poll only asks for studies from the day before
it on, so polling stays cheap and a restart resumes there. The state holds keyed hashes and a
date, never a UID or patient data; losing it costs one full query, never a duplicate (the
project's own ``source_uid`` set is checked too).

Errors::

    DatasetError
     └── PacsError          the PACS is unreachable, refuses the credentials, or answers
                            a query with an error: the import stops, nothing half-done

One instance that cannot be retrieved or decoded is reported and skipped; the rest are
imported. Credentials travel only in the ``requests`` session's auth, never in a URL, a log
line or a message.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from email import policy as email_policy
from email.parser import BytesParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from dicomweb_client.api import DICOMwebClient

from backend.settings import Settings, SettingsError
from backend.tools.importer import (
    IMPORT_BATCH_SIZE,
    SOURCE_UID_KEY,
    Destination,
    ImportReport,
    check_pseudonym_key,
    dicom_identity,
    log_report,
    make_task,
    open_destination,
    send_tasks,
    source_uid,
    storage_folder,
)
from training.labelstudio import LabelStudio
from training.labelstudio.export import PATIENT_KEY
from training.shared.errors import DatasetError, ImageDecodeError

__all__ = [
    "CURSOR_LOOKBACK_DAYS",
    "DEFAULT_POLL_INTERVAL_S",
    "PACS_TIMEOUT_S",
    "QIDO_PAGE_SIZE",
    "PacsError",
    "PacsQuery",
    "PacsState",
    "import_from_pacs",
    "pacs_client",
    "watch_pacs",
]

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 30.0
"""Seconds between two polls in watch mode: a new X-ray is a task within about a minute."""
CURSOR_LOOKBACK_DAYS = 1
"""Days before the last complete poll a watch poll still asks for (midnight, late arrivals)."""
PACS_TIMEOUT_S = 30.0
"""Seconds one DICOMweb request may take before the PACS counts as unreachable."""
QIDO_PAGE_SIZE = 100
"""Results per QIDO-RS request (``limit``/``offset``): servers cap unpaged answers."""

_STATE_VERSION = 1
_WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_STUDY_UID, _SERIES_UID, _SOP_UID = "0020000D", "0020000E", "00080018"
_STUDY_DESCRIPTION, _BODY_PART = "00081030", "00180015"


class PacsError(DatasetError):
    """The PACS cannot be queried (unreachable, credentials refused, query refused)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status the PACS answered, None when it did not answer."""

    @property
    def refused_login(self) -> bool:
        """Retrying cannot help: the credentials are wrong."""
        return self.status in (401, 403)


@dataclass(frozen=True)
class PacsQuery:
    """Which instances to import; an empty field does not filter."""

    modalities: tuple[str, ...] = ()
    """E.g. ("CR", "DX"): one study query per modality, instances filtered by it."""
    since: date | None = None
    """Earliest StudyDate (inclusive)."""
    until: date | None = None
    """Latest StudyDate (inclusive)."""
    body_part: str = ""
    """BodyPartExamined (DICOM matching: ``*`` and ``?`` wildcards)."""
    study_description: str = ""
    """StudyDescription (DICOM matching: ``*`` and ``?`` wildcards)."""


@dataclass(frozen=True)
class _Instance:
    study: str
    series: str
    sop: str


@dataclass
class PacsState:
    """What a project's PACS import has handled, persisted between runs and restarts."""

    path: Path
    cursor: date | None = None
    """Date of the last complete watch poll."""
    handled: set[str] = field(default_factory=set)
    """``source_uid`` of instances imported, or refused for good (undecodable)."""

    @classmethod
    def load(cls, state_dir: Path, project_id: int, url: str) -> PacsState:
        """The state of (project, PACS); a fresh one when none was saved."""
        tag = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:12]
        path = state_dir / "pacs" / f"project-{project_id}-{tag}.json"
        if not path.is_file():
            return cls(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            cursor = date.fromisoformat(raw["cursor"]) if raw.get("cursor") else None
            return cls(path, cursor, set(raw.get("handled", [])))
        except (ValueError, KeyError, TypeError, AttributeError):
            logger.warning("PACS import state %s is unreadable; starting over", path)
            return cls(path)

    def save(self) -> None:
        """Atomic, so a crash mid-write keeps the previous state."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "version": _STATE_VERSION,
            "cursor": self.cursor.isoformat() if self.cursor else None,
            "handled": sorted(self.handled),
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(body, fh)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ------------------------------------------------------------------------------ the client


def pacs_client(settings: Settings) -> DICOMwebClient:
    """A DICOMweb client for ``VALVE_ID_DICOMWEB_URL``, credentials in the session only."""
    if not settings.dicomweb_url:
        raise SettingsError(
            "VALVE_ID_DICOMWEB_URL is not set: valve-id import --pacs needs the PACS's "
            "DICOMweb root, e.g. http://pacs.example:8042/dicom-web"
        )
    session = requests.Session()
    if settings.dicomweb_user:
        session.auth = (settings.dicomweb_user, settings.dicomweb_password)
    client = DICOMwebClient(settings.dicomweb_url.rstrip("/"), session=session)
    client.set_http_retry_params(retry=False)
    # dicomweb-client has no timeout setting; without one a silent PACS hangs the watch.
    session.request = _with_timeout(session.request)  # type: ignore[method-assign]
    return client


def _with_timeout(request: Callable[..., requests.Response]) -> Callable[..., requests.Response]:
    def timed(*args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", PACS_TIMEOUT_S)
        return request(*args, **kwargs)

    return timed


def _where(client: DICOMwebClient) -> str:
    """The PACS as a message names it: scheme, host and port only."""
    parts = urlsplit(client.base_url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _pacs_error(client: DICOMwebClient, exc: Exception, doing: str) -> PacsError:
    """One clear line: what failed and what to do; never a URL path, UID or credential."""
    where = _where(client)
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return PacsError(
            f"the PACS at {where} refused the credentials (HTTP {status}) while {doing}; "
            "check VALVE_ID_DICOMWEB_USER and VALVE_ID_DICOMWEB_PASSWORD",
            status,
        )
    if status is not None:
        return PacsError(
            f"the PACS at {where} answered HTTP {status} while {doing}; is "
            "VALVE_ID_DICOMWEB_URL its DICOMweb root (e.g. .../dicom-web)?",
            status,
        )
    return PacsError(
        f"the PACS at {where} is unreachable while {doing} ({type(exc).__name__}); is "
        "VALVE_ID_DICOMWEB_URL right and the PACS running?"
    )


# ------------------------------------------------------------------------------ QIDO-RS


def _date_range(since: date | None, until: date | None) -> str | None:
    """A DICOM date range (PS3.4 C.2.2.2.5): ``from-to``, ``from-`` or ``-to``."""
    if since is None and until is None:
        return None
    fmt = "%Y%m%d"
    return f"{since.strftime(fmt) if since else ''}-{until.strftime(fmt) if until else ''}"


def _paged(search: Callable[..., list[dict[str, Any]]], **kwargs: Any) -> Iterator[dict[str, Any]]:
    """Every result of a QIDO-RS search, ``QIDO_PAGE_SIZE`` per request."""
    offset = 0
    while True:
        page = search(limit=QIDO_PAGE_SIZE, offset=offset, **kwargs)
        yield from page
        if len(page) < QIDO_PAGE_SIZE:
            return
        offset += len(page)


def _value(item: dict[str, Any], tag: str) -> str:
    values = (item.get(tag) or {}).get("Value") or [""]
    return str(values[0]).strip()


def _matches(pattern: str, value: str) -> bool:
    """DICOM wildcard matching (PS3.4 C.2.2.2.4: ``*``, ``?``), done here, not by the PACS.

    Why: dicomweb-client percent-encodes ``*``, ``?`` and spaces in query values, as it
    should, and Orthanc 1.10 then matches them literally (``Shunt check`` and ``Shunt*``
    find nothing). Text filters are therefore applied to the QIDO answers; the date range and
    modality, which hold no such characters, still narrow the query at the PACS."""
    if not pattern:
        return True
    return fnmatch.fnmatchcase(value, pattern.replace("[", "[[]"))


def _study_filters(query: PacsQuery, since: date | None) -> list[dict[str, str]]:
    base: dict[str, str] = {}
    dates = _date_range(since, query.until)
    if dates:
        base["StudyDate"] = dates
    if not query.modalities:
        return [base]
    return [{**base, "ModalitiesInStudy": m} for m in query.modalities]


def _instance_filters(query: PacsQuery) -> list[dict[str, str]]:
    if not query.modalities:
        return [{}]
    return [{"Modality": m} for m in query.modalities]


def _find(client: DICOMwebClient, query: PacsQuery, since: date | None) -> list[_Instance]:
    """Every instance matching ``query`` (studies from ``since`` on), each once, in order."""
    found: dict[str, _Instance] = {}
    try:
        studies: dict[str, None] = {}
        for filters in _study_filters(query, since):
            for item in _paged(
                client.search_for_studies, search_filters=filters, fields=["StudyDescription"]
            ):
                if _matches(query.study_description, _value(item, _STUDY_DESCRIPTION)):
                    studies.setdefault(_value(item, _STUDY_UID))
        for study in studies:
            for filters in _instance_filters(query):
                for item in _paged(
                    client.search_for_instances,
                    study_instance_uid=study,
                    search_filters=filters,
                    fields=["BodyPartExamined"],
                ):
                    if not _matches(query.body_part, _value(item, _BODY_PART)):
                        continue
                    sop = _value(item, _SOP_UID)
                    series = _value(item, _SERIES_UID)
                    if sop and series:
                        found.setdefault(sop, _Instance(study, series, sop))
    except (requests.RequestException, ValueError) as exc:
        raise _pacs_error(client, exc, "searching (QIDO-RS)") from exc
    return list(found.values())


# ------------------------------------------------------------------------------ WADO-RS


def _retrieve(client: DICOMwebClient, instance: _Instance) -> bytes:
    """The instance's bytes as stored (WADO-RS, ``transfer-syntax=*``).

    Not ``retrieve_instance``: it parses each part with ``pydicom.dcmread`` without
    ``force``, which refuses a Part 10 body without the 128-byte preamble, and Orthanc's
    DICOMweb plugin sends exactly that for ``transfer-syntax=*``. So the request goes through
    the client's own session (its auth and timeout) and the raw part goes to the project's
    decoder, which reads DICOM with or without a preamble, as for a file."""
    url = (
        f"{client.base_url}/studies/{instance.study}/series/{instance.series}"
        f"/instances/{instance.sop}"
    )
    answer = client._session.get(url, headers={"Accept": _WADO_ACCEPT})
    answer.raise_for_status()
    parts = _multipart_parts(answer.headers.get("Content-Type", ""), answer.content)
    if len(parts) != 1:
        raise ImageDecodeError(f"the PACS sent {len(parts)} parts for one instance")
    return parts[0]


def _multipart_parts(content_type: str, body: bytes) -> list[bytes]:
    """The bodies of a ``multipart/related`` message (RFC 2387), with the stdlib parser."""
    message = BytesParser(policy=email_policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + body
    )
    if not message.is_multipart():
        return [body] if content_type.startswith("application/dicom") else []
    return [
        part.get_payload(decode=True) or b""  # type: ignore[misc]
        for part in message.iter_parts()
    ]


def _fatal(exc: requests.RequestException) -> bool:
    """Whether a failed retrieve stops the import (the PACS, not the instance, is at fault)."""
    status = getattr(exc.response, "status_code", None)
    return status is None or status in (401, 403)


# ------------------------------------------------------------------------------ one poll


def import_from_pacs(
    query: PacsQuery,
    *,
    settings: Settings,
    client: LabelStudio,
    pacs: DICOMwebClient,
    project_id: int | None,
    create: bool = False,
    storage_root: Path | None = None,
    use_cursor: bool = False,
    destination: Destination | None = None,
) -> ImportReport:
    """Import every matching instance not yet in the project or handled before.

    ``use_cursor`` (watch mode) narrows the study query to the days since the last complete
    poll and advances the cursor after it. Raises :class:`PacsError` when the PACS cannot be
    queried, :class:`SettingsError` without a usable key or storage folder."""
    if destination is None:
        destination = _destination(settings, client, project_id, create, storage_root)
    state = PacsState.load(settings.state_dir, destination.project_id, pacs.base_url)
    started = date.today()
    since = query.since
    if use_cursor and state.cursor is not None:
        resume = state.cursor - timedelta(days=CURSOR_LOOKBACK_DAYS)
        since = max(since, resume) if since else resume
    report = ImportReport(project_id=destination.project_id)
    try:
        _import_instances(_find(pacs, query, since), pacs, destination, state, report)
    finally:
        state.save()  # what was handled stays handled, even when the PACS went away mid-way
    if use_cursor:
        state.cursor = started
        state.save()
    log_report(report, source="PACS import")
    return report


def _destination(
    settings: Settings,
    client: LabelStudio,
    project_id: int | None,
    create: bool,
    storage_root: Path | None,
) -> Destination:
    key = check_pseudonym_key(settings)
    folder, relative = storage_folder(settings, storage_root)
    return open_destination(
        settings,
        client,
        project_id=project_id,
        create=create,
        folder=folder,
        relative=relative,
        key=key,
    )


def _import_instances(
    instances: list[_Instance],
    pacs: DICOMwebClient,
    destination: Destination,
    state: PacsState,
    report: ImportReport,
) -> None:
    batch: list[tuple[str, dict[str, Any]]] = []
    try:
        for instance in instances:
            uid = source_uid("sop", instance.sop, destination.key)
            if uid in destination.known or uid in state.handled:
                report.skipped_duplicates += 1
                continue
            task = _import_one(instance, pacs, destination, state, report)
            if task is not None:
                batch.append((instance.sop, task))
            if len(batch) >= IMPORT_BATCH_SIZE:
                _send(destination, batch, state, report)
    finally:
        _send(destination, batch, state, report)


def _send(
    destination: Destination,
    batch: list[tuple[str, dict[str, Any]]],
    state: PacsState,
    report: ImportReport,
) -> None:
    """Send a batch; only tasks Label Studio accepted become handled."""
    before = set(report.failed)
    uids = [(sop, data[SOURCE_UID_KEY]) for sop, data in batch]
    send_tasks(destination, batch, report)
    refused = set(report.failed) - before
    state.handled.update(uid for sop, uid in uids if sop not in refused)


def _import_one(
    instance: _Instance,
    pacs: DICOMwebClient,
    destination: Destination,
    state: PacsState,
    report: ImportReport,
) -> dict[str, Any] | None:
    """One instance → its task data, or None when it failed (recorded in the report)."""
    from training.shared.dicom import load_image, read_dicom_header

    try:
        raw = _retrieve(pacs, instance)
    except requests.RequestException as exc:
        if _fatal(exc):
            raise _pacs_error(pacs, exc, "retrieving (WADO-RS)") from exc
        status = exc.response.status_code if exc.response is not None else "?"
        report.failed[instance.sop] = f"the PACS did not send it (HTTP {status}); retried next run"
        return None
    name = f"instance {instance.sop}"
    try:
        header = read_dicom_header(raw, name=name)
        found = dicom_identity(
            header, destination.key, content=lambda: hashlib.sha256(raw).hexdigest()
        )
        # The UID the PACS listed decides (the one checked before retrieving), so a header
        # that disagrees cannot create a second task.
        found = replace(found, uid=source_uid("sop", instance.sop, destination.key))
        task = make_task(destination, found, lambda: load_image(raw, name=name))
    except ImageDecodeError as exc:
        report.failed[instance.sop] = str(exc)
        state.handled.add(source_uid("sop", instance.sop, destination.key))
        return None
    report.without_patient += PATIENT_KEY not in task
    report.burned_in += found.burned_in
    return task


# ------------------------------------------------------------------------------ watch mode


def watch_pacs(
    query: PacsQuery,
    *,
    settings: Settings,
    client: LabelStudio,
    pacs: DICOMwebClient,
    project_id: int | None,
    create: bool = False,
    storage_root: Path | None = None,
    interval_s: float = DEFAULT_POLL_INTERVAL_S,
    stop: threading.Event | None = None,
    on_poll: Callable[[ImportReport], None] | None = None,
) -> None:
    """Poll until ``stop`` is set (or forever): each poll is :func:`import_from_pacs` with
    the cursor. A PACS that is down for one poll is logged and retried at the next one;
    a refused login stops the watch (retrying cannot fix it)."""
    stop = stop or threading.Event()
    destination = _destination(settings, client, project_id, create, storage_root)
    while not stop.is_set():
        try:
            report = import_from_pacs(
                query,
                settings=settings,
                client=client,
                pacs=pacs,
                project_id=destination.project_id,
                use_cursor=True,
                destination=destination,
            )
        except PacsError as exc:
            if exc.refused_login:
                raise
            logger.warning("%s; polling again in %.0f s", exc, interval_s)
        else:
            if on_poll is not None:
                on_poll(report)
        stop.wait(interval_s)
