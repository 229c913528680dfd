"""Operators: rentals (list, detail, force-complete, refund), rental packages, late-fee configurations,
and the refund review queue. Every change is written to the audit log in its own transaction."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import OperatorUser, PagingDep, Services, ServicesDep, SessionDep, request_ip
from api.envelope import Envelope, Money, Page, ok
from api.idempotency import RequiredIdempotencyDep
from api.schemas import (
    AdminPackageOut,
    AdminRefundOut,
    LateFeeConfigIn,
    LateFeeConfigOut,
    PackageIn,
    PackagePatch,
    RefundReviewIn,
    RentalOut,
)
from domain import audit, refunds, rentals
from storage.models import Rental, RentalStatus, User
from storage.rental_models import REFUND_REASON_MAX, Refund, RefundStatus

router = APIRouter(prefix="/api/admin", tags=["admin"])
log = logging.getLogger(__name__)

PACKAGE_AUDIT_FIELDS = (
    "name",
    "description",
    "duration_minutes",
    "price",
    "package_type",
    "payment_model",
    "is_active",
    "deposit_amount",
)
LATE_FEE_AUDIT_FIELDS = (
    "name",
    "fee_type",
    "multiplier",
    "flat_rate_per_hour",
    "grace_period_minutes",
    "max_daily_rate",
    "is_active",
)
REFUND_AUDIT_FIELDS = ("status", "amount", "rental_id", "review_reason")
RENTAL_AUDIT_FIELDS = ("status", "payment_status", "amount_paid", "overdue_amount", "ended_at")


def _rental_state(rental: Rental) -> dict[str, Any]:
    return {
        **audit.snapshot(rental, RENTAL_AUDIT_FIELDS),
        "return_station_sn": rental.return_station.serial_number if rental.return_station else None,
    }


class AdminRentalOut(RentalOut):
    user_id: uuid.UUID
    failure_reason: str | None
    created_at: datetime
    deposit_amount: Money

    @classmethod
    def build(cls, rental: Rental) -> AdminRentalOut:
        return cls(
            **RentalOut.of(rental).model_dump(),
            user_id=rental.user_id,
            failure_reason=rental.failure_reason,
            created_at=rental.created_at,
            deposit_amount=rental.deposit_amount,
        )


class ForceCompleteIn(BaseModel):
    reason: str = Field(min_length=1, max_length=500)
    return_station_sn: str | None = Field(default=None, min_length=1, max_length=64)


class ForceCompleteOut(BaseModel):
    charged: Money  # collected now
    due: Money  # still owed by the user
    rental: AdminRentalOut


class OperatorRefundIn(BaseModel):
    amount: Decimal = Field(gt=0, le=Decimal("1000000"), decimal_places=2)
    reason: str = Field(min_length=1, max_length=REFUND_REASON_MAX)


@router.get("/rentals")
async def list_rentals(
    operator: OperatorUser,
    session: SessionDep,
    paging: PagingDep,
    rental_status: Annotated[RentalStatus | None, Query(alias="status")] = None,
    user_id: uuid.UUID | None = None,
    station_sn: Annotated[str | None, Query(max_length=64)] = None,
) -> Envelope[Page[AdminRentalOut]]:
    """Every user's rentals, newest first; filters: `status`, `user_id`, `station_sn` (where it started)."""
    rows, count = await rentals.admin_page(
        session,
        page=paging.page,
        page_size=paging.page_size,
        status=rental_status,
        user_id=user_id,
        station_sn=station_sn,
    )
    results = [AdminRentalOut.build(r) for r in rows]
    return ok(Page(results=results, count=count, page=paging.page, page_size=paging.page_size))


@router.get("/rentals/unsettled")
async def unsettled_rentals(
    operator: OperatorUser, svc: ServicesDep, session: SessionDep
) -> Envelope[list[AdminRentalOut]]:
    """PENDING_POPUP rentals older than PENDING_POPUP_RESOLVE_S, oldest first (at most 200): ejects that no
    reply or snapshot has confirmed. They stay open until the cabinet reports, or an operator settles one."""
    cutoff = datetime.now(UTC) - timedelta(seconds=svc.settings.pending_popup_resolve_s)
    return ok([AdminRentalOut.build(r) for r in await rentals.unsettled(session, older_than=cutoff)])


class SettleIn(BaseModel):
    ejected: bool  # true: the bank came out (the rental runs from the eject); false: it did not
    reason: str = Field(min_length=1, max_length=500)


@router.post("/rentals/{rental_id}/settle")
async def settle_unconfirmed(
    rental_id: uuid.UUID, body: SettleIn, operator: OperatorUser, session: SessionDep, request: Request
) -> Envelope[AdminRentalOut]:
    """Settle an unconfirmed eject, audited: `ejected: true` → ACTIVE from the eject, charged by the rules
    (once); `false` → CANCELLED, nothing charged. Any other state → 409 `invalid_state`."""
    before = _rental_state(await rentals.get(session, rental_id))
    await rentals.settle_unconfirmed(session, rental_id=rental_id, ejected=body.ejected, reason=body.reason)
    rental = await rentals.get(session, rental_id)
    await audit.record(
        session,
        actor=operator,
        action="rental.settled",
        target_type="rental",
        target_id=rental_id,
        before=before,
        after={**_rental_state(rental), "reason": body.reason, "ejected": body.ejected},
        ip=request_ip(request),
    )
    return ok(AdminRentalOut.build(rental), "Rental settled.")


@router.get("/rentals/{rental_id}")
async def rental_detail(
    rental_id: uuid.UUID, operator: OperatorUser, session: SessionDep
) -> Envelope[AdminRentalOut]:
    return ok(AdminRentalOut.build(await rentals.get(session, rental_id)))


@router.post("/rentals/{rental_id}/force-complete")
async def force_complete(
    rental_id: uuid.UUID,
    body: ForceCompleteIn,
    operator: OperatorUser,
    svc: ServicesDep,
    session: SessionDep,
    request: Request,
) -> Envelope[ForceCompleteOut]:
    """End an ACTIVE/OVERDUE rental (e.g. the bank was handed back): charged by the rental rules, once.
    A second call, or a rental in any other state, is 409 `invalid_state`."""
    before = _rental_state(await rentals.get(session, rental_id))
    returned = await rentals.force_complete(
        session,
        rental_id=rental_id,
        at=datetime.now(UTC),
        return_station_sn=body.return_station_sn,
        late_fee_per_hour=svc.settings.late_fee_per_hour,
    )
    rental = await rentals.get(session, rental_id)
    await audit.record(
        session,
        actor=operator,
        action="rental.force_completed",
        target_type="rental",
        target_id=rental_id,
        before=before,
        after={**_rental_state(rental), "reason": body.reason, "charged": returned.charged},
        ip=request_ip(request),
    )
    out = ForceCompleteOut(charged=returned.charged, due=returned.due, rental=AdminRentalOut.build(rental))
    return ok(out, "Rental completed.")


@router.post(
    "/rentals/{rental_id}/refund",
    status_code=status.HTTP_201_CREATED,
    response_model=Envelope[AdminRefundOut],
)
async def refund_rental(
    rental_id: uuid.UUID,
    body: OperatorRefundIn,
    operator: OperatorUser,
    svc: ServicesDep,
    request: Request,
    idempotency: RequiredIdempotencyDep,
) -> Envelope[AdminRefundOut] | Response:
    """Give (part of) a completed rental's payment back to the wallet now; more than it can still refund
    is 400 `validation_error`. `Idempotency-Key` is required: a retry with the same key and body replays
    the first answer (success or error) and refunds nothing more; the same key with another body is 409
    `idempotency_key_reused`."""
    ip = request_ip(request)
    return await idempotency.run(
        lambda: _refund(svc, rental_id=rental_id, body=body, operator=operator, ip=ip)
    )


async def _refund(
    svc: Services, *, rental_id: uuid.UUID, body: OperatorRefundIn, operator: User, ip: str | None
) -> Envelope[AdminRefundOut]:
    async with svc.db.transaction() as session:
        refund = await refunds.by_operator(
            session, rental_id=rental_id, amount=body.amount, reason=body.reason, operator_id=operator.id
        )
        await audit.record(
            session,
            actor=operator,
            action="rental.refunded",
            target_type="rental",
            target_id=rental_id,
            after={"refund_id": refund.id, **audit.snapshot(refund, REFUND_AUDIT_FIELDS)},
            ip=ip,
        )
        out = AdminRefundOut.of(refund)
    return ok(out, "Refunded to the wallet.")


@router.get("/packages")
async def list_packages(operator: OperatorUser, session: SessionDep) -> Envelope[list[AdminPackageOut]]:
    """Every package, inactive ones included (the app lists only active ones)."""
    return ok([AdminPackageOut.of(p) for p in await rentals.all_packages(session)])


@router.post("/packages", status_code=status.HTTP_201_CREATED)
async def create_package(
    body: PackageIn, operator: OperatorUser, session: SessionDep, request: Request
) -> Envelope[AdminPackageOut]:
    package = await rentals.create_package(session, **body.model_dump())
    await audit.record(
        session,
        actor=operator,
        action="package.created",
        target_type="package",
        target_id=package.id,
        after=audit.snapshot(package, PACKAGE_AUDIT_FIELDS),
        ip=request_ip(request),
    )
    log.info("event=package_created package_id=%s operator=%s", package.id, operator.id)
    return ok(AdminPackageOut.of(package), "Package created.")


@router.patch("/packages/{package_id}")
async def update_package(
    package_id: int, body: PackagePatch, operator: OperatorUser, session: SessionDep, request: Request
) -> Envelope[AdminPackageOut]:
    changes = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    existing = next((p for p in await rentals.all_packages(session) if p.id == package_id), None)
    before = audit.snapshot(existing, PACKAGE_AUDIT_FIELDS) if existing is not None else None
    package = await rentals.update_package(session, package_id, **changes)
    await session.refresh(package)  # the stored values (e.g. a price of "12" is 12.00)
    await audit.record(
        session,
        actor=operator,
        action="package.updated",
        target_type="package",
        target_id=package.id,
        before=before,
        after=audit.snapshot(package, PACKAGE_AUDIT_FIELDS),
        ip=request_ip(request),
    )
    log.info(
        "event=package_updated package_id=%s operator=%s fields=%s", package.id, operator.id, sorted(changes)
    )
    return ok(AdminPackageOut.of(package), "Package updated.")


@router.get("/late-fee-configs")
async def list_late_fee_configs(
    operator: OperatorUser, session: SessionDep
) -> Envelope[list[LateFeeConfigOut]]:
    return ok([LateFeeConfigOut.of(c) for c in await rentals.late_fee_configurations(session)])


@router.post("/late-fee-configs", status_code=status.HTTP_201_CREATED)
async def create_late_fee_config(
    body: LateFeeConfigIn, operator: OperatorUser, session: SessionDep, request: Request
) -> Envelope[LateFeeConfigOut]:
    """`is_active: true` makes it the one in force at once (the previous one stops)."""
    row = await rentals.create_late_fee_configuration(
        session,
        name=body.name,
        fee_type=body.fee_type,
        multiplier=body.multiplier,
        flat_rate_per_hour=body.flat_rate_per_hour,
        grace_period_minutes=body.grace_period_minutes,
        max_daily_rate=body.max_daily_rate,
        activate=body.is_active,
    )
    await audit.record(
        session,
        actor=operator,
        action="late_fee_config.created",
        target_type="late_fee_config",
        target_id=row.id,
        after=audit.snapshot(row, LATE_FEE_AUDIT_FIELDS),
        ip=request_ip(request),
    )
    log.info("event=late_fee_configuration_created id=%s operator=%s", row.id, operator.id)
    return ok(LateFeeConfigOut.of(row), "Late-fee configuration created.")


@router.post("/late-fee-configs/{config_id}/activate")
async def activate_late_fee_config(
    config_id: int, operator: OperatorUser, session: SessionDep, request: Request
) -> Envelope[LateFeeConfigOut]:
    previous = await rentals.active_late_fee(session)
    row = await rentals.activate_late_fee_configuration(session, config_id)
    await audit.record(
        session,
        actor=operator,
        action="late_fee_config.activated",
        target_type="late_fee_config",
        target_id=row.id,
        before={"active_config_id": previous.id if previous is not None else None},
        after={"active_config_id": row.id},
        ip=request_ip(request),
    )
    log.info("event=late_fee_configuration_activated id=%s operator=%s", row.id, operator.id)
    return ok(LateFeeConfigOut.of(row), "Late-fee configuration active.")


@router.get("/refunds")
async def list_refunds(
    operator: OperatorUser,
    session: SessionDep,
    paging: PagingDep,
    refund_status: Annotated[RefundStatus | None, Query(alias="status")] = None,
) -> Envelope[Page[AdminRefundOut]]:
    """The review queue (`?status=REQUESTED`), oldest first."""
    rows, count = await refunds.listing(
        session, status=refund_status, page=paging.page, page_size=paging.page_size
    )
    results = [AdminRefundOut.of(r) for r in rows]
    return ok(Page(results=results, count=count, page=paging.page, page_size=paging.page_size))


async def _audit_review(
    session: AsyncSession, operator: User, refund: Refund, *, action: str, ip: str
) -> None:
    """A review moves a REQUESTED refund on (approve processes it at once, reject closes it)."""
    await audit.record(
        session,
        actor=operator,
        action=action,
        target_type="refund",
        target_id=refund.id,
        before={"status": RefundStatus.REQUESTED},
        after=audit.snapshot(refund, REFUND_AUDIT_FIELDS),
        ip=ip,
    )


@router.post("/refunds/{refund_id}/approve")
async def approve_refund(
    refund_id: uuid.UUID, body: RefundReviewIn, operator: OperatorUser, session: SessionDep, request: Request
) -> Envelope[AdminRefundOut]:
    """Approving processes the refund at once: the amount is back in the user's wallet (PROCESSED)."""
    refund = await refunds.approve(session, refund_id=refund_id, operator_id=operator.id, reason=body.reason)
    await _audit_review(session, operator, refund, action="refund.approved", ip=request_ip(request))
    return ok(AdminRefundOut.of(refund), "Refund approved and processed.")


@router.post("/refunds/{refund_id}/reject")
async def reject_refund(
    refund_id: uuid.UUID, body: RefundReviewIn, operator: OperatorUser, session: SessionDep, request: Request
) -> Envelope[AdminRefundOut]:
    refund = await refunds.reject(session, refund_id=refund_id, operator_id=operator.id, reason=body.reason)
    await _audit_review(session, operator, refund, action="refund.rejected", ip=request_ip(request))
    return ok(AdminRefundOut.of(refund), "Refund rejected.")
