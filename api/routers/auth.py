from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from api.deps import ClientIp, CurrentUser, ServicesDep, SessionDep
from api.envelope import Envelope, ok
from api.schemas import IdentifierIn, LoginOut, OtpRequested, RefreshIn, TokensOut, UserOut, VerifyIn
from domain import auth

router = APIRouter(prefix="/api/auth", tags=["auth"])


class LoggedOut(BaseModel):
    logged_out: bool = True


@router.post("/otp/request")
async def request_otp(
    body: IdentifierIn, ip: ClientIp, svc: ServicesDep, session: SessionDep
) -> Envelope[OtpRequested]:
    expires_in = await auth.request_code(
        session, svc.redis, identifier=body.identifier, ip=ip, settings=svc.settings, sms=svc.sms
    )
    return ok(OtpRequested(expires_in=expires_in), "A one-time code was sent.")


@router.post("/otp/verify")
async def verify_otp(body: VerifyIn, ip: ClientIp, svc: ServicesDep) -> Envelope[LoginOut]:
    # Its own transaction, so a wrong code's attempt count is kept even though the request fails.
    async with svc.db.sessions() as session:
        try:
            user, is_new = await auth.verify_code(
                session, svc.redis, identifier=body.identifier, code=body.otp, ip=ip, settings=svc.settings
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


@router.post("/logout")
async def logout(body: RefreshIn, svc: ServicesDep) -> Envelope[LoggedOut]:
    """Close the session the refresh token belongs to: its refresh and access tokens stop working."""
    await auth.logout(svc.redis, refresh=body.refresh, settings=svc.settings)
    return ok(LoggedOut(), "Logged out.")


@router.get("/me")
async def me(user: CurrentUser) -> Envelope[UserOut]:
    return ok(UserOut.of(user))
