"""Reading an upload stream (params first, then file chunks) into spooled files.

The ordering contract is documented on ``GenerationService`` in the protos.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiserver.api.validation import check_request
from aiserver.errors import ErrorKind, FieldViolation, ServiceError, invalid_argument
from aiserver.spool import InputSpool, SpooledFile, UploadBudget

__all__ = ["Upload", "clean_name", "read_upload"]

DRAIN_SECONDS = 5.0
DRAIN_MIN_BYTES = 8 * 1024 * 1024


@dataclass(slots=True)
class Upload:
    params: Any
    files: dict[str, SpooledFile]

    def discard(self) -> None:
        for f in self.files.values():
            if f.held is not None:  # held in memory: no file
                f.held.release()
            elif not f.written:  # a small input's bytes alone: no file either
                f.content = None
            else:
                _remove(f.path, f.size)


_FREE_IN_THREAD = 8 * 1024 * 1024
"""Files from this size are freed in a worker thread (64 MiB: about 3 ms of the kernel
freeing page-cache pages, which would otherwise delay the call's answer on the event loop)."""


def _remove(path: Path, size: int) -> None:
    """Delete ``path`` now; a large file's pages are freed when its last descriptor closes,
    which happens in a worker thread (the name is gone at once either way)."""
    fd = -1
    if size >= _FREE_IN_THREAD:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
    path.unlink(missing_ok=True)
    if fd < 0:
        return
    try:
        asyncio.get_running_loop().run_in_executor(None, os.close, fd)
    except RuntimeError:  # no loop: close here
        os.close(fd)


async def read_upload(
    requests: AsyncIterator[Any],
    *,
    spool: InputSpool,
    budget: UploadBudget,
    inputs: Collection[str],
    inputs_of: Callable[[Any], tuple[Collection[str], Collection[str]]] | None = None,
    hashed: bool = True,
) -> Upload:
    """Read the whole stream; every input in ``inputs`` is required and must not be empty.

    ``inputs_of`` (when the inputs depend on the params, as a workflow's do) gets the params
    as soon as they arrive and returns the accepted inputs and the required ones; it may
    raise to refuse the params before any file is read. On any error, partial files are
    deleted before the error propagates. ``hashed=False``: the files are used once and
    deleted, their SHA-256 is not needed.
    """
    accepted, required = inputs, inputs
    writers: dict[str, Any] = {}
    params: Any = None
    try:
        async for msg in requests:
            kind = msg.WhichOneof("payload")
            if params is None:
                if kind != "params":
                    raise invalid_argument(
                        "params", "PARAMS_NOT_FIRST", "the first message must carry params"
                    )
                params = msg.params
                check_request(params, "params.")  # before any byte is spooled
                if inputs_of is not None:
                    accepted, required = inputs_of(params)
                continue
            if kind == "params":
                raise invalid_argument(
                    "params", "PARAMS_REPEATED", "params may only be sent in the first message"
                )
            if kind != "chunk":
                raise invalid_argument("chunk", "EMPTY_MESSAGE", "a message carried nothing")
            chunk = msg.chunk
            if chunk.field not in accepted:
                raise invalid_argument(
                    "chunk.field",
                    "UNKNOWN_INPUT",
                    f"unknown input {chunk.field!r}; this task takes "
                    + (", ".join(accepted) or "no files"),
                )
            writer = writers.get(chunk.field)
            if writer is None:
                writer = spool.open(chunk.field, clean_name(chunk.file_name), budget, hashed=hashed)
                writers[chunk.field] = writer
            await writer.write(chunk.data)
        if params is None:
            raise invalid_argument("params", "PARAMS_NOT_FIRST", "the request stream was empty")
        missing = [name for name in required if name not in writers]
        if missing:
            raise ServiceError(
                ErrorKind.INVALID_ARGUMENT,
                "MISSING_INPUT",
                f"missing input: {', '.join(missing)}",
                violations=tuple(FieldViolation(name, "required") for name in missing),
                metadata={"field": ",".join(missing)},
            )
        files = {name: await w.finish() for name, w in writers.items()}
    except ServiceError:
        for w in writers.values():
            w.discard()
        await _drain(requests, max(budget.limit, DRAIN_MIN_BYTES))
        raise
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    upload = Upload(params, files)
    empty = [name for name, f in files.items() if f.size == 0]
    if empty:
        upload.discard()
        raise invalid_argument(empty[0], "EMPTY_IMAGE", f"input {empty[0]!r} is empty")
    return upload


async def _drain(requests: AsyncIterator[Any], max_bytes: int) -> None:
    """Read and drop what the client is still sending, within bounds, before failing the call.

    A gRPC client whose write is in flight when the server ends the call reports a local
    INTERNAL error instead of the server's status. Draining lets a client that sends its whole
    upload see the real reason; the bounds keep an endless sender from holding the call open.
    """
    seen = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for msg in requests:
                seen += msg.ByteSize()
                if seen > max_bytes:
                    return
    except (TimeoutError, Exception):
        return


def clean_name(name: str) -> str:
    """The name an upload is known by (shown and handed back in output names): the last path
    part, printable, with percent-escapes decoded first (so ``..%2f`` cannot hide a
    separator), no ``%`` left, and no run of dots (so never ``..``) nor dot at either end."""
    for _ in range(3):  # double-encoded escapes too
        decoded = unquote(name)
        if decoded == name:
            break
        name = decoded
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable() and c != "%")
    base = re.sub(r"\.{2,}", ".", base).strip(" .")[:128]
    return base or "upload"
