"""Typed settings, read from the environment in this one place.

Names follow Label Studio's ML-backend conventions where one exists (``MODEL_DIR``,
``LOG_LEVEL``, later ``LABEL_STUDIO_URL`` ...); valve-id's own start with ``VALVE_ID_`` unless
a de-facto standard name exists (``REDIS_URL``). Read once at start-up
(:meth:`Settings.from_env`) and passed down; nothing else in valve-id reads ``os.environ``
for configuration. A malformed value fails at start-up with the variable's name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from training.shared.registry import Registry

__all__ = [
    "DEFAULT_LABEL_CONFIG",
    "VERB_SETTINGS",
    "Settings",
    "SettingsError",
    "debug_requested",
    "environment_of",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LABEL_CONFIG = PROJECT_ROOT / "label_config.xml"
"""The label config shipped with valve-id (the class vocabulary's single source)."""


class SettingsError(ValueError):
    """An environment variable holds a value valve-id cannot use."""


@dataclass(frozen=True, repr=False)
class Settings:
    """Every knob of a valve-id process; the README's configuration table mirrors this."""

    state_dir: Path = Path("state")
    """VALVE_ID_STATE_DIR: everything valve-id writes (models, cache, demo data, logs)."""
    model_dir: Path | None = None
    """MODEL_DIR: the model registry folder (default: <state_dir>/models), or
    ``s3://bucket/prefix`` for object storage (then held in :attr:`model_url`)."""
    cache_dir: Path | None = None
    """VALVE_ID_CACHE_DIR: preprocessed images by content hash (default: <state_dir>/cache)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """REDIS_URL: the Redis that carries the RQ queues."""
    label_config: Path = DEFAULT_LABEL_CONFIG
    """VALVE_ID_LABEL_CONFIG: the labeling config whose choices are the classes."""
    promotion_tolerance: float = 0.02
    """VALVE_ID_PROMOTION_TOLERANCE: macro-F1 a new version may lose and still be promoted."""
    log_level: str = "INFO"
    """LOG_LEVEL: Python logging level name."""
    label_studio_url: str = "http://127.0.0.1:8080"
    """LABEL_STUDIO_URL: the one Label Studio this backend talks to (and fetches images from)."""
    label_studio_api_key: str = ""
    """LABEL_STUDIO_API_KEY: a Personal Access Token or a legacy token (a secret)."""
    basic_auth_user: str = ""
    """BASIC_AUTH_USER: with BASIC_AUTH_PASS, protects every endpoint except /health."""
    basic_auth_pass: str = ""
    """BASIC_AUTH_PASS: the basic-auth password (a secret)."""
    retrain_every_n_labels: int = 20
    """RETRAIN_EVERY_N_LABELS: new labelled tasks since the last run that trigger training."""
    training_profile: str = "auto"
    """VALVE_ID_TRAINING_PROFILE: recipe of automatic runs: auto (decided by the worker that
    trains: paper with CUDA and the ResNet-34 ImageNet file, else cpu), paper, cpu or quick."""
    acquisition: str = "least_confidence"
    """VALVE_ID_ACQUISITION: uncertainty measure behind the score. least_confidence (default):
    the score is the calibrated probability of the proposed class, the number Label Studio shows
    and a reader expects; entropy, margin, bald order by their own score; auto = the one the
    served version's report found best at detecting errors."""
    pseudonym_key: str = ""
    """VALVE_ID_PSEUDONYM_KEY: HMAC key turning patient ids into stable pseudonyms (a secret)."""
    allowed_hosts: tuple[str, ...] = ()
    """VALVE_ID_ALLOWED_HOSTS: extra hosts images may be fetched from (comma-separated)."""
    local_files_root: Path | None = None
    """LOCAL_FILES_DOCUMENT_ROOT: Label Studio's local-files root, when on this host."""
    predict_batch_size: int = 16
    """VALVE_ID_PREDICT_BATCH: images per forward pass when serving."""
    compile_model: bool = False
    """VALVE_ID_COMPILE: serve ``torch.compile``'d networks (inductor, freezing): faster per
    image on a CPU, but loading a version compiles it first (minutes on a small CPU)."""
    reconcile_interval_s: int = 300
    """VALVE_ID_RECONCILE_INTERVAL_S: how often the label count is re-checked without webhooks."""
    dicomweb_url: str = ""
    """VALVE_ID_DICOMWEB_URL: the PACS's DICOMweb root (``valve-id import --pacs``), no
    credentials in it."""
    dicomweb_user: str = ""
    """VALVE_ID_DICOMWEB_USER: with VALVE_ID_DICOMWEB_PASSWORD, HTTP basic auth at the PACS."""
    dicomweb_password: str = ""
    """VALVE_ID_DICOMWEB_PASSWORD: the PACS password (a secret)."""
    keep_versions: int = 5
    """VALVE_ID_KEEP_VERSIONS: versions most recently made current that keep their weights."""
    keep_days: float = 14.0
    """VALVE_ID_KEEP_DAYS: days any version keeps its weights (older ones are pruned)."""
    s3_endpoint_url: str = ""
    """VALVE_ID_S3_ENDPOINT_URL: the S3 API server of an ``s3://`` MODEL_DIR (MinIO: its URL;
    empty: AWS). Credentials: boto3's standard AWS_* variables, never valve-id settings."""
    model_url: str = ""
    """Set from MODEL_DIR when it is an ``s3://`` URL (not a variable of its own)."""

    _ENV = {
        "state_dir": "VALVE_ID_STATE_DIR",
        "model_dir": "MODEL_DIR",
        "cache_dir": "VALVE_ID_CACHE_DIR",
        "redis_url": "REDIS_URL",
        "label_config": "VALVE_ID_LABEL_CONFIG",
        "promotion_tolerance": "VALVE_ID_PROMOTION_TOLERANCE",
        "log_level": "LOG_LEVEL",
        "label_studio_url": "LABEL_STUDIO_URL",
        "label_studio_api_key": "LABEL_STUDIO_API_KEY",
        "basic_auth_user": "BASIC_AUTH_USER",
        "basic_auth_pass": "BASIC_AUTH_PASS",
        "retrain_every_n_labels": "RETRAIN_EVERY_N_LABELS",
        "training_profile": "VALVE_ID_TRAINING_PROFILE",
        "acquisition": "VALVE_ID_ACQUISITION",
        "pseudonym_key": "VALVE_ID_PSEUDONYM_KEY",
        "allowed_hosts": "VALVE_ID_ALLOWED_HOSTS",
        "local_files_root": "LOCAL_FILES_DOCUMENT_ROOT",
        "predict_batch_size": "VALVE_ID_PREDICT_BATCH",
        "compile_model": "VALVE_ID_COMPILE",
        "reconcile_interval_s": "VALVE_ID_RECONCILE_INTERVAL_S",
        "dicomweb_url": "VALVE_ID_DICOMWEB_URL",
        "dicomweb_user": "VALVE_ID_DICOMWEB_USER",
        "dicomweb_password": "VALVE_ID_DICOMWEB_PASSWORD",
        "keep_versions": "VALVE_ID_KEEP_VERSIONS",
        "keep_days": "VALVE_ID_KEEP_DAYS",
        "s3_endpoint_url": "VALVE_ID_S3_ENDPOINT_URL",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build from ``environ`` (default ``os.environ``); unset variables keep defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            name = cls._ENV.get(f.name)
            raw = env.get(name, "").strip() if name else ""
            if not raw:
                continue
            values[f.name] = _cast(name, raw, cls.__dataclass_fields__[f.name].type)
        return cls(**values)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        """Never print a secret (settings end up in logs and tracebacks)."""
        shown = {
            f.name: (
                "***" if f.name in _SECRETS and getattr(self, f.name) else getattr(self, f.name)
            )
            for f in fields(self)
        }
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @property
    def basic_auth_enabled(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)

    def __post_init__(self) -> None:
        # Fixed once, where valve-id starts: every message names the real folder, and a
        # process started elsewhere (a worker, a job) uses the same one.
        if isinstance(self.model_dir, str) and self.model_dir.startswith("s3://"):
            object.__setattr__(self, "model_url", self.model_dir)  # object storage
            object.__setattr__(self, "model_dir", None)
        if self.model_url and not self.model_url.startswith("s3://"):
            raise SettingsError(f"model_url={self.model_url!r} must be an s3:// URL")
        for name in ("state_dir", "model_dir", "cache_dir"):
            path = getattr(self, name)
            if path is not None:
                object.__setattr__(self, name, Path(path).expanduser().absolute())
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise SettingsError(f"LOG_LEVEL={self.log_level!r} is not a logging level name")
        if not 0.0 <= self.promotion_tolerance <= 1.0:
            raise SettingsError("VALVE_ID_PROMOTION_TOLERANCE must lie in [0, 1]")
        if self.retrain_every_n_labels < 1:
            raise SettingsError("RETRAIN_EVERY_N_LABELS must be at least 1")
        if self.keep_versions < 1:
            raise SettingsError("VALVE_ID_KEEP_VERSIONS must be at least 1")
        if not 0.0 <= self.keep_days < float("inf"):
            raise SettingsError("VALVE_ID_KEEP_DAYS must be a number of days, 0 or more")
        if self.predict_batch_size < 1:
            raise SettingsError("VALVE_ID_PREDICT_BATCH must be at least 1")
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
        _check_dicomweb(self)
        from training.fitting.config import AUTO_PROFILE, PROFILES

        if self.training_profile not in {*PROFILES, AUTO_PROFILE}:
            choices = ", ".join(sorted({*PROFILES, AUTO_PROFILE}))
            raise SettingsError(
                f"VALVE_ID_TRAINING_PROFILE={self.training_profile!r} is not a profile; "
                f"use one of {choices}"
            )
        from backend.service.ranking import validate_acquisition

        validate_acquisition(self.acquisition)

    @property
    def models(self) -> Path:
        """The registry root actually used."""
        return self.model_dir or self.state_dir / "models"

    @property
    def cache(self) -> Path:
        """The preprocessing cache actually used."""
        return self.cache_dir or self.state_dir / "cache"

    @property
    def registry_location(self) -> str:
        """The model registry: ``s3://bucket/prefix`` or the folder (:attr:`models`)."""
        return self.model_url or str(self.models)

    def open_registry(self) -> Registry:
        """The model registry these settings name (folder or object storage)."""
        from training.shared.registry import open_registry

        return open_registry(
            self.registry_location,
            endpoint_url=self.s3_endpoint_url or None,
            cache_dir=self.cache,
        )


def _check_dicomweb(settings: Settings) -> None:
    """The PACS URL must be plain http(s) without user:password (which would end up in logs
    and error messages); credentials go in their own variables. Never echoes the URL."""
    from urllib.parse import urlsplit

    if bool(settings.dicomweb_user) != bool(settings.dicomweb_password):
        raise SettingsError(
            "set both VALVE_ID_DICOMWEB_USER and VALVE_ID_DICOMWEB_PASSWORD, or neither"
        )
    if not settings.dicomweb_url:
        return
    try:
        parts = urlsplit(settings.dicomweb_url)
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise SettingsError("VALVE_ID_DICOMWEB_URL is not a valid URL") from None
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise SettingsError(
            "VALVE_ID_DICOMWEB_URL must be an http(s) URL of the DICOMweb root, "
            "e.g. http://pacs.example:8042/dicom-web"
        )
    if parts.username is not None or parts.password is not None:
        raise SettingsError(
            "VALVE_ID_DICOMWEB_URL must not contain user:password; put them in "
            "VALVE_ID_DICOMWEB_USER and VALVE_ID_DICOMWEB_PASSWORD"
        )


def debug_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``LOG_LEVEL`` asks for DEBUG, read on its own: the command line's error report
    needs it exactly when the other settings failed to parse."""
    env = os.environ if environ is None else environ
    return env.get(Settings._ENV["log_level"], "").strip().upper() == "DEBUG"


_SECRETS = frozenset(
    {"label_studio_api_key", "basic_auth_pass", "pseudonym_key", "dicomweb_password"}
)
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

VERB_SETTINGS: dict[str, tuple[str, ...]] = {
    "serve": (
        "label_studio_url",
        "label_studio_api_key",
        "basic_auth_user",
        "basic_auth_pass",
        "redis_url",
        "state_dir",
        "model_dir",
        "local_files_root",
    ),
    "worker": (
        "redis_url",
        "label_studio_url",
        "label_studio_api_key",
        "state_dir",
        "model_dir",
        "local_files_root",
        "training_profile",
    ),
    "import": (
        "label_studio_url",
        "label_studio_api_key",
        "pseudonym_key",
        "local_files_root",
        "label_config",
        "dicomweb_url",
        "dicomweb_user",
        "dicomweb_password",
    ),
}
"""The settings each long-running or Label Studio-facing verb cannot work without the right
value of; its ``--help`` lists their variables (:func:`environment_of`)."""


def environment_of(verb: str) -> tuple[str, ...]:
    """The environment variables behind :data:`VERB_SETTINGS` ``[verb]``."""
    return tuple(Settings._ENV[name] for name in VERB_SETTINGS[verb])


def _cast(name: str | None, raw: str, annotation: object) -> object:
    text = str(annotation)
    if text == "bool":
        value = raw.lower()
        if value not in _TRUE | _FALSE:
            raise SettingsError(f"{name}={raw!r} is not a boolean (use 1/0, true/false)")
        return value in _TRUE
    try:
        if "tuple" in text:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if "Path" in text:
            if raw.startswith("s3://"):  # MODEL_DIR in object storage: a URL, not a path
                return raw
            return Path(raw).expanduser()
        if "float" in text:
            return float(raw)
        if "int" in text:
            return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {text}") from None
    return raw
