"""The demo bootstrap's seed labels (backend/tools/stack/bootstrap.py): true class, valve centre
and setting.

Runs the real steps against the stand-in Label Studio (:mod:`labelstudio_standin`): the
synthetic demo is imported with ``valve-id import``'s code, seeded, and read back the way a
training run reads it, so the centre a seed annotation marks is checked in the pixels of the
very PNG the run trains on.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from labelstudio_standin import StandInLabelStudio

from backend.settings import DEFAULT_LABEL_CONFIG, Settings
from backend.tools.importer import source_uid
from backend.tools.stack import bootstrap
from backend.tools.stack.bootstrap import DemoImage, LabelStudioAdmin, seed_result
from training.labelstudio import LabelStudio
from training.labelstudio.export import LabelStudioSource, load_project_items
from training.shared.dataset import prepare_images
from training.shared.dicom import load_image, read_dicom_header
from training.shared.labels import load_label_config, parse_label_config
from training.shared.preprocess import PreprocessParams
from training.synthetic import generate_dataset

KEY = "test-pseudonym-key-0123456789abcdef"
CONFIG = load_label_config(DEFAULT_LABEL_CONFIG)
OLD_CONFIG_XML = (
    '<View><Image name="image" value="$image"/><Choices name="valve" toName="image">'
    + "".join(f'<Choice value="{c}"/>' for c in CONFIG.classes)
    + "</Choices></View>"
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_dataset(out, 8, seed=3, size_range_px=(64, 96))
    return out


@pytest.fixture
def standin(tmp_path: Path):
    root = tmp_path / "ls-root"
    root.mkdir()
    with StandInLabelStudio(local_files_root=root) as server:
        yield server


def manifest_rows(demo: Path) -> dict[str, dict[str, str]]:
    """``source_uid`` → manifest row."""
    with (demo / "manifest.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return {
        source_uid("sop", str(read_dicom_header(demo / r["file"]).SOPInstanceUID), KEY): r
        for r in rows
    }


def imported_project(server: StandInLabelStudio, demo: Path, config_xml: str) -> int:
    pid = server.add_project(config_xml, title=bootstrap.PROJECT_TITLE)
    settings = Settings(
        label_studio_url=server.url,
        label_studio_api_key=server.api_key,
        pseudonym_key=KEY,
        local_files_root=server.local_files_root,
        label_config=DEFAULT_LABEL_CONFIG,
    )
    report = bootstrap.import_demo(
        pid, demo, settings, client=LabelStudio(server.url, server.api_key)
    )
    assert report.created == 8
    return pid


def test_demo_images_carry_the_true_centre_and_the_image_size(demo: Path) -> None:
    truth = bootstrap.demo_images(demo, KEY)
    rows = manifest_rows(demo)
    assert set(truth) == set(rows)
    for uid, image in truth.items():
        row = rows[uid]
        assert (image.label, image.patient_id) == (row["label"], row["patient_id"])
        assert image.valve_xy == (float(row["valve_x"]), float(row["valve_y"]))
        assert (image.width_px, image.height_px) == (int(row["columns"]), int(row["rows"]))
        assert image.setting == row["valve_setting"] and image.setting


def test_seed_result_is_the_class_plus_the_keypoint_in_percent() -> None:
    image = DemoImage("proGAV 2.0", "p1", valve_xy=(50.0, 30.0), width_px=200, height_px=120)
    result = seed_result(CONFIG, image, keypoint=True)
    assert [r["type"] for r in result] == ["choices", "keypointlabels"]
    assert result[0]["value"] == {"choices": ["proGAV 2.0"]}
    point = result[1]
    assert (point["from_name"], point["to_name"]) == ("valve_centre", "image")
    assert (point["original_width"], point["original_height"]) == (200, 120)
    assert point["value"]["keypointlabels"] == ["Valve"]
    assert (point["value"]["x"], point["value"]["y"]) == pytest.approx((25.0, 25.0))
    # No keypoint: asked not to, centre or size unknown, centre outside the image.
    assert len(seed_result(CONFIG, image, keypoint=False)) == 1
    assert len(seed_result(CONFIG, DemoImage("proGAV 2.0", "p1"), keypoint=True)) == 1
    outside = DemoImage("proGAV 2.0", "p1", valve_xy=(250.0, 30.0), width_px=200, height_px=120)
    assert len(seed_result(CONFIG, outside, keypoint=True)) == 1
    old = parse_label_config(OLD_CONFIG_XML)
    assert len(seed_result(old, image, keypoint=True)) == 1


def test_seed_result_adds_the_true_setting_on_the_models_scale() -> None:
    image = DemoImage("proGAV 2.0", "p1", valve_xy=(50.0, 30.0), width_px=200, height_px=120)
    with_setting = DemoImage("proGAV 2.0", "p1", setting="7")
    assert seed_result(CONFIG, with_setting, keypoint=False) == [
        {"value": {"choices": ["proGAV 2.0"]}, "from_name": "valve", "to_name": "image",
         "type": "choices"},
        {"value": {"choices": ["7"]}, "from_name": "setting_progav", "to_name": "image",
         "type": "choices"},
    ]  # fmt: skip
    both = seed_result(CONFIG, dataclasses.replace(image, setting="20"), keypoint=True)
    assert [r["type"] for r in both] == ["choices", "keypointlabels", "choices"]
    hakim = seed_result(CONFIG, DemoImage("Codman Hakim", "p1", setting="30"), keypoint=False)
    assert hakim[1]["from_name"] == "setting_hakim" and hakim[1]["value"]["choices"] == ["30"]
    # No setting: asked not to, none known, off the model's scale, no scale for the class,
    # or a config without scales.
    assert len(seed_result(CONFIG, with_setting, keypoint=False, setting=False)) == 1
    assert len(seed_result(CONFIG, image, keypoint=False)) == 1
    off_scale = DemoImage("proGAV 2.0", "p1", setting="21")
    assert len(seed_result(CONFIG, off_scale, keypoint=False)) == 1
    other = DemoImage("Other valve", "p1", setting="7")
    assert len(seed_result(CONFIG, other, keypoint=False)) == 1
    old = parse_label_config(OLD_CONFIG_XML)
    assert len(seed_result(old, with_setting, keypoint=False)) == 1


def test_seeded_centres_read_back_as_the_true_centre_of_the_imported_png(
    standin: StandInLabelStudio, demo: Path, tmp_path: Path
) -> None:
    pid = imported_project(standin, demo, DEFAULT_LABEL_CONFIG.read_text())
    truth = bootstrap.demo_images(demo, KEY)
    admin = LabelStudioAdmin(standin.url, standin.api_key)
    try:
        created = bootstrap.seed_annotations(admin, pid, truth, CONFIG, target=5)
        assert created >= 5
        assert bootstrap.seed_annotations(admin, pid, truth, CONFIG, target=5) == 0
    finally:
        admin.close()
    annotated = [t for t in standin.project_tasks(pid) if t["annotations"]]
    assert len(annotated) == created
    for task in annotated:
        (annotation,) = task["annotations"]
        types = [r["type"] for r in annotation["result"]]
        assert types == ["choices", "keypointlabels", "choices"]  # class, centre, setting

    # Read back as a training run does: the centre is in the imported PNG's pixels.
    items = load_project_items(
        pid,
        CONFIG.classes,
        tmp_path / "dl",
        image_key=CONFIG.image_key,
        choices_name=CONFIG.choices_name,
        keypoint_name=CONFIG.keypoint_name,
        keypoint_label=CONFIG.keypoint_label,
        settings=CONFIG.settings,
        source=LabelStudioSource(standin.url, standin.api_key),
    )
    rows = manifest_rows(demo)
    uid_of = {str(t["id"]): t["data"]["source_uid"] for t in annotated}
    assert sorted(i.key for i in items) == sorted(uid_of)
    for item in items:
        row = rows[uid_of[item.key]]
        assert item.label == row["label"]
        assert load_image(item.path).shape == (int(row["rows"]), int(row["columns"]))
        assert item.valve_xy == pytest.approx((float(row["valve_x"]), float(row["valve_y"])))
        assert item.setting == row["valve_setting"]
    prepared = prepare_images(items, PreprocessParams(size_px=32))
    assert np.isfinite(prepared.centres).all()
    assert prepared.centres.min() >= 0.0 and prepared.centres.max() <= 1.0


def test_a_project_made_before_the_keypoint_tag_is_seeded_with_classes_only(
    standin: StandInLabelStudio, demo: Path
) -> None:
    pid = imported_project(standin, demo, OLD_CONFIG_XML)
    admin = LabelStudioAdmin(standin.url, standin.api_key)
    try:
        created = bootstrap.seed_annotations(
            admin, pid, bootstrap.demo_images(demo, KEY), CONFIG, target=3
        )
    finally:
        admin.close()
    assert created >= 3
    results = [
        t["annotations"][0]["result"] for t in standin.project_tasks(pid) if t["annotations"]
    ]
    assert len(results) == created
    assert all([r["type"] for r in result] == ["choices"] for result in results)


def test_a_project_without_a_models_scale_is_seeded_without_its_setting(
    standin: StandInLabelStudio, demo: Path
) -> None:
    """The project's own config decides, per model: one made before the Hakim's scale was
    added gets Hakim labels without a setting, and the other models' with theirs."""
    shipped = DEFAULT_LABEL_CONFIG.read_text(encoding="utf-8")
    without_hakim = re.sub(r'<Choices name="setting_hakim".*?</Choices>', "", shipped, flags=re.S)
    assert parse_label_config(without_hakim).setting_scale("Codman Hakim") is None
    pid = imported_project(standin, demo, without_hakim)
    truth = bootstrap.demo_images(demo, KEY)
    admin = LabelStudioAdmin(standin.url, standin.api_key)
    try:
        created = bootstrap.seed_annotations(admin, pid, truth, CONFIG, target=8)
    finally:
        admin.close()
    assert created == 8
    labels = set()
    for task in standin.project_tasks(pid):
        (annotation,) = task["annotations"]
        label = truth[task["data"]["source_uid"]].label
        labels.add(label)
        settings = [r for r in annotation["result"] if r["from_name"].startswith("setting_")]
        assert len(settings) == (0 if label == "Codman Hakim" else 1), label
    assert "Codman Hakim" in labels and len(labels) > 1


def test_seed_line_says_how_its_number_came_about() -> None:
    """``make up`` printed "labelled 42 demo X-rays" where 160 were expected: the line says
    whole patients overshoot the count asked for, and a top-up says the total (issue 14)."""
    first = bootstrap.seed_line(161, 161, 160)
    assert first.startswith("labelled 161 demo X-rays")
    assert "whole patients, about 160 asked" in first
    top_up = bootstrap.seed_line(42, 161, 160)
    assert top_up.startswith("labelled 42 more demo X-rays")
    assert "161 in all" in top_up and "about 160 asked" in top_up
