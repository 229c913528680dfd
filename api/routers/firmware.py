"""HTTP endpoints that cabinet firmware calls (docs/rentbox-v1.md, section 5).

Their answers use the firmware's own `{"code", "msg", "data", "time"}` shape, not the app's envelope.
`sign` has no secret, so it only proves the caller speaks the protocol, not that it is the cabinet. Hence:
an HTTP upload is a hint, never evidence (only a 0x10 is taken, and it only makes a connected cabinet answer
`check` over its authenticated MQTT session); the boot call issues credentials only to provisioned cabinets
that never logged in or that an operator opened a re-provisioning window for, at a limited rate.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

import rentbox
from api.deps import ServicesDep, request_ip
from domain import ratelimit, stations
from domain.errors import NotFound, RateLimited
from telemetry.metrics import FIRMWARE_REQUESTS, FIRMWARE_UPLOADS_IGNORED

router = APIRouter(tags=["cabinet firmware"])
log = logging.getLogger(__name__)
MAX_UPLOAD_BYTES = 5 + 10 * (6 + 15 * 8)  # the largest snapshot: 10 boards of 8 holes
HOUR_S = 3600


def _answer(
    endpoint: str, code: int, msg: str, data: str | None = None, *, headers: dict[str, str] | None = None
) -> JSONResponse:
    FIRMWARE_REQUESTS.labels(endpoint=endpoint, result=str(code)).inc()
    body = {"code": code, "msg": msg, "data": data, "time": int(time.time() * 1000)}
    return JSONResponse(body, status_code=code, headers=headers)


def _signed(request: Request) -> bool:
    params = dict(request.query_params)
    return "sign" in params and rentbox.sign(params) == params["sign"].lower()


@router.get("/api/iot/client/con")
async def client_connection(request: Request, uuid: str, svc: ServicesDep, version: str = "") -> JSONResponse:
    """Boot call: MQTT settings with a fresh secret (only its hash is stored), so the cabinet's next MQTT
    login uses the password given here. Anyone who knows an SN can call it, so it issues credentials only to a
    provisioned cabinet that has never logged in, or inside a re-provisioning window an operator opened
    (409 otherwise: the cabinet keeps the password it has); any MQTT session of the cabinet is closed when
    new credentials go out. Calls are limited per client IP, and issued credentials per cabinet (429); a
    refused call does not use up the cabinet's budget."""
    ip = request_ip(request)
    if not _signed(request):
        log.warning("event=firmware_bad_sign endpoint=con station_sn=%s ip=%s", uuid, ip)
        return _answer("con", 403, "bad sign")
    settings = svc.settings
    now = datetime.now(UTC)
    try:
        await ratelimit.hit(
            svc.redis,
            scope="firmware_con_ip",
            subject=ip,
            limit=settings.con_per_ip_per_hour,
            window_s=HOUR_S,
        )
        async with svc.db.transaction() as session:
            station = await stations.by_serial(session, uuid, lock=True)
            refusal = stations.boot_call_refusal(station, now)
            if refusal is None:
                await ratelimit.hit(
                    svc.redis,
                    scope="firmware_con_sn",
                    subject=uuid,
                    limit=settings.con_per_cabinet_per_hour,
                    window_s=HOUR_S,
                )
                password = await stations.issue_boot_credentials(session, uuid, ip=ip, now=now)
    except NotFound:
        log.warning("event=firmware_unknown_cabinet endpoint=con station_sn=%s ip=%s", uuid, ip)
        return _answer("con", 404, "cabinet not provisioned: ask an operator to add it")
    except RateLimited as exc:
        retry_after = str(exc.context["retry_after"])
        log.warning(
            "event=firmware_rate_limited endpoint=con station_sn=%s ip=%s retry_after=%s",
            uuid,
            ip,
            retry_after,
        )
        return _answer("con", 429, "too many requests", headers={"Retry-After": retry_after})
    if refusal is not None:
        log.warning(
            "event=firmware_credentials_refused reason=%s station_sn=%s ip=%s version=%s",
            refusal,
            uuid,
            ip,
            version,
        )
        return _answer("con", 409, "cabinet registered: ask an operator to open a re-provisioning window")
    if await svc.fleet.disconnect(uuid):  # whoever held a session with the old credentials
        log.warning("event=cabinet_session_closed reason=credentials_issued station_sn=%s", uuid)
    fields = [
        uuid,
        settings.mqtt_product_key,
        settings.public_mqtt_host,
        str(settings.mqtt_port),
        uuid,
        password,
        str(int(time.time() * 1000)),
    ]
    log.info("event=firmware_credentials_issued station_sn=%s version=%s ip=%s", uuid, version, ip)
    return _answer("con", 200, "ok", ",".join(fields))


def _upload_refused(station_sn: str, ip: str, reason: str, detail: str) -> JSONResponse:
    FIRMWARE_UPLOADS_IGNORED.labels(reason=reason).inc()
    log.warning(
        "event=http_upload_ignored station_sn=%s ip=%s reason=%s detail=%s", station_sn, ip, reason, detail
    )
    return _answer("upload", 400, "only a valid 0x10 snapshot frame is accepted")


@router.post("/api/rentbox/upload/data")
async def upload_data(request: Request, rentboxSN: str, svc: ServicesDep) -> JSONResponse:
    """A periodic 0x10 snapshot over HTTP. Anyone who knows the SN can post one, so it is never applied: a
    cabinet connected over MQTT is asked `check` instead (rate-limited) and its authenticated answer is
    applied; otherwise the upload is only logged and counted. Other frames are refused (400)."""
    ip = request_ip(request)
    if not _signed(request):
        log.warning("event=firmware_bad_sign endpoint=upload station_sn=%s ip=%s", rentboxSN, ip)
        return _answer("upload", 403, "bad sign")
    body = await request.body()
    if len(body) > MAX_UPLOAD_BYTES:
        return _answer("upload", 413, "frame too large")
    async with svc.db.transaction() as session:
        model = await stations.station_model(session, rentboxSN)
    if model is None:
        return _answer("upload", 404, "cabinet not provisioned")
    try:
        decoded = rentbox.decode(
            body, holes_per_board=model.holes_per_board, strict_checksum=svc.settings.strict_checksum
        )
    except rentbox.FrameError as err:
        return _upload_refused(rentboxSN, ip, "invalid_frame", err.reason)
    if not isinstance(decoded.frame, rentbox.Snapshot):
        return _upload_refused(rentboxSN, ip, "not_snapshot", f"0x{decoded.cmd:02X}")
    await svc.fleet.upload(rentboxSN, body)
    return _answer("upload", 200, "ok")


@router.get("/api/rentbox/config/data")
async def config_data() -> JSONResponse:
    """Vendor-specific cabinet configuration: no settings to push yet, so the firmware keeps its defaults."""
    return _answer("config", 200, "ok", "")
