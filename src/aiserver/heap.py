"""The process's heap after start-up, kept out of the garbage collector's full passes.

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

import gc


def settle() -> int:
    """Collect what start-up left as garbage, then freeze the rest; returns the count frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
