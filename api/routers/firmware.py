"""HTTP endpoints that cabinet firmware calls (shared/protocol/rentbox-v1.md, section 5).

Their answers use the firmware's own `{"code", "msg", "data", "time"}` shape, not the app's envelope.
`sign` has no secret, so it only proves the caller speaks the protocol: credentials are issued only to
stations an operator provisioned, and whatever a cabinet sends is applied only to its own SN.
"""

from __future__ import annotations

import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

import rentbox
from actors.kiosk import HTTP_UPLOAD
from api.deps import ServicesDep
from domain import stations
from domain.errors import NotFound
from telemetry.metrics import FIRMWARE_REQUESTS

router = APIRouter(tags=["cabinet firmware"])
log = logging.getLogger(__name__)
MAX_UPLOAD_BYTES = 5 + 10 * (6 + 15 * 8)  # the largest snapshot: 10 boards of 8 holes


def _answer(endpoint: str, code: int, msg: str, data: str | None = None) -> JSONResponse:
    FIRMWARE_REQUESTS.labels(endpoint=endpoint, result=str(code)).inc()
    body = {"code": code, "msg": msg, "data": data, "time": int(time.time() * 1000)}
    return JSONResponse(body, status_code=code)


def _signed(request: Request) -> bool:
    params = dict(request.query_params)
    return "sign" in params and rentbox.sign(params) == params["sign"].lower()


@router.get("/api/iot/client/con")
async def client_connection(request: Request, uuid: str, svc: ServicesDep, version: str = "") -> JSONResponse:
    """Boot call: MQTT settings for a provisioned cabinet. Issues a fresh secret each time (only its hash is
    stored), so the cabinet's next MQTT login uses the password given here."""
    if not _signed(request):
        log.warning("event=firmware_bad_sign endpoint=con station_sn=%s", uuid)
        return _answer("con", 403, "bad sign")
    settings = svc.settings
    try:
        async with svc.db.transaction() as session:
            password = await stations.rotate_secret(session, uuid)
    except NotFound:
        log.warning("event=firmware_unknown_cabinet endpoint=con station_sn=%s", uuid)
        return _answer("con", 404, "cabinet not provisioned: ask an operator to add it")
    fields = [
        uuid,
        settings.mqtt_product_key,
        settings.public_mqtt_host,
        str(settings.mqtt_port),
        uuid,
        password,
        str(int(time.time() * 1000)),
    ]
    log.info("event=firmware_credentials_issued station_sn=%s version=%s", uuid, version)
    return _answer("con", 200, "ok", ",".join(fields))


@router.post("/api/rentbox/upload/data")
async def upload_data(request: Request, rentboxSN: str, svc: ServicesDep) -> JSONResponse:
    """A periodic snapshot over HTTP: the raw 0x10 frame, handled like one arriving over MQTT."""
    if not _signed(request):
        log.warning("event=firmware_bad_sign endpoint=upload station_sn=%s", rentboxSN)
        return _answer("upload", 403, "bad sign")
    body = await request.body()
    if len(body) > MAX_UPLOAD_BYTES:
        return _answer("upload", 413, "frame too large")
    async with svc.db.transaction() as session:
        if await stations.station_model(session, rentboxSN) is None:
            return _answer("upload", 404, "cabinet not provisioned")
    await svc.fleet.frame(rentboxSN, HTTP_UPLOAD, body)
    return _answer("upload", 200, "ok")


@router.get("/api/rentbox/config/data")
async def config_data() -> JSONResponse:
    """Vendor-specific cabinet configuration: no settings to push yet, so the firmware keeps its defaults."""
    return _answer("config", 200, "ok", "")
