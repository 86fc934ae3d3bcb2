"""What a blob store is: immutable bytes under a key, shared by every process that uses it.

Keys are relative paths (``2031/05/06/{sha256}.png``); the caller validates them. A key is
written once with its final bytes (content-addressed callers never rewrite one), so readers
never see a partial blob: the local folder renames a finished temp file into place, S3 makes
an object visible only when its upload completes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol, TypeAlias

__all__ = ["DEFAULT_CHUNK_SIZE", "BlobStore", "Frame", "framed"]

DEFAULT_CHUNK_SIZE = 256 * 1024

Frame: TypeAlias = Callable[[int, int], tuple[bytes, bytes]]
"""What a reader wants around each chunk: ``frame(offset, length)`` gives the ``(head,
tail)`` of the chunk of ``length`` bytes at ``offset``, and the chunk comes as head + bytes +
tail in one object. A local read lands in that object directly (a message in wire form costs
no copy beyond the read); a backend that cannot do that joins the parts (:func:`framed`)."""


def framed(data: bytes, offset: int, frame: Frame | None) -> bytes:
    """``data`` (read at ``offset``) inside its frame: one copy, none without a frame."""
    if frame is None:
        return data
    head, tail = frame(offset, len(data))
    return b"".join((head, data, tail))


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes, *, fresh: bool = False) -> None:
        """Store ``data`` under ``key``; nothing is written when the key exists already.

        ``fresh``: the caller has just indexed these bytes as new, so the key most likely
        holds nothing: a backend whose look costs a request writes without looking (a blob
        there already holds the same bytes, and is replaced by them)."""
        ...

    async def size(self, key: str) -> int | None:
        """The blob's size in bytes, ``None`` when it does not exist."""
        ...

    def read(
        self,
        key: str,
        offset: int = 0,
        length: int | None = None,
        chunk_size: int = ...,
        *,
        frame: Frame | None = None,
    ) -> AsyncIterator[bytes]:
        """``length`` bytes (``None``: to the end) from ``offset``, in chunks of at most
        ``chunk_size`` bytes, each inside its ``frame`` if one is given; raises
        :class:`FileNotFoundError` before the first chunk when the blob does not exist."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the blob (no error when it is gone already)."""
        ...

    def local_file(self, key: str) -> AbstractAsyncContextManager[Path]:
        """A file holding the blob's bytes for the ``with`` block, for code that needs a path
        (image decoders in a worker pool): the blob itself on the local folder, a temporary
        download elsewhere. :class:`FileNotFoundError` when it does not exist."""
        ...

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        """A URL that serves the blob without the service (S3 presigned); ``None`` when the
        backend has none and the service's own signed URL must be used."""
        ...

    async def close(self) -> None: ...
