from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Request, Response, status

from api import operations
from api.deps import OperatorUser, Services, ServicesDep, SessionDep, request_ip
from api.envelope import Envelope, ok
from api.idempotency import RequiredIdempotencyDep
from api.schemas import CreditIn, CreditOut, MqttCredentialsOut, ProvisionedOut, StationIn, StationOut
from domain import audit, stations, wallet
from domain.errors import NotFound
from domain.pricing import money
from storage.models import EntryType, User

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


@router.post(
    "/users/{user_id}/wallet/credit", status_code=status.HTTP_201_CREATED, response_model=Envelope[CreditOut]
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
    `idempotency_key_reused`."""
    ip = request_ip(request)
    return await idempotency.run(lambda: _credit(svc, user_id=user_id, body=body, operator=operator, ip=ip))


async def _credit(
    svc: Services, *, user_id: uuid.UUID, body: CreditIn, operator: User, ip: str | None
) -> Envelope[CreditOut]:
    async with svc.db.transaction() as session:
        if await session.get(User, user_id) is None:
            raise NotFound("User not found.", context={"user_id": str(user_id)})
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
