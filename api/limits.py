"""Request body size caps, as pure ASGI middleware (before any routing, parsing or database work).

A body over the cap is refused with 413 `payload_too_large` in the standard error envelope: at once when
`Content-Length` says so, otherwise (chunked or lying clients) as soon as the bytes streamed in pass the
cap (the rest of the body, up to `DRAIN_FACTOR` times the cap, is read and dropped first, so that the
client gets to read the answer). The application then sees the client as gone (`http.disconnect`), so it
never parses or acts on a partial body, and whatever it tries to answer is discarded. Multipart KYC
uploads (`upload_paths`) get their own, larger cap.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from telemetry import metrics

log = logging.getLogger(__name__)
CODE = "payload_too_large"
UPLOAD_PATHS = ("/api/users/kyc",)
DRAIN_FACTOR = 4  # after a 413 mid-stream, up to 4 x the cap more is read (and dropped) before closing


def _envelope(limit: int) -> bytes:
    error = {
        "code": CODE,
        "message": f"The request body is larger than the {limit} bytes this endpoint accepts.",
        "context": {"max_bytes": limit},
    }
    return json.dumps({"success": False, "error": error}).encode()


def _content_length(scope: Scope) -> int | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodySizeLimit:
    """Caps request bodies at `max_body_bytes`, or `max_upload_bytes` on `upload_paths`."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_upload_bytes: int,
        upload_paths: Iterable[str] = UPLOAD_PATHS,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.upload_paths = frozenset(p.rstrip("/") for p in upload_paths)

    def limit_for(self, path: str) -> int:
        return self.max_upload_bytes if path.rstrip("/") in self.upload_paths else self.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        limit = self.limit_for(path)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            log.info("event=request_refused path=%s code=%s bytes=%s", path, CODE, declared)
            await self._refuse(send, limit)
            return

        received = 0
        started = refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused, started
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] != "http.request":
                return message
            received += len(message.get("body", b""))
            if received <= limit:
                return message
            refused = True
            log.info("event=request_refused path=%s code=%s streamed_bytes=%s", path, CODE, received)
            if message.get("more_body", False):
                await self._drain(receive, DRAIN_FACTOR * limit)
            if not started:
                started = True
                await self._refuse(send, limit)
            return {"type": "http.disconnect"}

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out already: whatever the app answers after is discarded
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            log.debug("event=refused_request_ended path=%s", path, exc_info=True)

    @staticmethod
    async def _drain(receive: Receive, at_most: int) -> None:
        """Read (and drop) the rest of a refused body before answering, so that a client still sending it
        reads the 413 instead of a reset connection; a body beyond `at_most` more bytes is cut off."""
        drained = 0
        while drained <= at_most:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            drained += len(message.get("body", b""))

    @staticmethod
    async def _refuse(send: Send, limit: int) -> None:
        metrics.HTTP_REFUSED.labels(reason=CODE).inc()
        body = _envelope(limit)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def install(app: Any, *, max_body_bytes: int, max_upload_bytes: int) -> None:
    """Register the caps on a Starlette/FastAPI `app`."""
    app.add_middleware(BodySizeLimit, max_body_bytes=max_body_bytes, max_upload_bytes=max_upload_bytes)
