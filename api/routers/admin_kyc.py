"""Operators: the KYC review queue, the submitted files, approve and reject (each audited)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import ClientIp, OperatorUser, PagingDep, ServicesDep, SessionDep
from api.envelope import Envelope, Page, ok
from domain import files, kyc
from domain.errors import NotFound
from storage.kyc_models import KYC_REASON_MAX, KycDocument, KycSide, KycStatus, KycSubmission
from storage.models import User

router = APIRouter(prefix="/api/admin/kyc", tags=["admin"])
log = logging.getLogger(__name__)


class KycDocumentOut(BaseModel):
    side: str
    content_type: str
    size: int
    sha256: str

    @classmethod
    def of(cls, doc: KycDocument) -> KycDocumentOut:
        return cls(side=doc.side.value, content_type=doc.content_type, size=doc.size, sha256=doc.sha256)


class AdminKycOut(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID
    user_phone: str | None
    user_email: str | None
    user_name: str | None
    document_type: str
    status: str
    reason: str | None
    submitted_at: datetime
    reviewed_at: datetime | None
    reviewed_by: uuid.UUID | None
    documents: list[KycDocumentOut]

    @classmethod
    def of(cls, submission: KycSubmission, user: User | None) -> AdminKycOut:
        return cls(
            id=submission.id,
            user_id=submission.user_id,
            user_phone=user.phone if user else None,
            user_email=user.email if user else None,
            user_name=user.name if user else None,
            document_type=submission.document_type.value,
            status=submission.status.value,
            reason=submission.reason,
            submitted_at=submission.submitted_at,
            reviewed_at=submission.reviewed_at,
            reviewed_by=submission.reviewed_by,
            documents=[KycDocumentOut.of(d) for d in submission.documents],
        )


class KycRejectIn(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)

    reason: str = Field(min_length=1, max_length=KYC_REASON_MAX)  # the user is shown it


async def _out(session: AsyncSession, rows: Sequence[KycSubmission]) -> list[AdminKycOut]:
    ids = {r.user_id for r in rows}
    users = {u.id: u for u in await session.scalars(select(User).where(User.id.in_(ids)))} if ids else {}
    return [AdminKycOut.of(r, users.get(r.user_id)) for r in rows]


@router.get("")
async def list_kyc(
    operator: OperatorUser,
    session: SessionDep,
    paging: PagingDep,
    kyc_status: Annotated[KycStatus | None, Query(alias="status")] = None,
) -> Envelope[Page[AdminKycOut]]:
    """The review queue (`?status=PENDING`), oldest first."""
    rows, count = await kyc.listing(session, status=kyc_status, page=paging.page, page_size=paging.page_size)
    results = await _out(session, rows)
    return ok(Page(results=results, count=count, page=paging.page, page_size=paging.page_size))


@router.get("/{kyc_id}")
async def get_kyc(kyc_id: uuid.UUID, operator: OperatorUser, session: SessionDep) -> Envelope[AdminKycOut]:
    return ok((await _out(session, [await kyc.get(session, kyc_id)]))[0])


@router.get(
    "/{kyc_id}/files/{side}",
    response_class=StreamingResponse,
    responses={200: {"content": {"image/jpeg": {}, "image/png": {}, "application/pdf": {}}}},
)
async def kyc_file(
    kyc_id: uuid.UUID,
    side: KycSide,
    operator: OperatorUser,
    session: SessionDep,
    svc: ServicesDep,
    ip: ClientIp,
) -> StreamingResponse:
    """The file as uploaded (its bytes hash to the listed sha256). Every download is audited (the entry
    is rolled back if the file cannot be read)."""
    submission = await kyc.get(session, kyc_id)
    doc = kyc.document(submission, side)
    await kyc.record_file_view(session, submission=submission, side=side, operator=operator, ip=ip)
    try:
        chunks = await files.store_for(svc.settings).open(doc.storage_key)
    except files.MissingFile as exc:
        log.error("event=kyc_file_missing kyc_id=%s side=%s key=%s", kyc_id, side.value, doc.storage_key)
        raise NotFound("The file is missing from storage.", context={"kyc_id": str(kyc_id)}) from exc
    extension = doc.storage_key.rsplit(".", 1)[-1]
    headers = {
        "Content-Disposition": f'attachment; filename="kyc-{kyc_id}-{side.value}.{extension}"',
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }
    return StreamingResponse(chunks, media_type=doc.content_type, headers=headers)


@router.post("/{kyc_id}/approve")
async def approve_kyc(
    kyc_id: uuid.UUID, operator: OperatorUser, session: SessionDep, ip: ClientIp
) -> Envelope[AdminKycOut]:
    submission = await kyc.review(session, kyc_id=kyc_id, operator=operator, approve=True, ip=ip)
    return ok((await _out(session, [submission]))[0], "KYC approved.")


@router.post("/{kyc_id}/reject")
async def reject_kyc(
    kyc_id: uuid.UUID, body: KycRejectIn, operator: OperatorUser, session: SessionDep, ip: ClientIp
) -> Envelope[AdminKycOut]:
    submission = await kyc.review(
        session, kyc_id=kyc_id, operator=operator, approve=False, reason=body.reason, ip=ip
    )
    return ok((await _out(session, [submission]))[0], "KYC rejected.")
