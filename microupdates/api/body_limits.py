"""Request body size limits, enforced while the body streams in.

A request that declares a `Content-Length` over its limit gets 413 before a
byte of the body is read. A body without a length (chunked) is counted as it
arrives, and the read that passes the limit raises the 413, so no handler
buffers more than the limit.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

Message = MutableMapping[str, Any]

# Recent Starlette versions deprecate the name HTTP_413_REQUEST_ENTITY_TOO_LARGE, so the number is used.
HTTP_CONTENT_TOO_LARGE = 413


def body_too_large(size: int | str, limit: int, setting: str) -> HTTPException:
    """Return the 413 for a body of `size` bytes (or a description of it) over `limit`."""

    return HTTPException(
        HTTP_CONTENT_TOO_LARGE,
        f"The request body is {size} bytes, over the limit of {limit} bytes; "
        f"send less, or raise MICROUPDATES_{setting.upper()} on the server.",
    )


class BodySizeLimit:
    """ASGI middleware that limits the request body per path.

    `limit_for(path)` returns the limit in bytes and the name of the setting
    that sets it, so the error can tell the operator which one to raise.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], tuple[int, str]]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        limit, setting = self.limit_for(scope["path"])
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _send_error(send, body_too_large(declared, limit, setting))
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the handler's read, so the app's HTTPException handler returns the 413.
                    raise body_too_large(f"more than {limit}", limit, setting)
            return message

        await self.app(scope, limited_receive, send)


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_error(send: Callable[[Message], Awaitable[None]], error: HTTPException) -> None:
    body = json.dumps({"detail": error.detail}).encode("utf-8")
    await send({
        "type": "http.response.start",
        "status": error.status_code,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })
    await send({"type": "http.response.body", "body": body})

