from __future__ import annotations

from fastapi import APIRouter, Response, status

from actors.messages import (
    Ejected,
    EjectOutcome,
    EjectRefused,
    EjectUnconfirmed,
    KioskBusy,
    KioskNotReady,
    KioskOffline,
    KioskTimedOut,
    NoPowerBank,
)
from api.deps import CurrentUser, PagingDep, Services, ServicesDep, SessionDep
from api.envelope import Envelope, Page, ok
from api.idempotency import IdempotencyDep
from api.schemas import PackageOut, RentalOut, RentIn
from domain import rentals, stations
from domain.errors import (
    CabinetBusy,
    DomainError,
    EjectFailed,
    NoPowerBankAvailable,
    StationNotReady,
    StationOffline,
)
from storage.models import User

router = APIRouter(prefix="/api/rentals", tags=["rentals"])


@router.get("/packages")
async def list_packages(user: CurrentUser, session: SessionDep) -> Envelope[list[PackageOut]]:
    return ok([PackageOut.of(p) for p in await rentals.packages(session)])


def _refusal(outcome: EjectOutcome) -> DomainError:
    context = {"rental_id": outcome.request_id, "charged": "0.00"}
    match outcome:
        case KioskOffline():
            return StationOffline(context=context)
        case KioskNotReady():
            return StationNotReady(context=context)
        case NoPowerBank():
            return NoPowerBankAvailable(context=context)
        case EjectRefused(code=code):
            return EjectFailed(context={**context, "code": f"0x{code:02X}"})
        case KioskBusy():
            return CabinetBusy(context=context)
        case EjectUnconfirmed():
            return EjectFailed(
                "The cabinet stopped answering mid-eject; nothing is charged unless it confirms the"
                " power bank came out. Check your active rental in a minute.",
                context={**context, "status": "PENDING_POPUP"},
            )
        case KioskTimedOut() | _:
            return EjectFailed(context=context)


@router.post("/start", status_code=status.HTTP_201_CREATED, response_model=Envelope[RentalOut])
async def start_rental(
    body: RentIn, user: CurrentUser, svc: ServicesDep, idempotency: IdempotencyDep
) -> Envelope[RentalOut] | Response:
    """With `Idempotency-Key`, retries replay the first answer and never eject twice."""
    return await idempotency.run(lambda: _start_rental(body, user, svc))


async def _start_rental(body: RentIn, user: User, svc: Services) -> Envelope[RentalOut]:
    """Write a PENDING_POPUP rental, have the cabinet eject, answer with the rental as it then stands."""
    async with svc.db.transaction() as session:
        await stations.by_serial(session, body.station_sn)
    live = await svc.fleet.status(body.station_sn)
    if live is None or not live.online:
        raise StationOffline(context={"station_sn": body.station_sn})
    if not live.ready:
        raise StationNotReady(context={"station_sn": body.station_sn})
    if live.available_power_banks == 0:
        raise NoPowerBankAvailable(context={"station_sn": body.station_sn})
    async with svc.db.transaction() as session:
        rental = await rentals.begin(
            session,
            user_id=user.id,
            station_sn=body.station_sn,
            package_id=body.package_id,
            settings=svc.settings,
        )
    outcome = await svc.fleet.rent(body.station_sn, str(rental.id))
    if not isinstance(outcome, Ejected):
        raise _refusal(outcome)
    async with svc.db.transaction() as session:
        rental = await rentals.get(session, rental.id)
    return ok(RentalOut.of(rental), "Take your power bank.")


@router.get("/active")
async def active_rental(user: CurrentUser, session: SessionDep) -> Envelope[RentalOut | None]:
    rental = await rentals.open_rental(session, user.id)
    return ok(RentalOut.of(rental) if rental else None)


@router.get("/history")
async def rental_history(
    user: CurrentUser, session: SessionDep, paging: PagingDep
) -> Envelope[Page[RentalOut]]:
    rows, count = await rentals.history(session, user.id, page=paging.page, page_size=paging.page_size)
    return ok(
        Page(
            results=[RentalOut.of(r) for r in rows], count=count, page=paging.page, page_size=paging.page_size
        )
    )
