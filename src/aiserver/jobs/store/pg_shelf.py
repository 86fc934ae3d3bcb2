"""Connections kept out of asyncpg's pool between statements (the job store, the artifact index).

asyncpg's ``Pool.fetch`` acquires a connection and releases it around every statement: the
release runs in a task of its own (``asyncio.shield``) under a timeout, and re-arms an
inactivity timer that the next acquire cancels. On this machine that is ~50 µs of a
coordinator's CPU per statement, about as much as the statement's own round trip
(bench/README.md, "pgfeed"). A :class:`ConnectionShelf` takes connections from the pool once
and lends them out itself, a list's pop and append per statement; a connection whose statement
or transaction raised (an error, a timeout, a cancel) goes back to the pool, which resets it or
closes it, as before.

What changes against the pool alone: a connection on the shelf is in use as the pool sees it,
so every statement and transaction of the owner must go through the shelf (an idle connection
on the shelf is then always the first one lent); the pool's idle timeout no longer closes
connections (an owner keeps up to its pool size open, as the README counts them); a
connection goes back to the pool after ``RECYCLE_AFTER`` statements, as the pool's own
``max_queries`` would have closed it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import asyncpg

__all__ = ["RECYCLE_AFTER", "ConnectionShelf"]

_Lent = tuple[Any, int]
"""A connection taken from the pool and the statements it served since."""

RECYCLE_AFTER = 50_000
"""Statements a connection serves from the shelf before it goes back to the pool (asyncpg's
``max_queries`` default: the pool then closes it and opens a new one when needed)."""


class ConnectionShelf:
    """Lends ``pool``'s connections one statement (or one transaction) at a time."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._idle: list[_Lent] = []
        self._out = 0  # connections taken from the pool (lent or idle here)
        self._waiters: collections.deque[asyncio.Future[_Lent | None]] = collections.deque()
        self._closed = False

    async def _take(self) -> _Lent:
        while True:
            while self._idle:
                lent = self._idle.pop()
                if _usable(lent[0]):
                    return lent
                await self._release(lent[0])  # lost meanwhile: the pool reopens it
            if self._out < self.pool.get_max_size():
                self._out += 1
                try:
                    return await self.pool.acquire(), 0
                except BaseException:
                    self._out -= 1
                    self._wake()
                    raise
            # Every connection is out: the next one given back comes here (``None``: one
            # went back to the pool, so try the pool again).
            waiter: asyncio.Future[_Lent | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                got = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    handed = waiter.result()  # handed over, but this caller is gone
                    if handed is None:
                        self._wake()
                    else:
                        self._give(handed)
                raise
            if got is not None:
                return got

    def _give(self, lent: _Lent) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(lent)
                return
        self._idle.append(lent)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _release(self, conn: Any) -> None:
        """``conn`` back to the pool, which resets it (or closes it when broken)."""
        self._out -= 1
        try:
            await self.pool.release(conn)
        finally:
            self._wake()

    async def _back(self, conn: Any, uses: int) -> None:
        """Lend ``conn`` again, unless it is worn out, in a transaction or closing."""
        if uses >= RECYCLE_AFTER or self._closed or not _usable(conn) or conn.is_in_transaction():
            await self._release(conn)
        else:
            self._give((conn, uses))

    async def fetch(
        self, sql: str, *args: Any, timeout_s: float | None = None
    ) -> list[asyncpg.Record]:
        conn, uses = await self._take()
        try:
            found: list[asyncpg.Record] = await conn.fetch(sql, *args, timeout=timeout_s)
        except BaseException:
            await self._release(conn)  # reset (or closed) by the pool
            raise
        await self._back(conn, uses + 1)
        return found

    async def fetchrow(
        self, sql: str, *args: Any, timeout_s: float | None = None
    ) -> asyncpg.Record | None:
        conn, uses = await self._take()
        try:
            found: asyncpg.Record | None = await conn.fetchrow(sql, *args, timeout=timeout_s)
        except BaseException:
            await self._release(conn)
            raise
        await self._back(conn, uses + 1)
        return found

    async def fetchval(self, sql: str, *args: Any, timeout_s: float | None = None) -> Any:
        conn, uses = await self._take()
        try:
            found = await conn.fetchval(sql, *args, timeout=timeout_s)
        except BaseException:
            await self._release(conn)
            raise
        await self._back(conn, uses + 1)
        return found

    async def execute(self, sql: str, *args: Any, timeout_s: float | None = None) -> str:
        conn, uses = await self._take()
        try:
            status: str = await conn.execute(sql, *args, timeout=timeout_s)
        except BaseException:
            await self._release(conn)
            raise
        await self._back(conn, uses + 1)
        return status

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        """A connection for several statements (a transaction); shelved again afterwards
        only if the block raised nothing and left no transaction open."""
        conn, uses = await self._take()
        try:
            yield conn
        except BaseException:
            await self._release(conn)
            raise
        await self._back(conn, uses + 1)

    async def close(self) -> None:
        """Every shelved connection back to the pool, then the pool closed (it waits for
        the connections still lent)."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            await self._release(conn)
        while self._waiters:
            self._wake()  # each tries the pool, which is closing: it raises
        await self.pool.close()

    def terminate(self) -> None:
        self._closed = True
        self._idle.clear()
        self.pool.terminate()


def _usable(conn: Any) -> bool:
    """Whether ``conn`` (a pool's proxy) still has its connection: when a connection closes
    (the server went away), the pool takes it back at once and detaches the proxy."""
    return conn._con is not None and not conn.is_closed()
