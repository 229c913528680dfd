"""`Idempotency-Key` for any endpoint: a dependency whose `run` executes the work at most once per key.

Adopting it is one parameter and one line — the work moves into a function of its own::

    @router.post("/wallet/topup-intent", status_code=201, response_model=Envelope[IntentOut])
    async def topup_intent(
        body: TopupIn, user: CurrentUser, svc: ServicesDep, idempotency: IdempotencyDep
    ) -> Envelope[IntentOut] | Response:
        return await idempotency.run(lambda: _topup_intent(body, user, svc))

Without the header, `run` just awaits the work (the endpoint behaves as before). With it (Stripe's
semantics, rules in `domain.idempotency`):

- the key is scoped per user and per endpoint (method + route template); ≤ 255 characters, else 400;
- the first request claims the key, runs the work, and its response — success *or* error, including
  an unexpected 500 — is stored (status, headers, exact JSON text) and replayed to every retry with the
  same key and the same request for `IDEMPOTENCY_TTL_S`, with `Idempotent-Replayed: true`. Errors are
  replayed because the work had started: whether a cabinet ejected or money moved before the failure is
  not something a retry may find out by doing it again. A request that fails *before* any work — a bad
  token (401), a body that does not validate (422), a bad key (400) — claims nothing and stores nothing,
  so a corrected retry with the same key runs;
- the same key with a different request → 409 `idempotency_key_reused`; a retry while the first
  still runs → 409 `idempotency_request_in_progress` with `Retry-After` (nothing waits on a lock);
- once claimed, the work runs to the end and its result is stored even if the client disconnects
  meanwhile, so the client's retry finds the answer instead of a key stuck "in progress".

The work should open its own transactions (`svc.db.transaction()`): it may outlive the request.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse, Response

from api.deps import CurrentUser, Services, ServicesDep
from domain import idempotency as rules
from domain.errors import ValidationFailed
from storage.models import User

log = logging.getLogger(__name__)
T = TypeVar("T")

KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"

_running: set[asyncio.Task[Response]] = set()  # claimed work outliving a disconnected client


class Idempotency:
    """The `Idempotency-Key` of one request (or none); `run(work)` is where the work happens."""

    def __init__(self, *, request: Request, services: Services, user: User, key: str | None) -> None:
        self.request, self.services, self.user, self.key = request, services, user, key

    @property
    def endpoint(self) -> str:
        route = self.request.scope.get("route")
        return f"{self.request.method} {getattr(route, 'path', self.request.url.path)}"

    async def run(self, work: Callable[[], Awaitable[T]]) -> T | Response:
        """Await `work()` once per key; its result, or the first result under this key replayed."""
        if self.key is None:
            return await work()
        settings = self.services.settings
        request_hash = rules.request_fingerprint(
            await self.request.body(),
            path_params=self.request.path_params,
            query=self.request.query_params.multi_items(),
        )
        async with self.services.db.transaction() as session:
            claimed = await rules.claim(
                session,
                user_id=self.user.id,
                endpoint=self.endpoint,
                key=self.key,
                request_hash=request_hash,
                ttl_s=settings.idempotency_ttl_s,
                retry_after_s=settings.idempotency_retry_after_s,
            )
        if isinstance(claimed, rules.Stored):
            return _replay(claimed)
        task = asyncio.ensure_future(self._execute(claimed.record_id, work))
        _running.add(task)
        task.add_done_callback(_running.discard)
        return await asyncio.shield(task)

    async def _execute(self, record_id: int, work: Callable[[], Awaitable[T]]) -> Response:
        try:
            response = self._render(await work())
        except Exception as exc:  # every outcome of started work is the key's answer, errors included
            response = await self._error_response(exc)
        stored = rules.Stored(
            status=response.status_code,
            headers={k: v for k, v in response.headers.items() if k != "content-length"},
            body=bytes(response.body).decode(),
        )
        async with self.services.db.transaction() as session:
            await rules.complete(session, record_id=record_id, response=stored)
        return response

    def _render(self, result: object) -> Response:
        if isinstance(result, Response):
            if not hasattr(result, "body"):
                raise TypeError("an idempotent endpoint must answer with a complete body, not a stream")
            return result
        status_code = getattr(self.request.scope.get("route"), "status_code", None) or 200
        return JSONResponse(jsonable_encoder(result), status_code=status_code)

    async def _error_response(self, exc: Exception) -> Response:
        """The response the app's own exception handlers give (errors are mapped in one place)."""
        handlers = self.request.app.exception_handlers
        handler = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)
        if handler is None:
            raise exc
        response = handler(self.request, exc)
        if inspect.isawaitable(response):
            response = await response
        if not isinstance(response, Response):
            raise exc
        return response


def _replay(stored: rules.Stored) -> Response:
    return Response(
        content=stored.body.encode(),
        status_code=stored.status,
        headers={**stored.headers, REPLAYED_HEADER: "true"},
    )


async def idempotency(
    request: Request,
    services: ServicesDep,
    user: CurrentUser,
    key: Annotated[
        str | None,
        Header(
            alias=KEY_HEADER,
            description=(
                "Retries with the same key and body replay the first response (for IDEMPOTENCY_TTL_S, "
                f"24 h by default); ≤ {rules.MAX_KEY_LENGTH} characters."
            ),
        ),
    ] = None,
) -> Idempotency:
    if key is not None and not 1 <= len(key) <= rules.MAX_KEY_LENGTH:
        raise ValidationFailed(
            f"{KEY_HEADER} must be 1 to {rules.MAX_KEY_LENGTH} characters.",
            context={"max_length": rules.MAX_KEY_LENGTH, "length": len(key)},
        )
    return Idempotency(request=request, services=services, user=user, key=key)


IdempotencyDep = Annotated[Idempotency, Depends(idempotency)]


async def required_idempotency(
    request: Request,
    services: ServicesDep,
    user: CurrentUser,
    key: Annotated[
        str,
        Header(
            alias=KEY_HEADER,
            description=(
                "Required: the operators' money routes move money once per key. Retries with the same key "
                "and body replay the first response (for IDEMPOTENCY_TTL_S, 24 h by default); the same key "
                f"with another body is 409 `idempotency_key_reused`; ≤ {rules.MAX_KEY_LENGTH} characters."
            ),
        ),
    ],
) -> Idempotency:
    """`api.idempotency` with the key required: without it the request is refused (422 `validation_error`)
    before any work; the key's rules (length → 400) and semantics are that module's.

    An operator's credit or refund has no once-only reference a retry could be recognised by (each call
    is a new movement), so the client names the attempt; the app's user routes keep the key optional."""
    return await idempotency(request, services, user, key)


RequiredIdempotencyDep = Annotated[Idempotency, Depends(required_idempotency)]
