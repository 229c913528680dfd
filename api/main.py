"""The FastAPI app: routers assembled in one place, errors mapped once, metrics for the whole fleet."""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import api.routers
from api import limits
from api.admin_ui import mount_admin
from api.admission import Admission
from api.deps import Services
from api.envelope import install_error_handlers
from api.text_guard import RefuseUnstorableText
from domain import rentals as rental_rules
from telemetry import metrics


def routers() -> list[APIRouter]:
    """Every `router` of the modules in `api/routers/`, in name order: one module per domain."""
    names = sorted(m.name for m in pkgutil.iter_modules(api.routers.__path__))
    return [importlib.import_module(f"api.routers.{name}").router for name in names]


class ObserveLatency:
    """`powerbank_http_request_seconds{route, method, status}`, as pure ASGI middleware (Starlette's
    BaseHTTPMiddleware cost about 0.5 ms of CPU per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.HTTP_SECONDS.labels(route=route, method=scope["method"], status=str(status)).observe(
                time.perf_counter() - started
            )


def create_app(
    services: Services, *, remote_metrics: Callable[[], Awaitable[list[Any]]] | None = None
) -> FastAPI:
    """`remote_metrics` returns the metric families of the actor processes (hosts, broker)."""
    app = FastAPI(
        title="ChargeGhar orchestrator",
        version="0.1.0",
        description="Mobile app, operator and cabinet API of the shared power-bank network.",
    )
    app.state.services = services
    app.state.rent_admission = Admission(
        "rentals_start", limit=services.settings.rent_max_in_flight, retry_after_s=1
    )
    install_error_handlers(app)
    # added before the body cap, so it runs inside it: it reads only bodies the cap has bounded
    app.add_middleware(RefuseUnstorableText, path_templates=lambda: app.openapi()["paths"])
    limits.install(
        app,
        max_body_bytes=services.settings.http_max_body_bytes,
        max_upload_bytes=services.settings.http_max_upload_bytes,
    )
    for router in routers():
        app.include_router(router)
    mount_admin(app, services)

    app.add_middleware(ObserveLatency)

    @app.get("/healthz", tags=["system"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", tags=["system"])
    async def metrics_endpoint() -> Response:
        async with services.db.transaction() as session:
            for status, count in (await rental_rules.open_counts(session)).items():
                metrics.RENTALS_ACTIVE.labels(status=status.value.lower()).set(count)
        remote = await remote_metrics() if remote_metrics else []
        return Response(metrics.render(remote), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/api/schema/", include_in_schema=False)
    async def schema() -> JSONResponse:
        return JSONResponse(app.openapi())

    return app
