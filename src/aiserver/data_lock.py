"""One process per data folder.

The data folder holds what a process treats as its own: the embedded job store and artifact
index (SQLite, whose readers keep what they found until their own next write), the input
spool (its unfinished temp files are swept at start) and the variant cache. Two processes on
one folder would run the same recovered jobs twice and delete each other's uploads, so a
second one refuses to start. Coordinators sharing PostgreSQL and S3 still each get a folder
of their own (docs/scale-out.md).

The lock is ``flock`` on ``<folder>/.lock``: the kernel drops it when the process ends, even
by SIGKILL, so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["DataFolderInUse", "DataFolderLock"]


class DataFolderInUse(Exception):
    """Another live process holds the data folder."""


class DataFolderLock:
    """Held from :meth:`acquire` until :meth:`release` (or the process's end)."""

    def __init__(self, folder: Path) -> None:
        self._path = folder / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the folder, or raise :class:`DataFolderInUse` naming the holder's pid."""
        if self._fd is not None:
            return
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataFolderInUse(
                f"the data folder {self._path.parent} is in use by another aiserver process"
                f" (pid {holder}); give each process a folder of its own (AISERVER_DATA_DIR)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the folder up (closing the file drops the lock)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
