"""ASGI middleware of the service: a request-size limit and HTTP basic auth.

Plain ASGI classes (as Starlette's own middleware): they answer before FastAPI parses a body,
with the service's JSON error shape.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from starlette.exceptions import HTTPException

__all__ = ["BasicAuth", "BodyLimit"]

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def _send_json(send: Send, status: int, body: dict[str, str], headers: Iterable = ()) -> None:
    content = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": content})


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413, before they are parsed.

    A declared ``Content-Length`` is checked up front; a streamed (chunked) body is counted
    as it arrives, and reading past the limit raises a 413 into the endpoint.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_json(send, 400, {"error": "invalid Content-Length"})
                return
            if int(declared) > self.max_bytes:
                await _send_json(send, 413, {"error": self._message()})
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"request body larger than {self.max_bytes // (1024 * 1024)} MB"


class BasicAuth:
    """HTTP basic auth on every path except ``/health``.

    ``/health`` stays open: it reveals no secret, and load balancers and container health
    checks probe it without credentials. Label Studio sends the credentials it was given when
    the backend was registered with ``auth_method: BASIC_AUTH`` (its auto-created webhook
    does not: patch the webhook's headers, see docs/PROTOCOL.md).
    """

    OPEN_PATHS = frozenset({"/health"})

    def __init__(self, app: ASGIApp, user: str, password: str) -> None:
        self.app = app
        self._user = user.encode("utf-8")
        self._password = password.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await _send_json(
            send,
            401,
            {"error": "authentication required"},
            [(b"www-authenticate", b'Basic realm="valve-id"')],
        )

    def _allowed(self, scope: Scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        # Both comparisons always run (``&``, not ``and``): timing says nothing about which
        # part was wrong.
        return (
            bool(sep)
            & secrets.compare_digest(user, self._user)
            & secrets.compare_digest(password, self._password)
        )
