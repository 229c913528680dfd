"""The app user's own profile and identity verification (KYC). Operators review KYC under /api/admin/kyc;
users never download files back."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ClientIp, CurrentUser, ServicesDep, SessionDep
from api.envelope import Envelope, ok
from domain import files, kyc, profile
from domain.errors import Unauthorized
from storage.kyc_models import KycDocumentType, KycSide, KycStatus, KycSubmission
from storage.models import User

router = APIRouter(prefix="/api/users", tags=["users"])


class ProfileOut(BaseModel):
    id: uuid.UUID
    phone: str | None
    name: str | None
    email: str | None
    avatar_url: str | None
    kyc_status: str

    @classmethod
    def of(cls, user: User) -> ProfileOut:
        return cls(
            id=user.id,
            phone=user.phone,
            name=user.name,
            email=user.email,
            avatar_url=user.avatar_url,
            kyc_status=user.kyc_status,
        )


class ProfilePatch(BaseModel):
    """Only these fields change; anything else in the body (role, phone, kyc_status, ...) is ignored.
    A field sent as null is cleared (email only if the account also has a phone). A new email needs
    `email_otp`: the code POST /api/auth/otp/request sent to that address."""

    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    email: str | None = None
    avatar_url: str | None = None
    email_otp: str | None = Field(default=None, max_length=8)


class KycStatusOut(BaseModel):
    status: str  # NOT_SUBMITTED, PENDING, APPROVED, REJECTED
    reason: str | None = None  # why it was rejected
    document_type: str | None = None
    submitted_at: datetime | None = None
    reviewed_at: datetime | None = None

    @classmethod
    def of(cls, submission: KycSubmission | None) -> KycStatusOut:
        if submission is None:
            return cls(status=KycStatus.NOT_SUBMITTED.value)
        return cls(
            status=submission.status.value,
            reason=submission.reason,
            document_type=submission.document_type.value,
            submitted_at=submission.submitted_at,
            reviewed_at=submission.reviewed_at,
        )


@router.get("/profile")
async def get_profile(user: CurrentUser) -> Envelope[ProfileOut]:
    return ok(ProfileOut.of(user))


@router.patch("/profile")
async def update_profile(
    body: ProfilePatch, user: CurrentUser, ip: ClientIp, svc: ServicesDep
) -> Envelope[ProfileOut]:
    """Change `name`, `email` and `avatar_url` (http/https). A new email is proven first: POST
    /api/auth/otp/request `{identifier: new_email}`, then PATCH `{email, email_otp}`. Without `email_otp`
    400 `validation_error`; 409 `conflict` if another account has the email (no code spent); a wrong code
    401 and 423 `locked_out` as at login. The same email again, or null (with a phone), needs no code."""
    # Its own transaction, so a wrong code's attempt count is kept even though the request fails (nothing
    # else has changed by then); any other refusal rolls back.
    async with svc.db.sessions() as session:
        try:
            updated = await profile.update(
                session,
                svc.redis,
                user_id=user.id,
                changes=body.model_dump(exclude_unset=True, exclude={"email_otp"}),
                email_otp=body.email_otp,
                ip=ip,
                settings=svc.settings,
            )
        except Unauthorized:
            await session.commit()
            raise
        await session.commit()
    return ok(ProfileOut.of(updated), "Profile updated.")


@router.post("/kyc", status_code=status.HTTP_201_CREATED)
async def submit_kyc(
    user: CurrentUser,
    svc: ServicesDep,
    document_type: Annotated[KycDocumentType, Form()],
    front: Annotated[UploadFile, File(description="JPEG, PNG or PDF")],
    selfie: Annotated[UploadFile, File(description="JPEG or PNG")],
    back: Annotated[UploadFile | None, File(description="JPEG, PNG or PDF; not for PASSPORT")] = None,
) -> Envelope[KycStatusOut]:
    """Multipart upload; each file at most KYC_MAX_FILE_BYTES (413 `file_too_large`), its type read from
    its bytes (400 otherwise). 409 while a submission is PENDING or APPROVED."""
    limit = svc.settings.kyc_max_file_bytes
    parts = {KycSide.FRONT: front, KycSide.BACK: back, KycSide.SELFIE: selfie}
    uploads = {}
    for side, part in parts.items():
        if part is None:
            continue
        data = await part.read(limit + 1)  # one byte more than allowed is enough to refuse it
        uploads[side] = kyc.check_file(side, data, max_bytes=limit)
    submission = await kyc.submit(
        svc.db,
        files.store_for(svc.settings),
        user_id=user.id,
        document_type=document_type,
        uploads=uploads,
    )
    return ok(KycStatusOut.of(submission), "Documents received: an operator will review them.")


@router.get("/kyc/status")
async def kyc_status(user: CurrentUser, session: SessionDep) -> Envelope[KycStatusOut]:
    return ok(KycStatusOut.of(await kyc.latest(session, user.id)))
