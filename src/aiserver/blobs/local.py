"""Blobs as files under one folder: the embedded default, and today's artifact layout."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import itertools
import logging
import os
import stat
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiserver.blobs.protocol import DEFAULT_CHUNK_SIZE, Frame, framed

__all__ = ["LocalBlobStore"]

_INLINE_READ = 64 * 1024
"""A read this small is done on the event loop: quicker than a thread hop."""
_PREADV = hasattr(os, "preadv")
_NOWAIT = getattr(os, "RWF_NOWAIT", 0) if _PREADV else 0
"""Linux: a read that fails instead of waiting for the disk. Bytes in the page cache (a
recent artifact) are then read on the event loop: a 1 MiB copy costs about 0.05 ms here,
a thread hop per chunk more than that in wake-ups and GIL hand-offs (measured on
ReadArtifact of 64 MiB: about 30% of the service's CPU)."""

logger = logging.getLogger(__name__)


def _bytes_maker() -> Callable[[int], bytes]:
    """``n`` -> a new ``bytes`` of ``n`` bytes for a read to fill. CPython's
    ``PyBytes_FromStringAndSize(NULL, n)`` leaves them unset; ``bytes(n)`` writes zeros over
    every byte first (measured: 10-17% more CPU per 1 MiB read from the page cache)."""
    try:
        import ctypes  # optional: a build without it reads into bytes(n)

        kind = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)
        unset = kind(("PyBytes_FromStringAndSize", ctypes.pythonapi))
    except (ImportError, AttributeError, OSError):  # not CPython, or no ctypes
        return bytes
    return lambda n: unset(None, n)


_new_bytes = _bytes_maker()


def _read_at(
    fd: int, size: int, offset: int, frame: Frame | None, flags: int = 0
) -> tuple[bytes, int] | None:
    """Up to ``size`` bytes at ``offset`` inside their ``frame``, in one ``bytes`` object that
    the read lands in (the kernel's copy is the only one), and how many bytes were read;
    ``None`` when ``flags`` hold ``RWF_NOWAIT`` and the read would wait for the disk (or this
    system cannot tell)."""
    if not _PREADV:  # not Linux, BSD or macOS: read, then frame
        if flags:
            return None
        data = os.pread(fd, size, offset)
        return framed(data, offset, frame), len(data)
    head, tail = frame(offset, size) if frame is not None else (b"", b"")
    start, end = len(head), len(head) + size
    # A BytesIO made on a bytes object that it alone holds lends out that object's memory
    # and hands the same object back from getvalue(): read, head and tail land in place.
    buffer = io.BytesIO(_new_bytes(end + len(tail)))
    with buffer.getbuffer() as view:
        try:
            got = os.preadv(fd, [view[start:end]], offset, flags)
        except BlockingIOError:
            return None
        except OSError as exc:
            if flags and exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                return None
            raise
        if got < size:  # the end of the file, or a partial cached read: framed anew
            return framed(bytes(view[start : start + got]), offset, frame), got
        view[:start] = head
        view[end:] = tail
    return buffer.getvalue(), size


def _read(fd: int, size: int, offset: int, frame: Frame | None) -> tuple[bytes, int]:
    """:func:`_read_at`, waiting for the disk if it must."""
    read = _read_at(fd, size, offset, frame)
    assert read is not None  # only a RWF_NOWAIT read gives up
    return read


def _read_cold(fd: int, size: int, offset: int, frame: Frame | None) -> tuple[bytes, int]:
    """The first read that waits for the disk (in a worker thread); the kernel is asked to
    read the rest of the file ahead meanwhile."""
    with contextlib.suppress(OSError, AttributeError):
        os.posix_fadvise(fd, offset, 0, os.POSIX_FADV_SEQUENTIAL)
    return _read(fd, size, offset, frame)


class _DirSyncs:
    """Directory fsyncs shared by concurrent writers (group commit): a caller returns once a
    sync of its directory that began after its call has finished, so one sync covers every
    rename made while the previous one ran (puts of one day share one folder)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._started: dict[str, int] = {}  # syncs begun, per directory
        self._done: dict[str, int] = {}  # syncs finished
        self._running: set[str] = set()

    def sync(self, path: Path) -> None:
        folder = os.fspath(path)  # str keys: hashing a new Path object each time cost more
        with self._lock:
            # A sync running now may have begun before our rename: we need the next one.
            needed = self._started.get(folder, 0) + 1
            while True:
                if self._done.get(folder, 0) >= needed:
                    return
                if folder not in self._running:
                    break
                self._changed.wait()
            self._running.add(folder)
            self._started[folder] = started = self._started.get(folder, 0) + 1
        synced = False
        try:
            dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            synced = True
        finally:
            with self._lock:
                self._running.discard(folder)
                if synced:  # else a waiter starts its own
                    self._done[folder] = max(self._done.get(folder, 0), started)
                self._changed.notify_all()


class LocalBlobStore:
    """``{root}/{key}`` for each blob; ``{root}/.tmp/`` for blobs being written (same file
    system, so the final rename is atomic). Temp files left by a crash go at start-up."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._root_name = os.fspath(root.resolve(strict=True))
        self._dir_syncs = _DirSyncs()
        self._tmp = root / ".tmp"
        self._tmp.mkdir(exist_ok=True)
        # Temp names: unique per store object (the counter) and per process (the random part).
        self._tmp_prefix = f"{self._tmp}/{uuid.uuid4().hex}-"
        self._tmp_count = itertools.count()
        self._folders: set[str] = set()  # made already (a retention delete leaves folders)
        for stale in self._tmp.iterdir():
            stale.unlink(missing_ok=True)

    def _path(self, key: str) -> Path:
        """The file of ``key``, never outside ``root``: a key with ``..``, or a symlink
        anywhere below ``root`` (the file itself included), does not exist."""
        return self._look(key)[0]

    def _look(self, key: str) -> tuple[Path, os.stat_result | None]:
        """:meth:`_path`, and the file's ``lstat`` (``None``: no such file yet). One
        ``lstat`` per component of the key, on the event loop like every read's metadata
        (the kernel's cache answers for a recent blob; the old ``Path.resolve`` walked the
        root's own path too, in Python: 0.18 ms, twice per artifact read)."""
        parts = [part for part in key.split("/") if part and part != "."]
        if not parts or ".." in parts:
            raise FileNotFoundError(key)
        current = self._root_name
        found = None
        for part in parts:
            current = f"{current}/{part}"
            try:
                found = os.lstat(current)
            except FileNotFoundError:
                found = None
                break  # nothing exists below (a put makes the folders)
            except OSError as exc:  # NotADirectoryError, ELOOP, EACCES...
                raise FileNotFoundError(key) from exc
            if stat.S_ISLNK(found.st_mode):
                logger.warning("blob %s leaves the store through a symlink", key)
                raise FileNotFoundError(key)
        return Path(self._root_name, *parts), found  # the very path that was checked

    def put_now(self, key: str, data: bytes) -> None:
        """:meth:`put` in the calling thread (a worker's: it waits for the disk)."""
        path = self._path(key)
        if path.is_file():
            return
        # A raw descriptor, a folder made once per day and no unlink after a rename: the
        # Python file object, mkdir's FileExistsError and a failing unlink were about
        # 30 us of a put's 110 us of CPU besides its syncs.
        tmp = f"{self._tmp_prefix}{next(self._tmp_count)}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            folder = os.path.dirname(path)
            if folder not in self._folders:
                os.makedirs(folder, exist_ok=True)
                self._folders.add(folder)
            try:
                os.replace(tmp, path)
            except FileNotFoundError:  # the folder was removed since it was made
                self._folders.discard(folder)
                os.makedirs(folder, exist_ok=True)
                os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # The rename is durable only once the directory entry is on disk.
        self._dir_syncs.sync(path.parent)

    async def put(self, key: str, data: bytes, *, fresh: bool = False) -> None:
        await asyncio.to_thread(self.put_now, key, data)  # its look is a stat: kept

    async def size(self, key: str) -> int | None:
        try:
            found = self._look(key)[1]  # its lstat: no thread hop, no second stat
        except FileNotFoundError:
            return None
        return found.st_size if found is not None and stat.S_ISREG(found.st_mode) else None

    async def read(
        self,
        key: str,
        offset: int = 0,
        length: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        *,
        frame: Frame | None = None,
    ) -> AsyncIterator[bytes]:
        path = self._path(key)
        # O_NOFOLLOW: a symlink planted after the check above is still refused. Opened here:
        # the check has just looked the file up, so the open finds it in the kernel's cache.
        try:
            # O_NONBLOCK: no effect on a regular file, and no hang of the loop on a FIFO
            # planted in its place (refused just below).
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise FileNotFoundError(key) from exc
        loop = asyncio.get_running_loop()
        ahead: asyncio.Future[tuple[bytes, int]] | None = None
        try:
            found = os.fstat(fd)
            if not stat.S_ISREG(found.st_mode):
                raise FileNotFoundError(key)
            size = found.st_size
            remaining = max(0, size - offset) if length is None else min(length, size - offset)
            # Small reads are done here (cheaper than a thread hop), and so are bytes in the
            # page cache until a chunk has had to come from the disk; from then on, reads run
            # in threads, one chunk ahead of the one being sent.
            inline = remaining <= _INLINE_READ
            while remaining > 0:
                wanted = min(chunk_size, remaining)
                from_disk = ahead is not None
                read = None
                if inline and not _NOWAIT:
                    read = _read(fd, wanted, offset, frame)  # cannot tell: a small read here
                elif not from_disk:
                    # Only what the page cache holds is read on the loop; a small blob that
                    # must come from the disk is read in a thread like a large one.
                    read = _read_at(fd, wanted, offset, frame, _NOWAIT) if _NOWAIT else None
                if read is None:
                    if ahead is None:
                        from_disk = True
                        ahead = loop.run_in_executor(None, _read_cold, fd, wanted, offset, frame)
                    # Shielded: a cancelled reader leaves the read to finish (see finally).
                    read = await asyncio.shield(ahead)
                    ahead = None
                chunk, got = read
                if not got:
                    break  # truncated under us: stop rather than spin
                offset += got
                remaining -= got
                if remaining > 0 and from_disk:
                    ahead = loop.run_in_executor(
                        None, _read, fd, min(chunk_size, remaining), offset, frame
                    )
                yield chunk
        finally:
            if ahead is not None and not ahead.done():
                # A read still runs in its thread: the descriptor goes when it is done, so
                # that it cannot be reused under that read.
                ahead.add_done_callback(lambda _: os.close(fd))
            else:
                os.close(fd)

    async def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            path = self._path(key)
            await asyncio.to_thread(path.unlink, missing_ok=True)

    @contextlib.asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        path = self._path(key)
        if not os.path.isfile(path):  # noqa: ASYNC240  # a stat: less than a thread hop
            raise FileNotFoundError(key)
        yield path

    def presigned_url(self, key: str, expires_s: int) -> str | None:
        return None  # served by the service itself, under its own signed URLs

    async def close(self) -> None:
        return None
