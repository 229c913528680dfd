"""Operators: rental packages, late-fee configurations, and the refund review queue."""

from __future__ import annotations

import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, status

from api.deps import OperatorUser, PagingDep, SessionDep
from api.envelope import Envelope, Page, ok
from api.schemas import (
    AdminPackageOut,
    AdminRefundOut,
    LateFeeConfigIn,
    LateFeeConfigOut,
    PackageIn,
    PackagePatch,
    RefundReviewIn,
)
from domain import refunds, rentals
from storage.rental_models import RefundStatus

router = APIRouter(prefix="/api/admin", tags=["admin"])
log = logging.getLogger(__name__)


@router.get("/packages")
async def list_packages(operator: OperatorUser, session: SessionDep) -> Envelope[list[AdminPackageOut]]:
    """Every package, inactive ones included (the app lists only active ones)."""
    return ok([AdminPackageOut.of(p) for p in await rentals.all_packages(session)])


@router.post("/packages", status_code=status.HTTP_201_CREATED)
async def create_package(
    body: PackageIn, operator: OperatorUser, session: SessionDep
) -> Envelope[AdminPackageOut]:
    package = await rentals.create_package(session, **body.model_dump())
    log.info("event=package_created package_id=%s operator=%s", package.id, operator.id)
    return ok(AdminPackageOut.of(package), "Package created.")


@router.patch("/packages/{package_id}")
async def update_package(
    package_id: int, body: PackagePatch, operator: OperatorUser, session: SessionDep
) -> Envelope[AdminPackageOut]:
    changes = {k: v for k, v in body.model_dump(exclude_unset=True).items() if v is not None}
    package = await rentals.update_package(session, package_id, **changes)
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
    body: LateFeeConfigIn, operator: OperatorUser, session: SessionDep
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
    log.info("event=late_fee_configuration_created id=%s operator=%s", row.id, operator.id)
    return ok(LateFeeConfigOut.of(row), "Late-fee configuration created.")


@router.post("/late-fee-configs/{config_id}/activate")
async def activate_late_fee_config(
    config_id: int, operator: OperatorUser, session: SessionDep
) -> Envelope[LateFeeConfigOut]:
    row = await rentals.activate_late_fee_configuration(session, config_id)
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


@router.post("/refunds/{refund_id}/approve")
async def approve_refund(
    refund_id: uuid.UUID, body: RefundReviewIn, operator: OperatorUser, session: SessionDep
) -> Envelope[AdminRefundOut]:
    """Approving processes the refund at once: the amount is back in the user's wallet (PROCESSED)."""
    refund = await refunds.approve(session, refund_id=refund_id, operator_id=operator.id, reason=body.reason)
    return ok(AdminRefundOut.of(refund), "Refund approved and processed.")


@router.post("/refunds/{refund_id}/reject")
async def reject_refund(
    refund_id: uuid.UUID, body: RefundReviewIn, operator: OperatorUser, session: SessionDep
) -> Envelope[AdminRefundOut]:
    refund = await refunds.reject(session, refund_id=refund_id, operator_id=operator.id, reason=body.reason)
    return ok(AdminRefundOut.of(refund), "Refund rejected.")
