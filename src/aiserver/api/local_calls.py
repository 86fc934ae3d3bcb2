"""Streaming calls made by the in-process HTTP shim without the network.

Over loopback gRPC most of the cost of the shim's streams is the two HTTP/2 stacks: for a warm
variant or a SYNC ImageUpscale about as much CPU as the HTTP request itself, and an artifact's
bytes (ReadArtifact: up to the largest output, many MiB; one message per read, so a slow HTTP
client holds one chunk) would cross both. :class:`LocalCalls` runs the very same handler,
wrapped by the very same interceptor (API key, rate limit, stream count, upload caps and
timeouts, request id, metrics) as a network call, with requests and responses through the same
(de)serializers, and hands the shim an object that reads like a ``grpc.aio`` call: messages,
``grpc.aio.EOF``, and failures as :class:`grpc.aio.AioRpcError` with the rich status in its
trailing metadata. The access rules are therefore the service's own, not a second
implementation. Only the methods recorded with :meth:`LocalCalls.recorder` are served this way
(server-streaming ones, and client-and-server-streaming ones: the uploads); every other call
goes over the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Generator,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, NoReturn, cast

import grpc

__all__ = ["LocalCalls"]

_PEER = "ipv4:127.0.0.1:0"
"""The shim's calls come from loopback over the network too (same rate-limit bucket)."""


@dataclass(frozen=True, slots=True)
class _Details:
    method: str
    invocation_metadata: Sequence[tuple[str, str]]


class _Context:
    """The parts of ``grpc.aio.ServicerContext`` the guard and the servicers use."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = tuple(metadata)
        self.trailing: tuple[tuple[str, str | bytes], ...] = ()
        self.error: grpc.aio.AioRpcError | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return _PEER

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self.trailing = tuple(metadata)

    async def abort_with_status(self, status: Any) -> None:
        await self.abort(status.code, status.details, status.trailing_metadata)

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> None:
        trailing = grpc.aio.Metadata(*self.trailing, *trailing_metadata)
        self.error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details)
        raise grpc.aio.AbortError()  # what grpc raises: handlers let it through


class _InContext:
    """Awaits ``coro`` with each of its steps run in ``context``, in the awaiting task: what a
    task of its own would give for context variables (the handler's stay in ``context``),
    without a task and its two turns of the event loop per step. The futures ``coro`` waits
    for are the awaiting task's to wait for, and a cancellation of that task is thrown into
    ``coro``. The awaiting task is ``coro``'s ``asyncio.current_task()``: code in ``coro``
    that binds to it across a suspension (``asyncio.timeout`` spanning an ``await`` of the
    awaiting task, a saved task it cancels later) binds to the awaiting task.

    If the awaiting coroutine is closed while pending (a task destroyed), ``coro`` is
    cancelled there and then; if its cleanup has to wait, ``orphaned`` gets the rest of it,
    an awaitable that finishes it, to await elsewhere (closing ``coro`` instead would close
    only what it awaits, never the async generator that awaits in it)."""

    __slots__ = ("_context", "_coro", "_orphaned")

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        context: contextvars.Context,
        orphaned: Callable[[_Rest | None], None],
    ) -> None:
        self._coro = coro
        self._context = context
        self._orphaned = orphaned

    def _steps(
        self, step: Callable[[Any], Any] | None = None, value: Any = None
    ) -> Generator[Any, None, Any]:
        run, coro = self._context.run, self._coro
        if step is None:
            step = coro.send
        while True:
            try:
                waiting = run(step, value)
            except StopIteration as stop:
                return stop.value
            try:
                yield waiting
            except GeneratorExit:
                self._orphan()
                raise
            except BaseException as exc:  # the task's cancellation: the handler's now
                step, value = coro.throw, exc
            else:
                step, value = coro.send, None

    # A generator function itself: ``await`` gets the steps without a call in between.
    __await__ = _steps

    def _resumed(self, waiting: Any) -> Generator[Any, None, Any]:
        try:
            yield waiting
        except GeneratorExit:
            self._orphan()
            raise
        except BaseException as exc:
            return (yield from self._steps(self._coro.throw, exc))
        return (yield from self._steps(self._coro.send, None))

    def _orphan(self) -> None:
        rest = None
        try:
            waiting = self._context.run(self._coro.throw, asyncio.CancelledError())
        except BaseException:  # it ended, whichever way: nothing left to run
            pass
        else:
            rest = _Rest(self, waiting)
        self._orphaned(rest)

    def close(self) -> None:
        self._context.run(self._coro.close)


class _Rest:
    """What is left of an :class:`_InContext` whose awaiting coroutine was closed: awaiting
    this runs it on from the future it waits for."""

    __slots__ = ("_of", "_waiting")

    def __init__(self, of: _InContext, waiting: Any) -> None:
        self._of = of
        self._waiting = waiting

    def __await__(self) -> Generator[Any, None, Any]:
        return self._of._resumed(self._waiting)

    def close(self) -> None:
        self._of.close()


class _LocalStreamCall:
    """One call, read like a ``grpc.aio.UnaryStreamCall`` (``read``, ``done``, ``cancel``).

    The handler's steps run in the reading task (:class:`_InContext`), in the call's own
    context, so the interceptor's context variables (the current call, request id) stay out
    of the shim's request handler. A warm variant is then a read and a ``read_rest``, no task.

    Because the reading task runs the handler, a handler served this way must not bind to
    ``asyncio.current_task()`` across a ``yield`` (an ``asyncio.timeout`` around a yield
    would cancel the shim's HTTP handler): the guard's stall watch, the one such binding,
    leaves the shim's calls out. A cancellation of the reading task during a read cancels
    the handler where it waits; ``cancel()`` during a read does so too, and then takes its
    cancellation back from the reading task, so that the read raises ``CancelledError``
    with the task not being cancelled, as grpc's read of a call cancelled under it."""

    def __init__(
        self,
        start: Callable[[], Awaitable[tuple[AsyncGenerator[Any, None], Callable[[Any], bytes]]]],
        context: _Context,
        deserialize: Callable[[bytes], Any],
    ) -> None:
        self._start = start
        self._responses: AsyncGenerator[Any, None] | None = None
        self._serialize: Callable[[Any], bytes] = bytes
        self._context = context
        self._deserialize = deserialize
        self._run_in = contextvars.Context()
        self._done = False
        self._loop = asyncio.get_running_loop()
        self._reader: asyncio.Task[Any] | None = None
        self._cancelled_reader = False  # cancel() cancelled the read in progress

    async def _first(self) -> Any:
        self._responses, self._serialize = await self._start()
        return await self._responses.asend(None)

    def done(self) -> bool:
        return self._done

    async def read(self) -> Any:
        if self._done:
            return grpc.aio.EOF
        reader = self._reader = asyncio.current_task(self._loop)  # (no loop: a lookup, a getpid)
        responses = self._responses
        # After the first read, the generator's own awaitable is stepped (no coroutine around).
        step = self._first() if responses is None else responses.asend(None)
        try:
            msg = await _InContext(step, self._run_in, self._orphaned)
        except StopAsyncIteration:
            self._end(reader)
            return grpc.aio.EOF
        except GeneratorExit:  # closed while pending: the handler ended or was handed on
            self._done = True
            raise
        except BaseException as exc:
            self._failed(exc, reader)
        finally:
            self._reader = None
        if self._cancelled_reader:  # the handler went on after cancel()
            self._end(reader)
        return self._deserialize(self._serialize(msg))

    async def read_rest(self) -> list[Any]:
        """Every message left, as ``read`` would return them up to ``EOF``, with the handler
        run to its end in one step of the reading task instead of one per message (a whole
        small answer: a warm variant's chunk and its end in one). Raises as ``read``."""
        if self._done:
            return []
        reader = self._reader = asyncio.current_task(self._loop)
        try:
            msgs = await _InContext(self._rest(), self._run_in, self._orphaned)
        except GeneratorExit:
            self._done = True
            raise
        except BaseException as exc:
            self._failed(exc, reader)
        finally:
            self._reader = None
        self._end(reader)  # (raises CancelledError after a cancel() the handler outlived)
        deserialize = self._deserialize
        return [deserialize(wire) for wire in msgs]

    async def _rest(self) -> list[bytes]:
        # Each message is serialized as it comes (the guard counts sent bytes then), so a
        # handler that fails or is cancelled part way has its earlier messages counted, as
        # by reads; a cancel() ends the loop at the next message, as it ends a read.
        msgs: list[bytes] = []
        try:
            if self._responses is None:
                first = await self._first()  # (sets the serializer)
                msgs.append(self._serialize(first))
            assert self._responses is not None
            step, serialize = self._responses.asend, self._serialize
            while not self._cancelled_reader:
                msgs.append(serialize(await step(None)))
        except StopAsyncIteration:
            pass
        return msgs

    def _failed(self, exc: BaseException, reader: asyncio.Task[Any] | None) -> NoReturn:
        """Raise what a read of a grpc call that failed with ``exc`` raises."""
        if isinstance(exc, (Exception, asyncio.CancelledError)):
            self._end(reader)
        if isinstance(exc, grpc.aio.AbortError):
            assert self._context.error is not None
            raise self._context.error from None
        if isinstance(exc, asyncio.CancelledError):
            self._close_later()  # (a no-op: the generator ended with it or never began)
            raise exc
        if isinstance(exc, Exception):  # what grpc would answer an unhandled error with
            raise _status(
                grpc.StatusCode.UNKNOWN, self._context, f"Unexpected {type(exc).__name__}"
            ) from None
        raise exc

    def _end(self, reader: asyncio.Task[Any] | None) -> None:
        self._done = True
        if self._cancelled_reader:
            # cancel() during the read: its cancellation of this task is taken back (the
            # task itself is not being cancelled), and the read raises CancelledError
            # whatever the handler did with it, as grpc's read of a cancelled call.
            self._cancelled_reader = False
            if reader is not None:
                reader.uncancel()
            self._close_later()  # (a handler that went on to its next message)
            raise asyncio.CancelledError

    def cancel(self) -> bool:
        if self._done:
            return False
        self._done = True
        reader = self._reader
        if reader is not None:
            # Cancelled by another task during a read: the handler is cancelled where it
            # waits (in the reading task), and the read raises CancelledError.
            self._cancelled_reader = True
            reader.cancel()
        else:
            self._close_later()
        return True

    def _ended(self) -> bool:
        """The handler's generator never started or has finished: nothing to close."""
        responses = self._responses
        return responses is None or getattr(responses, "ag_frame", True) is None

    def _orphaned(self, rest: _Rest | None) -> None:
        # A read closed while pending: the handler was cancelled; ``rest`` is its cleanup
        # that still waits, finished here by a task of its own.
        self._done = True
        if rest is None:
            self._close_later()
            return
        if not self._spawn(self._finish(rest), contextvars.Context()):
            rest.close()

    async def _finish(self, rest: _Rest) -> None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await rest
        self._close_later()

    def _close_later(self) -> None:
        # Closing runs the handlers' finally blocks (the interceptor's stream count).
        if self._ended():
            return
        self._spawn(self._close(), self._run_in)

    def _spawn(self, coro: Coroutine[Any, Any, None], context: contextvars.Context) -> bool:
        try:
            task = self._loop.create_task(coro, context=context)
        except RuntimeError:  # the loop is closed (a reader collected late): nothing can wait
            coro.close()
            return False
        _background.add(task)
        task.add_done_callback(_background.discard)
        return True

    async def _close(self) -> None:
        aclose = getattr(self._responses, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


_background: set[asyncio.Task[None]] = set()

_REQUEST_WINDOW_BYTES = 4 * 1024 * 1024
"""Request bytes a local upload may have in flight before ``write`` waits for the handler
(what HTTP/2 flow control bounds over the network)."""
_RESPONSE_WINDOW = 8
"""Responses the handler may run ahead of the reader."""


class _Closed(Exception):
    pass


class _Pipe:
    """A FIFO between one writer and one reader, bounded by ``limit`` units (``size`` of each
    item), closed from either side: a waiting writer or reader wakes when it closes."""

    __slots__ = ("_getter", "_items", "_limit", "_putter", "_size", "_used", "closed")

    def __init__(self, limit: int, size: Callable[[Any], int]) -> None:
        self._items: deque[Any] = deque()
        self._limit = limit
        self._size = size
        self._used = 0
        self._getter: asyncio.Future[None] | None = None
        self._putter: asyncio.Future[None] | None = None
        self.closed = False

    async def put(self, item: Any) -> None:
        while self._used >= self._limit and not self.closed:
            self._putter = asyncio.get_running_loop().create_future()
            await self._putter
        if self.closed:
            raise _Closed
        self._items.append(item)
        self._used += self._size(item)
        _wake(self._getter)

    async def get(self) -> Any:
        """The next item; raises _Closed once closed and empty."""
        while not self._items:
            if self.closed:
                raise _Closed
            self._getter = asyncio.get_running_loop().create_future()
            await self._getter
        item = self._items.popleft()
        self._used -= self._size(item)
        _wake(self._putter)
        return item

    def close(self) -> None:
        self.closed = True
        _wake(self._getter)
        _wake(self._putter)


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class _LocalBidiCall:
    """One client-and-server-streaming call, used like a ``grpc.aio.StreamStreamCall``
    (``write``, ``done_writing``, ``read``, ``done``, ``cancel``).

    The handler runs in a task of its own from the start, as grpc runs it, in a fresh context
    (the interceptor's context variables stay out of the shim's request handler). Requests
    pass through the call's serializer and the handler's deserializer, responses through the
    handler's serializer and the call's deserializer: the handler sees what the network would
    hand it. ``timeout`` is the call's deadline: past it the handler is cancelled and the
    reader gets DEADLINE_EXCEEDED, as over the network."""

    def __init__(
        self,
        calls: LocalCalls,
        handler: Any,
        details: _Details,
        context: _Context,
        request_serializer: Callable[[Any], bytes],
        response_deserializer: Callable[[bytes], Any],
        timeout: float | None,
    ) -> None:
        self._calls = calls
        self._handler = handler
        self._details = details
        self._context = context
        self._serialize = request_serializer
        self._deserialize = response_deserializer
        self._requests = _Pipe(_REQUEST_WINDOW_BYTES, len)
        self._responses = _Pipe(_RESPONSE_WINDOW, lambda _: 1)
        self._error: grpc.aio.AioRpcError | None = None
        self._done = False
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), context=contextvars.Context())
        self._timer = loop.call_later(timeout, self._expire) if timeout is not None else None

    async def _incoming(self, parse: Callable[[bytes], Any]) -> AsyncIterator[Any]:
        while True:
            try:
                raw = await self._requests.get()
            except _Closed:
                return
            yield parse(raw)

    async def _run(self) -> None:
        context = self._context
        try:
            wrapped = await self._calls.wrap(self._handler, self._details)
            responses = wrapped.stream_stream(self._incoming(wrapped.request_deserializer), context)
            serialize = wrapped.response_serializer
            try:
                async for msg in responses:
                    await self._responses.put(self._deserialize(serialize(msg)))
            finally:
                await responses.aclose()
        except grpc.aio.AbortError:
            self._error = context.error
        except asyncio.CancelledError:
            if self._error is None:
                self._error = _status(grpc.StatusCode.CANCELLED, context, "Locally cancelled")
            raise
        except _Closed:  # the reader cancelled the call while a response waited
            pass
        except Exception as exc:  # what grpc answers an unhandled error with
            # The type only, as grpc answers an unhandled error (its text is not the caller's).
            self._error = _status(
                grpc.StatusCode.UNKNOWN, context, f"Unexpected {type(exc).__name__}"
            )
        finally:
            self._end()

    def _end(self) -> None:
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self._requests.close()
        self._responses.close()

    def _expire(self) -> None:
        if not self._done:
            self._error = _status(
                grpc.StatusCode.DEADLINE_EXCEEDED, self._context, "Deadline Exceeded"
            )
            self._task.cancel()
            self._end()

    def done(self) -> bool:
        return self._done

    async def write(self, request: Any) -> None:
        if self._requests.closed:
            raise asyncio.InvalidStateError("the call has ended")
        try:
            await self._requests.put(self._serialize(request))
        except _Closed:
            raise asyncio.InvalidStateError("the call has ended") from None

    async def done_writing(self) -> None:
        self._requests.close()

    async def read(self) -> Any:
        try:
            return await self._responses.get()
        except _Closed:
            pass
        if self._error is not None:
            raise self._error
        return grpc.aio.EOF

    def cancel(self) -> bool:
        if self._done:
            return False
        self._error = _status(grpc.StatusCode.CANCELLED, self._context, "Locally cancelled")
        self._task.cancel()  # the handler's own cleanup (a SYNC job goes with its caller)
        self._end()
        return True


def _status(code: grpc.StatusCode, context: _Context, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*context.trailing), details
    )


class _Recorder:
    """Stands in for the server in a generated ``add_*Servicer_to_server``."""

    def __init__(self, calls: LocalCalls, only: Collection[str]) -> None:
        self._calls = calls
        self._only = frozenset(only)

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        return None  # the registered handlers below are the same ones

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        for name, handler in handlers.items():
            if name in self._only:
                self._calls.add(f"/{service}/{name}", handler)


class _Method:
    """One method of a local channel: its handler and the stub's (de)serializers."""

    def __init__(
        self,
        calls: LocalCalls,
        path: str,
        handler: Any,
        request_serializer: Callable[[Any], bytes],
        response_deserializer: Callable[[bytes], Any],
    ) -> None:
        self._calls = calls
        self._path = path
        self._handler = handler
        self._request_serializer = request_serializer
        self._response_deserializer = response_deserializer


class _MultiCallable(_Method):
    def __call__(
        self, request: Any, *, metadata: Sequence[tuple[str, str]] = (), **_: Any
    ) -> _LocalStreamCall:
        context = _Context(metadata)
        raw = self._request_serializer(request)
        details = _Details(self._path, context.invocation_metadata())

        async def start() -> tuple[AsyncGenerator[Any, None], Callable[[Any], bytes]]:
            wrapped = await self._calls.wrap(self._handler, details)
            parsed = wrapped.request_deserializer(raw)
            return wrapped.unary_stream(parsed, context), wrapped.response_serializer

        return _LocalStreamCall(start, context, self._response_deserializer)


class _BidiMultiCallable(_Method):
    def __call__(
        self,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        **_: Any,
    ) -> _LocalBidiCall:
        context = _Context(metadata)
        details = _Details(self._path, context.invocation_metadata())
        return _LocalBidiCall(
            self._calls,
            self._handler,
            details,
            context,
            self._request_serializer,
            self._response_deserializer,
            timeout,
        )


class LocalCalls:
    """Streaming handlers served in this process; see the module docstring."""

    def __init__(self, interceptor: Any) -> None:
        self.interceptor = interceptor
        self._handlers: dict[str, Any] = {}

    def recorder(self, only: Collection[str]) -> grpc.aio.Server:
        """Pass this as the server to ``add_*Servicer_to_server`` to serve the methods named
        in ``only`` (``GetVariant``, ``ImageUpscale``) locally too."""
        # Duck-typed: the generated registration calls only the two methods _Recorder has.
        return cast("grpc.aio.Server", _Recorder(self, only))

    def add(self, path: str, handler: Any) -> None:
        if not handler.response_streaming:
            raise ValueError(f"{path}: only server-streaming methods are served locally")
        self._handlers[path] = handler

    async def wrap(self, handler: Any, details: _Details) -> Any:
        """``handler`` as the interceptor hands it to grpc for this call."""

        async def continuation(_: Any) -> Any:
            return handler

        return await self.interceptor.intercept_service(continuation, details)

    def unary_stream(
        self,
        path: str,
        request_serializer: Callable[[Any], bytes],
        response_deserializer: Callable[[bytes], Any],
    ) -> _MultiCallable | None:
        """A callable like ``channel.unary_stream(path, ...)`` when ``path`` is served
        here, else ``None``."""
        handler = self._handlers.get(path)
        if handler is None or handler.request_streaming:
            return None
        return _MultiCallable(self, path, handler, request_serializer, response_deserializer)

    def stream_stream(
        self,
        path: str,
        request_serializer: Callable[[Any], bytes],
        response_deserializer: Callable[[bytes], Any],
    ) -> _BidiMultiCallable | None:
        """A callable like ``channel.stream_stream(path, ...)`` when ``path`` is served
        here, else ``None``."""
        handler = self._handlers.get(path)
        if handler is None or not handler.request_streaming:
            return None
        return _BidiMultiCallable(self, path, handler, request_serializer, response_deserializer)
