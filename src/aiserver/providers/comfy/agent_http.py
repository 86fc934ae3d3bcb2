"""HTTP/1.1 to one agent over kept-alive connections: what the ComfyUI client asks of HTTP.

Every job makes two requests (upload, prompt), and the client library's own work per request
was most of what the provider spent per job: measured on this machine (2,000 sequential
``POST /prompt`` to an aiohttp server), aiohttp's client took 130-141 µs of CPU per request,
this exchange 42-44 µs.

The answers are parsed by llhttp (``httptools``, the parser under uvicorn): it refuses what a
short hand parser let through (a chunk longer than its size said, ``Content-Length`` together
with chunked, two lengths) at no more CPU. Measured (2,000 sequential ``POST /prompt`` and
``/upload/image`` to an aiohttp server, process CPU, 12 interleaved rounds): the hand parser
46.7 µs per request (42.7..58.7), llhttp 43.9 (40.7..57.5), ratio 0.94 (0.83..1.05); ``h11``
(pure Python) 119 (113..129), ratio 2.5. The parsing alone is 2.6 µs per answer (by hand 3.5).

What it does: ``GET`` and ``POST`` with a bytes body, over ``http`` or ``https`` (the system's
certificate store, as aiohttp), answers read whole (``Content-Length``, chunked, or up to the
close). Connections are kept alive and reused while idle for less than
:data:`IDLE_REUSE_S`. What it leaves out, as the agent's routes need none of it: redirects
(a 3xx is an answer like any other), cookies, compression (none is asked for), proxies.

Failures: :class:`ConnectFailed` (no connection), :class:`ExchangeFailed` (the connection
broke, or the answer was not HTTP), ``TimeoutError`` (the caller's bound). A ``GET`` on a
reused connection that the agent had closed meanwhile is sent once more on a new one; a
``POST`` never is (it may have been taken).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlencode, urlsplit

import httptools

__all__ = ["IDLE_REUSE_S", "AgentHttp", "Answer", "ConnectFailed", "ExchangeFailed", "HttpError"]

IDLE_REUSE_S = 15.0
"""An idle connection older than this is closed, not reused: servers and proxies close idle
connections after a while (aiohttp's server after 75 s), and a request sent on one that is
being closed fails."""
_MAX_IDLE = 8
"""Idle connections kept per agent (more are closed): the peak of requests in flight."""
_MAX_HEAD = 64 * 1024
_WRITE_CHUNK = 256 * 1024
"""Bodies above this are written in pieces, each once the socket took the last."""


class HttpError(Exception):
    """The exchange with the agent failed."""


class ConnectFailed(HttpError):
    """No connection could be made."""


class ExchangeFailed(HttpError):
    """The connection broke during the exchange, or the answer was not HTTP."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str] = field(repr=False)
    """Lower-case names; a repeated header keeps its last value."""
    body: bytes = field(repr=False)


class _Connection(asyncio.Protocol):
    """One connection: one exchange at a time, the answer parsed as its bytes arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._answer: asyncio.Future[Answer] | None = None
        self._received = False  # bytes of the current answer came
        self._writable: asyncio.Future[None] | None = None
        self._paused = False
        # The answer being read.
        self._status = 0  # 0: its head has not ended yet
        self._head_size = 0
        self._headers: dict[str, str] = {}
        self._to_close = False  # no length: the body ends with the connection
        self._body = bytearray()
        self.keep_alive = True

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._answer is None or self._answer.done():
            self.keep_alive = False  # nothing asked: a stray byte makes the connection unusable
            return
        self._received = True
        if self._status == 0:
            self._head_size += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            what = "not an HTTP answer" if self._status == 0 else "a malformed answer"
            self._fail(ExchangeFailed(f"{what}: {exc}"))
            return
        if self._status == 0 and self._head_size > _MAX_HEAD and not self._answer.done():
            # A head that does not end (llhttp sets no bound of its own; a whole head in one
            # read is bounded by the read).
            self._fail(ExchangeFailed("the answer's head is too long"))

    def eof_received(self) -> bool | None:
        self._end_of_stream(clean=True)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_of_stream(clean=exc is None)
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ExchangeFailed("the agent closed the connection"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- one exchange --

    @property
    def answered(self) -> bool:
        """Bytes of the answer to the current request came (it was taken)."""
        return self._received

    async def exchange(self, head: bytes, body: bytes, deadline: float) -> Answer:
        """Send a request, read its answer; ``TimeoutError`` at ``deadline`` (loop time).

        The deadline is one timer failing the exchange's futures, not ``asyncio.timeout``:
        that one cancels and uncancels the task, and cost more than the parsing here.
        """
        transport = self.transport
        assert transport is not None and self._answer is None
        if self.lost:
            raise ExchangeFailed("the agent closed the connection")
        loop = asyncio.get_running_loop()
        self._answer = loop.create_future()
        self._received = False
        timer = loop.call_at(deadline, self._time_out)
        try:
            if len(body) <= _WRITE_CHUNK:
                transport.write(head + body)
            else:
                transport.write(head)
                view = memoryview(body)
                for start in range(0, len(view), _WRITE_CHUNK):
                    await self._drain()
                    transport.write(view[start : start + _WRITE_CHUNK])
            return await self._answer
        finally:
            timer.cancel()
            answer, self._answer = self._answer, None
            if answer.done() and not answer.cancelled():
                answer.exception()  # failed while the body was written: already raised

    def _time_out(self) -> None:
        for waiter in (self._answer, self._writable):
            if waiter is not None and not waiter.done():
                waiter.set_exception(TimeoutError())
        self.close()  # half an exchange: the stream is out of step

    async def _drain(self) -> None:
        if self.lost:
            raise ExchangeFailed("the agent closed the connection")
        if self._paused:
            self._writable = asyncio.get_running_loop().create_future()
            await self._writable

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()

    # -- parsing: llhttp's callbacks, called from feed_data --

    def on_message_begin(self) -> None:
        if self._answer is None or self._answer.done():
            self.keep_alive = False  # bytes beyond the answer: the stream is out of step

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._status == 0:  # not the trailers of a chunked body
            # llhttp drops the whitespace before a value, not the one after it.
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1").rstrip()

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:  # an interim answer (100 Continue): the real one follows
            self._headers = {}
            return
        self._status = status
        self.keep_alive = self._parser.should_keep_alive()
        headers = self._headers
        # llhttp reads such a body up to the close but cannot be told of it (httptools has no
        # llhttp_finish): the end of stream completes it here.
        self._to_close = (
            status not in (204, 304)
            and "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        )

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        if self._status != 0:
            self._done()

    def _done(self) -> None:
        answer = Answer(self._status, self._headers, bytes(self._body))
        self._status, self._head_size, self._headers = 0, 0, {}
        self._to_close = False
        self._body = bytearray()
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(answer)

    def _end_of_stream(self, *, clean: bool) -> None:
        self.lost = True
        self.keep_alive = False
        if self._answer is None or self._answer.done():
            return
        if self._to_close and clean:  # a reset cuts a close-delimited body short
            self._done()
        else:
            self._fail(ExchangeFailed("the agent closed the connection before answering"))

    def _fail(self, exc: ExchangeFailed) -> None:
        self.keep_alive = False
        if self._answer is not None and not self._answer.done():
            self._answer.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


class AgentHttp:
    """Requests to one agent's base URL, over a small set of kept-alive connections."""

    def __init__(
        self, url: str, *, headers: dict[str, str], connect_s: float, request_s: float
    ) -> None:
        parts = urlsplit(url)
        self._invalid = ""  # why no request can be made (told at each, as a failed connect)
        try:
            port = parts.port
        except ValueError as exc:
            port, self._invalid = None, f"the agent's URL {url!r}: {exc}"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            self._invalid = f"the agent's URL {url!r} is not http(s)://host[:port]"
        self._host = parts.hostname or ""
        self._port = port or (443 if parts.scheme == "https" else 80)
        self._ssl: ssl.SSLContext | None = (
            ssl.create_default_context() if parts.scheme == "https" else None
        )
        self._base = parts.path.rstrip("/")
        host = f"[{self._host}]" if ":" in self._host else self._host
        default_port = port is None or port == (443 if self._ssl else 80)
        fixed = {"Host": host if default_port else f"{host}:{self._port}"}
        if parts.username is not None and not any(k.lower() == "authorization" for k in headers):
            user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            fixed["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
        fixed.update(headers)
        self._fixed = "".join(f"{k}: {v}\r\n" for k, v in fixed.items())
        self._connect_s = connect_s
        self._request_s = request_s
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        content_type: str = "",
        query: Mapping[str, str | int] | None = None,
        timeout_s: float | None = None,
    ) -> Answer:
        """One exchange, connecting included, bounded by ``timeout_s`` or else the request
        timeout (``TimeoutError``)."""
        target = quote(self._base + path, safe="/:@!$&'()*+,;=%~")
        if query:
            target += "?" + urlencode(query, quote_via=quote)
        head = f"{method} {target} HTTP/1.1\r\n{self._fixed}"
        if body or method == "POST":
            head += f"Content-Length: {len(body)}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        data = (head + "\r\n").encode("latin-1")
        bound = self._request_s if timeout_s is None else timeout_s
        deadline = asyncio.get_running_loop().time() + bound
        conn, reused = await self._connection(deadline)
        try:
            answer = await conn.exchange(data, body, deadline)
        except ExchangeFailed:
            self._drop(conn)
            if not (reused and method == "GET" and not conn.answered):
                raise
            # No byte of an answer came on a reused connection: most likely the agent had
            # closed it while idle. A GET may be sent again (if it did arrive, it is read-only).
            conn, _ = await self._connection(deadline, fresh=True)
            try:
                answer = await conn.exchange(data, body, deadline)
            except BaseException:
                self._drop(conn)
                raise
        except BaseException:  # cancelled or timed out mid-exchange: the stream is unusable
            self._drop(conn)
            raise
        self._release(conn)
        return answer

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()

    async def _connection(
        self, deadline: float, *, fresh: bool = False
    ) -> tuple[_Connection, bool]:
        if self._closed:
            raise ConnectFailed("the client is closed")
        if self._invalid:
            raise ConnectFailed(self._invalid)
        now = time.monotonic()
        # The oldest idle connections sit at the bottom of the stack: past IDLE_REUSE_S they
        # go, even while the newest keep being reused.
        while self._idle and now - self._idle[0].idle_since >= IDLE_REUSE_S:
            self._drop(self._idle.pop(0))
        while self._idle and not fresh:
            conn = self._idle.pop()
            if conn.keep_alive and not conn.lost:
                return conn, True
            self._drop(conn)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(min(self._connect_s, deadline - loop.time())):
                _, conn = await loop.create_connection(
                    _Connection,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except (OSError, ValueError) as exc:  # ssl.SSLError; a host IDNA cannot encode
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        if self._closed:
            conn.close()
            raise ConnectFailed("the client is closed")
        self._open.add(conn)
        return conn, False

    def _release(self, conn: _Connection) -> None:
        if conn.keep_alive and not conn.lost and not self._closed and len(self._idle) < _MAX_IDLE:
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            self._drop(conn)

    def _drop(self, conn: _Connection) -> None:
        conn.close()
        self._open.discard(conn)
