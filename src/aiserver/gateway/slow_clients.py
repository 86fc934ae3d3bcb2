"""Slow and stalled HTTP clients: a deadline for a request's head, and for reading its body.

aiohttp waits for a request's head (request line and headers) without a deadline: a
connection that sends half a header holds its socket for good. :class:`HeadDeadlineSite` is
a ``TCPSite`` whose connections are closed when their first request's head has not arrived
within ``head_timeout_s``; after a response, aiohttp's keep-alive timeout (set to the same
value by the gateway) closes a connection whose next head does not come.

Bodies are read by the handlers (:mod:`aiserver.gateway.uploads`); :func:`body_read` bounds
each read by the idle timeout and the request's total deadline, and ends the request with 408.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp import web

from aiserver.gateway.errors import GatewayError

__all__ = ["BodyDeadline", "HeadDeadlineSite", "request_timeout"]

_T = TypeVar("_T")


def request_timeout(reason: str, message: str) -> GatewayError:
    # The rest of the body is not worth waiting for: the connection is closed after this.
    return GatewayError(408, reason, message, headers={"Connection": "close"})


class BodyDeadline:
    """Reads of one request body: each within ``idle_s`` (0: no limit), all by ``total_s``
    after this object was made (0: no limit)."""

    def __init__(self, idle_s: float, total_s: float) -> None:
        self.idle_s = idle_s
        self.total_s = total_s
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._deadline = loop.time() + total_s if total_s > 0 else None

    async def read(self, awaitable: Awaitable[_T]) -> _T:
        wait = self.idle_s if self.idle_s > 0 else None
        if self._deadline is not None:
            left = max(0.0, self._deadline - self._loop.time())
            wait = left if wait is None else min(wait, left)
        try:
            async with asyncio.timeout(wait):
                return await awaitable
        except TimeoutError:
            if self._deadline is not None and self._loop.time() >= self._deadline:
                raise request_timeout(
                    "UPLOAD_TOO_SLOW", f"the request body did not arrive within {self.total_s:g} s"
                ) from None
            raise request_timeout(
                "UPLOAD_STALLED", f"the request body sent nothing for {self.idle_s:g} s"
            ) from None


class HeadDeadlineSite(web.TCPSite):
    """A TCP site closing connections whose first request head is late (see the module)."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, head_timeout_s: float):
        super().__init__(runner, host, port)
        self._head_timeout_s = head_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        timeout = self._head_timeout_s

        def connection() -> Any:
            handler = server()
            if timeout > 0:
                loop.call_later(timeout, _close_if_headless, handler)
            return handler

        self._server = await loop.create_server(connection, self._host, self._port)
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def _close_if_headless(handler: Any) -> None:
    # ``_request_count`` counts the heads aiohttp's parser has completed on this connection.
    if getattr(handler, "_request_count", 1) == 0 and handler.transport is not None:
        handler.force_close()
