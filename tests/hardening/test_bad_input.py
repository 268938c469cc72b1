"""Bad input through the real server: a clear error for that item, the rest served, the
server alive, memory bounded.

Every request goes to ``valve-id serve`` in a subprocess (see ``conftest.py``) over a real
socket, and every image through the real fetcher and decoder. The decoders' own error
messages are unit-tested in ``tests/training/test_dicom.py`` and the fetcher's rules in
``tests/training/test_labelstudio_images.py``; here they must hold end to end, for a whole
batch at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from labelstudio_standin import StandInLabelStudio

from .hardening_support import (
    CLASSES,
    LABEL_CONFIG_XML,
    LS_API_KEY,
    PROJECT,
    VERSION,
    CountingHost,
    RunningServer,
    local_url,
    predict_body,
)

MEMORY_BOUND_BYTES = 300 * 2**20
"""How much the server's resident memory may grow over a batch (bytes)."""
BIG_BODY_BYTES = 50 * 2**20
LONG_NAME = "inputs/" + "x" * 300 + ".png"


def _tasks(first_id: int, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"id": first_id + i, "data": d} for i, d in enumerate(data)]


def _served(result: dict[str, Any]) -> bool:
    """A pre-annotation of the served version, in the recorded shape: the class, and where
    the version found the valve when its Grad-CAM map has a peak (a random network's map may
    be flat or not, depending on the CPU's arithmetic)."""
    if not result.get("result"):
        return False
    region, *located = result["result"]
    assert region["from_name"] == "valve" and region["to_name"] == "image"
    assert region["value"]["choices"][0] in CLASSES
    assert len(located) <= 1
    for point in located:
        assert point["type"] == "keypointlabels" and point["to_name"] == "image"
        assert 0.0 <= point["value"]["x"] <= 100.0 and 0.0 <= point["value"]["y"] <= 100.0
    assert 0.0 <= result["score"] <= 1.0
    assert result["model_version"] == VERSION
    return True


def _reasons(server: RunningServer, task_id: int) -> list[str]:
    marker = f"task {task_id}: no prediction ("
    return [line for line in server.log_text().splitlines() if marker in line]


@contextmanager
def _peak_rss(server: RunningServer) -> Iterator[list[int]]:
    """Samples the server's RSS every 20 ms while the block runs; yields [baseline, peak]."""
    seen = [server.rss(), server.rss()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            seen[1] = max(seen[1], server.rss())
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()
        seen[1] = max(seen[1], server.rss())


def test_every_kind_of_bad_image_fails_alone_and_the_rest_is_served(
    server: RunningServer,
    image_root: Path,
    standin: StandInLabelStudio,
    foreign_host: CountingHost,
) -> None:
    outside = image_root.parent / "outside" / "private.png"
    cases: list[tuple[str, dict[str, Any], str | None]] = [
        # name, task data, None if it must be served, else a fragment of its logged reason
        ("good PNG", {"image": local_url("inputs/good.png")}, None),
        ("zero-byte PNG", {"image": local_url("inputs/zero.png")}, "is empty (0 bytes)"),
        ("zero-byte JPEG", {"image": local_url("inputs/zero.jpg")}, "is empty (0 bytes)"),
        ("zero-byte DICOM", {"image": local_url("inputs/zero.dcm")}, "is empty (0 bytes)"),
        ("truncated PNG", {"image": local_url("inputs/truncated.png")}, "PNG data could not"),
        ("truncated JPEG", {"image": local_url("inputs/truncated.jpg")}, "JPEG data could not"),
        ("truncated DICOM", {"image": local_url("inputs/truncated.dcm")}, "no Pixel Data"),
        ("HTML page as a file", {"image": local_url("inputs/error-page.png")}, "neither a DICOM"),
        ("HTML page from Label Studio", {"image": "/data/upload/1/error-page.png"}, "neither"),
        ("PNG claiming 40000x40000", {"image": local_url("inputs/bomb.png")}, "decompression"),
        ("16-bit PNG", {"image": local_url("inputs/16-bit.png")}, None),
        ("RGBA PNG", {"image": local_url("inputs/rgba.png")}, None),
        ("CMYK JPEG", {"image": local_url("inputs/cmyk.jpg")}, None),
        ("DICOM without PixelData", {"image": local_url("inputs/no-pixels.dcm")}, "no Pixel"),
        ("multi-frame DICOM", {"image": local_url("inputs/multi-frame.dcm")}, None),
        ("unsupported transfer syntax", {"image": local_url("inputs/unsupported-syntax.dcm")},
         "transfer syntax 1.2.826.0.1.3680043.99999.1"),
        ("no image key", {"picture": local_url("inputs/good.png")}, "no image URL in data.image"),
        ("image key not a string", {"image": {"url": local_url("inputs/good.png")}}, "no image"),
        ("foreign host", {"image": f"{foreign_host.url}/skull.png"}, "neither Label Studio"),
        ("cloud metadata", {"image": "http://169.254.169.254/latest/meta-data/"}, "neither"),
        ("file URL", {"image": "file:///etc/passwd"}, "file: URLs are refused"),
        ("credentials in URL", {"image": f"http://127.0.0.1@{foreign_host.url[7:]}/x.png"},
         "with credentials"),
        ("local path with ..", {"image": local_url("inputs/../../outside/private.png")},
         "must not contain '..'"),
        ("absolute local path", {"image": local_url(str(outside))}, "must be relative"),
        ("over-long local name", {"image": local_url(LONG_NAME)}, "(File name too long)"),
        ("missing upload", {"image": "/data/upload/1/missing.png"}, "HTTP 404"),
        ("good upload over HTTP", {"image": "/data/upload/1/good.png"}, None),
        ("good DICOM", {"image": local_url("inputs/good.dcm")}, None),
    ]  # fmt: skip
    tasks = _tasks(7001, [data for _, data, _ in cases])
    contacted_before = foreign_host.requests
    with server.client() as client:
        response = client.post("/predict", json=predict_body(tasks))
        health = client.get("/health")
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(cases)  # one answer per task, in order

    for (name, _, reason), task, result in zip(cases, tasks, results, strict=True):
        if reason is None:
            assert _served(result), name
            continue
        assert result == {"result": []}, name
        logged = _reasons(server, task["id"])
        assert logged, f"{name}: no reason logged for task {task['id']}"
        assert any(reason in line for line in logged), (name, logged)
    assert foreign_host.requests == contacted_before  # refused before any connection
    assert LONG_NAME not in server.log_text()  # reasons never show a path
    upload = [r for r in standin.requests if r.path == "/data/upload/1/good.png"]
    assert upload and upload[-1].headers["Authorization"] == f"Token {LS_API_KEY}"
    assert health.status_code == 200 and health.json()["model_version"] == VERSION
    assert server.alive()


def test_a_thousand_tasks_with_bad_ones_among_them_in_bounded_memory(
    server: RunningServer,
) -> None:
    bad = {
        50: local_url("inputs/bomb.png"),
        150: local_url("inputs/truncated.dcm"),
        250: local_url("inputs/error-page.png"),
        350: "http://169.254.169.254/x.png",
        450: local_url("inputs/../../outside/private.png"),
        550: local_url("inputs/zero.png"),
    }
    tasks = _tasks(
        20_000, [{"image": bad.get(i, local_url(f"batch/{i:04d}.png"))} for i in range(1000)]
    )
    with server.client() as client:
        warm = client.post("/predict", json=predict_body(tasks[:16]))  # torch's first batch
        assert warm.status_code == 200
        with _peak_rss(server) as rss:
            started = time.perf_counter()
            first = client.post("/predict", json=predict_body(tasks))
            elapsed = time.perf_counter() - started
            again = client.post("/predict", json=predict_body(tasks))  # cached this time
        assert client.get("/health").status_code == 200
    baseline, peak = rss

    assert first.status_code == 200 and again.status_code == 200
    assert again.json() == first.json()
    results = first.json()["results"]
    assert len(results) == 1000
    for i, result in enumerate(results):
        assert (result == {"result": []}) if i in bad else _served(result), i
    assert peak - baseline < MEMORY_BOUND_BYTES, (
        f"RSS grew by {(peak - baseline) / 2**20:.0f} MB over 2 x 1000 tasks"
    )
    assert server.alive()
    print(f"1000 tasks in {elapsed:.1f} s; RSS {baseline / 2**20:.0f} -> {peak / 2**20:.0f} MB")


def test_huge_malformed_and_mistyped_bodies_are_refused_and_the_server_lives_on(
    server: RunningServer,
) -> None:
    good = predict_body(_tasks(30_001, [{"image": local_url("inputs/good.png")}]))
    big = b'{"tasks": [' + b" " * BIG_BODY_BYTES + b"]}"

    def streamed() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    json_headers = {"content-type": "application/json"}
    with server.client() as client, _peak_rss(server) as rss:
        declared = client.post("/predict", content=big, headers=json_headers)
        chunked = client.post("/webhook", content=streamed(), headers=json_headers)
        broken = client.post("/predict", content=b'{"tasks": [', headers=json_headers)
        not_utf8 = client.post("/setup", content=b"\xff\xfe\x00{", headers=json_headers)
        mistyped = client.post("/predict", json={"tasks": [{"id": "seven", "data": []}]})
        wrong_shape = client.post("/webhook", json=["ANNOTATION_CREATED"])
        still_fine = client.post("/predict", json=good)
    baseline, peak = rss

    assert declared.status_code == 413 and "larger than" in declared.json()["error"]
    assert chunked.status_code == 413 and "larger than" in chunked.json()["error"]
    assert broken.status_code == 400 and broken.json()["error"]
    assert not_utf8.status_code == 400 and not_utf8.json()["error"]
    assert mistyped.status_code == 422
    assert "tasks.0.id" in mistyped.json()["error"] and "seven" not in mistyped.text
    assert wrong_shape.status_code == 400
    assert still_fine.status_code == 200 and _served(still_fine.json()["results"][0])
    assert peak - baseline < MEMORY_BOUND_BYTES, f"RSS grew by {(peak - baseline) / 2**20:.0f} MB"
    assert server.alive()


@pytest.mark.parametrize("path", ["/setup", "/predict"])
def test_an_entity_expansion_bomb_in_the_label_config_is_a_quick_400(
    server: RunningServer, path: str
) -> None:
    entities = "".join(
        f'<!ENTITY e{i} "{f"&e{i - 1};" * 10}">' if i else '<!ENTITY e0 "boom">' for i in range(10)
    )
    bomb = f"<?xml version='1.0'?><!DOCTYPE View [{entities}]>" + LABEL_CONFIG_XML.replace(
        'value="Other valve"', 'value="&e9;"'
    )
    body = (
        {"project": PROJECT, "schema": bomb}
        if path == "/setup"
        else {"tasks": [], "project": PROJECT, "label_config": bomb}
    )
    with server.client() as client:
        started = time.perf_counter()
        response = client.post(path, json=body)
        elapsed = time.perf_counter() - started
    assert response.status_code == 400 and "not valid XML" in response.json()["error"]
    assert elapsed < 2.0
    assert server.alive()
