"""The reading guides' pictures: shipped for every guide, installed where Label Studio serves
them, for the project, once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from labelstudio_standin import StandInLabelStudio
from PIL import Image

from backend.settings import DEFAULT_LABEL_CONFIG, Settings
from backend.tools.guides import GUIDES_SUBDIR, guide_files, install_guides
from backend.tools.stack import bootstrap
from training.labelstudio import LabelStudio
from training.synthetic import generate_dataset
from training.synthetic.guides import GUIDE_PICTURES, draw_guide_picture

ROOT = Path(__file__).resolve().parents[2]
GUIDES = ROOT / "guides"
KEY = "k" * 32


@pytest.fixture
def standin(tmp_path: Path):
    root = tmp_path / "ls-root"
    root.mkdir()
    with StandInLabelStudio(local_files_root=root) as server:
        yield server


def test_every_guide_picture_the_config_names_is_shipped() -> None:
    named = guide_files(DEFAULT_LABEL_CONFIG.read_text(encoding="utf-8"))
    assert sorted(named) == sorted(GUIDE_PICTURES.values())
    assert sorted(p.name for p in GUIDES.glob("*.png")) == sorted(named)


@pytest.mark.parametrize("label", sorted(GUIDE_PICTURES))
def test_shipped_pictures_are_the_generators_drawings(label: str) -> None:
    """guides/ is regenerated, never hand-edited: ``python -m training.synthetic.guides``."""
    shipped = np.asarray(Image.open(GUIDES / GUIDE_PICTURES[label]).convert("RGB"), dtype=int)
    drawn = np.asarray(draw_guide_picture(label), dtype=int)
    assert shipped.shape == drawn.shape == (150, 240, 3)
    assert np.abs(shipped - drawn).max() <= 2


def test_install_copies_the_pictures_and_adds_one_storage(standin: StandInLabelStudio) -> None:
    pid = standin.add_project(DEFAULT_LABEL_CONFIG.read_text(encoding="utf-8"), title="p")
    client = LabelStudio(standin.url, standin.api_key)
    root = standin.local_files_root
    for _ in range(2):  # the second run finds both the files and the storage
        folder = install_guides(client, pid, local_files_root=root, source=GUIDES)
    assert folder == root.resolve() / GUIDES_SUBDIR
    for picture in GUIDES.glob("*.png"):
        assert (folder / picture.name).read_bytes() == picture.read_bytes()
        assert (folder / picture.name).stat().st_mode & 0o444 == 0o444
    (storage,) = standin.storages
    assert (storage["project"], Path(storage["path"])) == (pid, folder)
    assert standin.count("POST", "/api/storages/localfiles/sync") == 0  # never synced


def test_a_changed_picture_is_copied_again(standin: StandInLabelStudio, tmp_path: Path) -> None:
    pid = standin.add_project(DEFAULT_LABEL_CONFIG.read_text(encoding="utf-8"), title="p")
    client = LabelStudio(standin.url, standin.api_key)
    source = tmp_path / "guides"
    source.mkdir()
    (source / "a.png").write_bytes(b"one")
    install_guides(client, pid, local_files_root=standin.local_files_root, source=source)
    (source / "a.png").write_bytes(b"two")
    folder = install_guides(client, pid, local_files_root=standin.local_files_root, source=source)
    assert (folder / "a.png").read_bytes() == b"two"


def test_valve_id_up_installs_the_guides_with_the_demo(
    standin: StandInLabelStudio, tmp_path: Path
) -> None:
    demo = tmp_path / "demo"
    generate_dataset(demo, 4, seed=3, size_range_px=(64, 96))
    pid = standin.add_project(DEFAULT_LABEL_CONFIG.read_text(encoding="utf-8"), title="p")
    settings = Settings(
        label_studio_url=standin.url,
        label_studio_api_key=standin.api_key,
        pseudonym_key=KEY,
        local_files_root=standin.local_files_root,
        label_config=DEFAULT_LABEL_CONFIG,
    )
    bootstrap.import_demo(pid, demo, settings, client=LabelStudio(standin.url, standin.api_key))
    guides = standin.local_files_root.resolve() / GUIDES_SUBDIR
    assert sorted(p.name for p in guides.iterdir()) == sorted(GUIDE_PICTURES.values())
    assert guides in {Path(s["path"]) for s in standin.storages if s["project"] == pid}
