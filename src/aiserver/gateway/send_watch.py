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

__all__ = ["SendWatch", "slow_reader_middleware"]

logger = logging.getLogger(__name__)


class SendWatch:
    """Drops a request's connection when its client has taken nothing for ``idle_s`` while
    bytes of the answer wait for it. A timer every quarter of ``idle_s``, not one per write.
    Bytes handed over are the writer's ``output_size`` (head, chunk framing and compression
    included: what the transport got); taken = handed over - still in the transport."""

    __slots__ = (
        "_fd",
        "_handle",
        "_idle_s",
        "_path",
        "_since",
        "_taken",
        "_transport",
        "_writer",
        "fired",
    )

    def __init__(
        self, transport: asyncio.Transport, writer: AbstractStreamWriter, idle_s: float, path: str
    ) -> None:
        loop = asyncio.get_running_loop()
        self._path = path
        self._transport = transport
        self._writer = writer
        self._idle_s = idle_s
        sock = transport.get_extra_info("socket")
        tcp = sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)
        self._fd: int = sock.fileno() if tcp else -1
        # The transport may still hold the end of the previous answer on this connection.
        self._taken = writer.output_size - self._waiting()
        self._since = loop.time()  # when the client last took something
        self.fired = False
        self._handle = loop.call_later(idle_s / 4, self._check)

    @classmethod
    def start(cls, request: web.BaseRequest, idle_s: float) -> SendWatch | None:
        transport = request.transport
        if idle_s <= 0 or not isinstance(transport, asyncio.Transport):
            return None
        return cls(transport, request.writer, idle_s, request.path)

    def _waiting(self) -> int:
        """Bytes handed over that the client has not acknowledged: the transport's buffer and
        the kernel's send queue."""
        waiting = self._transport.get_write_buffer_size()
        if self._fd >= 0:
            with contextlib.suppress(OSError):  # (closed meanwhile: the transport's alone)
                queued = fcntl.ioctl(self._fd, termios.TIOCOUTQ, b"\0\0\0\0")
                waiting += struct.unpack("i", queued)[0]
        return waiting

    def _check(self) -> None:
        transport = self._transport
        if transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        waiting = self._waiting()
        taken = self._writer.output_size - waiting
        if taken != self._taken or not waiting:  # progress, or nothing to take
            self._taken, self._since = taken, loop.time()
        elif loop.time() - self._since >= self._idle_s:
            self.fired = True
            logger.info("closed an answer its client stopped reading: %s", self._path)
            # close() would wait for the client to read what is queued. The lost connection
            # cancels the handler (``handler_cancellation``), wherever it waits.
            transport.abort()
            return
        self._handle = loop.call_later(self._idle_s / 4, self._check)

    def stop(self) -> None:
        self._handle.cancel()


def slow_reader_middleware(idle_s: float) -> Middleware:
    """The outermost middleware: every answer, streamed or whole, under one ``SendWatch``
    (but a redirect raised as an exception, which aiohttp writes itself: a few bytes)."""

    @web.middleware
    async def close_slow_readers(request: web.Request, handler: Handler) -> web.StreamResponse:
        watch = SendWatch.start(request, idle_s)
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
            watch.stop()

    return close_slow_readers
