"""KYC: a user submits identity documents (PENDING); an operator approves or rejects them with a reason.

Files are checked before anything is kept: at most KYC_MAX_FILE_BYTES each, and JPEG, PNG or PDF by their
first bytes (the declared content type is not trusted; a selfie must be an image). They are written to
the file store first, then the submission row in one transaction that holds the user's row lock; if that
transaction fails the files are removed again. At most one submission per user is PENDING or APPROVED
(a partial unique index backs the check). `users.kyc_status` follows the latest submission, so
`auth/me` and the rental check read one column.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from domain import audit
from domain.errors import FileTooLarge, InvalidState, KycRequired, NotFound, ValidationFailed
from domain.files import FileStore
from domain.profile import plain_text
from storage.db import Database
from storage.kyc_models import KycDocument, KycDocumentType, KycSide, KycStatus, KycSubmission
from storage.models import User

log = logging.getLogger(__name__)

AUDIT_FIELDS = ("user_id", "document_type", "status", "reason", "reviewed_at", "reviewed_by")
OPEN = (KycStatus.PENDING, KycStatus.APPROVED)

# (magic prefix, content type, file extension)
_SIGNATURES = (
    (b"\xff\xd8\xff", "image/jpeg", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "image/png", "png"),
    (b"%PDF-", "application/pdf", "pdf"),
)
_EXTENSION = {content_type: ext for _, content_type, ext in _SIGNATURES}
_IMAGES = ("image/jpeg", "image/png")


@dataclass(frozen=True, slots=True, kw_only=True)
class Upload:
    """A checked file, ready to be stored."""

    side: KycSide
    data: bytes
    content_type: str
    sha256: str

    @property
    def extension(self) -> str:
        return _EXTENSION[self.content_type]


def sniff(data: bytes) -> str | None:
    """The content type the bytes start like (JPEG, PNG or PDF), or None."""
    return next((ct for magic, ct, _ in _SIGNATURES if data.startswith(magic)), None)


def check_file(side: KycSide, data: bytes, *, max_bytes: int) -> Upload:
    if not data:
        raise ValidationFailed(f"The {side.value} file is empty.", context={"field": side.value})
    if len(data) > max_bytes:
        raise FileTooLarge(
            f"The {side.value} file is larger than {max_bytes} bytes.",
            context={"field": side.value, "max_bytes": max_bytes},
        )
    content_type = sniff(data)
    allowed = _IMAGES if side == KycSide.SELFIE else tuple(_EXTENSION)
    if content_type not in allowed:
        kinds = "a JPEG or PNG image" if side == KycSide.SELFIE else "a JPEG, PNG or PDF file"
        raise ValidationFailed(
            f"The {side.value} file is not {kinds} (judged by its content, not its name or declared type).",
            context={"field": side.value, "allowed": list(allowed)},
        )
    return Upload(side=side, data=data, content_type=content_type, sha256=hashlib.sha256(data).hexdigest())


def needed_sides(document_type: KycDocumentType) -> tuple[KycSide, ...]:
    """A passport has no back page worth scanning; every other document has two sides."""
    if document_type == KycDocumentType.PASSPORT:
        return (KycSide.FRONT, KycSide.SELFIE)
    return (KycSide.FRONT, KycSide.BACK, KycSide.SELFIE)


async def _open_submission(session: AsyncSession, user_id: uuid.UUID) -> KycSubmission | None:
    return await session.scalar(
        select(KycSubmission).where(KycSubmission.user_id == user_id, KycSubmission.status.in_(OPEN))
    )


def _refuse_open(submission: KycSubmission) -> InvalidState:
    message = (
        "Your documents are already approved."
        if submission.status == KycStatus.APPROVED
        else "Your documents are waiting for review: submit again only if they are rejected."
    )
    return InvalidState(message, context={"kyc_id": str(submission.id), "status": submission.status.value})


async def submit(
    db: Database,
    store: FileStore,
    *,
    user_id: uuid.UUID,
    document_type: KycDocumentType,
    uploads: Mapping[KycSide, Upload],
) -> KycSubmission:
    """Store the files, then record the PENDING submission; the files go again if recording fails."""
    missing = [s.value for s in needed_sides(document_type) if s not in uploads]
    if missing:
        raise ValidationFailed(
            f"A {document_type.value} needs these files too: {', '.join(missing)}.",
            context={"missing": missing, "document_type": document_type.value},
        )
    async with db.transaction() as session:  # refuse early, before writing any file
        if (current := await _open_submission(session, user_id)) is not None:
            raise _refuse_open(current)
    submission_id = uuid.uuid4()
    keys = {side: f"{user_id}/{submission_id}/{side.value}.{u.extension}" for side, u in uploads.items()}
    written: list[str] = []
    try:
        for side, upload in uploads.items():
            await store.put(keys[side], upload.data, content_type=upload.content_type)
            written.append(keys[side])
        async with db.transaction() as session:
            submission = await _record(
                session,
                submission_id=submission_id,
                user_id=user_id,
                document_type=document_type,
                uploads=uploads,
                keys=keys,
            )
    except BaseException:
        for key in written:
            try:
                await store.delete(key)
            except Exception:
                log.exception("event=kyc_file_cleanup_failed key=%s", key)
        raise
    log.info("event=kyc_submitted kyc_id=%s user_id=%s type=%s", submission.id, user_id, document_type.value)
    return submission


async def _record(
    session: AsyncSession,
    *,
    submission_id: uuid.UUID,
    user_id: uuid.UUID,
    document_type: KycDocumentType,
    uploads: Mapping[KycSide, Upload],
    keys: Mapping[KycSide, str],
) -> KycSubmission:
    user = await session.get(User, user_id, with_for_update=True, populate_existing=True)
    if user is None:
        raise NotFound("User not found.")
    if (current := await _open_submission(session, user_id)) is not None:
        raise _refuse_open(current)
    submission = KycSubmission(
        id=submission_id,
        user_id=user_id,
        document_type=document_type,
        status=KycStatus.PENDING,
        submitted_at=datetime.now(UTC),
        documents=[
            KycDocument(
                side=side,
                storage_key=keys[side],
                sha256=u.sha256,
                size=len(u.data),
                content_type=u.content_type,
            )
            for side, u in uploads.items()
        ],
    )
    try:
        async with session.begin_nested():
            session.add(submission)
            await session.flush()
    except IntegrityError as exc:  # a concurrent submission got in first
        raise InvalidState("Your documents are already submitted.") from exc
    user.kyc_status = KycStatus.PENDING.value
    return submission


async def latest(session: AsyncSession, user_id: uuid.UUID) -> KycSubmission | None:
    return await session.scalar(
        select(KycSubmission)
        .where(KycSubmission.user_id == user_id)
        .order_by(KycSubmission.submitted_at.desc())
        .limit(1)
    )


async def require_approved(session: AsyncSession, user_id: uuid.UUID) -> None:
    """For KYC_REQUIRED_TO_RENT: refuse (403 kyc_required) unless the user's KYC is APPROVED."""
    status = await session.scalar(select(User.kyc_status).where(User.id == user_id))
    if status != KycStatus.APPROVED.value:
        raise KycRequired(context={"kyc_status": status or KycStatus.NOT_SUBMITTED.value})


async def listing(
    session: AsyncSession, *, status: KycStatus | None, page: int, page_size: int
) -> tuple[list[KycSubmission], int]:
    """For operators: every submission, or those in one status; oldest first (the review queue)."""
    where = [KycSubmission.status == status] if status is not None else []
    count = await session.scalar(select(func.count()).select_from(KycSubmission).where(*where)) or 0
    rows = await session.scalars(
        select(KycSubmission)
        .where(*where)
        .order_by(KycSubmission.submitted_at, KycSubmission.id)
        .offset((page - 1) * page_size)
        .limit(page_size)
    )
    return list(rows.all()), count


async def get(session: AsyncSession, kyc_id: uuid.UUID, *, lock: bool = False) -> KycSubmission:
    submission = await session.get(
        KycSubmission, kyc_id, with_for_update=True if lock else None, populate_existing=lock
    )
    if submission is None:
        raise NotFound("KYC submission not found.", context={"kyc_id": str(kyc_id)})
    return submission


def document(submission: KycSubmission, side: KycSide) -> KycDocument:
    found = next((d for d in submission.documents if d.side == side), None)
    if found is None:
        raise NotFound(
            f"This submission has no {side.value} file.",
            context={"kyc_id": str(submission.id), "side": side.value},
        )
    return found


async def review(
    session: AsyncSession,
    *,
    kyc_id: uuid.UUID,
    operator: User,
    approve: bool,
    reason: str | None = None,
    ip: str | None = None,
) -> KycSubmission:
    """PENDING → APPROVED or REJECTED (with the reason the user is shown), audited in this transaction."""
    if reason is not None:
        reason = plain_text(reason.strip(), field="reason", newlines=True)
    if not approve and not reason:
        raise ValidationFailed("Say why the documents are rejected: the user is shown it.")
    submission = await get(session, kyc_id, lock=True)
    if submission.status != KycStatus.PENDING:
        raise InvalidState(
            f"This submission is {submission.status.value}, not PENDING.",
            context={"kyc_id": str(submission.id), "status": submission.status.value},
        )
    user = await session.get(User, submission.user_id, with_for_update=True, populate_existing=True)
    if user is None:
        raise NotFound("User not found.")
    before = audit.snapshot(submission, AUDIT_FIELDS)
    submission.status = KycStatus.APPROVED if approve else KycStatus.REJECTED
    submission.reason = None if approve else reason
    submission.reviewed_at = datetime.now(UTC)
    submission.reviewed_by = operator.id
    user.kyc_status = submission.status.value
    await session.flush()
    await audit.record(
        session,
        actor=operator,
        action="kyc.approve" if approve else "kyc.reject",
        target_type="kyc",
        target_id=submission.id,
        before=before,
        after=audit.snapshot(submission, AUDIT_FIELDS),
        ip=ip,
    )
    log.info(
        "event=kyc_reviewed kyc_id=%s status=%s operator=%s", submission.id, submission.status, operator.id
    )
    return submission


async def record_file_view(
    session: AsyncSession, *, submission: KycSubmission, side: KycSide, operator: User, ip: str | None
) -> None:
    """Identity documents are personal data: every operator download is in the audit log."""
    await audit.record(
        session,
        actor=operator,
        action="kyc.view_file",
        target_type="kyc",
        target_id=submission.id,
        after={"side": side.value},
        ip=ip,
    )
