"""``valve-id import``: de-identification first, then dedupe, failures and the CLI.

Label Studio itself cannot run in a unit test; the importer talks (through the real
label-studio-sdk) to a stand-in Label Studio (:mod:`labelstudio_standin`, a tiny threaded HTTP
server on 127.0.0.1) that records every project, storage and task it is sent. The
end-to-end suite against a real Label Studio is issue 5.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import struct
from collections import defaultdict
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from labelstudio_standin import StandInLabelStudio
from PIL import Image, PngImagePlugin
from typer import Typer
from typer.testing import CliRunner

from backend.settings import DEFAULT_LABEL_CONFIG, Settings, SettingsError
from backend.tools import importer
from backend.tools.commands.importer import import_command
from backend.tools.guides import GUIDES_SUBDIR
from backend.tools.importer import (
    DEFAULT_PROJECT_TITLE,
    ImportReport,
    import_folder,
    pseudonymize,
    source_uid,
)
from training.labelstudio import NO_RETRY, LabelStudio
from training.shared.dicom import load_image
from training.synthetic import generate_dataset

KEY = "test-pseudonym-key-0123456789abcdef"
OTHER_KEY = "another-pseudonym-key-fedcba9876543210"
N_IMAGES = 8
SEED = 3
"""Seed whose 8 images include patients with several images (checked in the test)."""


@pytest.fixture(scope="module")
def dicom_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic DICOMs with realistic identifying headers (name, id, birth date ...)."""
    out = tmp_path_factory.mktemp("dicoms")
    generate_dataset(out, N_IMAGES, SEED, size_range_px=(64, 96))
    return out


@pytest.fixture
def standin(tmp_path: Path):
    root = tmp_path / "ls-root"
    root.mkdir()
    with StandInLabelStudio(local_files_root=root) as server:
        yield server


def settings_for(server: StandInLabelStudio, key: str | None = KEY) -> Settings:
    return Settings(
        label_studio_url=server.url,
        label_studio_api_key=server.api_key,
        pseudonym_key=key or "",
        local_files_root=server.local_files_root,
        label_config=DEFAULT_LABEL_CONFIG,
    )


def run_import(server: StandInLabelStudio, source: Path, **kwargs) -> ImportReport:
    settings = kwargs.pop("settings", None) or settings_for(server)
    kwargs.setdefault("project_id", None)
    kwargs.setdefault("create", False)
    return import_folder(
        source, settings=settings, client=LabelStudio(server.url, server.api_key), **kwargs
    )


def dicom_files(folder: Path) -> list[Path]:
    return sorted((folder / "images").glob("*.dcm"))


def identifying_strings(paths: list[Path]) -> set[str]:
    """Every text value of the DICOM headers long enough to be meaningful, plus name parts."""
    found: set[str] = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
            assert str(ds.get(keyword, "")), f"test data lacks {keyword}"
        found.update(
            {
                str(ds.PatientName),
                *str(ds.PatientName).split("^"),
                str(ds.PatientID),
                str(ds.PatientBirthDate),
                str(ds.AccessionNumber),
                str(ds.InstitutionName),
                str(ds.SOPInstanceUID),
                str(ds.StudyInstanceUID),
                path.stem,
            }
        )
        for element in ds.iterall():
            if element.VR in ("PN", "LO", "SH", "DA", "UI", "LT", "ST", "CS") and element.value:
                values = element.value if element.VM > 1 else [element.value]
                found.update(str(v) for v in values if len(str(v)) >= 6)
    return {s for s in found if len(s) >= 4}


def png_chunk_types(data: bytes) -> list[str]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    types, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        types.append(data[offset + 4 : offset + 8].decode("ascii"))
        offset += 12 + length
    return types


# ------------------------------------------------------------------------------ de-identification


def test_tasks_and_pngs_carry_no_identifying_dicom_data(standin, dicom_set):
    report = run_import(standin, dicom_set, create=True)

    assert report.failed == {} and report.created == N_IMAGES
    tasks = standin.project_tasks(report.project_id)
    assert len(tasks) == N_IMAGES
    secrets = identifying_strings(dicom_files(dicom_set))
    assert len(secrets) > 5 * N_IMAGES  # the check below really has something to look for
    sent = json.dumps([r.body for r in standin.requests if r.body is not None])
    for secret in secrets:
        assert secret not in sent, f"{secret!r} reached Label Studio"
    for task in tasks:
        assert set(task["data"]) == {"image", "patient", "source_uid"}

    pngs = sorted(
        p for p in standin.local_files_root.rglob("*.png") if GUIDES_SUBDIR not in p.parts
    )
    assert len(pngs) == N_IMAGES
    for png in pngs:
        data = png.read_bytes()
        assert set(png_chunk_types(data)) <= {"IHDR", "IDAT", "IEND"}  # no text/EXIF/time
        for secret in secrets:
            assert secret.encode() not in data and secret not in png.name
        with Image.open(png) as im:
            assert im.mode == "L" and not im.info
            pixels = np.asarray(im)
        assert pixels.min() == 0 and pixels.max() == 255  # full range for display


def test_png_shows_the_decoded_image(standin, dicom_set):
    report = run_import(standin, dicom_set, create=True)
    by_uid = {t["data"]["source_uid"]: t for t in standin.project_tasks(report.project_id)}
    path = dicom_files(dicom_set)[0]
    uid = source_uid("sop", str(pydicom.dcmread(path).SOPInstanceUID), KEY)
    task = by_uid[uid]
    relative = task["data"]["image"].split("?d=", 1)[1]
    png = np.asarray(Image.open(standin.local_files_root / relative), dtype=np.float64)
    decoded = load_image(path).astype(np.float64)
    assert png.shape == decoded.shape
    assert np.corrcoef(png.ravel(), decoded.ravel())[0, 1] > 0.999  # bright bone kept


def test_same_patient_same_pseudonym_and_grouping_follows_patients(standin, dicom_set):
    report = run_import(standin, dicom_set, create=True)
    by_uid = {t["data"]["source_uid"]: t["data"] for t in standin.project_tasks(report.project_id)}
    pseudonyms: dict[str, set[str]] = defaultdict(set)
    for path in dicom_files(dicom_set):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        data = by_uid[source_uid("sop", str(ds.SOPInstanceUID), KEY)]
        assert data["patient"] == pseudonymize(str(ds.PatientID), KEY)
        pseudonyms[str(ds.PatientID)].add(data["patient"])
    with (dicom_set / "manifest.csv").open() as fh:
        per_patient = defaultdict(int)
        for row in csv.DictReader(fh):
            per_patient[row["patient_id"]] += 1
    assert max(per_patient.values()) > 1, "the seed must give a patient with several images"
    assert all(len(p) == 1 for p in pseudonyms.values())
    flat = [next(iter(p)) for p in pseudonyms.values()]
    assert len(set(flat)) == len(flat)  # different patients, different pseudonyms


def test_pseudonyms_are_stable_per_key_and_differ_across_keys():
    assert pseudonymize("12345678", KEY) == pseudonymize("12345678", KEY)
    assert pseudonymize(" 12345678 ", KEY) == pseudonymize("12345678", KEY)
    assert pseudonymize("12345678", KEY) != pseudonymize("12345678", OTHER_KEY)
    assert pseudonymize("12345678", KEY) != pseudonymize("12345679", KEY)
    assert pseudonymize("12345678", KEY).startswith("pt-")
    assert "12345678" not in pseudonymize("12345678", KEY)
    assert source_uid("sop", "1.2.3", KEY) != source_uid("sop", "1.2.3", OTHER_KEY)
    assert source_uid("sop", "1.2.3", KEY) != source_uid("sha256", "1.2.3", KEY)


def test_another_key_gives_other_pseudonyms(standin, dicom_set, tmp_path):
    first = run_import(standin, dicom_set, create=True)
    second = run_import(
        standin,
        dicom_set,
        create=True,
        settings=settings_for(standin, OTHER_KEY),
        storage_root=standin.local_files_root / "other",
    )
    patients = [
        {t["data"]["patient"] for t in standin.project_tasks(r.project_id)} for r in (first, second)
    ]
    assert patients[0] and patients[1] and not patients[0] & patients[1]


def test_missing_or_short_pseudonym_key_is_a_clear_error_before_anything_happens(
    standin, dicom_set
):
    with pytest.raises(SettingsError, match="VALVE_ID_PSEUDONYM_KEY"):
        run_import(standin, dicom_set, create=True, settings=settings_for(standin, None))
    with pytest.raises(SettingsError, match="VALVE_ID_PSEUDONYM_KEY"):
        run_import(standin, dicom_set, create=True, settings=settings_for(standin, "short"))
    assert standin.requests == []
    assert list(standin.local_files_root.iterdir()) == []


# ------------------------------------------------------------------------------ dedupe


def test_reimport_creates_no_duplicates(standin, dicom_set, tmp_path):
    first = run_import(standin, dicom_set, create=True)
    copy = tmp_path / "again"
    shutil.copytree(dicom_set, copy)  # same files under other names/places
    (copy / "images" / "IM00001.dcm").rename(copy / "renamed.dcm")
    second = run_import(standin, copy, project_id=first.project_id)
    assert second.created == 0 and second.skipped_duplicates == N_IMAGES
    assert len(standin.project_tasks(first.project_id)) == N_IMAGES
    assert len(_import_storages(standin)) == 1  # the storage found, not created twice


def test_dedupe_sees_tasks_beyond_the_first_page(standin, dicom_set):
    pid = standin.add_project(DEFAULT_LABEL_CONFIG.read_text())
    for i in range(130):  # Label Studio pages task lists by 100
        standin.add_task(pid, {"image": f"/data/upload/{pid}/{i}.png", "source_uid": f"x{i}"})
    sop = str(pydicom.dcmread(dicom_files(dicom_set)[0], stop_before_pixels=True).SOPInstanceUID)
    standin.add_task(
        pid, {"image": "/data/upload/1/last.png", "source_uid": source_uid("sop", sop, KEY)}
    )
    report = run_import(standin, dicom_set, project_id=pid)
    assert report.skipped_duplicates == 1 and report.created == N_IMAGES - 1
    assert standin.count("GET", "/api/tasks") >= 2


def test_rerun_after_a_partial_import_completes_without_duplicates(standin, dicom_set, monkeypatch):
    monkeypatch.setattr(importer, "IMPORT_BATCH_SIZE", 3)
    standin.fail_next(1, 400, "/api/projects/1/import")  # the first batch is refused
    first = run_import(standin, dicom_set, create=True)
    assert len(first.failed) == 3 and first.created == N_IMAGES - 3
    assert all("refused" in reason for reason in first.failed.values())
    second = run_import(standin, dicom_set, project_id=first.project_id)
    assert second.created == 3 and second.skipped_duplicates == N_IMAGES - 3
    uids = [t["data"]["source_uid"] for t in standin.project_tasks(first.project_id)]
    assert len(uids) == len(set(uids)) == N_IMAGES


# ------------------------------------------------------------------------------ failures, rasters


def test_a_corrupt_file_fails_alone(standin, dicom_set, tmp_path):
    source = tmp_path / "mixed"
    shutil.copytree(dicom_set, source)
    good = dicom_files(source)
    truncated = good[0].read_bytes()[:400]
    good[0].write_bytes(truncated)  # header cut off mid-way
    (source / "images" / "garbage.dcm").write_bytes(b"not a dicom at all" * 20)
    (source / "README.txt").write_text("scanned on the old PACS\n")

    report = run_import(standin, source, create=True)

    assert set(report.failed) == {"images/IM00001.dcm", "images/garbage.dcm"}
    assert all(reason for reason in report.failed.values())
    assert report.created == N_IMAGES - 1 and report.ignored == 1
    assert len(standin.project_tasks(report.project_id)) == N_IMAGES - 1


def test_burned_in_text_is_counted(standin, dicom_set, tmp_path):
    source = tmp_path / "burned"
    shutil.copytree(dicom_set, source)
    path = dicom_files(source)[2]
    ds = pydicom.dcmread(path)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(path, enforce_file_format=True)
    report = run_import(standin, source, create=True)
    assert report.burned_in == 1 and report.created == N_IMAGES


def test_png_and_jpeg_with_a_manifest(standin, tmp_path):
    source = tmp_path / "rasters"
    source.mkdir()
    gradient = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "Doe^John 1961-02-03")
    Image.fromarray(gradient).save(source / "doe_john.png", pnginfo=info)
    Image.fromarray(255 - gradient).save(source / "b.png")
    exif = Image.Exif()
    exif[0x010E] = "Roe^Jane"  # ImageDescription
    Image.fromarray(gradient).convert("RGB").save(source / "c.jpg", exif=exif, quality=95)
    Image.fromarray(gradient).save(source / "unlisted.png")
    (source / "manifest.csv").write_text(
        "file,patient_id,label\ndoe_john.png,MRN-0001,Codman Hakim\nb.png,MRN-0001,\n"
        "c.jpg,MRN-0002,proGAV 2.0\n"
    )

    report = run_import(standin, source, create=True)

    assert report.created == 3
    assert list(report.failed) == ["unlisted.png"] and "manifest" in report.failed["unlisted.png"]
    tasks = standin.project_tasks(report.project_id)
    by_patient = defaultdict(int)
    for task in tasks:
        by_patient[task["data"]["patient"]] += 1
    assert sorted(by_patient.values()) == [1, 2]
    assert set(by_patient) == {pseudonymize("MRN-0001", KEY), pseudonymize("MRN-0002", KEY)}
    text = json.dumps(tasks) + "".join(p.name for p in standin.local_files_root.rglob("*"))
    for secret in ("MRN-0001", "MRN-0002", "doe_john", "Doe", "Roe", "Codman Hakim"):
        assert secret not in text
    for png in standin.local_files_root.rglob("*.png"):
        data = png.read_bytes()
        assert b"Doe" not in data and b"Roe" not in data
        assert set(png_chunk_types(data)) <= {"IHDR", "IDAT", "IEND"}

    again = run_import(standin, source, project_id=report.project_id)
    assert again.created == 0 and again.skipped_duplicates == 3


def test_storage_outside_the_local_files_root_is_refused(standin, dicom_set, tmp_path):
    with pytest.raises(SettingsError, match="LOCAL_FILES_DOCUMENT_ROOT"):
        run_import(standin, dicom_set, create=True, storage_root=tmp_path / "elsewhere")
    with pytest.raises(SettingsError, match="LOCAL_FILES_DOCUMENT_ROOT"):
        run_import(standin, dicom_set, create=True, storage_root=standin.local_files_root)
    assert standin.requests == []


# ------------------------------------------------------------------------------ Label Studio side


def test_create_makes_the_project_and_a_storage_that_serves_the_images(standin, dicom_set):
    report = run_import(standin, dicom_set, create=True)
    project = standin.projects[report.project_id]
    assert project["title"] == DEFAULT_PROJECT_TITLE
    assert project["label_config"] == DEFAULT_LABEL_CONFIG.read_text()
    (storage,) = _import_storages(standin)
    assert storage["project"] == report.project_id
    assert Path(storage["path"]) == (standin.local_files_root / "valve-id").resolve()
    # Its own storage, and the reading guides' pictures' (every import installs them).
    (guides,) = [s for s in standin.storages if s not in _import_storages(standin)]
    assert Path(guides["path"]).name == GUIDES_SUBDIR and guides["project"] == report.project_id
    assert standin.count("POST", "/api/storages/localfiles/") == 2
    assert standin.count("POST", "/api/storages/localfiles/sync") == 0  # never synced
    task = standin.project_tasks(report.project_id)[0]
    url = standin.url + task["data"]["image"]
    answer = httpx.get(url, headers={"Authorization": f"Token {standin.api_key}"})
    assert answer.status_code == 200
    assert Image.open(io.BytesIO(answer.content)).format == "PNG"


def test_unknown_project_is_a_clear_error(standin, dicom_set):
    from training.shared.errors import DatasetError

    with pytest.raises(DatasetError, match="no project 42"):
        run_import(standin, dicom_set, project_id=42)


def test_a_refused_or_unreachable_label_studio_is_a_clear_error(standin, dicom_set):
    from training.shared.errors import DatasetError

    wrong = LabelStudio(standin.url, "wrong-key", retry=NO_RETRY)
    with pytest.raises(DatasetError, match="refused.*401.*LABEL_STUDIO_API_KEY"):
        import_folder(
            dicom_set, project_id=None, create=True, settings=settings_for(standin), client=wrong
        )
    gone = StandInLabelStudio().start()
    url = gone.url
    gone.stop()
    nobody = LabelStudio(url, "k" * 40, retry=NO_RETRY)
    with pytest.raises(DatasetError, match="unreachable"):
        import_folder(
            dicom_set, project_id=1, create=False, settings=settings_for(standin), client=nobody
        )


# ------------------------------------------------------------------------------ CLI


def cli() -> Typer:
    app = Typer()
    app.command("import")(import_command)

    @app.command("noop")
    def _noop() -> None:  # a second command keeps "import" a subcommand
        """Placeholder."""

    return app


def cli_env(server: StandInLabelStudio, key: str = KEY) -> dict[str, str]:
    return {
        "LABEL_STUDIO_URL": server.url,
        "LABEL_STUDIO_API_KEY": server.api_key,
        "VALVE_ID_PSEUDONYM_KEY": key,
        "LOCAL_FILES_DOCUMENT_ROOT": str(server.local_files_root),
    }


def test_cli_imports_and_reports(standin, dicom_set, monkeypatch):
    for name, value in cli_env(standin).items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    result = runner.invoke(cli(), ["import", str(dicom_set), "--create"])
    assert result.exit_code == 0, result.output
    assert f"{N_IMAGES} task(s) created" in result.output
    again = runner.invoke(cli(), ["import", str(dicom_set), "--project", "1"])
    assert again.exit_code == 0 and f"{N_IMAGES} already there" in again.output
    assert len(standin.project_tasks(1)) == N_IMAGES


def test_cli_fails_visibly(standin, dicom_set, tmp_path, monkeypatch):
    for name, value in cli_env(standin).items():
        monkeypatch.setenv(name, value)
    runner = CliRunner()
    both = runner.invoke(cli(), ["import", str(dicom_set), "--create", "--project", "1"])
    assert both.exit_code == 2
    source = tmp_path / "bad"
    source.mkdir()
    (source / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    failed = runner.invoke(cli(), ["import", str(source), "--create"])
    assert failed.exit_code == 1 and "broken.dcm" in failed.output
    monkeypatch.delenv("VALVE_ID_PSEUDONYM_KEY")
    nokey = runner.invoke(cli(), ["import", str(dicom_set), "--create"])
    assert nokey.exit_code == 1 and "VALVE_ID_PSEUDONYM_KEY" in nokey.output


def test_cli_refuses_a_folder_with_nothing_importable(standin, tmp_path, monkeypatch):
    """An empty folder, or one with nothing valve-id imports, is one line and exit 1, found
    before Label Studio is touched (``--create`` makes no empty project); issue 14."""
    for name, value in cli_env(standin).items():
        monkeypatch.setenv(name, value)
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    (junk / "sub").mkdir(parents=True)
    (junk / "notes.txt").write_text("not an X-ray")
    Image.new("L", (8, 8)).save(junk / "sub" / "unlisted.png")  # no manifest.csv lists it
    runner = CliRunner()
    for folder, found in ((empty, "no file"), (junk, "2 file(s)")):
        result = runner.invoke(cli(), ["import", str(folder), "--create"])
        assert result.exit_code == 1, result.output
        (line,) = [line for line in result.output.splitlines() if line.strip()]
        assert f"nothing importable in {folder} ({found}" in line
        assert "DICOM" in line and "PNG/JPEG" in line and "manifest.csv" in line
        assert "task(s) created" not in result.output
    assert standin.projects == {}


def _import_storages(standin: StandInLabelStudio) -> list[dict]:
    """The project storages of the X-rays (not the reading guides' pictures)."""
    return [s for s in standin.storages if Path(s["path"]).name != GUIDES_SUBDIR]
