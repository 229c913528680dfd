"""Hardened login and tokens over the real system: one-time codes (hashed, expiry, attempts, resend
cooldown, hourly limits), lock-out per (identifier, IP) and per IP, E.164 normalisation, the Sparrow SMS
client against a fake of its API, refresh rotation with families, logout, and token verification
(algorithm pinning, key rotation by `kid`)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, update
from starlette.requests import Request

from api.deps import Services, client_ip
from api.main import create_app
from benchmarks import bruteforce_otp
from config import Settings
from domain import auth
from domain.sms import SmsBackend, sms_backend
from storage.models import OneTimeCode, Role, User
from tests.conftest import STAFF_PASSWORD, Api, free_port, new_phone
from tests.fakes.server import serve
from tests.fakes.sparrow import FakeSparrow
from tests.support import metric, overridden

pytestmark = pytest.mark.integration

_ips = itertools.count(1)
RUN = secrets.randbelow(200) + 20  # second octet: addresses unique per test session


def new_ip() -> str:
    n = next(_ips)
    return f"10.{RUN}.{n // 250 % 250}.{n % 250 + 1}"


def via(ip: str) -> dict[str, str]:
    return {"X-Forwarded-For": ip}


async def ask(client: httpx.AsyncClient, identifier: str, ip: str) -> httpx.Response:
    return await client.post("/api/auth/otp/request", json={"identifier": identifier}, headers=via(ip))


async def verify(client: httpx.AsyncClient, identifier: str, code: str, ip: str) -> httpx.Response:
    return await client.post(
        "/api/auth/otp/verify", json={"identifier": identifier, "otp": code}, headers=via(ip)
    )


def wrong(code: str) -> str:
    return f"{(int(code) + 1) % 10**6:06d}"


@asynccontextmanager
async def local_api(
    system: Any, *, sms: SmsBackend | None = None, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """The real app over the session's database and Redis, with other settings (the peer is 127.0.0.1,
    a trusted proxy, so X-Forwarded-For picks the client address)."""
    settings = system.settings.model_copy(update={"trusted_proxies": "127.0.0.1", **overrides})
    svc = system.services
    app = create_app(
        Services(settings=settings, db=svc.db, redis=svc.redis, fleet=svc.fleet, sms=sms or svc.sms)
    )
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        yield client


async def codes_of(system: Any, identifier: str) -> list[OneTimeCode]:
    async with system.services.db.transaction() as session:
        rows = await session.scalars(select(OneTimeCode).where(OneTimeCode.identifier == identifier))
        return list(rows)


# --- one-time codes ---------------------------------------------------------------------------------


async def test_codes_are_stored_hashed_never_in_plain(
    client: httpx.AsyncClient, api: Api, system: Any
) -> None:
    phone, ip = new_phone(), new_ip()
    assert (await ask(client, phone, ip)).status_code == 200
    code = api.last_code(phone)
    [row] = await codes_of(system, phone)
    assert code not in row.code_hash and len(row.code_hash) == 64
    pepper = auth.derived_secret(system.settings, "otp pepper").encode()
    assert row.code_hash == hmac.new(pepper, f"{phone}:{code}".encode(), hashlib.sha256).hexdigest()
    assert (row.expires_at - row.created_at) == timedelta(seconds=system.settings.otp_ttl_s)


async def test_an_expired_code_is_refused(client: httpx.AsyncClient, api: Api, system: Any) -> None:
    phone, ip = new_phone(), new_ip()
    assert (await ask(client, phone, ip)).status_code == 200
    async with system.services.db.transaction() as session:
        await session.execute(
            update(OneTimeCode)
            .where(OneTimeCode.identifier == phone)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    r = await verify(client, phone, api.last_code(phone), ip)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    # An expired code does not hold the next one back.
    assert (await ask(client, phone, ip)).status_code == 200
    assert (await verify(client, phone, api.last_code(phone), ip)).status_code == 200


async def test_a_code_dies_after_five_wrong_tries_from_anywhere(client: httpx.AsyncClient, api: Api) -> None:
    phone = new_phone()
    assert (await ask(client, phone, new_ip())).status_code == 200
    code = api.last_code(phone)
    for left in (4, 3, 2, 1, 0):  # five different addresses: no lock-out, but the code counts every try
        r = await verify(client, phone, wrong(code), new_ip())
        assert r.status_code == 401 and r.json()["error"]["context"]["attempts_left"] == left
    r = await verify(client, phone, code, new_ip())
    assert r.status_code == 401 and "new one" in r.json()["error"]["message"]
    # A dead code does not hold the next one back: the real user asks again at once and logs in.
    ip = new_ip()
    assert (await ask(client, phone, ip)).status_code == 200
    assert (await verify(client, phone, api.last_code(phone), ip)).status_code == 200


async def test_resend_cooldown_with_retry_after(client: httpx.AsyncClient, api: Api, system: Any) -> None:
    phone, ip = new_phone(), new_ip()
    assert (await ask(client, phone, ip)).status_code == 200
    r = await ask(client, phone, new_ip())
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(r.headers["retry-after"]) <= system.settings.otp_resend_interval_s
    assert len(await codes_of(system, phone)) == 1
    # Once the code is used, a new login (another device) may ask at once.
    assert (await verify(client, phone, api.last_code(phone), ip)).status_code == 200
    assert (await ask(client, phone, ip)).status_code == 200


async def test_codes_per_identifier_per_hour(system: Any) -> None:
    async with local_api(system, otp_per_identifier_per_hour=3, otp_resend_interval_s=0) as client:
        phone = new_phone()
        for _ in range(3):
            assert (await ask(client, phone, new_ip())).status_code == 200
        r = await ask(client, phone, new_ip())
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 3500 <= int(r.headers["retry-after"]) <= 3600
        assert (await ask(client, new_phone(), new_ip())).status_code == 200  # others are not affected


async def test_code_requests_per_ip_per_hour(system: Any) -> None:
    async with local_api(system, otp_per_ip_per_hour=3) as client:
        crowded, other = new_ip(), new_ip()
        for _ in range(3):
            assert (await ask(client, new_phone(), crowded)).status_code == 200
        r = await ask(client, new_phone(), crowded)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 3500 <= int(r.headers["retry-after"]) <= 3600
        assert (await ask(client, new_phone(), other)).status_code == 200


async def test_phone_numbers_are_normalised_to_e164(system: Any, api: Api) -> None:
    local = f"{secrets.choice((980, 981, 982, 984, 985, 986))}{secrets.randbelow(10**7):07d}"  # valid ranges
    forms = [
        local,
        f"+977{local}",
        f"+977-{local[:3]}-{local[3:6]}-{local[6:]}",
        f"00977{local}",
        f"{local[:2]} {local[2:6]} {local[6:]}",
    ]
    async with local_api(system, otp_resend_interval_s=0, otp_per_identifier_per_hour=20) as client:
        user_ids = set()
        for asked, verified in zip(forms, forms[1:] + forms[:1], strict=True):
            ip = new_ip()
            assert (await ask(client, asked, ip)).status_code == 200
            r = await verify(client, verified, api.last_code(f"+977{local}"), ip)
            assert r.status_code == 200, r.text
            assert r.json()["data"]["user"]["phone"] == f"+977{local}"
            user_ids.add(r.json()["data"]["user"]["id"])
        assert len(user_ids) == 1
        for bad in ("12345", "+15555550123", "abc", "0981234567", "a@b", "no one@example.com"):
            for r in (await ask(client, bad, new_ip()), await verify(client, bad, "123456", new_ip())):
                assert r.status_code == 400, (bad, r.text)
                assert r.json()["error"]["code"] == "validation_error"


# --- lock-out ---------------------------------------------------------------------------------------


async def test_lockout_of_a_pair_never_locks_the_real_user(
    client: httpx.AsyncClient, api: Api, system: Any
) -> None:
    phone, attacker, owner = new_phone(), new_ip(), new_ip()
    before = await metric(client, "powerbank_logins_locked_out_total")
    assert (await ask(client, phone, owner)).status_code == 200
    code = api.last_code(phone)
    for _ in range(system.settings.otp_max_attempts):
        assert (await verify(client, phone, wrong(code), attacker)).status_code == 401
    r = await verify(client, phone, code, attacker)  # even the right code: the pair is locked
    assert r.status_code == 423 and r.json()["error"]["code"] == "locked_out"
    assert system.settings.lockout_s - 5 <= int(r.headers["retry-after"]) <= system.settings.lockout_s
    assert await metric(client, "powerbank_logins_locked_out_total") >= before + 1
    # The owner, from their own address: the burnt code is refused (not locked), a new one works.
    assert (await verify(client, phone, code, owner)).status_code == 401
    assert (await ask(client, phone, owner)).status_code == 200
    assert (await verify(client, phone, api.last_code(phone), owner)).status_code == 200
    assert (await verify(client, phone, "000000", attacker)).status_code == 423  # still locked there


async def test_a_good_login_clears_the_pairs_failures(client: httpx.AsyncClient, api: Api) -> None:
    phone, ip = new_phone(), new_ip()
    for _ in range(2):  # 3 + 3 failures with a login between: never 5 in a row, never locked
        assert (await ask(client, phone, ip)).status_code == 200
        code = api.last_code(phone)
        for _ in range(3):
            assert (await verify(client, phone, wrong(code), ip)).status_code == 401
        assert (await verify(client, phone, code, ip)).status_code == 200


async def test_ip_lockout_over_many_identifiers(system: Any, client: httpx.AsyncClient) -> None:
    async with local_api(system, login_max_failures_per_ip=4) as local:
        ip, other = new_ip(), new_ip()
        for _ in range(4):
            assert (await verify(local, new_phone(), "123456", ip)).status_code == 401
        r = await verify(local, new_phone(), "123456", ip)
        assert r.status_code == 423 and int(r.headers["retry-after"]) > 0
        assert (await verify(local, new_phone(), "123456", other)).status_code == 401


def test_client_ip_believes_forwarded_for_only_from_trusted_proxies() -> None:
    def ip(peer: str, forwarded: str | None, trusted: str) -> str:
        headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded is not None else []
        request = Request({"type": "http", "client": (peer, 40000), "headers": headers})
        return client_ip(request, Settings(trusted_proxies=trusted))

    assert ip("203.0.113.7", "198.51.100.1", "") == "203.0.113.7"
    assert ip("203.0.113.7", "198.51.100.1", "10.0.0.0/8") == "203.0.113.7"
    assert ip("10.0.0.2", "6.6.6.6, 198.51.100.1", "10.0.0.0/8") == "198.51.100.1"  # left part is spoofed
    assert ip("10.0.0.2", "198.51.100.1, 10.0.0.9", "10.0.0.0/8, 127.0.0.1") == "198.51.100.1"
    assert ip("10.0.0.2", "not-an-ip", "10.0.0.0/8") == "10.0.0.2"
    assert ip("10.0.0.2", None, "10.0.0.0/8") == "10.0.0.2"
    assert ip("::1", "2001:db8::5", "::1") == "2001:db8::5"


async def test_bruteforce_script_against_the_system(system: Any, api: Api, client: httpx.AsyncClient) -> None:
    """benchmarks/bruteforce_otp.py's logic, 1,000 wrong codes per attack, production limits."""
    defaults = Settings()
    overrides = {
        name: getattr(defaults, name)
        for name in ("otp_max_attempts", "login_max_failures_per_ip", "lockout_s", "otp_per_ip_per_hour")
    }
    settings = system.settings.model_copy(update={**overrides, "trusted_proxies": "127.0.0.1"})
    svc = system.services
    app = create_app(Services(settings=settings, db=svc.db, redis=svc.redis, fleet=svc.fleet, sms=svc.sms))
    before = await metric(client, "powerbank_logins_locked_out_total")
    started = time.perf_counter()
    async with serve(app) as url:
        report = await bruteforce_otp.run(url, attempts=1000, code_for=api.last_code, forwarded=True)
    took = time.perf_counter() - started
    print(f"\n{bruteforce_otp.describe(report)}\n  total {took:.1f} s")
    a, b = report.one_identifier, report.many_identifiers
    assert a.statuses == {401: 5, 423: 995} and a.lock_at_request == 6
    assert b.statuses == {401: 20, 423: 980} and b.lock_at_request == 21
    assert report.victim_logged_in, report.victim
    assert await metric(client, "powerbank_logins_locked_out_total") >= before + 2


# --- SMS through Sparrow ----------------------------------------------------------------------------


@pytest.fixture
async def sparrow() -> AsyncIterator[FakeSparrow]:
    fake = FakeSparrow()
    async with serve(fake.app()) as url:
        fake.base_url = url
        yield fake


def sparrow_backend(system: Any, base_url: str, fake: FakeSparrow) -> SmsBackend:
    settings = system.settings.model_copy(
        update={"sparrow_base_url": base_url, "sparrow_token": fake.token, "sparrow_from": fake.sender}
    )
    return sms_backend("sparrow", settings)


async def test_sparrow_sends_the_code(system: Any, sparrow: FakeSparrow) -> None:
    async with local_api(system, sms=sparrow_backend(system, sparrow.api_url, sparrow)) as client:
        phone, ip = new_phone(), new_ip()
        assert (await ask(client, phone, ip)).status_code == 200
        [sent] = sparrow.messages
        assert sent["to"] == phone.removeprefix("+977") and len(sent["to"]) == 10
        assert sent["token"] == sparrow.token and sent["from"] == sparrow.sender
        code = sent["text"].split("code is ")[1][:6]
        assert (await verify(client, phone, code, ip)).status_code == 200


async def test_sparrow_failure_is_a_clear_503(system: Any, sparrow: FakeSparrow) -> None:
    sparrow.fail_with = (403, {"response_code": 1013, "response": "Insufficient Credits"})
    backend = sparrow_backend(system, sparrow.api_url, sparrow)
    async with local_api(system, sms=backend, otp_per_identifier_per_hour=1) as client:
        phone = new_phone()
        r = await ask(client, phone, new_ip())
        assert r.status_code == 503 and r.json()["error"]["code"] == "sms_unavailable"
        assert await codes_of(system, phone) == []  # nothing kept: no cooldown, no hourly budget spent
        sparrow.fail_with = None
        assert (await ask(client, phone, new_ip())).status_code == 200
        assert len(sparrow.messages) == 1
    wrong_token = FakeSparrow(token="revoked", base_url=sparrow.base_url)
    async with local_api(system, sms=sparrow_backend(system, sparrow.api_url, wrong_token)) as client:
        r = await ask(client, new_phone(), new_ip())
        assert r.status_code == 503 and r.json()["error"]["code"] == "sms_unavailable"
    nobody = f"http://127.0.0.1:{free_port()}/v2"
    async with local_api(system, sms=sparrow_backend(system, nobody, sparrow)) as client:
        r = await ask(client, new_phone(), new_ip())
        assert r.status_code == 503 and r.json()["error"]["code"] == "sms_unavailable"


# --- tokens -----------------------------------------------------------------------------------------


async def me(client: httpx.AsyncClient, access: str) -> int:
    return (await client.get("/api/auth/me", headers=Api.auth(access))).status_code


async def refresh(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/api/auth/refresh", json={"refresh": token})


async def grace_over(system: Any, refresh_token: str) -> None:
    """Wait until the grace period of a used refresh token has passed (its kept answer expired in Redis)."""
    jti = jwt.decode(refresh_token, options={"verify_signature": False})["jti"]
    async with asyncio.timeout(10):
        while await system.services.redis.exists(f"auth:refresh:answer:{jti}"):  # noqa: ASYNC110 (an expiry)
            await asyncio.sleep(0.05)


@pytest.fixture
def short_grace(system: Any) -> Iterator[None]:
    with overridden(system.services.settings, refresh_reuse_grace_s=1):
        yield


async def test_a_refresh_retried_within_the_grace_period_gets_the_same_pair(
    client: httpx.AsyncClient, api: Api
) -> None:
    """Issue 10, item 9: a retry after a lost response (flaky mobile network) used to log the user out."""
    login = await api.login(new_phone())
    first = await refresh(client, login["refresh"])
    retried = await refresh(client, login["refresh"])  # the app never saw the first answer
    assert first.status_code == retried.status_code == 200, retried.text
    assert retried.json()["data"]["access"] == first.json()["data"]["access"]
    assert retried.json()["data"]["refresh"] == first.json()["data"]["refresh"]
    assert await me(client, first.json()["data"]["access"]) == 200  # the family lives on
    nxt = await refresh(client, first.json()["data"]["refresh"])
    assert nxt.status_code == 200 and await me(client, nxt.json()["data"]["access"]) == 200


async def test_refresh_rotates_and_reuse_revokes_the_family(
    client: httpx.AsyncClient, api: Api, system: Any, short_grace: None
) -> None:
    phone = new_phone()
    login = await api.login(phone)
    other_session = await api.login(phone)  # a second device: another family
    r = await refresh(client, login["refresh"])
    assert r.status_code == 200
    rotated = r.json()["data"]
    assert await me(client, rotated["access"]) == 200
    assert (
        jwt.decode(rotated["refresh"], options={"verify_signature": False})["fam"]
        == jwt.decode(login["refresh"], options={"verify_signature": False})["fam"]
    )

    await grace_over(system, login["refresh"])
    reused = await refresh(client, login["refresh"])  # the old one again: stolen, or the thief's copy
    assert reused.status_code == 401 and reused.json()["error"]["code"] == "unauthorized"
    assert (await refresh(client, rotated["refresh"])).status_code == 401  # the whole family is dead
    assert await me(client, rotated["access"]) == 401
    assert await me(client, login["access"]) == 401
    assert await me(client, other_session["access"]) == 200  # the other device is untouched
    assert (await refresh(client, other_session["refresh"])).status_code == 200


async def test_logout_revokes_the_family_idempotently(client: httpx.AsyncClient, api: Api) -> None:
    login = await api.login(new_phone())
    for _ in range(2):
        r = await client.post("/api/auth/logout", json={"refresh": login["refresh"]})
        assert r.status_code == 200 and r.json()["data"] == {"logged_out": True}
    assert await me(client, login["access"]) == 401
    assert (await refresh(client, login["refresh"])).status_code == 401
    r = await client.post("/api/auth/logout", json={"refresh": login["access"]})  # not a refresh token
    assert r.status_code == 401


async def test_an_inactive_user_cannot_log_in_or_call(
    client: httpx.AsyncClient, api: Api, system: Any
) -> None:
    phone = new_phone()
    login = await api.login(phone)
    async with system.services.db.transaction() as session:
        await session.execute(update(User).where(User.id == login["user"]["id"]).values(is_active=False))
    assert await me(client, login["access"]) == 403
    assert (await refresh(client, login["refresh"])).status_code == 403
    ip = new_ip()
    assert (await ask(client, phone, ip)).status_code == 200
    r = await verify(client, phone, api.last_code(phone), ip)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


async def test_forged_and_expired_tokens_are_refused(
    client: httpx.AsyncClient, api: Api, system: Any
) -> None:
    login = await api.login(new_phone())
    claims = jwt.decode(login["access"], options={"verify_signature": False})
    assert jwt.get_unverified_header(login["access"]) == {"alg": "HS256", "typ": "JWT", "kid": "default"}
    key = auth.keyring(system.settings).keys["default"]
    now = int(time.time())

    def signed(
        payload: dict[str, Any], *, secret: str = key, alg: str = "HS256", kid: str = "default"
    ) -> str:
        return jwt.encode(payload, secret, algorithm=alg, headers={"kid": kid})

    assert await me(client, signed(claims)) == 200  # the crafting itself is right
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    head, body, signature = login["access"].split(".")
    forged = {
        "alg none": f"{b64({'alg': 'none', 'typ': 'JWT', 'kid': 'default'})}.{body}.",
        "alg none, no signature part": f"{b64({'alg': 'none', 'typ': 'JWT'})}.{body}",
        "tampered role": f"{head}.{b64({**claims, 'role': 'admin'})}.{signature}",
        "wrong key": signed(claims, secret=secrets.token_urlsafe(48)),
        "unknown kid": signed(claims, kid="elsewhere"),
        "HS512 with the real key": signed(claims, alg="HS512"),
        "RS256": jwt.encode(claims, rsa_key, algorithm="RS256", headers={"kid": "default"}),
        "expired": signed({**claims, "iat": now - 3600, "exp": now - 1}),
        "refresh used as access": login["refresh"],
        "no family": signed({k: v for k, v in claims.items() if k != "fam"}),
        "garbage": "not.a.token",
    }
    for name, token in forged.items():
        r = await client.get("/api/auth/me", headers=Api.auth(token))
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", name
    assert (await refresh(client, login["access"])).status_code == 401  # access used as refresh
    expired_refresh = signed(
        {**jwt.decode(login["refresh"], options={"verify_signature": False}), "exp": now - 1}
    )
    assert (await refresh(client, expired_refresh)).status_code == 401


async def test_keys_rotate_by_kid(system: Any, api: Api) -> None:
    old, new = f"k1:{secrets.token_urlsafe(40)}", f"k2:{secrets.token_urlsafe(40)}"

    async def login(client: httpx.AsyncClient) -> dict[str, Any]:
        phone, ip = new_phone(), new_ip()
        assert (await ask(client, phone, ip)).status_code == 200
        r = await verify(client, phone, api.last_code(phone), ip)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()["data"]
        return data

    async with local_api(system, jwt_keys=old) as client:
        before = await login(client)
        assert jwt.get_unverified_header(before["access"])["kid"] == "k1"
        assert await me(client, before["access"]) == 200
    async with local_api(system, jwt_keys=f"{new},{old}") as client:  # k2 signs, k1 still verifies
        assert await me(client, before["access"]) == 200
        during = await login(client)
        assert jwt.get_unverified_header(during["access"])["kid"] == "k2"
        r = await refresh(client, before["refresh"])
        assert r.status_code == 200 and jwt.get_unverified_header(r.json()["data"]["access"])["kid"] == "k2"
    async with local_api(system, jwt_keys=new) as client:  # k1 removed
        assert await me(client, before["access"]) == 401
        assert await me(client, during["access"]) == 200
    async with local_api(system) as client:  # the default key knows neither
        assert await me(client, during["access"]) == 401


# --- staff second factor (issue 10, item 5) ---------------------------------------------------------------


async def staff_with_password(system: Any, role: Role = Role.OPERATOR) -> str:
    from domain import passwords, users

    phone = new_phone()
    async with system.services.db.transaction() as session:
        user = await users.ensure_staff(session, phone=phone, role=role)
        passwords.set_password(user, STAFF_PASSWORD, min_length=system.settings.admin_password_min_length)
    return phone


async def staff_verify(
    client: httpx.AsyncClient, api: Api, phone: str, ip: str, **factor: str
) -> httpx.Response:
    assert (await ask(client, phone, ip)).status_code == 200
    body = {"identifier": phone, "otp": api.last_code(phone), **factor}
    return await client.post("/api/auth/otp/verify", json=body, headers=via(ip))


def refresh_lifetime(login: httpx.Response) -> int:
    claims = jwt.decode(login.json()["data"]["refresh"], options={"verify_signature": False})
    return int(claims["exp"] - claims["iat"])


async def test_staff_need_their_password_besides_the_code(
    client: httpx.AsyncClient, api: Api, system: Any
) -> None:
    """An SMS code alone gave an operator a 30-day token that credits wallets and ejects holes."""
    phone, ip = await staff_with_password(system), new_ip()
    r = await staff_verify(client, api, phone, ip)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "second_factor_required"
    assert r.json()["error"]["context"] == {"factor": "password"}
    r = await staff_verify(client, api, phone, ip, password="not the password")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = await staff_verify(client, api, phone, ip, password=STAFF_PASSWORD)
    assert r.status_code == 200, r.text
    assert refresh_lifetime(r) == system.settings.jwt_staff_refresh_ttl_s < system.settings.jwt_refresh_ttl_s
    rider = await staff_verify(client, api, new_phone(), new_ip())  # riders: the code alone, as before
    assert rider.status_code == 200 and refresh_lifetime(rider) == system.settings.jwt_refresh_ttl_s


async def test_wrong_passwords_count_towards_the_lock_out(
    client: httpx.AsyncClient, api: Api, system: Any
) -> None:
    phone, ip = await staff_with_password(system), new_ip()
    # each try spends its code: more codes per hour than the default 5
    with overridden(system.services.settings, otp_per_identifier_per_hour=100):
        for _ in range(system.settings.otp_max_attempts):
            r = await staff_verify(client, api, phone, ip, password="guess")
            assert r.status_code == 401, r.text
        r = await staff_verify(client, api, phone, ip, password=STAFF_PASSWORD)
    assert r.status_code == 423 and r.json()["error"]["code"] == "locked_out", r.text


async def test_after_totp_enrolment_staff_log_in_with_totp(
    client: httpx.AsyncClient, api: Api, system: Any
) -> None:
    import pyotp

    phone, ip = await staff_with_password(system, Role.ADMIN), new_ip()
    token = (await staff_verify(client, api, phone, ip, password=STAFF_PASSWORD)).json()["data"]["access"]
    enrol = await client.post("/api/auth/totp/enroll", headers=Api.auth(token))
    assert enrol.status_code == 200, enrol.text
    secret = enrol.json()["data"]["secret"]
    assert enrol.json()["data"]["otpauth_uri"].startswith("otpauth://totp/")
    wrong_code = f"{(int(pyotp.TOTP(secret).now()) + 1) % 10**6:06d}"
    bad = await client.post("/api/auth/totp/confirm", json={"totp": wrong_code}, headers=Api.auth(token))
    assert bad.status_code == 401
    ok = await client.post(
        "/api/auth/totp/confirm", json={"totp": pyotp.TOTP(secret).now()}, headers=Api.auth(token)
    )
    assert ok.status_code == 200, ok.text

    r = await staff_verify(client, api, phone, ip, password=STAFF_PASSWORD)  # the password no longer does
    assert r.status_code == 401 and r.json()["error"]["context"] == {"factor": "totp"}
    r = await staff_verify(client, api, phone, ip, totp=pyotp.TOTP(secret).now())
    assert r.status_code == 200, r.text

    rider = (await api.login(new_phone()))["access"]
    assert (await client.post("/api/auth/totp/enroll", headers=Api.auth(rider))).status_code == 403
