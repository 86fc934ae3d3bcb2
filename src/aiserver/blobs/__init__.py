"""Blob storage behind one interface: a local folder (default) or an S3-compatible bucket.

Nothing outside this package and :mod:`aiserver.artifacts.store` knows where bytes live.
"""

from __future__ import annotations

from pathlib import Path

from aiserver.blobs.local import LocalBlobStore
from aiserver.blobs.protocol import DEFAULT_CHUNK_SIZE, BlobStore

__all__ = ["DEFAULT_CHUNK_SIZE", "BlobStore", "LocalBlobStore", "open_blob_store"]


def open_blob_store(url: str, local_root: Path) -> BlobStore:
    """S3 when ``url`` is ``s3://bucket/prefix``, else the folder ``local_root``."""
    if not url:
        return LocalBlobStore(local_root)
    if url.startswith("s3://"):
        from aiserver.blobs.s3 import S3BlobStore  # the embedded default never loads boto3

        return S3BlobStore(url)
    raise ValueError("AISERVER_BLOB_URL must be s3://bucket/prefix (or unset)")
