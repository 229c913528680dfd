from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from api.deps import ClientIp, CurrentUser, ServicesDep, SessionDep
from api.envelope import Envelope, ok
from api.schemas import IdentifierIn, LoginOut, OtpRequested, RefreshIn, TokensOut, UserOut, VerifyIn
from domain import audit, auth, second_factor
from storage.models import User

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
    identifier = auth.normalise_identifier(body.identifier)[1]
    await second_factor.check(
        svc.redis, svc.settings, user, identifier=identifier, ip=ip, password=body.password, totp=body.totp
    )
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


class TotpEnrolment(BaseModel):
    secret: str  # base32, for typing into an authenticator app
    otpauth_uri: str  # the same as a QR-code URI


class TotpIn(BaseModel):
    totp: str = Field(min_length=6, max_length=8)


class TotpEnrolled(BaseModel):
    enrolled: bool = True


@router.post("/totp/enroll")
async def totp_enroll(user: CurrentUser, svc: ServicesDep) -> Envelope[TotpEnrolment]:
    """Staff: start TOTP enrolment (a new secret, pending until confirmed). 403 for riders."""
    async with svc.db.transaction() as session:
        row = await session.get(User, user.id, with_for_update=True)
        assert row is not None
        secret, uri = second_factor.start_enrolment(row)
    return ok(TotpEnrolment(secret=secret, otpauth_uri=uri), "Add it to your authenticator, then confirm.")


@router.post("/totp/confirm")
async def totp_confirm(
    body: TotpIn, user: CurrentUser, svc: ServicesDep, ip: ClientIp
) -> Envelope[TotpEnrolled]:
    """Staff: the authenticator's current code; from now on a login needs TOTP instead of the password."""
    async with svc.db.transaction() as session:
        row = await session.get(User, user.id, with_for_update=True)
        assert row is not None
        second_factor.confirm_enrolment(row, body.totp)
        await audit.record(
            session, actor=row, action="user.totp_enrolled", target_type="user", target_id=row.id, ip=ip
        )
    return ok(TotpEnrolled(), "TOTP is on: log in with a TOTP code from now on.")


@router.get("/me")
async def me(user: CurrentUser) -> Envelope[UserOut]:
    return ok(UserOut.of(user))
