"""Answers a client has stopped reading: their connection is dropped after an idle bound.

aiohttp has no write timeout: a response write waits (``drain``) for as long as the client
keeps its socket open without reading. Every answer is watched the same way - streamed bytes
(artifacts, variants, transformed images), NDJSON/SSE streams (job events) and whole JSON
bodies (a listing), which aiohttp would write after the handler returned, unwatched - so a
client that stops reading cannot hold the answer's gRPC call (a streaming slot, a job watch,
an open blob) and its buffers forever. A slow client that keeps taking bytes is left alone.

"Taken" means acknowledged by the client's TCP stack: the kernel's send queue (unsent and
unacknowledged bytes, ``TIOCOUTQ``) counts as still waiting, like the transport's buffer.
Counted at the transport alone, a client reading slowly but steadily looked stalled for as
long as the kernel's buffers (several MB, auto-sized) absorbed what it had not read yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import socket
import struct
import termios

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.typedefs import Handler, Middleware

__all__ = ["SendWatch", "SendWatches", "slow_reader_middleware"]

logger = logging.getLogger(__name__)


class SendWatch:
    """One answer being written: dropped when its client has taken nothing for ``idle_s``
    while bytes of it wait. Bytes handed over are the writer's ``output_size`` (head, chunk
    framing and compression included: what the transport got); taken = handed over - still
    in the transport or the kernel's send queue. Looked at by :class:`SendWatches`' sweep."""

    __slots__ = ("_path", "_since", "_taken", "_transport", "_writer", "fired")

    def __init__(self, transport: asyncio.Transport, writer: AbstractStreamWriter, path: str):
        self._path = path
        self._transport = transport
        self._writer = writer
        self._taken = -1  # (the first sweep takes the baseline: nothing to do per request)
        self._since = 0.0  # when the client last took something
        self.fired = False

    def _waiting(self) -> int:
        """Bytes handed over that the client has not acknowledged: the transport's buffer and
        the kernel's send queue."""
        waiting = self._transport.get_write_buffer_size()
        sock = self._transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # (closed meanwhile: the transport's alone)
                queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
                waiting += struct.unpack("i", queued)[0]
        return waiting

    def check(self, now: float, idle_s: float) -> bool:
        """Whether to keep watching (False once the connection is closing or dropped)."""
        transport = self._transport
        if transport.is_closing():
            return False
        waiting = self._waiting()
        taken = self._writer.output_size - waiting
        if taken != self._taken or not waiting:  # progress, or nothing to take
            self._taken, self._since = taken, now
        elif now - self._since >= idle_s:
            self.fired = True
            logger.info("closed an answer its client stopped reading: %s", self._path)
            # close() would wait for the client to read what is queued. The lost connection
            # cancels the handler (``handler_cancellation``), wherever it waits.
            transport.abort()
            return False
        return True


class SendWatches:
    """The answers in progress, swept every quarter of ``idle_s`` by one timer (running
    while any is in progress): a request costs a set's add and discard, no timer and no
    system call of its own; a client is dropped between ``idle_s`` and 1.5 x ``idle_s``
    after it stopped taking bytes."""

    def __init__(self, idle_s: float) -> None:
        self._idle_s = idle_s
        self._watched: set[SendWatch] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self, request: web.BaseRequest) -> SendWatch | None:
        transport = request.transport
        if self._idle_s <= 0 or not isinstance(transport, asyncio.Transport):
            return None
        watch = SendWatch(transport, request.writer, request.path)
        self._watched.add(watch)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._idle_s / 4, self._sweep)
        return watch

    def stop(self, watch: SendWatch) -> None:
        self._watched.discard(watch)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for watch in list(self._watched):
            if not watch.check(now, self._idle_s):
                self._watched.discard(watch)
        self._timer = loop.call_later(self._idle_s / 4, self._sweep) if self._watched else None


def slow_reader_middleware(idle_s: float) -> Middleware:
    """The outermost middleware: every answer, streamed or whole, under one ``SendWatch``
    (but a redirect raised as an exception, which aiohttp writes itself: a few bytes)."""

    watches = SendWatches(idle_s)

    @web.middleware
    async def close_slow_readers(request: web.Request, handler: Handler) -> web.StreamResponse:
        watch = watches.start(request)
        if watch is None:
            return await handler(request)
        try:
            response = await handler(request)
            if not response.prepared:
                # A whole body (JSON, an error): written here, under the watch; aiohttp's own
                # prepare and write_eof after the handler are then no-ops.
                try:
                    await response.prepare(request)
                    await response.write_eof()
                except ConnectionError:  # the client left: aiohttp's own finish fails quietly
                    return response
            return response
        except ConnectionError:
            if not watch.fired:
                raise
            # Nothing more can be sent: aiohttp's write of this fails quietly (a lost client),
            # where an exception out of the handler would be logged as a 500.
            return web.Response(status=503)
        finally:
            watches.stop(watch)

    return close_slow_readers
