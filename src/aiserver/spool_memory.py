"""Uploads used once (crop and conversion inputs) held in memory instead of a spool file.

One :class:`SpoolMemory` per process bounds what all of them hold together
(``AISERVER_SPOOL_MEMORY_MB``); when the budget has no room, or an upload passes its share,
it spills to its spool file (``aiserver.spool``). A chunk of :data:`KEEP_BYTES` or more that
grpc received as ``bytes`` is kept as it is (a view of the message: no copy); smaller chunks
are copied into the memory's blocks, so that a stream of tiny chunks cannot hold more in
objects than the budget counts. Keeping received bytes costs fresh pages per upload with
glibc's default malloc settings (64 MiB of page faults per 64 MiB upload, more CPU than
writing the file: bench/README.md, helper "bytes"); ``aiserver serve`` therefore keeps freed
heap memory up to about a share (:func:`aiserver.heap.keep_freed_memory`), and the copy it
saves is about 7 ms per 64 MiB (helper "upload3"). Blocks are reused across uploads, up to
``share`` bytes of them kept while free; they are anonymous maps, so those not kept go back
to the system at once.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import itertools
import mmap
import threading
from typing import IO, TYPE_CHECKING, cast

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["BLOCK_BYTES", "KEEP_BYTES", "HeldBytes", "SpoolMemory"]

BLOCK_BYTES = 256 * 1024
"""Memory is taken in blocks of this size (a small image holds one)."""
KEEP_BYTES = 64 * 1024
"""Chunks from this size are kept as received: a view's own object (~200 bytes) is then
under 0.3% of what it holds."""


class SpoolMemory:
    """The process's budget for uploads held in memory, in bytes of blocks taken."""

    def __init__(self, limit: int, share: int | None = None) -> None:
        self.limit = max(0, limit)
        self.share = self.limit // 4 if share is None else share
        """The most one upload may hold: a few large uploads cannot take all of it (the
        default, a quarter of 256 MiB, is the default request limit of 64 MiB)."""
        self.used = 0
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()  # given back from any thread that drops an upload

    def take(self, count: int) -> list[mmap.mmap] | None:
        """``count`` blocks, or None when the budget has no room for them."""
        with self._lock:
            if self.used + count * BLOCK_BYTES > self.limit:
                return None
            self.used += count * BLOCK_BYTES
            reused = min(count, len(self._free))
            blocks = self._free[len(self._free) - reused :]
            del self._free[len(self._free) - reused :]
        try:
            while len(blocks) < count:
                blocks.append(mmap.mmap(-1, BLOCK_BYTES))
        except BaseException:  # no memory for a map: the budget and the blocks come back
            with self._lock:
                self.used -= (count - len(blocks)) * BLOCK_BYTES
            self.give(blocks)
            raise
        return blocks

    def charge(self, n: int) -> bool:
        """Count ``n`` bytes kept as received; False when the budget has no room for them."""
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def refund(self, n: int) -> None:
        with self._lock:
            self.used -= n

    def give(self, blocks: list[mmap.mmap]) -> None:
        with self._lock:
            self.used -= len(blocks) * BLOCK_BYTES
            keep = max(0, self.share // BLOCK_BYTES - len(self._free))
            self._free.extend(blocks[:keep])
        for block in blocks[keep:]:
            with contextlib.suppress(BufferError):  # a view still out: unmapped when it goes
                block.close()

    @property
    def kept(self) -> int:
        """Bytes of free blocks kept for reuse."""
        return len(self._free) * BLOCK_BYTES


class HeldBytes:
    """One upload's bytes: received chunks kept as they are, small ones copied into blocks of
    a :class:`SpoolMemory`; :meth:`open` reads them as a file (the image pool),
    :meth:`release` gives the memory back (once; idempotent; from any thread).

    Blocks go back only once no reader is open: an image worker whose call was cancelled
    keeps running after the loop released the upload, and must not read blocks that another
    upload reuses meanwhile (``used`` counts them until then)."""

    __slots__ = (
        "_blocks",
        "_charged",
        "_memory",
        "_parts",
        "_readers",
        "_released",
        "_room",
        "size",
    )

    def __init__(self, memory: SpoolMemory) -> None:
        self._memory = memory
        self._parts: list[memoryview] = []  # the bytes, in order
        self._blocks: list[mmap.mmap] = []  # taken from the memory
        self._room = 0  # bytes free in the last block while it is the last part
        self._charged = 0  # bytes kept as received, counted in the memory's budget
        self._readers = 0  # open readers (under the memory's lock)
        self._released = False
        self.size = 0

    def add(self, data: ReadableBuffer) -> bool:
        """Append ``data``; False (nothing added) when the budget has no room for it."""
        view = memoryview(data).cast("B")
        n = len(view)
        if n >= KEEP_BYTES and isinstance(view.obj, bytes):
            # Immutable: a view of it stays valid. It keeps its whole object alive, which
            # is what the budget counts (a message may carry more than its chunk).
            whole = len(view.obj)
            if whole <= 2 * n:
                if not self._memory.charge(whole):
                    return False
                self._charged += whole
                self._parts.append(view)
                self._room = 0  # a small chunk after it starts a block: the parts stay in order
                self.size += n
                return True
        need = -(-(n - self._room) // BLOCK_BYTES) if n > self._room else 0
        more: list[mmap.mmap] = []
        if need > 0:
            taken = self._memory.take(need)
            if taken is None:
                return False
            more = taken
        done = 0
        if self._room:  # the last part is a block with room: fill it
            block = self._blocks[-1]
            fill = BLOCK_BYTES - self._room
            step = min(n, self._room)
            memoryview(block)[fill : fill + step] = view[:step]
            self._parts[-1] = memoryview(block)[: fill + step]
            self._room -= step
            done = step
        if more:
            for block in more:
                step = min(n - done, BLOCK_BYTES)
                memoryview(block)[:step] = view[done : done + step]
                self._parts.append(memoryview(block)[:step])
                done += step
            self._blocks += more
            self._room = BLOCK_BYTES - step
        self.size += n
        return True

    def views(self) -> list[memoryview]:
        """The bytes, in order (valid until :meth:`release`)."""
        return self._parts[:]

    def tobytes(self) -> bytes:
        return b"".join(self._parts)

    @property
    def released(self) -> bool:
        return self._released

    def open(self, mode: str = "rb") -> IO[bytes]:
        """A read-only, seekable file over the bytes (``mode`` as ``Path.open``'s); the
        memory stays this upload's until it is closed."""
        if mode != "rb":
            raise ValueError("held bytes are read only")
        with self._memory._lock:
            if self._released:
                raise ValueError("the held bytes were released")
            self._readers += 1
        return cast(IO[bytes], _Reader(self, self._parts[:], self.size))

    def release(self) -> None:
        with self._memory._lock:
            if self._released:
                return
            self._released = True
            dropped = self._drop_if_unread()
        self._give(dropped)

    def _reader_closed(self) -> None:
        with self._memory._lock:
            self._readers -= 1
            dropped = self._drop_if_unread()
        self._give(dropped)

    def _drop_if_unread(self) -> tuple[list[mmap.mmap], int] | None:
        """The blocks and the bytes to give back, once released and unread (under the
        memory's lock)."""
        if not self._released or self._readers:
            return None
        dropped = self._blocks, self._charged
        self._blocks, self._parts, self._charged, self._room = [], [], 0, 0
        self.size = 0
        return dropped

    def _give(self, dropped: tuple[list[mmap.mmap], int] | None) -> None:
        if dropped is None:
            return
        blocks, charged = dropped
        if charged:
            self._memory.refund(charged)
        if blocks:
            self._memory.give(blocks)


class _Reader(io.RawIOBase):
    """A file over the parts: ``read`` returns ``bytes`` sliced out of them (one copy, as
    ``BytesIO`` does). Reads fail once the upload is released (a cancelled call's worker
    stops early); the memory is the upload's until :meth:`close`."""

    def __init__(self, held: HeldBytes, parts: list[memoryview], size: int) -> None:
        super().__init__()
        self._held: HeldBytes | None = held
        self._parts = parts
        self._ends = list(itertools.accumulate(len(p) for p in parts))
        self._size = size
        self._pos = 0

    def close(self) -> None:
        held, self._held = self._held, None
        self._parts = []
        super().close()
        if held is not None:
            held._reader_closed()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise OSError(22, "negative seek position")
        self._pos = pos
        return pos

    def read(self, size: int | None = -1) -> bytes:
        held = self._held
        if held is None:
            raise ValueError("I/O operation on closed file")
        if held.released:
            raise ValueError("the held bytes were released")
        start = self._pos
        end = self._size if size is None or size < 0 else min(self._size, start + size)
        if end <= start:
            return b""
        index = bisect.bisect_right(self._ends, start)
        part = self._parts[index]
        offset = start - self._ends[index] + len(part)
        if offset + end - start <= len(part):  # within one part: the common case
            out = bytes(part[offset : offset + end - start])
        else:
            pieces = [part[offset:]]
            got = len(part) - offset
            while got < end - start:
                index += 1
                piece = self._parts[index][: end - start - got]
                pieces.append(piece)
                got += len(piece)
            out = b"".join(pieces)
        self._pos = end
        return out

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: WriteableBuffer) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)
