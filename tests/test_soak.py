"""Soak (issue 3): 2 cabinets, 200 random rent/return operations, 10 % lost replies, random disconnects.

Afterwards: no power bank came out twice for one command, no bank came out without a rental, every rental
is COMPLETED or CANCELLED, and the ledger sums to the wallet balances.
"""

from __future__ import annotations

import random
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest

from domain import wallet
from simulators import Faults
from simulators.cabinet import CabinetError, SimulatedCabinet
from tests.conftest import Api
from tests.support import (
    active,
    at_most_once,
    eventually,
    funded_user,
    provision,
    rent,
    some_banks,
    wait_ready,
)

pytestmark = pytest.mark.integration
OPERATIONS = 200
FAULTS = Faults(lose_eject_reply=0.10, disconnect_probability=0.05)


async def give_back(rental: dict[str, Any], cabinets: list[SimulatedCabinet], rng: random.Random) -> bool:
    for target in rng.sample(cabinets, len(cabinets)):
        if target.connected and len(target.banks()) < target.hole_count:
            try:
                await target.return_powerbank(rental["powerbank_sn"])
                return True
            except CabinetError:  # dropped off just now, or filled up: try the other one
                continue
    return False


async def test_soak(client: httpx.AsyncClient, api: Api, operator_token: str, system: Any) -> None:
    rng = random.Random(20261126)
    cabinets = []
    for seed in (1, 2):
        creds = await provision(client, operator_token, holes=8)
        banks = some_banks(8, fill=0.5)
        cab = SimulatedCabinet(creds, boards=1, holes_per_board=8, banks=banks, faults=FAULTS, seed=seed)
        await cab.start()
        cabinets.append(cab)
    try:
        users = [await funded_user(client, api, operator_token, amount="5000") for _ in range(4)]
        for cab in cabinets:
            await wait_ready(client, users[0]["access"], cab.sn)
        outcomes: dict[int, int] = {}
        returns = 0
        for _ in range(OPERATIONS):
            user = rng.choice(users)
            rental = await active(client, user["access"])
            if rental is None:
                r = await rent(client, user["access"], rng.choice(cabinets).sn)
                outcomes[r.status_code] = outcomes.get(r.status_code, 0) + 1
                assert r.status_code in (201, 409, 503), r.text
            elif rental["status"] == "ACTIVE" and await give_back(rental, cabinets, rng):
                returns += 1

                async def closed(token: str = user["access"], rental_id: str = rental["id"]) -> bool:
                    now = await active(client, token)
                    return now is None or now["id"] != rental_id

                await eventually(closed, within=15)
        assert outcomes.get(201, 0) >= 50, outcomes

        # Drain: no more faults; every bank out goes back; PENDING_POPUP rentals get settled.
        for cab in cabinets:
            cab.faults = Faults()

        async def all_closed() -> bool:
            still_open = False
            for user in users:
                rental = await active(client, user["access"])
                if rental is not None:
                    still_open = True
                    if rental["status"] == "ACTIVE":
                        await give_back(rental, cabinets, rng)
            return not still_open

        await eventually(all_closed, within=90, interval=0.5)

        at_most_once(*cabinets)
        ejected = [sn for cab in cabinets for _, sn in cab.physical_ejects]
        history = []
        for user in users:
            r = await client.get("/api/rentals/history?page_size=100", headers=Api.auth(user["access"]))
            history.extend(r.json()["data"]["results"])
        assert {r["status"] for r in history} <= {"COMPLETED", "CANCELLED"}
        completed = [r for r in history if r["status"] == "COMPLETED"]
        assert sorted(r["powerbank_sn"] for r in completed) == sorted(ejected)  # no bank out without a rental
        async with system.services.db.transaction() as session:
            assert await wallet.ledger_imbalance(session) == Decimal("0.00")
            for user in users:
                account = await wallet.wallet_for(session, uuid.UUID(user["user"]["id"]))
                r = await client.get("/api/rentals/history?page_size=100", headers=Api.auth(user["access"]))
                paid = sum(Decimal(x["amount_paid"]) for x in r.json()["data"]["results"])
                assert account.balance == Decimal("5000") - paid
        print(f"soak: {len(history)} rentals ({len(completed)} done), {returns} returns, answers {outcomes}")
    finally:
        for cab in cabinets:
            await cab.stop()
