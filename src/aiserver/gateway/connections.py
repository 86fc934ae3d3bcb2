"""HTTP connections as the gateway serves them: deadlines for slow and stalled clients, and
requests aiohttp's parser refuses answered in the JSON error shape.

aiohttp waits for a request's head (request line and headers) without a deadline: a
connection that sends half a header holds its socket for good. :class:`GatewaySite` is a
``TCPSite`` whose connections are closed when their first request's head has not arrived
within ``head_timeout_s``; after a response, aiohttp's keep-alive timeout (set to the same
value by the gateway) closes a connection whose next head does not come.

A request the parser cannot read (a bad request line or header, bytes past a short
``Content-Length`` that do not form a request) never reaches the application: aiohttp answers
it with a plain-text page quoting the bytes. The site's connections answer it with
``{"responseStatus": {"errorCode": "MALFORMED_REQUEST", ...}}`` instead, quoting nothing.

Bodies are read by the handlers (:mod:`aiserver.gateway.uploads`); :func:`body_read` bounds
each read by the idle timeout and the request's total deadline, and ends the request with 408.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from aiohttp import StreamReader, web
from aiohttp.web_protocol import RequestHandler

from aiserver.gateway.errors import GatewayError

__all__ = ["BodyDeadline", "GatewaySite", "request_timeout"]

_T = TypeVar("_T")


def request_timeout(reason: str, message: str) -> GatewayError:
    # The rest of the body is not worth waiting for: the connection is closed after this.
    return GatewayError(408, reason, message, headers={"Connection": "close"})


class BodyDeadline:
    """Reads of one request body: each within ``idle_s`` (0: no limit), all by ``total_s``
    after this object was made (0: no limit). ``body``: the request's payload; once it has
    arrived whole, a read cannot wait for the client and is made without a timer (a form
    of a few kB, the common upload, arrives with its head: a timeout per read was about 4%
    of the separate gateway's CPU per job)."""

    def __init__(self, idle_s: float, total_s: float, body: StreamReader | None = None) -> None:
        self.idle_s = idle_s
        self.total_s = total_s
        self._body = body
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._deadline = loop.time() + total_s if total_s > 0 else None

    async def read(self, awaitable: Awaitable[_T]) -> _T:
        if self._body is not None and self._body.is_eof():
            return await awaitable
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


class _JsonErrors(RequestHandler):
    """aiohttp's connection handler, answering parser errors in the JSON error shape."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own: logs (as a warning, through the gateway's filter) and refuses to answer
        # a request whose response has started; its plain-text page is replaced.
        super().handle_error(request, status, exc, message)
        if status >= 500:
            code, text = "INTERNAL", "internal error; see the gateway log"
        else:
            code = "MALFORMED_REQUEST"
            text = f"malformed request ({type(exc).__name__ if exc else 'unreadable'})"
        body = {"responseStatus": {"errorCode": code, "message": text, "errors": []}}
        response = web.Response(
            status=status, text=json.dumps(body), content_type="application/json"
        )
        response.force_close()
        return response


class GatewaySite(web.TCPSite):
    """A TCP site whose connections have a head deadline and answer parser errors in JSON
    (see the module)."""

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
            # What ``server()`` makes, with JSON parser errors (the server keeps the handler
            # options it was made with in ``_kwargs``).
            handler = _JsonErrors(server, loop=loop, **server._kwargs)
            if timeout > 0:
                loop.call_later(timeout, _close_if_headless, handler)
            return handler

        self._server = await loop.create_server(
            connection,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def _close_if_headless(handler: Any) -> None:
    # ``_request_count`` counts the heads aiohttp's parser has completed on this connection.
    if getattr(handler, "_request_count", 1) == 0 and handler.transport is not None:
        handler.force_close()
