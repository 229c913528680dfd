"""Late fees and penalties, table-driven: each configuration type, grace, the daily cap, a lost bank,
and a lost bank that came back. Pure pricing first, then the same rules through the domain against
the real database (time travel = the timestamps a rental is given)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from domain import rentals
from domain.pricing import LateFeeRule, hourly_rate, late_fee, postpaid_usage, tax_breakdown
from storage.models import PaymentModel, PaymentStatus, RentalStatus
from storage.rental_models import LateFeeConfiguration, LateFeeType
from tests import rental_support as rs

D = Decimal
FLAT_50 = LateFeeRule(fee_type=LateFeeType.FLAT_RATE, flat_rate_per_hour=D("50"))
FLAT_50_GRACE_15 = LateFeeRule(
    fee_type=LateFeeType.FLAT_RATE, flat_rate_per_hour=D("50"), grace_period_minutes=15
)
DOUBLE = LateFeeRule(fee_type=LateFeeType.MULTIPLIER, multiplier=D("2"))
ONE_AND_HALF = LateFeeRule(fee_type=LateFeeType.MULTIPLIER, multiplier=D("1.5"))
COMPOUND = LateFeeRule(fee_type=LateFeeType.COMPOUND, multiplier=D("2"), flat_rate_per_hour=D("25"))
FLAT_50_CAP_500 = LateFeeRule(
    fee_type=LateFeeType.FLAT_RATE, flat_rate_per_hour=D("50"), max_daily_rate=D("500")
)
DOUBLE_CAP_1000 = LateFeeRule(fee_type=LateFeeType.MULTIPLIER, multiplier=D("2"), max_daily_rate=D("1000"))
GRACE_CAP = LateFeeRule(
    fee_type=LateFeeType.FLAT_RATE,
    flat_rate_per_hour=D("50"),
    grace_period_minutes=30,
    max_daily_rate=D("300"),
)

# (rule, package price, package minutes, minutes late, expected fee, started hours charged)
TABLE = [
    pytest.param(FLAT_50, "60", 60, 0, "0.00", 0, id="flat-on-time"),
    pytest.param(FLAT_50, "60", 60, 0.02, "50.00", 1, id="flat-one-second-late"),
    pytest.param(FLAT_50, "60", 60, 59, "50.00", 1, id="flat-59min"),
    pytest.param(FLAT_50, "60", 60, 61, "100.00", 2, id="flat-61min"),
    pytest.param(FLAT_50_GRACE_15, "60", 60, 15, "0.00", 0, id="grace-inside"),
    pytest.param(FLAT_50_GRACE_15, "60", 60, 16, "50.00", 1, id="grace-just-past"),
    pytest.param(FLAT_50_GRACE_15, "60", 60, 75, "50.00", 1, id="grace-hour-after-grace"),
    pytest.param(FLAT_50_GRACE_15, "60", 60, 76, "100.00", 2, id="grace-second-hour"),
    pytest.param(DOUBLE, "60", 60, 90, "240.00", 2, id="multiplier-2x-hourly"),
    pytest.param(DOUBLE, "50", 30, 30, "200.00", 1, id="multiplier-half-hour-package"),
    pytest.param(ONE_AND_HALF, "250", 1440, 180, "46.88", 3, id="multiplier-daily-package"),
    pytest.param(COMPOUND, "60", 60, 120, "290.00", 2, id="compound"),
    pytest.param(COMPOUND, "250", 1440, 60, "45.83", 1, id="compound-daily-package"),
    pytest.param(FLAT_50_CAP_500, "60", 60, 5 * 60, "250.00", 5, id="cap-not-reached"),
    pytest.param(FLAT_50_CAP_500, "60", 60, 10 * 60, "500.00", 10, id="cap-reached"),
    pytest.param(FLAT_50_CAP_500, "60", 60, 24 * 60, "500.00", 24, id="cap-full-day"),
    pytest.param(FLAT_50_CAP_500, "60", 60, 25 * 60, "550.00", 25, id="cap-second-day-starts"),
    pytest.param(FLAT_50_CAP_500, "60", 60, 48 * 60, "1000.00", 48, id="cap-two-days"),
    pytest.param(DOUBLE_CAP_1000, "60", 60, 30 * 60, "1720.00", 30, id="cap-multiplier"),
    pytest.param(GRACE_CAP, "60", 60, 30, "0.00", 0, id="grace-and-cap-inside-grace"),
    pytest.param(GRACE_CAP, "60", 60, 30 + 10 * 60, "300.00", 10, id="grace-and-cap"),
]


@pytest.mark.parametrize(("rule", "price", "minutes", "late_min", "expected", "hours"), TABLE)
def test_late_fee_table(
    rule: LateFeeRule, price: str, minutes: int, late_min: float, expected: str, hours: int
) -> None:
    due = rs.now()
    fee = late_fee(
        rule,
        hourly_rate=hourly_rate(price=D(price), duration_minutes=minutes),
        due_at=due,
        ended_at=due + timedelta(minutes=late_min),
    )
    assert (fee.amount, fee.hours) == (D(expected), hours)


@pytest.mark.parametrize(
    ("price", "minutes", "used_s", "billed_min", "amount"),
    [
        ("60", 60, 0, 0, "0.00"),
        ("60", 60, 1, 1, "1.00"),
        ("60", 60, 60, 1, "1.00"),
        ("60", 60, 61, 2, "2.00"),
        ("100", 60, 37 * 60 + 5, 38, "63.33"),
        ("250", 1440, 3600, 60, "10.42"),
    ],
)
def test_postpaid_usage_per_started_minute(
    price: str, minutes: int, used_s: int, billed_min: int, amount: str
) -> None:
    start = rs.now()
    usage = postpaid_usage(
        price=D(price), duration_minutes=minutes, started_at=start, until=start + timedelta(seconds=used_s)
    )
    assert (usage.minutes, usage.amount) == (billed_min, D(amount))


@pytest.mark.parametrize(
    ("total", "subtotal", "service", "vat"),
    [
        ("50.00", "43.17", "1.08", "5.75"),
        ("100.00", "86.34", "2.16", "11.50"),
        ("5000.00", "4316.86", "107.92", "575.22"),
        ("0.00", "0.00", "0.00", "0.00"),
        ("0.01", "0.01", "0.00", "0.00"),
    ],
)
def test_receipt_tax_breakdown_adds_up(total: str, subtotal: str, service: str, vat: str) -> None:
    tax = tax_breakdown(D(total), vat_rate=D("0.13"), service_charge_rate=D("0.025"))
    assert (tax.subtotal, tax.service_charge, tax.vat, tax.total) == (
        D(subtotal),
        D(service),
        D(vat),
        D(total),
    )
    assert tax.subtotal + tax.service_charge + tax.vat == tax.total


# --- the same rules through the domain, against the real database ---------------------------------------

integration = pytest.mark.integration  # the tests below need the real database (the ones above do not)


@integration
@pytest.mark.parametrize(
    ("rule", "late_min", "fee"),
    [
        pytest.param(FLAT_50, 61, "100.00", id="flat"),
        pytest.param(FLAT_50_GRACE_15, 14, "0.00", id="inside-grace"),
        pytest.param(FLAT_50_GRACE_15, 76, "100.00", id="after-grace"),
        pytest.param(DOUBLE, 90, "240.00", id="multiplier"),
        pytest.param(COMPOUND, 110, "290.00", id="compound"),
        pytest.param(FLAT_50_CAP_500, 25 * 60 - 30, "550.00", id="daily-cap"),
    ],
)
async def test_late_return_is_charged_by_the_configuration(
    system: Any, rule: LateFeeRule, late_min: int, fee: str
) -> None:
    user = await rs.customer(system, 2000)
    pkg = await rs.package(system, price="60.00", minutes=60)
    start = rs.now() - timedelta(minutes=60 + late_min)
    rental_id, bank, station_sn = await rs.started(system, user, package_id=pkg, at=start)
    returned = await rs.give_back(system, bank, station_sn, at=rs.now(), rule=rule)
    assert returned is not None and returned.charged == D(fee) and returned.due == 0
    row = await rs.rental(system, rental_id)
    assert row.status == RentalStatus.COMPLETED and row.payment_status == PaymentStatus.PAID
    assert row.amount_paid == D("60.00") + D(fee)
    late = [("LATE_FEE", -D(fee))] if D(fee) else []
    assert await rs.entries(system, user) == [("TOPUP", D("2000")), ("RENTAL_CHARGE", D("-60.00")), *late]
    assert await rs.balance(system, user) == D("2000") - D("60.00") - D(fee)
    assert await rs.sound_ledger(system) == 0


@integration
async def test_late_fee_beyond_the_balance_is_recorded_as_due(system: Any) -> None:
    user = await rs.customer(system, 100)
    pkg = await rs.package(system, price="60.00", minutes=60)
    rental_id, bank, station_sn = await rs.started(
        system, user, package_id=pkg, at=rs.now() - timedelta(minutes=60 + 150)
    )
    returned = await rs.give_back(system, bank, station_sn, at=rs.now(), rule=FLAT_50)
    assert returned is not None and (returned.charged, returned.due) == (D("40.00"), D("110.00"))
    row = await rs.rental(system, rental_id)
    assert (row.payment_status, row.overdue_amount, row.amount_paid) == (
        PaymentStatus.DUE,
        D("110"),
        D("100"),
    )
    assert await rs.balance(system, user) == 0  # never negative: the rest is a due on the rental
    assert await rs.sound_ledger(system) == 0


@integration
async def test_active_configuration_is_the_one_returns_use(
    system: Any, client: Any, operator_token: str
) -> None:
    """Operators switch configurations over the API; a return without an explicit rule uses the active one."""
    headers = {"Authorization": f"Bearer {operator_token}"}
    before = next(
        c
        for c in (await client.get("/api/admin/late-fee-configs", headers=headers)).json()["data"]
        if c["is_active"]
    )
    body = {
        "name": "Triple",
        "fee_type": "MULTIPLIER",
        "multiplier": "3",
        "grace_period_minutes": 10,
        "is_active": True,
    }
    r = await client.post("/api/admin/late-fee-configs", json=body, headers=headers)
    assert r.status_code == 201, r.text
    try:
        user = await rs.customer(system, 1000)
        pkg = await rs.package(system, price="40.00", minutes=60)
        start = rs.now() - timedelta(minutes=60 + 60)
        _, bank, station_sn = await rs.started(system, user, package_id=pkg, at=start)
        returned = await rs.give_back(system, bank, station_sn, at=rs.now())
        assert returned is not None and returned.charged == D("120.00")  # 50 min past grace: 1 h * 3 * 40
    finally:
        r = await client.post(f"/api/admin/late-fee-configs/{before['id']}/activate", headers=headers)
        assert r.status_code == 200, r.text
    listed = (await client.get("/api/admin/late-fee-configs", headers=headers)).json()["data"]
    assert [c["id"] for c in listed if c["is_active"]] == [before["id"]]


@integration
async def test_exactly_one_configuration_is_active_enforced_by_the_database(system: Any) -> None:
    with pytest.raises(IntegrityError):  # a second active row
        async with system.services.db.transaction() as session:
            session.add(
                LateFeeConfiguration(
                    name="x", fee_type=LateFeeType.FLAT_RATE, flat_rate_per_hour=D("1"), is_active=True
                )
            )
            await session.flush()
    with pytest.raises(IntegrityError):  # none active at commit
        async with system.services.db.transaction() as session:
            active = await session.scalar(select(LateFeeConfiguration).where(LateFeeConfiguration.is_active))
            assert active is not None
            active.is_active = False
    async with system.services.db.transaction() as session:
        assert (
            len(
                (
                    await session.scalars(select(LateFeeConfiguration).where(LateFeeConfiguration.is_active))
                ).all()
            )
            == 1
        )


# --- overdue, lost, came back ---------------------------------------------------------------------------


async def _lost(
    system: Any, user: rs.Customer, *, price: str = "60.00", deposit: str = "0.00"
) -> tuple[Any, str, str]:
    """A rental whose bank has been out 60 min + 25 h + 1 min: overdue marked, then completed as lost."""
    pkg = await rs.package(system, price=price, minutes=60, deposit=deposit)
    rental_id, bank, station_sn = await rs.started(system, user, package_id=pkg, at=rs.now())
    await rs.ago(system, rental_id, hours=26, minutes=1)
    async with system.services.db.transaction() as session:
        overdue = await rentals.mark_overdue(session, now=rs.now())
    assert rental_id in {e.rental_id for e in overdue}
    row = await rs.rental(system, rental_id)
    assert (
        row.status == RentalStatus.OVERDUE and row.overdue_at == row.due_at
    )  # the Standard config: no grace
    async with system.services.db.transaction() as session:
        lost = await rentals.complete_lost(session, now=rs.now(), settings=system.settings)
    assert rental_id in {e.rental_id for e in lost}
    return rental_id, bank, station_sn


@integration
async def test_overdue_marking_respects_grace_and_is_idempotent(system: Any) -> None:
    user = await rs.customer(system, 500)
    pkg = await rs.package(system, price="60.00", minutes=60)
    rental_id, *_ = await rs.started(system, user, package_id=pkg, at=rs.now() - timedelta(minutes=59))
    async with system.services.db.transaction() as session:
        assert rental_id not in {e.rental_id for e in await rentals.mark_overdue(session, now=rs.now())}
    await rs.ago(system, rental_id, minutes=2)
    async with system.services.db.transaction() as session:
        assert rental_id in {e.rental_id for e in await rentals.mark_overdue(session, now=rs.now())}
        assert rental_id not in {e.rental_id for e in await rentals.mark_overdue(session, now=rs.now())}
        # Not yet lost: overdue for a minute only.
        assert rental_id not in {
            e.rental_id for e in await rentals.complete_lost(session, now=rs.now(), settings=system.settings)
        }
    assert (await rs.rental(system, rental_id)).status == RentalStatus.OVERDUE


@integration
@pytest.mark.parametrize(
    ("balance", "paid", "due", "after"),
    [
        pytest.param("6000", "5000.00", "0.00", "940.00", id="penalty-fully-paid"),
        pytest.param("500", "440.00", "4560.00", "0.00", id="penalty-mostly-due"),
    ],
)
async def test_lost_bank_is_charged_the_penalty(
    system: Any, balance: str, paid: str, due: str, after: str
) -> None:
    user = await rs.customer(system, balance)
    rental_id, bank, _ = await _lost(system, user)
    row = await rs.rental(system, rental_id)
    assert row.status == RentalStatus.COMPLETED and row.lost_at is not None and row.ended_at == row.lost_at
    assert row.overdue_amount == D(due) and row.amount_paid == D("60.00") + D(paid)
    assert row.payment_status == (PaymentStatus.DUE if D(due) else PaymentStatus.PAID)
    assert await rs.balance(system, user) == D(after)
    assert [t for t, _ in await rs.entries(system, user)] == ["TOPUP", "RENTAL_CHARGE", "PENALTY"]
    assert (await rs.bank(system, bank)).lost_at is not None  # type: ignore[union-attr]
    async with system.services.db.transaction() as session:  # a second run changes nothing
        assert rental_id not in {
            e.rental_id for e in await rentals.complete_lost(session, now=rs.now(), settings=system.settings)
        }
    assert await rs.sound_ledger(system) == 0


@integration
@pytest.mark.parametrize(
    ("balance", "rule", "late_fee_", "refund", "due"),
    [
        # Penalty 5000 paid in full; back 25 h 1 min late (26 started hours): the penalty becomes the
        # late fee, the rest is refunded.
        pytest.param("6000", FLAT_50, "1300.00", "3700.00", "0.00", id="refund-penalty-minus-late-fee"),
        pytest.param("6000", FLAT_50_CAP_500, "600.00", "4400.00", "0.00", id="late-fee-capped"),
        # Late fee larger than the penalty: the penalty is the ceiling, nothing comes back.
        pytest.param(
            "6000", LateFeeRule.flat(D("400")), "5000.00", "0.00", "0.00", id="penalty-is-the-ceiling"
        ),
        # Penalty mostly due (440 paid of 5000): the reversal cancels dues first, nothing to refund.
        pytest.param("500", FLAT_50, "1300.00", "0.00", "860.00", id="reversal-reduces-the-due"),
    ],
)
async def test_lost_bank_that_comes_back(
    system: Any, balance: str, rule: LateFeeRule, late_fee_: str, refund: str, due: str
) -> None:
    user = await rs.customer(system, balance)
    rental_id, bank, _ = await _lost(system, user)
    back_at = await rs.station(system)
    returned = await rs.give_back(system, bank, back_at, at=rs.now(), rule=rule)
    assert returned is not None and returned.refunded == D(refund) and returned.due == D(due)
    row = await rs.rental(system, rental_id)
    assert row.recovered_at is not None and row.status == RentalStatus.COMPLETED
    assert row.return_station is not None and row.return_station.serial_number == back_at
    assert row.amount_paid + row.overdue_amount == D("60.00") + D(late_fee_)  # what it costs in the end
    kinds = [t for t, _ in await rs.entries(system, user)]
    assert kinds == ["TOPUP", "RENTAL_CHARGE", "PENALTY"] + (["REFUND"] if D(refund) else [])
    assert (await rs.bank(system, bank)).lost_at is None  # type: ignore[union-attr]
    # The same 0x40 again changes nothing.
    assert await rs.give_back(system, bank, back_at, at=rs.now(), rule=rule) is None
    assert len(await rs.entries(system, user)) == len(kinds)
    assert await rs.sound_ledger(system) == 0


@integration
async def test_lost_bank_penalty_takes_the_deposit_before_leaving_a_due(system: Any) -> None:
    user = await rs.customer(system, 360)  # 60 package + 300 deposit: nothing left in the wallet
    rental_id, _, _ = await _lost(system, user, deposit="300.00")
    row = await rs.rental(system, rental_id)
    assert (row.deposit_amount, row.deposit_captured) == (D("300.00"), D("300.00"))
    assert row.overdue_amount == D("4700.00") and row.amount_paid == D("360.00")
    assert [t for t, _ in await rs.entries(system, user)] == ["TOPUP", "RENTAL_CHARGE", "DEPOSIT_HOLD"]
    assert await rs.sound_ledger(system) == 0


@integration
async def test_postpaid_lost_bank_pays_usage_up_to_due_and_the_penalty(system: Any) -> None:
    user = await rs.customer(system, 6000)
    pkg = await rs.package(system, price="90.00", minutes=60, model=PaymentModel.POSTPAID)
    rental_id, _, _ = await rs.started(system, user, package_id=pkg, at=rs.now())
    await rs.ago(system, rental_id, hours=26)
    async with system.services.db.transaction() as session:
        await rentals.mark_overdue(session, now=rs.now())
        await rentals.complete_lost(session, now=rs.now(), settings=system.settings)
    row = await rs.rental(system, rental_id)
    assert row.amount_paid == D("5090.00") and row.overdue_amount == 0
    assert await rs.entries(system, user) == [
        ("TOPUP", D("6000")),
        ("RENTAL_CHARGE", D("-90.00")),
        ("PENALTY", D("-5000.00")),
    ]
