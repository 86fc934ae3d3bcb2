"""The server interceptor: request ids, API keys, request rate, streaming calls, metrics.

Why an interceptor and not ``@rpc``: it sees every call of every service before any handler
runs, in one place, so a servicer that forgets a decorator is still protected; it tells calls
apart by method name, which is how health and reflection stay open (load balancers and
``grpcurl list`` carry no keys); and it can count bytes of every message in and out. ``@rpc``
stays what it was: each handler's error translation, which records its outcome on the
:class:`~aiserver.api.calls.CallInfo` this interceptor set up.

Admission, in order (each refusal is a rich status, logged without any secret):

1. ``x-request-id`` (the caller's, if short and printable, else a new one);
2. the API key (``authorization: Bearer <key>``) when keys are configured:
   UNAUTHENTICATED ``API_KEY_MISSING`` / ``API_KEY_INVALID``. Artifact reads may come without
   a key when URLs are signed: their servicer then insists on a valid signature;
3. the caller's request rate (per key id; per peer address in open mode or for keyless
   signed reads): RESOURCE_EXHAUSTED ``RATE_LIMITED`` with RetryInfo;
4. for streaming calls, the server-wide number of them: RESOURCE_EXHAUSTED
   ``TOO_MANY_STREAMS`` with RetryInfo.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, NoReturn

import grpc

from aiserver.api.calls import CallInfo, current_call
from aiserver.api.status import abort, request_id_of
from aiserver.auth import ANONYMOUS, KeyRing, bearer_token, invalid_key, missing_key
from aiserver.errors import ErrorKind, ServiceError
from aiserver.logs import request_id_var
from aiserver.metrics import Metrics
from aiserver.ratelimit import RateLimiter

__all__ = ["EXEMPT_PREFIXES", "Guard", "peer_host"]

logger = logging.getLogger(__name__)

EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Methods served to anyone, unmetered: health checks and reflection."""

STREAMS_RETRY_S = 1.0
DRAIN_S = 2.0
DRAIN_BYTES = 8 * 1024 * 1024


def peer_host(peer: str) -> str:
    """``ipv4:10.1.2.3:5555`` -> ``10.1.2.3`` (``ipv6:[::1]:5555`` -> ``[::1]``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return rest.rsplit(":", 1)[0]
    return peer


def too_many_streams(limit: int) -> ServiceError:
    return ServiceError(
        ErrorKind.RESOURCE_EXHAUSTED,
        "TOO_MANY_STREAMS",
        f"the server is serving its limit of {limit} streaming calls; retry shortly",
        metadata={"limit": str(limit)},
        retry_after_s=STREAMS_RETRY_S,
    )


class Guard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """See the module docstring. ``keyless_methods``: full method paths
    (``/imagetasks.v1.ArtifactService/ReadArtifact``) that may come without a key."""

    def __init__(
        self,
        *,
        keys: KeyRing,
        rate: RateLimiter | None = None,
        max_streams: int = 0,
        keyless_methods: Collection[str] = (),
        metrics: Metrics | None = None,
    ) -> None:
        self.keys = keys
        self.rate = rate
        self.max_streams = max_streams
        self.keyless = frozenset(keyless_methods)
        self.metrics = metrics
        self.active_streams = 0

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        return self._wrap(handler, method)

    # --- wrapping -------------------------------------------------------------------------

    def _wrap(self, handler: Any, method: str) -> Any:
        name = method.lstrip("/").rsplit(".", 1)[-1]  # Service/Method
        keyless = method in self.keyless
        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.request_streaming and handler.response_streaming:
            inner = handler.stream_stream
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(inner, name, keyless, request_stream=True), **options
            )
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, name, keyless, request_stream=False),
                **options,
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, name, keyless, request_stream=True), **options
            )
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary, name, keyless, request_stream=False), **options
        )

    def _unary(
        self, inner: Callable[..., Any], name: str, keyless: bool, *, request_stream: bool
    ) -> Callable[..., Awaitable[Any]]:
        async def behaviour(request: Any, context: Any) -> Any:
            call = _Call(self, name, context, keyless=keyless, streaming=request_stream)
            failure: BaseException | None = None
            try:
                await call.admit(request if request_stream else None)
                request = call.requests(request) if request_stream else call.received(request)
                response = await inner(request, context)
                return call.sent(response)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                call.finish(failure)

        return behaviour

    def _streaming(
        self, inner: Callable[..., Any], name: str, keyless: bool, *, request_stream: bool
    ) -> Callable[..., AsyncIterator[Any]]:
        async def behaviour(request: Any, context: Any) -> AsyncIterator[Any]:
            call = _Call(self, name, context, keyless=keyless, streaming=True)
            failure: BaseException | None = None
            try:
                await call.admit(request if request_stream else None)
                request = call.requests(request) if request_stream else call.received(request)
                result = inner(request, context)
                if inspect.isasyncgen(result):
                    try:
                        async for response in result:
                            yield call.sent(response)
                    finally:
                        await result.aclose()  # promptly, if this stream is closed early
                else:  # a handler that writes with context.write()
                    await result
            except BaseException as exc:
                failure = exc
                raise
            finally:
                call.finish(failure)

        return behaviour


class _Call:
    """One call going through the guard."""

    __slots__ = ("_counted", "_guard", "_keyless", "_started", "_streaming", "context", "info")

    def __init__(
        self, guard: Guard, method: str, context: Any, *, keyless: bool, streaming: bool
    ) -> None:
        self._guard = guard
        self._keyless = keyless
        self._streaming = streaming
        self._counted = False
        self._started = time.monotonic()
        self.context = context
        rid = request_id_of(context)
        request_id_var.set(rid)
        context.set_trailing_metadata((("x-request-id", rid),))
        self.info = CallInfo(method=method, request_id=rid, peer=context.peer() or "")
        current_call.set(self.info)

    async def admit(self, requests: AsyncIterator[Any] | None) -> None:
        """Let the call in, or end it with the reason (``requests``: of a client stream)."""
        guard, info = self._guard, self.info
        try:
            if guard.keys.enabled:
                header = _metadata(self.context, "authorization")
                if header is None and self._keyless:
                    info.principal = ANONYMOUS  # the servicer checks the URL signature
                elif header is None:
                    raise missing_key()
                else:
                    token = bearer_token(header)
                    principal = None if token is None else guard.keys.authenticate(token)
                    if principal is None:
                        raise invalid_key()
                    info.principal = principal
            if guard.rate is not None:
                p = info.principal
                who = f"key:{p.id}" if guard.keys.enabled and p.authenticated else None
                guard.rate.check(who or f"peer:{peer_host(info.peer)}")
            if self._streaming:
                if guard.max_streams and guard.active_streams >= guard.max_streams:
                    raise too_many_streams(guard.max_streams)
                guard.active_streams += 1
                self._counted = True
                if guard.metrics is not None:
                    guard.metrics.streams.inc()
        except ServiceError as err:
            await self._refuse(err, requests)

    async def _refuse(self, err: ServiceError, requests: AsyncIterator[Any] | None) -> NoReturn:
        if requests is not None:
            # A client still writing when the call ends sees a local INTERNAL error instead
            # of this status; reading what it sends, within tight bounds, avoids that.
            await _drain(requests)
        await abort(self.context, err)  # records the reason, logs it (never the key)
        raise AssertionError("abort returned")  # pragma: no cover

    def received(self, msg: Any) -> Any:
        metrics = self._guard.metrics
        if metrics is not None:
            metrics.received_bytes.labels(self.info.method).inc(msg.ByteSize())
        return msg

    async def _count(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for msg in requests:
            yield self.received(msg)

    def requests(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        return requests if self._guard.metrics is None else self._count(requests)

    def sent(self, msg: Any) -> Any:
        metrics = self._guard.metrics
        if metrics is not None and msg is not None:
            metrics.sent_bytes.labels(self.info.method).inc(msg.ByteSize())
        return msg

    def finish(self, failure: BaseException | None) -> None:
        guard, info = self._guard, self.info
        if self._counted:
            self._counted = False
            guard.active_streams -= 1
            if guard.metrics is not None:
                guard.metrics.streams.dec()
        code = info.code
        if code == "OK" and failure is not None and not isinstance(failure, GeneratorExit):
            if isinstance(failure, asyncio.CancelledError):
                code = "CANCELLED"
            elif not isinstance(failure, grpc.aio.AbortError):
                code = "UNKNOWN"
        logger.debug(
            "rpc %s %s in %.3f s (key %s)",
            info.method,
            code,
            time.monotonic() - self._started,
            info.principal.id or "-",
        )
        if guard.metrics is None:
            return
        guard.metrics.rpcs.labels(info.method, code).inc()
        if info.reason:
            guard.metrics.rejected.labels(info.reason).inc()


async def _drain(requests: AsyncIterator[Any]) -> None:
    seen = 0
    try:
        async with asyncio.timeout(DRAIN_S):
            async for msg in requests:
                seen += msg.ByteSize()
                if seen > DRAIN_BYTES:
                    return
    except (TimeoutError, Exception):
        return


def _metadata(context: Any, key: str) -> str | None:
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else None
    return None
