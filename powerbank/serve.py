"""What `powerbank up`, `migrate` and `admin create` run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import uvicorn
from rich.console import Console

from config import Settings
from domain import passwords, stations, users
from domain.errors import NotFound
from domain.payments import gateways
from powerbank.system import System, start_system
from simulators.fleet import save_credentials
from storage.db import Database
from storage.embedded import EmbeddedServices
from storage.migrate import upgrade
from storage.models import Role

log = logging.getLogger(__name__)
console = Console()

DEMO_STATIONS = [
    ("KTM-THAMEL-01", "Thamel Chowk", "Thamel Marg, Kathmandu", 27.7154, 85.3123),
    ("KTM-DURBAR-01", "Durbar Marg", "Durbar Marg, Kathmandu", 27.7120, 85.3180),
    ("LTP-PATAN-01", "Patan Durbar Square", "Mangal Bazar, Lalitpur", 27.6727, 85.3250),
]


def database_url(settings: Settings) -> tuple[str, EmbeddedServices | None]:
    """DATABASE_URL, or the embedded PostgreSQL under DATA_DIR (started, or joined if `up` runs)."""
    if settings.database_url:
        return settings.database_url, None
    embedded = EmbeddedServices(settings.data_dir)
    return embedded.start_postgres(), embedded


async def create_staff(settings: Settings, *, phone: str, role: str, password: str | None = None) -> str:
    """The operator or admin (created or promoted), with their /admin password when one is given."""
    url, embedded = await asyncio.to_thread(database_url, settings)
    await asyncio.to_thread(upgrade, url)
    db = Database(url)
    try:
        async with db.transaction() as session:
            user = await users.ensure_staff(session, phone=phone, role=Role(role))
            if password is not None:
                passwords.set_password(user, password, min_length=settings.admin_password_min_length)
            return f"{user.phone} (id {user.id})"
    finally:
        await db.dispose()
        del embedded


async def provision_demo(system: System) -> list[Any]:
    """Three Kathmandu stations with simulated cabinets (fresh secrets each start)."""
    from simulators.cabinet import CabinetCredentials, SimulatedCabinet, random_banks

    settings = system.settings
    creds = []
    async with system.services.db.transaction() as session:
        for sn, name, address, lat, lng in DEMO_STATIONS:
            try:
                secret = await stations.rotate_secret(session, sn)
            except NotFound:
                _, secret = await stations.provision(
                    session,
                    serial_number=sn,
                    name=name,
                    address=address,
                    latitude=lat,
                    longitude=lng,
                    boards=1,
                    holes_per_board=8,
                )
            creds.append(
                CabinetCredentials(
                    sn=sn,
                    host=settings.public_mqtt_host,
                    port=settings.mqtt_port,
                    username=sn,
                    password=secret,
                    product_key=settings.mqtt_product_key,
                )
            )
    rng, taken = random.Random(), set[str]()  # power-bank SNs unique across the demo fleet
    cabinets = [
        SimulatedCabinet(
            c, boards=1, holes_per_board=8, banks=random_banks(rng, hole_count=8, fill=0.75, taken=taken)
        )
        for c in creds
    ]
    for cabinet in cabinets:
        await cabinet.start()
    return cabinets


def demo_instructions(settings: Settings) -> str:
    base = f"http://{settings.http_host}:{settings.http_port}"
    sms = settings.sms_backend
    where = sms[len("file:") :] if sms.startswith("file:") else "this console's log (event=sms_sent)"
    a, b = DEMO_STATIONS[0][0], DEMO_STATIONS[1][0]
    return f"""
[bold green]ChargeGhar is up.[/bold green]
  API docs   {base}/docs
  Metrics    {base}/metrics
  MQTT       {settings.public_mqtt_host}:{settings.mqtt_port} (product key {settings.mqtt_product_key})
  Stations   {", ".join(s[0] for s in DEMO_STATIONS)} (simulated cabinets)

[bold]A full rental[/bold] (one-time codes appear in {where}):
  # 1. an operator (in another shell; staff log in with code + password):
  #    powerbank admin create --phone +9779800000001 --role operator --password
  curl -s -XPOST {base}/api/auth/otp/request -H 'content-type: application/json' -d '{{"identifier":"+9779800000001"}}'
  OP=$(curl -s -XPOST {base}/api/auth/otp/verify -H 'content-type: application/json' \\
       -d '{{"identifier":"+9779800000001","otp":"<CODE>","password":"<PASSWORD>"}}' | python3 -c 'import json,sys;print(json.load(sys.stdin)["data"]["access"])')
  # 2. a user logs in
  curl -s -XPOST {base}/api/auth/otp/request -H 'content-type: application/json' -d '{{"identifier":"+9779812345678"}}'
  LOGIN=$(curl -s -XPOST {base}/api/auth/otp/verify -H 'content-type: application/json' \\
       -d '{{"identifier":"+9779812345678","otp":"<CODE>"}}')
  TOKEN=$(echo "$LOGIN" | python3 -c 'import json,sys;print(json.load(sys.stdin)["data"]["access"])')
  USER=$(echo "$LOGIN" | python3 -c 'import json,sys;print(json.load(sys.stdin)["data"]["user"]["id"])')
  # 3. the operator credits 500 NPR
  curl -s -XPOST {base}/api/admin/users/$USER/wallet/credit -H "authorization: Bearer $OP" \\
       -H "Idempotency-Key: demo-credit-$USER" \\
       -H 'content-type: application/json' -d '{{"amount":"500","reason":"demo"}}'
  # 4. rent at {a}
  curl -s {base}/api/stations/{a} -H "authorization: Bearer $TOKEN"
  curl -s -XPOST {base}/api/rentals/start -H "authorization: Bearer $TOKEN" \\
       -H 'content-type: application/json' -d '{{"station_sn":"{a}","package_id":1}}'
  # 5. return it into {b} (the simulated cabinet reports a 0x40), then look:
  powerbank simulate --credentials {settings.data_dir}/demo-cabinets.json --return-sn <POWERBANK_SN> --return-to {b}
  curl -s {base}/api/rentals/history -H "authorization: Bearer $TOKEN"
  curl -s {base}/api/payments/transactions -H "authorization: Bearer $TOKEN"
"""


def payment_gateways_line(settings: Settings) -> str:
    """What `powerbank up` says of the top-up gateways: live, sandbox, or off and why."""
    parts = []
    for gateway in gateways.states(settings):
        colour = {"live": "green", "sandbox": "yellow"}.get(gateway.why, "red")
        parts.append(f"{gateway.gateway.value} [{colour}]{gateway.why}[/{colour}]")
    return "Top-up gateways: " + "; ".join(parts)


async def serve(settings: Settings, *, demo: bool) -> None:
    with console.status("Starting database, cache, Ray, kiosk hosts and broker…"):
        system = await start_system(settings)
    cabinets: list[Any] = []
    try:
        if demo:
            with console.status("Provisioning demo stations and connecting simulated cabinets…"):
                cabinets = await provision_demo(system)
                save_credentials(
                    system.settings.data_dir / "demo-cabinets.json", [c.credentials for c in cabinets]
                )
        server = uvicorn.Server(
            uvicorn.Config(
                system.app,
                host=settings.http_host,
                port=settings.http_port,
                log_level=settings.log_level.lower(),
                access_log=False,  # a line per request is noise (and CPU); latencies are in /metrics
                proxy_headers=False,  # client IPs: TRUSTED_PROXIES decides, not uvicorn
            )
        )
        serving = asyncio.create_task(server.serve())
        while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn offers only a flag)
            await asyncio.sleep(0.05)
        if server.started:
            console.print(payment_gateways_line(system.settings), soft_wrap=True)
        if demo and server.started:
            console.print(demo_instructions(system.settings))
        await serving
    finally:
        for cabinet in cabinets:
            with contextlib.suppress(Exception):
                await cabinet.stop()
        await system.stop()
