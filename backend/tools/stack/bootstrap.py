"""Set up the valve-id project inside a running Label Studio, idempotently.

Each step looks before it writes, so ``valve-id up`` can run any number of times:

1. :func:`ensure_project` — the project from ``label_config.xml``, found by title first;
2. :func:`import_demo` — the synthetic demo DICOMs through :mod:`backend.tools.importer`
(local-files
   storage, de-identified PNGs, pseudonymous patients; images already there are skipped),
   and the reading guides' pictures (:mod:`backend.tools.guides`);
3. :func:`seed_annotations` — a few labels from the demo manifest's true classes, whole
   patients across all classes, so the first training run has enough patients for its folds;
   each with the true valve centre as a keypoint and the true setting when the project's
   config has the keypoint tag and that model's setting scale;
4. :func:`connect_backend` — the ML backend with basic auth, and the webhook Label Studio
   creates for it given the same credentials (it has none by default: docs/PROTOCOL.md);
5. the review view (:meth:`training.labelstudio.LabelStudio.ensure_review_view`);
6. :func:`start_first_training` / :func:`sync_served_version` — nothing served yet: "Start
   training"; a version served that the project does not show yet: a re-scoring job.

The provisioning calls here (projects, annotations, ML backends, webhooks) are what a person
would click once, not part of the loop; they go through the same
:class:`training.labelstudio.LabelStudio` as everything else (its retries, its errors), as
REST routes the SDK types too narrowly (:meth:`~training.labelstudio.LabelStudio.request`).
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from backend.service.labelstudio import (
    choice_result,
    keypoint_result,
    label_studio_client,
    setting_result,
)
from backend.settings import Settings
from backend.tools.importer import ImportReport, import_folder, source_uid
from training.labelstudio import LabelStudio
from training.shared.errors import DatasetError, LabelConfigError, LabelStudioError
from training.shared.labels import LabelConfig, parse_label_config

__all__ = [
    "ML_BACKEND_TITLE",
    "PROJECT_TITLE",
    "DemoImage",
    "LabelStudioAdmin",
    "basic_auth_header",
    "backend_description",
    "connect_backend",
    "demo_images",
    "ensure_project",
    "import_demo",
    "seed_annotations",
    "seed_line",
    "seed_result",
    "start_first_training",
    "sync_served_version",
]

logger = logging.getLogger(__name__)

PROJECT_TITLE = "valve-id demo"
"""Title of the project ``valve-id up`` creates (and finds again)."""
ML_BACKEND_TITLE = "valve-id"
"""Title of the ML backend connection in the project's settings."""
PROJECT_DESCRIPTION = (
    "Synthetic skull X-rays (no patient data). Pick the valve model; valve-id pre-selects "
    "its guess and the review view lists the most uncertain X-rays first."
)
REQUEST_TIMEOUT_S = 120.0
"""Connecting a backend makes Label Studio call it (health, setup) before it answers."""
PAGE_SIZE = 100
"""Tasks per page when listing (Label Studio's own maximum page)."""


def backend_description(retrain_every_n_labels: int) -> str:
    """What Settings → Model says about the connection: what triggers training.

    valve-id retrains from the project webhook after every N new labels, and at once on "Start
    Training". Label Studio's own "Start model training on annotation submission" toggle stays
    off: on, it sends START_TRAINING after *every* submission (its counter is set to 1), and a
    run per label is what the label threshold exists to avoid.
    """
    return (
        f"Pre-selects the valve model and ranks the review queue. Retrains by itself after every "
        f"{retrain_every_n_labels} new labels (project webhook) and at once on 'Start Training'. "
        "Leave 'Start model training on annotation submission' off: it would start a run "
        "after every single submission."
    )


def basic_auth_header(user: str, password: str) -> str:
    """``Basic <base64(user:password)>``."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


class LabelStudioAdmin:
    """The provisioning calls, over the shared client with the admin's token."""

    def __init__(
        self, url: str, token: str, *, http: httpx.Client | None = None, timeout_s: float = 60.0
    ) -> None:
        # trust_env=False: the stack's Label Studio is on this host, never behind a proxy.
        self.label_studio = LabelStudio(
            url,
            token,
            http=http or httpx.Client(timeout=timeout_s, trust_env=False),
            timeout_s=timeout_s,
        )
        self.url = self.label_studio.url

    def __repr__(self) -> str:
        return f"LabelStudioAdmin(url={self.url!r})"

    def close(self) -> None:
        self.label_studio.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One call; JSON answer (or None when empty); LabelStudioError on failure."""
        return self.label_studio.request(method, path, **kwargs)

    # -- projects and tasks -------------------------------------------------------------

    def find_project(self, title: str) -> dict[str, Any] | None:
        """The oldest project with exactly this title (``GET /api/projects/?title=``)."""
        found = self.request("GET", "/api/projects/", params={"title": title, "page_size": 1000})
        rows = found.get("results", []) if isinstance(found, dict) else found or []
        exact = sorted((p for p in rows if p.get("title") == title), key=lambda p: p["id"])
        return exact[0] if exact else None

    def project(self, project_id: int) -> dict[str, Any]:
        return dict(self.request("GET", f"/api/projects/{project_id}/"))

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        return dict(self.request("PATCH", f"/api/projects/{project_id}/", json=fields))

    def tasks(self, project_id: int, *, fields: str = "all") -> Iterator[dict[str, Any]]:
        """Every task of the project, by pages (``GET /api/tasks/?project=``)."""
        page = 1
        while True:
            try:
                body = self.request(
                    "GET",
                    "/api/tasks/",
                    params={
                        "project": project_id,
                        "page": page,
                        "page_size": PAGE_SIZE,
                        "fields": fields,
                    },
                )
            except LabelStudioError as exc:
                if exc.status_code == 404:  # past the last page
                    return
                raise
            rows = body.get("tasks", []) if isinstance(body, dict) else body or []
            yield from rows
            if len(rows) < PAGE_SIZE:
                return
            page += 1

    def create_annotation(self, task_id: int, result: list[dict[str, Any]]) -> dict[str, Any]:
        return dict(
            self.request("POST", f"/api/tasks/{task_id}/annotations/", json={"result": result})
        )

    # -- ML backend and webhooks --------------------------------------------------------

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        """The project's ML backends, with their state (Label Studio probes them first)."""
        return list(self.request("GET", "/api/ml/", params={"project": project_id}) or [])

    def webhooks(self, project_id: int) -> list[dict[str, Any]]:
        rows = self.request("GET", "/api/webhooks/", params={"project": project_id}) or []
        return [w for w in rows if w.get("project") == project_id]

    def start_training(self, ml_backend_id: int) -> None:
        """The "Start training" button: ``POST /api/ml/{id}/train``."""
        self.request("POST", f"/api/ml/{ml_backend_id}/train", json={})


# --------------------------------------------------------------------------------------------
# the steps


def ensure_project(
    admin: LabelStudioAdmin, label_config: Path, title: str = PROJECT_TITLE
) -> tuple[int, bool]:
    """The project titled ``title`` (created from ``label_config`` if missing); (id, created)."""
    found = admin.find_project(title)
    if found is not None:
        _follow_label_config(admin, int(found["id"]), label_config)
        return int(found["id"]), False
    created = admin.request(
        "POST",
        "/api/projects/",
        json={
            "title": title,
            "description": PROJECT_DESCRIPTION,
            "label_config": label_config.read_text(encoding="utf-8"),
            # Pre-annotations on: the annotator sees the model's choice already selected.
            "show_collab_predictions": True,
        },
    )
    logger.info("created Label Studio project %s", created["id"])
    return int(created["id"]), True


def _follow_label_config(admin: LabelStudioAdmin, project_id: int, label_config: Path) -> None:
    """A demo project made by an older valve-id gets the shipped config (say, the valve-centre
    keypoint); Label Studio refuses a change its annotations contradict, which we only log."""
    shipped = label_config.read_text(encoding="utf-8")
    current = admin.project(project_id).get("label_config") or ""
    if " ".join(current.split()) == " ".join(shipped.split()):
        return
    try:
        admin.update_project(project_id, label_config=shipped)
        logger.info("project %s: label config updated to %s", project_id, label_config.name)
    except LabelStudioError as exc:
        logger.warning("project %s keeps its label config: %s", project_id, exc)


def import_demo(
    project_id: int, demo_dir: Path, settings: Settings, client: LabelStudio | None = None
) -> ImportReport:
    """Import the demo DICOMs with ``valve-id import``'s code; already-imported ones are
    skipped; like every import, it installs the reading guides' pictures for the project
    (:func:`backend.tools.guides.install_guides`). ``client`` is the Label Studio client
    (built from ``settings`` if None)."""
    if client is None:
        client = label_studio_client(settings)
    report = import_folder(
        demo_dir, project_id=project_id, create=False, settings=settings, client=client
    )
    if report.failed:
        raise DatasetError(f"{len(report.failed)} demo image(s) could not be imported")
    return report


@dataclass(frozen=True)
class DemoImage:
    """A demo DICOM's true class, patient, valve centre and setting, keyed by the
    ``source_uid`` its task carries."""

    label: str
    patient_id: str
    valve_xy: tuple[float, float] | None = None
    """True valve centre ``(x, y)``, pixels of the image (x = column); None if unknown."""
    width_px: int | None = None
    """Image width (DICOM Columns): ``valve-id import`` keeps the pixel grid, so this is the
    imported PNG's width too."""
    height_px: int | None = None
    """Image height (DICOM Rows), likewise."""
    setting: str | None = None
    """True pressure setting (the manifest's ``valve_setting``, a ``<Choice>`` value of the
    model's scale); None if the manifest has none."""


def _manifest_centre(row: Mapping[str, str]) -> tuple[float, float] | None:
    try:
        return float(row["valve_x"]), float(row["valve_y"])
    except (KeyError, TypeError, ValueError):
        return None


def demo_images(demo_dir: Path, pseudonym_key: str) -> dict[str, DemoImage]:
    """``source_uid`` → :class:`DemoImage`, from the demo's ``manifest.csv`` and headers.

    The importer keys each task on a keyed hash of the SOP Instance UID, so the same hash
    computed here finds each file's task without any patient data in the task. The centre is
    the manifest's ``valve_x``/``valve_y``; the size is the header's Columns × Rows, the grid
    the importer's PNG keeps (it neither crops nor resizes).
    """
    import csv

    from training.shared.dicom import read_dicom_header

    out: dict[str, DemoImage] = {}
    with (demo_dir / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            header = read_dicom_header(demo_dir / row["file"], name=row["file"])
            uid = source_uid("sop", str(header.SOPInstanceUID), pseudonym_key)
            rows, columns = header.get("Rows"), header.get("Columns")
            out[uid] = DemoImage(
                label=row["label"],
                patient_id=row["patient_id"],
                valve_xy=_manifest_centre(row),
                width_px=None if columns is None else int(columns),
                height_px=None if rows is None else int(rows),
                setting=(row.get("valve_setting") or "").strip() or None,
            )
    return out


def _project_config(admin: LabelStudioAdmin, project_id: int) -> LabelConfig | None:
    """The project's own config (a project created before a tag was added keeps its old
    config), or None when it does not parse."""
    try:
        return parse_label_config(str(admin.project(project_id).get("label_config") or ""))
    except LabelConfigError:
        return None


def _has_keypoint(stored: LabelConfig | None, config: LabelConfig) -> bool:
    """Whether the project's ``stored`` config has ``config``'s keypoint tag (else the seed
    labels carry classes only)."""
    if stored is None or config.keypoint_name is None or config.keypoint_label is None:
        return False
    return (stored.keypoint_name, stored.keypoint_label) == (
        config.keypoint_name,
        config.keypoint_label,
    )


def _scaled_valves(stored: LabelConfig | None, config: LabelConfig) -> frozenset[str]:
    """The valve models whose setting scale the project's ``stored`` config has as ``config``
    has it: only their seed labels carry the setting."""
    if stored is None:
        return frozenset()
    return frozenset(s.valve for s in config.settings if stored.setting_scale(s.valve) == s)


def seed_result(
    config: LabelConfig, image: DemoImage, *, keypoint: bool, setting: bool = True
) -> list[dict[str, Any]]:
    """An annotation's ``result``: the true class; the true valve centre as a keypoint when
    ``keypoint`` and the centre and image size are known and the centre is inside; and the
    true setting when ``setting``, the image has one and it is on the config's scale for its
    valve model."""
    result = choice_result(config, image.label)
    if keypoint and image.valve_xy is not None and image.width_px and image.height_px:
        # A centre outside the image (ValueError): the class alone.
        with contextlib.suppress(ValueError, LabelConfigError):
            result += keypoint_result(config, *image.valve_xy, image.width_px, image.height_px)
    if setting and image.setting is not None:
        result += setting_result(config, image.label, image.setting)
    return result


def seed_annotations(
    admin: LabelStudioAdmin,
    project_id: int,
    truth: Mapping[str, DemoImage],
    config: LabelConfig,
    target: int,
) -> int:
    """Label tasks with their true class until ``target`` tasks are labelled; returns how many
    annotations were created (0 once the project has ``target`` labelled tasks).

    Whole patients are taken, one class after another, so the labelled set spans every class
    and as many patients as possible (the folds are patient-grouped). Each annotation also
    marks the true valve centre and the true setting (:func:`seed_result`) where the
    project's config has the keypoint tag and that model's setting scale.
    """
    tasks = list(admin.tasks(project_id, fields="task_only"))
    labelled = sum(1 for t in tasks if (t.get("total_annotations") or 0) > 0)
    if labelled >= target:
        return 0
    by_class: dict[str, dict[str, list[tuple[int, DemoImage]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for task in tasks:
        if (task.get("total_annotations") or 0) > 0:
            continue
        image = truth.get(str((task.get("data") or {}).get("source_uid")))
        if image is not None and image.label in config.classes:
            by_class[image.label][image.patient_id].append((int(task["id"]), image))
    queues = {c: list(p.values()) for c, p in sorted(by_class.items())}
    stored = _project_config(admin, project_id) if any(queues.values()) else None
    keypoint = _has_keypoint(stored, config)
    scaled = _scaled_valves(stored, config)
    created = 0
    while labelled + created < target and any(queues.values()):
        for patients in queues.values():
            if not patients or labelled + created >= target:
                continue
            for task_id, image in patients.pop(0):
                result = seed_result(
                    config, image, keypoint=keypoint, setting=image.label in scaled
                )
                admin.create_annotation(task_id, result)
                created += 1
    logger.info("project %s: %d seed annotation(s) created", project_id, created)
    return created


def seed_line(created: int, labelled: int, asked: int) -> str:
    """What seeding did, in words that explain the number: whole patients overshoot the
    ``asked`` count, and a project labelled before is only topped up."""
    why = f"(the seed: whole patients, about {asked} asked)"
    if created >= labelled:
        return f"labelled {created} demo X-rays with their true class {why}"
    return f"labelled {created} more demo X-rays with their true class, {labelled} in all {why}"


def connect_backend(
    admin: LabelStudioAdmin,
    project_id: int,
    backend_url: str,
    *,
    basic_auth: tuple[str, str] | None,
    title: str = ML_BACKEND_TITLE,
    description: str = "",
) -> int:
    """Connect the backend to the project (or update the connection); returns its id.

    Label Studio calls ``/health`` and ``/setup`` before it answers, so the backend must be
    up. It creates a webhook to ``<url>/webhook`` on first connect, without headers; with
    basic auth the webhook gets the ``Authorization`` header here, or every event would be
    refused with 401 and lost silently (docs/PROTOCOL.md).
    """
    backend_url = backend_url.rstrip("/")
    auth: dict[str, Any] = {"auth_method": "NONE"}
    if basic_auth is not None:
        auth = {
            "auth_method": "BASIC_AUTH",
            "basic_auth_user": basic_auth[0],
            "basic_auth_pass": basic_auth[1],
        }
    existing = [b for b in admin.ml_backends(project_id) if b.get("title") == title]
    old_urls = {str(b.get("url") or "").rstrip("/") for b in existing} - {backend_url}
    if existing:
        ml_id = int(existing[0]["id"])
        if _connection_differs(existing[0], backend_url, auth, description):
            # Label Studio re-validates a PATCH with health and setup calls, which need the
            # project and URL in the body (without them: HTTP 500).
            admin.request(
                "PATCH",
                f"/api/ml/{ml_id}",
                json={
                    "project": project_id,
                    "url": backend_url,
                    "title": title,
                    "description": description,
                    **auth,
                },
            )
            logger.info("updated ML backend %s of project %s", ml_id, project_id)
    else:
        created = admin.request(
            "POST",
            "/api/ml/",
            json={
                "project": project_id,
                "url": backend_url,
                "title": title,
                "description": description,
                "is_interactive": False,
                **auth,
            },
        )
        ml_id = int(created["id"])
        logger.info("connected the backend to project %s (ML backend %s)", project_id, ml_id)
    headers = {"Authorization": basic_auth_header(*basic_auth)} if basic_auth else {}
    _ensure_webhook(
        admin, project_id, backend_url + "/webhook", headers, {u + "/webhook" for u in old_urls}
    )
    return ml_id


def _connection_differs(
    found: Mapping[str, Any], url: str, auth: Mapping[str, Any], description: str
) -> bool:
    """The stored connection is not the wanted one (the password is write-only: its
    presence is all Label Studio tells, and the stack's password never changes)."""
    if str(found.get("url") or "").rstrip("/") != url:
        return True
    if str(found.get("description") or "") != description:
        return True
    if found.get("auth_method") != auth["auth_method"]:
        return True
    if auth["auth_method"] == "BASIC_AUTH":
        return found.get("basic_auth_user") != auth["basic_auth_user"] or not found.get(
            "basic_auth_pass_is_set"
        )
    return False


def _ensure_webhook(
    admin: LabelStudioAdmin,
    project_id: int,
    url: str,
    headers: Mapping[str, str],
    stale_urls: set[str],
) -> None:
    """Exactly one webhook to ``url`` for all actions, with ``headers``; none to stale URLs."""
    found = False
    for hook in admin.webhooks(project_id):
        hook_url = str(hook.get("url") or "").rstrip("/")
        if hook_url in stale_urls or (hook_url == url and found):
            admin.request("DELETE", f"/api/webhooks/{hook['id']}/")
        elif hook_url == url:
            found = True
            if dict(hook.get("headers") or {}) != dict(headers) or not hook.get("is_active", True):
                admin.request(
                    "PATCH",
                    f"/api/webhooks/{hook['id']}/",
                    json={"headers": dict(headers), "is_active": True},
                )
    if not found:
        admin.request(
            "POST",
            "/api/webhooks/",
            json={
                "project": project_id,
                "url": url,
                "send_payload": True,
                "send_for_all_actions": True,
                "headers": dict(headers),
                "is_active": True,
            },
        )


def start_first_training(
    admin: LabelStudioAdmin,
    ml_backend_id: int,
    *,
    served: str | None,
    runs_active: bool,
    labelled: int,
) -> bool:
    """Press "Start training" if nothing is served yet, no run is queued or running, and
    something is labelled (a run over nothing would only fail)."""
    if served is not None or runs_active or labelled < 1:
        return False
    admin.start_training(ml_backend_id)
    logger.info("training requested through ML backend %s", ml_backend_id)
    return True


def sync_served_version(
    admin: LabelStudioAdmin, project_id: int, *, served: str | None, redis: Any
) -> bool:
    """Enqueue a re-scoring job if a version is served that the project does not show.

    Covers tasks imported before the backend was connected (no webhook saw them) and a
    version promoted by hand (``valve-id models promote``). Returns whether one was queued.
    """
    if served is None or admin.project(project_id).get("model_version") == served:
        return False
    from backend.loop.jobs import JobQueue

    JobQueue(redis).rescore_project(project_id, served)
    logger.info("project %s: re-scoring with %s queued", project_id, served)
    return True
