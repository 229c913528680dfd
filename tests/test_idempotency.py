"""`Idempotency-Key` (issue 4, item 7), Stripe's semantics.

Unit tests of the request canonicalisation, tests of the claim/complete/purge transactions on the real
database, and end-to-end tests of `POST /api/rentals/start` over the real system: a retry replays the
first answer and never ejects a second power bank.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select, update

from domain import idempotency as rules
from simulators import Faults
from simulators.cabinet import SimulatedCabinet
from storage.idempotency_models import IdempotencyKey
from tests.conftest import Api, new_phone
from tests.support import (
    at_most_once,
    eventually,
    funded_user,
    provision,
    some_banks,
    start_cabinet,
    wait_ready,
)

START = "/api/rentals/start"
REPLAYED = "Idempotent-Replayed"


# --- canonicalisation (fast, no services) ----------------------------------------------------------


def fingerprint(text: str, **kw: Any) -> str:
    return rules.request_fingerprint(text.encode(), **kw)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ('{"station_sn": "S1", "package_id": 1}', '{"package_id":1,"station_sn":"S1"}'),
        ('{"a": {"y": 1, "x": [1, 2]}}', '\n{ "a" : { "x" : [ 1 , 2 ] , "y" : 1 } }\n'),
        ('{"name": "café"}', '{"name": "caf\\u00e9"}'),
        ('{"amount": 1}', '{"amount": 1.0}'),
        ('{"amount": 1.5}', '{"amount": 1.50}'),
        ('{"amount": 10}', '{"amount": 1e1}'),
        ('{"amount": 0}', '{"amount": -0.0}'),
        ("", "null"),
        ("", "  "),
    ],
)
def test_equal_requests_have_one_fingerprint(a: str, b: str) -> None:
    assert fingerprint(a) == fingerprint(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ('{"package_id": 1}', '{"package_id": 2}'),
        ('{"package_id": 1}', '{"package_id": "1"}'),
        ('{"flag": true}', '{"flag": 1}'),
        ('{"v": null}', "{}"),
        ('{"v": [1, 2]}', '{"v": [2, 1]}'),
        (
            '{"amount": 12345678901234567890123456789012345678901}',
            '{"amount": 12345678901234567890123456789012345678902}',
        ),
        ('{"amount": 0.1000000000000000000000000000001}', '{"amount": 0.1}'),
        ("{}", "[]"),
        ("not json", "not json!"),
    ],
)
def test_different_requests_have_different_fingerprints(a: str, b: str) -> None:
    assert fingerprint(a) != fingerprint(b)


def test_path_parameters_count_and_query_order_does_not() -> None:
    body = '{"amount": "50"}'
    assert fingerprint(body, path_params={"rental_id": "A"}) != fingerprint(
        body, path_params={"rental_id": "B"}
    )
    assert fingerprint(body, query=[("a", "1"), ("b", "2")]) == fingerprint(
        body, query=[("b", "2"), ("a", "1")]
    )
    assert fingerprint(body, query=[("a", "1")]) != fingerprint(body)


def test_bodies_that_are_not_json_are_compared_byte_for_byte() -> None:
    assert fingerprint("a=1&b=2") == fingerprint("a=1&b=2")
    assert fingerprint("a=1&b=2") != fingerprint("b=2&a=1")
    assert fingerprint('{"v": NaN}') != fingerprint('{"v": null}')  # NaN is not JSON: raw bytes
    assert rules.request_fingerprint(b"\xff\xfe") != rules.request_fingerprint(b"\xff\xff")
    deep = "[" * 100_000 + "]" * 100_000
    assert fingerprint(deep) == fingerprint(deep)


def test_canonical_json_is_json_with_one_spelling() -> None:
    text = rules.canonical_json({"b": [1, 2.5, "x"], "a": None, "c": True, "é": {"z": 0, "y": -3}})
    assert text == '{"a":null,"b":[1E0,25E-1,"x"],"c":true,"\\u00e9":{"y":-3E0,"z":0}}'
    assert json.loads(text)["b"] == [1, 2.5, "x"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@given(value=json_values, indent=st.none() | st.integers(0, 3), sort_keys=st.booleans(), ascii=st.booleans())
def test_any_spelling_of_a_json_value_has_its_fingerprint(
    value: Any, indent: int | None, sort_keys: bool, ascii: bool
) -> None:
    spelled = json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=ascii)
    assert fingerprint(spelled) == fingerprint(json.dumps(value))


# --- the durable record (real PostgreSQL) ----------------------------------------------------------


@pytest.fixture
async def user_id(api: Api) -> uuid.UUID:
    return uuid.UUID((await api.login(new_phone()))["user"]["id"])


async def take(system: Any, user_id: uuid.UUID, key: str, request_hash: str, ttl_s: int = 3600) -> Any:
    async with system.services.db.transaction() as session:
        return await rules.claim(
            session,
            user_id=user_id,
            endpoint="POST /test",
            key=key,
            request_hash=request_hash,
            ttl_s=ttl_s,
            retry_after_s=1,
        )


@pytest.mark.integration
async def test_claim_complete_replay(system: Any, user_id: uuid.UUID) -> None:
    first = await take(system, user_id, "k1", "h1")
    assert isinstance(first, rules.Claimed)
    with pytest.raises(rules.IdempotencyRequestInProgress) as in_progress:
        await take(system, user_id, "k1", "h1")
    assert in_progress.value.status == 409 and in_progress.value.context["retry_after"] == 1
    with pytest.raises(rules.IdempotencyKeyReused):
        await take(system, user_id, "k1", "h2")
    answer = rules.Stored(status=201, headers={"content-type": "application/json"}, body='{"ok":true}')
    async with system.services.db.transaction() as session:
        await rules.complete(session, record_id=first.record_id, response=answer)
    assert await take(system, user_id, "k1", "h1") == answer
    with pytest.raises(rules.IdempotencyKeyReused):
        await take(system, user_id, "k1", "h2")
    assert isinstance(await take(system, user_id, "k2", "h1"), rules.Claimed)  # another key: independent


@pytest.mark.integration
async def test_concurrent_first_claims_let_exactly_one_through(system: Any, user_id: uuid.UUID) -> None:
    outcomes = await asyncio.gather(
        *(take(system, user_id, "race", "h") for _ in range(8)), return_exceptions=True
    )
    assert sum(isinstance(o, rules.Claimed) for o in outcomes) == 1
    assert all(isinstance(o, rules.Claimed | rules.IdempotencyRequestInProgress) for o in outcomes)


@pytest.mark.integration
async def test_expired_keys_are_free_again_and_purged(system: Any, user_id: uuid.UUID) -> None:
    old = await take(system, user_id, "old", "h1")
    fresh = await take(system, user_id, "fresh", "h1")
    async with system.services.db.transaction() as session:
        await rules.complete(
            session, record_id=fresh.record_id, response=rules.Stored(status=200, headers={}, body="{}")
        )
        await session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.id == old.record_id)
            .values(created_at=func.now() - timedelta(hours=2))
        )
    # Past the TTL the key is taken over by a new request, even with another body.
    again = await take(system, user_id, "old", "h2", ttl_s=3600)
    assert again == rules.Claimed(record_id=old.record_id)
    async with system.services.db.transaction() as session:
        await session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.id == old.record_id)
            .values(created_at=func.now() - timedelta(days=2))
        )
    async with system.services.db.transaction() as session:
        assert await rules.purge_expired(session) >= 1  # default TTL: 24 h
    async with system.services.db.transaction() as session:
        keys = await session.scalars(select(IdempotencyKey.key).where(IdempotencyKey.user_id == user_id))
        assert list(keys) == ["fresh"]


# --- POST /api/rentals/start end to end --------------------------------------------------------------


async def start(
    client: httpx.AsyncClient, token: str, key: str | None, body: dict[str, Any] | str
) -> httpx.Response:
    headers = Api.auth(token) | ({"Idempotency-Key": key} if key is not None else {})
    if isinstance(body, str):
        headers["Content-Type"] = "application/json"
        return await client.post(START, content=body, headers=headers)
    return await client.post(START, json=body, headers=headers)


async def rental_count(client: httpx.AsyncClient, token: str) -> int:
    r = await client.get("/api/rentals/history", headers=Api.auth(token))
    count: int = r.json()["data"]["count"]
    return count


@pytest.fixture
async def user(client: httpx.AsyncClient, api: Api, operator_token: str) -> dict[str, Any]:
    return await funded_user(client, api, operator_token)


@pytest.fixture
async def cabinet(
    client: httpx.AsyncClient, operator_token: str, user: dict[str, Any]
) -> AsyncIterator[SimulatedCabinet]:
    cab = await start_cabinet(client, operator_token)
    try:
        await wait_ready(client, user["access"], cab.sn)
        yield cab
    finally:
        await cab.stop()


@pytest.mark.integration
async def test_a_retry_replays_the_201_and_ejects_once(
    client: httpx.AsyncClient, user: dict[str, Any], cabinet: SimulatedCabinet
) -> None:
    token, key = user["access"], str(uuid.uuid4())
    body = {"station_sn": cabinet.sn, "package_id": 1}
    first = await start(client, token, key, body)
    assert first.status_code == 201, first.text
    assert REPLAYED not in first.headers
    rental = first.json()["data"]
    assert rental["status"] == "ACTIVE"

    again = await start(client, token, key, body)
    assert again.status_code == 201
    assert again.headers[REPLAYED] == "true"
    assert again.content == first.content  # byte for byte
    # The same request spelled differently (key order, whitespace) is the same request.
    spelled = await start(client, token, key, f'{{ "package_id": 1.0, "station_sn": "{cabinet.sn}" }}')
    assert spelled.status_code == 201 and spelled.headers[REPLAYED] == "true"
    assert spelled.content == first.content

    assert [sn for _, sn in cabinet.physical_ejects] == [rental["powerbank_sn"]]
    at_most_once(cabinet)
    assert await rental_count(client, token) == 1


@pytest.mark.integration
async def test_the_same_key_with_another_body_is_refused(
    client: httpx.AsyncClient, user: dict[str, Any], cabinet: SimulatedCabinet
) -> None:
    token, key = user["access"], str(uuid.uuid4())
    first = await start(client, token, key, {"station_sn": cabinet.sn, "package_id": 1})
    assert first.status_code == 201, first.text
    reused = await start(client, token, key, {"station_sn": cabinet.sn, "package_id": 2})
    assert reused.status_code == 409
    assert reused.json()["success"] is False
    assert reused.json()["error"]["code"] == "idempotency_key_reused"
    assert REPLAYED not in reused.headers
    assert len(cabinet.physical_ejects) == 1
    assert await rental_count(client, token) == 1


@pytest.mark.integration
async def test_ten_concurrent_identical_requests_eject_once(
    client: httpx.AsyncClient, user: dict[str, Any], cabinet: SimulatedCabinet
) -> None:
    token, key = user["access"], str(uuid.uuid4())
    body = {"station_sn": cabinet.sn, "package_id": 1}
    answers = await asyncio.gather(*(start(client, token, key, body) for _ in range(10)))

    assert {r.status_code for r in answers} <= {201, 409}, [r.text for r in answers]
    created = [r for r in answers if r.status_code == 201]
    assert created and len({r.content for r in created}) == 1
    for conflict in (r for r in answers if r.status_code == 409):
        assert conflict.json()["error"]["code"] == "idempotency_request_in_progress"
        assert conflict.headers["Retry-After"] == "1"
    assert sum(REPLAYED not in r.headers for r in created) == 1  # one executed, any other 201 replayed

    after = await start(client, token, key, body)  # once finished, every retry gets the 201
    assert after.status_code == 201 and after.headers[REPLAYED] == "true"
    assert after.content == created[0].content
    assert len(cabinet.physical_ejects) == 1
    at_most_once(cabinet)
    assert await rental_count(client, token) == 1


@pytest.mark.integration
async def test_a_client_that_gave_up_finds_the_answer_on_retry(
    client: httpx.AsyncClient, base_url: str, user: dict[str, Any], cabinet: SimulatedCabinet
) -> None:
    token, key = user["access"], str(uuid.uuid4())
    body = {"station_sn": cabinet.sn, "package_id": 1}
    cabinet.faults = Faults(reply_delay_s=1.0)  # the eject confirms after 1 s (timeout: 2 s)
    async with httpx.AsyncClient(base_url=base_url, timeout=0.3) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await start(impatient, token, key, body)
    during = await start(client, token, key, body)
    assert during.status_code == 409
    assert during.json()["error"]["code"] == "idempotency_request_in_progress"

    async def finished() -> httpx.Response | None:
        r = await start(client, token, key, body)
        return r if r.status_code == 201 else None

    replayed = await eventually(finished, within=5.0, interval=0.2)
    assert replayed.headers[REPLAYED] == "true"
    assert [sn for _, sn in cabinet.physical_ejects] == [replayed.json()["data"]["powerbank_sn"]]
    at_most_once(cabinet)
    assert await rental_count(client, token) == 1


@pytest.mark.integration
async def test_an_error_is_replayed_even_after_the_station_came_online(
    client: httpx.AsyncClient, operator_token: str, user: dict[str, Any]
) -> None:
    token, key = user["access"], str(uuid.uuid4())
    creds = await provision(client, operator_token)  # provisioned, not connected yet
    body = {"station_sn": creds.sn, "package_id": 1}
    first = await start(client, token, key, body)
    assert first.status_code == 503
    assert first.json()["error"]["code"] == "station_offline"

    cab = SimulatedCabinet(creds, boards=1, holes_per_board=4, banks=some_banks())
    await cab.start()
    try:
        await wait_ready(client, token, creds.sn)
        again = await start(client, token, key, body)  # the key's answer stands: not run again
        assert again.status_code == 503 and again.headers[REPLAYED] == "true"
        assert again.content == first.content
        assert cab.physical_ejects == []
        fresh = await start(client, token, str(uuid.uuid4()), body)  # a new attempt takes a new key
        assert fresh.status_code == 201, fresh.text
        assert len(cab.physical_ejects) == 1
    finally:
        await cab.stop()


@pytest.mark.integration
async def test_a_key_of_another_user_is_independent(
    client: httpx.AsyncClient, api: Api, operator_token: str, user: dict[str, Any], cabinet: SimulatedCabinet
) -> None:
    other = await funded_user(client, api, operator_token)
    key, body = str(uuid.uuid4()), {"station_sn": cabinet.sn, "package_id": 1}
    mine = await start(client, user["access"], key, body)
    theirs = await start(client, other["access"], key, body)
    assert mine.status_code == theirs.status_code == 201, theirs.text
    assert REPLAYED not in theirs.headers
    assert mine.json()["data"]["id"] != theirs.json()["data"]["id"]
    assert sorted(sn for _, sn in cabinet.physical_ejects) == sorted(
        [mine.json()["data"]["powerbank_sn"], theirs.json()["data"]["powerbank_sn"]]
    )
    at_most_once(cabinet)


@pytest.mark.integration
async def test_without_a_key_nothing_changes(
    client: httpx.AsyncClient, system: Any, user: dict[str, Any], cabinet: SimulatedCabinet
) -> None:
    body = {"station_sn": cabinet.sn, "package_id": 1}
    first = await start(client, user["access"], None, body)
    assert first.status_code == 201, first.text
    assert REPLAYED not in first.headers
    second = await start(client, user["access"], None, body)  # not a replay: the rules answer
    assert second.status_code == 409
    assert second.json()["error"]["code"] == "active_rental_exists"
    assert len(cabinet.physical_ejects) == 1
    async with system.services.db.transaction() as session:
        stored = await session.scalar(
            select(func.count())
            .select_from(IdempotencyKey)
            .where(IdempotencyKey.user_id == uuid.UUID(user["user"]["id"]))
        )
    assert stored == 0


@pytest.mark.integration
async def test_bad_keys_and_requests_refused_before_any_work_store_nothing(
    client: httpx.AsyncClient, operator_token: str, user: dict[str, Any]
) -> None:
    token = user["access"]
    creds = await provision(client, operator_token)  # offline: an accepted request answers 503
    body = {"station_sn": creds.sn, "package_id": 1}
    for bad in ("k" * (rules.MAX_KEY_LENGTH + 1), ""):
        r = await start(client, token, bad, body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "validation_error"
    longest = "k" * rules.MAX_KEY_LENGTH
    assert (await start(client, token, longest, body)).json()["error"]["code"] == "station_offline"

    key = str(uuid.uuid4())
    unauthenticated = await client.post(START, json=body, headers={"Idempotency-Key": key})
    assert unauthenticated.status_code == 401
    invalid = await start(client, token, key, {"station_sn": creds.sn, "package_id": "one"})
    assert invalid.status_code == 422
    # Neither claimed the key: the corrected request runs (no 409 reused, no replayed 422).
    corrected = await start(client, token, key, body)
    assert corrected.status_code == 503 and REPLAYED not in corrected.headers
    assert corrected.json()["error"]["code"] == "station_offline"
    assert await rental_count(client, token) == 0


async def test_a_rent_beyond_the_in_flight_limit_is_refused_at_once_and_claims_nothing(
    client: httpx.AsyncClient, operator_token: str, user: dict[str, Any], system: Any
) -> None:
    token = user["access"]
    creds = await provision(client, operator_token)
    body = {"station_sn": creds.sn, "package_id": 1}
    admission = system.app.state.rent_admission
    key = str(uuid.uuid4())
    admission.in_flight += admission.limit  # as if RENT_MAX_IN_FLIGHT rents were waiting on cabinets
    try:
        busy = await start(client, token, key, body)
    finally:
        admission.in_flight -= admission.limit
    assert busy.status_code == 503, busy.text
    assert busy.json()["error"]["code"] == "overloaded"
    assert busy.headers["Retry-After"] == "1"
    # Nothing was claimed or done: the retry with the same key runs (the station is offline).
    retry = await start(client, token, key, body)
    assert retry.status_code == 503 and REPLAYED not in retry.headers
    assert retry.json()["error"]["code"] == "station_offline"
    assert await rental_count(client, token) == 0
    assert admission.in_flight == 0  # every slot was given back, refusals included
