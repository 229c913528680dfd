from __future__ import annotations

import logging
import uuid

from fastapi import APIRouter, Request, status

from api import operations
from api.deps import OperatorUser, ServicesDep, SessionDep
from api.envelope import Envelope, ok
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
        ip=request.client.host if request.client else None,
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


@router.post("/users/{user_id}/wallet/credit", status_code=status.HTTP_201_CREATED)
async def credit_wallet(
    user_id: uuid.UUID, body: CreditIn, operator: OperatorUser, session: SessionDep, request: Request
) -> Envelope[CreditOut]:
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
        ip=request.client.host if request.client else None,
    )
    log.info(
        "event=wallet_credited user_id=%s amount=%s operator=%s reason=%r",
        user_id,
        body.amount,
        operator.id,
        body.reason,
    )
    return ok(
        CreditOut(
            user_id=user_id,
            amount=body.amount,
            balance=movement.balance_after,
            transfer_id=movement.transfer_id,
        )
    )
