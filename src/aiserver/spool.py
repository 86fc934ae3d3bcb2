"""Uploaded inputs, written to disk as they stream in.

Bytes go to a temporary file while a SHA-256 is computed; a finished file is either moved into
the content-addressed spool (job inputs, read later by providers) or deleted after use (light
tasks). A light task's input is instead held in memory while the process's budget allows
(``aiserver.spool_memory``), and spills to its file past it. The byte budget is shared by
all files of one request and is enforced per chunk, so an oversize upload is refused as soon
as it passes the limit, not after it has been stored.

With a shared blob store (several coordinators, docs/scale-out.md) a job's inputs are also
put there (``inputs/{sha[:2]}/{sha}``) before the job is stored, so whichever process runs the
job finds them: :meth:`InputSpool.local_path` fetches one into the local spool when needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import threading
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from aiserver.blobs import BlobStore
from aiserver.errors import ErrorKind, FieldViolation, ServiceError
from aiserver.spool_memory import HeldBytes, SpoolMemory

__all__ = ["InputSpool", "SpooledFile", "UploadBudget"]

logger = logging.getLogger(__name__)


class UploadBudget:
    """Bytes one request may still upload, across all its files."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, field: str, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise ServiceError(
                ErrorKind.RESOURCE_EXHAUSTED,
                "UPLOAD_TOO_LARGE",
                f"upload exceeds the limit of {self.limit} bytes",
                violations=(FieldViolation(field, f"larger than {self.limit} bytes"),),
                metadata={"field": field, "limit_bytes": str(self.limit)},
            )


@dataclass(slots=True)
class SpooledFile:
    """A finished upload: on disk at ``path``, or in ``data``; ``sha256`` is empty when it
    was not hashed."""

    field: str
    file_name: str
    path: Path
    sha256: str
    size: int
    held: HeldBytes | None = None
    """An upload used once (not hashed) held in memory (:class:`SpoolMemory`): nothing is
    written at ``path``; ``held.release()`` gives the memory back."""
    content: bytes | None = None
    """A small job input (hashed, at most :data:`KEEP_CONTENT_BYTES`): its bytes, which the
    request's checks read, and which either go with the job into the job store
    (``InputRef.stored``) or are written to ``path`` by :meth:`InputSpool.commit`."""
    written: bool = True
    """Whether the bytes are in the file at ``path``; ``False``: in ``content`` only."""


KEEP_CONTENT_BYTES = 256 * 1024
"""The largest job input kept in :attr:`SpooledFile.content` and not written at ``finish``:
the API checks it on the event loop (larger ones in the image pool, from the file), then
stores the smallest with their job (a row, no file: api/job_calls.py) and has the others
written by :meth:`InputSpool.commit`."""


_INLINE_BYTES = 2 * 1024 * 1024
"""Uploads up to this size (most images) are hashed and written on the event loop at the end,
at most about 2 ms there: cheaper than starting a thread and waking it per chunk, which on a
busy machine waits for a core each time."""
_DEFAULT_MEMORY = 256 * 1024 * 1024
"""``AISERVER_SPOOL_MEMORY_MB``'s default."""
_MAX_PENDING = 8 * 1024 * 1024
"""Bytes handed to the writer thread and not yet written before the reader waits."""


class _Writer:
    """One file being uploaded. A file used once is held in memory within the spool's
    :class:`SpoolMemory` and spills to disk past it. Otherwise, past :data:`_INLINE_BYTES`, a
    thread of its own hashes and writes the chunks (hashlib and file writes release the GIL),
    fed through a queue bounded by :data:`_MAX_PENDING` bytes, so the event loop only hands
    chunks over: no thread hop per chunk, no copy. The thread wakes the loop only when the
    reader waits for room or for the end.

    The file is created only when bytes go to disk. An upload used once (not hashed: a
    crop's or conversion's input) held in memory never does: it is handed over as bytes.
    Creating, writing and deleting its file cost 0.5-1 ms of the event loop per call on a
    busy disk (measured on a 1.2 MB JPEG), as much as receiving it."""

    def __init__(
        self, spool: InputSpool, field: str, file_name: str, budget: UploadBudget, hashed: bool
    ) -> None:
        self.field = field
        self.file_name = file_name
        self._budget = budget
        self._hash = hashlib.sha256() if hashed else None
        # Held in memory while it fits (used once only); None: the inline rule (hashed, or
        # spilled).
        self._memory = None if hashed else HeldBytes(spool.memory)
        self._spilled: HeldBytes | None = None  # what was held, until the thread has written it
        self._spilled_parts = 0  # its parts at the head of the thread's queue
        self._share = spool.memory.share
        self._size = 0
        self.path = spool.tmp_path()
        self._on_disk = False  # the file has been created
        self._held: list[bytes | memoryview] = []  # before the thread starts
        self._queue: deque[bytes | memoryview | None] = deque()
        # Made with the thread (most uploads never start one): only it and write() use them.
        self._lock: threading.Lock | None = None
        self._wake: threading.Condition | None = None
        self._pending = 0
        self._room: asyncio.Future[None] | None = None
        self._ended: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._aborted = False
        self._thread: threading.Thread | None = None

    async def write(self, data: bytes) -> None:
        self._budget.take(self.field, len(data))
        self._size += len(data)
        if self._thread is None:
            memory = self._memory
            if memory is None:
                self._held.append(data)
                if self._size > _INLINE_BYTES:
                    self._start()
            elif self._size > self._share or not memory.add(data):
                self._spill(memory, data)
            return
        if self._error is not None:
            raise self._error
        assert self._lock is not None and self._wake is not None
        with self._lock:
            self._queue.append(data)
            self._pending += len(data)
            self._wake.notify()
            if self._pending <= _MAX_PENDING:
                return
            room = self._room = asyncio.get_running_loop().create_future()
        await room

    def _spill(self, memory: HeldBytes, data: bytes) -> None:
        """Past its share or the budget: to the file, what is held first. Within
        :data:`_INLINE_BYTES` as a hashed upload is (a copy, no thread: the budget full or 0
        must not cost a thread per small upload); past it through the thread, which gives the
        held blocks back as soon as it has written them, not when the upload ends."""
        self._memory = None
        if self._size <= _INLINE_BYTES:
            self._held = [memory.tobytes(), data] if memory.size else [data]
            memory.release()
            return
        views = memory.views()
        self._held = [*views, data]
        self._spilled, self._spilled_parts = memory, len(views)
        self._start()

    def _start(self) -> None:
        self._on_disk = True
        fh = self.path.open("wb")
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        loop = asyncio.get_running_loop()
        self._ended = loop.create_future()
        self._queue.extend(self._held)
        self._pending = sum(len(d) for d in self._held)
        self._held = []
        self._thread = threading.Thread(
            target=self._run, args=(loop, fh), name="upload-writer", daemon=True
        )
        self._thread.start()

    def _run(self, loop: asyncio.AbstractEventLoop, fh: BinaryIO) -> None:
        assert self._lock is not None and self._wake is not None
        spilled, parts = self._spilled, self._spilled_parts
        if spilled is not None and not parts:
            spilled.release()
        while True:
            with self._lock:
                while not self._queue:
                    self._wake.wait()
                data = self._queue.popleft()
            if data is None:
                break
            if self._error is None and not self._aborted:
                try:
                    if self._hash is not None:
                        self._hash.update(data)
                    fh.write(data)
                except BaseException as exc:  # reported to the reader at its next call
                    self._error = exc
            with self._lock:
                self._pending -= len(data)
                room = self._room if self._pending <= _MAX_PENDING // 2 else None
                if room is not None:
                    self._room = None
            if room is not None:
                _resolve(loop, room)
            if spilled is not None:
                parts -= 1
                if not parts:  # written (or skipped): nothing reads the blocks any more
                    del data
                    spilled.release()  # thread-safe; once
                    spilled = None
        try:
            fh.close()
        except OSError as exc:
            self._error = self._error or exc
        if self._ended is not None:
            _resolve(loop, self._ended)

    def _stop_thread(self) -> None:
        assert self._lock is not None and self._wake is not None
        with self._lock:
            self._queue.append(None)
            self._wake.notify()

    async def finish(self) -> SpooledFile:
        if self._memory is not None and self._thread is None:  # used once, within the budget
            return SpooledFile(self.field, self.file_name, self.path, "", self._size, self._memory)
        if self._thread is None:
            if self._hash is not None and self._size <= KEEP_CONTENT_BYTES:
                # A small job input: no file yet (maybe never, see KEEP_CONTENT_BYTES); only
                # job inputs (hashed) are checked from these bytes. The API's chunks are views
                # into the request message (api/wire.py): a copy of at most 256 KiB.
                held, self._held = self._held, []
                first = held[0] if len(held) == 1 else b"".join(held)
                content = first if isinstance(first, bytes) else bytes(first)
                self._hash.update(content)
                return SpooledFile(
                    self.field,
                    self.file_name,
                    self.path,
                    self._hash.hexdigest(),
                    self._size,
                    content=content,
                    written=False,
                )
            self._on_disk = True
            _write_file(self.path, self._held, self._hash)
            self._held = []
        else:
            assert self._ended is not None
            self._stop_thread()
            await asyncio.shield(self._ended)  # the file is closed only once it has ended
            if self._error is not None:
                raise self._error
        digest = self._hash.hexdigest() if self._hash is not None else ""
        return SpooledFile(self.field, self.file_name, self.path, digest, self._size)

    def discard(self) -> None:
        """Drop the file, finished or not (the thread, if any, stops without writing more)."""
        self._aborted = True
        self._held = []
        if self._memory is not None:
            self._memory.release()
        if self._thread is None:
            if self._spilled is not None:  # the thread never started: nothing reads them
                self._spilled.release()
        elif self._ended is not None and not self._ended.done():
            self._stop_thread()  # it gives the spilled blocks back once past them
        if self._on_disk:
            self.path.unlink(missing_ok=True)


def _write_file(
    path: Path, chunks: list[bytes | memoryview], digest: hashlib._Hash | None = None
) -> None:
    """Create ``path`` with ``chunks`` (hashed into ``digest`` on the way). A raw descriptor:
    a Python file object around one or two writes cost about a quarter of creating, writing
    and closing the file (job inputs, on the loop)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        for data in chunks:
            if digest is not None:
                digest.update(data)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _is_file(path: Path) -> bool:
    """On the event loop: one stat of a local file takes microseconds, a thread hop for it
    about 0.1 ms of CPU."""
    return os.path.isfile(path)


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]) -> None:
    def settle() -> None:
        if not future.done():
            future.set_result(None)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle)


class InputSpool:
    """A folder of uploads: ``tmp/`` for files being written, ``{sha[:2]}/{sha}`` for inputs."""

    def __init__(
        self, root: Path, shared: BlobStore | None = None, memory: SpoolMemory | None = None
    ) -> None:
        self.root = root
        self.memory = memory or SpoolMemory(_DEFAULT_MEMORY)
        """Uploads used once are held here while it has room (one budget per process)."""
        self.tmp_dir = root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        # Temp names: unique per spool object (the counter) and per process (the random
        # part); a uuid4 per upload cost a getrandom call and a UUID object.
        self._tmp_prefix = f"{uuid.uuid4().hex}-"
        self._tmp_count = itertools.count()
        self._folders: set[str] = set()  # {sha[:2]} folders made already
        self._pins: Counter[str] = Counter()
        self._shared = shared
        """Where every coordinator finds inputs; ``None``: this process alone (the folder)."""

    def pinned(self, sha256: str) -> bool:
        """True while a request holds this input between commit and job submission."""
        return self._pins[sha256] > 0

    def unpin(self, spooled: SpooledFile) -> None:
        """The request that committed ``spooled`` is done with it (its job, if any, now
        references it)."""
        self._pins[spooled.sha256] -= 1
        if self._pins[spooled.sha256] <= 0:
            del self._pins[spooled.sha256]

    def open(
        self, field: str, file_name: str, budget: UploadBudget, *, hashed: bool = True
    ) -> _Writer:
        """A writer for one uploaded file; ``hashed=False`` for files used once and deleted
        (light tasks): their SHA-256 would cost more CPU than receiving them."""
        return _Writer(self, field, file_name, budget, hashed)

    def tmp_path(self) -> Path:
        """A new name for a file being uploaded, in ``tmp/``."""
        return self.tmp_dir / f"{self._tmp_prefix}{next(self._tmp_count)}.part"

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def commit(self, spooled: SpooledFile) -> SpooledFile:
        """Move a finished upload into the content-addressed spool (idempotent per content)
        and pin it until :meth:`unpin`, so that a job ending meanwhile with the same input
        does not delete it."""
        if not spooled.sha256:
            raise ValueError("only a hashed upload can be committed")
        if not spooled.written:  # a small input not stored with its job: its file now
            assert spooled.content is not None
            try:
                _write_file(spooled.path, [spooled.content])
            except BaseException:  # (the disk) no part file left behind for a sweep
                spooled.path.unlink(missing_ok=True)
                raise
            spooled.written = True
        self._pins[spooled.sha256] += 1
        target = self.path_for(spooled.sha256)
        folder = spooled.sha256[:2]
        if folder not in self._folders:
            target.parent.mkdir(exist_ok=True)
            self._folders.add(folder)
        try:
            os.replace(spooled.path, target)  # same content: replacing is harmless
        except FileNotFoundError:
            if not spooled.path.exists():
                raise
            target.parent.mkdir(exist_ok=True)  # the folder was removed since it was made
            os.replace(spooled.path, target)
        spooled.path = target
        return spooled

    @staticmethod
    def _key(sha256: str) -> str:
        return f"inputs/{sha256[:2]}/{sha256}"

    async def share(self, sha256: str) -> bool:
        """Make the input reachable by every process; ``False`` if it exists nowhere.

        Without a shared store this only checks the local file."""
        path = self.path_for(sha256)
        local = _is_file(path)
        if self._shared is None:
            return local
        if not local:
            return await self._shared.size(self._key(sha256)) is not None
        data = await asyncio.to_thread(path.read_bytes)
        await self._shared.put(self._key(sha256), data)  # write-once: a no-op when there
        return True

    async def local_path(self, sha256: str) -> Path:
        """The input as a local file, fetched from the shared store if only there (a job
        claimed by another process than the one that received the upload).
        :class:`FileNotFoundError` if it exists nowhere."""
        path = self.path_for(sha256)
        if _is_file(path):
            return path
        if self._shared is None:
            raise FileNotFoundError(sha256)
        part = self.tmp_path()
        try:
            with part.open("wb") as fh:
                async for chunk in self._shared.read(self._key(sha256), chunk_size=1 << 20):
                    await asyncio.to_thread(fh.write, chunk)
            path.parent.mkdir(exist_ok=True)
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
        return path

    @property
    def shared(self) -> bool:
        return self._shared is not None

    def delete_local(self, sha256: str) -> None:
        """Remove the local copy (synchronous: no request can commit the same bytes between
        the caller's pin check and this)."""
        path = self.path_for(sha256)
        try:
            path.unlink(missing_ok=True)
        except OSError:
            logger.warning("could not delete spooled input %s", path, exc_info=True)

    async def delete_shared(self, sha256: str) -> None:
        """Remove the shared copy (the caller knows no job needs it)."""
        if self._shared is not None:
            try:
                await self._shared.delete(self._key(sha256))
            except Exception:
                logger.warning("could not delete shared input %s", sha256, exc_info=True)

    def sweep_tmp(self) -> None:
        """Delete partial uploads left by a crash (run at start-up, before serving)."""
        for part in self.tmp_dir.glob("*.part"):
            part.unlink(missing_ok=True)
