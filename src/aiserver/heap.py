"""The process's heap: the start-up heap kept out of the garbage collector's full passes
(:func:`settle`), freed memory kept for the next upload (:func:`keep_freed_memory`).

About 97,000 objects are alive once the service has started (modules, classes, the proto
descriptors, the settings, the workflow catalogue) and nearly all of them live as long as the
process. Every full collection walked them all: measured in the service over 1,000 jobs at
16 callers (``bench.profile_service --cpu``'s collector line), one full pass of 39-54 ms of
CPU, half of the collector's time. :func:`settle` moves them to the permanent generation
(``gc.freeze``): reference counting still frees them, only cycles among them are never found.
For a process's entry point (``aiserver serve``), not for a library caller: a test process
that starts many services would keep their cycles.
"""

from __future__ import annotations

import ctypes
import gc
import sys


def settle() -> int:
    """Collect what start-up left as garbage, then freeze the rest; returns the count frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024
"""glibc's own ceiling for its moving threshold (``DEFAULT_MMAP_THRESHOLD_MAX``): every
gRPC message (at most ``max_message_bytes``) comes from the heap."""


def keep_freed_memory(keep: int) -> bool:
    """Let glibc keep up to about ``keep`` bytes of freed heap memory instead of returning
    it to the system at once; False where that cannot be set (not glibc).

    Uploads held in memory keep the ``bytes`` grpc received (``aiserver.spool_memory``). With
    glibc's default, moving thresholds a freed 64 MiB upload is trimmed off the heap's top and
    the next one faults 64 MiB of fresh pages in again: about 40 ms of CPU per 64 MiB, more
    than the copy that keeping them saves (bench/README.md, helpers "bytes" and "upload3").
    Setting the thresholds fixes them where glibc's own adaptation ends (allocations under
    32 MiB from the heap), and the top of the heap is trimmed only past ``keep`` (then down to
    nothing, as before): after a burst the process holds what it held before plus at most
    ``keep``, what the spool memory's free blocks held before. For a process's entry point
    (``aiserver serve``), not for a library caller: the setting is the process's.
    """
    if keep <= 0 or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - musl and others: no such symbol
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    trim = min(keep + MMAP_THRESHOLD // 4, 2**31 - 1)  # a little over ``keep``: its headers
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, trim))
