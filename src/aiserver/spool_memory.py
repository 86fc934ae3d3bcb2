"""Uploads used once (crop and conversion inputs) held in memory instead of a spool file.

One :class:`SpoolMemory` per process bounds what all of them hold together
(``AISERVER_SPOOL_MEMORY_MB``). An upload is copied into the memory's blocks as it arrives;
when the budget has no room, or the upload passes its share, it spills to its spool file
(``aiserver.spool``). Blocks are reused across uploads, up to ``share`` bytes of them kept
while free, because fresh memory is what costs: holding the received messages themselves
(64 MiB of new pages per 64 MiB upload) and joining them cost more CPU than writing the file
(bench/README.md, helper "bytes"), while a copy into warm blocks costs about a quarter of the
write. Blocks are anonymous maps, so those not kept go back to the system at once (freed
heap memory would stay in the process after a burst).
"""

from __future__ import annotations

import contextlib
import io
import mmap
import threading
from typing import IO, TYPE_CHECKING, cast

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, WriteableBuffer

__all__ = ["BLOCK_BYTES", "HeldBytes", "SpoolMemory"]

BLOCK_BYTES = 256 * 1024
"""Memory is taken in blocks of this size (a small image holds one)."""


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
    """One upload's bytes in blocks of a :class:`SpoolMemory`; :meth:`open` reads them as a
    file (the image pool), :meth:`release` gives the blocks back (once; idempotent; from any
    thread).

    Blocks go back only once no reader is open: an image worker whose call was cancelled
    keeps running after the loop released the upload, and must not read blocks that another
    upload reuses meanwhile (``used`` counts them until then)."""

    __slots__ = ("_blocks", "_memory", "_readers", "_released", "size")

    def __init__(self, memory: SpoolMemory) -> None:
        self._memory = memory
        self._blocks: list[mmap.mmap] = []
        self._readers = 0  # open readers (under the memory's lock)
        self._released = False
        self.size = 0

    def add(self, data: ReadableBuffer) -> bool:
        """Append ``data``; False (nothing added) when the budget has no room for it."""
        view = memoryview(data).cast("B")
        n = len(view)
        need = -(-(self.size + n) // BLOCK_BYTES) - len(self._blocks)
        if need > 0:
            more = self._memory.take(need)
            if more is None:
                return False
            self._blocks += more
        pos, done = self.size, 0
        while done < n:
            index, offset = divmod(pos, BLOCK_BYTES)
            step = min(n - done, BLOCK_BYTES - offset)
            memoryview(self._blocks[index])[offset : offset + step] = view[done : done + step]
            pos += step
            done += step
        self.size = pos
        return True

    def views(self) -> list[memoryview]:
        """The bytes, in order, as views of the blocks (valid until :meth:`release`)."""
        out = []
        left = self.size
        for block in self._blocks:
            if left <= 0:
                break
            out.append(memoryview(block)[: min(left, BLOCK_BYTES)])
            left -= BLOCK_BYTES
        return out

    def tobytes(self) -> bytes:
        return b"".join(self.views())

    @property
    def released(self) -> bool:
        return self._released

    def open(self, mode: str = "rb") -> IO[bytes]:
        """A read-only, seekable file over the bytes (``mode`` as ``Path.open``'s); the
        blocks stay this upload's until it is closed."""
        if mode != "rb":
            raise ValueError("held bytes are read only")
        with self._memory._lock:
            if self._released:
                raise ValueError("the held bytes were released")
            self._readers += 1
        return cast(IO[bytes], _Reader(self, self._blocks[:], self.size))

    def release(self) -> None:
        with self._memory._lock:
            if self._released:
                return
            self._released = True
            blocks = self._drop_if_unread()
        if blocks:
            self._memory.give(blocks)

    def _reader_closed(self) -> None:
        with self._memory._lock:
            self._readers -= 1
            blocks = self._drop_if_unread()
        if blocks:
            self._memory.give(blocks)

    def _drop_if_unread(self) -> list[mmap.mmap]:
        """The blocks to give back, once released and unread (under the memory's lock)."""
        if not self._released or self._readers:
            return []
        blocks, self._blocks = self._blocks, []
        self.size = 0
        return blocks


class _Reader(io.RawIOBase):
    """A file over blocks: ``read`` returns ``bytes`` sliced out of them (one copy, as
    ``BytesIO`` does). Reads fail once the upload is released (a cancelled call's worker
    stops early); the blocks are the upload's until :meth:`close`."""

    def __init__(self, held: HeldBytes, blocks: list[mmap.mmap], size: int) -> None:
        super().__init__()
        self._held: HeldBytes | None = held
        self._blocks = blocks
        self._size = size
        self._pos = 0

    def close(self) -> None:
        held, self._held = self._held, None
        self._blocks = []
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
        index, offset = divmod(start, BLOCK_BYTES)
        if offset + end - start <= BLOCK_BYTES:  # within one block: the common case
            out = bytes(memoryview(self._blocks[index])[offset : offset + end - start])
        else:
            parts = []
            pos = start
            while pos < end:
                index, offset = divmod(pos, BLOCK_BYTES)
                step = min(end - pos, BLOCK_BYTES - offset)
                parts.append(memoryview(self._blocks[index])[offset : offset + step])
                pos += step
            out = b"".join(parts)
        self._pos = end
        return out

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: WriteableBuffer) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)
