"""The mobile app's response envelope, and the one place errors are mapped to it."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Annotated, Any, Generic, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, PlainSerializer
from starlette.exceptions import HTTPException

from domain.errors import DomainError

log = logging.getLogger(__name__)
T = TypeVar("T")

Money = Annotated[Decimal, PlainSerializer(lambda d: f"{d:.2f}", return_type=str)]


class Envelope(BaseModel, Generic[T]):
    success: bool = True
    message: str = ""
    data: T


class Page(BaseModel, Generic[T]):
    results: list[T]
    count: int
    page: int
    page_size: int


def ok(data: T, message: str = "") -> Envelope[T]:
    return Envelope(data=data, message=message)


def error_response(
    status: int, code: str, message: str, context: dict[str, Any] | None = None
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if context:
        error["context"] = context
    headers = {"Retry-After": str(context["retry_after"])} if context and "retry_after" in context else None
    return JSONResponse({"success": False, "error": error}, status_code=status, headers=headers)


_HTTP_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(request: Request, exc: DomainError) -> JSONResponse:
        log.info("event=request_refused path=%s code=%s", request.url.path, exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.context)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]
        return error_response(
            422, "validation_error", "The request body or parameters are not valid.", {"errors": details}
        )

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("event=unhandled_error path=%s", request.url.path)
        return error_response(500, "internal_error", "Something went wrong on our side; it has been logged.")
