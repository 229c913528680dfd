"""Object-level authorization, mass assignment, role checks, paging caps and body size caps, over HTTP.

Two app users, A and B, log in for real. A makes objects through the API (rentals on a simulated cabinet,
a refund request, a top-up intent, notifications, a favorite); B tries to read, change, cancel, extend and
pay each of them by id: 404 `not_found` (the object is not B's, so for B it does not exist), and A's
objects are exactly as before.

Request bodies are pydantic models that ignore unknown fields (pydantic's default, kept on purpose: the
mobile app sends extra fields). So a caller who adds `status`, `price`, `balance`, `amount_paid`,
`user_id`, `role`, `kyc_status`, ... gets the same result as without them, which these tests prove by
checking the resulting object and the wallet.

`/metrics` stays public (Prometheus scrapes it inside the deployment; it holds counts, never personal
data); operators' routes are covered route by route elsewhere, the plain-user refusal here.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from simulators.cabinet import SimulatedCabinet
from storage.payment_models import PaymentIntent
from tests.conftest import Api, new_phone, staff_login
from tests.support import active, eventually, funded_user, overridden, rent, start_cabinet, wait_ready

pytestmark = pytest.mark.integration

EXTRAS: dict[str, Any] = {
    "status": "COMPLETED",
    "payment_status": "PAID",
    "price": "0.00",
    "amount": "0.01",
    "amount_paid": "99999.00",
    "balance": "99999.00",
    "held": "0.00",
    "user_id": str(uuid.uuid4()),
    "role": "admin",
    "is_staff": True,
    "kyc_status": "APPROVED",
    "id": str(uuid.uuid4()),
    "processed_at": "2020-01-01T00:00:00Z",
    "due_at": "2099-01-01T00:00:00Z",
}
"""Fields a caller does not own, sent along with every mutating body below."""


def H(token: str) -> dict[str, str]:
    return Api.auth(token)


@dataclass
class World:
    a: str  # A's access token
    b: str
    a_id: str
    b_id: str
    cabinet: SimulatedCabinet
    completed: dict[str, Any]  # A's rental, returned
    rental: dict[str, Any]  # A's rental, ACTIVE
    refund: dict[str, Any]
    intent: dict[str, Any]
    notification: dict[str, Any]


async def balance(client: httpx.AsyncClient, token: str) -> str:
    r = await client.get("/api/payments/wallet/balance", headers=H(token))
    assert r.status_code == 200, r.text
    value: str = r.json()["data"]["balance"]
    return value


async def history(client: httpx.AsyncClient, token: str) -> dict[str, dict[str, Any]]:
    r = await client.get("/api/rentals/history?page_size=100", headers=H(token))
    assert r.status_code == 200, r.text
    return {x["id"]: x for x in r.json()["data"]["results"]}


async def notifications(client: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    r = await client.get("/api/notifications?page_size=100", headers=H(token))
    assert r.status_code == 200, r.text
    results: list[dict[str, Any]] = r.json()["data"]["results"]
    return results


def esewa_test_merchant(settings: Any) -> AbstractContextManager[None]:
    """eSewa's public test merchant, which only PAYMENTS_SANDBOX lets through, for a while."""
    return overridden(
        settings, payments_sandbox=True, esewa_product_code="EPAYTEST", esewa_secret_key="8gBm/:&EnhH.1/q"
    )


@pytest.fixture(scope="module")
async def world(base_url: str, system: Any) -> Any:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        api = Api(client, Path(system.settings.sms_backend[len("file:") :]))

        operator = (await staff_login(system, api))["access"]

        cabinet = await start_cabinet(client, operator, holes=8, banks=None)
        await wait_ready(client, operator, cabinet.sn)
        a_user = await funded_user(client, api, operator, "1000")
        b_user = await funded_user(client, api, operator, "1000")
        a = a_user["access"]

        r = await rent(client, a, cabinet.sn)
        assert r.status_code == 201, r.text
        first = r.json()["data"]
        await cabinet.return_powerbank(first["powerbank_sn"])

        async def completed() -> dict[str, Any] | None:
            row = (await history(client, a)).get(first["id"])
            return row if row and row["status"] == "COMPLETED" else None

        done = await eventually(completed, within=10)
        r = await rent(client, a, cabinet.sn)
        assert r.status_code == 201, r.text
        rental = r.json()["data"]
        body = {"rental_id": done["id"], "amount": "1.00", "reason": "the bank did not charge my phone"}
        r = await client.post("/api/payments/refunds", json=body, headers=H(a))
        assert r.status_code == 201, r.text
        refund = r.json()["data"]
        with esewa_test_merchant(system.services.settings):  # for an intent of A's to exist
            r = await client.post(
                "/api/payments/wallet/topup-intent", json={"amount": "100", "gateway": "esewa"}, headers=H(a)
            )
        assert r.status_code in (200, 201), r.text
        intent = r.json()["data"]
        r = await client.post(f"/api/stations/{cabinet.sn}/favorite", headers=H(a))
        assert r.status_code == 201, r.text
        notes = await eventually(lambda: notifications(client, a), within=10)
        world = World(
            a=a,
            b=b_user["access"],
            a_id=a_user["user"]["id"],
            b_id=b_user["user"]["id"],
            cabinet=cabinet,
            completed=done,
            rental=rental,
            refund=refund,
            intent=intent,
            notification=notes[0],
        )
        yield world
        await cabinet.stop()


async def snapshot(client: httpx.AsyncClient, system: Any, w: World) -> dict[str, Any]:
    """Everything of A's that B must not be able to change."""
    async with system.services.db.transaction() as session:
        intent = await session.scalar(
            select(PaymentIntent).where(PaymentIntent.id == uuid.UUID(w.intent["intent_id"]))
        )
        assert intent is not None
        intent_state = (str(intent.user_id), intent.status.value, str(intent.amount))
    refunds = (await client.get("/api/payments/refunds", headers=H(w.a))).json()["data"]["results"]
    favorites = (await client.get("/api/stations/favorites", headers=H(w.a))).json()["data"]
    receipt = (await client.get(f"/api/rentals/{w.rental['id']}/receipt", headers=H(w.a))).json()["data"]
    return {
        "balance": await balance(client, w.a),
        "history": await history(client, w.a),
        "active": await active(client, w.a),
        "refunds": refunds,
        "intent": intent_state,
        "notifications": [(n["id"], n.get("read_at")) for n in await notifications(client, w.a)],
        "favorites": [f["serial_number"] for f in favorites],
        "receipt_lines": receipt["lines"],
    }


async def test_b_cannot_touch_as_objects(client: httpx.AsyncClient, system: Any, world: World) -> None:
    w = world
    before = await snapshot(client, system, w)
    b_balance = await balance(client, w.b)
    rid, done = w.rental["id"], w.completed["id"]
    attempts: list[tuple[str, str, dict[str, Any] | None]] = [
        ("GET", f"/api/rentals/{rid}/receipt", None),
        ("GET", f"/api/rentals/{done}/receipt", None),
        ("POST", f"/api/rentals/{rid}/cancel", {"reason": "mine now"}),
        ("POST", f"/api/rentals/{rid}/extend", {"package_id": 1}),
        ("POST", f"/api/rentals/{rid}/pay-due", None),
        ("POST", f"/api/rentals/{done}/pay-due", None),
        ("POST", f"/api/rentals/{rid}/issues", {"issue_type": "POWER_BANK_LOST", "description": "x"}),
        ("POST", "/api/payments/refunds", {"rental_id": done, "amount": "1.00", "reason": "give"}),
        ("POST", f"/api/payments/cancel/{w.intent['intent_id']}", None),
        ("POST", "/api/payments/verify", {"intent_id": w.intent["intent_id"], "data": "e30="}),
        ("POST", f"/api/notifications/{w.notification['id']}/read", None),
    ]
    for method, path, body in attempts:
        r = await client.request(method, path, json=body, headers=H(w.b))
        assert r.status_code in (403, 404), (method, path, r.status_code, r.text)
        error = r.json()["error"]
        assert error["code"] in ("not_found", "forbidden"), (path, error)
        assert w.a_id not in r.text and w.rental.get("rental_code", "\0") not in r.text, (path, r.text)
        unauthenticated = await client.request(method, path, json=body)
        assert unauthenticated.status_code == 401, (method, path, unauthenticated.text)

    # B's own views show nothing of A's; B's bulk and idempotent writes touch only B's rows
    assert await active(client, w.b) is None
    assert (await history(client, w.b)) == {}
    mine = (await client.get("/api/payments/refunds", headers=H(w.b))).json()["data"]
    assert mine["results"] == [] and mine["count"] == 0
    assert (await notifications(client, w.b)) == [] or all(
        n["id"] != w.notification["id"] for n in await notifications(client, w.b)
    )
    assert (await client.post("/api/notifications/read-all", headers=H(w.b))).status_code == 200
    r = await client.delete(f"/api/stations/{w.cabinet.sn}/favorite", headers=H(w.b))
    assert r.status_code == 200 and r.json()["data"]["is_favorite"] is False
    tx = (await client.get("/api/payments/transactions?page_size=100", headers=H(w.b))).json()["data"]
    assert all(Decimal(t["amount"]) > 0 for t in tx["results"]), tx  # only B's own credit
    # a plain user is no operator
    for method, path in (
        ("GET", "/api/admin/refunds"),
        ("POST", f"/api/admin/refunds/{w.refund['id']}/approve"),
        ("POST", f"/api/admin/users/{w.b_id}/wallet/credit"),
    ):
        r = await client.request(method, path, json={"amount": "5", "reason": "me"}, headers=H(w.b))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (path, r.text)

    assert await snapshot(client, system, w) == before
    assert await balance(client, w.b) == b_balance


async def test_bodies_cannot_set_fields_the_caller_does_not_own(
    client: httpx.AsyncClient, system: Any, world: World
) -> None:
    w = world
    package = next(
        p for p in (await client.get("/api/rentals/packages", headers=H(w.a))).json()["data"] if p["id"] == 1
    )
    # a top-up intent: pending, for A, the amount asked; no money moves
    start = await balance(client, w.a)
    with esewa_test_merchant(system.services.settings):
        r = await client.post(
            "/api/payments/wallet/topup-intent",
            json={**EXTRAS, "amount": "250", "gateway": "esewa"},
            headers=H(w.a),
        )
    assert r.status_code in (200, 201), r.text
    intent = r.json()["data"]
    assert (intent["amount"], intent["status"]) == ("250.00", "PENDING"), intent
    assert intent["intent_id"] != EXTRAS["id"]
    async with system.services.db.transaction() as session:
        row = await session.get(PaymentIntent, uuid.UUID(intent["intent_id"]))
        assert row is not None and str(row.user_id) == w.a_id
    assert await balance(client, w.a) == start

    # a refund request: REQUESTED, the amount asked, nothing paid out yet
    rentals_before = await history(client, w.a)
    # (A's completed rental already has a request waiting: ask for the active one's sibling instead)
    r = await client.post(
        "/api/payments/refunds",
        json={**EXTRAS, "rental_id": w.completed["id"], "amount": "1.00", "reason": "again"},
        headers=H(w.a),
    )
    assert r.status_code == 409, r.text  # one open request per rental, whatever the body claims
    assert await balance(client, w.a) == start

    # an issue report and an extension: the caller's rental, the package's price
    r = await client.post(
        f"/api/rentals/{w.rental['id']}/issues",
        json={**EXTRAS, "issue_type": "CHARGING_ISSUE", "description": "slow"},
        headers=H(w.a),
    )
    assert r.status_code == 201, r.text
    assert r.json()["data"]["rental_id"] == w.rental["id"]
    assert r.json()["data"].get("status") != "COMPLETED"
    r = await client.post(
        f"/api/rentals/{w.rental['id']}/extend", json={**EXTRAS, "package_id": 1}, headers=H(w.a)
    )
    assert r.status_code == 200, r.text
    extension = r.json()["data"]
    assert extension["extension_cost"] == package["price"], extension
    assert extension["rental"]["status"] == "ACTIVE" and extension["due_at"] != EXTRAS["due_at"]
    assert Decimal(await balance(client, w.a)) == Decimal(start) - Decimal(package["price"])
    after = await history(client, w.a)
    assert after.keys() == rentals_before.keys()
    assert after[w.rental["id"]]["status"] == "ACTIVE"

    # a station issue report and a device registration are the caller's
    r = await client.post(
        f"/api/stations/{w.cabinet.sn}/report-issue",
        json={**EXTRAS, "issue_type": "DIRTY", "description": "sticky"},
        headers=H(w.a),
    )
    assert r.status_code == 201, r.text
    assert r.json()["data"].get("status") != "COMPLETED"
    r = await client.post(
        "/api/notifications/devices",
        json={**EXTRAS, "token": f"fcm-{uuid.uuid4().hex}", "platform": "android"},
        headers=H(w.a),
    )
    assert r.status_code == 201, r.text

    # a new rental: A's, PENDING/ACTIVE at the package price, never what the body says
    b_balance = await balance(client, w.b)
    r = await client.post(
        "/api/rentals/start",
        json={**EXTRAS, "station_sn": w.cabinet.sn, "package_id": 1},
        headers=H(w.b),
    )
    assert r.status_code == 201, r.text
    rental = r.json()["data"]
    assert rental["status"] == "ACTIVE" and rental["id"] != EXTRAS["id"]
    assert rental["amount_paid"] == package["price"]
    assert Decimal(await balance(client, w.b)) == Decimal(b_balance) - Decimal(package["price"])
    assert rental["id"] in await history(client, w.b)
    assert rental["id"] not in await history(client, w.a)
    await w.cabinet.return_powerbank(rental["powerbank_sn"])

    # logging in with extra claims makes nobody an operator
    phone = new_phone()
    assert (
        await client.post("/api/auth/otp/request", json={**EXTRAS, "identifier": phone})
    ).status_code == 200
    api = Api(client, Path(system.settings.sms_backend[len("file:") :]))
    r = await client.post(
        "/api/auth/otp/verify", json={**EXTRAS, "identifier": phone, "otp": api.last_code(phone)}
    )
    assert r.status_code == 200, r.text
    token = r.json()["data"]["access"]
    assert (await client.get("/api/admin/refunds", headers=H(token))).status_code == 403
    me = (await client.get("/api/auth/me", headers=H(token))).json()["data"]
    assert me["kyc_status"] != "APPROVED" and me["id"] != EXTRAS["user_id"]


async def test_profile_updates_cannot_set_role_kyc_or_money(
    client: httpx.AsyncClient, api: Api, operator_token: str
) -> None:
    schema = (await client.get("/openapi.json")).json()
    if "patch" not in schema["paths"].get("/api/users/profile", {}):
        pytest.skip("PATCH /api/users/profile is not in this build's schema")
    user = await funded_user(client, api, operator_token, "10")
    token = user["access"]
    before = (await client.get("/api/auth/me", headers=H(token))).json()["data"]
    r = await client.patch("/api/users/profile", json={**EXTRAS, "name": "Sita"}, headers=H(token))
    assert r.status_code == 200, r.text
    after = (await client.get("/api/auth/me", headers=H(token))).json()["data"]
    assert after["name"] == "Sita"
    assert {k: v for k, v in after.items() if k != "name"} == {k: v for k, v in before.items() if k != "name"}
    assert await balance(client, token) == "10.00"
    assert (await client.get("/api/admin/refunds", headers=H(token))).status_code == 403


# --------------------------------------------------------------------------------------------------
# Paging caps, from the schema: every list with `page_size` refuses 101 and survives a huge page


def paged_operations(schema: dict[str, Any]) -> list[str]:
    return sorted(
        path
        for path, item in schema["paths"].items()
        if "get" in item and any(p["name"] == "page_size" for p in item["get"].get("parameters", []))
    )


async def test_every_paged_route_caps_page_size_at_100(
    client: httpx.AsyncClient, api: Api, operator_token: str
) -> None:
    schema = (await client.get("/openapi.json")).json()
    paths = paged_operations(schema)
    assert {"/api/rentals/history", "/api/payments/transactions", "/api/stations"} <= set(paths)
    # every response shaped as a page takes page_size (so no list escapes the cap)
    for path, item in schema["paths"].items():
        for method, op in item.items():
            text = str(op.get("responses", {}).get("200", "")) + str(op.get("responses", {}).get("201", ""))
            if "Page_" in text and method == "get":
                assert path in paths, f"{method.upper()} {path} answers a page but takes no page_size"
    user = (await api.login(new_phone()))["access"]
    for path in paths:
        token = operator_token if path.startswith("/api/admin") else user
        params = {"lat": "27.7", "lng": "85.3"} if path.endswith("/nearby") else {}
        size = next(p for p in schema["paths"][path]["get"]["parameters"] if p["name"] == "page_size")
        assert size["schema"].get("maximum") == 100, (path, size)
        r = await client.get(path, params={**params, "page_size": 101}, headers=H(token))
        assert r.status_code in (400, 422), (path, r.text)
        assert r.json()["error"]["code"] == "validation_error"
        r = await client.get(path, params={**params, "page_size": 100}, headers=H(token))
        assert r.status_code == 200, (path, r.text)
        r = await client.get(path, params={**params, "page": 10**19}, headers=H(token))
        assert r.status_code in (200, 400, 422), (path, r.status_code, r.text)  # never a 500


# --------------------------------------------------------------------------------------------------
# Body size caps


async def test_bodies_over_the_cap_are_refused_with_413(client: httpx.AsyncClient, system: Any) -> None:
    cap = system.settings.http_max_body_bytes
    big = b'{"identifier": "' + b"9" * cap + b'"}'
    r = await client.post("/api/auth/otp/request", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json() == {
        "success": False,
        "error": {
            "code": "payload_too_large",
            "message": r.json()["error"]["message"],
            "context": {"max_bytes": cap},
        },
    }

    async def chunks() -> Any:  # no Content-Length: the bytes are counted as they stream in
        yield b'{"identifier": "'
        for _ in range(cap // 65536 + 2):
            yield b"9" * 65536
        yield b'"}'

    r = await client.post(
        "/api/auth/otp/request", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "payload_too_large"
    # a lying Content-Length smaller than the body does not get past either (uvicorn stops at the length)
    r = await client.post("/api/auth/otp/request", json={"identifier": "x" * 10})
    assert r.status_code in (400, 422, 429), r.text  # under the cap: the route decides


async def raw_post(client: httpx.AsyncClient, path: str, length: int, content_type: str) -> tuple[int, bytes]:
    """Declare `length` bytes of body, send none, and read what the server answers."""
    url = client.base_url
    reader, writer = await asyncio.open_connection(url.host, url.port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    writer.write(head.encode())
    await writer.drain()
    async with asyncio.timeout(10):
        status_line = await reader.readline()
        rest = await reader.read(65536)
    writer.close()
    return int(status_line.split()[1]), rest


async def test_kyc_uploads_get_their_own_larger_cap(client: httpx.AsyncClient, system: Any) -> None:
    from api.limits import BodySizeLimit

    settings = system.settings
    assert settings.http_max_upload_bytes > settings.http_max_body_bytes
    limiter = BodySizeLimit(
        lambda *a: None,
        max_body_bytes=settings.http_max_body_bytes,
        max_upload_bytes=settings.http_max_upload_bytes,
    )
    assert limiter.limit_for("/api/users/kyc") == settings.http_max_upload_bytes
    assert limiter.limit_for("/api/users/kyc/") == settings.http_max_upload_bytes
    assert limiter.limit_for("/api/users/profile") == settings.http_max_body_bytes
    # over the upload cap even on the upload route: 413 from the declared length, before any body is read
    status, answer = await raw_post(
        client, "/api/users/kyc", settings.http_max_upload_bytes + 1, "multipart/form-data; boundary=x"
    )
    assert status == 413 and b"payload_too_large" in answer, answer
    # a body between the two caps passes the limiter on the upload route (the route then decides)
    body = b"x" * (settings.http_max_body_bytes + 10)
    r = await client.post("/api/users/kyc", content=body, headers={"Content-Type": "multipart/form-data"})
    assert r.status_code != 413, r.text
