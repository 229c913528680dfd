from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentUser, ServicesDep, SessionDep
from api.envelope import Envelope, ok
from api.schemas import IdentifierIn, LoginOut, OtpRequested, RefreshIn, TokensOut, UserOut, VerifyIn
from domain import auth

router = APIRouter(prefix="/api/auth", tags=["auth"])


@router.post("/otp/request")
async def request_otp(body: IdentifierIn, svc: ServicesDep, session: SessionDep) -> Envelope[OtpRequested]:
    expires_in = await auth.request_code(
        session, identifier=body.identifier, settings=svc.settings, sms=svc.sms
    )
    return ok(OtpRequested(expires_in=expires_in), "A one-time code was sent.")


@router.post("/otp/verify")
async def verify_otp(body: VerifyIn, svc: ServicesDep) -> Envelope[LoginOut]:
    # Its own transaction, so a wrong code's attempt count is kept even though the request fails.
    async with svc.db.sessions() as session:
        try:
            user, is_new = await auth.verify_code(
                session, identifier=body.identifier, code=body.otp, settings=svc.settings
            )
        finally:
            await session.commit()
    tokens = auth.issue_tokens(user, svc.settings)
    return ok(
        LoginOut(access=tokens.access, refresh=tokens.refresh, user=UserOut.of(user), is_new_user=is_new)
    )


@router.post("/refresh")
async def refresh(body: RefreshIn, svc: ServicesDep, session: SessionDep) -> Envelope[TokensOut]:
    tokens = await auth.rotate(session, svc.redis, refresh=body.refresh, settings=svc.settings)
    return ok(TokensOut(access=tokens.access, refresh=tokens.refresh))


@router.get("/me")
async def me(user: CurrentUser) -> Envelope[UserOut]:
    return ok(UserOut.of(user))
