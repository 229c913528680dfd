from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response, status

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
    RentRefused,
    RentRequest,
)
from api.deps import CurrentUser, PagingDep, Services, ServicesDep, SessionDep
from api.envelope import Envelope, Page, ok
from api.idempotency import IdempotencyDep
from api.schemas import PackageOut, RentalOut, RentIn
from domain import rentals
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


def _refusal(outcome: EjectOutcome, station_sn: str) -> DomainError:
    """The error for a rent the cabinet did not serve. Refused before any rental was written (offline,
    not ready, no bank, busy): about the station. After (the eject failed or is unconfirmed): about the
    rental, which is CANCELLED with nothing charged, or stays PENDING_POPUP until the cabinet reports."""
    context = {"rental_id": outcome.request_id, "charged": "0.00"}
    match outcome:
        case KioskOffline():
            return StationOffline(context={"station_sn": station_sn})
        case KioskNotReady():
            return StationNotReady(context={"station_sn": station_sn})
        case NoPowerBank():
            return NoPowerBankAvailable(context={"station_sn": station_sn})
        case KioskBusy():
            return CabinetBusy(context={"station_sn": station_sn})
        case EjectRefused(code=code):
            return EjectFailed(context={**context, "code": f"0x{code:02X}"})
        case EjectUnconfirmed():
            return EjectFailed(
                "The cabinet stopped answering mid-eject; nothing is charged unless it confirms the"
                " power bank came out. Check your active rental in a minute.",
                context={**context, "status": "PENDING_POPUP"},
            )
        case KioskTimedOut() | _:
            return EjectFailed(context=context)


async def rent_slot(request: Request) -> AsyncIterator[None]:
    """One of the API process's `RENT_MAX_IN_FLIGHT` rent slots, held until the answer is ready."""
    with request.app.state.rent_admission.admit():
        yield


@router.post(
    "/start",
    status_code=status.HTTP_201_CREATED,
    response_model=Envelope[RentalOut],
    dependencies=[Depends(rent_slot, scope="function")],
)
async def start_rental(
    body: RentIn, user: CurrentUser, svc: ServicesDep, idempotency: IdempotencyDep
) -> Envelope[RentalOut] | Response:
    """With `Idempotency-Key`, retries replay the first answer and never eject twice."""
    return await idempotency.run(lambda: _start_rental(body, user, svc))


async def _start_rental(body: RentIn, user: User, svc: Services) -> Envelope[RentalOut]:
    """Have the station's kiosk eject a bank for a new rental (its host applies the rental rules and records
    the rental around the eject), then answer with the rental as it stands."""
    rental_id = uuid.uuid4()
    request = RentRequest(rental_id=str(rental_id), user_id=str(user.id), package_id=body.package_id)
    outcome = await svc.fleet.rent(body.station_sn, request)
    if isinstance(outcome, RentRefused):
        raise outcome.error
    if not isinstance(outcome, Ejected):
        raise _refusal(outcome, body.station_sn)
    async with svc.db.transaction() as session:
        rental = await rentals.get(session, rental_id)
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
