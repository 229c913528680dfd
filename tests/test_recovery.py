"""Recovery over real parts: a killed kiosk host, a restarted broker, a rental left PENDING_POPUP."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
import ray
from sqlalchemy import update

from actors.placement import owner
from domain import rentals, wallet
from simulators.cabinet import SimulatedCabinet
from storage.models import EntryType, Rental
from tests.conftest import Api
from tests.support import eventually, funded_user, rent, rental_status, start_cabinets, wait_ready

pytestmark = pytest.mark.integration


async def rented_at_a(
    client: httpx.AsyncClient, api: Api, operator_token: str
) -> tuple[SimulatedCabinet, SimulatedCabinet, str, dict[str, Any]]:
    """Two cabinets A and B, and a user who rented at A: (A, B, the user's token, the rental)."""
    station_a, station_b = await start_cabinets(client, operator_token, 2)
    user = await funded_user(client, api, operator_token)
    await wait_ready(client, user["access"], station_a.sn)
    r = await rent(client, user["access"], station_a.sn)
    assert r.status_code == 201, r.text
    return station_a, station_b, user["access"], r.json()["data"]


async def test_a_killed_kiosk_host_is_restarted_and_loses_nothing(
    client: httpx.AsyncClient, api: Api, operator_token: str, system: Any
) -> None:
    station_a, station_b, token, rental = await rented_at_a(client, api, operator_token)
    try:
        fleet = system.services.fleet
        for name in {owner(station_a.sn, fleet.hosts), owner(station_b.sn, fleet.hosts)}:
            ray.kill(fleet.by_name(name), no_restart=False)

        # Restarted hosts rebuild their kiosks from the database and resync with the connected cabinets.
        await wait_ready(client, token, station_a.sn)
        await wait_ready(client, token, station_b.sn)
        await station_b.return_powerbank(rental["powerbank_sn"])

        async def completed() -> bool:
            return await rental_status(client, token, rental["id"]) == "COMPLETED"

        await eventually(completed)
        balance = (await client.get("/api/payments/wallet/balance", headers=Api.auth(token))).json()["data"]
        assert Decimal(balance["balance"]) == Decimal("500") - Decimal(rental["package"]["price"])
        r = await rent(client, token, station_a.sn)  # and renting works again
        assert r.status_code == 201, r.text
        assert station_a.eject_counts[r.json()["data"]["powerbank_sn"]] == 1
    finally:
        await station_a.stop()
        await station_b.stop()


async def test_a_restarted_broker_gets_every_cabinet_back(
    client: httpx.AsyncClient, api: Api, operator_token: str, system: Any
) -> None:
    station_a, station_b, token, rental = await rented_at_a(client, api, operator_token)
    try:
        ray.kill(system.broker, no_restart=False)  # the supervisor makes the restarted broker listen again

        async def offline() -> bool:
            data = (await client.get(f"/api/stations/{station_a.sn}", headers=Api.auth(token))).json()["data"]
            return bool(data["status"] == "OFFLINE")

        await eventually(offline, within=15)
        await wait_ready(client, token, station_b.sn)  # the simulator reconnected with backoff
        await station_b.wait_connected()
        await station_b.return_powerbank(rental["powerbank_sn"])

        async def completed() -> bool:
            return await rental_status(client, token, rental["id"]) == "COMPLETED"

        await eventually(completed, within=10)
        await wait_ready(client, token, station_a.sn)
        r = await rent(client, token, station_a.sn)
        assert r.status_code == 201, r.text
    finally:
        await station_a.stop()
        await station_b.stop()


async def test_rentals_left_pending_are_settled_from_the_cabinets_holes(
    client: httpx.AsyncClient, api: Api, operator_token: str, system: Any
) -> None:
    """As if the API died mid-rental: PENDING_POPUP rentals with the bank they were ejecting recorded."""
    (station,) = await start_cabinets(client, operator_token, 1)
    try:
        gone_user = await funded_user(client, api, operator_token)
        kept_user = await funded_user(client, api, operator_token)
        await wait_ready(client, gone_user["access"], station.sn)
        in_hole = next(iter(station.banks().items()))
        db = system.services.db
        ids = []
        for user, (hole, sn) in ((gone_user, (in_hole[0], "87654321")), (kept_user, in_hole)):
            async with db.transaction() as session:
                pending = await rentals.begin(
                    session,
                    user_id=uuid.UUID(user["user"]["id"]),
                    station_sn=station.sn,
                    package_id=1,
                    bank=rentals.EjectTarget(powerbank_sn=sn, slot_number=hole, soc=80),
                )
                await session.execute(
                    update(Rental)
                    .where(Rental.id == pending.id)
                    .values(created_at=datetime.now(UTC) - timedelta(minutes=5))
                )
                ids.append(str(pending.id))

        async def settled() -> bool:
            statuses = [
                await rental_status(client, u["access"], rid)
                for u, rid in zip((gone_user, kept_user), ids, strict=True)
            ]
            return statuses == ["ACTIVE", "CANCELLED"]

        await eventually(settled, within=10)
        async with db.transaction() as session:
            assert await wallet.ledger_imbalance(session) == Decimal("0.00")
            kept = await rentals.get(session, uuid.UUID(ids[1]))
            assert kept.failure_reason == "unresolved_eject" and kept.amount_paid == Decimal("0.00")
        assert EntryType.RENTAL_CHARGE  # charging happens at return, so neither was charged yet
    finally:
        await station.stop()


async def test_an_unconfirmed_eject_with_a_bank_stays_open_until_settled(
    client: httpx.AsyncClient, api: Api, operator_token: str, system: Any
) -> None:
    """Issue 10, item 8: after PENDING_POPUP_ABANDON_S offline, an unconfirmed eject was cancelled for free,
    though the bank may have come out. Only a rental with no bank recorded is cancelled now; the other
    waits for a snapshot, or for an operator (listed as unsettled, settled once, audited)."""
    (station,) = await start_cabinets(client, operator_token, 1)
    with_bank_user = await funded_user(client, api, operator_token)
    no_bank_user = await funded_user(client, api, operator_token)
    await wait_ready(client, with_bank_user["access"], station.sn)
    hole, bank_sn = next(iter(station.banks().items()))
    await station.stop()  # the cabinet drops off and stays off
    long_ago = datetime.now(UTC) - timedelta(seconds=system.settings.pending_popup_abandon_s + 60)
    ids = []
    db = system.services.db
    for user, bank in (
        (with_bank_user, rentals.EjectTarget(powerbank_sn=bank_sn, slot_number=hole, soc=80)),
        (no_bank_user, None),
    ):
        async with db.transaction() as session:
            pending = await rentals.begin(
                session, user_id=uuid.UUID(user["user"]["id"]), station_sn=station.sn, package_id=1, bank=bank
            )
            await session.execute(update(Rental).where(Rental.id == pending.id).values(created_at=long_ago))
            ids.append(pending.id)

    async def bankless_cancelled() -> bool:
        return await rental_status(client, no_bank_user["access"], str(ids[1])) == "CANCELLED"

    await eventually(bankless_cancelled, within=20)  # the hosts' tick has run over this station
    assert await rental_status(client, with_bank_user["access"], str(ids[0])) == "PENDING_POPUP"

    op = {"Authorization": f"Bearer {operator_token}"}
    listed = await client.get("/api/admin/rentals/unsettled", headers=op)
    assert listed.status_code == 200, listed.text
    assert str(ids[0]) in [r["id"] for r in listed.json()["data"]]
    assert str(ids[1]) not in [r["id"] for r in listed.json()["data"]]
    settle = f"/api/admin/rentals/{ids[0]}/settle"
    r = await client.post(settle, json={"ejected": True, "reason": "CCTV shows the bank taken"}, headers=op)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["status"] == "ACTIVE" and r.json()["data"]["powerbank_sn"] == bank_sn
    again = await client.post(settle, json={"ejected": False, "reason": "twice"}, headers=op)
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_state"
    entries = await client.get(
        "/api/admin/audit", params={"target_type": "rental", "target_id": str(ids[0])}, headers=op
    )
    (entry,) = [e for e in entries.json()["data"]["results"] if e["action"] == "rental.settled"]
    assert entry["before"]["status"] == "PENDING_POPUP" and entry["after"]["status"] == "ACTIVE"
    assert entry["after"]["reason"] == "CCTV shows the bank taken"
    async with db.transaction() as session:
        assert await wallet.ledger_imbalance(session) == Decimal("0.00")
