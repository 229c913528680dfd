"""Eject latency end to end: POST /api/rentals/start → cabinet ejects → 201, simulator answering at once.

Starts the whole system (PostgreSQL/Redis from TEST_POSTGRES_URL/TEST_REDIS_URL as the tests do, a
private Ray, the broker on a free port, uvicorn), N simulated cabinets, then runs R sequential rentals,
each returned right after into another cabinet. Prints p50/p90/p99 of the API call and of the kiosk's own
command→reply time (powerbank_eject_seconds).

Run: `.venv/bin/python benchmarks/eject_latency.py --rentals 200`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import httpx
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from config import Settings
from domain import passwords, users
from powerbank.system import start_system
from simulators.cabinet import CabinetCredentials, SimulatedCabinet, random_banks
from storage.models import Role

STAFF_PASSWORD = "benchmark staff password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def main(rentals: int, cabinets: int, pg: str, redis_url: str) -> None:
    name = f"pb_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    tmp = Path(tempfile.mkdtemp(prefix="pbbench-"))
    settings = Settings(
        database_url=f"{pg.rsplit('/', 1)[0]}/{name}",
        redis_url=redis_url,
        ray_namespace=f"bench-{name}",
        http_port=free_port(),
        mqtt_port=free_port(),
        sms_backend=f"file:{tmp / 'sms.jsonl'}",
        data_dir=tmp,
        log_level="WARNING",
    )
    system = await start_system(settings)
    server = uvicorn.Server(uvicorn.Config(system.app, port=settings.http_port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn offers only a flag)
        await asyncio.sleep(0.05)
    base = f"http://127.0.0.1:{settings.http_port}"
    sms = tmp / "sms.jsonl"
    fleet: list[SimulatedCabinet] = []
    try:
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:

            async def login(phone: str, password: str | None = None) -> dict[str, str]:
                await client.post("/api/auth/otp/request", json={"identifier": phone})
                code = json.loads(sms.read_text().splitlines()[-1])["text"].split()[4].rstrip(".")
                body = {"identifier": phone, "otp": code} | ({"password": password} if password else {})
                r = await client.post("/api/auth/otp/verify", json=body)
                data = r.json()["data"]
                return {"token": data["access"], "id": data["user"]["id"]}

            async with system.services.db.transaction() as session:
                staff = await users.ensure_staff(session, phone="+9779800000001", role=Role.OPERATOR)
                passwords.set_password(staff, STAFF_PASSWORD, min_length=settings.admin_password_min_length)
            op = await login("+9779800000001", STAFF_PASSWORD)
            auth_op = {"Authorization": f"Bearer {op['token']}"}
            rng, taken = random.Random(1), set[str]()
            for i in range(cabinets):
                sn = f"BENCH{i:04d}{uuid.uuid4().hex[:4]}"
                body = {
                    "serial_number": sn,
                    "name": sn,
                    "latitude": 27.7,
                    "longitude": 85.3,
                    "holes_per_board": 8,
                }
                mqtt = (await client.post("/api/admin/stations", json=body, headers=auth_op)).json()["data"][
                    "mqtt"
                ]
                creds = CabinetCredentials(
                    sn=sn, host=mqtt["host"], port=mqtt["port"], username=sn, password=mqtt["password"]
                )
                banks = random_banks(rng, hole_count=8, fill=0.5, taken=taken)
                fleet.append(SimulatedCabinet(creds, boards=1, holes_per_board=8, banks=banks))
            await asyncio.gather(*(c.start() for c in fleet))
            user = await login("+9779811111111")
            auth = {"Authorization": f"Bearer {user['token']}"}
            await client.post(
                f"/api/admin/users/{user['id']}/wallet/credit",
                json={"amount": "1000000", "reason": "bench"},
                headers={**auth_op, "Idempotency-Key": f"bench-{uuid.uuid4()}"},
            )
            while True:  # every cabinet ready
                live = [
                    (await client.get(f"/api/stations/{c.sn}", headers=auth)).json()["data"] for c in fleet
                ]
                if all(s["available_power_banks"] > 0 for s in live):
                    break
                await asyncio.sleep(0.1)
            api_seconds: list[float] = []
            for i in range(rentals):
                cabinet = fleet[i % len(fleet)]
                started = time.perf_counter()
                r = await client.post(
                    "/api/rentals/start", json={"station_sn": cabinet.sn, "package_id": 1}, headers=auth
                )
                api_seconds.append(time.perf_counter() - started)
                assert r.status_code == 201, r.text
                rental = r.json()["data"]
                await fleet[(i + 1) % len(fleet)].return_powerbank(rental["powerbank_sn"])
                while (await client.get("/api/rentals/active", headers=auth)).json()["data"] is not None:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)  # the return is handled asynchronously by the kiosk actor
                if (i + 1) % 50 == 0:
                    print(f"  {i + 1}/{rentals} rentals")
            text = (await client.get("/metrics")).text
    finally:
        for cabinet in fleet:
            await cabinet.stop()
        server.should_exit = True
        await serving
        await system.stop()
        admin = await asyncpg.connect(pg)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    ms = [s * 1000 for s in api_seconds]
    print(f"rentals: {rentals} over {cabinets} cabinets (sequential, simulator answers at once)")
    print(
        f"POST /api/rentals/start → 201: p50 {percentile(ms, 50):.1f} ms, p90 {percentile(ms, 90):.1f} ms, "
        f"p99 {percentile(ms, 99):.1f} ms, mean {statistics.mean(ms):.1f} ms"
    )
    for family in text_string_to_metric_families(text):
        if family.name == "powerbank_eject_seconds":
            buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
            buckets = [b for b in buckets if b[0] != float("inf")] + [
                (float("inf"), max(v for _, v in buckets))
            ]
            total = max(v for _, v in buckets)
            for p in (50, 99):
                le = next(le for le, v in sorted(buckets) if v >= total * p / 100)
                print(f"kiosk command→0x31 (histogram): p{p} ≤ {le * 1000:.0f} ms ({int(total)} ejects)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rentals", type=int, default=200)
    parser.add_argument("--cabinets", type=int, default=4)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/13")
    args = parser.parse_args()
    asyncio.run(main(args.rentals, args.cabinets, args.pg, args.redis))
