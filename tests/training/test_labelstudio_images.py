"""Fetching task images (training/labelstudio/images.py): Label Studio host, allow-list and
local files only, for the backend and training alike.

Label Studio does not run in unit tests: an ``httpx.MockTransport`` stands in for its HTTP
server (and for other hosts), answering the few routes used and recording every request, so
a test can prove that a refused URL never reached any server. The end-to-end suite against
a real Label Studio passes a real client through the same ``http`` seam.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from training.labelstudio import ImageFetcher, Retry
from training.shared.errors import ImageFetchError, ValveIdError

LS_URL = "http://ls.test:8080"
TOKEN = "Token 0123456789abcdef0123456789abcdef01234567"
PNG = b"\x89PNG\r\n\x1a\n" + b"pixels" * 10


class FakeServer:
    """A stand-in for Label Studio (and any other host): routes by ``host:port`` + path."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.routes: dict[str, Callable[[httpx.Request], httpx.Response]] = {}

    def route(self, url: str, response: httpx.Response | Callable) -> None:
        self.routes[url] = response if callable(response) else (lambda _req: response)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        key = f"{request.url.scheme}://{request.url.netloc.decode()}{request.url.path}"
        handler = self.routes.get(key)
        return handler(request) if handler else httpx.Response(404)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


def _fetcher(server: FakeServer, max_bytes: int = 1024, **options: Any) -> ImageFetcher:
    client = httpx.Client(transport=httpx.MockTransport(server))
    return ImageFetcher(
        LS_URL,
        http=client,
        auth_headers=lambda: {"Authorization": TOKEN},
        max_bytes=max_bytes,
        **options,
    )


def test_image_fetch_error_is_a_valve_id_error() -> None:
    assert issubclass(ImageFetchError, ValveIdError)


def test_a_relative_url_is_fetched_from_label_studio_with_its_auth_header(
    server: FakeServer,
) -> None:
    server.route(f"{LS_URL}/data/upload/1/valve.png", httpx.Response(200, content=PNG))
    assert _fetcher(server).fetch("/data/upload/1/valve.png") == PNG
    (request,) = server.requests
    assert request.headers["authorization"] == TOKEN
    assert str(request.url) == f"{LS_URL}/data/upload/1/valve.png"


def test_label_studio_under_a_path_prefix(server: FakeServer) -> None:
    server.route("https://example.org/ls/data/upload/1/a.png", httpx.Response(200, content=PNG))
    client = httpx.Client(transport=httpx.MockTransport(server))
    fetcher = ImageFetcher(
        "https://example.org/ls/", http=client, auth_headers=lambda: {"Authorization": TOKEN}
    )
    assert fetcher.fetch("/data/upload/1/a.png") == PNG
    assert fetcher.fetch("https://example.org/ls/data/upload/1/a.png") == PNG
    assert all(r.headers["authorization"] == TOKEN for r in server.requests)


def test_an_absolute_url_on_label_studio_gets_the_header_too(server: FakeServer) -> None:
    server.route(f"{LS_URL}/data/upload/1/b.png", httpx.Response(200, content=PNG))
    assert _fetcher(server).fetch("http://LS.test:8080/data/upload/1/b.png") == PNG
    assert server.requests[0].headers["authorization"] == TOKEN


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.test/x.png",
        "http://ls.test:9999/data/upload/1/x.png",  # Label Studio's host, another port
        "https://ls.test:8080/data/upload/1/x.png",  # another scheme
        "http://127.0.0.1@evil.test/x.png",  # the classic userinfo trick
        "http://ls.test:8080@evil.test/x.png",
        "http://user:pass@ls.test:8080/data/upload/1/x.png",  # credentials even for LS
        "http://evil.test\\@ls.test:8080/x.png",
        "//evil.test/x.png",
        "file:///etc/passwd",
        "ftp://ls.test/x.png",
        "s3://bucket/x.png",
        "gopher://ls.test:8080/x",
        "data/upload/1/x.png",
        "",
        "   ",
    ],
)
def test_anything_but_label_studio_is_refused_without_contacting_it(
    server: FakeServer, url: str
) -> None:
    with pytest.raises(ImageFetchError):
        _fetcher(server).fetch(url)
    assert server.requests == []


def test_the_refusal_names_the_host_and_the_setting(server: FakeServer) -> None:
    with pytest.raises(ImageFetchError, match=r"evil\.test:80 .*VALVE_ID_ALLOWED_HOSTS.*not"):
        _fetcher(server).fetch("http://evil.test/x.png")


def test_an_allowed_host_is_fetched_without_the_label_studio_key(server: FakeServer) -> None:
    server.route("http://pacs.test:8042/wado/1.png", httpx.Response(200, content=PNG))
    server.route("https://cdn.test/img/2.png", httpx.Response(200, content=PNG))
    fetcher = _fetcher(server, allowed_hosts=("pacs.test:8042", "CDN.test"))
    assert fetcher.fetch("http://pacs.test:8042/wado/1.png") == PNG
    assert fetcher.fetch("https://cdn.test/img/2.png") == PNG
    assert all("authorization" not in r.headers for r in server.requests)
    with pytest.raises(ImageFetchError):  # the port is part of that entry
        fetcher.fetch("http://pacs.test:9000/wado/1.png")
    assert len(server.requests) == 2


def test_redirects_are_checked_hop_by_hop(server: FakeServer) -> None:
    server.route(
        f"{LS_URL}/tasks/1/presign/",
        httpx.Response(302, headers={"Location": "https://bucket.test/a.png?sig=1"}),
    )
    server.route(
        f"{LS_URL}/data/moved",
        httpx.Response(301, headers={"Location": "/data/upload/1/c.png"}),
    )
    server.route(f"{LS_URL}/data/upload/1/c.png", httpx.Response(200, content=PNG))
    server.route("https://bucket.test/a.png", httpx.Response(200, content=PNG))

    fetcher = _fetcher(server)
    assert fetcher.fetch("/data/moved") == PNG  # a relative hop on Label Studio itself
    with pytest.raises(ImageFetchError, match="bucket.test"):
        fetcher.fetch("/tasks/1/presign/?fileuri=abc")
    assert not any(r.url.host == "bucket.test" for r in server.requests)

    server.requests.clear()
    allowed = _fetcher(server, allowed_hosts=("bucket.test",))
    assert allowed.fetch("/tasks/1/presign/?fileuri=abc") == PNG
    to_ls, to_bucket = server.requests
    assert to_ls.headers["authorization"] == TOKEN
    assert "authorization" not in to_bucket.headers  # the key never leaves Label Studio


def test_a_redirect_loop_ends(server: FakeServer) -> None:
    server.route(f"{LS_URL}/data/loop", httpx.Response(302, headers={"Location": "/data/loop"}))
    with pytest.raises(ImageFetchError, match="redirects"):
        _fetcher(server).fetch("/data/loop")
    assert len(server.requests) == 4


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (401, "Label Studio refused the image (HTTP 401): check LABEL_STUDIO_API_KEY"),
        (403, "Label Studio refused the image (HTTP 403): check LABEL_STUDIO_API_KEY"),
        (404, "Label Studio has no such image (HTTP 404)"),
        (500, "Label Studio answered HTTP 500 instead of the image"),
    ],
)
def test_http_errors_have_clear_messages(server: FakeServer, status: int, expected: str) -> None:
    server.route(f"{LS_URL}/data/upload/1/x.png", httpx.Response(status, text="nope"))
    with pytest.raises(ImageFetchError) as info:
        _fetcher(server).fetch("/data/upload/1/x.png")
    assert str(info.value) == expected


def test_a_missing_local_file_hints_at_the_local_storage(server: FakeServer) -> None:
    with pytest.raises(ImageFetchError, match="Local Storage"):
        _fetcher(server).fetch("/data/local-files/?d=scans/a.png")


def test_size_cap_refuses_early_on_content_length(server: FakeServer) -> None:
    big = b"x" * 2048

    def declared(_req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=big, headers={"Content-Length": str(len(big))})

    server.route(f"{LS_URL}/data/upload/1/big.png", declared)
    with pytest.raises(ImageFetchError, match="larger than"):
        _fetcher(server, max_bytes=1024).fetch("/data/upload/1/big.png")


def test_size_cap_stops_reading_a_stream_without_length(server: FakeServer) -> None:
    produced: list[int] = []

    def chunks():
        for _ in range(1000):
            produced.append(1)
            yield b"y" * 512

    server.route(
        f"{LS_URL}/data/upload/1/endless.png", lambda _req: httpx.Response(200, content=chunks())
    )
    with pytest.raises(ImageFetchError, match="larger than"):
        _fetcher(server, max_bytes=1024).fetch("/data/upload/1/endless.png")
    assert len(produced) < 10  # stopped soon after the cap, not after 500 kB


def test_exactly_max_bytes_is_accepted(server: FakeServer) -> None:
    server.route(f"{LS_URL}/data/upload/1/ok.png", httpx.Response(200, content=b"z" * 1024))
    assert len(_fetcher(server, max_bytes=1024).fetch("/data/upload/1/ok.png")) == 1024


def test_timeouts_and_connection_errors_become_fetch_errors(server: FakeServer) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    server.route(f"{LS_URL}/data/upload/1/slow.png", slow)
    server.route(f"{LS_URL}/data/upload/1/down.png", down)
    fetcher = _fetcher(server)
    with pytest.raises(ImageFetchError, match="in time"):
        fetcher.fetch("/data/upload/1/slow.png")
    with pytest.raises(ImageFetchError, match="ConnectError"):
        fetcher.fetch("/data/upload/1/down.png")


def test_requests_carry_the_timeouts(server: FakeServer) -> None:
    server.route(f"{LS_URL}/data/upload/1/x.png", httpx.Response(200, content=PNG))
    _fetcher(server).fetch("/data/upload/1/x.png")
    timeout = server.requests[0].extensions["timeout"]
    assert timeout["connect"] == 5.0 and timeout["read"] == 30.0


def test_the_key_is_never_logged_or_put_in_messages(
    server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.route(f"{LS_URL}/data/upload/1/x.png", httpx.Response(401))
    with caplog.at_level(logging.DEBUG), pytest.raises(ImageFetchError) as info:
        _fetcher(server).fetch("/data/upload/1/x.png")
    assert TOKEN.split()[1] not in str(info.value)
    assert TOKEN.split()[1] not in caplog.text


# --- local files ----------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    base = tmp_path / "root"
    (base / "scans").mkdir(parents=True)
    (base / "scans" / "a b.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(b"outside the root")
    return base


def test_local_files_are_read_from_disk_under_the_root(server: FakeServer, root: Path) -> None:
    fetcher = _fetcher(server, local_files_root=root)
    assert fetcher.fetch("/data/local-files/?d=scans/a%20b.png") == PNG
    assert fetcher.fetch(f"{LS_URL}/data/local-files/?d=scans%2Fa%20b.png") == PNG
    assert server.requests == []  # no HTTP at all


def test_a_local_file_missing_here_is_asked_of_label_studio(server: FakeServer, root: Path) -> None:
    server.route(f"{LS_URL}/data/local-files/", httpx.Response(200, content=PNG))
    fetcher = _fetcher(server, local_files_root=root)
    assert fetcher.fetch("/data/local-files/?d=scans/elsewhere.png") == PNG
    (request,) = server.requests
    assert request.url.params["d"] == "scans/elsewhere.png"
    assert request.headers["authorization"] == TOKEN


@pytest.mark.parametrize(
    "d",
    [
        "../secret.png",
        "scans/../../secret.png",
        "scans/..%2F..%2Fsecret.png",
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "scans\\..\\..\\secret.png",
        "scans/a.png%00.txt",
        "escape/secret.png",  # a symlink out of the root
    ],
)
def test_local_paths_cannot_escape_the_root(server: FakeServer, root: Path, d: str) -> None:
    os.symlink(root.parent, root / "escape")
    with pytest.raises(ImageFetchError, match="local-files path"):
        _fetcher(server, local_files_root=root).fetch(f"/data/local-files/?d={d}")
    assert server.requests == []


def test_a_symlink_inside_the_root_is_followed(server: FakeServer, root: Path) -> None:
    os.symlink(root / "scans", root / "alias")
    assert _fetcher(server, local_files_root=root).fetch("/data/local-files/?d=alias/a b.png")


def test_a_local_file_over_the_cap_is_refused(server: FakeServer, root: Path) -> None:
    (root / "scans" / "big.dcm").write_bytes(b"d" * 4096)
    with pytest.raises(ImageFetchError, match="larger than"):
        _fetcher(server, local_files_root=root, max_bytes=1024).fetch(
            "/data/local-files/?d=scans/big.dcm"
        )


def test_local_files_url_needs_a_path(server: FakeServer, root: Path) -> None:
    with pytest.raises(ImageFetchError, match=r"\?d="):
        _fetcher(server, local_files_root=root).fetch("/data/local-files/")


# --- retries and saving (a training snapshot) --------------------------------------------


def test_transient_failures_are_retried_when_asked(server: FakeServer) -> None:
    answers = [httpx.Response(503), httpx.Response(200, content=PNG)]
    server.route(f"{LS_URL}/data/upload/1/x.png", lambda _req: answers.pop(0))
    slept: list[float] = []
    fetcher = _fetcher(server, retry=Retry((0.1,), slept.append))
    assert fetcher.fetch("/data/upload/1/x.png") == PNG
    assert slept == [0.1]
    with pytest.raises(ImageFetchError, match="HTTP 404") as info:  # an answer: not retried
        fetcher.fetch("/data/upload/1/missing.png")
    assert not info.value.transient and slept == [0.1]
    server.route(f"{LS_URL}/data/upload/1/down.png", httpx.Response(502))
    with pytest.raises(ImageFetchError, match=r"HTTP 502.*\(2 attempts\)") as info:
        fetcher.fetch("/data/upload/1/down.png")
    assert info.value.transient


def test_save_writes_the_file_whole_and_keeps_one_of_the_same_size(
    server: FakeServer, root: Path, tmp_path: Path
) -> None:
    server.route(f"{LS_URL}/data/upload/1/x.png", httpx.Response(200, content=PNG))
    fetcher = _fetcher(server, local_files_root=root)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "copy.png"
    fetcher.save("/data/upload/1/x.png", target)
    assert target.read_bytes() == PNG
    fetcher.save("/data/upload/1/x.png", target)  # same Content-Length: not rewritten
    fetcher.save("/data/local-files/?d=scans/a%20b.png", out / "local.png")
    assert (out / "local.png").read_bytes() == PNG
    big = _fetcher(server, max_bytes=8)
    with pytest.raises(ImageFetchError, match="larger than"):
        big.save("/data/upload/1/x.png", out / "big.png")
    assert sorted(p.name for p in out.iterdir()) == ["copy.png", "local.png"]  # no temp left
