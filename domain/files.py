"""Where uploaded files (KYC documents) are kept: a small storage interface with two backends.

`local`: a directory (KYC_STORAGE_DIR, default DATA_DIR/kyc), written atomically (temp file + rename).
`s3`: any S3-compatible service (AWS, MinIO, R2, ...) through boto3, whose blocking calls run in a thread.
Keys are relative, `/`-separated paths of plain segments (`<user_id>/<submission_id>/front.jpg`); the
database keeps only keys, never the bytes.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from collections.abc import AsyncIterator
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from config import Settings

CHUNK_BYTES = 64 * 1024
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class MissingFile(Exception):
    """The store has no object under this key."""


def check_key(key: str) -> str:
    """Refuse keys that could leave the store's root (`..`, absolute paths, empty segments)."""
    parts = key.split("/")
    if not parts or any(not _SEGMENT.match(p) or p in (".", "..") for p in parts):
        raise ValueError(f"not a storage key: {key!r}")
    return key


class FileStore(Protocol):
    async def put(self, key: str, data: bytes, *, content_type: str) -> None: ...

    async def open(self, key: str) -> AsyncIterator[bytes]:
        """The object's bytes in chunks; raises `MissingFile` before the first chunk if there is none."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object; a missing one is not an error."""
        ...


async def read_all(store: FileStore, key: str) -> bytes:
    return b"".join([chunk async for chunk in await store.open(key)])


async def _chunks(handle: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
            yield chunk
    finally:
        await asyncio.to_thread(handle.close)


class LocalFileStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        await asyncio.to_thread(self._write, self._path(key), data)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    async def open(self, key: str) -> AsyncIterator[bytes]:
        path = self._path(key)
        try:
            handle = await asyncio.to_thread(path.open, "rb")
        except FileNotFoundError as exc:
            raise MissingFile(key) from exc
        return _chunks(handle)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)


class S3FileStore:
    """Objects under `prefix` in one bucket. The client is made on first use (boto3 clients are
    thread-safe, so one serves every call)."""

    def __init__(
        self,
        *,
        bucket: str,
        endpoint_url: str | None,
        access_key_id: str,
        secret_access_key: str,
        region: str,
        prefix: str = "",
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self._client_args: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "aws_access_key_id": access_key_id or None,
            "aws_secret_access_key": secret_access_key or None,
            "region_name": region,
        }
        self._client: Any = None

    def _make_client(self) -> Any:
        if self._client is None:
            import boto3  # imported here: only deployments on the s3 backend pay for it
            from botocore.config import Config

            config = Config(retries={"max_attempts": 3, "mode": "standard"}, signature_version="s3v4")
            self._client = boto3.session.Session().client("s3", config=config, **self._client_args)
        return self._client

    async def _call(self, method: str, **kwargs: Any) -> Any:
        def call() -> Any:
            return getattr(self._make_client(), method)(Bucket=self.bucket, **kwargs)

        return await asyncio.to_thread(call)

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        await self._call("put_object", Key=self._name(key), Body=data, ContentType=content_type)

    async def open(self, key: str) -> AsyncIterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            response = await self._call("get_object", Key=self._name(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise MissingFile(key) from exc
            raise
        body: BinaryIO = response["Body"]
        return _chunks(body)

    async def delete(self, key: str) -> None:
        await self._call("delete_object", Key=self._name(key))


def store_for(settings: Settings) -> FileStore:
    """The store KYC_STORAGE_BACKEND names; one per configuration (the S3 client is reused)."""
    if settings.kyc_storage_backend == "s3":
        return _s3_store(
            settings.kyc_s3_bucket,
            settings.kyc_s3_endpoint_url,
            settings.kyc_s3_access_key_id,
            settings.kyc_s3_secret_access_key,
            settings.kyc_s3_region,
            settings.kyc_s3_prefix,
        )
    return LocalFileStore(settings.kyc_storage_dir or settings.data_dir / "kyc")


@lru_cache(maxsize=8)
def _s3_store(
    bucket: str,
    endpoint_url: str | None,
    access_key_id: str,
    secret_access_key: str,
    region: str,
    prefix: str,
) -> S3FileStore:
    return S3FileStore(
        bucket=bucket,
        endpoint_url=endpoint_url,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        region=region,
        prefix=prefix,
    )
