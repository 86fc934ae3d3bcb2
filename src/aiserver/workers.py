"""A bounded thread pool for CPU-heavy work (Pillow releases the GIL while it codes images)."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["BlockingPool"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


class BlockingPool:
    """Runs blocking calls off the event loop; at most ``threads`` at a time, the rest wait."""

    def __init__(self, threads: int, name: str = "image") -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)

    async def run(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
