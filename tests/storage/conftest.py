from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiserver.blobs import BlobStore, LocalBlobStore
from aiserver.blobs.s3 import S3BlobStore
from tests.storage.backends import S3_CREDENTIALS, JobStoreBackend, S3Server


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStoreBackend]:
    found = JobStoreBackend(request.param, tmp_path)
    try:
        yield found
    finally:
        await found.close()


@pytest.fixture(params=["local", "s3"])
async def blobs(
    request: pytest.FixtureRequest, tmp_path: Path, s3_server: S3Server
) -> AsyncIterator[BlobStore]:
    store: BlobStore
    if request.param == "local":
        store = LocalBlobStore(tmp_path / "blobs")
    else:
        store = S3BlobStore(
            f"s3://{s3_server.new_bucket()}/some/prefix",
            endpoint_url=s3_server.endpoint,
            access_key=S3_CREDENTIALS["aws_access_key_id"],
            secret_key=S3_CREDENTIALS["aws_secret_access_key"],
        )
    try:
        yield store
    finally:
        await store.close()
