"""Fetching a task's image: from Label Studio, an allow-listed host or local files only.

A task's image URL is written by whoever imported the task, so it is untrusted: neither the
backend nor a training worker may become a proxy that fetches arbitrary URLs with the Label
Studio API key (server-side request forgery). Both fetch through :class:`ImageFetcher`, under
these rules:

* **Relative URLs** (``/data/upload/...``, ``/data/local-files/?d=...``) are Label Studio's and
  are resolved against its URL (its path prefix included, for Label Studio behind a
  sub-path). Label Studio's auth header goes along.
* **Absolute http(s) URLs** are fetched only when their scheme, host and port are Label
  Studio's (then with its auth header) or the host is allow-listed (``host`` = any port,
  ``host:port`` = that port; then *without* it: the key is for Label Studio alone).
  Everything else (other hosts, ``file:``/``ftp:``/``s3:``, credentials in the URL such as
  ``http://127.0.0.1@evil``) is refused before any connection is made. The URL is parsed
  once, by httpx, and that parsed object is what gets requested, so the check and the
  request cannot read it differently.
* **Local files** (``/data/local-files/?d=<path>`` on Label Studio or an allowed host): with
  the local-files root set and the file present under it, it is read from disk with no HTTP
  at all. As in Label Studio, ``d`` is relative to that root; absolute paths, ``..`` and
  symlinks leading out of the root are refused. A file missing here is asked of Label Studio.
* **Responses**: only HTTP 200 is an image; redirects are followed by hand, at most
  :data:`MAX_REDIRECTS`, each hop checked against the same rules (a cloud-storage link
  redirects to a presigned URL, whose host must then be allowed); bodies are capped at
  ``max_bytes`` while streaming (the caller's choice: a ``/predict`` and a training snapshot
  need different sizes); connect/read timeouts are 5 s / 30 s. Transient failures are
  retried per :class:`~training.labelstudio.retry.Retry` (none by default).

Error messages name hosts and HTTP statuses, never paths (file names may carry patient names)
and never headers (they carry the token).
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

import httpx

from training.labelstudio.retry import NO_RETRY, Retry, is_transient_status
from training.shared.errors import ImageFetchError

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_MAX_BYTES",
    "LOCAL_FILES_PATH",
    "MAX_REDIRECTS",
    "READ_TIMEOUT_S",
    "ImageFetcher",
]

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
"""Seconds to open a connection to the image host."""
READ_TIMEOUT_S = 30.0
"""Seconds to wait for each chunk of the answer (a 50 MB DICOM over a slow link)."""
DEFAULT_MAX_BYTES = 64 * 2**20
"""Largest image accepted unless the caller says otherwise, bytes (64 MiB: far above a skull
radiograph, far below harm)."""
MAX_REDIRECTS = 3
"""Redirect hops followed (each one checked); cloud-storage links need one."""
LOCAL_FILES_PATH = "/data/local-files/"
"""Label Studio's route serving files under ``LOCAL_FILES_DOCUMENT_ROOT`` (``?d=<path>``)."""

_TIMEOUT = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK_BYTES = 1 << 20

T = TypeVar("T")


@dataclass(frozen=True)
class _Target:
    """A URL that passed the host rules, and what it is."""

    url: httpx.URL
    host: str
    """``host:port`` as shown in messages."""
    is_label_studio: bool
    """Label Studio's own origin: gets the auth header."""
    ls_path: str | None
    """The URL path below Label Studio's root (an allowed host's: its path), to recognise the
    local-files route; ``None`` for a Label Studio URL outside its path prefix."""


class ImageFetcher:
    """Fetches image bytes for task URLs under the rules in the module docstring.

    ``label_studio_url`` is Label Studio's base URL, ``allowed_hosts`` the extra image hosts
    (``host`` or ``host:port``), ``local_files_root`` Label Studio's
    ``LOCAL_FILES_DOCUMENT_ROOT`` when it is on this machine. A URL or host entry that cannot
    be used is a ``ValueError`` naming ``LABEL_STUDIO_URL`` / ``VALVE_ID_ALLOWED_HOSTS``.
    ``auth_headers`` returns Label Studio's current auth header (``Token ...`` or ``Bearer
    <access>``) and is called per request, so a refreshed access token is used. ``http`` may
    be injected (tests pass an ``httpx.Client`` over a ``MockTransport``). Thread-safe as far
    as ``httpx.Client`` is (it is).
    """

    def __init__(
        self,
        label_studio_url: str,
        *,
        local_files_root: Path | None = None,
        allowed_hosts: Sequence[str] = (),
        auth_headers: Callable[[], Mapping[str, str]] | None = None,
        http: httpx.Client | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        retry: Retry = NO_RETRY,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self._ls_url = _parse_label_studio_url(label_studio_url)
        self._ls_origin = _origin(self._ls_url)
        self._ls_prefix = self._ls_url.path.rstrip("/")
        self._allowed = tuple(_parse_allowed_host(entry) for entry in allowed_hosts)
        root = local_files_root
        self._root = Path(root).expanduser().resolve() if root is not None else None
        self._owns_http = http is None
        self._http = http or httpx.Client(timeout=_TIMEOUT, follow_redirects=False)
        self._auth_headers = auth_headers
        self.max_bytes = max_bytes
        self._retry = retry

    def close(self) -> None:
        """Close the HTTP client if this fetcher created it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> ImageFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve(self, url: object) -> str:
        """The absolute URL a task's image URL stands for, if the host rules allow it;
        :class:`ImageFetchError` saying why not (nothing is contacted either way)."""
        return str(self._check(url).url)

    def fetch(self, url: str) -> bytes:
        """The bytes behind a task's image URL; :class:`ImageFetchError` saying why not."""
        target = self._check(url)
        path = self._local_path(target)
        if path is not None:
            return _read_capped_file(path, self.max_bytes)
        return self._get(target, lambda response: _read_capped(response, self.max_bytes))

    def save(self, url: str, destination: Path) -> None:
        """Copy the image into ``destination`` (written beside it, then renamed into place).

        A ``destination`` that already has the image's size (the local file's, or the
        answer's ``Content-Length``) is kept as it is: a second snapshot of the same project
        reads nothing twice. :class:`ImageFetchError` saying why not.
        """
        target = self._check(url)
        path = self._local_path(target)
        if path is not None:
            with _open_nofollow(path) as fh:
                if _same_size(destination, os.fstat(fh.fileno()).st_size):
                    return
                _write_capped(destination, iter(lambda: fh.read(_CHUNK_BYTES), b""), self.max_bytes)
            return

        def store(response: httpx.Response) -> None:
            declared = response.headers.get("content-length", "")
            if declared.isdigit():
                if int(declared) > self.max_bytes:
                    raise ImageFetchError(_too_large(self.max_bytes))
                if _same_size(destination, int(declared)):
                    return
            _write_capped(destination, response.iter_bytes(), self.max_bytes)

        self._get(target, store)

    # --- the URL rules ------------------------------------------------------------------

    def _check(self, url: object, *, base: httpx.URL | None = None) -> _Target:
        """Parse ``url`` (relative to ``base``, default Label Studio) and apply the host rules."""
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError("the task has no image URL")
        try:
            parsed = httpx.URL(url.strip())
        except (httpx.InvalidURL, ValueError) as exc:
            raise ImageFetchError(f"the image URL cannot be parsed ({exc})") from None
        if parsed.scheme and parsed.scheme not in _DEFAULT_PORTS:
            raise ImageFetchError(
                f"{parsed.scheme}: URLs are refused; images come from Label Studio over http(s)"
            )
        if not parsed.scheme:
            parsed = self._absolute(parsed, base)
        if parsed.userinfo:
            raise ImageFetchError("image URLs with credentials (user@host) are refused")
        origin = _origin(parsed)
        host = _show(origin)
        if origin == self._ls_origin:
            return _Target(parsed, host, True, self._ls_relative_path(parsed.path))
        if self._is_allowed(origin):
            return _Target(parsed, host, False, parsed.path)
        raise ImageFetchError(
            f"host {host} is neither Label Studio ({_show(self._ls_origin)}) nor listed in "
            "VALVE_ID_ALLOWED_HOSTS; it was not contacted"
        )

    def _absolute(self, parsed: httpx.URL, base: httpx.URL | None) -> httpx.URL:
        if base is not None:  # a redirect's Location, relative to the URL that answered
            return base.join(parsed)
        if parsed.host:  # scheme-relative "//host/path": take Label Studio's scheme
            return parsed.copy_with(scheme=self._ls_url.scheme)
        if not parsed.path.startswith("/"):
            raise ImageFetchError("a relative image URL must start with '/' (like /data/...)")
        return self._ls_url.copy_with(
            path=self._ls_prefix + parsed.path, query=parsed.query or None, fragment=None
        )

    def _ls_relative_path(self, path: str) -> str | None:
        if not self._ls_prefix:
            return path
        if path == self._ls_prefix or path.startswith(self._ls_prefix + "/"):
            return path[len(self._ls_prefix) :] or "/"
        return None

    def _is_allowed(self, origin: tuple[str, str, int]) -> bool:
        _, host, port = origin
        return any(host == h and (p is None or port == p) for h, p in self._allowed)

    # --- local files ------------------------------------------------------------------

    def _local_path(self, target: _Target) -> Path | None:
        """The file behind a local-files URL on this disk, or ``None`` to ask over HTTP."""
        if self._root is None or target.ls_path not in (LOCAL_FILES_PATH, LOCAL_FILES_PATH[:-1]):
            return None
        relative = target.url.params.get("d")
        if not relative:
            raise ImageFetchError("a local-files URL needs ?d=<path>")
        path = _confine(self._root, relative)
        try:
            present = path.is_file()
        except OSError as exc:  # e.g. a name longer than the filesystem allows; no path shown
            raise ImageFetchError(f"cannot read the local file ({exc.strerror})") from None
        if not present:
            logger.debug("local file not under this host's root; asking %s", target.host)
            return None
        return path

    # --- HTTP -------------------------------------------------------------------------

    def _get(self, target: _Target, consume: Callable[[httpx.Response], T]) -> T:
        """GET ``target`` (redirects checked hop by hop), ``consume`` its 200 answer; retried
        per the fetcher's :class:`Retry` while the failure is transient."""

        def gave_up(exc: Exception, tries: int) -> Exception:
            if tries == 1 or not isinstance(exc, ImageFetchError):
                return exc
            return ImageFetchError(f"{exc} ({tries} attempts)", transient=exc.transient)

        return self._retry.call(
            lambda: self._get_once(target, consume),
            what=f"fetching an image from {target.host}",
            catch=(ImageFetchError,),
            transient=lambda exc: getattr(exc, "transient", False),
            error=gave_up,
        )

    def _get_once(self, target: _Target, consume: Callable[[httpx.Response], T]) -> T:
        for _hop in range(MAX_REDIRECTS + 1):
            try:
                with self._http.stream(
                    "GET",
                    target.url,
                    headers=self._headers_for(target),
                    timeout=_TIMEOUT,
                    follow_redirects=False,
                ) as response:
                    if response.is_redirect:
                        target = self._check(response.headers["location"], base=target.url)
                        continue
                    _check_status(response, target)
                    result = consume(response)
            except httpx.TimeoutException:
                raise ImageFetchError(
                    f"{target.host} did not send the image in time", transient=True
                ) from None
            except httpx.HTTPError as exc:
                raise ImageFetchError(
                    f"cannot fetch the image from {target.host} ({type(exc).__name__})",
                    transient=True,
                ) from None
            logger.debug("fetched an image from %s", target.host)
            return result
        raise ImageFetchError(f"more than {MAX_REDIRECTS} redirects fetching the image")

    def _headers_for(self, target: _Target) -> dict[str, str]:
        """Label Studio's auth header for Label Studio only; nothing for other hosts."""
        if not target.is_label_studio or self._auth_headers is None:
            return {}
        try:
            return dict(self._auth_headers())
        except Exception as exc:  # the caller's credential code; its message has no token
            raise ImageFetchError(
                f"no Label Studio credentials for fetching the image ({type(exc).__name__}: {exc})"
            ) from None


# --- helpers ----------------------------------------------------------------------------


def _parse_label_studio_url(url: str) -> httpx.URL:
    try:
        parsed = httpx.URL(url.strip())
    except httpx.InvalidURL:
        parsed = httpx.URL()
    if parsed.scheme not in _DEFAULT_PORTS or not parsed.host:
        raise ValueError(f"LABEL_STUDIO_URL={url!r} must be an http(s) URL with a host")
    return parsed


def _parse_allowed_host(entry: str) -> tuple[str, int | None]:
    """``host`` or ``host:port`` (a scheme, if given, is ignored) → (host, port or None)."""
    text = entry.strip()
    try:
        parsed = httpx.URL(text if "://" in text else f"//{text}")
    except httpx.InvalidURL:
        parsed = httpx.URL()
    if not parsed.host or parsed.userinfo:
        raise ValueError(f"VALVE_ID_ALLOWED_HOSTS entry {entry!r} is not host or host:port")
    return _normal_host(parsed.host), parsed.port


def _normal_host(host: str) -> str:
    return host.lower().rstrip(".")


def _origin(url: httpx.URL) -> tuple[str, str, int]:
    port = url.port or _DEFAULT_PORTS.get(url.scheme, 0)
    return url.scheme, _normal_host(url.host), port


def _show(origin: tuple[str, str, int]) -> str:
    _, host, port = origin
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _confine(root: Path, relative: str) -> Path:
    """``root / relative`` resolved, refused unless it stays inside ``root`` (Label Studio's
    rule for ``?d=``: relative to LOCAL_FILES_DOCUMENT_ROOT)."""
    if "\x00" in relative or "\\" in relative:
        raise ImageFetchError("local-files path contains forbidden characters")
    pure = PurePosixPath(relative)
    if pure.is_absolute():
        raise ImageFetchError("local-files path must be relative to LOCAL_FILES_DOCUMENT_ROOT")
    if ".." in pure.parts:
        raise ImageFetchError("local-files path must not contain '..'")
    resolved = (root / pure).resolve()
    if not resolved.is_relative_to(root):
        raise ImageFetchError("local-files path leads outside LOCAL_FILES_DOCUMENT_ROOT")
    return resolved


def _open_nofollow(path: Path) -> io.BufferedReader:
    """``path`` opened for reading; O_NOFOLLOW: the last component cannot have been swapped
    for a symlink since :func:`_confine` checked it."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ImageFetchError(f"cannot read the local file ({exc.strerror})") from None
    return os.fdopen(fd, "rb")


def _read_capped_file(path: Path, max_bytes: int) -> bytes:
    with _open_nofollow(path) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageFetchError(_too_large(max_bytes))
    return data


def _check_status(response: httpx.Response, target: _Target) -> None:
    code = response.status_code
    if code == httpx.codes.OK:
        return
    who = "Label Studio" if target.is_label_studio else target.host
    if target.is_label_studio and code in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
        raise ImageFetchError(
            f"Label Studio refused the image (HTTP {code}): check LABEL_STUDIO_API_KEY"
        )
    if code == httpx.codes.NOT_FOUND:
        hint = ""
        if target.is_label_studio and (target.ls_path or "").startswith(LOCAL_FILES_PATH[:-1]):
            hint = "; local files need a Local Storage in Label Studio covering their folder"
        raise ImageFetchError(f"{who} has no such image (HTTP 404){hint}")
    raise ImageFetchError(
        f"{who} answered HTTP {code} instead of the image", transient=is_transient_status(code)
    )


def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    """The body, refused early by Content-Length and stopped as soon as it passes the cap."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ImageFetchError(_too_large(max_bytes))
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_bytes():  # as received: a chunk size would read ahead
        size += len(chunk)
        if size > max_bytes:
            raise ImageFetchError(_too_large(max_bytes))
        chunks.append(chunk)
    return b"".join(chunks)


def _same_size(path: Path, size: int) -> bool:
    return path.is_file() and path.stat().st_size == size


def _write_capped(destination: Path, chunks: Iterable[bytes], max_bytes: int) -> None:
    """``chunks`` into a temporary file beside ``destination``, renamed into place once
    complete: a reader never sees half an image, a failure leaves none behind."""
    fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=".download-", suffix=".tmp")
    try:
        written = 0
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                written += len(chunk)
                if written > max_bytes:
                    raise ImageFetchError(_too_large(max_bytes))
                fh.write(chunk)
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _too_large(max_bytes: int) -> str:
    return f"the image is larger than the {max_bytes / 2**20:g} MiB limit"
