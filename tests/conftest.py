"""Fixtures for tests over real parts: PostgreSQL, Redis, Ray, the embedded broker and uvicorn.

Everything expensive starts once per test session (Ray costs seconds to start and stop): one fresh
database, one Redis database index, one private Ray, one system (kiosk hosts + broker on a free port)
and one HTTP server on a free port. Tests isolate themselves by using their own stations and users.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import uvicorn

ADMIN_PG = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TEST_REDIS = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def tmp_root() -> Path:
    return Path(tempfile.mkdtemp(prefix="pbtest-"))


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    name = f"pb_test_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(ADMIN_PG)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    base = ADMIN_PG.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    conn = await asyncpg.connect(ADMIN_PG)
    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await conn.close()


@pytest.fixture(scope="session")
async def redis_url() -> AsyncIterator[str]:
    from redis.asyncio import Redis

    # Claim a database index no other test session on this machine holds (sessions may run side by side).
    for index in range(1, 16):
        url = f"{TEST_REDIS}/{index}"
        client = Redis.from_url(url)
        if await client.set("pbtest:owner", str(os.getpid()), nx=True, ex=3600):
            break
        await client.aclose()
    else:
        pytest.fail("every Redis database 1-15 is held by another test session (key pbtest:owner)")
    for key in await client.keys("station:*"):
        await client.delete(key)
    yield url
    await client.flushdb()
    await client.aclose()


@pytest.fixture(scope="session")
def settings(tmp_root: Path, database_url: str, redis_url: str) -> Any:
    from config import Settings

    return Settings(
        database_url=database_url,
        redis_url=redis_url,
        ray_namespace=f"pbtest-{uuid.uuid4().hex[:8]}",
        kiosk_hosts=2,
        http_host="127.0.0.1",
        http_port=free_port(),
        mqtt_host="127.0.0.1",
        mqtt_port=free_port(),
        sms_backend=f"file:{tmp_root / 'sms.jsonl'}",
        data_dir=tmp_root / "var",
        eject_timeout_s=2.0,
        supervise_interval_s=0.5,
        pending_popup_resolve_s=20.0,
        # The whole suite logs in from 127.0.0.1: generous per-IP limits. Tests that need other client
        # addresses send X-Forwarded-For, which the server believes from 127.0.0.1 only.
        otp_per_ip_per_hour=1_000_000,
        login_max_failures_per_ip=10_000,
        trusted_proxies="127.0.0.1",
    )


@pytest.fixture(scope="session")
async def system(settings: Any) -> AsyncIterator[Any]:
    from powerbank.system import start_system

    system = await start_system(settings)
    server = uvicorn.Server(
        uvicorn.Config(
            system.app,
            host=settings.http_host,
            port=settings.http_port,
            log_level="warning",
            proxy_headers=False,  # client IPs: TRUSTED_PROXIES decides, as in `powerbank up`
        )
    )
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(20):
        while not server.started:
            assert not serving.done(), "uvicorn failed to start"
            await asyncio.sleep(0.02)
    yield system
    server.should_exit = True
    await serving
    await system.stop()


@pytest.fixture(scope="session")
def base_url(system: Any) -> str:
    return f"http://{system.settings.http_host}:{system.settings.http_port}"


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as c:
        yield c


class Api:
    """Small helpers over the real HTTP API: log in with the code the SMS backend wrote."""

    def __init__(self, client: httpx.AsyncClient, sms_file: Path) -> None:
        self.client = client
        self.sms_file = sms_file

    def last_code(self, phone: str) -> str:
        """The newest one-time code sent to `phone` (other SMS, e.g. notifications, are skipped)."""
        lines = [json.loads(line) for line in self.sms_file.read_text().splitlines()]
        codes = (re.search(r"code is (\d{6})", m["text"]) for m in reversed(lines) if m["to"] == phone)
        return next(code.group(1) for code in codes if code)

    async def login(self, phone: str, *, password: str | None = None) -> dict[str, Any]:
        """By one-time code; staff add their password (the second factor)."""
        r = await self.client.post("/api/auth/otp/request", json={"identifier": phone})
        assert r.status_code == 200, r.text
        body = {"identifier": phone, "otp": self.last_code(phone)} | (
            {"password": password} if password else {}
        )
        r = await self.client.post("/api/auth/otp/verify", json=body)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()["data"]
        return data

    @staticmethod
    def auth(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api(client: httpx.AsyncClient, settings: Any) -> Api:
    return Api(client, Path(settings.sms_backend[len("file:") :]))


_phone_counter = iter(range(1, 10_000_000))  # never +9779800000000: a profile test expects it free


def new_phone() -> str:
    """A fresh valid Nepali mobile number per call (98XXXXXXXX)."""
    return f"+97798{next(_phone_counter) + os.getpid() % 50 * 100_000:08d}"


STAFF_PASSWORD = "correct horse battery staple"


async def staff_login(system: Any, api: Api, role: str = "operator") -> dict[str, Any]:
    """A new operator (or admin) with a password, logged in by code + password: the login data."""
    from domain import passwords, users
    from storage.models import Role

    phone = new_phone()
    async with system.services.db.transaction() as session:
        user = await users.ensure_staff(session, phone=phone, role=Role(role))
        passwords.set_password(user, STAFF_PASSWORD, min_length=system.settings.admin_password_min_length)
    return await api.login(phone, password=STAFF_PASSWORD)


@pytest.fixture
async def operator_token(system: Any, api: Api) -> str:
    token: str = (await staff_login(system, api))["access"]
    return token
