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
on the shelf is then always the first one lent); a connection goes back to the pool after
``RECYCLE_AFTER`` statements, as the pool's own ``max_queries`` would have closed it, and
after the pool's ``max_inactive_connection_lifetime`` unused on the shelf (one timer per
shelf): the pool then closes it after that long again unless it is needed (so an idle
connection closes after 1 to 2 lifetimes, 5 to 10 minutes by default).

Callers that find every connection out queue, first come first served: a connection given
back goes to the first of them (checked again: it may have died meanwhile), and so does the
right to open one when a connection went back to the pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Conn = PoolConnectionProxy[asyncpg.Record]

__all__ = ["CLOSE_TIMEOUT_S", "RECYCLE_AFTER", "ConnectionShelf"]

_T = TypeVar("_T")

_Lent = tuple["Conn", int, float]
"""A connection taken from the pool, the statements it served since, when it was last given
back (``time.monotonic()``)."""

RECYCLE_AFTER = 50_000
"""Statements a connection serves from the shelf before it goes back to the pool (asyncpg's
``max_queries`` default: the pool then closes it and opens a new one when needed)."""

CLOSE_TIMEOUT_S = 10.0
"""How long :meth:`ConnectionShelf.close` waits for connections still lent (their statements
are bounded by the owner's ``command_timeout``) before the pool is terminated."""

_DEFAULT_IDLE_S = 300.0
"""asyncpg's ``max_inactive_connection_lifetime`` default."""


class ConnectionShelf:
    """Lends ``pool``'s connections one statement (or one transaction) at a time."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self._idle: list[_Lent] = []  # the last given back at the end
        self._out = 0  # connections taken from the pool (lent or idle here), or being taken
        # Callers queued for a connection (every one pending: a cancelled one leaves). Each
        # gets a connection, or ``None``: a slot counted in ``_out``, to take from the pool.
        self._waiters: collections.deque[asyncio.Future[_Lent | None]] = collections.deque()
        self._closed = False
        # asyncpg keeps it private; 0 means never, as for the pool.
        self._idle_s = float(
            getattr(pool, "_max_inactive_connection_lifetime", _DEFAULT_IDLE_S) or 0.0
        )
        self._sweep: asyncio.TimerHandle | None = None
        self._sweeping: set[asyncio.Task[None]] = set()

    async def _take(self) -> _Lent:
        while True:
            while self._idle and not self._closed:
                lent = self._idle.pop()
                if _usable(lent[0]):
                    return lent
                await self._release(lent[0])  # lost meanwhile: the pool reopens it
            if self._closed or (self._out < self.pool.get_max_size() and not self._waiters):
                self._out += 1
                return await self._open()
            # Every connection is out: wait in line for one given back.
            waiter: asyncio.Future[_Lent | None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                got = await waiter
            except BaseException:
                if not waiter.done() or waiter.cancelled():
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                else:  # handed over, but this caller is gone: to the next one
                    handed = waiter.result()
                    if handed is None:
                        self._out -= 1
                        self._wake()
                    else:
                        await self._back(handed[0], handed[1])
                raise
            if got is None:  # a slot: one went back to the pool
                return await self._open()
            if _usable(got[0]):
                return got
            # Died between the hand-over and now: the pool reopens it, this caller keeps
            # its turn (the slot) rather than queueing again.
            return await self._open(instead_of=got[0])

    async def _open(self, instead_of: Conn | None = None) -> _Lent:
        """A connection from the pool, for a slot this caller holds in ``_out`` (the dead
        ``instead_of`` given back first)."""
        try:
            if instead_of is not None:
                with contextlib.suppress(Exception):  # the pool closes what it cannot reset
                    await self.pool.release(instead_of)
            if self._closed:
                import asyncpg

                raise asyncpg.InterfaceError("pool is closing")
            return await self.pool.acquire(), 0, time.monotonic()
        except BaseException:
            self._out -= 1
            self._wake()
            raise

    def _give(self, lent: _Lent) -> None:
        """Only for a shelf not closed: :meth:`_back` releases them once it is."""
        waiter = self._next_waiter()
        if waiter is not None:
            waiter.set_result(lent)
            return
        self._idle.append(lent)
        if self._sweep is None and self._idle_s > 0:
            self._sweep = asyncio.get_running_loop().call_later(self._idle_s, self._swept)

    def _wake(self) -> None:
        """A freed slot to the first caller in line, if any."""
        if self._out < self.pool.get_max_size():
            waiter = self._next_waiter()
            if waiter is not None:
                self._out += 1
                waiter.set_result(None)

    def _next_waiter(self) -> asyncio.Future[_Lent | None] | None:
        """The first caller in line (one cancelled but not yet run is still listed)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                return waiter
        return None

    async def _release(self, conn: Conn) -> None:
        """``conn`` back to the pool, which resets it (or closes it when broken)."""
        try:
            await self.pool.release(conn)
        finally:
            self._out -= 1
            self._wake()

    async def _back(self, conn: Conn, uses: int) -> None:
        """Lend ``conn`` again, unless it is worn out, in a transaction or closing."""
        if uses >= RECYCLE_AFTER or self._closed or not _usable(conn) or conn.is_in_transaction():
            await self._release(conn)
        else:
            self._give((conn, uses, time.monotonic()))

    def _swept(self) -> None:
        """Connections unused for the pool's idle lifetime back to the pool (it closes them
        after that long again unless needed); the oldest are first on the list."""
        self._sweep = None
        stale_before = time.monotonic() - self._idle_s
        stale = 0
        while stale < len(self._idle) and self._idle[stale][2] <= stale_before:
            stale += 1
        old, self._idle = self._idle[:stale], self._idle[stale:]
        for conn, _, _ in old:
            task = asyncio.get_running_loop().create_task(self._release(conn))
            self._sweeping.add(task)
            task.add_done_callback(self._sweeping.discard)
        if self._idle and not self._closed:
            due = self._idle[0][2] + self._idle_s - time.monotonic()
            self._sweep = asyncio.get_running_loop().call_later(max(due, 0.0), self._swept)

    async def _run(self, statement: Callable[[Conn], Awaitable[_T]]) -> _T:
        conn, uses, _ = await self._take()
        try:
            found = await statement(conn)
        except BaseException:
            await self._release(conn)  # reset (or closed) by the pool
            raise
        await self._back(conn, uses + 1)
        return found

    async def fetch(
        self, sql: str, *args: Any, timeout_s: float | None = None
    ) -> list[asyncpg.Record]:
        return await self._run(lambda conn: conn.fetch(sql, *args, timeout=timeout_s))

    async def fetchrow(
        self, sql: str, *args: Any, timeout_s: float | None = None
    ) -> asyncpg.Record | None:
        return await self._run(lambda conn: conn.fetchrow(sql, *args, timeout=timeout_s))

    async def fetchval(self, sql: str, *args: Any, timeout_s: float | None = None) -> Any:
        return await self._run(lambda conn: conn.fetchval(sql, *args, timeout=timeout_s))

    async def execute(self, sql: str, *args: Any, timeout_s: float | None = None) -> str:
        return await self._run(lambda conn: conn.execute(sql, *args, timeout=timeout_s))

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Conn]:
        """A connection for several statements (a transaction); shelved again afterwards
        only if the block raised nothing and left no transaction open."""
        conn, uses, _ = await self._take()
        try:
            yield conn
        except BaseException:
            await self._release(conn)
            raise
        await self._back(conn, uses + 1)

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Every shelved connection back to the pool, the callers in line turned away, then
        the pool closed: it waits for the connections still lent, up to ``timeout_s``, then
        terminates them (a shutdown never hangs on a connection)."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, []
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)  # each sees the shelf closed: "pool is closing"
                self._out += 1
        for conn, _, _ in idle:
            await self._release(conn)
        try:
            # A cancel (the bound) makes asyncpg terminate the pool.
            await asyncio.wait_for(self.pool.close(), timeout_s)
        except TimeoutError:
            self.pool.terminate()


def _usable(conn: Conn) -> bool:
    """Whether ``conn`` (a pool's proxy) still has its connection: when a connection closes
    (the server went away), the pool takes it back at once and detaches the proxy. The proxy's
    ``_con`` is asyncpg's private attribute: without it (another asyncpg), ``is_closed()``
    alone decides, and a detached proxy then raises "released back to the pool" on use, an
    outage for :mod:`aiserver.outage`."""
    if getattr(conn, "_con", True) is None:
        return False
    try:
        return not conn.is_closed()
    except Exception:  # a detached proxy raises instead
        return False
