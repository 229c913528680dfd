from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from decimal import Decimal

from fastapi import APIRouter, Request, Response, status
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession

from api import operations
from api.deps import OperatorUser, Services, ServicesDep, SessionDep, request_ip
from api.envelope import Envelope, Money, ok
from api.idempotency import RequiredIdempotencyDep
from api.schemas import CreditIn, CreditOut, MqttCredentialsOut, ProvisionedOut, StationIn, StationOut
from domain import audit, credit_approvals, stations, wallet
from domain.errors import NotFound
from domain.pricing import money
from storage.models import EntryType, User
from storage.payment_models import CreditApproval

router = APIRouter(prefix="/api/admin", tags=["admin"])
log = logging.getLogger(__name__)


@router.post("/stations", status_code=status.HTTP_201_CREATED)
async def provision_station(
    body: StationIn, operator: OperatorUser, svc: ServicesDep, session: SessionDep, request: Request
) -> Envelope[ProvisionedOut]:
    station, secret = await stations.provision(session, **body.model_dump())
    await audit.record(
        session,
        actor=operator,
        action="station.provisioned",
        target_type="station",
        target_id=station.serial_number,
        after=audit.snapshot(station, operations.STATION_AUDIT_FIELDS),
        ip=request_ip(request),
    )
    log.info("event=station_provisioned station_sn=%s operator=%s", station.serial_number, operator.id)
    mqtt = MqttCredentialsOut(
        host=svc.settings.public_mqtt_host,
        port=svc.settings.mqtt_port,
        username=station.serial_number,
        password=secret,
        product_key=svc.settings.mqtt_product_key,
    )
    item = StationOut.of(station, None)
    return ok(
        ProvisionedOut(**item.model_dump(), mqtt=mqtt), "Station provisioned: the password is shown only now."
    )


class CreditPendingOut(BaseModel):
    approval_id: uuid.UUID
    status: str = "PENDING_APPROVAL"
    user_id: uuid.UUID
    amount: Money
    credited_today: Money  # by this operator, before this credit
    daily_cap: Money


@router.post(
    "/users/{user_id}/wallet/credit",
    status_code=status.HTTP_201_CREATED,
    response_model=Envelope[CreditOut],
    responses={
        202: {
            "model": Envelope[CreditPendingOut],
            "description": "over the daily cap: awaits a second operator",
        }
    },
)
async def credit_wallet(
    user_id: uuid.UUID,
    body: CreditIn,
    operator: OperatorUser,
    svc: ServicesDep,
    request: Request,
    idempotency: RequiredIdempotencyDep,
) -> Envelope[CreditOut] | Response:
    """Money in: credit a user's wallet now. `Idempotency-Key` is required: a retry with the same key and
    body replays the first answer and credits nothing more; the same key with another body is 409
    `idempotency_key_reused`. A credit that would take this operator past STAFF_DAILY_CREDIT_CAP in 24 hours
    is not made: 202 with a PENDING approval for a second operator (`/api/admin/credit-approvals`)."""
    ip = request_ip(request)
    return await idempotency.run(lambda: _credit(svc, user_id=user_id, body=body, operator=operator, ip=ip))


async def _credit(
    svc: Services, *, user_id: uuid.UUID, body: CreditIn, operator: User, ip: str | None
) -> Envelope[CreditOut] | JSONResponse:
    """One transaction: the cap check (serialised per operator) and the credit or the held request."""
    async with svc.db.transaction() as session:
        if await session.get(User, user_id) is None:
            raise NotFound("User not found.", context={"user_id": str(user_id)})
        cap = svc.settings.staff_daily_credit_cap
        so_far = await credit_approvals.credited_today(session, operator, now=datetime.now(UTC))
        if so_far + body.amount > cap:
            return await _hold(
                session, user_id=user_id, body=body, operator=operator, ip=ip, so_far=so_far, cap=cap
            )
        reference = f"operator-credit:{uuid.uuid4()}"
        movement = await wallet.credit(
            session, user_id=user_id, amount=body.amount, type=EntryType.TOPUP, reference=reference
        )
        await audit.record(
            session,
            actor=operator,
            action="wallet.credited",
            target_type="user",
            target_id=user_id,
            before={"balance": money(movement.balance_after - body.amount)},
            after={
                "balance": movement.balance_after,
                "amount": money(body.amount),
                "reason": body.reason,
                "reference": reference,
            },
            ip=ip,
        )
    log.info(
        "event=wallet_credited user_id=%s amount=%s operator=%s reason=%r reference=%s",
        user_id,
        body.amount,
        operator.id,
        body.reason,
        reference,
    )
    return ok(
        CreditOut(
            user_id=user_id,
            amount=body.amount,
            balance=movement.balance_after,
            transfer_id=movement.transfer_id,
        )
    )


async def _hold(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    body: CreditIn,
    operator: User,
    ip: str | None,
    so_far: Decimal,
    cap: Decimal,
) -> JSONResponse:
    """Over the cap: a PENDING approval instead of the credit (202), audited."""
    approval = await credit_approvals.request(
        session, user_id=user_id, amount=body.amount, reason=body.reason, operator=operator
    )
    await audit.record(
        session,
        actor=operator,
        action="wallet.credit_requested",
        target_type="credit_approval",
        target_id=approval.id,
        after={
            "user_id": str(user_id),
            "amount": money(body.amount),
            "reason": body.reason,
            "credited_today": money(so_far),
        },
        ip=ip,
    )
    log.info(
        "event=wallet_credit_held approval_id=%s operator=%s amount=%s", approval.id, operator.id, body.amount
    )
    pending = CreditPendingOut(
        approval_id=approval.id, user_id=user_id, amount=body.amount, credited_today=so_far, daily_cap=cap
    )
    message = "Over your daily credit cap: a second operator must approve it."
    return JSONResponse(jsonable_encoder(ok(pending, message)), status_code=status.HTTP_202_ACCEPTED)


class ApprovalOut(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID
    amount: Money
    reason: str
    status: str
    requested_by: uuid.UUID
    decided_by: uuid.UUID | None
    decision_reason: str | None
    created_at: datetime
    decided_at: datetime | None

    @classmethod
    def of(cls, row: CreditApproval) -> ApprovalOut:
        return cls.model_validate(row, from_attributes=True)


class RejectIn(BaseModel):
    reason: str = Field(min_length=1, max_length=200)


@router.get("/credit-approvals")
async def pending_credit_approvals(
    operator: OperatorUser, session: SessionDep
) -> Envelope[list[ApprovalOut]]:
    """Credits over their operator's daily cap, waiting for a second operator, oldest first."""
    return ok([ApprovalOut.of(row) for row in await credit_approvals.pending(session)])


@router.post("/credit-approvals/{approval_id}/approve")
async def approve_credit(
    approval_id: uuid.UUID, operator: OperatorUser, session: SessionDep, request: Request
) -> Envelope[ApprovalOut]:
    """Make the held credit (once; not by the operator who asked for it: 403). Audited."""
    movement = await credit_approvals.approve(session, approval_id, decider=operator)
    row = await session.get(CreditApproval, approval_id)
    assert row is not None
    after = {"amount": money(row.amount), "balance": movement.balance_after, "user_id": str(row.user_id)}
    await audit.record(
        session,
        actor=operator,
        action="wallet.credit_approved",
        target_type="credit_approval",
        target_id=approval_id,
        after=after,
        ip=request_ip(request),
    )
    return ok(ApprovalOut.of(row), "Approved: the wallet is credited.")


@router.post("/credit-approvals/{approval_id}/reject")
async def reject_credit(
    approval_id: uuid.UUID, body: RejectIn, operator: OperatorUser, session: SessionDep, request: Request
) -> Envelope[ApprovalOut]:
    row = await credit_approvals.reject(session, approval_id, decider=operator, reason=body.reason)
    await audit.record(
        session,
        actor=operator,
        action="wallet.credit_rejected",
        target_type="credit_approval",
        target_id=approval_id,
        after={"reason": body.reason},
        ip=request_ip(request),
    )
    return ok(ApprovalOut.of(row), "Rejected: nothing was credited.")
