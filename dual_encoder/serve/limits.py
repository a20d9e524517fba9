"""Request-body limit for the HTTP server: a 413 before an oversized body is read into memory.

Starlette and FastAPI read a whole body before validating it, so a 200 MB POST costs the server
hundreds of MB before its 422. This ASGI middleware refuses it from its Content-Length header, and stops
a chunked (length-less) body as soon as it passes the limit.
"""

from __future__ import annotations

from typing import Collection, Optional

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised while a body streams past the limit; an HTTPException so FastAPI's body parsing passes it on."""

    def __init__(self, max_bytes: int):
        super().__init__(status_code=413, detail=too_large_message(max_bytes))


def too_large_message(max_bytes: int) -> str:
    return f"request body too large: the limit is {max_bytes} bytes"


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with a JSON 413; file uploads to `upload_paths` may reach `upload_bytes`.

    Args:
        app: the ASGI app to protect.
        max_bytes: the largest body accepted.
        upload_bytes: the largest `multipart/form-data` POST body accepted on `upload_paths` (default `max_bytes`).
        upload_paths: the routes that take an uploaded file.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        upload_bytes: Optional[int] = None,
        upload_paths: Collection[str] = (),
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = max_bytes if upload_bytes is None else upload_bytes
        self.upload_paths = frozenset(upload_paths)

    def limit(self, scope: Scope) -> int:
        """The body limit of this request."""
        upload = scope.get("method") == "POST" and scope.get("path") in self.upload_paths
        if upload and _header(scope, b"content-type").lower().startswith(b"multipart/form-data"):
            return self.upload_bytes
        return self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, receive, send, limit)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send, limit)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        # "Connection: close": the unread rest of the body must not be parsed as the next request.
        response = JSONResponse({"detail": too_large_message(limit)}, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> bytes:
    return next((value for key, value in scope.get("headers", ()) if key == name), b"")


def _content_length(scope: Scope) -> int | None:
    """The declared body length; a malformed header counts as too large (it cannot be trusted)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else 1 << 62
    return None
