"""A stand-in Label Studio for unit tests: a tiny threaded HTTP server on 127.0.0.1.

A real Label Studio (about 1 GB installed, 30 s to start) cannot run in unit tests; the
end-to-end suite against one comes with issue 5. This server answers the few routes valve-id
calls through label-studio-sdk, in the shapes Label Studio 1.23.2 uses (docs/PROTOCOL.md):

* ``POST /api/token/refresh/`` (Personal Access Token → access token),
* ``GET/POST /api/projects/``, ``GET /api/projects/{id}/``, ``POST /api/projects/{id}/import``,
  ``GET /api/projects/{id}/export`` (annotated tasks, JSON),
* ``GET /api/tasks/?project=`` (paginated; 404 past the last page, as Label Studio does;
  each task with its ``total_annotations``, the non-cancelled ones),
* ``POST /api/tasks/{id}/annotations/`` (a new annotation with ``result``; what the stack's
  bootstrap seeds with),
* ``GET/POST /api/storages/localfiles/`` (the path must be a strict subfolder of the root),
* ``GET /data/upload/...`` and ``GET /data/local-files/?d=...`` (image bytes).

Every request must carry ``Authorization: Token <legacy key>`` or ``Bearer <access token>``
(except the token refresh); every request is recorded in :attr:`StandInLabelStudio.requests`,
and :meth:`StandInLabelStudio.fail_next` makes the next requests answer an error status.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import jwt

__all__ = ["Recorded", "StandInLabelStudio", "make_pat"]

_JWT_SECRET = "stand-in-secret-of-at-least-32-bytes!"
_PAGE_SIZE = 100


def make_pat(lifetime_s: float = 3600.0) -> str:
    """A Personal Access Token as Label Studio issues it: a JWT refresh token."""
    exp = int(time.time() + lifetime_s)
    return jwt.encode({"token_type": "refresh", "exp": exp}, _JWT_SECRET, algorithm="HS256")


def _access_token() -> str:
    exp = int(time.time() + 300)
    payload = {"token_type": "access", "exp": exp, "n": time.time_ns()}
    return jwt.encode(payload, _JWT_SECRET, algorithm="HS256")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Recorded:
    """One request the stand-in received."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class StandInLabelStudio:
    """Label Studio's state for a test: projects, tasks, storages, uploaded files."""

    api_key: str = "0123456789abcdef0123456789abcdef01234567"
    """The legacy token accepted as ``Authorization: Token <key>``."""
    pat: str | None = None
    """A Personal Access Token accepted at ``/api/token/refresh/``."""
    local_files_root: Path | None = None
    """``LOCAL_FILES_DOCUMENT_ROOT`` of this Label Studio."""
    projects: dict[int, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)
    storages: list[dict[str, Any]] = field(default_factory=list)
    uploads: dict[str, bytes] = field(default_factory=dict)
    """``/data/upload/...`` path → file bytes."""
    requests: list[Recorded] = field(default_factory=list)
    access_tokens: set[str] = field(default_factory=set)
    _failures: list[tuple[str, int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    # ---------------------------------------------------------------- test-side helpers

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the stand-in first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> StandInLabelStudio:
        standin = self

        class Handler(_Handler):
            state = standin

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> StandInLabelStudio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_project(self, label_config: str, title: str = "project") -> int:
        with self._lock:
            pid = max(self.projects, default=0) + 1
            self.projects[pid] = {
                "id": pid,
                "title": title,
                "label_config": label_config,
                "created_at": _now(),
            }
        return pid

    def add_task(
        self, project: int, data: dict[str, Any], annotations: list[dict[str, Any]] = ()
    ) -> int:
        with self._lock:
            tid = max(self.tasks, default=0) + 1
            self.tasks[tid] = {
                "id": tid,
                "project": project,
                "data": data,
                "annotations": [dict(a, task=tid, project=project) for a in annotations],
                "predictions": [],
                "meta": {},
                "created_at": _now(),
                "updated_at": _now(),
            }
        return tid

    def fail_next(self, count: int, status: int = 503, path_prefix: str = "/") -> None:
        """Answer the next ``count`` requests under ``path_prefix`` with ``status``."""
        with self._lock:
            self._failures.extend([(path_prefix, status)] * count)

    def project_tasks(self, project: int) -> list[dict[str, Any]]:
        return [t for t in self.tasks.values() if t["project"] == project]

    def count(self, method: str, path_prefix: str) -> int:
        return sum(
            1 for r in self.requests if r.method == method and r.path.startswith(path_prefix)
        )

    # ---------------------------------------------------------------- server side

    def _take_failure(self, path: str) -> int | None:
        with self._lock:
            for i, (prefix, status) in enumerate(self._failures):
                if path.startswith(prefix):
                    del self._failures[i]
                    return status
        return None

    def _authorised(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme == "Token":
            return token == self.api_key
        if scheme == "Bearer":
            return token in self.access_tokens
        return False


class _Handler(BaseHTTPRequestHandler):
    state: StandInLabelStudio
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Quiet: the test output is not the place for an access log."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def _reply(self, status: int, body: Any = None, raw: bytes | None = None) -> None:
        payload = raw if raw is not None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else "image/png")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _handle(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        state = self.state
        with state._lock:
            state.requests.append(
                Recorded(method, parts.path, query, dict(self.headers.items()), body)
            )
        failure = state._take_failure(parts.path)
        if failure is not None:
            self._reply(failure, {"detail": "stand-in failure"})
            return
        if parts.path == "/api/token/refresh/" and method == "POST":
            if state.pat is None or (body or {}).get("refresh") != state.pat:
                self._reply(401, {"detail": "Token is invalid"})
                return
            token = _access_token()
            state.access_tokens.add(token)
            self._reply(200, {"access": token})
            return
        if not state._authorised(self.headers.get("Authorization", "")):
            self._reply(401, {"detail": "Authentication credentials were not provided."})
            return
        status, answer = self._route(method, parts.path, query, body)
        if isinstance(answer, bytes):
            self._reply(status, raw=answer)
        else:
            self._reply(status, answer)

    def _route(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        state = self.state
        segments = [s for s in path.split("/") if s]
        if path.startswith("/data/upload/"):
            data = state.uploads.get(path)
            return (200, data) if data is not None else (404, {"detail": "Not found"})
        if path.rstrip("/") == "/data/local-files":
            return self._local_file(query)
        if segments[:2] == ["api", "projects"]:
            return self._projects(method, segments[2:], query, body)
        if segments[:2] == ["api", "tasks"] and method == "GET":
            return self._tasks(query)
        if (
            segments[:2] == ["api", "tasks"]
            and segments[3:] == ["annotations"]
            and segments[2].isdigit()
            and method == "POST"
        ):
            return self._annotate(int(segments[2]), body)
        if segments[:3] == ["api", "storages", "localfiles"]:
            return self._storages(method, query, body)
        return 404, {"detail": f"stand-in has no route {method} {path}"}

    def _local_file(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        state = self.state
        root = state.local_files_root
        rel = unquote((query.get("d") or [""])[0])
        if root is None or not rel:
            return 404, {"detail": "local files are not served"}
        target = (root / rel).resolve()
        covered = any(target.is_relative_to(Path(s["path"]).resolve()) for s in state.storages)
        if not covered or not target.is_file():
            return 404, {"detail": "Not found"}
        return 200, target.read_bytes()

    def _projects(
        self, method: str, rest: list[str], query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        state = self.state
        if not rest and method == "POST":
            pid = state.add_project(body.get("label_config", ""), body.get("title", ""))
            return 201, state.projects[pid]
        if not rest or not rest[0].isdigit():
            return 404, {"detail": "Not found"}
        pid = int(rest[0])
        if pid not in state.projects:
            return 404, {"detail": "Not found"}
        action = rest[1] if len(rest) > 1 else ""
        if action == "" and method == "GET":
            return 200, state.projects[pid]
        if action == "export" and method == "GET":
            everything = (query.get("download_all_tasks") or ["false"])[0] == "true"
            tasks = [t for t in state.project_tasks(pid) if everything or t["annotations"]]
            return 200, tasks
        if action == "import" and method == "POST":
            for item in body:
                state.add_task(pid, item["data"])
            return 201, {
                "task_count": len(body),
                "annotation_count": 0,
                "predictions_count": 0,
                "duration": 0.01,
                "file_upload_ids": [],
                "could_be_tasks_list": False,
                "found_formats": [],
                "data_columns": [],
            }
        return 404, {"detail": "Not found"}

    def _tasks(self, query: dict[str, list[str]]) -> tuple[int, Any]:
        state = self.state
        pid = int((query.get("project") or ["0"])[0])
        page = int((query.get("page") or ["1"])[0])
        size = int((query.get("page_size") or [str(_PAGE_SIZE)])[0])
        tasks = state.project_tasks(pid)
        chunk = tasks[(page - 1) * size : page * size]
        if page > 1 and not chunk:
            return 404, {"detail": "Invalid page."}
        fields = (query.get("fields") or ["task_only"])[0]
        chunk = [
            dict(t, total_annotations=sum(not a.get("was_cancelled") for a in t["annotations"]))
            for t in chunk
        ]
        if fields != "all":
            chunk = [
                {k: v for k, v in t.items() if k not in ("annotations", "predictions")}
                for t in chunk
            ]
        return 200, {
            "tasks": chunk,
            "total": len(tasks),
            "total_annotations": 0,
            "total_predictions": 0,
        }

    def _annotate(self, task_id: int, body: Any) -> tuple[int, Any]:
        state = self.state
        task = state.tasks.get(task_id)
        if task is None:
            return 404, {"detail": "Not found"}
        if not isinstance(body, dict) or not isinstance(body.get("result"), list):
            return 400, {"detail": "result must be a list"}
        with state._lock:
            ids = [a.get("id") or 0 for t in state.tasks.values() for a in t["annotations"]]
            annotation = {
                "id": max(ids, default=0) + 1,
                "result": body["result"],
                "was_cancelled": bool(body.get("was_cancelled", False)),
                "ground_truth": False,
                "created_at": _now(),
                "updated_at": _now(),
                "task": task_id,
                "project": task["project"],
            }
            task["annotations"].append(annotation)
        return 201, annotation

    def _storages(self, method: str, query: dict[str, list[str]], body: Any) -> tuple[int, Any]:
        state = self.state
        if method == "GET":
            pid = int((query.get("project") or ["0"])[0])
            return 200, [s for s in state.storages if s["project"] == pid]
        root = state.local_files_root
        path = Path(body.get("path", "")).resolve()
        if root is None or path == root.resolve() or not path.is_relative_to(root.resolve()):
            return 400, {"detail": "path must be a subfolder of LOCAL_FILES_DOCUMENT_ROOT"}
        storage = dict(body, id=len(state.storages) + 1, type="localfiles")
        state.storages.append(storage)
        return 201, storage
