"""Profile (GET/PATCH users/profile) and KYC: upload, checks on the files, status, operator review with
audit entries, file download by operators only, KYC_REQUIRED_TO_RENT, and both file-store backends."""

from __future__ import annotations

import hashlib
import os
import secrets
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy import func, select

from domain import files, kyc, rentals
from domain.errors import InvalidState, KycRequired
from storage.audit_models import AuditEntry
from storage.kyc_models import KycDocument, KycDocumentType, KycSide, KycStatus, KycSubmission
from storage.models import OneTimeCode, Rental, RentalStatus, Role, User
from tests import rental_support as rs
from tests.conftest import Api, free_port, new_phone

pytestmark = pytest.mark.integration

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + os.urandom(2048)
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(1024)
PDF = b"%PDF-1.7\n" + os.urandom(512) + b"\n%%EOF\n"


def _op(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _parts(**files_: tuple[str, bytes, str]) -> dict[str, tuple[str, bytes, str]]:
    return files_


def _citizenship() -> dict[str, tuple[str, bytes, str]]:
    return _parts(
        front=("front.jpg", JPEG, "image/jpeg"),
        back=("back.png", PNG, "image/png"),
        selfie=("me.jpg", JPEG[:-1] + b"\x01", "image/jpeg"),
    )


async def _submit(
    client: httpx.AsyncClient,
    user: rs.Customer,
    parts: dict[str, tuple[str, bytes, str]],
    document_type: str = "CITIZENSHIP",
) -> httpx.Response:
    return await client.post(
        "/api/users/kyc", data={"document_type": document_type}, files=parts, headers=user.auth
    )


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["success"] is False and body["error"]["code"] == code, body
    return body


async def _kyc_rows(system: Any, user_id: uuid.UUID) -> list[KycSubmission]:
    async with system.services.db.transaction() as session:
        rows = await session.scalars(select(KycSubmission).where(KycSubmission.user_id == user_id))
        return list(rows.all())


async def _audit(system: Any, kyc_id: str) -> list[AuditEntry]:
    async with system.services.db.transaction() as session:
        rows = await session.scalars(
            select(AuditEntry)
            .where(AuditEntry.target_type == "kyc", AuditEntry.target_id == kyc_id)
            .order_by(AuditEntry.id)
        )
        return list(rows.all())


def _kyc_root(system: Any) -> Path:
    root: Path = system.settings.kyc_storage_dir or system.settings.data_dir / "kyc"
    return root


def _new_email(name: str = "user") -> str:
    return f"{name}.{uuid.uuid4().hex[:8]}@example.com"


_RUN = secrets.randbelow(200) + 20  # client addresses unique per test session (X-Forwarded-For)


def _new_ip() -> str:
    return f"10.{_RUN}.{secrets.randbelow(250)}.{secrets.randbelow(250) + 1}"


def _wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


async def _email_code(api: Api, email: str, ip: str | None = None) -> str:
    """Ask for a code at `email` (as the app does before changing the profile email) and read it back."""
    headers = {"X-Forwarded-For": ip} if ip else {}
    r = await api.client.post("/api/auth/otp/request", json={"identifier": email}, headers=headers)
    assert r.status_code == 200, r.text
    return api.last_code(email.lower())


async def _profile_email(client: httpx.AsyncClient, auth: dict[str, str]) -> str | None:
    r = await client.get("/api/users/profile", headers=auth)
    assert r.status_code == 200, r.text
    email: str | None = r.json()["data"]["email"]
    return email


async def _codes(system: Any, email: str) -> list[OneTimeCode]:
    async with system.services.db.transaction() as session:
        rows = await session.scalars(
            select(OneTimeCode).where(OneTimeCode.identifier == email).order_by(OneTimeCode.id)
        )
        return list(rows.all())


# --- profile ------------------------------------------------------------------------------------------


async def test_profile_get_patch_and_protected_fields_ignored(
    api: Api, client: httpx.AsyncClient, system: Any
) -> None:
    phone = new_phone()
    login = await api.login(phone)
    auth = api.auth(login["access"])
    r = await client.get("/api/users/profile", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == {
        "id": login["user"]["id"],
        "phone": phone,
        "name": None,
        "email": None,
        "avatar_url": None,
        "kyc_status": "NOT_SUBMITTED",
    }
    email = f"ram.{uuid.uuid4().hex[:8]}@Example.com"
    code = await _email_code(api, email)  # the new address is proven with a code sent to it
    r = await client.patch(
        "/api/users/profile",
        json={
            "name": "  Ram   Bahadur ",
            "email": email,
            "email_otp": code,
            "avatar_url": "https://cdn.example.com/a/ram.png",
            "role": "admin",
            "kyc_status": "APPROVED",
            "balance": "99999.00",
            "phone": "+9779800000000",
            "id": str(uuid.uuid4()),
        },
        headers=auth,
    )
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert (data["name"], data["email"], data["avatar_url"]) == (
        "Ram Bahadur",
        email.lower(),
        "https://cdn.example.com/a/ram.png",
    )
    assert (data["id"], data["phone"], data["kyc_status"]) == (login["user"]["id"], phone, "NOT_SUBMITTED")
    me = (await client.get("/api/auth/me", headers=auth)).json()["data"]
    assert (me["id"], me["phone"], me["kyc_status"], me["email"], me["name"]) == (
        login["user"]["id"],
        phone,
        "NOT_SUBMITTED",
        email.lower(),
        "Ram Bahadur",
    )
    assert me["role"] == "user"
    async with system.services.db.transaction() as session:
        row = await session.get(User, uuid.UUID(login["user"]["id"]))
        assert row is not None and (row.role, row.phone, row.kyc_status) == (
            Role.USER,
            phone,
            "NOT_SUBMITTED",
        )
        assert (
            await session.scalar(select(func.count()).select_from(User).where(User.phone == "+9779800000000"))
            == 0
        )

    # Omitted fields stay; null clears (the user has a phone, so even the email may go, with no code).
    r = await client.patch("/api/users/profile", json={"avatar_url": None}, headers=auth)
    assert r.status_code == 200, r.text
    assert (r.json()["data"]["avatar_url"], r.json()["data"]["name"]) == (None, "Ram Bahadur")
    r = await client.patch("/api/users/profile", json={"email": None}, headers=auth)
    assert r.status_code == 200, r.text
    assert (r.json()["data"]["email"], r.json()["data"]["name"]) == (None, "Ram Bahadur")


async def test_profile_validation_and_email_conflict(
    api: Api, client: httpx.AsyncClient, system: Any
) -> None:
    a, b = await rs.customer(system), await rs.customer(system)
    email = _new_email("sita")
    r = await client.patch(
        "/api/users/profile",
        json={"email": email, "email_otp": await _email_code(api, email)},
        headers=a.auth,
    )
    assert r.status_code == 200, r.text
    # the same address, in any case, is taken for everyone else; its owner may send it again (no code)
    body = _error(
        await client.patch("/api/users/profile", json={"email": email.upper()}, headers=b.auth),
        409,
        "conflict",
    )
    assert body["error"]["context"] == {"field": "email"}
    # even with a good code for it: the conflict is found before the code is spent
    code = await _email_code(api, email)
    _error(
        await client.patch("/api/users/profile", json={"email": email, "email_otp": code}, headers=b.auth),
        409,
        "conflict",
    )
    newest = (await _codes(system, email))[-1]
    assert (newest.used_at, newest.attempts) == (None, 0)
    r = await client.patch("/api/users/profile", json={"email": email, "name": "Sita"}, headers=a.auth)
    assert r.status_code == 200, r.text
    assert (r.json()["data"]["email"], r.json()["data"]["name"]) == (email, "Sita")

    for patch, field in [
        ({"email": "not-an-email"}, "email"),
        ({"email": "a@b"}, "email"),
        ({"email": "x" * 250 + "@example.com"}, "email"),
        ({"name": "   "}, "name"),
        ({"name": "n" * 121}, "name"),
        ({"avatar_url": "ftp://example.com/a.png"}, "avatar_url"),
        ({"avatar_url": "javascript:alert(1)"}, "avatar_url"),
        ({"avatar_url": "https://example.com/" + "a" * 500}, "avatar_url"),
        ({"avatar_url": "https:///nohost.png"}, "avatar_url"),
    ]:
        r = await client.patch("/api/users/profile", json=patch, headers=b.auth)
        assert _error(r, 400, "validation_error")["error"]["context"]["field"] == field, patch
    for patch, field in [  # text PostgreSQL cannot store: 422 naming the field, before the route runs
        ({"name": "bad\x00name"}, "name"),
        ({"email": "nul\x00@example.com"}, "email"),
        ({"avatar_url": "https://example.com/\x00.png"}, "avatar_url"),
    ]:
        r = await client.patch("/api/users/profile", json=patch, headers=b.auth)
        assert _error(r, 422, "validation_error")["error"]["context"]["errors"][0]["loc"] == ["body", field]
    _error(
        await client.patch("/api/users/profile", json={"name": 5}, headers=b.auth), 422, "validation_error"
    )
    _error(await client.get("/api/users/profile"), 401, "unauthorized")
    profile = (await client.get("/api/users/profile", headers=b.auth)).json()["data"]
    assert (profile["name"], profile["email"], profile["avatar_url"]) == (None, None, None)


async def test_profile_email_change_needs_a_code_sent_to_that_address(
    api: Api, client: httpx.AsyncClient, system: Any
) -> None:
    """Pre-account hijacking: without proof, a user could claim a victim's address, and the victim's first
    login by email would land in the attacker's account."""
    attacker = await rs.customer(system)
    victim = _new_email("victim")
    body = _error(
        await client.patch(
            "/api/users/profile", json={"email": victim, "name": "Mallory"}, headers=attacker.auth
        ),
        400,
        "validation_error",
    )
    assert body["error"]["context"] == {"field": "email_otp"}
    assert "otp/request" in body["error"]["message"]
    profile = (await client.get("/api/users/profile", headers=attacker.auth)).json()["data"]
    assert (profile["email"], profile["name"]) == (None, None)  # nothing of the refused request changed
    r = await client.patch(
        "/api/users/profile", json={"email": victim, "email_otp": ""}, headers=attacker.auth
    )
    _error(r, 400, "validation_error")

    # the attacker may have a code sent to the victim (it reaches the victim only); a code the attacker
    # really received, but for another address, does not prove this one
    victim_code = await _email_code(api, victim)
    own = _new_email("mallory")
    own_code = await _email_code(api, own)
    body = _error(
        await client.patch(
            "/api/users/profile", json={"email": victim, "email_otp": own_code}, headers=attacker.auth
        ),
        401,
        "unauthorized",
    )
    assert body["error"]["message"] == "Wrong code."
    assert await _profile_email(client, attacker.auth) is None
    # the victim signs up by email later: a new account of their own
    r = await client.post("/api/auth/otp/verify", json={"identifier": victim, "otp": victim_code})
    assert r.status_code == 200, r.text
    victim_login = r.json()["data"]
    assert victim_login["is_new_user"] is True and victim_login["user"]["id"] != str(attacker.id)

    # the happy path: the code sent to the new address, once
    r = await client.patch(
        "/api/users/profile", json={"email": own, "email_otp": own_code}, headers=attacker.auth
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"]["email"] == own
    assert [c.used_at is not None for c in await _codes(system, own)] == [True]
    # logging in by that email now reaches this account
    login = await api.login(own)
    assert (login["is_new_user"], login["user"]["id"]) == (False, str(attacker.id))

    # the same email again (in any case), a name or an avatar need no code
    r = await client.patch(
        "/api/users/profile",
        json={"email": own.upper(), "name": "Mallory", "avatar_url": "https://cdn.example.com/m.png"},
        headers=attacker.auth,
    )
    assert r.status_code == 200, r.text
    assert (r.json()["data"]["email"], r.json()["data"]["name"]) == (own, "Mallory")
    # clearing needs no code (the account has a phone)
    r = await client.patch("/api/users/profile", json={"email": None}, headers=attacker.auth)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["email"] is None
    # a code proves an address once: setting it again needs a new one
    _error(
        await client.patch(
            "/api/users/profile", json={"email": own, "email_otp": own_code}, headers=attacker.auth
        ),
        401,
        "unauthorized",
    )
    r = await client.patch(
        "/api/users/profile",
        json={"email": own, "email_otp": await _email_code(api, own)},
        headers=attacker.auth,
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"]["email"] == own


async def test_profile_email_wrong_codes_count_and_lock_out(
    api: Api, client: httpx.AsyncClient, system: Any
) -> None:
    user = await rs.customer(system)
    email = _new_email("guess")
    here, elsewhere = _new_ip(), _new_ip()
    code = await _email_code(api, email, ip=here)
    max_attempts = system.settings.otp_max_attempts

    async def patch(otp: str, ip: str) -> httpx.Response:
        return await client.patch(
            "/api/users/profile",
            json={"email": email, "email_otp": otp, "name": "Guess"},
            headers={**user.auth, "X-Forwarded-For": ip},
        )

    for attempt in range(1, max_attempts + 1):
        body = _error(await patch(_wrong(code), here), 401, "unauthorized")
        assert body["error"]["context"] == {"attempts_left": max_attempts - attempt}
    # counted like login failures: the wrong tries were kept although each request failed
    assert [c.attempts for c in await _codes(system, email)] == [max_attempts]
    # this (email, IP) pair is now locked out, even with the right code
    r = await patch(code, here)
    _error(r, 423, "locked_out")
    assert int(r.headers["Retry-After"]) > 0
    # and the code is dead from anywhere
    body = _error(await patch(code, elsewhere), 401, "unauthorized")
    assert "new one" in body["error"]["message"]
    profile = (await client.get("/api/users/profile", headers=user.auth)).json()["data"]
    assert (profile["email"], profile["name"]) == (None, None)

    # a new code, from an address that is not locked out, works
    fresh = await _email_code(api, email, ip=elsewhere)
    r = await patch(fresh, elsewhere)
    assert r.status_code == 200, r.text
    assert (r.json()["data"]["email"], r.json()["data"]["name"]) == (email, "Guess")


# --- KYC ----------------------------------------------------------------------------------------------


async def test_kyc_submit_status_approve_and_download(
    client: httpx.AsyncClient, system: Any, operator_token: str
) -> None:
    user = await rs.customer(system)
    r = await client.get("/api/users/kyc/status", headers=user.auth)
    assert r.json()["data"]["status"] == "NOT_SUBMITTED"

    parts = _citizenship()
    r = await _submit(client, user, parts)
    assert r.status_code == 201, r.text
    assert r.json()["data"]["status"] == "PENDING"
    status = (await client.get("/api/users/kyc/status", headers=user.auth)).json()["data"]
    assert (status["status"], status["reason"], status["reviewed_at"]) == ("PENDING", None, None)
    assert status["submitted_at"] and status["document_type"] == "CITIZENSHIP"
    me = (await client.get("/api/auth/me", headers=user.auth)).json()["data"]
    assert me["kyc_status"] == "PENDING"

    # Only keys, hashes, sizes and detected types are in the database; the bytes are on disk.
    [submission] = await _kyc_rows(system, user.id)
    kyc_id = str(submission.id)
    docs = {d.side: d for d in submission.documents}
    assert set(docs) == {KycSide.FRONT, KycSide.BACK, KycSide.SELFIE}
    assert {c.name for c in KycDocument.__table__.columns} == {
        "id",
        "submission_id",
        "side",
        "storage_key",
        "sha256",
        "size",
        "content_type",
    }
    for side, doc in docs.items():
        sent = parts[side.value][1]
        path = _kyc_root(system) / doc.storage_key
        assert path.read_bytes() == sent
        assert doc.sha256 == hashlib.sha256(sent).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
        assert doc.size == len(sent)
        assert doc.storage_key.startswith(f"{user.id}/{kyc_id}/")
    assert (docs[KycSide.FRONT].content_type, docs[KycSide.BACK].content_type) == ("image/jpeg", "image/png")

    # A second submission while one is pending: 409.
    _error(await _submit(client, user, _citizenship()), 409, "invalid_state")

    # The operator's queue and detail.
    op = _op(operator_token)
    queue = await client.get("/api/admin/kyc?status=PENDING&page_size=100", headers=op)
    assert queue.status_code == 200, queue.text
    page = queue.json()["data"]
    assert {"results", "count", "page", "page_size"} <= set(page) and page["page_size"] == 100
    assert kyc_id in {x["id"] for x in page["results"]}
    detail = (await client.get(f"/api/admin/kyc/{kyc_id}", headers=op)).json()["data"]
    assert (detail["user_id"], detail["status"], detail["document_type"]) == (
        str(user.id),
        "PENDING",
        "CITIZENSHIP",
    )
    assert {d["side"]: (d["sha256"], d["size"]) for d in detail["documents"]} == {
        s.value: (d.sha256, d.size) for s, d in docs.items()
    }

    # Download: the exact bytes, typed as detected; every download audited.
    for side in ("front", "back", "selfie"):
        r = await client.get(f"/api/admin/kyc/{kyc_id}/files/{side}", headers=op)
        assert r.status_code == 200, r.text
        assert r.content == parts[side][1]
        assert r.headers["content-type"] == docs[KycSide(side)].content_type
        assert "attachment" in r.headers["content-disposition"]
    _error(await client.get(f"/api/admin/kyc/{kyc_id}/files/passport", headers=op), 422, "validation_error")
    _error(await client.get(f"/api/admin/kyc/{uuid.uuid4()}", headers=op), 404, "not_found")
    assert [e.action for e in await _audit(system, kyc_id)] == ["kyc.view_file"] * 3

    # Approve: the user sees it, an audit entry has before and after, reviewing again is refused.
    r = await client.post(f"/api/admin/kyc/{kyc_id}/approve", headers=op)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["status"] == "APPROVED" and r.json()["data"]["reviewed_at"]
    status = (await client.get("/api/users/kyc/status", headers=user.auth)).json()["data"]
    assert (status["status"], status["reason"]) == ("APPROVED", None) and status["reviewed_at"]
    assert (await client.get("/api/auth/me", headers=user.auth)).json()["data"]["kyc_status"] == "APPROVED"
    entry = (await _audit(system, kyc_id))[-1]
    assert entry.action == "kyc.approve" and entry.actor_role == Role.OPERATOR.value
    assert entry.before is not None and entry.after is not None
    assert (entry.before["status"], entry.after["status"]) == ("PENDING", "APPROVED")
    assert entry.after["reviewed_by"] == str(entry.actor_id) and entry.ip
    _error(await client.post(f"/api/admin/kyc/{kyc_id}/approve", headers=op), 409, "invalid_state")
    r = await client.post(f"/api/admin/kyc/{kyc_id}/reject", json={"reason": "late"}, headers=op)
    _error(r, 409, "invalid_state")
    assert len(await _audit(system, kyc_id)) == 4
    # Approved is final: no new submission.
    _error(await _submit(client, user, _citizenship()), 409, "invalid_state")


async def test_kyc_reject_with_reason_then_resubmit(
    client: httpx.AsyncClient, system: Any, operator_token: str
) -> None:
    user = await rs.customer(system)
    passport = _parts(front=("p.pdf", PDF, "application/pdf"), selfie=("s.png", PNG, "image/png"))
    r = await _submit(client, user, passport, "PASSPORT")  # a passport needs no back
    assert r.status_code == 201, r.text
    [submission] = await _kyc_rows(system, user.id)
    kyc_id = str(submission.id)
    assert {d.side: d.content_type for d in submission.documents} == {
        KycSide.FRONT: "application/pdf",
        KycSide.SELFIE: "image/png",
    }
    op = _op(operator_token)
    _error(await client.post(f"/api/admin/kyc/{kyc_id}/reject", headers=op), 422, "validation_error")
    r = await client.post(f"/api/admin/kyc/{kyc_id}/reject", json={"reason": "  "}, headers=op)
    _error(r, 422, "validation_error")
    r = await client.post(f"/api/admin/kyc/{kyc_id}/reject", json={"reason": "blurred\x00"}, headers=op)
    assert _error(r, 422, "validation_error")["error"]["context"]["errors"][0]["loc"] == ["body", "reason"]
    _error(
        await client.get(f"/api/admin/kyc/{kyc_id}/files/back", headers=op), 404, "not_found"
    )  # no back for a passport
    r = await client.post(
        f"/api/admin/kyc/{kyc_id}/reject", json={"reason": "The photo page is blurred."}, headers=op
    )
    assert r.status_code == 200, r.text
    assert (r.json()["data"]["status"], r.json()["data"]["reason"]) == (
        "REJECTED",
        "The photo page is blurred.",
    )
    status = (await client.get("/api/users/kyc/status", headers=user.auth)).json()["data"]
    assert (status["status"], status["reason"]) == ("REJECTED", "The photo page is blurred.")
    assert (await client.get("/api/auth/me", headers=user.auth)).json()["data"]["kyc_status"] == "REJECTED"
    [entry] = await _audit(system, kyc_id)
    assert entry.action == "kyc.reject" and entry.before and entry.after
    assert (entry.before["status"], entry.after["status"], entry.after["reason"]) == (
        "PENDING",
        "REJECTED",
        "The photo page is blurred.",
    )
    _error(await client.post(f"/api/admin/kyc/{kyc_id}/approve", headers=op), 409, "invalid_state")

    # Rejected → the user submits again, PENDING anew.
    r = await _submit(client, user, _citizenship())
    assert r.status_code == 201, r.text
    status = (await client.get("/api/users/kyc/status", headers=user.auth)).json()["data"]
    assert (status["status"], status["reason"], status["document_type"]) == ("PENDING", None, "CITIZENSHIP")
    assert sorted(s.status for s in await _kyc_rows(system, user.id)) == [
        KycStatus.PENDING,
        KycStatus.REJECTED,
    ]


async def test_kyc_refuses_bad_files_and_keeps_nothing(client: httpx.AsyncClient, system: Any) -> None:
    user = await rs.customer(system)
    text = b"just some text pretending to be a photo"
    cases: list[tuple[dict[str, tuple[str, bytes, str]], str, int, str]] = [
        # declared as JPEG, is not: judged by the bytes
        ({**_citizenship(), "front": ("front.jpg", text, "image/jpeg")}, "CITIZENSHIP", 400, "front"),
        ({**_citizenship(), "back": ("b.png", b"GIF89a" + PNG, "image/png")}, "CITIZENSHIP", 400, "back"),
        ({**_citizenship(), "selfie": ("s.pdf", PDF, "application/pdf")}, "CITIZENSHIP", 400, "selfie"),
        ({**_citizenship(), "front": ("empty.jpg", b"", "image/jpeg")}, "CITIZENSHIP", 400, "front"),
    ]
    for parts, document_type, status, field in cases:
        body = _error(await _submit(client, user, parts, document_type), status, "validation_error")
        assert body["error"]["context"]["field"] == field, body

    limit = system.settings.kyc_max_file_bytes
    big = JPEG + b"\x00" * (limit + 1 - len(JPEG))
    body = _error(
        await _submit(client, user, {**_citizenship(), "back": ("big.jpg", big, "image/jpeg")}),
        413,
        "file_too_large",
    )
    assert body["error"]["context"] == {"field": "back", "max_bytes": limit}
    exactly = JPEG + b"\x00" * (limit - len(JPEG))  # the limit itself is allowed (checked below)

    no_back = _parts(front=("f.jpg", JPEG, "image/jpeg"), selfie=("s.jpg", JPEG, "image/jpeg"))
    body = _error(await _submit(client, user, no_back, "DRIVING_LICENSE"), 400, "validation_error")
    assert body["error"]["context"]["missing"] == ["back"]
    _error(await _submit(client, user, _citizenship(), "LIBRARY_CARD"), 422, "validation_error")
    only_front = _parts(front=("f.jpg", JPEG, "image/jpeg"))
    _error(await _submit(client, user, only_front, "PASSPORT"), 422, "validation_error")
    _error(await client.post("/api/users/kyc", data={"document_type": "PASSPORT"}), 401, "unauthorized")

    # Nothing was recorded or written for any refused upload.
    assert await _kyc_rows(system, user.id) == []
    assert not (_kyc_root(system) / str(user.id)).exists()
    status = (await client.get("/api/users/kyc/status", headers=user.auth)).json()["data"]
    assert status["status"] == "NOT_SUBMITTED"

    r = await _submit(client, user, {**_citizenship(), "front": ("max.jpg", exactly, "image/jpeg")})
    assert r.status_code == 201, r.text


async def test_users_cannot_review_or_see_others_kyc(
    client: httpx.AsyncClient, system: Any, operator_token: str
) -> None:
    a, b = await rs.customer(system), await rs.customer(system)
    assert (await _submit(client, a, _citizenship())).status_code == 201
    [submission] = await _kyc_rows(system, a.id)
    kyc_id = submission.id
    # B's status is B's own; admin routes are for operators only.
    status = (await client.get("/api/users/kyc/status", headers=b.auth)).json()["data"]
    assert status == {
        "status": "NOT_SUBMITTED",
        "reason": None,
        "document_type": None,
        "submitted_at": None,
        "reviewed_at": None,
    }
    for method, path in [
        ("GET", "/api/admin/kyc?status=PENDING"),
        ("GET", f"/api/admin/kyc/{kyc_id}"),
        ("GET", f"/api/admin/kyc/{kyc_id}/files/front"),
        ("POST", f"/api/admin/kyc/{kyc_id}/approve"),
    ]:
        for who in (a, b):  # not even the owner fetches files back
            r = await client.request(method, path, headers=who.auth)
            _error(r, 403, "forbidden")
        _error(await client.request(method, path), 401, "unauthorized")
    r = await client.post(f"/api/admin/kyc/{kyc_id}/reject", json={"reason": "x"}, headers=b.auth)
    _error(r, 403, "forbidden")
    assert (await _kyc_rows(system, a.id))[0].status == KycStatus.PENDING
    assert await _audit(system, str(kyc_id)) == []


class _RolledBack(Exception):
    """Raised to leave a transaction without committing what the test wrote."""


async def test_kyc_required_to_rent(system: Any) -> None:
    """KYC_REQUIRED_TO_RENT: no rental row, nothing charged, until the user's KYC is APPROVED."""
    user = await rs.customer(system, 500)
    station_sn = await rs.station(system)
    pkg = await rs.package(system, price="60.00")
    strict = system.settings.model_copy(update={"kyc_required_to_rent": True})
    for kyc_status in ("NOT_SUBMITTED", "PENDING", "REJECTED"):
        async with system.services.db.transaction() as session:
            (await session.get(User, user.id)).kyc_status = kyc_status
        with pytest.raises(KycRequired) as refused:
            async with system.services.db.transaction() as session:
                await rentals.begin(
                    session, user_id=user.id, station_sn=station_sn, package_id=pkg, settings=strict
                )
        assert (refused.value.status, refused.value.code) == (403, "kyc_required")
        assert refused.value.context == {"kyc_status": kyc_status}
    async with system.services.db.transaction() as session:
        count = await session.scalar(
            select(func.count()).select_from(Rental).where(Rental.user_id == user.id)
        )
    assert count == 0 and await rs.balance(system, user) == Decimal("500")

    # Off (the default): the same user may rent without KYC.
    assert system.settings.kyc_required_to_rent is False
    with pytest.raises(_RolledBack):
        async with system.services.db.transaction() as session:
            rental = await rentals.begin(session, user_id=user.id, station_sn=station_sn, package_id=pkg)
            assert rental.status == RentalStatus.PENDING_POPUP
            raise _RolledBack
    # On, with KYC approved: allowed.
    async with system.services.db.transaction() as session:
        (await session.get(User, user.id)).kyc_status = "APPROVED"
    with pytest.raises(_RolledBack):
        async with system.services.db.transaction() as session:
            rental = await rentals.begin(
                session, user_id=user.id, station_sn=station_sn, package_id=pkg, settings=strict
            )
            assert rental.status == RentalStatus.PENDING_POPUP
            raise _RolledBack


# --- file stores --------------------------------------------------------------------------------------


async def test_local_store_round_trip_and_refuses_escaping_keys(tmp_path: Path) -> None:
    store = files.LocalFileStore(tmp_path / "root")
    await store.put("u/s/front.jpg", JPEG, content_type="image/jpeg")
    assert await files.read_all(store, "u/s/front.jpg") == JPEG
    await store.delete("u/s/front.jpg")
    await store.delete("u/s/front.jpg")  # gone already: fine
    with pytest.raises(files.MissingFile):
        await store.open("u/s/front.jpg")
    for key in ("../x", "/etc/passwd", "a//b", "a/../../b", "", ".hidden"):
        with pytest.raises(ValueError):
            await store.put(key, b"x", content_type="text/plain")


@pytest.fixture(scope="module")
def s3_endpoint() -> Any:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _s3_client(endpoint: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )


def _s3_store(endpoint: str, bucket: str) -> files.S3FileStore:
    _s3_client(endpoint).create_bucket(Bucket=bucket)
    return files.S3FileStore(
        bucket=bucket,
        endpoint_url=endpoint,
        access_key_id="test",
        secret_access_key="test",
        region="us-east-1",
        prefix="kyc/",
    )


async def test_s3_store_round_trip(s3_endpoint: str) -> None:
    bucket = f"kyc-{uuid.uuid4().hex[:8]}"
    store = _s3_store(s3_endpoint, bucket)
    big = os.urandom(3 * files.CHUNK_BYTES + 17)  # several chunks
    await store.put("u/s/front.jpg", big, content_type="image/jpeg")
    assert await files.read_all(store, "u/s/front.jpg") == big
    head = _s3_client(s3_endpoint).head_object(Bucket=bucket, Key="kyc/u/s/front.jpg")
    assert (head["ContentLength"], head["ContentType"]) == (len(big), "image/jpeg")
    await store.delete("u/s/front.jpg")
    with pytest.raises(files.MissingFile):
        await store.open("u/s/front.jpg")
    await store.delete("u/s/front.jpg")  # deleting a missing object is not an error
    with pytest.raises(ValueError):
        await store.put("../escape", b"x", content_type="text/plain")


async def test_kyc_submission_through_the_s3_store(system: Any, s3_endpoint: str) -> None:
    bucket = f"kyc-{uuid.uuid4().hex[:8]}"
    store = _s3_store(s3_endpoint, bucket)
    user = await rs.customer(system)
    uploads = {side: kyc.check_file(side, JPEG, max_bytes=len(JPEG)) for side in KycSide}
    submission = await kyc.submit(
        system.services.db,
        store,
        user_id=user.id,
        document_type=KycDocumentType.NATIONAL_ID,
        uploads=uploads,
    )
    for doc in submission.documents:
        assert await files.read_all(store, doc.storage_key) == JPEG
        assert doc.sha256 == hashlib.sha256(JPEG).hexdigest()
    # A refused second submission leaves no objects behind.
    with pytest.raises(InvalidState, match="waiting for review"):
        await kyc.submit(
            system.services.db,
            store,
            user_id=user.id,
            document_type=KycDocumentType.NATIONAL_ID,
            uploads=uploads,
        )
    listed = _s3_client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(f"kyc/{d.storage_key}" for d in submission.documents)
    async with system.services.db.transaction() as session:
        row = await session.get(User, user.id)
        assert row is not None and row.kyc_status == "PENDING"
