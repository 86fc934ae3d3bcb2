"""Request rate per caller: one token bucket per key id (per peer address in open mode)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from aiserver.errors import ErrorKind, ServiceError

__all__ = ["RateLimiter", "rate_limited"]

MAX_TRACKED = 10_000
"""Buckets kept at most; the least recently used go first (a forgotten bucket is full)."""


def rate_limited(retry_after_s: float, limit: float) -> ServiceError:
    return ServiceError(
        ErrorKind.RESOURCE_EXHAUSTED,
        "RATE_LIMITED",
        f"too many requests: at most {limit:g} per second for this caller",
        metadata={"limit_per_s": f"{limit:g}"},
        retry_after_s=retry_after_s,
    )


class RateLimiter:
    """``rate_per_s`` requests per second per key, in bursts of up to ``burst``."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int = 0,
        *,
        max_tracked: int = MAX_TRACKED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        self.rate = rate_per_s
        self.burst = float(burst if burst > 0 else max(1, round(2 * rate_per_s)))
        self._max = max_tracked
        self._clock = clock
        self._buckets: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def take(self, key: str) -> float | None:
        """Spend one token of ``key``: None if there was one, else the seconds until there is."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [self.burst, now]
            if len(self._buckets) > self._max:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return None
        return (1.0 - bucket[0]) / self.rate

    def check(self, key: str) -> None:
        """RESOURCE_EXHAUSTED ``RATE_LIMITED`` (with RetryInfo) when ``key`` is out of tokens."""
        wait = self.take(key)
        if wait is not None:
            raise rate_limited(wait, self.rate)

    def __len__(self) -> int:
        return len(self._buckets)
