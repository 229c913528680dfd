"""Double-entry wallet ledger: every movement is two entries that sum to zero, at most once per reference.

A wallet never goes below zero (a CHECK constraint, and `transfer` refuses); what a user owes beyond
their balance is recorded as a due on the rental (`overdue_amount`, payment_status DUE), never as a
negative balance. Operations on one wallet serialize on its row lock.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal

from sqlalchemy import case, func, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from domain.errors import InsufficientBalance, ValidationFailed
from domain.pricing import money
from storage.models import Account, AccountKind, EntryType, LedgerEntry
from telemetry.metrics import LEDGER_ENTRIES


@dataclass(frozen=True, slots=True, kw_only=True)
class Movement:
    transfer_id: uuid.UUID
    amount: Decimal
    balance_after: Decimal
    applied: bool  # False when this reference had already moved money (a retry)


def _locked(session: AsyncSession) -> dict[int, Account]:
    """The accounts this transaction holds FOR UPDATE, by id: their balances in memory are current (only
    `transfer` changes a balance, and it keeps the objects in step), so they are not read again."""
    current = session.sync_session.get_transaction()
    held: tuple[object, dict[int, Account]] | None = session.info.get(_LOCKED)
    if held is None or held[0] is not current:
        held = session.info[_LOCKED] = (current, {})
    return held[1]


_LOCKED = "wallet.locked_accounts"


async def wallet_for(session: AsyncSession, user_id: uuid.UUID, *, lock: bool = False) -> Account:
    """The user's wallet account, created on first use."""
    locked = _locked(session)
    for held in locked.values():
        if held.user_id == user_id:
            return held
    stmt = select(Account).where(Account.kind == AccountKind.WALLET, Account.user_id == user_id)
    if lock:
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    account = (await session.execute(stmt)).scalar_one_or_none()
    if account is None:
        account = Account(kind=AccountKind.WALLET, user_id=user_id, balance=Decimal("0.00"))
        session.add(account)
        await session.flush()
        if lock:
            await session.execute(select(Account.id).where(Account.id == account.id).with_for_update())
    if lock:
        locked[account.id] = account
    return account


async def system_account(session: AsyncSession, kind: AccountKind) -> Account:
    for account in _locked(session).values():
        if account.kind == kind and account.user_id is None:
            return account
    stmt = select(Account).where(Account.kind == kind, Account.user_id.is_(None))
    return (await session.execute(stmt)).scalar_one()


async def transfer(
    session: AsyncSession,
    *,
    source: Account,
    target: Account,
    amount: Decimal,
    type: EntryType,
    reference: str,
) -> Movement:
    """Move `amount` from source to target once per (reference, type). Locks both rows in id order."""
    amount = money(amount)
    if amount <= 0:
        raise ValidationFailed("Amounts must be positive.", context={"amount": str(amount)})
    # The wallet first, then system accounts by id: every path that pre-locks a wallet (charge_up_to,
    # hold) takes its locks in the same order as this, so two operations never wait on each other.
    locked = _locked(session)
    to_lock = [a.id for a in (source, target) if a.id not in locked]
    if to_lock:
        rows = await session.execute(
            select(Account)
            .where(Account.id.in_(to_lock))
            .order_by(Account.kind != AccountKind.WALLET, Account.id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        locked.update((a.id, a) for a in rows.scalars())
    done = (
        await session.execute(
            select(LedgerEntry.transfer_id, LedgerEntry.balance_after).where(
                LedgerEntry.account_id == target.id,
                LedgerEntry.reference == reference,
                LedgerEntry.type == type,
            )
        )
    ).first()
    if done is not None:
        return Movement(
            transfer_id=done.transfer_id, amount=amount, balance_after=done.balance_after, applied=False
        )
    if source.kind == AccountKind.WALLET and source.balance < amount:
        raise InsufficientBalance(context={"balance": str(source.balance), "required": str(amount)})
    transfer_id = uuid.uuid4()
    balances = {source.id: money(source.balance - amount), target.id: money(target.balance + amount)}
    await session.execute(
        update(Account)
        .where(Account.id.in_(list(balances)))
        .values(balance=case(balances, value=Account.id))
        .execution_options(synchronize_session=False)
    )
    await session.execute(
        insert(LedgerEntry),
        [
            {
                "transfer_id": transfer_id,
                "account_id": account.id,
                "type": type,
                "amount": signed,
                "balance_after": balances[account.id],
                "reference": reference,
            }
            for account, signed in ((source, -amount), (target, amount))
        ],
    )
    for account in (source, target):  # in step with the row, and not "changed" for the ORM to write again
        set_committed_value(account, "balance", balances[account.id])
    LEDGER_ENTRIES.labels(type=type.value).inc(2)
    wallet_side = source if source.kind == AccountKind.WALLET else target
    signed = -amount if wallet_side is source else amount
    return Movement(transfer_id=transfer_id, amount=signed, balance_after=wallet_side.balance, applied=True)


async def credit(
    session: AsyncSession, *, user_id: uuid.UUID, amount: Decimal, type: EntryType, reference: str
) -> Movement:
    """Money from outside (gateway, operator) into a wallet."""
    wallet = await wallet_for(session, user_id)
    funding = await system_account(session, AccountKind.FUNDING)
    return await transfer(
        session, source=funding, target=wallet, amount=amount, type=type, reference=reference
    )


async def debit(
    session: AsyncSession, *, user_id: uuid.UUID, amount: Decimal, type: EntryType, reference: str
) -> Movement:
    """Money from a wallet to revenue (rental charges, late fees)."""
    wallet = await wallet_for(session, user_id)
    revenue = await system_account(session, AccountKind.REVENUE)
    return await transfer(
        session, source=wallet, target=revenue, amount=amount, type=type, reference=reference
    )


async def ledger_imbalance(session: AsyncSession) -> Decimal:
    """Sum over all accounts of (balance - sum of its entries), plus the sum of all entries: 0 when sound."""
    entries = select(LedgerEntry.account_id, func.sum(LedgerEntry.amount).label("total")).group_by(
        LedgerEntry.account_id
    )
    sub = entries.subquery()
    drift = await session.scalar(
        select(
            func.coalesce(func.sum(func.abs(Account.balance - func.coalesce(sub.c.total, 0))), 0)
        ).select_from(Account.__table__.outerjoin(sub, Account.id == sub.c.account_id))
    )
    total = await session.scalar(select(func.coalesce(func.sum(LedgerEntry.amount), 0)))
    return money(Decimal(drift or 0) + abs(Decimal(total or 0)))


async def hold_account(session: AsyncSession) -> Account:
    """The system account deposits are held in while rentals run (created on first use)."""
    await session.execute(
        insert(Account)
        .values(kind=AccountKind.HOLD, user_id=None, balance=Decimal("0.00"), currency="NPR")
        .on_conflict_do_nothing(index_elements=["kind"], index_where=text("user_id IS NULL"))
    )
    return await system_account(session, AccountKind.HOLD)


async def charge_up_to(
    session: AsyncSession, *, user_id: uuid.UUID, amount: Decimal, type: EntryType, reference: str
) -> Decimal:
    """Debit as much of `amount` as the wallet holds (to revenue); what it returns is what was taken."""
    if amount <= 0:
        return Decimal("0.00")
    account = await wallet_for(session, user_id, lock=True)
    take = money(min(amount, account.balance))
    if take <= 0:
        return Decimal("0.00")
    movement = await debit(session, user_id=user_id, amount=take, type=type, reference=reference)
    return take if movement.applied else Decimal("0.00")


async def refund(session: AsyncSession, *, user_id: uuid.UUID, amount: Decimal, reference: str) -> Movement:
    """Give money that was charged back: revenue → wallet, type REFUND."""
    wallet = await wallet_for(session, user_id, lock=True)
    revenue = await system_account(session, AccountKind.REVENUE)
    return await transfer(
        session, source=revenue, target=wallet, amount=amount, type=EntryType.REFUND, reference=reference
    )


async def hold_up_to(
    session: AsyncSession, *, user_id: uuid.UUID, amount: Decimal, reference: str
) -> Decimal:
    """Move up to `amount` from the wallet into the hold account (DEPOSIT_HOLD); what was held."""
    if amount <= 0:
        return Decimal("0.00")
    wallet = await wallet_for(session, user_id, lock=True)
    take = money(min(amount, wallet.balance))
    if take <= 0:
        return Decimal("0.00")
    held = await hold_account(session)
    movement = await transfer(
        session, source=wallet, target=held, amount=take, type=EntryType.DEPOSIT_HOLD, reference=reference
    )
    return take if movement.applied else Decimal("0.00")


async def release(session: AsyncSession, *, user_id: uuid.UUID, amount: Decimal, reference: str) -> Movement:
    """Give a held deposit back: hold → wallet, type DEPOSIT_RELEASE."""
    wallet = await wallet_for(session, user_id, lock=True)
    held = await hold_account(session)
    return await transfer(
        session,
        source=held,
        target=wallet,
        amount=amount,
        type=EntryType.DEPOSIT_RELEASE,
        reference=reference,
    )


async def capture(session: AsyncSession, *, amount: Decimal, type: EntryType, reference: str) -> Movement:
    """Keep (part of) a held deposit for what it covers: hold → revenue, typed as the charge it pays."""
    held = await hold_account(session)
    revenue = await system_account(session, AccountKind.REVENUE)
    return await transfer(session, source=held, target=revenue, amount=amount, type=type, reference=reference)
