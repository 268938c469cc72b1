"""Snapshots of a Label Studio project (``data="labelstudio:<id>"``).

Label Studio itself cannot run in a unit test; these tests talk to a stand-in Label Studio
(:mod:`labelstudio_standin`, a tiny threaded HTTP server on 127.0.0.1 answering the export,
token and image routes through the real label-studio-sdk). The end-to-end suite against a
real Label Studio is issue 5.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from labelstudio_standin import StandInLabelStudio, make_pat
from PIL import Image

from training.fitting.sources import load_items
from training.labelstudio import LabelStudio
from training.labelstudio import export as labelstudio_source
from training.labelstudio.export import (
    LabelStudioSource,
    configure,
    keypoint_centre,
    latest_annotation,
    latest_annotation_choice,
    latest_choice,
    load_project_items,
    parse_project_source,
)
from training.shared.dataset import LabelledImage
from training.shared.dicom import load_image
from training.shared.errors import DatasetError
from training.shared.labels import SettingScale

CLASSES = ("Codman Hakim", "Codman Certas Plus", "Sophysa Sophy SM8", "proGAV 2.0")
CONFIG = '<View><Image name="image" value="$image"/><Choices name="valve" toName="image">' + (
    "".join(f'<Choice value="{c}"/>' for c in CLASSES) + "</Choices></View>"
)
FAST = (0.01, 0.01)
"""Backoff for tests: two retries, 10 ms apart."""


def png_bytes(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def annotation(
    aid: int, choice: str | None, updated: str, *, cancelled: bool = False, name: str = "valve"
) -> dict:
    result = (
        []
        if choice is None
        else [
            {
                "from_name": name,
                "to_name": "image",
                "type": "choices",
                "value": {"choices": [choice]},
            }
        ]
    )
    return {
        "id": aid,
        "result": result,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "created_at": "2026-11-25T10:00:00.000000Z",
        "updated_at": updated,
    }


@pytest.fixture
def standin(tmp_path: Path):
    root = tmp_path / "ls-root"
    root.mkdir()
    with StandInLabelStudio(local_files_root=root) as server:
        yield server


def source_for(server: StandInLabelStudio, **overrides) -> LabelStudioSource:
    values = {"url": server.url, "api_key": server.api_key, "local_files_root": None}
    values.update(overrides)
    return LabelStudioSource(**values)


def upload(server: StandInLabelStudio, pid: int, name: str, data: bytes) -> str:
    path = f"/data/upload/{pid}/{name}"
    server.uploads[path] = data
    return path


def test_snapshot_has_latest_labels_patient_groups_and_downloaded_images(standin, tmp_path):
    pid = standin.add_project(CONFIG)
    images = {k: png_bytes(v) for k, v in {"a": 10, "b": 60, "c": 120, "d": 180, "e": 240}.items()}
    t1 = standin.add_task(
        pid,
        {"image": upload(standin, pid, "1a-Mueller_Hans.png", images["a"]), "patient": "pt-1"},
        [annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z")],
    )
    t2 = standin.add_task(
        pid,
        {"image": upload(standin, pid, "2b.png", images["b"]), "patient": "pt-1"},
        [annotation(2, "proGAV 2.0", "2026-11-25T10:00:00Z")],
    )
    t3 = standin.add_task(  # no patient: its own group
        pid,
        {"image": upload(standin, pid, "3c.png", images["c"])},
        [annotation(3, "Sophysa Sophy SM8", "2026-11-25T10:00:00Z")],
    )
    standin.add_task(  # only a cancelled (skipped) annotation: not labelled
        pid,
        {"image": upload(standin, pid, "4d.png", images["d"]), "patient": "pt-2"},
        [annotation(4, "Codman Hakim", "2026-11-25T10:00:00Z", cancelled=True)],
    )
    t5 = standin.add_task(  # corrected later: the latest non-cancelled annotation wins
        pid,
        {"image": upload(standin, pid, "5e.png", images["e"]), "patient": "pt-3"},
        [
            annotation(7, "Codman Hakim", "2026-11-25T09:00:00Z"),
            annotation(5, "Codman Certas Plus", "2026-11-26T08:00:00Z"),  # updated last
            annotation(8, "proGAV 2.0", "2026-11-27T08:00:00Z", cancelled=True),
            annotation(9, None, "2026-11-28T08:00:00Z"),  # submitted without a choice
        ],
    )
    standin.add_task(pid, {"image": upload(standin, pid, "6.png", png_bytes(1))})  # unlabelled

    out = tmp_path / "images"
    progress: list[tuple[int, int]] = []
    items = load_project_items(
        pid,
        CLASSES,
        out,
        choices_name="valve",
        source=source_for(standin),
        progress=lambda d, t: progress.append((d, t)),
    )

    by_key = {item.key: item for item in items}
    assert set(by_key) == {str(t1), str(t2), str(t3), str(t5)}
    assert {k: v.label for k, v in by_key.items()} == {
        str(t1): "Codman Hakim",
        str(t2): "proGAV 2.0",
        str(t3): "Sophysa Sophy SM8",
        str(t5): "Codman Certas Plus",
    }
    assert by_key[str(t1)].group == by_key[str(t2)].group == "pt-1"
    assert by_key[str(t3)].group == f"task-{t3}"
    assert by_key[str(t5)].group == "pt-3"
    expected = {str(t1): "a", str(t2): "b", str(t3): "c", str(t5): "e"}
    for key, item in by_key.items():
        assert isinstance(item, LabelledImage)
        path = Path(item.path)
        assert path.parent == out
        assert path.read_bytes() == images[expected[key]]
        assert "Mueller" not in path.name and path.suffix == ".png"
        assert load_image(path).shape == (8, 8)
    assert progress[-1] == (4, 4)
    assert not list(out.glob(".*tmp"))
    # every request carried the legacy token, as the SDK sends it
    assert standin.requests
    assert all(
        r.headers.get("Authorization") == f"Token {standin.api_key}" for r in standin.requests
    )


def test_latest_choice_rules():
    older = annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z")
    newer = annotation(2, "proGAV 2.0", "2026-11-25T11:00:00+00:00")
    assert latest_choice([newer, older]) == "proGAV 2.0"
    assert latest_choice([older]) == "Codman Hakim"
    several = annotation(3, "Codman Hakim", "2026-11-26T10:00:00Z")
    several["result"][0]["value"]["choices"].append("proGAV 2.0")
    assert latest_choice([older, several]) == "Codman Hakim"  # two classes: does not count
    same_time = annotation(4, "Sophysa Sophy SM8", "2026-11-25T11:00:00Z")
    assert latest_choice([same_time, newer]) == "Sophysa Sophy SM8"  # tie: higher id
    cancelled = annotation(5, "Codman Hakim", "2026-11-27T10:00:00Z", cancelled=True)
    assert latest_choice([cancelled]) is None
    assert latest_choice([annotation(6, None, "2026-11-27T10:00:00Z")]) is None
    assert latest_choice([older], choices_name="other") is None


def test_choices_of_another_tag_do_not_count(standin, tmp_path):
    pid = standin.add_project(CONFIG)
    standin.add_task(
        pid,
        {"image": upload(standin, pid, "x.png", png_bytes(50))},
        [annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z", name="quality")],
    )
    items = load_project_items(
        pid, CLASSES, tmp_path / "dl", choices_name="valve", source=source_for(standin)
    )
    assert items == []


def test_label_outside_the_config_is_an_error_naming_it(standin, tmp_path):
    pid = standin.add_project(CONFIG)
    tid = standin.add_task(
        pid,
        {"image": upload(standin, pid, "x.png", png_bytes(50))},
        [annotation(1, "Medtronic Strata", "2026-11-25T10:00:00Z")],
    )
    with pytest.raises(DatasetError, match="Medtronic Strata") as info:
        load_project_items(pid, CLASSES, tmp_path / "dl", source=source_for(standin))
    assert str(tid) in str(info.value)


def test_image_on_another_host_is_refused_and_never_contacted(standin, tmp_path):
    pid = standin.add_project(CONFIG)
    with StandInLabelStudio(api_key=standin.api_key) as other:
        other.uploads["/data/upload/1/x.png"] = png_bytes(9)
        standin.add_task(
            pid,
            {"image": f"{other.url}/data/upload/1/x.png"},
            [annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z")],
        )
        with pytest.raises(DatasetError, match="host"):
            load_project_items(pid, CLASSES, tmp_path / "dl", source=source_for(standin))
        assert other.requests == []


def test_local_files_are_read_from_the_root_without_http(standin, tmp_path):
    root = standin.local_files_root
    (root / "xrays").mkdir()
    data = png_bytes(77)
    (root / "xrays" / "abc.png").write_bytes(data)
    standin.storages.append({"id": 1, "project": 1, "path": str(root / "xrays")})
    pid = standin.add_project(CONFIG)
    standin.add_task(
        pid,
        {"image": "/data/local-files/?d=xrays/abc.png", "patient": "pt-9"},
        [annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z")],
    )

    direct = load_project_items(
        pid, CLASSES, tmp_path / "direct", source=source_for(standin, local_files_root=root)
    )
    assert Path(direct[0].path).read_bytes() == data
    assert standin.count("GET", "/data/") == 0

    # Without the root on this host, the same file comes over HTTP from Label Studio.
    remote = load_project_items(pid, CLASSES, tmp_path / "remote", source=source_for(standin))
    assert Path(remote[0].path).read_bytes() == data
    assert standin.count("GET", "/data/local-files") == 1


def test_local_files_path_cannot_escape_the_root(standin, tmp_path):
    root = standin.local_files_root
    secret = tmp_path / "secret.png"  # outside the root
    secret.write_bytes(png_bytes(200))
    pid = standin.add_project(CONFIG)
    standin.add_task(
        pid,
        {"image": "/data/local-files/?d=../secret.png"},
        [annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z")],
    )
    standin.add_task(
        pid,
        {"image": upload(standin, pid, "ok.png", png_bytes(3))},
        [annotation(2, "proGAV 2.0", "2026-11-25T10:00:00Z")],
    )
    out = tmp_path / "dl"
    items = load_project_items(pid, CLASSES, out, source=source_for(standin, local_files_root=root))
    # The escaping path was not read from disk; Label Studio (asked instead) has no such
    # file, so that task is left out and the other one is kept.
    assert [i.label for i in items] == ["proGAV 2.0"]
    assert all(p.read_bytes() != secret.read_bytes() for p in out.iterdir())


def test_unreachable_label_studio_is_retried_then_fails_visibly(tmp_path):
    server = StandInLabelStudio().start()
    url = server.url
    server.stop()  # nothing listens there any more
    slept: list[float] = []
    with pytest.raises(DatasetError, match="Label Studio unreachable while exporting"):
        load_project_items(
            1,
            CLASSES,
            tmp_path / "dl",
            source=LabelStudioSource(url=url, api_key="k" * 40),
            retry_delays_s=(0.01, 0.02, 0.04),
            sleep=slept.append,
        )
    assert slept == [0.01, 0.02, 0.04]


def test_server_errors_are_retried_with_backoff(standin, tmp_path):
    pid = standin.add_project(CONFIG)
    data = png_bytes(33)
    standin.add_task(
        pid,
        {"image": upload(standin, pid, "x.png", data)},
        [annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z")],
    )
    standin.fail_next(2, 503, "/api/projects")
    standin.fail_next(1, 502, "/data/upload")
    slept: list[float] = []
    items = load_project_items(
        pid,
        CLASSES,
        tmp_path / "dl",
        source=source_for(standin),
        retry_delays_s=FAST,
        sleep=slept.append,
    )
    assert Path(items[0].path).read_bytes() == data
    assert standin.count("GET", f"/api/projects/{pid}/export") == 3
    assert standin.count("GET", "/data/upload") == 2
    assert slept == [0.01, 0.01, 0.01]


def test_persistent_server_errors_fail_after_the_retries(standin, tmp_path):
    pid = standin.add_project(CONFIG)
    standin.fail_next(10, 500, "/api/projects")
    with pytest.raises(DatasetError, match="unreachable.*HTTP 500"):
        load_project_items(
            pid,
            CLASSES,
            tmp_path / "dl",
            source=source_for(standin),
            retry_delays_s=FAST,
            sleep=lambda s: None,
        )
    assert standin.count("GET", f"/api/projects/{pid}/export") == 3


def test_a_refused_api_key_fails_at_once(standin, tmp_path):
    pid = standin.add_project(CONFIG)
    slept: list[float] = []
    with pytest.raises(DatasetError, match="refused.*401.*LABEL_STUDIO_API_KEY"):
        load_project_items(
            pid,
            CLASSES,
            tmp_path / "dl",
            source=source_for(standin, api_key="wrong"),
            sleep=slept.append,
        )
    assert slept == []


def test_personal_access_token_gets_a_bearer_access_token(tmp_path):
    with StandInLabelStudio(pat=make_pat()) as server:
        pid = server.add_project(CONFIG)
        server.add_task(
            pid,
            {"image": upload(server, pid, "x.png", png_bytes(5))},
            [annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z")],
        )
        items = load_project_items(
            pid, CLASSES, tmp_path / "dl", source=LabelStudioSource(server.url, server.pat)
        )
        assert len(items) == 1
        image_requests = [r for r in server.requests if r.path.startswith("/data/")]
        assert image_requests
        for r in image_requests:
            scheme, _, token = r.headers["Authorization"].partition(" ")
            assert scheme == "Bearer" and token in server.access_tokens
        assert server.count("POST", "/api/token/refresh/") >= 1
        client = LabelStudio(server.url, server.pat)
        assert client.auth_headers()["Authorization"].startswith("Bearer ")
    legacy = LabelStudio("http://127.0.0.1:9", "f" * 40)
    assert legacy.auth_headers() == {"Authorization": "Token " + "f" * 40}


def test_second_snapshot_keeps_files_of_the_same_size(standin, tmp_path):
    pid = standin.add_project(CONFIG)
    path = upload(standin, pid, "x.png", png_bytes(40))
    standin.add_task(pid, {"image": path}, [annotation(1, "proGAV 2.0", "2026-11-25T10:00:00Z")])
    out = tmp_path / "dl"
    first = load_project_items(pid, CLASSES, out, source=source_for(standin))
    stamp = os.stat(first[0].path).st_mtime_ns
    os.utime(first[0].path, ns=(stamp - 10**9, stamp - 10**9))
    second = load_project_items(pid, CLASSES, out, source=source_for(standin))
    assert second[0].path == first[0].path
    assert os.stat(second[0].path).st_mtime_ns == stamp - 10**9  # not rewritten

    standin.uploads[path] = png_bytes(40, size=16)  # the file changed (another size)
    third = load_project_items(pid, CLASSES, out, source=source_for(standin))
    assert Path(third[0].path).read_bytes() == standin.uploads[path]


def test_load_items_dispatches_on_the_data_source(standin, tmp_path, monkeypatch):
    monkeypatch.setattr(labelstudio_source, "_configured", labelstudio_source.configured_source())
    pid = standin.add_project(CONFIG)
    tid = standin.add_task(
        pid,
        {"image": upload(standin, pid, "x.png", png_bytes(8)), "patient": "pt-5"},
        [annotation(1, "Sophysa Sophy SM8", "2026-11-25T10:00:00Z")],
    )
    configure(standin.url, standin.api_key)
    items = load_items(f"labelstudio:{pid}", CLASSES, tmp_path / "dl")
    assert [(i.key, i.label, i.group) for i in items] == [(str(tid), "Sophysa Sophy SM8", "pt-5")]

    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "a.png").write_bytes(png_bytes(1))
    (tmp_path / "set" / "manifest.csv").write_text("file,label,patient_id\na.png,proGAV 2.0,p1\n")
    from_manifest = load_items(tmp_path / "set", CLASSES, tmp_path / "unused")
    assert [(i.key, i.label) for i in from_manifest] == [("a.png", "proGAV 2.0")]
    assert not (tmp_path / "unused").exists()


def test_not_configured_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(labelstudio_source, "_configured", None)
    with pytest.raises(DatasetError, match="configure"):
        load_project_items(1, CLASSES, tmp_path)


@pytest.mark.parametrize("bad", ["labelstudio:", "labelstudio:x", "labelstudio:0", "data/set"])
def test_parse_project_source_refuses_malformed_sources(bad):
    with pytest.raises(DatasetError):
        parse_project_source(bad)
    assert parse_project_source("labelstudio:12") == 12


def test_source_repr_hides_the_key():
    assert "secret-key" not in repr(LabelStudioSource("http://ls", "secret-key"))


# ------------------------------------------------------------------------------ valve centres


def keypoint(
    x: float,
    y: float,
    *,
    width: int = 800,
    height: int = 600,
    name: str = "valve_centre",
    label: str = "Valve",
    **extra: object,
) -> dict:
    """A keypoint result as Label Studio 1.23 stores it (percent of the image)."""
    return {
        "id": "kp1",
        "from_name": name,
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 1.0, "keypointlabels": [label]},
        **extra,
    }


def with_keypoints(base: dict, *points: dict) -> dict:
    return dict(base, result=[*base["result"], *points])


def test_keypoint_percent_becomes_pixels_of_the_image():
    marked = with_keypoints(annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z"), keypoint(25, 50))
    assert keypoint_centre(marked) == (200.0, 300.0)
    assert keypoint_centre(marked, "valve_centre", "Valve") == (200.0, 300.0)
    assert keypoint_centre(marked, "other_points") is None  # another tag's keypoint
    assert keypoint_centre(marked, "valve_centre", "Reservoir") is None  # another label
    unmarked = annotation(2, "Codman Hakim", "2026-11-25T10:00:00Z")
    assert keypoint_centre(unmarked) is None


@pytest.mark.parametrize(
    "bad",
    [
        keypoint(10, 10, image_rotation=90),  # made on a rotated view: ambiguous
        keypoint(10, 10, original_width=None),
        keypoint(10, 10, original_height=0),
        dict(keypoint(10, 10), value={"x": "10", "y": 10, "keypointlabels": ["Valve"]}),
        dict(keypoint(10, 10), value={"y": 10, "keypointlabels": ["Valve"]}),
        dict(keypoint(10, 10), value=None),
    ],
)
def test_unusable_keypoints_give_no_centre(bad):
    assert keypoint_centre(with_keypoints(annotation(1, "Codman Hakim", "t"), bad)) is None


def test_two_valve_keypoints_in_one_annotation_give_no_centre():
    both = with_keypoints(annotation(1, "Codman Hakim", "t"), keypoint(10, 10), keypoint(90, 90))
    assert keypoint_centre(both) is None
    full_turn = keypoint(10, 10, image_rotation=360)
    assert keypoint_centre(with_keypoints(annotation(1, "a", "t"), full_turn)) == (80.0, 60.0)


def test_class_and_centre_come_from_the_same_annotation():
    older = with_keypoints(annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z"), keypoint(10, 20))
    newer = annotation(2, "proGAV 2.0", "2026-11-26T10:00:00Z")  # corrected, no keypoint
    found = latest_annotation([older, newer], "valve", "valve_centre", "Valve")
    assert (found.annotation_id, found.label, found.valve_xy) == (2, "proGAV 2.0", None)
    # A later keypoint-only annotation (no class) does not count, nor its keypoint.
    only_point = with_keypoints(annotation(3, None, "2026-11-27T10:00:00Z"), keypoint(50, 50))
    found = latest_annotation([older, only_point], "valve", "valve_centre")
    assert (found.annotation_id, found.label, found.valve_xy) == (1, "Codman Hakim", (80.0, 120.0))
    # A cancelled one neither.
    skipped = with_keypoints(
        annotation(4, "proGAV 2.0", "2026-11-28T10:00:00Z", cancelled=True), keypoint(50, 50)
    )
    assert latest_annotation([older, skipped]).valve_xy == (80.0, 120.0)
    # The older helpers read the same annotation.
    assert latest_choice([older, newer]) == "proGAV 2.0"
    assert latest_annotation_choice([older, newer]) == (2, "proGAV 2.0")
    assert latest_annotation([]) is None


def test_snapshot_items_carry_the_valve_centre_when_marked(standin, tmp_path, monkeypatch):
    monkeypatch.setattr(labelstudio_source, "_configured", labelstudio_source.configured_source())
    pid = standin.add_project(CONFIG)
    marked = standin.add_task(
        pid,
        {"image": upload(standin, pid, "m.png", png_bytes(90, size=10)), "patient": "pt-1"},
        [
            with_keypoints(
                annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z"),
                keypoint(35, 45, width=10, height=10),
            )
        ],
    )
    unmarked = standin.add_task(
        pid,
        {"image": upload(standin, pid, "u.png", png_bytes(30)), "patient": "pt-2"},
        [annotation(2, "proGAV 2.0", "2026-11-25T10:00:00Z")],
    )
    items = load_project_items(
        pid,
        CLASSES,
        tmp_path / "dl",
        choices_name="valve",
        keypoint_name="valve_centre",
        keypoint_label="Valve",
        source=source_for(standin),
    )
    by_key = {item.key: item for item in items}
    assert by_key[str(marked)].valve_xy == pytest.approx((3.5, 4.5))
    assert by_key[str(unmarked)].valve_xy is None
    # load_items passes the keypoint tag through; without names any keypoint result counts.
    configure(standin.url, standin.api_key)
    other = load_items(f"labelstudio:{pid}", CLASSES, tmp_path / "dl2", keypoint_name="other")
    assert all(item.valve_xy is None for item in other)
    default = load_items(f"labelstudio:{pid}", CLASSES, tmp_path / "dl3")
    assert {i.key: i.valve_xy for i in default}[str(marked)] == pytest.approx((3.5, 4.5))


# ------------------------------------------------------------------------------ pressure settings

HAKIM_SCALE = SettingScale(
    "Codman Hakim", "setting_hakim", tuple(str(v) for v in range(30, 210, 10))
)
PROGAV_SCALE = SettingScale("proGAV 2.0", "setting_progav", tuple(str(v) for v in range(21)))
SCALES = (HAKIM_SCALE, PROGAV_SCALE)


def with_setting(base: dict, value: object, name: str = "setting_hakim") -> dict:
    """``base`` plus a setting result, as Label Studio stores a ``<Choices>`` answer."""
    result = {
        "from_name": name,
        "to_name": "image",
        "type": "choices",
        "value": {"choices": [value]},
    }
    return dict(base, result=[*base["result"], result])


def test_setting_comes_from_the_same_annotation_on_its_models_scale():
    older = with_setting(annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z"), "120")
    found = latest_annotation([older], "valve", settings=SCALES)
    assert (found.label, found.setting) == ("Codman Hakim", "120")
    assert latest_annotation([older], "valve").setting is None  # no scales given
    # The corrected class has no setting: the older annotation's is not borrowed.
    newer = annotation(2, "proGAV 2.0", "2026-11-26T10:00:00Z")
    found = latest_annotation([older, newer], "valve", settings=SCALES)
    assert (found.label, found.setting) == ("proGAV 2.0", None)
    # A setting answered in another model's tag (left from before the class changed) is not it.
    stale = with_setting(annotation(3, "proGAV 2.0", "2026-11-27T10:00:00Z"), "120")
    assert latest_annotation([stale], "valve", settings=SCALES).setting is None
    progav = with_setting(annotation(4, "proGAV 2.0", "t"), "0", name="setting_progav")
    assert latest_annotation([progav], "valve", settings=SCALES).setting == "0"
    # A model without a scale has no setting.
    certas = with_setting(annotation(5, "Codman Certas Plus", "t"), "3", name="setting_certas")
    assert latest_annotation([certas], "valve", settings=SCALES).setting is None


def test_a_setting_off_the_scale_is_dropped_with_a_warning_naming_the_task(caplog):
    off = with_setting(annotation(1, "Codman Hakim", "t"), "205")
    with caplog.at_level("WARNING", logger=labelstudio_source.__name__):
        found = latest_annotation([off], "valve", settings=SCALES, task_id=77)
    assert (found.label, found.setting) == ("Codman Hakim", None)  # the type still trains
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "task 77" in warnings[0] and "'205'" in warnings[0]


def test_snapshot_items_carry_the_setting_when_chosen(standin, tmp_path, caplog):
    pid = standin.add_project(CONFIG)
    answered = standin.add_task(
        pid,
        {"image": upload(standin, pid, "s.png", png_bytes(90)), "patient": "pt-1"},
        [with_setting(annotation(1, "Codman Hakim", "2026-11-25T10:00:00Z"), "70")],
    )
    typo = standin.add_task(
        pid,
        {"image": upload(standin, pid, "t.png", png_bytes(60)), "patient": "pt-2"},
        [with_setting(annotation(2, "Codman Hakim", "2026-11-25T10:00:00Z"), "75")],
    )
    unanswered = standin.add_task(
        pid,
        {"image": upload(standin, pid, "u.png", png_bytes(30)), "patient": "pt-3"},
        [annotation(3, "proGAV 2.0", "2026-11-25T10:00:00Z")],
    )
    with caplog.at_level("WARNING", logger=labelstudio_source.__name__):
        items = load_project_items(
            pid,
            CLASSES,
            tmp_path / "dl",
            choices_name="valve",
            settings=SCALES,
            source=source_for(standin),
        )
    by_key = {item.key: item for item in items}
    assert by_key[str(answered)].setting == "70"
    assert (by_key[str(typo)].label, by_key[str(typo)].setting) == ("Codman Hakim", None)
    assert by_key[str(unanswered)].setting is None
    assert any(f"task {typo}" in r.getMessage() for r in caplog.records)
