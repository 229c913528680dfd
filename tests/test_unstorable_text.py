"""Issue 10, item 2: a NUL character or a lone UTF-16 surrogate in any text input is a 422 naming the
field, never a 500 (PostgreSQL refuses U+0000 in text; a lone surrogate cannot be encoded at all).

The walk covers every operation of the OpenAPI document: each string path parameter, query parameter
and top-level string property of a JSON body gets each bad value. No token is sent: the refusal comes
before routing, so it is the same for public, user and operator routes."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

import tests.rental_support as rs
from storage.rental_models import RentalIssue
from tests.support import metric

pytestmark = pytest.mark.integration

BAD = {"nul": ("a\x00b", "a%00b"), "surrogate": ("a\ud800b", None)}  # (JSON value, in a URL)


def _schema(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = doc["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def _is_text(doc: dict[str, Any], node: dict[str, Any]) -> bool:
    node = _schema(doc, node)
    if node.get("type") == "string" and "enum" not in node and node.get("format") not in ("binary",):
        return True
    return any(_is_text(doc, option) for option in node.get("anyOf", []))


def _cases(doc: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(method, path template, where, name) for every text input the API documents."""
    cases = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for param in op.get("parameters", []):
                if param["in"] in ("path", "query") and _is_text(doc, param.get("schema", {})):
                    cases.append((method, path, param["in"], param["name"]))
            content = op.get("requestBody", {}).get("content", {})
            body = _schema(doc, content.get("application/json", {}).get("schema", {}))
            for name, prop in body.get("properties", {}).items():
                if _is_text(doc, prop):
                    cases.append((method, path, "body", name))
    return cases


def _url(path: str, where: str, name: str, bad: str) -> str:
    filled = path
    for part in path.split("/"):
        if part.startswith("{"):
            value = bad if where == "path" and part == f"{{{name}}}" else str(uuid.uuid4())
            filled = filled.replace(part, value, 1)
    return filled + (f"?{name}={bad}" if where == "query" else "")


async def test_every_documented_text_input_refuses_nul_and_lone_surrogates(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    cases = _cases(doc)
    wheres = {where for _, _, where, _ in cases}
    assert wheres == {"path", "query", "body"} and len(cases) > 40, cases  # the walk sees the whole API
    refused_before = await metric(client, "powerbank_http_refused_total", reason="unstorable_text")
    sent = 0
    for method, path, where, name in cases:
        for kind, (in_json, in_url) in BAD.items():
            if where == "body":
                content = json.dumps({name: in_json}).encode()  # ensure_ascii: "\u0000", "\ud800"
                r = await client.request(
                    method,
                    _url(path, where, name, ""),
                    content=content,
                    headers={"content-type": "application/json"},
                )
            elif in_url is not None:
                r = await client.request(method, _url(path, where, name, in_url))
            else:
                continue  # a URL is percent-decoded as UTF-8: it cannot carry a lone surrogate
            sent += 1
            assert r.status_code == 422, (method, path, where, name, kind, r.status_code, r.text)
            error = r.json()["error"]
            assert error["code"] == "validation_error"
            assert error["context"]["errors"][0]["loc"] == [where, name], (method, path, r.text)
    refused = await metric(client, "powerbank_http_refused_total", reason="unstorable_text")
    assert refused - refused_before == sent


async def test_a_nul_in_an_issue_description_is_a_422_and_records_nothing(
    client: httpx.AsyncClient, system: Any
) -> None:
    """The fuzzer's finding: `POST /api/rentals/{id}/issues` with `\\u0000` in `description` was a 500."""
    user = await rs.customer(system, 500)
    pkg = await rs.package(system)
    rental_id, _, _ = await rs.started(system, user, package_id=pkg, at=rs.now())
    body = '{"issue_type": "CHARGING_ISSUE", "description": "does not \\u0000 charge"}'
    headers = {**user.auth, "content-type": "application/json"}
    r = await client.post(f"/api/rentals/{rental_id}/issues", content=body, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["context"]["errors"] == [
        {"loc": ["body", "description"], "msg": "Text must not contain the NUL character (U+0000)."}
    ]
    async with system.services.db.transaction() as session:
        issues = select(func.count()).select_from(RentalIssue).where(RentalIssue.rental_id == rental_id)
        assert await session.scalar(issues) == 0
    ok = await client.post(
        f"/api/rentals/{rental_id}/issues",
        json={"issue_type": "CHARGING_ISSUE", "description": "does not charge"},
        headers=user.auth,
    )
    assert ok.status_code == 201, ok.text  # the same request without the NUL goes through


async def test_admin_forms_and_stored_headers_refuse_nul(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/admin/login",
        content=b"phone=%2B977980000%00&password=x",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["context"]["errors"][0]["loc"] == ["body", "phone"]
    # a NUL in a header the API stores (Idempotency-Key): refused by the HTTP parser or by us, never a 500
    url = client.base_url
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        b"POST /api/rentals/start HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Idempotency-Key: a\x00b\r\nContent-Length: 2\r\n\r\n{}"
    )
    await writer.drain()
    async with asyncio.timeout(10):
        status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] in (b"400", b"422"), status_line
