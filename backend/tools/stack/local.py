"""``valve-id up`` / ``down`` / ``status``: the whole loop on one machine, without Docker.

Everything lives under one state directory (``VALVE_ID_STATE_DIR``, default ``state/``)::

    secrets.env      generated once (0600): Label Studio login and token, basic auth, pseudonym key
    stack.env        the non-secret wiring (URLs, folders) for running valve-id commands by hand
    stack.json       ports and ids chosen on the first run, reused by the next
    run/*.json       one record per process ``up`` started (PID + start time): ``down`` stops those
    logs/*.log       label-studio, redis, backend, worker, worker-default
    label-studio/    Label Studio's SQLite database and media
    files/           LOCAL_FILES_DOCUMENT_ROOT: the de-identified PNGs Label Studio serves
    demo-dicom/      the synthetic demo DICOMs (+ manifest.csv) imported into the project
    redis/           our own Redis's append-only file (unless REDIS_URL answers)
    models/, cache/  the model registry and preprocessing cache (MODEL_DIR, VALVE_ID_CACHE_DIR)

Label Studio's own virtualenv is not in it: one install per machine and version
(:data:`~backend.tools.stack.labelstudio_server.DEFAULT_LS_VENV`, or ``VALVE_ID_LS_VENV``), shared
with the test suite and kept when the state folder is deleted.

``up`` is idempotent: a part already running is kept, every bootstrap step looks before it
writes, and ports picked on the first run are reused. ``down`` stops exactly the processes
``up`` recorded, by PID, after checking each PID is still the process it started.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from backend.tools.stack import bootstrap
from backend.tools.stack.demo_accuracy import DemoAccuracy, demo_accuracy
from backend.tools.stack.labelstudio_server import (
    DEFAULT_LS_VENV,
    LABEL_STUDIO_VERSION,
    LabelStudioAccount,
    check_account,
    ensure_venv,
    init_data_dir,
    label_studio_env,
    start_label_studio,
    venv_is_ready,
)
from backend.tools.stack.processes import (
    ProcessRecord,
    free_port,
    is_alive,
    log_tail,
    port_in_use,
    read_record,
    start_process,
    stop_process,
    wait_http,
)
from backend.tools.stack.redis_server import DEFAULT_REDIS_PORT, redis_answers, start_redis
from training.shared.errors import StackError

__all__ = [
    "DEFAULT_BACKEND_PORT",
    "DEFAULT_DEMO_IMAGES",
    "DEFAULT_LS_PORT",
    "DEFAULT_SEED_LABELS",
    "PARTS",
    "PartStatus",
    "StackOptions",
    "StackPaths",
    "UpReport",
    "down",
    "ensure_secrets",
    "status",
    "up",
    "valve_id_argv",
]

logger = logging.getLogger(__name__)

DEFAULT_LS_PORT = 8080
"""Label Studio's usual port; a free one is picked on the first run if it is taken."""
DEFAULT_BACKEND_PORT = 9090
"""The ML-backend convention; a free one is picked on the first run if it is taken."""
DEFAULT_DEMO_IMAGES = 240
"""Synthetic X-rays imported into the demo project (balanced over the four valve models)."""
DEFAULT_SEED_LABELS = 160
"""Tasks labelled from the demo's true class and valve centre (whole patients, every class).
Sized by measurement (docs/TRAINING.md, "The cpu profile"): with ~128 training X-rays per fold the
``cpu`` profile's first version took 14 minutes on 2 CPU cores and was right on 72 of the 79
unlabelled demo X-rays (0.91)."""
DEMO_SEED = 0
"""Seed of the demo data set (same seed, same files)."""
STACK_TRAINING_PROFILE = "auto"
"""Recipe of automatic runs unless VALVE_ID_TRAINING_PROFILE says otherwise: each training
worker picks ``paper`` (a GPU and the ResNet-34 ImageNet file) or ``cpu``."""
STACK_RETRAIN_EVERY_N_LABELS = 10
"""New labels that start the next run unless RETRAIN_EVERY_N_LABELS says otherwise."""
BACKEND_START_TIMEOUT_S = 180.0
"""Seconds until the backend's /health answers (imports torch, loads the served version)."""
WORKER_START_TIMEOUT_S = 180.0
"""Seconds until a worker registers in Redis (a training worker imports torch and fastai)."""
LS_ADMIN_USERNAME = "admin@valve-id.local"
"""Login of the generated Label Studio admin (the password is generated)."""
BASIC_AUTH_USER = "valve-id"
"""User name Label Studio sends to the backend (the password is generated)."""
PARTS = ("redis", "label-studio", "backend", "worker", "worker-default")
"""What ``up`` starts, in order; ``down`` stops them in reverse."""

_SECRET_KEYS = (
    "LABEL_STUDIO_USERNAME",
    "LABEL_STUDIO_PASSWORD",
    "LABEL_STUDIO_API_KEY",
    "BASIC_AUTH_USER",
    "BASIC_AUTH_PASS",
    "VALVE_ID_PSEUDONYM_KEY",
)
_SECRETS_MODE = 0o600

Say = Callable[[str], None]


@dataclass(frozen=True)
class StackOptions:
    """What ``valve-id up`` was asked for (CLI options and their environment variables)."""

    state_dir: Path
    ls_venv: Path | None = None
    """Label Studio's virtualenv (default: the machine's shared ``DEFAULT_LS_VENV``)."""
    ls_port: int | None = None
    """None: the port of the last run, else :data:`DEFAULT_LS_PORT` or a free one."""
    backend_port: int | None = None
    redis_url: str | None = None
    """An explicitly configured REDIS_URL; None or unreachable: our own Redis."""
    demo_images: int = DEFAULT_DEMO_IMAGES
    seed_labels: int = DEFAULT_SEED_LABELS
    default_worker: bool = True
    """Also start a worker for the default queue only, so webhooks and re-scoring never wait
    behind a training run."""
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    """The environment the children inherit (tunables such as TORCH_HOME pass through)."""


@dataclass(frozen=True)
class StackPaths:
    """The layout of the state directory (see the module docstring)."""

    state: Path

    @classmethod
    def of(cls, options: StackOptions) -> StackPaths:
        return cls(options.state_dir.expanduser().absolute())

    secrets = property(lambda self: self.state / "secrets.env")
    stack_env = property(lambda self: self.state / "stack.env")
    stack_json = property(lambda self: self.state / "stack.json")
    run = property(lambda self: self.state / "run")
    logs = property(lambda self: self.state / "logs")
    ls_data = property(lambda self: self.state / "label-studio")
    files = property(lambda self: self.state / "files")
    demo = property(lambda self: self.state / "demo-dicom")
    redis = property(lambda self: self.state / "redis")

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def ls_venv(self, options: StackOptions) -> Path:
        return (options.ls_venv or DEFAULT_LS_VENV).expanduser().absolute()


@dataclass
class UpReport:
    """What ``up`` did and where to click."""

    ls_url: str
    username: str
    password: str | None
    """The generated password, only on the run that generated it (else None)."""
    backend_url: str
    project_id: int
    review_view_id: int
    logs: Path
    secrets: Path
    started: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    imported: int = 0
    seeded: int = 0
    training: str = ""
    redis_url: str = ""

    @property
    def review_url(self) -> str:
        return f"{self.ls_url}/projects/{self.project_id}/data?tab={self.review_view_id}"

    @property
    def label_stream_url(self) -> str:
        return f"{self.ls_url}/projects/{self.project_id}/data?labeling=1"


@dataclass(frozen=True)
class PartStatus:
    name: str
    state: str
    """``running``, ``stopped`` (recorded, gone) or ``not started``."""
    pid: int | None = None
    detail: str = ""


# --------------------------------------------------------------------------------------------
# secrets and remembered choices


def ensure_secrets(path: Path) -> tuple[dict[str, str], bool]:
    """Read ``secrets.env``, generating it (mode 0600) on first use; (values, generated now)."""
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, _SECRETS_MODE)
            logger.warning("%s was readable by others; now 0600", path)
        values = _read_env_file(path)
        missing = [k for k in _SECRET_KEYS if not values.get(k)]
        if missing:
            raise StackError(
                f"{path} lacks {', '.join(missing)}; delete the state dir to start over"
            )
        return values, False
    values = {
        "LABEL_STUDIO_USERNAME": LS_ADMIN_USERNAME,
        "LABEL_STUDIO_PASSWORD": secrets.token_urlsafe(12),
        "LABEL_STUDIO_API_KEY": secrets.token_hex(20),  # a legacy token: 40 hex digits
        "BASIC_AUTH_USER": BASIC_AUTH_USER,
        "BASIC_AUTH_PASS": secrets.token_urlsafe(24),
        "VALVE_ID_PSEUDONYM_KEY": secrets.token_hex(32),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Generated by valve-id up. Secrets: keep this file private (mode 0600).\n" + "".join(
        f"{k}={v}\n" for k, v in values.items()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _SECRETS_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    return values, True


def _read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _load_choices(paths: StackPaths) -> dict[str, Any]:
    try:
        return dict(json.loads(paths.stack_json.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return {}


def _save_choices(paths: StackPaths, choices: Mapping[str, Any]) -> None:
    tmp = paths.stack_json.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(choices), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, paths.stack_json)


def _pick_port(name: str, asked: int | None, remembered: Any, default: int, say: Say) -> int:
    """An explicitly asked port must be free; a remembered or default one is replaced by a
    free one (nothing in Label Studio depends on it: the connection is updated)."""
    if asked is not None:
        if port_in_use(asked):
            raise StackError(f"port {asked} asked for {name} is taken")
        return asked
    preferred = int(remembered) if remembered else default
    port = free_port(preferred)
    if port != preferred:
        say(f"port {preferred} is taken; {name} gets port {port}")
    return port


# --------------------------------------------------------------------------------------------
# up


def valve_id_argv() -> list[str]:
    """The ``valve-id`` command of this very installation."""
    script = Path(sys.executable).with_name("valve-id")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "backend.tools.cli"]


def _child_env(
    options: StackOptions,
    paths: StackPaths,
    values: Mapping[str, str],
    *,
    redis_url: str,
    ls_url: str,
) -> dict[str, str]:
    """Environment of the backend and workers: the caller's, the wiring, the secrets."""
    env = dict(options.environ)
    env.setdefault("VALVE_ID_TRAINING_PROFILE", STACK_TRAINING_PROFILE)
    env.setdefault("RETRAIN_EVERY_N_LABELS", str(STACK_RETRAIN_EVERY_N_LABELS))
    env.update(
        {
            "VALVE_ID_STATE_DIR": str(paths.state),
            "REDIS_URL": redis_url,
            "LABEL_STUDIO_URL": ls_url,
            "LABEL_STUDIO_API_KEY": values["LABEL_STUDIO_API_KEY"],
            "LOCAL_FILES_DOCUMENT_ROOT": str(paths.files),
            "BASIC_AUTH_USER": values["BASIC_AUTH_USER"],
            "BASIC_AUTH_PASS": values["BASIC_AUTH_PASS"],
            "VALVE_ID_PSEUDONYM_KEY": values["VALVE_ID_PSEUDONYM_KEY"],
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _write_stack_env(paths: StackPaths, env: Mapping[str, str]) -> None:
    """The non-secret wiring, to ``source`` before running valve-id commands by hand."""
    keys = (
        "VALVE_ID_STATE_DIR",
        "REDIS_URL",
        "LABEL_STUDIO_URL",
        "LOCAL_FILES_DOCUMENT_ROOT",
        "VALVE_ID_TRAINING_PROFILE",
        "RETRAIN_EVERY_N_LABELS",
    )
    text = (
        "# Written by valve-id up. To run valve-id commands against this stack:\n"
        f"#   set -a; . {paths.stack_env}; . {paths.secrets}; set +a\n"
        + "".join(f"{k}={env[k]}\n" for k in keys if k in env)
    )
    paths.stack_env.write_text(text, encoding="utf-8")


def _alive(paths: StackPaths, name: str) -> ProcessRecord | None:
    record = read_record(paths.run, name)
    return record if record is not None and is_alive(record) else None


def _wait_worker(record: ProcessRecord, redis_url: str, timeout_s: float) -> None:
    """Until a worker with ``record``'s PID is registered in Redis."""
    from redis import Redis
    from rq import Worker

    connection = Redis.from_url(redis_url)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if not is_alive(record):
                raise StackError(
                    f"{record.name} exited while starting; last lines of {record.log}:\n"
                    + log_tail(record.log)
                )
            if any(w.pid == record.pid for w in Worker.all(connection=connection)):
                return
            if time.monotonic() > deadline:
                raise StackError(
                    f"{record.name} did not register with Redis within {timeout_s:.0f} s; "
                    f"see {record.log}"
                )
            time.sleep(0.5)
    finally:
        connection.close()


def _runs_active(redis_url: str) -> bool:
    """A training run is queued or running (its run record says so)."""
    from redis import Redis

    from training.shared import loop_state
    from training.shared.loop_state import RunStatus, run_status

    connection = Redis.from_url(redis_url)
    try:
        for key in connection.scan_iter(match=loop_state.RUN_PATTERN, count=200):
            run_id = loop_state.run_id_of(key)
            status = RunStatus.of(run_status(connection, run_id)) if run_id else None
            if status is not None and status.active:
                return True
        return False
    finally:
        connection.close()


def up(options: StackOptions, say: Say = logger.info) -> UpReport:
    """Start (or keep) every part, bootstrap the project, and say where to click."""
    paths = StackPaths.of(options)
    for folder in (paths.state, paths.run, paths.logs, paths.files):
        folder.mkdir(parents=True, exist_ok=True)
    values, generated = ensure_secrets(paths.secrets)
    choices = _load_choices(paths)
    started: list[str] = []
    kept: list[str] = []

    # -- Redis ---------------------------------------------------------------------------
    own = _alive(paths, "redis")
    if options.redis_url and redis_answers(options.redis_url):
        redis_url = options.redis_url
        kept.append("redis (REDIS_URL)")
    elif own is not None:
        redis_url = str(own.info["url"])
        kept.append("redis")
    else:
        if options.redis_url:
            say(f"REDIS_URL {options.redis_url} does not answer; starting valve-id's own Redis")
        port = _pick_port("Redis", None, choices.get("redis_port"), DEFAULT_REDIS_PORT, say)
        record, redis_url = start_redis(
            port=port,
            data_dir=paths.redis,
            run_dir=paths.run,
            log_path=paths.log("redis"),
            env=options.environ,
        )
        choices["redis_port"] = port
        started.append("redis")

    # -- Label Studio -----------------------------------------------------------------------
    account = LabelStudioAccount(
        values["LABEL_STUDIO_USERNAME"],
        values["LABEL_STUDIO_PASSWORD"],
        values["LABEL_STUDIO_API_KEY"],
    )
    ls_record = _alive(paths, "label-studio")
    venv = paths.ls_venv(options)
    if not venv_is_ready(venv):
        say(f"installing Label Studio {LABEL_STUDIO_VERSION} into {venv} (once: ~1 min, ~1 GB)")
    ls_bin = ensure_venv(venv, log_path=paths.log("label-studio-install"))
    ls_env = label_studio_env(data_dir=paths.ls_data, files_root=paths.files, account=account)
    if ls_record is not None:
        ls_url = str(ls_record.info["url"])
        check_account(ls_url, account)
        kept.append("label-studio")
    else:
        if init_data_dir(
            ls_bin, data_dir=paths.ls_data, env=ls_env, log_path=paths.log("label-studio")
        ):
            say("Label Studio's database is ready (migrated, admin user created)")
        port = _pick_port(
            "Label Studio", options.ls_port, choices.get("ls_port"), DEFAULT_LS_PORT, say
        )
        say(f"starting Label Studio on http://127.0.0.1:{port} ...")
        ls_record = start_label_studio(
            ls_bin,
            port=port,
            env=ls_env,
            run_dir=paths.run,
            log_path=paths.log("label-studio"),
            account=account,
        )
        ls_url = str(ls_record.info["url"])
        choices["ls_port"] = port
        started.append("label-studio")

    # -- backend and workers ----------------------------------------------------------------
    env = _child_env(options, paths, values, redis_url=redis_url, ls_url=ls_url)
    _write_stack_env(paths, env)
    valve_id = valve_id_argv()
    backend = _alive(paths, "backend")
    if backend is not None:
        backend_url = str(backend.info["url"])
        kept.append("backend")
    else:
        port = _pick_port(
            "the backend",
            options.backend_port,
            choices.get("backend_port"),
            DEFAULT_BACKEND_PORT,
            say,
        )
        backend_url = f"http://127.0.0.1:{port}"
        say(f"starting the backend on {backend_url} ...")
        backend = start_process(
            "backend",
            [*valve_id, "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            run_dir=paths.run,
            log_path=paths.log("backend"),
            info={"url": backend_url, "port": port},
        )
        wait_http(f"{backend_url}/health", record=backend, timeout_s=BACKEND_START_TIMEOUT_S)
        choices["backend_port"] = port
        started.append("backend")
    workers: list[tuple[str, list[str]]] = [("worker", [])]
    if options.default_worker:
        workers.append(("worker-default", ["--queues", "valve-id-default"]))
    for name, extra in workers:
        if _alive(paths, name) is not None:
            kept.append(name)
            continue
        say(f"starting {name} ...")
        record = start_process(
            name,
            [*valve_id, "worker", *extra],
            env=env,
            run_dir=paths.run,
            log_path=paths.log(name),
        )
        _wait_worker(record, redis_url, WORKER_START_TIMEOUT_S)
        started.append(name)
    _save_choices(paths, choices)

    # -- the project ------------------------------------------------------------------------
    report = _bootstrap(
        options, paths, env, values, ls_url=ls_url, backend_url=backend_url, say=say
    )
    choices.update(project_id=report.project_id, review_view_id=report.review_view_id)
    _save_choices(paths, choices)
    return replace(
        report,
        password=values["LABEL_STUDIO_PASSWORD"] if generated else None,
        started=started,
        kept=kept,
        redis_url=redis_url,
    )


def _bootstrap(
    options: StackOptions,
    paths: StackPaths,
    env: Mapping[str, str],
    values: Mapping[str, str],
    *,
    ls_url: str,
    backend_url: str,
    say: Say,
) -> UpReport:
    from redis import Redis

    from backend.service.labelstudio import label_studio_client
    from backend.settings import Settings
    from training.shared.labels import load_label_config
    from training.synthetic import BALANCED_CLASS_MIX, generate_dataset

    settings = Settings.from_env(env)
    if not (paths.demo / "manifest.csv").is_file():
        say(f"generating {options.demo_images} synthetic demo X-rays ...")
        generate_dataset(paths.demo, options.demo_images, DEMO_SEED, class_mix=BALANCED_CLASS_MIX)
    admin = bootstrap.LabelStudioAdmin(ls_url, values["LABEL_STUDIO_API_KEY"])
    try:
        project_id, created = bootstrap.ensure_project(admin, settings.label_config)
        if created:
            say(f"created the Label Studio project {project_id} ({bootstrap.PROJECT_TITLE})")
        imported = bootstrap.import_demo(project_id, paths.demo, settings)
        if imported.created:
            say(f"imported {imported.created} de-identified demo X-rays")
        truth = bootstrap.demo_images(paths.demo, values["VALVE_ID_PSEUDONYM_KEY"])
        config = load_label_config(settings.label_config)
        seeded = bootstrap.seed_annotations(admin, project_id, truth, config, options.seed_labels)
        labelled = label_studio_client(settings).count_labelled_tasks(project_id)
        if seeded:
            say(bootstrap.seed_line(seeded, labelled, options.seed_labels))
        ml_id = bootstrap.connect_backend(
            admin,
            project_id,
            backend_url,
            basic_auth=(values["BASIC_AUTH_USER"], values["BASIC_AUTH_PASS"]),
            description=bootstrap.backend_description(settings.retrain_every_n_labels),
        )
        view_id = label_studio_client(settings).ensure_review_view(project_id)
        served = settings.open_registry().current()
        redis = Redis.from_url(settings.redis_url)
        try:
            if bootstrap.start_first_training(
                admin,
                ml_id,
                served=served,
                runs_active=_runs_active(settings.redis_url),
                labelled=labelled,
            ):
                training = (
                    f"first run started ({settings.training_profile} profile); predictions "
                    "appear in Label Studio when it is published"
                )
            elif served is None and _runs_active(settings.redis_url):
                training = "a run is in progress; predictions appear when it is published"
            elif served is None:
                training = (
                    f"nothing trained yet: label {settings.retrain_every_n_labels} X-rays "
                    "(or press Start training in the project's Model settings)"
                )
            elif bootstrap.sync_served_version(admin, project_id, served=served, redis=redis):
                training = f"serving {served}; re-scoring the project with it"
            else:
                training = f"serving {served}"
            if served is not None:
                scored = demo_accuracy(
                    admin.tasks(project_id),
                    truth,
                    served,
                    config.choices_name,
                    config.keypoint_name,
                    config.settings,
                )
                training += f"\n{'':16}{scored.line()}"
        finally:
            redis.close()
    finally:
        admin.close()
    return UpReport(
        ls_url=ls_url,
        username=values["LABEL_STUDIO_USERNAME"],
        password=None,
        backend_url=backend_url,
        project_id=project_id,
        review_view_id=view_id,
        logs=paths.logs,
        secrets=paths.secrets,
        imported=imported.created,
        seeded=seeded,
        training=training,
    )


# --------------------------------------------------------------------------------------------
# down and status


def down(options: StackOptions, say: Say = logger.info) -> dict[str, str]:
    """Stop what ``up`` started, newest first, by recorded PID; returns name → outcome."""
    paths = StackPaths.of(options)
    outcomes = {}
    for name in reversed(PARTS):
        outcome = stop_process(paths.run, name)
        if outcome != "not started":
            say(f"{name}: {outcome}")
        outcomes[name] = outcome
    return outcomes


def status(options: StackOptions) -> list[PartStatus]:
    """Each part: running (with PID and URL), stopped, or never started."""
    paths = StackPaths.of(options)
    rows = []
    for name in PARTS:
        record = read_record(paths.run, name)
        if record is None:
            rows.append(PartStatus(name, "not started"))
        elif is_alive(record):
            rows.append(PartStatus(name, "running", record.pid, str(record.info.get("url", ""))))
        else:
            rows.append(PartStatus(name, "stopped", record.pid, f"see {record.log}"))
    return rows


def served_demo_accuracy(options: StackOptions) -> DemoAccuracy | None:
    """The served version's accuracy on the unlabelled demo tasks (None if nothing to say)."""
    from backend.settings import Settings
    from training.shared.labels import load_label_config

    paths = StackPaths.of(options)
    ls = _alive(paths, "label-studio")
    project_id = _load_choices(paths).get("project_id")
    if ls is None or project_id is None or not paths.secrets.exists():
        return None
    if not (paths.demo / "manifest.csv").is_file():
        return None
    settings = Settings.from_env({**options.environ, "VALVE_ID_STATE_DIR": str(paths.state)})
    served = settings.open_registry().current()
    if served is None:
        return None
    values = _read_env_file(paths.secrets)
    config = load_label_config(settings.label_config)
    admin = bootstrap.LabelStudioAdmin(str(ls.info["url"]), values["LABEL_STUDIO_API_KEY"])
    try:
        tasks = list(admin.tasks(int(project_id)))
    finally:
        admin.close()
    truth = bootstrap.demo_images(paths.demo, values["VALVE_ID_PSEUDONYM_KEY"])
    return demo_accuracy(
        tasks, truth, served, config.choices_name, config.keypoint_name, config.settings
    )


def backend_jobs(options: StackOptions) -> dict[str, Any] | None:
    """The backend's ``/jobs`` (training runs, queue lengths), if it is running."""
    paths = StackPaths.of(options)
    record = _alive(paths, "backend")
    if record is None or not paths.secrets.exists():
        return None
    values = _read_env_file(paths.secrets)
    try:
        answer = httpx.get(
            f"{record.info['url']}/jobs",
            auth=(values.get("BASIC_AUTH_USER", ""), values.get("BASIC_AUTH_PASS", "")),
            timeout=5,
            trust_env=False,
        )
        return dict(answer.json()) if answer.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
