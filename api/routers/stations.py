from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi import status as http_status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, model_validator

from actors.host import live_key, read_live
from api.deps import CurrentUser, PagingDep, ServicesDep, SessionDep
from api.envelope import Envelope, Page, ok
from api.schemas import SlotOut, StationDetailOut, StationOut
from domain import stations
from storage.models import Station
from storage.station_models import ISSUE_DESCRIPTION_MAX, StationIssueReport, StationIssueType

router = APIRouter(prefix="/api/stations", tags=["stations"])


class NearbyStationOut(StationOut):
    distance_km: float  # great-circle distance from the query point, 3 decimals (metres)


class FavoriteStationOut(StationOut):
    favorited_at: datetime


class FavoriteOut(BaseModel):
    serial_number: str
    is_favorite: bool
    favorited_at: datetime | None


class IssueReportIn(BaseModel):
    issue_type: StationIssueType
    description: str = Field(default="", max_length=ISSUE_DESCRIPTION_MAX)

    @model_validator(mode="after")
    def other_needs_words(self) -> IssueReportIn:
        self.description = self.description.strip()
        if self.issue_type == StationIssueType.OTHER and not self.description:
            raise ValueError("describe the issue when its type is OTHER")
        return self


class IssueReportOut(BaseModel):
    id: uuid.UUID
    station_sn: str
    issue_type: StationIssueType
    description: str
    status: str
    created_at: datetime

    @classmethod
    def of(cls, station: Station, report: StationIssueReport) -> IssueReportOut:
        return cls(
            id=report.id,
            station_sn=station.serial_number,
            issue_type=report.issue_type,
            description=report.description,
            status=report.status.value,
            created_at=report.created_at,
        )


@router.get("")
async def list_stations(
    user: CurrentUser, svc: ServicesDep, session: SessionDep, paging: PagingDep
) -> Envelope[Page[StationOut]]:
    rows, count = await stations.list_page(session, page=paging.page, page_size=paging.page_size)
    live = await read_live(svc.redis, [s.serial_number for s in rows])
    results = [StationOut.of(s, live.get(s.serial_number)) for s in rows]
    return ok(Page(results=results, count=count, page=paging.page, page_size=paging.page_size))


@router.get("/nearby")
async def nearby_stations(
    user: CurrentUser,
    svc: ServicesDep,
    session: SessionDep,
    paging: PagingDep,
    lat: Annotated[
        float,
        Query(ge=-stations.GEO_MAX_LATITUDE, le=stations.GEO_MAX_LATITUDE, allow_inf_nan=False),
    ],
    lng: Annotated[float, Query(ge=-180, le=180, allow_inf_nan=False)],
    radius: Annotated[float | None, Query(gt=0, allow_inf_nan=False, description="km")] = None,
    available: Annotated[bool, Query(description="only stations that can rent now")] = False,
) -> Envelope[Page[NearbyStationOut]]:
    """Stations within `radius` km (default NEARBY_DEFAULT_RADIUS_KM), nearest first, paged like the list."""
    radius_km = svc.settings.nearby_default_radius_km if radius is None else radius
    if radius_km > svc.settings.nearby_max_radius_km:
        raise RequestValidationError(
            [
                {
                    "type": "less_than_equal",
                    "loc": ("query", "radius"),
                    "msg": f"Input should be less than or equal to {svc.settings.nearby_max_radius_km}",
                    "input": radius,
                }
            ]
        )
    await stations.ensure_geo_index(session, svc.redis, live_key=live_key)
    rows, count = await stations.nearby_page(
        session,
        svc.redis,
        latitude=lat,
        longitude=lng,
        radius_km=radius_km,
        available_only=available,
        page=paging.page,
        page_size=paging.page_size,
    )
    live = await read_live(svc.redis, [s.serial_number for s, _ in rows])
    results = [
        NearbyStationOut(
            **StationOut.of(s, live.get(s.serial_number)).model_dump(), distance_km=round(distance, 3)
        )
        for s, distance in rows
    ]
    return ok(Page(results=results, count=count, page=paging.page, page_size=paging.page_size))


@router.get("/favorites")
async def favorite_stations(
    user: CurrentUser, svc: ServicesDep, session: SessionDep
) -> Envelope[list[FavoriteStationOut]]:
    """The user's favorite stations, most recently added first (a short plain list)."""
    rows = await stations.favorites(session, user_id=user.id)
    live = await read_live(svc.redis, [s.serial_number for s, _ in rows])
    return ok(
        [
            FavoriteStationOut(**StationOut.of(s, live.get(s.serial_number)).model_dump(), favorited_at=since)
            for s, since in rows
        ]
    )


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


@router.post("/{serial_number}/favorite", status_code=http_status.HTTP_201_CREATED)
async def add_favorite(
    serial_number: str, user: CurrentUser, svc: ServicesDep, session: SessionDep, response: Response
) -> Envelope[FavoriteOut]:
    """Idempotent: 201 when the station becomes a favorite, 200 when it already was one."""
    station, since, created = await stations.add_favorite(
        session, user_id=user.id, serial_number=serial_number, limit=svc.settings.station_favorites_max
    )
    if not created:
        response.status_code = http_status.HTTP_200_OK
    out = FavoriteOut(serial_number=station.serial_number, is_favorite=True, favorited_at=since)
    return ok(out, "Added to favorites." if created else "Already a favorite.")


@router.delete("/{serial_number}/favorite")
async def remove_favorite(
    serial_number: str, user: CurrentUser, session: SessionDep
) -> Envelope[FavoriteOut]:
    """Idempotent: 200 whether or not the station was a favorite."""
    removed = await stations.remove_favorite(session, user_id=user.id, serial_number=serial_number)
    out = FavoriteOut(serial_number=serial_number, is_favorite=False, favorited_at=None)
    return ok(out, "Removed from favorites." if removed else "Not a favorite.")


@router.post("/{serial_number}/report-issue", status_code=http_status.HTTP_201_CREATED)
async def report_issue(
    serial_number: str, body: IssueReportIn, user: CurrentUser, svc: ServicesDep, session: SessionDep
) -> Envelope[IssueReportOut]:
    station, report = await stations.report_issue(
        session,
        user_id=user.id,
        serial_number=serial_number,
        issue_type=body.issue_type,
        description=body.description,
        per_hour=svc.settings.station_issue_reports_per_hour,
    )
    return ok(IssueReportOut.of(station, report), "Issue reported: thank you.")
