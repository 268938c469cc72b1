"""docker-compose.yml, the Dockerfile and .env.example, checked without a Docker engine.

Debian's ``docker-compose`` 1.29.2 (``scripts/setup-system.sh`` installs it; ``make test`` runs
that) validates the file against the Compose schema offline: unknown keys, bad types and unset
required variables make ``config`` exit 1. The structural checks then read what compose itself
resolved (anchors merged, variables filled in), so they test the file compose would run.
A missing ``docker-compose`` fails these tests: it is never a reason to skip them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
README = ROOT / "README.md"
DEPLOYMENT_GUIDE = ROOT / "docs" / "DEPLOYMENT.md"

COMPOSE_TIMEOUT_S = 60
"""Seconds one ``docker-compose config`` may take (it takes well under one)."""

BACKEND = "backend"
GPU_WORKERS = ("worker", "worker-gpu1", "worker-gpu2", "worker-gpu3")
DEFAULT_WORKER = "default-worker"
OUR_SERVICES = (BACKEND, *GPU_WORKERS, DEFAULT_WORKER)
"""Services running valve-id's image (the backend and every worker)."""
PINNED_IMAGES = {
    "label-studio": "heartexlabs/label-studio:1.23.2",
    "db": "postgres:16",
    "redis": "redis:7",
    "orthanc": "orthancteam/orthanc:24.12.1",
}
SECRET_NAME = re.compile(r"(PASSWORD|_PASS|_USER_TOKEN|_API_KEY|SECRET|PSEUDONYM_KEY)$")
"""Environment names whose values are secrets: never written in docker-compose.yml."""
REQUIRED_VAR = re.compile(r"\$\{(\w+):\?[^}]*\}")


# ---------------------------------------------------------------------------------------------
# helpers


def _docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail(
            "docker-compose is not installed: run scripts/setup-system.sh (make test does); "
            "docker-compose.yml cannot be validated without it"
        )
    return path


def _env_example() -> dict[str, str]:
    values: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: not KEY=VALUE: {line!r}"
            values[key.strip()] = value.strip()
    return values


def _dummy_env(tmp_path: Path, drop: str | None = None) -> Path:
    """.env.example with each empty value filled by a placeholder (and ``drop`` removed)."""
    lines = [
        f"{key}={value or 'dummy-' + key.lower()}"
        for key, value in _env_example().items()
        if key != drop
    ]
    path = tmp_path / "dummy.env"
    path.write_text("\n".join(lines) + "\n")
    return path


def _compose(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return _run_compose(["--env-file", str(env_file), "-f", str(COMPOSE), *args])


def _run_compose(args: list[str]) -> subprocess.CompletedProcess[str]:
    # A scrubbed environment: variables of the caller's shell must not fill in the file.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir()}
    return subprocess.run(
        [_docker_compose(), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=COMPOSE_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def resolved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The file as docker-compose resolves it with the dummy .env, all profiles on."""
    env_file = _dummy_env(tmp_path_factory.mktemp("compose"))
    profiles = ("gpus4", "dashboard", "pacs")
    result = _compose(env_file, *(a for p in profiles for a in ("--profile", p)), "config")
    assert result.returncode == 0, f"docker-compose config failed:\n{result.stderr}"
    return yaml.safe_load(result.stdout)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """The file as written (YAML anchors merged by the loader, variables not filled in)."""
    return yaml.safe_load(COMPOSE.read_text())


def _services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return doc["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # KEY=VALUE form
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _volume_mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path → (named volume, read-only) of a resolved service."""
    mounts: dict[str, tuple[str, bool]] = {}
    for vol in service.get("volumes", []):
        if isinstance(vol, str):  # "name:/path[:ro]"
            parts = vol.split(":")
            mounts[parts[1]] = (parts[0], len(parts) > 2 and parts[2] == "ro")
        else:
            mounts[vol["target"]] = (vol.get("source", ""), bool(vol.get("read_only")))
    return mounts


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    return ((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or []


# ---------------------------------------------------------------------------------------------
# docker-compose itself


def test_config_accepts_the_file_with_every_profile(resolved: dict[str, Any]) -> None:
    assert set(_services(resolved)) >= {
        "db",
        "label-studio",
        "redis",
        BACKEND,
        DEFAULT_WORKER,
        "rq-dashboard",
        "orthanc",
        *GPU_WORKERS,
    }


def test_config_rejects_an_unknown_key(tmp_path: Path) -> None:
    """The validation has teeth: a misspelt key fails, so a passing file means something."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("shm_size:", "shm_sise:", 1))
    env_file = _dummy_env(tmp_path)
    result = _run_compose(["--env-file", str(env_file), "-f", str(broken), "config", "-q"])
    assert result.returncode != 0
    assert "shm_sise" in result.stderr


def test_an_unedited_env_example_does_not_start() -> None:
    """Copying .env.example without filling in the secrets fails loudly, naming one."""
    result = _compose(ENV_EXAMPLE, "config", "-q")
    assert result.returncode != 0
    assert re.search(r"set \w+ in \.env", result.stderr), result.stderr


def _required_vars() -> list[str]:
    return sorted(set(REQUIRED_VAR.findall(COMPOSE.read_text())))


def test_required_variables_are_listed_in_env_example_and_secrets_left_empty() -> None:
    example = _env_example()
    required = _required_vars()
    assert required, "no ${VAR:?...} in docker-compose.yml: secrets would have defaults"
    assert set(required) <= set(example), "required but missing from .env.example"
    shipped = {k: v for k, v in example.items() if SECRET_NAME.search(k) and v}
    assert not shipped, f".env.example ships secret values: {sorted(shipped)}"


@pytest.mark.parametrize("name", _required_vars())
def test_each_required_variable_fails_loudly_when_unset(tmp_path: Path, name: str) -> None:
    result = _compose(_dummy_env(tmp_path, drop=name), "config", "-q")
    assert result.returncode != 0
    assert f"set {name} in .env" in result.stderr, result.stderr


# ---------------------------------------------------------------------------------------------
# structure of the resolved file


def test_every_service_has_a_healthcheck(resolved: dict[str, Any]) -> None:
    for name, service in _services(resolved).items():
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"


def test_dependencies_wait_for_health(resolved: dict[str, Any]) -> None:
    services = _services(resolved)
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert spec.get("condition") == "service_healthy", f"{name} → {dep}"
            assert services[dep].get("healthcheck"), f"{name} waits on {dep}'s missing check"
    assert "db" in services["label-studio"]["depends_on"]
    for name in OUR_SERVICES:
        assert "redis" in services[name]["depends_on"], name


def test_pinned_images(resolved: dict[str, Any]) -> None:
    services = _services(resolved)
    for name, image in PINNED_IMAGES.items():
        assert services[name]["image"] == image
    for name in (*OUR_SERVICES, "rq-dashboard"):
        assert services[name]["build"]["context"] == str(ROOT), name
        assert services[name]["build"]["target"] in {"runtime", "dashboard"}, name


def test_label_studio_uses_the_postgres_service(resolved: dict[str, Any]) -> None:
    services = _services(resolved)
    ls, db = _env(services["label-studio"]), _env(services["db"])
    assert ls["DJANGO_DB"] == "default"
    assert ls["POSTGRE_HOST"] == "db" and ls["POSTGRE_PORT"] == "5432"
    assert ls["POSTGRE_NAME"] == db["POSTGRES_DB"]
    assert ls["POSTGRE_USER"] == db["POSTGRES_USER"]
    assert ls["POSTGRE_PASSWORD"] == db["POSTGRES_PASSWORD"]
    assert ls["LABEL_STUDIO_USER_TOKEN"] and ls["LABEL_STUDIO_PASSWORD"]


def test_redis_appends_to_a_volume(resolved: dict[str, Any]) -> None:
    redis = _services(resolved)["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert _volume_mounts(redis)["/data"][0] == "redis-data"


def test_named_volumes_are_declared_and_shared_at_the_configured_paths(
    resolved: dict[str, Any],
) -> None:
    services = _services(resolved)
    declared = set(resolved["volumes"])
    assert declared >= {
        "postgres-data",
        "label-studio-data",
        "redis-data",
        "models",
        "cache",
        "local-files",
    }
    for name, service in services.items():
        for path, (volume, _) in _volume_mounts(service).items():
            assert volume in declared, f"{name}: {path} mounts undeclared {volume!r}"
    assert _volume_mounts(services["db"])["/var/lib/postgresql/data"][0] == "postgres-data"
    assert _volume_mounts(services["label-studio"])["/label-studio/data"][0] == (
        "label-studio-data"
    )
    ls_root = _env(services["label-studio"])["LOCAL_FILES_DOCUMENT_ROOT"]
    assert _volume_mounts(services["label-studio"])[ls_root] == ("local-files", True)
    for name in OUR_SERVICES:
        env, mounts = _env(services[name]), _volume_mounts(services[name])
        assert mounts[env["MODEL_DIR"]][0] == "models", name
        assert mounts[env["VALVE_ID_CACHE_DIR"]][0] == "cache", name
        # The same path in Label Studio and here: task URLs name files relative to it.
        assert env["LOCAL_FILES_DOCUMENT_ROOT"] == ls_root, name
        assert mounts[ls_root][0] == "local-files", name
    # The importer runs in the backend container and writes the PNGs.
    assert _volume_mounts(services[BACKEND])[ls_root] == ("local-files", False)


def test_gpu_workers_each_reserve_their_own_gpu(resolved: dict[str, Any]) -> None:
    services = _services(resolved)
    seen: list[str] = []
    for name in GPU_WORKERS:
        (device,) = _gpu_devices(services[name])
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        # A `count` would hand every replica/service the same GPU 0: ids, one each.
        assert "count" not in device and len(device["device_ids"]) == 1, name
        seen += device["device_ids"]
    assert sorted(seen) == ["0", "1", "2", "3"]
    assert "profiles" not in services["worker"], "the first GPU worker always runs"
    for name in (BACKEND, DEFAULT_WORKER, "label-studio", "redis", "db"):
        assert not _gpu_devices(services[name]), f"{name} must not hold a GPU"


def test_gpu_workers_get_shared_memory_for_data_loaders(resolved: dict[str, Any]) -> None:
    for name in GPU_WORKERS:
        size = str(_services(resolved)[name]["shm_size"]).lower()
        assert re.fullmatch(r"\d+\s*g[b]?", size), f"{name}: shm_size {size!r} below 1 GB"


def test_dashboard_and_extra_gpus_are_opt_in(raw: dict[str, Any]) -> None:
    services = _services(raw)
    assert services["rq-dashboard"]["profiles"] == ["dashboard"]
    for name in GPU_WORKERS[1:]:
        assert services[name]["profiles"], name
    for name in ("db", "label-studio", "redis", BACKEND, "worker", DEFAULT_WORKER):
        assert "profiles" not in services[name], f"{name} must start by default"


def _cli_params(command: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``valve-id SUB ...`` with the real CLI (unknown options raise); no run."""
    import typer

    from backend.tools.cli import app

    assert command[0] == "valve-id", command
    group = typer.main.get_command(app)
    parent = group.context_class(group, info_name="valve-id")
    sub = group.get_command(parent, command[1])
    assert sub is not None, f"no such command: valve-id {command[1]}"
    return command[1], sub.make_context(command[1], list(command[2:]), parent=parent).params


def test_cli_parse_rejects_an_unknown_option() -> None:
    with pytest.raises(Exception, match="--queue"):
        _cli_params(["valve-id", "worker", "--queue", "x"])


def test_commands_are_the_local_stacks_valve_id_commands(resolved: dict[str, Any]) -> None:
    from training.shared.loop_state import DEFAULT_QUEUE

    services = _services(resolved)
    sub, params = _cli_params(services[BACKEND]["command"])
    assert sub == "serve"
    assert params["host"] == "0.0.0.0" and params["port"] == 9090 and params["workers"] >= 1
    assert "9090" in [str(p) for p in services[BACKEND]["expose"]]
    for name in GPU_WORKERS:
        # Plain `valve-id worker`: the training queue first, then the default one.
        assert services[name]["command"] == ["valve-id", "worker"], name
        assert _cli_params(services[name]["command"])[0] == "worker"
    sub, params = _cli_params(services[DEFAULT_WORKER]["command"])
    assert sub == "worker" and params["queues"] == DEFAULT_QUEUE


def test_only_label_studio_and_the_dashboard_publish_ports_on_loopback(
    resolved: dict[str, Any],
) -> None:
    services = _services(resolved)
    for name, service in services.items():
        ports = service.get("ports") or []
        if name not in {"label-studio", "rq-dashboard", "orthanc"}:  # orthanc: profile pacs
            assert not ports, f"{name} must stay on the internal network"
            continue
        for port in ports:
            text = port if isinstance(port, str) else f"{port.get('host_ip', '')}:"
            assert text.startswith("127.0.0.1:"), f"{name} publishes {port!r} beyond loopback"


def test_internal_services_have_no_route_out(resolved: dict[str, Any]) -> None:
    networks = resolved["networks"]
    internal = [n for n, spec in networks.items() if (spec or {}).get("internal")]
    assert internal
    for name in ("db", "redis", *OUR_SERVICES):
        joined = set(_services(resolved)[name]["networks"])
        assert joined and joined <= set(internal), f"{name} joins {sorted(joined)}"
    assert set(_services(resolved)["label-studio"]["networks"]) & set(internal)


def test_no_secret_is_written_in_the_file(raw: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    assert "env_file" not in text, "pass variables one by one: an env_file leaks every secret"
    secret_keys = 0
    for name, service in _services(raw).items():
        for key, value in _env(service).items():
            if SECRET_NAME.search(key):
                secret_keys += 1
                assert REQUIRED_VAR.fullmatch(value), f"{name}: {key} must be ${{VAR:?...}}"
    assert secret_keys >= 8


# ---------------------------------------------------------------------------------------------
# healthchecks that run code


def test_worker_healthcheck_sees_only_a_worker_of_its_own_host(redis_url: str) -> None:
    from redis import Redis
    from rq import Queue, Worker

    raw = yaml.safe_load(COMPOSE.read_text())
    test = raw["services"][DEFAULT_WORKER]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    env = {**os.environ, "REDIS_URL": redis_url}

    def check() -> int:
        return subprocess.run([sys.executable, "-c", test[3]], env=env, timeout=30).returncode

    conn = Redis.from_url(redis_url)
    conn.flushdb()
    assert check() == 1, "healthy without any worker"
    other = Worker([Queue("q", connection=conn)], connection=conn, name="elsewhere")
    other.hostname = "another-container"
    other.register_birth()
    assert check() == 1, "healthy because of another container's worker"
    ours = Worker([Queue("q", connection=conn)], connection=conn, name="here")
    assert ours.hostname == socket.gethostname()
    ours.register_birth()
    assert check() == 0
    ours.register_death()
    other.register_death()
    assert check() == 1


# ---------------------------------------------------------------------------------------------
# Dockerfile, .dockerignore, README


def _stages() -> list[tuple[str, list[str]]]:
    """(FROM line, instructions) per stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append((line, []))
        elif stages:
            stages[-1][1].append(line)
    return stages


def test_dockerfile_builds_one_non_root_image_for_backend_and_workers() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", text, re.M)
    stages = _stages()
    names = {re.search(r"\bAS (\w+)", f).group(1): body for f, body in stages if " AS " in f}
    assert {"build", "runtime", "dashboard"} <= set(names)
    assert any("pip install" in line for line in names["build"])
    runtime = names["runtime"]
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    assert any(line.startswith("HEALTHCHECK ") and "/health" in line for line in runtime)
    (cmd,) = [line for line in runtime if line.startswith("CMD ")]
    assert '"valve-id", "serve"' in cmd and '"--port", "9090"' in cmd
    env = " ".join(line for line in runtime if line.startswith("ENV "))
    for var in ("MODEL_DIR", "VALVE_ID_CACHE_DIR", "LOCAL_FILES_DOCUMENT_ROOT"):
        assert var in env, var
    # `docker build .` (the last stage) gives the backend/worker image, not the dashboard.
    assert stages[-1][0] == "FROM runtime"


def _context_copies() -> set[str]:
    """What the Dockerfile copies from the build context (not ``--from`` another stage)."""
    copied = set()
    for _, instructions in _stages():
        for line in instructions:
            words = line.split()
            if words[0].upper() in {"COPY", "ADD"} and not any(
                w.startswith("--from=") for w in words[1:]
            ):
                sources = [w for w in words[1:-1] if not w.startswith("--")]
                copied |= {w.rstrip("/").removeprefix("./") for w in sources}
    return copied


def test_dockerignore_lets_through_exactly_what_the_dockerfile_copies() -> None:
    """An allow-list that misses a COPY source fails `docker build` ("not found"), which no
    test here can run (no Docker engine): so compare the two files."""
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "start from nothing, then allow what the image needs"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = _context_copies()
    assert {"backend", "training", "label_config.xml", "guides"} <= copied
    assert allowed == copied


def test_readme_documents_every_variable() -> None:
    from backend.settings import Settings

    readme = README.read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", readme, re.M))
    settings_vars = set(Settings._ENV.values())
    assert not settings_vars - documented, "settings missing from the README's tables"
    # The deployment guide moved to docs/DEPLOYMENT.md; the README keeps its heading and a link.
    deployment = DEPLOYMENT_GUIDE.read_text()
    documented |= set(re.findall(r"^\| `(\w+)` \|", deployment, re.M))
    compose_vars = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    assert not compose_vars - documented, "docker-compose.yml variables missing from README/docs"
    assert not set(_env_example()) - documented, ".env.example variables missing from README/docs"
    assert "## Deployment (docker-compose)" in readme
    assert "(docs/DEPLOYMENT.md)" in readme
    assert deployment.startswith("# Deployment (docker-compose)\n")
