"""Blobs as objects in an S3-compatible bucket, shared by every coordinator.

boto3 (blocking; each call runs in a worker thread) was measured against the alternatives
listed in docs/scale-out.md. Credentials, region and endpoint come from the usual
``AWS_*`` variables (boto3's own chain) unless given here.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from aiserver.blobs.protocol import DEFAULT_CHUNK_SIZE, Frame, framed

__all__ = ["S3BlobStore"]

_MISSING = {"404", "NoSuchKey", "NotFound"}
# One session per process: it loads the service models once (~0.2 s per new session).
_SESSION = boto3.session.Session()
_SESSION_LOCK = threading.Lock()


def _missing(exc: ClientError) -> bool:
    return str(exc.response.get("Error", {}).get("Code", "")) in _MISSING


CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0


class S3BlobStore:
    """``s3://{bucket}/{prefix}``: the blob of ``key`` is the object ``{prefix}/{key}``."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        max_connections: int = 32,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"blob URL {url!r}: expected s3://bucket/prefix")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        with _SESSION_LOCK:  # sessions are not thread-safe; their clients are
            self._client: Any = _SESSION.client(
                "s3",
                endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
                region_name=region or os.environ.get("AWS_REGION") or "us-east-1",
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                config=Config(
                    max_pool_connections=max_connections,
                    retries={"mode": "standard"},
                    # botocore waits 60 s for each by default (3 attempts: minutes) on an
                    # endpoint that drops packets; these bound a call to about 2 minutes
                    # at worst (a read is one socket read, not the whole object).
                    connect_timeout=CONNECT_TIMEOUT_S,
                    read_timeout=READ_TIMEOUT_S,
                ),
            )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    async def put(self, key: str, data: bytes, *, fresh: bool = False) -> None:
        # A HEAD costs about as much client CPU as the PUT of a small object (boto3): made
        # only when the bytes may be there already.
        if not fresh and await self.size(key) is not None:
            return  # content-addressed: the same key holds the same bytes
        await asyncio.to_thread(
            self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data
        )

    async def size(self, key: str) -> int | None:
        try:
            head = await asyncio.to_thread(
                self._client.head_object, Bucket=self.bucket, Key=self._key(key)
            )
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        return int(head["ContentLength"])

    async def read(
        self,
        key: str,
        offset: int = 0,
        length: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        frame: Frame | None = None,
    ) -> AsyncIterator[bytes]:
        if length == 0:
            if await self.size(key) is None:
                raise FileNotFoundError(key)
            return
        byte_range = f"bytes={offset}-" + ("" if length is None else str(offset + length - 1))
        try:
            got = await asyncio.to_thread(
                self._client.get_object, Bucket=self.bucket, Key=self._key(key), Range=byte_range
            )
        except ClientError as exc:
            if _missing(exc):
                raise FileNotFoundError(key) from exc
            if str(exc.response.get("Error", {}).get("Code", "")) == "InvalidRange":
                return  # offset at (or past) the end: nothing to read
            raise
        body = got["Body"]
        try:
            while chunk := await asyncio.to_thread(body.read, chunk_size):
                yield framed(chunk, offset, frame)
                offset += len(chunk)
        finally:
            body.close()

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._client.delete_object, Bucket=self.bucket, Key=self._key(key))

    @contextlib.asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        with tempfile.TemporaryDirectory(prefix="aiserver-blob-") as folder:
            path = Path(folder) / key.rsplit("/", 1)[-1]
            with path.open("wb") as fh:
                async for chunk in self.read(key, chunk_size=1024 * 1024):
                    await asyncio.to_thread(fh.write, chunk)
            yield path

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        url: str = self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s
        )
        return url

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)
