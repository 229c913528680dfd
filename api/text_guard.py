"""Text that PostgreSQL cannot store is refused with 422 before any route runs, naming the field.

PostgreSQL refuses U+0000 in `text`, and a lone UTF-16 surrogate (`"\\ud800"` in JSON) cannot be encoded
as UTF-8 at all, so such a string reaching a query ended as a 500 after the work had started. This pure
ASGI middleware checks every text input before routing: the path, the query string, the stored
`Idempotency-Key` header, JSON bodies and URL-encoded form bodies (the admin UI). The 422 has the same
envelope and `loc` shape as FastAPI's own validation errors (`["body", "description"]`,
`["query", "q"]`, `["path"]`, `["header", "idempotency-key"]`). Multipart parts are files or enum fields
(KYC) and are left to the route.

A body is only parsed here when its raw bytes could hold such a character (`\\u0000`, `\\ud8..`-`\\udf..`,
a NUL byte or `%00`), so an ordinary request pays a byte search.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.envelope import error_response
from telemetry import metrics

log = logging.getLogger(__name__)
STORED_HEADERS = (b"idempotency-key",)
_SUSPECT = re.compile(rb"\\u0000|\\ud[89a-f]|\x00|%00", re.IGNORECASE)
_SURROGATE = re.compile("[\ud800-\udfff]")
Loc = list[str | int]


def bad_text(value: str) -> str | None:
    """Why PostgreSQL could not store `value`, or None."""
    if "\x00" in value:
        return "must not contain the NUL character (U+0000)"
    if _SURROGATE.search(value):
        return "must not contain a lone UTF-16 surrogate"
    return None


def _shown(name: str) -> str:
    """A field name fit to echo back in JSON (its NUL or surrogate escaped)."""
    return name.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\u0000")


def _walk(value: Any, loc: Loc) -> tuple[Loc, str] | None:
    """The first string (key or value) in a decoded JSON document that cannot be stored."""
    if isinstance(value, str):
        why = bad_text(value)
        return (loc, why) if why else None
    if isinstance(value, dict):
        for key, item in value.items():
            why = bad_text(key)
            if why:
                return [*loc, _shown(key)], why
            found = _walk(item, [*loc, _shown(key)])
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _walk(item, [*loc, index])
            if found:
                return found
    return None


def _pairs(text: str, where: str) -> tuple[Loc, str] | None:
    for name, value in parse_qsl(text, keep_blank_values=True):
        why = bad_text(name) or bad_text(value)
        if why:
            return [where, _shown(name)], why
    return None


class PathTemplates:
    """Names the path parameter a bad path puts the text in, from the API's path templates
    (`/api/rentals/{rental_id}/issues`), compiled the first time a path needs it."""

    def __init__(self, templates: Callable[[], Iterable[str]]) -> None:
        self._templates = templates
        self._compiled: list[re.Pattern[str]] | None = None

    def parameter(self, path: str) -> str | None:
        if self._compiled is None:
            self._compiled = [compile_path(template)[0] for template in self._templates()]
        for pattern in self._compiled:
            match = pattern.match(path)
            if match:
                return next((name for name, value in match.groupdict().items() if bad_text(value)), None)
        return None


def _check_request(scope: Scope, paths: PathTemplates | None) -> tuple[Loc, str] | None:
    why = bad_text(scope["path"])  # already percent-decoded: "%00" is a NUL here
    if why is not None:
        name = paths.parameter(scope["path"]) if paths is not None else None
        return (["path", name] if name else ["path"]), why
    query = scope.get("query_string", b"").decode("latin-1")
    if query and _SUSPECT.search(query.encode("latin-1")):
        found = _pairs(query, "query")
        if found:
            return found
    for name, value in scope.get("headers", []):
        if name in STORED_HEADERS and b"\x00" in value:
            return ["header", name.decode()], "must not contain the NUL character (U+0000)"
    return None


def _check_body(body: bytes, content_type: str) -> tuple[Loc, str] | None:
    if not _SUSPECT.search(body):
        return None
    if content_type.startswith("application/x-www-form-urlencoded"):
        return _pairs(body.decode("latin-1"), "body")
    if "json" in content_type:
        try:
            document = json.loads(body)
        except ValueError:
            return None  # not JSON: the route's own validation answers
        return _walk(document, ["body"])
    return None


class RefuseUnstorableText:
    """`path_templates`: the API's path templates (read when first needed), to name a path parameter."""

    def __init__(self, app: ASGIApp, *, path_templates: Callable[[], Iterable[str]] | None = None) -> None:
        self.app = app
        self.paths = PathTemplates(path_templates) if path_templates is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        found = _check_request(scope, self.paths)
        if found is not None:
            await self._refuse(scope, send, *found)
            return
        content_type = dict(scope.get("headers", [])).get(b"content-type", b"").decode("latin-1").lower()
        if not (content_type.startswith("application/x-www-form-urlencoded") or "json" in content_type):
            await self.app(scope, receive, send)
            return
        messages, body = await self._read_body(receive)
        found = _check_body(body, content_type)
        if found is not None:
            await self._refuse(scope, send, *found)
            return
        await self.app(scope, self._replay(messages, receive), send)

    @staticmethod
    async def _read_body(receive: Receive) -> tuple[list[Message], bytes]:
        """The whole body (the body cap in `api.limits` runs first and bounds it)."""
        messages: list[Message] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        return messages, body

    @staticmethod
    def _replay(messages: list[Message], receive: Receive) -> Receive:
        pending = list(messages)

        async def replay() -> Message:
            return pending.pop(0) if pending else await receive()

        return replay

    @staticmethod
    async def _refuse(scope: Scope, send: Send, loc: Loc, why: str) -> None:
        metrics.HTTP_REFUSED.labels(reason="unstorable_text").inc()
        path = scope["path"]
        log.info("event=request_refused path=%r code=validation_error loc=%s reason=%r", path, loc, why)
        response = error_response(
            422,
            "validation_error",
            "The request body or parameters are not valid.",
            {"errors": [{"loc": loc, "msg": f"Text {why}."}]},
        )
        await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
