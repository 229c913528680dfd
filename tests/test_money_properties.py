"""Money moves exactly once: a stateful property test over the domain layer and the real PostgreSQL.

A `RuleBasedStateMachine` drives random sequences of rent (begin → eject → activate, or a failed
eject), return at another station, extend, cancel inside/outside the window, pay-due, mark-overdue,
top-up through Khalti / eSewa / Stripe (the real clients against the local fakes, and the real
`settle`), refund request → approve/reject — each sometimes retried, sometimes raced (2-4 concurrent
calls in their own transactions). A small model keeps what every wallet must hold (credits - charges
+ refunds, mirroring the rental's bill lines and deposit); after every step each wallet is compared
with the model, and every few steps the whole ledger must balance (`wallet.ledger_imbalance == 0`),
each wallet must equal the sum of its entries and no (account, reference, type) may have moved twice.
A double charge or a double credit shows up as a wallet that differs from the model.

Time: rentals start at the real "now" (their due times are in the future, so the running jobs never
touch them) and every later event of a rental is stamped `started_at + offset`: time travel without
sleeping. The state machine runs in a worker thread on its own event loop with its own `Database`
(the session loop belongs to pytest-asyncio and the running system).
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select

from domain import refunds, rentals, stations, wallet
from domain.errors import ActiveRentalExists, DomainError, InsufficientBalance, InvalidState, ValidationFailed
from domain.payments import service
from domain.payments.outcomes import Paid
from domain.pricing import LateFeeRule, hourly_rate, late_fee, money, postpaid_usage
from storage.db import Database
from storage.models import (
    Account,
    AccountKind,
    LedgerEntry,
    PackageType,
    PaymentModel,
    Rental,
    RentalStatus,
    Role,
    User,
)
from storage.payment_models import Gateway, IntentStatus
from storage.rental_models import Refund, RefundStatus
from tests.conftest import new_phone
from tests.fakes import FakeEsewa, FakeKhalti, FakeStripe, serve

pytestmark = pytest.mark.integration

D = Decimal
ZERO = D("0.00")
MIN_STEPS = int(os.environ.get("MONEY_MIN_STEPS", "10000"))
EXAMPLES = int(os.environ.get("MONEY_EXAMPLES", "52"))
STEPS_PER_EXAMPLE = 200
FULL_CHECK_EVERY = 25  # steps between the whole-ledger checks (each wallet is checked after every step)
RULE = LateFeeRule.flat(D("25.00"))  # passed to every return, whatever configuration is active
GATEWAYS = (Gateway.KHALTI, Gateway.ESEWA, Gateway.STRIPE)

COUNTS: dict[str, int] = {}  # rule name → executions, over the whole test
SECONDS: dict[str, float] = {}  # rule name → seconds spent in it


# --- the harness: one loop, one database, the fakes, stations and packages -----------------------


@dataclass(frozen=True)
class Pkg:
    id: int
    model: PaymentModel
    price: Decimal
    minutes: int
    deposit: Decimal


@dataclass
class Harness:
    loop: asyncio.AbstractEventLoop
    db: Database
    settings: Any
    khalti: FakeKhalti
    esewa: FakeEsewa
    stripe: FakeStripe
    browser: httpx.AsyncClient
    stations: list[str]
    packages: list[Pkg]
    operator_id: uuid.UUID
    next_slot: dict[str, int] = field(default_factory=dict)

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(coro)

    def slot(self, station_sn: str) -> int:
        """A slot nobody has used at this station yet (banks of earlier examples stay in theirs)."""
        self.next_slot[station_sn] = self.next_slot.get(station_sn, 0) + 1
        return self.next_slot[station_sn]


HARNESS: Harness | None = None


async def _setup(stack: AsyncExitStack, loop: asyncio.AbstractEventLoop, base: Any) -> Harness:
    khalti, esewa, stripe = FakeKhalti(), FakeEsewa(), FakeStripe()
    khalti.base_url = await stack.enter_async_context(serve(khalti.app()))
    esewa.base_url = await stack.enter_async_context(serve(esewa.app()))
    stripe.base_url = await stack.enter_async_context(serve(stripe.app()))
    settings_ = base.model_copy(
        update={
            "public_base_url": "http://127.0.0.1:9",
            "payments_sandbox": True,  # the fakes use the gateways' published test credentials
            "app_return_url": None,
            "khalti_base_url": khalti.api_url,
            "khalti_secret_key": khalti.secret_key,
            "esewa_base_url": esewa.base_url,
            "esewa_form_url": esewa.form_url,
            "esewa_product_code": esewa.product_code,
            "esewa_secret_key": esewa.secret_key,
            "stripe_base_url": stripe.base_url,
            "stripe_secret_key": stripe.secret_key,
            "stripe_webhook_secret": stripe.webhook_secret,
        }
    )
    db = Database(base.database_url, pool_size=6)
    stack.push_async_callback(db.dispose)
    browser = await stack.enter_async_context(httpx.AsyncClient(timeout=10))
    sns = []
    async with db.transaction() as session:
        for _ in range(4):
            sn = f"MP{uuid.uuid4().hex[:10].upper()}"
            await stations.provision(
                session,
                serial_number=sn,
                name=sn,
                address="property test",
                latitude=27.7,
                longitude=85.3,
                boards=1,
                holes_per_board=8,
            )
            sns.append(sn)
        specs = [
            (PaymentModel.PREPAID, D("30.00"), 60, ZERO),
            (PaymentModel.PREPAID, D("45.00"), 120, D("40.00")),
            (PaymentModel.POSTPAID, D("60.00"), 60, ZERO),
            (PaymentModel.POSTPAID, D("90.00"), 180, D("25.00")),
        ]
        pkgs = []
        for model, price, minutes, deposit in specs:
            row = await rentals.create_package(
                session,
                name=f"mp {minutes} min {model.value.lower()}",
                description="property test",
                duration_minutes=minutes,
                price=price,
                package_type=PackageType.HOURLY,
                payment_model=model,
                deposit_amount=deposit,
            )
            pkgs.append(Pkg(row.id, model, price, minutes, deposit))
        operator = User(phone=new_phone(), role=Role.OPERATOR)
        session.add(operator)
        await session.flush()
        operator_id = operator.id
    return Harness(loop, db, settings_, khalti, esewa, stripe, browser, sns, pkgs, operator_id)


# --- the model ----------------------------------------------------------------------------------


@dataclass
class Line:
    amount: Decimal
    paid: Decimal

    @property
    def unpaid(self) -> Decimal:
        return self.amount - self.paid


@dataclass
class RentalM:
    id: uuid.UUID
    user: int
    pkg: Pkg
    bank: str
    station: str
    status: RentalStatus = RentalStatus.PENDING_POPUP
    started_at: datetime | None = None
    due_at: datetime | None = None
    extensions: int = 0
    lines: list[Line] = field(default_factory=list)
    held: Decimal = ZERO
    captured: Decimal = ZERO

    @property
    def paid(self) -> Decimal:
        return money(sum((line.paid for line in self.lines), ZERO))

    @property
    def due(self) -> Decimal:
        return money(sum((line.unpaid for line in self.lines), ZERO))


@dataclass
class UserM:
    id: uuid.UUID
    balance: Decimal = ZERO
    rentals: list[RentalM] = field(default_factory=list)

    def open(self) -> RentalM | None:
        for r in self.rentals:
            if r.status in (RentalStatus.PENDING_POPUP, RentalStatus.ACTIVE, RentalStatus.OVERDUE):
                return r
        return None

    def collect(self, rental: RentalM) -> Decimal:
        """rentals._collect: each line takes what it still owes, up to the balance."""
        taken = ZERO
        for line in rental.lines:
            take = min(line.unpaid, self.balance)
            if take > 0:
                line.paid += take
                self.balance -= take
                taken += take
        return taken


@dataclass
class RefundM:
    id: uuid.UUID
    user: int
    rental: RentalM
    amount: Decimal
    status: RefundStatus = RefundStatus.REQUESTED


def expect(outcome: Any, error: type[DomainError] | None) -> None:
    """`outcome` is a result or the DomainError raised; it must be `error` (None: a success)."""
    if error is None:
        assert not isinstance(outcome, BaseException), f"refused: {outcome!r}"
    else:
        assert isinstance(outcome, error), f"expected {error.__name__}, got {outcome!r}"


async def attempt(make: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await make()
    except DomainError as exc:
        return exc


async def race(make: Callable[[], Awaitable[Any]], n: int) -> list[Any]:
    return list(await asyncio.gather(*(attempt(make) for _ in range(n))))


MODES = st.sampled_from(["once", "twice", "race"])


def times(mode: str, n: int) -> int:
    return {"once": 1, "twice": 2, "race": n}[mode]


class MoneyMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        assert HARNESS is not None
        self.h = HARNESS
        self.steps = 0
        self.users: list[UserM] = []
        self.refunds: list[RefundM] = []
        self.banks: dict[str, list[tuple[str, int]]] = {sn: [] for sn in self.h.stations}
        self.pending: dict[uuid.UUID, tuple[str, int]] = {}
        self.current: tuple[str, float] | None = None  # rentals whose eject has not resolved
        self.h.run(self._users(4))
        self.h.run(self._fund())

    async def _users(self, n: int) -> None:
        async with self.h.db.transaction() as session:
            for _ in range(n):
                user = User(phone=new_phone())
                session.add(user)
                await session.flush()
                await wallet.wallet_for(session, user.id)
                self.users.append(UserM(id=user.id))

    async def _fund(self) -> None:
        """A first top-up each (eSewa's intent, settled with its Paid outcome), so renting can start."""
        for user in self.users:
            amount = D(40 + 30 * len(user.rentals) + 35 * self.users.index(user))
            created = await service.create_topup(
                db=self.h.db, settings=self.h.settings, user_id=user.id, amount=amount, gateway=Gateway.ESEWA
            )
            paid = Paid(amount=amount, currency="NPR", transaction_id=None)
            state = await service.settle(self.h.db, intent_id=created.intent.id, outcome=paid)
            assert state.credited and state.balance == amount
            user.balance += amount

    # --- helpers ------------------------------------------------------------------------------

    def tx(self, body: Callable[[Any], Awaitable[Any]]) -> Callable[[], Awaitable[Any]]:
        async def run() -> Any:
            async with self.h.db.transaction() as session:
                return await body(session)

        return run

    def count(self, name: str) -> None:
        COUNTS[name] = COUNTS.get(name, 0) + 1
        self.steps += 1
        self.current = (name, time.monotonic())

    def calls(self, make: Callable[[], Awaitable[Any]], mode: str, n: int) -> list[Any]:
        """One call, the same call retried, or `n` of them at once (in the order they took effect)."""
        if mode == "race":  # they serialize on a row lock: the successes came first
            outcomes = list(self.h.run(race(make, n)))
            return sorted(outcomes, key=lambda o: isinstance(o, BaseException))
        return [self.h.run(attempt(make)) for _ in range(times(mode, n))]

    def rentals_in(self, *statuses: RentalStatus) -> list[RentalM]:
        return [r for u in self.users for r in u.rentals if r.status in statuses]

    # --- top-ups ----------------------------------------------------------------------------------

    # Khalti and Stripe open the payment over HTTP (tens of ms each): top-ups run at most every other step.
    @precondition(lambda self: self.steps % 2 == 0)
    @rule(
        who=st.integers(0, 3),
        gateway=st.sampled_from((Gateway.ESEWA, *GATEWAYS)),
        amount=st.integers(10, 400).map(D) | st.decimals(D("10.00"), D("250.00"), places=2),
        # "settle" applies the gateway's Paid outcome directly; "verify" and "callback" go through the real
        # client and the fake gateway first (slower: a new HTTP client each), so they are rarer.
        paths=st.lists(st.sampled_from(["settle"] * 6 + ["verify", "callback"]), min_size=1, max_size=4),
        concurrent=st.booleans(),
        probe_first=st.integers(0, 5).map(lambda k: k == 0),
        abandon=st.integers(0, 9),
    )
    def top_up(
        self,
        who: int,
        gateway: Gateway,
        amount: Decimal,
        paths: list[str],
        concurrent: bool,
        probe_first: bool,
        abandon: int,
    ) -> None:
        self.count("top_up")
        user = self.users[who]
        amount = money(amount)
        self.h.run(self._top_up(user, gateway, amount, paths, concurrent, probe_first, abandon == 0))

    async def _top_up(
        self,
        user: UserM,
        gateway: Gateway,
        amount: Decimal,
        paths: list[str],
        concurrent: bool,
        probe_first: bool,
        abandon: bool,
    ) -> None:
        h = self.h
        created = await service.create_topup(
            db=h.db, settings=h.settings, user_id=user.id, amount=amount, gateway=gateway
        )
        intent = created.intent
        ref = intent.gateway_ref
        assert ref is not None and intent.status == IntentStatus.PENDING
        if gateway == Gateway.ESEWA:
            assert created.form is not None
            r = await h.browser.post(created.form.action, data=created.form.fields)
            assert r.status_code == 200, r.text
        if probe_first:  # the app asks before the user paid: nothing moves
            state = await service.verify(db=h.db, settings=h.settings, user_id=user.id, intent_id=intent.id)
            assert (state.status, state.credited) == (IntentStatus.PENDING, False)
        if abandon:  # the user gives up: nothing moves, whatever is retried
            state = await service.cancel(db=h.db, settings=h.settings, user_id=user.id, intent_id=intent.id)
            assert state.status == IntentStatus.CANCELLED and not state.credited
            again = await service.verify(db=h.db, settings=h.settings, user_id=user.id, intent_id=intent.id)
            assert again.status == IntentStatus.CANCELLED and not again.credited
            return
        stripe_event: dict[str, Any] | None = None
        khalti_params: dict[str, str] = {}
        if gateway == Gateway.KHALTI:
            khalti_params = h.khalti.pay(ref)
        elif gateway == Gateway.ESEWA:
            h.esewa.pay(ref)
        else:
            stripe_event = h.stripe.succeed(ref)

        def delivery(path: str) -> Callable[[], Awaitable[Any]]:
            if path == "settle":
                paid = Paid(amount=amount, currency="NPR", transaction_id=f"tx-{ref}")
                return lambda: service.settle(h.db, intent_id=intent.id, outcome=paid, source="property")
            if path == "verify":
                return lambda: service.verify(
                    db=h.db, settings=h.settings, user_id=user.id, intent_id=intent.id
                )
            if gateway == Gateway.KHALTI:
                return lambda: service.khalti_callback(db=h.db, settings=h.settings, params=khalti_params)
            if gateway == Gateway.ESEWA:
                data = h.esewa.success_data(ref)
                return lambda: service.esewa_success(db=h.db, settings=h.settings, data=data)
            assert stripe_event is not None
            payload, headers = h.stripe.webhook(stripe_event)
            return lambda: service.stripe_webhook(
                db=h.db, settings=h.settings, payload=payload, signature=headers["Stripe-Signature"]
            )

        if concurrent and len(paths) > 1:
            states = list(await asyncio.gather(*(delivery(p)() for p in paths)))
        else:
            states = [await delivery(p)() for p in paths]
        assert all(s.status == IntentStatus.COMPLETED for s in states), states
        credited = sum(1 for s in states if s.credited)
        assert credited == 1, f"{gateway.value} intent credited {credited} times over {paths}"
        user.balance += amount

    # --- renting ----------------------------------------------------------------------------------

    @rule(
        who=st.integers(0, 3),
        station=st.integers(0, 3),
        pkg=st.integers(0, 3),
        begin_mode=MODES,
        eject=st.sampled_from(["ok", "ok", "ok", "failed", "pending"]),
        activate_mode=MODES,
        n=st.integers(2, 4),
    )
    def rent(
        self, who: int, station: int, pkg: int, begin_mode: str, eject: str, activate_mode: str, n: int
    ) -> None:
        self.count("rent")
        h, user = self.h, self.users[who]
        sn, package = h.stations[station], h.packages[pkg]
        expected: type[DomainError] | None = None
        if user.open() is not None:
            expected = ActiveRentalExists
        elif any(r.due > 0 for r in user.rentals):
            expected = InsufficientBalance
        else:
            floor = (
                package.price if package.model == PaymentModel.PREPAID else h.settings.postpaid_min_balance
            )
            if user.balance < floor + package.deposit:
                expected = InsufficientBalance

        pool = self.banks[sn]
        bank, slot = pool[0] if pool else (f"MB{uuid.uuid4().hex[:12].upper()}", h.slot(sn))

        async def begin(session: Any) -> Any:  # the kiosk chose the bank: recorded with the rental
            rental = await rentals.begin(
                session,
                user_id=user.id,
                station_sn=sn,
                package_id=package.id,
                settings=h.settings,
                bank=rentals.EjectTarget(powerbank_sn=bank, slot_number=slot, soc=90),
            )
            return rental.id

        outcomes = self.calls(self.tx(begin), begin_mode, n)
        if expected is not None:
            for outcome in outcomes:
                expect(outcome, expected)
            return
        winners = [o for o in outcomes if not isinstance(o, BaseException)]
        assert len(winners) == 1, f"{len(winners)} rentals began for one user: {outcomes}"
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                expect(outcome, ActiveRentalExists)
        if pool:
            pool.pop(0)
        rental = RentalM(id=winners[0], user=who, pkg=package, bank=bank, station=sn)
        user.rentals.append(rental)
        if eject == "pending":
            self.pending[rental.id] = (bank, slot)
            return
        if eject == "failed":
            self._fail_eject(rental, bank, slot)
            return
        self._activate(rental, slot, activate_mode, n)

    def _fail_eject(self, rental: RentalM, bank: str, slot: int) -> None:
        """The eject failed: CANCELLED, nothing charged, even when a late 'bank out' follows."""

        async def cancel(session: Any) -> Any:
            return await rentals.cancel_pending(session, rental_id=rental.id, reason="eject_failed")

        self.calls(self.tx(cancel), "twice", 2)
        rental.status = RentalStatus.CANCELLED
        self.banks[rental.station].append((bank, slot))

        async def late(session: Any) -> Any:
            row = await rentals.activate(
                session,
                rental_id=rental.id,
                powerbank_sn=bank,
                slot_number=slot,
                soc=90,
                at=datetime.now(UTC),
            )
            return row.status

        assert self.h.run(self.tx(late)()) == RentalStatus.CANCELLED

    def _activate(self, rental: RentalM, slot: int, mode: str, n: int) -> None:
        user = self.users[rental.user]
        at = datetime.now(UTC).replace(microsecond=0)

        async def activate(session: Any) -> Any:
            row = await rentals.activate(
                session, rental_id=rental.id, powerbank_sn=rental.bank, slot_number=slot, soc=90, at=at
            )
            return row.status

        for outcome in self.calls(self.tx(activate), mode, n):
            expect(outcome, None)
            assert outcome == RentalStatus.ACTIVE
        rental.status = RentalStatus.ACTIVE
        rental.started_at, rental.due_at = at, at + timedelta(minutes=rental.pkg.minutes)
        if rental.pkg.model == PaymentModel.PREPAID:
            rental.lines.append(Line(rental.pkg.price, ZERO))
            user.collect(rental)
        if rental.pkg.deposit > 0:
            rental.held = min(rental.pkg.deposit, user.balance)
            user.balance -= rental.held

    @precondition(lambda self: bool(self.pending))
    @rule(data=st.data(), ejected=st.booleans(), mode=MODES, n=st.integers(2, 3))
    def resolve_eject(self, data: st.DataObject, ejected: bool, mode: str, n: int) -> None:
        """A rental left PENDING_POPUP: the cabinet finally reports the bank out, or the eject failed."""
        self.count("resolve_eject")
        rental_id = data.draw(st.sampled_from(list(self.pending)))  # insertion order: reproducible
        bank, slot = self.pending.pop(rental_id)
        rental = next(r for u in self.users for r in u.rentals if r.id == rental_id)
        if ejected:
            self._activate(rental, slot, mode, n)
        else:
            self._fail_eject(rental, bank, slot)

    # --- returning ------------------------------------------------------------------------------

    @precondition(lambda self: bool(self.rentals_in(RentalStatus.ACTIVE, RentalStatus.OVERDUE)))
    @rule(
        data=st.data(),
        minutes=st.integers(0, 600) | st.integers(0, 70),
        seconds=st.integers(0, 59),
        mode=MODES,
        n=st.integers(2, 4),
    )
    def return_elsewhere(self, data: st.DataObject, minutes: int, seconds: int, mode: str, n: int) -> None:
        self.count("return_elsewhere")
        h = self.h
        rental = data.draw(
            st.sampled_from(self.rentals_in(RentalStatus.ACTIVE, RentalStatus.OVERDUE)), label="rental"
        )
        elsewhere = [sn for sn in h.stations if sn != rental.station]
        sn = data.draw(st.sampled_from(elsewhere), label="station")
        slot = h.slot(sn)
        assert rental.started_at is not None and rental.due_at is not None
        at = rental.started_at + timedelta(minutes=minutes, seconds=seconds)

        async def give_back(session: Any) -> Any:
            return await rentals.complete_by_return(
                session,
                powerbank_sn=rental.bank,
                station_sn=sn,
                slot_number=slot,
                soc=60,
                at=at,
                late_fee_per_hour=h.settings.late_fee_per_hour,
                late_fee_rule=RULE,
            )

        outcomes = self.calls(self.tx(give_back), mode, n)
        for outcome in outcomes:
            expect(outcome, None)
        returned = [o for o in outcomes if o is not None]
        assert len(returned) == 1, f"the return closed the rental {len(returned)} times"
        # The model: what rentals._assess_end adds and rentals._close collects.
        user, pkg = self.users[rental.user], rental.pkg
        before = rental.paid
        if pkg.model == PaymentModel.POSTPAID:
            usage = postpaid_usage(
                price=pkg.price,
                duration_minutes=pkg.minutes,
                started_at=rental.started_at,
                until=min(at, rental.due_at),
            )
            if usage.amount > 0:
                rental.lines.append(Line(usage.amount, ZERO))
        fee = late_fee(
            RULE,
            hourly_rate=hourly_rate(price=pkg.price, duration_minutes=pkg.minutes),
            due_at=rental.due_at,
            ended_at=at,
        )
        if fee.amount > 0:
            rental.lines.append(Line(fee.amount, ZERO))
        user.collect(rental)
        left = rental.held - rental.captured
        for line in rental.lines:
            take = min(line.unpaid, left)
            if take > 0:
                line.paid += take
                rental.captured += take
                left -= take
        user.balance += left
        rental.status = RentalStatus.COMPLETED
        self.banks[sn].append((rental.bank, slot))
        got = returned[0]
        assert (got.charged, got.due) == (money(rental.paid - before), rental.due), (got, rental)

    @precondition(lambda self: self.steps % 16 == 0)
    @rule(station=st.integers(0, 3))
    def return_unknown_bank(self, station: int) -> None:
        """A bank nobody rented comes back: nothing to close, nothing charged."""
        self.count("return_unknown_bank")
        sn = self.h.stations[station]
        bank, slot = f"MB{uuid.uuid4().hex[:12].upper()}", self.h.slot(sn)

        async def give_back(session: Any) -> Any:
            return await rentals.complete_by_return(
                session,
                powerbank_sn=bank,
                station_sn=sn,
                slot_number=slot,
                soc=60,
                at=datetime.now(UTC),
                late_fee_per_hour=self.h.settings.late_fee_per_hour,
                late_fee_rule=RULE,
            )

        assert self.h.run(self.tx(give_back)()) is None
        self.banks[sn].append((bank, slot))

    # --- extending, cancelling, paying what is due ------------------------------------------------------

    @precondition(lambda self: bool(self.rentals_in(RentalStatus.ACTIVE, RentalStatus.OVERDUE)))
    @rule(data=st.data(), mode=MODES, n=st.integers(2, 4))
    def extend(self, data: st.DataObject, mode: str, n: int) -> None:
        """Extensions are not idempotent (each call is a new extension): racing calls must each either
        extend and pay once, or be refused; never more than the maximum, never a lost update."""
        self.count("extend")
        h = self.h
        rental = data.draw(st.sampled_from(self.rentals_in(RentalStatus.ACTIVE, RentalStatus.OVERDUE)))
        same = [p for p in h.packages if p.model == rental.pkg.model]
        pkg = data.draw(st.sampled_from(same), label="package")
        user = self.users[rental.user]
        maximum = h.settings.rental_max_extensions

        async def extend(session: Any) -> Any:
            return await rentals.extend(
                session, rental_id=rental.id, user_id=user.id, package_id=pkg.id, max_extensions=maximum
            )

        outcomes = self.calls(self.tx(extend), mode, n)
        cost = pkg.price if pkg.model == PaymentModel.PREPAID else ZERO
        ok = 0
        for outcome in outcomes:  # in the order the model would accept them
            if rental.status == RentalStatus.OVERDUE or rental.extensions >= maximum:
                expect(outcome, InvalidState)
            elif user.balance < cost:
                expect(outcome, InsufficientBalance)
            else:
                ok += 1
                rental.extensions += 1
                rental.lines.append(Line(cost, cost))
                user.balance -= cost
                assert rental.due_at is not None
                rental.due_at += timedelta(minutes=pkg.minutes)
        assert ok == sum(1 for o in outcomes if not isinstance(o, BaseException)), outcomes

    @precondition(lambda self: any(u.rentals for u in self.users))
    @rule(data=st.data(), seconds=st.integers(0, 400), mode=MODES, n=st.integers(2, 4))
    def cancel(self, data: st.DataObject, seconds: int, mode: str, n: int) -> None:
        self.count("cancel")
        h = self.h
        rental = data.draw(st.sampled_from([r for u in self.users for r in u.rentals]))
        user = self.users[rental.user]
        window = h.settings.cancel_window_s
        now = (rental.started_at or datetime.now(UTC)) + timedelta(seconds=seconds)

        async def cancel(session: Any) -> Any:
            row = await rentals.cancel(
                session, rental_id=rental.id, user_id=user.id, now=now, window_s=window, reason="property"
            )
            return row.status

        outcomes = self.calls(self.tx(cancel), mode, n)
        allowed = rental.status == RentalStatus.COMPLETED and seconds <= window
        # ACTIVE/OVERDUE: the bank is still out (its return completes the rental); others: never.
        if not allowed:
            for outcome in outcomes:
                expect(outcome, InvalidState)
            return
        winners = [o for o in outcomes if not isinstance(o, BaseException)]
        assert len(winners) == 1, f"cancelled {len(winners)} times: {outcomes}"
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                expect(outcome, InvalidState)
        paid = rental.paid
        for line in rental.lines:
            line.amount = line.paid
        if paid > 0:
            user.balance += paid
            rental.lines.append(Line(-paid, -paid))
        rental.status = RentalStatus.CANCELLED

    @precondition(lambda self: bool(self.rentals_in(RentalStatus.COMPLETED, RentalStatus.CANCELLED)))
    @rule(data=st.data(), mode=MODES, n=st.integers(2, 4))
    def pay_due(self, data: st.DataObject, mode: str, n: int) -> None:
        self.count("pay_due")
        owing = [r for r in self.rentals_in(RentalStatus.COMPLETED) if r.due > 0]
        settled = self.rentals_in(RentalStatus.COMPLETED, RentalStatus.CANCELLED)
        prefer_owing = data.draw(st.integers(0, 4), label="prefer owing") > 0
        rental = data.draw(st.sampled_from(owing if owing and prefer_owing else settled))
        user = self.users[rental.user]

        async def pay(session: Any) -> Any:
            return (await rentals.pay_due(session, rental_id=rental.id, user_id=user.id)).amount

        outcomes = self.calls(self.tx(pay), mode, n)
        for outcome in outcomes:
            if rental.due <= 0:
                expect(outcome, InvalidState)
            elif user.balance < rental.due:
                expect(outcome, InsufficientBalance)
            else:
                assert outcome == rental.due, (outcome, rental)
                user.balance -= rental.due
                for line in rental.lines:
                    line.paid = line.amount

    @precondition(lambda self: bool(self.rentals_in(RentalStatus.ACTIVE)))
    @rule(seconds=st.integers(0, 7200))
    def mark_overdue(self, seconds: int) -> None:
        """The overdue job with its clock moved forward (it is idempotent and touches only ACTIVE rentals
        past due); then only status changes: no money moves until the return."""
        self.count("mark_overdue")
        h = self.h
        active = self.rentals_in(RentalStatus.ACTIVE)
        if not active:
            return
        now = min(r.due_at for r in active if r.due_at is not None) + timedelta(seconds=seconds)

        async def job(session: Any) -> tuple[list[Any], int]:
            rule = await rentals.active_late_fee_rule(session)
            events = await rentals.mark_overdue(session, now=now)
            return events, rule.grace_period_minutes if rule else 0

        events, grace = h.run(self.tx(job)())
        marked = {e.rental_id for e in events}
        for rental in active:
            assert rental.due_at is not None
            should = rental.due_at <= now - timedelta(minutes=grace)
            assert (rental.id in marked) == should, (rental, now, grace)
            if should:
                rental.status = RentalStatus.OVERDUE

    # --- refunds ----------------------------------------------------------------------------------------

    @precondition(lambda self: any(u.rentals for u in self.users))
    @rule(data=st.data(), share=st.integers(1, 100), mode=MODES, n=st.integers(2, 3))
    def request_refund(self, data: st.DataObject, share: int, mode: str, n: int) -> None:
        self.count("request_refund")
        rental = data.draw(st.sampled_from([r for u in self.users for r in u.rentals]))
        user = self.users[rental.user]

        def refundable() -> Decimal:
            asked = sum(
                (f.amount for f in self.refunds if f.rental is rental and f.status in refunds.PENDING), ZERO
            )
            return max(ZERO, rental.paid - asked)

        available = refundable()
        amount = max(money(available * share / 100), D("0.01")) if available > 0 else D("1.00")

        async def ask(session: Any) -> Any:
            refund = await refunds.request(
                session, user_id=user.id, rental_id=rental.id, amount=amount, reason="property"
            )
            return refund.id

        for outcome in self.calls(self.tx(ask), mode, n):
            pending = any(f.rental is rental and f.status == RefundStatus.REQUESTED for f in self.refunds)
            if rental.status != RentalStatus.COMPLETED:
                expect(outcome, InvalidState)
            elif amount > refundable():
                expect(outcome, ValidationFailed)
            elif pending:
                expect(outcome, InvalidState)
            else:
                expect(outcome, None)
                self.refunds.append(RefundM(outcome, rental.user, rental, amount))

    @precondition(lambda self: any(f.status == RefundStatus.REQUESTED for f in self.refunds))
    @rule(data=st.data(), approve=st.booleans(), mode=MODES, n=st.integers(2, 4), reprocess=st.booleans())
    def review_refund(self, data: st.DataObject, approve: bool, mode: str, n: int, reprocess: bool) -> None:
        self.count("review_refund")
        h = self.h
        refund = data.draw(st.sampled_from([f for f in self.refunds if f.status == RefundStatus.REQUESTED]))
        user, rental = self.users[refund.user], refund.rental

        async def review(session: Any) -> Any:
            act = refunds.approve if approve else refunds.reject
            row = await act(session, refund_id=refund.id, operator_id=h.operator_id, reason="property")
            return row.status

        outcomes = self.calls(self.tx(review), mode, n)
        winners = [o for o in outcomes if not isinstance(o, BaseException)]
        if approve and refund.amount > rental.paid:  # cancelled (refunded) since the request
            for outcome in outcomes:
                expect(outcome, InvalidState)
            return
        assert len(winners) == 1, f"reviewed {len(winners)} times: {outcomes}"
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                expect(outcome, InvalidState)
        if not approve:
            assert winners == [RefundStatus.REJECTED]
            refund.status = RefundStatus.REJECTED
            return
        assert winners == [RefundStatus.PROCESSED]
        refund.status = RefundStatus.PROCESSED
        user.balance += refund.amount
        rental.lines.append(Line(-refund.amount, -refund.amount))
        if reprocess:  # the processing step retried: already PROCESSED, no money

            async def process(session: Any) -> Any:
                return (await refunds.process(session, refund_id=refund.id)).status

            for outcome in self.calls(self.tx(process), "race", n):
                assert outcome == RefundStatus.PROCESSED

    # --- invariants -------------------------------------------------------------------------------

    @invariant()
    def wallets_match_the_model(self) -> None:
        if self.current is not None:
            name, began = self.current
            SECONDS[name] = SECONDS.get(name, 0.0) + time.monotonic() - began
            self.current = None
        if not self.users:
            return
        ids = [u.id for u in self.users]

        async def read(session: Any) -> dict[uuid.UUID, Decimal]:
            rows = await session.execute(
                select(Account.user_id, Account.balance).where(
                    Account.kind == AccountKind.WALLET, Account.user_id.in_(ids)
                )
            )
            return {uid: balance for uid, balance in rows.tuples()}

        balances = self.h.run(self.tx(read)())
        for user in self.users:
            assert balances[user.id] >= 0, ("negative wallet", user.id, balances[user.id])
            assert balances[user.id] == user.balance, (
                f"wallet {user.id} holds {balances[user.id]}, the model expects {user.balance}"
            )
        if self.steps and self.steps % FULL_CHECK_EVERY == 0:
            self.h.run(self._full_check())

    async def _full_check(self) -> None:
        ids = [u.id for u in self.users]
        async with self.h.db.transaction() as session:
            assert await wallet.ledger_imbalance(session) == 0
            sums = await session.execute(
                select(Account.user_id, Account.balance, func.coalesce(func.sum(LedgerEntry.amount), 0))
                .outerjoin(LedgerEntry, LedgerEntry.account_id == Account.id)
                .where(Account.kind == AccountKind.WALLET, Account.user_id.in_(ids))
                .group_by(Account.user_id, Account.balance)
            )
            for uid, balance, total in sums.tuples():
                assert balance == total, ("wallet differs from its entries", uid, balance, total)
            twice = (
                await session.execute(
                    select(LedgerEntry.account_id, LedgerEntry.reference, LedgerEntry.type, func.count())
                    .join(Account, Account.id == LedgerEntry.account_id)
                    .where(Account.user_id.in_(ids))
                    .group_by(LedgerEntry.account_id, LedgerEntry.reference, LedgerEntry.type)
                    .having(func.count() > 1)
                )
            ).all()
            assert not twice, ("a reference moved money twice", twice)
            mine = [r for u in self.users for r in u.rentals]
            rows = await session.execute(
                select(Rental.id, Rental.status, Rental.amount_paid, Rental.overdue_amount).where(
                    Rental.id.in_([r.id for r in mine])
                )
            )
            db_rows = {rid: (status, paid, due) for rid, status, paid, due in rows.tuples()}
            for r in mine:
                assert db_rows[r.id] == (r.status, r.paid, r.due), (r, db_rows[r.id])
            refund_rows = await session.execute(
                select(Refund.id, Refund.status).where(Refund.id.in_([f.id for f in self.refunds]))
            )
            statuses = {rid: status for rid, status in refund_rows.tuples()}
            for f in self.refunds:
                assert statuses[f.id] == f.status, (f, statuses[f.id])

    def teardown(self) -> None:
        if self.users:
            self.h.run(self._full_check())


# --- the test -----------------------------------------------------------------------------------


def _run(base: Any) -> float:
    global HARNESS
    loop = asyncio.new_event_loop()
    stack = AsyncExitStack()
    try:
        HARNESS = loop.run_until_complete(_setup(stack, loop, base))
        started = time.monotonic()
        # Hypothesis ends some runs before STEPS_PER_EXAMPLE: run more examples until MIN_STEPS were done.
        examples = EXAMPLES
        for _ in range(6):
            run_state_machine_as_test(
                MoneyMachine,
                settings=settings(
                    max_examples=examples,
                    stateful_step_count=STEPS_PER_EXAMPLE,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                    print_blob=True,
                    report_multiple_bugs=False,
                    # Shrinking a 200-step run against the database takes minutes: opt in with MONEY_SHRINK=1.
                    phases=[p for p in Phase if p != Phase.shrink or os.environ.get("MONEY_SHRINK")],
                ),
            )
            missing = MIN_STEPS - sum(COUNTS.values())
            if missing <= 0:
                break
            examples = missing // (STEPS_PER_EXAMPLE * 3 // 4) + 1
        return time.monotonic() - started
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()
        HARNESS = None


@pytest.mark.timeout(600)
async def test_money_moves_exactly_once(system: Any) -> None:
    COUNTS.clear()
    SECONDS.clear()
    elapsed = await asyncio.to_thread(_run, system.settings)
    total = sum(COUNTS.values())
    print(f"\nmoney properties: {total} operations in {elapsed:.1f}s")
    for name in sorted(COUNTS):
        print(f"  {name:20} {COUNTS[name]:6} {1000 * SECONDS.get(name, 0.0) / COUNTS[name]:7.1f} ms each")
    assert total >= MIN_STEPS, (total, COUNTS)


async def test_concurrent_cancels_answer_once(system: Any) -> None:
    """Two cancels of one completed rental at once: one cancels and refunds, the other is refused. Tried a
    few times, as the loser must read the rental before the winner commits."""
    from tests import rental_support as rs

    window = system.settings.cancel_window_s

    async def cancel(rental_id: uuid.UUID, user_id: uuid.UUID, now: datetime) -> Any:
        async with system.services.db.transaction() as session:
            row = await rentals.cancel(
                session, rental_id=rental_id, user_id=user_id, now=now, window_s=window
            )
            return row.status

    for _ in range(8):
        user = await rs.customer(system, 100)
        pkg = await rs.package(system, price="30.00", minutes=60)
        started = rs.now().replace(microsecond=0)
        rental_id, bank, _ = await rs.started(system, user, package_id=pkg, at=started)
        elsewhere = await rs.station(system)
        assert await rs.give_back(system, bank, elsewhere, at=started + timedelta(minutes=2)) is not None
        make = functools.partial(cancel, rental_id, user.id, started + timedelta(minutes=3))
        outcomes = await asyncio.gather(*(attempt(make) for _ in range(2)))
        assert await rs.balance(system, user) == D("100.00")  # refunded exactly once, whatever answered
        assert sum(1 for o in outcomes if not isinstance(o, BaseException)) == 1, outcomes
