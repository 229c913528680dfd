from __future__ import annotations

from fastapi import APIRouter

from actors.host import read_live
from api.deps import CurrentUser, PagingDep, ServicesDep, SessionDep
from api.envelope import Envelope, Page, ok
from api.schemas import SlotOut, StationDetailOut, StationOut
from domain import stations

router = APIRouter(prefix="/api/stations", tags=["stations"])


@router.get("")
async def list_stations(
    user: CurrentUser, svc: ServicesDep, session: SessionDep, paging: PagingDep
) -> Envelope[Page[StationOut]]:
    rows, count = await stations.list_page(session, page=paging.page, page_size=paging.page_size)
    live = await read_live(svc.redis, [s.serial_number for s in rows])
    results = [StationOut.of(s, live.get(s.serial_number)) for s in rows]
    return ok(Page(results=results, count=count, page=paging.page, page_size=paging.page_size))


@router.get("/{serial_number}")
async def station_detail(
    serial_number: str, user: CurrentUser, svc: ServicesDep, session: SessionDep
) -> Envelope[StationDetailOut]:
    station = await stations.by_serial(session, serial_number)
    status = await svc.fleet.status(serial_number)
    views = await svc.fleet.slots(serial_number) or []
    online = status is not None and status.online
    item = StationOut.of(station, status)
    slots = [SlotOut.of(v, online=online and status is not None and status.ready) for v in views]
    return ok(StationDetailOut(**item.model_dump(), slots=slots))
