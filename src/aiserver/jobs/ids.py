"""Job ids: 26 characters, URL-safe, sortable by creation time (the ULID layout).

48 bits of milliseconds then 80 random bits, in Crockford's base32. Within one millisecond the
random part is incremented instead of redrawn, so ids from one process sort in creation order;
keyset pagination and the start-up queue rebuild rely on that order.
"""

from __future__ import annotations

import secrets
import threading
from datetime import datetime

__all__ = ["new_job_id"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # ascending in ASCII, so text order = time order
_RANDOM_BITS = 80
_lock = threading.Lock()
_last_ms = -1
_last_random = 0


def new_job_id(now: datetime) -> str:
    """A new id whose time part is ``now`` (an aware datetime)."""
    global _last_ms, _last_random  # process-wide monotonic state, by design
    ms = int(now.timestamp() * 1000)
    with _lock:
        if ms <= _last_ms:
            # Same (or a clock step back): stay after the previous id rather than go back in time.
            ms = _last_ms
            rand = _last_random + 1
            if rand >> _RANDOM_BITS:
                ms, rand = ms + 1, secrets.randbits(_RANDOM_BITS - 1)
        else:
            # A zero top bit leaves room to increment within the millisecond.
            rand = secrets.randbits(_RANDOM_BITS - 1)
        _last_ms, _last_random = ms, rand
    value = (ms << _RANDOM_BITS) | rand
    return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(125, -1, -5))
