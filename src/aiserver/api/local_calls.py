"""Server-streaming calls made by the in-process HTTP shim without the network.

A warm variant is a few kB held in memory; over loopback gRPC most of its cost is the two
HTTP/2 stacks. :class:`LocalCalls` runs the very same handler, wrapped by the very same
interceptor (API key, rate limit, stream count, request id, metrics) as a network call, with
requests and responses through the same (de)serializers, and hands the shim an object that
reads like a ``grpc.aio`` call: messages, ``grpc.aio.EOF``, and failures as
:class:`grpc.aio.AioRpcError` with the rich status in its trailing metadata. The access rules
are therefore the service's own, not a second implementation. Only the methods recorded with
:meth:`LocalCalls.recorder` are served this way; every other call goes over the channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, cast

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


class _LocalStreamCall:
    """One call, read like a ``grpc.aio.UnaryStreamCall`` (``read``, ``done``, ``cancel``).

    Every step runs in the call's own context, so the interceptor's context variables (the
    current call, request id) stay out of the shim's request handler."""

    def __init__(
        self,
        start: Callable[[], Awaitable[tuple[AsyncIterator[Any], Callable[[Any], bytes]]]],
        context: _Context,
        deserialize: Callable[[bytes], Any],
    ) -> None:
        self._start = start
        self._responses: AsyncIterator[Any] | None = None
        self._serialize: Callable[[Any], bytes] = bytes
        self._context = context
        self._deserialize = deserialize
        self._run_in = contextvars.Context()
        self._done = False
        self._step: asyncio.Task[Any] | None = None

    async def _next(self) -> Any:
        if self._responses is None:
            self._responses, self._serialize = await self._start()
        return await anext(self._responses)

    def done(self) -> bool:
        return self._done

    async def read(self) -> Any:
        if self._done:
            return grpc.aio.EOF
        step = asyncio.get_running_loop().create_task(self._next(), context=self._run_in)
        self._step = step
        try:
            msg = await step
        except StopAsyncIteration:
            self._done = True
            return grpc.aio.EOF
        except grpc.aio.AbortError:
            self._done = True
            assert self._context.error is not None
            raise self._context.error from None
        except asyncio.CancelledError:
            self.cancel()
            raise
        except Exception as exc:  # what grpc would answer an unhandled error with
            self._done = True
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNKNOWN,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(*self._context.trailing),
                f"Unexpected {type(exc).__name__}",
            ) from None
        finally:
            self._step = None
        return self._deserialize(self._serialize(msg))

    def cancel(self) -> bool:
        if self._done:
            return False
        self._done = True
        step = self._step
        if step is not None:
            step.cancel()
        # Closing runs the handlers' finally blocks (the interceptor's stream count).
        closing = asyncio.get_running_loop().create_task(self._close(step), context=self._run_in)
        _background.add(closing)
        closing.add_done_callback(_background.discard)
        return True

    async def _close(self, step: asyncio.Task[Any] | None) -> None:
        if step is not None:
            await asyncio.wait([step])  # a generator cannot be closed while it runs
        aclose = getattr(self._responses, "aclose", None)  # None: never started
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


_background: set[asyncio.Task[None]] = set()


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


class _MultiCallable:
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

    def __call__(
        self, request: Any, *, metadata: Sequence[tuple[str, str]] = (), **_: Any
    ) -> _LocalStreamCall:
        context = _Context(metadata)
        raw = self._request_serializer(request)
        details = _Details(self._path, context.invocation_metadata())

        async def start() -> tuple[AsyncIterator[Any], Callable[[Any], bytes]]:
            wrapped = await self._calls.wrap(self._handler, details)
            parsed = wrapped.request_deserializer(raw)
            return wrapped.unary_stream(parsed, context), wrapped.response_serializer

        return _LocalStreamCall(start, context, self._response_deserializer)


class LocalCalls:
    """Server-streaming handlers served in this process; see the module docstring."""

    def __init__(self, interceptor: Any) -> None:
        self.interceptor = interceptor
        self._handlers: dict[str, Any] = {}

    def recorder(self, only: Collection[str]) -> grpc.aio.Server:
        """Pass this as the server to ``add_*Servicer_to_server`` to serve the methods named
        in ``only`` (``GetVariant``) locally too."""
        # Duck-typed: the generated registration calls only the two methods _Recorder has.
        return cast("grpc.aio.Server", _Recorder(self, only))

    def add(self, path: str, handler: Any) -> None:
        if handler.request_streaming or not handler.response_streaming:
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
        if handler is None:
            return None
        return _MultiCallable(self, path, handler, request_serializer, response_deserializer)
