"""``valve-id import --pacs``: DICOMweb query/retrieve against a real Orthanc.

Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``, installed by ``scripts/setup-system.sh``)
is started once per session on free loopback ports with its own storage and basic auth
(``RegisteredUsers``), and filled through STOW-RS with synthetic X-rays in every photometric
interpretation and compression the decoder handles, plus one whose pixel data is broken.
Label Studio is the stand-in of ``test_importer.py`` (real label-studio-sdk, recording server).
If Orthanc cannot start, the tests fail; they never skip.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from labelstudio_standin import StandInLabelStudio
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)
from typer.testing import CliRunner

from backend.settings import DEFAULT_LABEL_CONFIG, Settings, SettingsError
from backend.tools import pacs as pacs_module
from backend.tools.cli import app
from backend.tools.importer import ImportReport, source_uid
from backend.tools.pacs import (
    PacsError,
    PacsQuery,
    PacsState,
    import_from_pacs,
    pacs_client,
    watch_pacs,
)
from training.labelstudio import LabelStudio

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_START_TIMEOUT_S = 60.0
USER = "pacs-reader"
PASSWORD = "Pw-7f3a9c1e-never-in-logs"
KEY = "test-pseudonym-key-0123456789abcdef"
WATCH_INTERVAL_S = 0.5
WATCH_DEADLINE_S = 60.0
"""The issue's promise: a new X-ray is a task within a minute."""


def _load_dicom_builders():
    """The decoder tests' DICOM builders (tests/training/test_dicom.py), reused as they are."""
    path = Path(__file__).resolve().parents[1] / "training" / "test_dicom.py"
    spec = importlib.util.spec_from_file_location("_dicom_builders", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


builders = _load_dicom_builders()


# ------------------------------------------------------------------------------ Orthanc


@dataclass(frozen=True)
class Orthanc:
    url: str
    """DICOMweb root."""
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """A real Orthanc with the DICOMweb plugin and basic auth, on loopback, own storage."""
    for needed in (ORTHANC, DICOMWEB_PLUGIN):
        if not needed.exists():
            pytest.fail(f"{needed} is missing: run scripts/setup-system.sh (orthanc packages)")
    work = tmp_path_factory.mktemp("orthanc")
    http_port, dicom_port = _free_port(), _free_port()
    config = {
        "Name": "valve-id-test",
        "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "OrthancExplorerEnabled": False,
        "StorageCompression": False,
    }
    (work / "orthanc.json").write_text(json.dumps(config))
    log = work / "orthanc.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(ORTHANC), str(work / "orthanc.json")], stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{http_port}/dicom-web"
    deadline = time.monotonic() + ORTHANC_START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                answer = requests.get(f"{url}/studies", auth=(USER, PASSWORD), timeout=2)
                if answer.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not answer in {ORTHANC_START_TIMEOUT_S:.0f} s: {log}")
            time.sleep(0.2)
        yield Orthanc(url, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stow_client(orthanc: Orthanc) -> DICOMwebClient:
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    return DICOMwebClient(orthanc.url, session=session)


# ------------------------------------------------------------------------------ the X-rays


@dataclass(frozen=True)
class Stored:
    name: str
    sop: str
    patient_id: str
    patient_name: str
    modality: str
    study_date: str
    body_part: str
    description: str
    decodable: bool = True


def _pixels(kind: str) -> Dataset:
    """A CR dataset in one photometric interpretation / transfer syntax of the decoder's."""
    if kind == "mono1":
        return builders.make_dataset(builders.phantom(12, inverted=True), "MONOCHROME1", 12)
    if kind in ("rgb", "ybr"):
        rgb = np.repeat(builders.phantom(8)[..., None], 3, axis=2)
        if kind == "rgb":
            return builders.make_dataset(rgb, "RGB", 8)
        return builders.make_dataset(convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL", 8)
    if kind == "jpeg_baseline":
        stored = builders.phantom(8)
        ds = builders.make_dataset(stored, bits_stored=8)
        frame = builders.jpeg_bytes(Image.fromarray(stored, "L"))
        return builders.encapsulated(ds, [frame], JPEGBaseline8Bit)
    if kind == "broken":  # RLE whose only fragment is garbage: parses, cannot be decoded
        ds = builders.compressed_with(RLELossless, builders.phantom(12), 12)
        fragment = next(generate_frames(ds.PixelData, number_of_frames=1))
        return builders.encapsulated(ds, [b"\xff" * len(fragment)], RLELossless)
    syntax = {"rle": RLELossless, "jpeg_ls1": JPEGLosslessSV1, "j2k": JPEG2000Lossless}.get(kind)
    if syntax is not None:
        return builders.compressed_with(syntax, builders.phantom(12), 12)
    return builders.make_dataset(builders.phantom(12), bits_stored=12)


def make_instance(kind: str, index: int, **meta: str) -> tuple[Dataset, Stored]:
    ds = _pixels(kind)
    ds.PatientID = f"PID-{kind}-{index}-4711"
    ds.PatientName = f"Doe{index}^Jane{kind.replace('_', '')}"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = f"ACC{index:05d}"
    ds.InstitutionName = "Sankt Secret Hospital"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = meta.get("modality", "CR")
    ds.StudyDate = meta.get("date", "20240105")
    ds.BodyPartExamined = meta.get("body", "SKULL")
    ds.StudyDescription = meta.get("desc", "Shunt check")
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    stored = Stored(
        kind,
        str(ds.SOPInstanceUID),
        str(ds.PatientID),
        str(ds.PatientName),
        str(ds.Modality),
        str(ds.StudyDate),
        str(ds.BodyPartExamined),
        str(ds.StudyDescription),
        decodable=kind != "broken",
    )
    return ds, stored


CATALOGUE = [
    ("mono2", {"modality": "CR", "date": "20240105", "body": "SKULL", "desc": "Shunt check"}),
    ("mono1", {"modality": "DX", "date": "20240210", "body": "SKULL", "desc": "Shunt check"}),
    ("rgb", {"modality": "CR", "date": "20240315", "body": "HEAD", "desc": "Skull AP"}),
    ("ybr", {"modality": "DX", "date": "20240420", "body": "HEAD", "desc": "Shunt check"}),
    ("rle", {"modality": "CR", "date": "20240525", "body": "SKULL", "desc": "Valve setting"}),
    ("jpeg_ls1", {"modality": "DX", "date": "20240630", "body": "SKULL", "desc": "Shunt check"}),
    ("j2k", {"modality": "CR", "date": "20240705", "body": "SKULL", "desc": "Shunt check"}),
    ("jpeg_baseline", {"modality": "CR", "date": "20240810", "body": "SKULL", "desc": "Shunt"}),
    ("mono2", {"modality": "CT", "date": "20240105", "body": "HEAD", "desc": "CT head"}),
    ("broken", {"modality": "CR", "date": "20240901", "body": "SKULL", "desc": "Shunt check"}),
]
"""Every photometric interpretation and compression the decoder handles, one CT the usual
X-ray query leaves out, and one instance whose pixels cannot be decoded."""


@pytest.fixture(scope="session")
def filled(orthanc: Orthanc) -> list[Stored]:
    """The catalogue, stored in Orthanc through STOW-RS (one request)."""
    made = [make_instance(kind, i, **meta) for i, (kind, meta) in enumerate(CATALOGUE)]
    answer = stow_client(orthanc).store_instances([ds for ds, _ in made])
    assert len(answer.ReferencedSOPSequence) == len(made)
    assert not answer.get("FailedSOPSequence")
    return [stored for _, stored in made]


# ------------------------------------------------------------------------------ Label Studio


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[StandInLabelStudio]:
    root = tmp_path / "ls-root"
    root.mkdir()
    with StandInLabelStudio(local_files_root=root) as server:
        yield server


@pytest.fixture
def project(standin: StandInLabelStudio) -> int:
    return standin.add_project(DEFAULT_LABEL_CONFIG.read_text(encoding="utf-8"))


def settings_for(
    server: StandInLabelStudio, orthanc: Orthanc, state: Path, password: str = PASSWORD
) -> Settings:
    return Settings(
        state_dir=state,
        label_studio_url=server.url,
        label_studio_api_key=server.api_key,
        pseudonym_key=KEY,
        local_files_root=server.local_files_root,
        dicomweb_url=orthanc.url,
        dicomweb_user=USER,
        dicomweb_password=password,
    )


def run_import(
    server: StandInLabelStudio, settings: Settings, project: int, query: PacsQuery
) -> ImportReport:
    return import_from_pacs(
        query,
        settings=settings,
        client=LabelStudio(server.url, server.api_key),
        pacs=pacs_client(settings),
        project_id=project,
    )


def uids(instances: list[Stored]) -> set[str]:
    return {source_uid("sop", s.sop, KEY) for s in instances}


def task_uids(server: StandInLabelStudio, project: int) -> list[str]:
    return [t["data"]["source_uid"] for t in server.project_tasks(project)]


# ------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (PacsQuery(modalities=("CR",)), lambda s: s.modality == "CR"),
        (PacsQuery(modalities=("CR", "DX")), lambda s: s.modality in ("CR", "DX")),
        (PacsQuery(modalities=("DX",), body_part="HEAD"), lambda s: s.name == "ybr"),
        (
            PacsQuery(since=date(2024, 3, 1), until=date(2024, 6, 30)),
            lambda s: "20240301" <= s.study_date <= "20240630",
        ),
        (
            PacsQuery(study_description="Shunt check", modalities=("CR",)),
            lambda s: s.description == "Shunt check" and s.modality == "CR",
        ),
        (PacsQuery(study_description="Valve*"), lambda s: s.name == "rle"),
        (PacsQuery(body_part="HE?D", modalities=("CR",)), lambda s: s.name == "rgb"),
    ],
    ids=[
        "CR",
        "CR+DX",
        "DX-head",
        "date-range",
        "description",
        "description-wildcard",
        "body-part-wildcard",
    ],
)
def test_query_filters_select_the_right_instances(
    query, expected, filled, orthanc, standin, project, tmp_path
):
    wanted = [s for s in filled if expected(s)]
    assert wanted and len(wanted) < len(filled)  # the filter really filters
    report = run_import(standin, settings_for(standin, orthanc, tmp_path), project, query)

    good = [s for s in wanted if s.decodable]
    assert set(task_uids(standin, project)) == uids(good)
    assert report.created == len(good)
    assert set(report.failed) == {s.sop for s in wanted if not s.decodable}


def test_import_decodes_every_encoding_into_tasks_without_patient_data(
    filled, orthanc, standin, project, tmp_path
):
    query = PacsQuery(modalities=("CR", "DX"))
    report = run_import(standin, settings_for(standin, orthanc, tmp_path), project, query)

    xrays = [s for s in filled if s.modality in ("CR", "DX")]
    good = [s for s in xrays if s.decodable]
    assert report.created == len(good) == 8
    tasks = standin.project_tasks(project)
    assert sorted(task_uids(standin, project)) == sorted(uids(good))
    for task in tasks:
        assert set(task["data"]) == {"image", "patient", "source_uid"}
        assert task["data"]["patient"].startswith("pt-")
    sent = json.dumps([r.body for r in standin.requests if r.body is not None])
    for s in xrays:
        for secret in (s.sop, s.patient_id, s.patient_name, "Sankt Secret", "19700101"):
            assert secret not in sent, f"{secret!r} reached Label Studio"
    # Every PNG holds the phantom: the bright disc (bone) above the background, whatever
    # the encoding (MONOCHROME1 inverted, colour as luminance, compressed decoded).
    mask = builders.disc_mask()
    for s in good:
        png = standin.local_files_root / "valve-id" / f"{source_uid('sop', s.sop, KEY)}.png"
        with Image.open(io.BytesIO(png.read_bytes())) as image:
            assert image.mode == "L" and not image.info, s.name
            pixels = np.asarray(image, dtype=np.float32)
        assert pixels[mask].min() > pixels[~mask].max(), s.name


def test_bad_instance_is_reported_and_skipped_the_rest_imported(
    filled, orthanc, standin, project, tmp_path
):
    broken = next(s for s in filled if not s.decodable)
    report = run_import(
        standin, settings_for(standin, orthanc, tmp_path), project, PacsQuery(modalities=("CR",))
    )
    assert list(report.failed) == [broken.sop]
    assert "RLE" in report.failed[broken.sop] or "decode" in report.failed[broken.sop].lower()
    assert report.created == sum(1 for s in filled if s.modality == "CR" and s.decodable)
    # Refused for good: a second run neither retries nor reports it again.
    again = run_import(
        standin, settings_for(standin, orthanc, tmp_path), project, PacsQuery(modalities=("CR",))
    )
    assert again.failed == {} and again.created == 0


def test_second_run_and_restart_import_nothing_twice(
    filled, orthanc, standin, project, tmp_path, monkeypatch
):
    query = PacsQuery(modalities=("CR", "DX"))
    settings = settings_for(standin, orthanc, tmp_path / "state")
    first = run_import(standin, settings, project, query)
    assert first.created == 8

    retrieved: list[str] = []
    real_retrieve = pacs_module._retrieve
    monkeypatch.setattr(
        pacs_module,
        "_retrieve",
        lambda client, instance: retrieved.append(instance.sop) or real_retrieve(client, instance),
    )
    second = run_import(standin, settings, project, query)
    assert second.created == 0 and second.skipped_duplicates == 9
    assert retrieved == []  # WADO-RS only for what is not yet imported

    # A lost state (new machine, deleted folder): the project's own source_uids still dedupe.
    fresh = settings_for(standin, orthanc, tmp_path / "other-state")
    third = run_import(standin, fresh, project, query)
    assert third.created == 0
    assert len(task_uids(standin, project)) == len(set(task_uids(standin, project))) == 8


def test_watch_picks_up_a_new_xray_and_resumes_after_a_restart(
    filled, orthanc, standin, project, tmp_path
):
    settings = settings_for(standin, orthanc, tmp_path / "state")
    query = PacsQuery(modalities=("CR", "DX"))
    polls: list[ImportReport] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def watch() -> None:
        try:
            watch_pacs(
                query,
                settings=settings,
                client=LabelStudio(standin.url, standin.api_key),
                pacs=pacs_client(settings),
                project_id=project,
                interval_s=WATCH_INTERVAL_S,
                stop=stop,
                on_poll=polls.append,
            )
        except BaseException as exc:  # surfaced in the test thread below
            errors.append(exc)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        _wait(lambda: len(polls) >= 1 or errors, "the first poll")
        assert not errors, errors
        assert polls[0].created == 8
        ds, new = make_instance("rle", 99, date=date.today().strftime("%Y%m%d"), modality="DX")
        stowed = time.monotonic()
        stow_client(orthanc).store_instances([ds])
        new_uid = source_uid("sop", new.sop, KEY)
        _wait(lambda: new_uid in task_uids(standin, project) or errors, "the new X-ray's task")
        latency_s = time.monotonic() - stowed
        assert not errors, errors
        print(f"STOW → task in watch mode: {latency_s:.2f} s")
        assert latency_s < WATCH_DEADLINE_S
    finally:
        stop.set()
        thread.join(30)
        _delete_from_orthanc(orthanc, new.sop)  # other tests count the catalogue
    assert not thread.is_alive()

    state = PacsState.load(settings.state_dir, project, orthanc.url)
    assert state.cursor == date.today() and new_uid in state.handled
    assert all(len(uid) == 32 for uid in state.handled)  # keyed hashes only, no UID
    assert new.sop not in state.path.read_text()

    # Restart: a new watcher resumes from the state and imports nothing twice.
    restart: list[ImportReport] = []
    again = threading.Event()
    restart_thread = threading.Thread(
        target=lambda: watch_pacs(
            query,
            settings=settings,
            client=LabelStudio(standin.url, standin.api_key),
            pacs=pacs_client(settings),
            project_id=project,
            interval_s=WATCH_INTERVAL_S,
            stop=again,
            on_poll=lambda r: (restart.append(r), again.set()),
        ),
        daemon=True,
    )
    restart_thread.start()
    restart_thread.join(WATCH_DEADLINE_S)
    assert restart and restart[0].created == 0 and restart[0].failed == {}
    assert len(task_uids(standin, project)) == len(set(task_uids(standin, project))) == 9


def _delete_from_orthanc(orthanc: Orthanc, sop: str) -> None:
    """Orthanc's REST API (DICOMweb has no delete in this plugin version)."""
    root = orthanc.url.rsplit("/dicom-web", 1)[0]
    auth = (USER, PASSWORD)
    found = requests.post(f"{root}/tools/lookup", data=sop, auth=auth, timeout=10).json()
    for hit in found:
        requests.delete(f"{root}/instances/{hit['ID']}", auth=auth, timeout=10)


def _wait(done, what: str) -> None:
    deadline = time.monotonic() + WATCH_DEADLINE_S
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ------------------------------------------------------------------------------ the CLI


def cli_env(server: StandInLabelStudio, orthanc: Orthanc, state: Path, **extra: str):
    return {
        "LABEL_STUDIO_URL": server.url,
        "LABEL_STUDIO_API_KEY": server.api_key,
        "VALVE_ID_PSEUDONYM_KEY": KEY,
        "LOCAL_FILES_DOCUMENT_ROOT": str(server.local_files_root),
        "VALVE_ID_STATE_DIR": str(state),
        "VALVE_ID_DICOMWEB_URL": orthanc.url,
        "VALVE_ID_DICOMWEB_USER": USER,
        "VALVE_ID_DICOMWEB_PASSWORD": PASSWORD,
        "LOG_LEVEL": "DEBUG",
        **extra,
    }


def test_cli_imports_reports_the_bad_instance_and_never_shows_the_password(
    filled, orthanc, standin, project, tmp_path, caplog, monkeypatch
):
    caplog.set_level(logging.DEBUG)
    for name, value in cli_env(standin, orthanc, tmp_path).items():
        monkeypatch.setenv(name, value)
    args = ["import", "--pacs", "--project", str(project), "--modality", "CR", "--modality", "DX"]
    result = CliRunner().invoke(app, args)

    broken = next(s for s in filled if not s.decodable)
    assert result.exit_code == 1, result.output
    assert "8 task(s) created" in result.output
    assert "Not imported" in result.output
    unfolded = "".join(ch for ch in result.output if ch not in " \n│")
    assert broken.sop in unfolded  # the operator can find it in the PACS
    assert PASSWORD not in result.output and PASSWORD not in caplog.text
    assert caplog.records  # DEBUG logging really ran (urllib3, dicomweb-client, valve-id)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"VALVE_ID_DICOMWEB_PASSWORD": "wrong-" + PASSWORD}, "refused the credentials (HTTP 401)"),
        ({"VALVE_ID_DICOMWEB_URL": "http://127.0.0.1:{port}/dicom-web"}, "is unreachable"),
    ],
    ids=["401", "unreachable"],
)
def test_cli_bad_pacs_is_one_clear_line_and_exit_1(
    change, expected, orthanc, standin, project, tmp_path, caplog, monkeypatch
):
    caplog.set_level(logging.DEBUG)
    env = cli_env(standin, orthanc, tmp_path, LOG_LEVEL="INFO")
    env.update({k: v.format(port=_free_port()) for k, v in change.items()})
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = CliRunner().invoke(app, ["import", "--pacs", "--project", str(project)])

    assert result.exit_code == 1
    assert expected in result.output
    assert "VALVE_ID_DICOMWEB_" in result.output  # says what to check
    assert "Traceback" not in result.output
    for secret in (PASSWORD, "wrong-" + PASSWORD):
        assert secret not in result.output and secret not in caplog.text
    assert standin.project_tasks(project) == []


def test_credentials_in_the_url_are_refused_without_echoing_them():
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {"VALVE_ID_DICOMWEB_URL": f"http://{USER}:{PASSWORD}@127.0.0.1:8042/dicom-web"}
        )
    assert PASSWORD not in str(caught.value) and "VALVE_ID_DICOMWEB_USER" in str(caught.value)
    settings = Settings(dicomweb_user=USER, dicomweb_password=PASSWORD)
    assert PASSWORD not in repr(settings)


def test_a_refused_login_is_a_pacs_error_with_its_status(orthanc, standin, project, tmp_path):
    settings = settings_for(standin, orthanc, tmp_path, password="wrong")
    with pytest.raises(PacsError) as caught:
        run_import(standin, settings, project, PacsQuery())
    assert caught.value.status == 401 and caught.value.refused_login
    assert "wrong" not in str(caught.value)


def test_cli_refuses_pacs_options_without_pacs_and_a_folder_with_pacs(tmp_path):
    runner = CliRunner()
    watch = runner.invoke(app, ["import", str(tmp_path), "--project", "1", "--watch"])
    assert watch.exit_code == 2 and "only apply with --pacs" in watch.output
    both = runner.invoke(app, ["import", str(tmp_path), "--project", "1", "--pacs"])
    assert both.exit_code == 2 and "either a folder or --pacs" in both.output
