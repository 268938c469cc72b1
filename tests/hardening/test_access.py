"""Access: basic auth on every route but /health, secrets that never leave, and
de-identification from DICOM header to model version.

The server is ``valve-id serve`` in a subprocess with distinctive secrets and
``LOG_LEVEL=DEBUG`` (``conftest.py``). The import and training run go through a stand-in
Label Studio (:mod:`labelstudio_standin`, the real label-studio-sdk on the client side); the
same checks against a real Label Studio belong to issue 5's end-to-end suite.

Covered elsewhere, not repeated: basic auth on the five endpoints in-process
(``tests/backend/test_app.py::test_basic_auth_protects_everything_but_health``), pseudonyms
per key (``tests/backend/test_importer.py::
test_pseudonyms_are_stable_per_key_and_differ_across_keys`` and
``::test_another_key_gives_other_pseudonyms``), PNG metadata of rasters
(``::test_png_and_jpeg_with_a_manifest``), the fetcher never logging the key
(``tests/training/test_labelstudio_images.py::test_the_key_is_never_logged_or_put_in_messages``).
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from labelstudio_standin import StandInLabelStudio
from redis import Redis
from retraining_fakes import annotation_event, webhook
from rq.job import Job

import backend.service.middleware
from backend.service.app import create_app
from backend.service.labelstudio import label_studio_client
from backend.settings import DEFAULT_LABEL_CONFIG, Settings
from backend.tools.guides import GUIDES_SUBDIR
from backend.tools.importer import import_folder, pseudonymize, source_uid
from training.labelstudio import LabelStudio, Retry
from training.shared.errors import LabelStudioError
from training.shared.registry import ModelRegistry
from training.synthetic import VALVE_CLASSES, generate_dataset

from .hardening_support import (
    BASIC_PASS,
    BASIC_USER,
    LABEL_CONFIG_XML,
    LS_API_KEY,
    PROJECT,
    PSEUDONYM_KEY,
    ROOT,
    SECRETS,
    RunningServer,
    files_under,
    free_port,
    local_url,
    png,
    predict_body,
)

TRAIN_TIMEOUT_S = 240


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


# --------------------------------------------------------------------------------------------
# Basic auth


def _routes(tmp_path: Path) -> list[tuple[str, str]]:
    """Every (method, path) the app serves, FastAPI's own docs routes included."""
    app = create_app(Settings(state_dir=tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}"))
    found = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                found.append((method, route.path))  # type: ignore[attr-defined]
    return found


def test_every_route_but_health_needs_basic_auth_on_the_real_server(
    server: RunningServer, tmp_path: Path
) -> None:
    routes = _routes(tmp_path)
    assert {("POST", "/predict"), ("GET", "/docs"), ("GET", "/openapi.json")} <= set(routes)
    unrouted = [("GET", "/nope"), ("GET", "/health/"), ("POST", "/health/x"), ("GET", "/HEALTH")]
    wrong = [
        {},
        _basic(BASIC_USER, "x" * len(BASIC_PASS)),  # same length, wrong
        _basic("x" * len(BASIC_USER), BASIC_PASS),
        _basic(BASIC_USER, BASIC_PASS + " "),
        _basic(BASIC_USER.upper(), BASIC_PASS),
        {"Authorization": "Basic " + base64.b64encode(BASIC_PASS.encode()).decode()},  # no ':'
        {"Authorization": f"Bearer {BASIC_PASS}"},
        {"Authorization": "Basic %%%"},
    ]
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        for method, path in routes + unrouted:
            for headers in wrong:
                response = client.request(method, path, headers=headers, json={})
                if path == "/health":
                    assert response.status_code == 200, (method, path)
                    continue
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == 'Basic realm="valve-id"'
                assert response.json() == {"error": "authentication required"}
            allowed = client.request(method, path, headers=_basic(BASIC_USER, BASIC_PASS), json={})
            assert allowed.status_code != 401, (method, path)
        assert client.get("/health").json()["status"] == "UP"


def test_credentials_are_compared_in_constant_time_and_both_parts_always(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = backend.service.middleware.secrets.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(backend.service.middleware.secrets, "compare_digest", spy)
    settings = Settings(
        state_dir=tmp_path,
        redis_url=f"redis://127.0.0.1:{free_port()}",
        basic_auth_user=BASIC_USER,
        basic_auth_pass=BASIC_PASS,
    )
    with TestClient(create_app(settings)) as client:
        wrong_user = client.get("/metrics", headers=_basic("intruder", BASIC_PASS))
        assert wrong_user.status_code == 401
        assert [b for _, b in compared] == [BASIC_USER.encode(), BASIC_PASS.encode()]
        compared.clear()
        assert client.get("/metrics", headers=_basic(BASIC_USER, BASIC_PASS)).status_code == 200
        assert len(compared) == 2


# --------------------------------------------------------------------------------------------
# An import and a training run, from DICOM headers full of patient data


PHI = {
    "PatientName": "Zwiebelfisch^Hildegard^Maria",
    "PatientBirthDate": "19310215",
    "AccessionNumber": "ACC4471923",
    "InstitutionName": "Klinikum Sankt Quirinus Nord",
}
"""Distinctive header values set on every file (PatientID is set per patient)."""


@dataclass
class Pipeline:
    """What an import followed by a training run left behind, and what it said."""

    phi: set[str]
    patient_ids: dict[str, str]
    """SOP Instance UID → Patient ID."""
    standin: StandInLabelStudio
    project_id: int
    storage: Path
    state: Path
    logs: str


def _phi_strings(files: list[Path]) -> set[str]:
    """Every identifying header value, with the name's parts."""
    found = set()
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                        "InstitutionName", "StudyInstanceUID", "SOPInstanceUID"):  # fmt: skip
            value = str(ds.get(keyword, ""))
            assert value, f"test data lacks {keyword}"
            found.update({value, *value.split("^")})
        found.add(path.stem)
    return {s for s in found if len(s) >= 4}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def _label(standin: StandInLabelStudio, project_id: int, labels: dict[str, str]) -> None:
    """Annotate every imported task with its true class (``labels``: source_uid → class)."""
    for task in standin.project_tasks(project_id):
        label = labels[task["data"]["source_uid"]]
        task["annotations"] = [
            {"id": task["id"], "task": task["id"], "project": project_id,
             "result": [{"from_name": "valve", "to_name": "image", "type": "choices",
                         "value": {"choices": [label]}}],
             "was_cancelled": False, "ground_truth": False,
             "created_at": "2026-11-25T10:00:00Z", "updated_at": "2026-11-25T10:00:00Z"}
        ]  # fmt: skip


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """DICOMs → ``import_folder`` → labelled in Label Studio → ``valve-id train``."""
    base = tmp_path_factory.mktemp("pipeline")
    source = base / "pacs-export"
    generate_dataset(
        source, 16, seed=7, class_mix={c: 1.0 for c in VALVE_CLASSES}, size_range_px=(64, 96)
    )
    files = sorted((source / "images").glob("*.dcm"))
    with (source / "manifest.csv").open() as fh:
        label_of_file = {Path(row["file"]).name: row["label"] for row in csv.DictReader(fh)}
    patient_ids: dict[str, str] = {}
    labels: dict[str, str] = {}
    for path in files:
        ds = pydicom.dcmread(path)
        for keyword, value in PHI.items():
            setattr(ds, keyword, value)
        ds.PatientID = f"MRN-{ds.PatientID}-Q"  # distinct per patient, grouping kept
        ds.save_as(path, enforce_file_format=True)
        patient_ids[str(ds.SOPInstanceUID)] = str(ds.PatientID)
        labels[source_uid("sop", str(ds.SOPInstanceUID), PSEUDONYM_KEY)] = label_of_file[path.name]

    root = base / "ls-root"
    root.mkdir()
    state = base / "state"
    collected = _Collect()
    logging.getLogger().addHandler(collected)
    previous_level = logging.getLogger().level
    logging.getLogger().setLevel(logging.DEBUG)
    with StandInLabelStudio(api_key=LS_API_KEY, local_files_root=root) as standin:
        try:
            settings = Settings(
                label_studio_url=standin.url,
                label_studio_api_key=LS_API_KEY,
                pseudonym_key=PSEUDONYM_KEY,
                local_files_root=root,
                label_config=DEFAULT_LABEL_CONFIG,
            )
            report = import_folder(
                source,
                project_id=None,
                create=True,
                settings=settings,
                client=LabelStudio(standin.url, LS_API_KEY),
            )
        finally:
            logging.getLogger().removeHandler(collected)
            logging.getLogger().setLevel(previous_level)
        assert report.created == len(files) and not report.failed
        _label(standin, report.project_id, labels)

        env = {
            **os.environ,
            "VALVE_ID_STATE_DIR": str(state),
            "LABEL_STUDIO_URL": standin.url,
            "LABEL_STUDIO_API_KEY": LS_API_KEY,
            "LOCAL_FILES_DOCUMENT_ROOT": str(root),
            "VALVE_ID_PSEUDONYM_KEY": PSEUDONYM_KEY,
            "BASIC_AUTH_USER": BASIC_USER,
            "BASIC_AUTH_PASS": BASIC_PASS,
            "LOG_LEVEL": "DEBUG",
            "OMP_NUM_THREADS": "1",
        }
        command = [sys.executable, "-m", "backend.tools.cli", "train", "--data"]
        trained = subprocess.run(
            command + [f"labelstudio:{report.project_id}", "--profile", "quick", "--folds", "2",
                       "--image-size", "32", "--from-scratch"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=TRAIN_TIMEOUT_S,
        )  # fmt: skip
        output = trained.stdout + trained.stderr
        assert trained.returncode == 0, output[-4000:]
        yield Pipeline(
            phi=_phi_strings(files),
            patient_ids=patient_ids,
            standin=standin,
            project_id=report.project_id,
            storage=root,
            state=state,
            logs="\n".join(collected.lines) + repr(report) + output,
        )


def _png_chunks(data: bytes) -> list[bytes]:
    kinds, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kinds.append(data[offset + 4 : offset + 8])
        offset += 12 + length
    return kinds


@pytest.mark.slow
def test_no_patient_data_in_tasks_images_registry_cache_or_logs(pipeline: Pipeline) -> None:
    assert {PHI["PatientName"], PHI["AccessionNumber"], PHI["InstitutionName"]} <= pipeline.phi
    assert len(pipeline.phi) > 3 * len(pipeline.patient_ids)  # really something to look for
    registry = ModelRegistry(pipeline.state / "models")
    version = registry.current()
    assert version is not None  # the run trained on the imported images and was published
    version_dir = registry.version_path(version)
    assert (version_dir / "report.html").is_file()
    cache = pipeline.state / "cache"
    assert any(cache.rglob("*.png")), "the run copied the images into the cache"

    tasks = pipeline.standin.project_tasks(pipeline.project_id)
    sent = json.dumps([r.body for r in pipeline.standin.requests if r.body is not None])
    searched: dict[str, bytes] = {
        "tasks in Label Studio": json.dumps(tasks).encode(),
        "requests to Label Studio": sent.encode(),
        "logs": pipeline.logs.encode(),
    }
    # The imported X-rays (the reading guides' schematic pictures sit beside them).
    pngs = [p for p in pipeline.storage.rglob("*.png") if GUIDES_SUBDIR not in p.parts]
    assert len(pngs) == len(pipeline.patient_ids)
    for path in [*pngs, *files_under(registry.root, cache)]:
        searched[str(path)] = path.read_bytes() + str(path).encode()
    for where, content in searched.items():
        for value in pipeline.phi:
            assert value.encode() not in content, f"{value!r} found in {where}"
    for path in pngs:
        assert set(_png_chunks(path.read_bytes())) <= {b"IHDR", b"IDAT", b"IEND"}

    by_uid = {t["data"]["source_uid"]: t["data"] for t in tasks}
    for sop, patient_id in pipeline.patient_ids.items():
        data = by_uid[source_uid("sop", sop, PSEUDONYM_KEY)]
        assert set(data) == {"image", "patient", "source_uid"}
        assert data["patient"] == pseudonymize(patient_id, PSEUDONYM_KEY)  # stable per key
        assert data["patient"] != pseudonymize(patient_id, PSEUDONYM_KEY + "-other")


# --------------------------------------------------------------------------------------------
# Secrets


def _redis_text(conn: Redis) -> str:
    """Everything valve-id and RQ keep in Redis, job arguments unpickled."""
    parts = []
    for raw in conn.scan_iter(count=500):
        key = raw.decode()
        kind = conn.type(raw).decode()
        if key.startswith("rq:job:") and kind == "hash" and key.count(":") == 2:
            job = Job.fetch(key.split(":")[2], connection=conn)
            parts.append(repr((job.func_name, job.args, job.kwargs, job.meta)))
        elif kind == "hash":
            parts.append(repr(conn.hgetall(raw)))
        elif kind == "string":
            parts.append(repr(conn.get(raw)))
        elif kind in {"set", "zset", "list"}:
            parts.append(key)
    return "\n".join(parts)


@pytest.mark.slow
def test_secrets_never_appear_in_logs_responses_reports_or_redis(
    server: RunningServer,
    standin: StandInLabelStudio,
    pipeline: Pipeline,
    redis_conn: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []

    def keep(response: httpx.Response) -> httpx.Response:
        seen.append(f"{response.status_code} {dict(response.headers)} {response.text}")
        return response

    standin.uploads["/data/upload/1/flaky.png"] = png(12)
    standin.fail_next(1, 503, "/data/upload/1/flaky.png")  # a failing Label Studio call
    tasks = [
        {"id": 9001, "data": {"image": "/data/upload/1/flaky.png"}},  # 503 this time
        {"id": 9002, "data": {"image": "/data/upload/1/good.png"}},  # fetched with the key
        {"id": 9003, "data": {"image": local_url("inputs/good.png")}},
    ]
    with server.client() as client:
        keep(client.get("/health"))
        keep(client.post("/setup", json={"project": PROJECT, "schema": LABEL_CONFIG_XML}))
        predicted = keep(client.post("/predict", json=predict_body(tasks)))
        keep(client.post("/webhook", json=annotation_event(1, 9002, "Codman Hakim")))
        keep(client.post("/webhook", json=webhook("START_TRAINING")))
        keep(client.get("/metrics"))
        keep(client.get("/jobs"))
        keep(client.get("/openapi.json"))
        keep(client.post("/predict", json={"tasks": "not a list"}))
    with httpx.Client(base_url=server.url) as anonymous:
        keep(anonymous.get("/jobs", headers=_basic(BASIC_USER, BASIC_PASS[::-1])))
    results = predicted.json()["results"]
    assert [bool(r["result"]) for r in results] == [False, True, True]
    upload = [r for r in standin.requests if r.path == "/data/upload/1/good.png"]
    assert upload[-1].headers["Authorization"] == f"Token {LS_API_KEY}"  # the key was in use

    # A Label Studio that echoes the credentials it got back in its error message.
    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"detail": f"bad {request.headers.get('authorization')}"})

    settings = Settings(label_studio_url="http://ls.test", label_studio_api_key=LS_API_KEY)
    echoing = label_studio_client(
        settings,
        http=httpx.Client(transport=httpx.MockTransport(echo)),
        retry=Retry.exponential(2, 0),
    )
    with pytest.raises(LabelStudioError) as failed:
        echoing.count_labelled_tasks(1)
    assert "HTTP 500" in str(failed.value)
    seen.append(str(failed.value))
    seen.append(repr(settings) + repr(echoing))

    registry = ModelRegistry(pipeline.state / "models")
    report_files = list(files_under(registry.root))
    assert any(p.name == "report.html" for p in report_files)
    haystacks = {
        "responses": "\n".join(seen),
        "server log": server.log_text(),
        "import and training logs": pipeline.logs,
        "this process's log": caplog.text,
        "Redis": _redis_text(redis_conn),
        "tasks in Label Studio": json.dumps(pipeline.standin.project_tasks(pipeline.project_id)),
        **{str(p): p.read_bytes().decode("latin-1") for p in report_files},
    }
    assert "HTTP 503" in haystacks["server log"]  # the failed fetch was logged ...
    header = base64.b64encode(f"{BASIC_USER}:{BASIC_PASS}".encode()).decode()
    for where, text in haystacks.items():
        for secret in (*SECRETS, header):
            assert secret not in text, f"a secret ({secret[:4]}...) appears in {where}"
