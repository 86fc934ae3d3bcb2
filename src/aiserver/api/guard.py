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
   ``TOO_MANY_STREAMS`` with RetryInfo;
5. for client streams (uploads), the number one client address has open:
   RESOURCE_EXHAUSTED ``TOO_MANY_UPLOADS`` with RetryInfo. The in-process HTTP shim, known by
   the ``x-aiserver-shim`` token it is given, is not capped here: it caps its own clients.

Every request message goes through :func:`aiserver.api.malformed.tolerant`: one protobuf
cannot parse ends the call with INVALID_ARGUMENT ``MALFORMED_MESSAGE``, never INTERNAL. A
client stream that sends nothing for ``upload_idle_s``, or is still sending after
``upload_total_s``, ends with DEADLINE_EXCEEDED ``UPLOAD_STALLED`` / ``UPLOAD_TOO_SLOW``
(the servicer's upload reader then deletes what it spooled). A server stream whose client
takes no message for ``stream_idle_s`` ends (:mod:`aiserver.api.stalls`); the in-process HTTP
shim's streams are left to the shim's own watch over its clients.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, NoReturn

import grpc

from aiserver.api.calls import STREAM_STALLED, CallInfo, current_call
from aiserver.api.malformed import Malformed, tolerant, tolerant_handler
from aiserver.api.stalls import MAX_SPARED, StallWatch, shut_connections
from aiserver.api.status import abort, request_id_of
from aiserver.api.wire import chunk_parsing, passing_encoded
from aiserver.auth import ANONYMOUS, KeyRing, bearer_token, invalid_key, missing_key
from aiserver.errors import ErrorKind, ServiceError
from aiserver.logs import request_id_var
from aiserver.metrics import Metrics
from aiserver.ratelimit import RateLimiter

__all__ = ["EXEMPT_PREFIXES", "SHIM_TOKEN_HEADER", "Guard", "peer_host"]

logger = logging.getLogger(__name__)

EXEMPT_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
"""Methods served to anyone, unmetered: health checks and reflection."""

STREAMS_RETRY_S = 1.0
UPLOADS_RETRY_S = 5.0
SHIM_TOKEN_HEADER = "x-aiserver-shim"
DRAIN_S = 2.0
DRAIN_BYTES = 8 * 1024 * 1024


def peer_host(peer: str) -> str:
    """``ipv4:10.1.2.3:5555`` -> ``10.1.2.3`` (``ipv6:[::1]:5555`` -> ``[::1]``)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return rest.rsplit(":", 1)[0]
    return peer


def too_many_uploads(limit: int) -> ServiceError:
    return ServiceError(
        ErrorKind.RESOURCE_EXHAUSTED,
        "TOO_MANY_UPLOADS",
        f"this client address has {limit} uploads open already; retry when one has finished",
        metadata={"limit": str(limit)},
        retry_after_s=UPLOADS_RETRY_S,
    )


def upload_stalled(idle_s: float) -> ServiceError:
    return ServiceError(
        ErrorKind.DEADLINE_EXCEEDED,
        "UPLOAD_STALLED",
        f"the upload sent nothing for {idle_s:g} s",
        metadata={"idle_timeout_s": f"{idle_s:g}"},
    )


def upload_too_slow(total_s: float) -> ServiceError:
    return ServiceError(
        ErrorKind.DEADLINE_EXCEEDED,
        "UPLOAD_TOO_SLOW",
        f"the upload did not finish within {total_s:g} s",
        metadata={"upload_timeout_s": f"{total_s:g}"},
    )


def too_many_streams(limit: int) -> ServiceError:
    return ServiceError(
        ErrorKind.RESOURCE_EXHAUSTED,
        "TOO_MANY_STREAMS",
        f"the server is serving its limit of {limit} streaming calls; retry shortly",
        metadata={"limit": str(limit)},
        retry_after_s=STREAMS_RETRY_S,
    )


class Guard(grpc.aio.ServerInterceptor):
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
        upload_idle_s: float = 0.0,
        upload_total_s: float = 0.0,
        max_uploads_per_peer: int = 0,
        shim_token: str = "",
        stream_idle_s: float = 0.0,
        stream_max_spared: int = MAX_SPARED,
    ) -> None:
        self.keys = keys
        self.local_ports: set[int] = set()
        """The ports the server listens on (set once bound): a stalled stream's connection
        is one of them."""
        self.stalls = (
            StallWatch(
                stream_idle_s,
                lambda peers: shut_connections(peers, frozenset(self.local_ports)),
                max_spared=stream_max_spared,
            )
            if stream_idle_s > 0
            else None
        )
        self.shim_token = shim_token
        self.upload_idle_s = upload_idle_s
        self.upload_total_s = upload_total_s
        self.max_uploads_per_peer = max_uploads_per_peer
        self.uploads_by_peer: dict[str, int] = {}
        self.rate = rate
        self.max_streams = max_streams
        self.keyless = frozenset(keyless_methods)
        self.metrics = metrics
        self.active_streams = 0
        self._wrapped: dict[str, tuple[Any, Any]] = {}
        """Per method: grpc's handler and this guard's wrapping of it, made once."""
        self._rpc_counts: dict[tuple[str, str], Callable[[float], None]] = {}
        """Per method and status code: the counter's child's adder (``labels()`` costs a
        lookup with checks per call)."""
        self.streams_add = None if metrics is None else _adder(metrics.streams)
        """Adds to the streams-in-progress gauge (+1, -1)."""

    async def intercept_service(
        self,
        continuation: Callable[[Any], Awaitable[Any]],
        handler_call_details: Any,
    ) -> Any:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None:
            return handler
        # Services hand out one handler object per method: the wrapping (closures, metric
        # children, grpc's handler tuple) is built at its first call, not at every call.
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        if method.startswith(EXEMPT_PREFIXES):
            wrapped = tolerant_handler(handler)
        else:
            wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    # --- wrapping -------------------------------------------------------------------------

    def _wrap(self, handler: Any, method: str) -> Any:
        name = method.lstrip("/").rsplit(".", 1)[-1]  # Service/Method
        keyless = method in self.keyless
        options = {
            "request_deserializer": self._counted_in(
                chunk_parsing(tolerant(handler.request_deserializer), handler.request_deserializer),
                name,
            ),
            "response_serializer": self._counted_out(
                passing_encoded(handler.response_serializer), name
            ),
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

    # Bytes are counted where grpc hands them over: upb's ByteSize() serializes the whole
    # message again, a full copy of every 1 MiB chunk.
    def _counted_in(
        self, parse: Callable[[bytes], Any] | None, name: str
    ) -> Callable[[bytes], Any] | None:
        if self.metrics is None or parse is None:
            return parse
        add = _adder(self.metrics.received_bytes.labels(name))

        def counted(data: bytes) -> Any:
            add(len(data))
            return parse(data)

        return counted

    def _counted_out(
        self, serialize: Callable[[Any], bytes] | None, name: str
    ) -> Callable[[Any], bytes] | None:
        if self.metrics is None or serialize is None:
            return serialize
        add = _adder(self.metrics.sent_bytes.labels(name))

        def counted(msg: Any) -> bytes:
            data = serialize(msg)
            add(len(data))
            return data

        return counted

    def _unary(
        self, inner: Callable[..., Any], name: str, keyless: bool, *, request_stream: bool
    ) -> Callable[..., Awaitable[Any]]:
        async def behaviour(request: Any, context: Any) -> Any:
            call = _Call(self, name, context, keyless=keyless, streaming=request_stream)
            failure: BaseException | None = None
            try:
                await call.admit(request if request_stream else None)
                request = call.requests(request) if request_stream else await call.one(request)
                response = await inner(request, context)
                return response
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
                request = call.requests(request) if request_stream else await call.one(request)
                result = inner(request, context)
                if inspect.isasyncgen(result):
                    try:
                        if call.watch_writes():
                            # A yield returns when grpc has written the message: the time in
                            # between is the client's (the watch ends it past the idle time).
                            async for response in result:
                                call.writing_since = time.monotonic()
                                yield response
                                call.writing_since = None
                        else:  # nobody reads the times (the shim's, or no watch)
                            async for response in result:
                                yield response
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

    __slots__ = (
        "_counted",
        "_guard",
        "_keyless",
        "_peer_counted",
        "_reader",
        "_serving",
        "_started",
        "_streaming",
        "_task",
        "_watch",
        "context",
        "info",
        "peer",
        "writing_since",
    )

    def __init__(
        self, guard: Guard, method: str, context: Any, *, keyless: bool, streaming: bool
    ) -> None:
        self._guard = guard
        self._keyless = keyless
        self._streaming = streaming
        self._counted = False
        self._peer_counted = ""
        self._reader: _Requests | None = None
        self._watch: StallWatch | None = None
        self._task: asyncio.Task[Any] | None = None
        self._started = time.monotonic()
        self.writing_since: float | None = None
        self.context = context
        rid = request_id_of(context)
        request_id_var.set(rid)
        context.set_trailing_metadata((("x-request-id", rid),))
        self.peer: str = context.peer() or ""
        self.info = CallInfo(method=method, request_id=rid, peer=self.peer)
        current_call.set(self.info)
        self._serving = guard.stalls  # its connection serves this call (the stall watch asks)
        if self._serving is not None:
            self._serving.opened(self.peer)

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
                if guard.streams_add is not None:
                    guard.streams_add(1)
            if requests is not None and guard.max_uploads_per_peer and not self._from_shim():
                host = peer_host(info.peer)
                if guard.uploads_by_peer.get(host, 0) >= guard.max_uploads_per_peer:
                    raise too_many_uploads(guard.max_uploads_per_peer)
                guard.uploads_by_peer[host] = guard.uploads_by_peer.get(host, 0) + 1
                self._peer_counted = host
        except ServiceError as err:
            await self._refuse(err, requests)

    def _release_upload(self) -> None:
        if self._peer_counted:
            guard = self._guard
            host, self._peer_counted = self._peer_counted, ""
            left = guard.uploads_by_peer.get(host, 1) - 1
            if left > 0:
                guard.uploads_by_peer[host] = left
            else:
                guard.uploads_by_peer.pop(host, None)

    def watch_writes(self) -> bool:
        """Let the guard's stall watch see this server stream's writes (not the shim's);
        whether it does."""
        watch = self._guard.stalls
        if watch is None or self._from_shim():
            return False
        self._task = asyncio.current_task()
        if self._task is None:
            return False
        self._watch = watch
        watch.add(self)
        return True

    def stalled(self, shut: bool) -> None:
        """The client took no message for the idle time: the handler task goes (grpc then
        drops this stream's generator, which closes the servicer's). ``shut``: its connection
        is being shut (the client sees UNAVAILABLE); else the stream is left open in the core
        (the connection serves other calls) until the client cancels it, its deadline passes
        or the connection ends: recorded as CANCELLED, the server's side of it."""
        self._watch = None
        self._not_serving()
        info = self.info
        info.failed("UNAVAILABLE" if shut else "CANCELLED", STREAM_STALLED)
        logger.warning(
            "rpc %s from %s: the client took no message for %g s; ending the stream (%s)",
            info.method,
            self.peer,
            self._guard.stalls.idle_s if self._guard.stalls is not None else 0.0,
            "shutting its connection: UNAVAILABLE"
            if shut
            else "its connection serves other calls: left to the client's cancel or deadline",
        )
        if self._task is not None:
            self._task.cancel()

    def _not_serving(self) -> None:
        if self._serving is not None:
            self._serving.closed(self.peer)
            self._serving = None

    def _from_shim(self) -> bool:
        token = self._guard.shim_token
        given = _metadata(self.context, SHIM_TOKEN_HEADER)
        return bool(token) and given is not None and hmac.compare_digest(given, token)

    async def _refuse(self, err: ServiceError, requests: AsyncIterator[Any] | None) -> NoReturn:
        if requests is not None:
            # A client still writing when the call ends sees a local INTERNAL error instead
            # of this status; reading what it sends, within tight bounds, avoids that.
            await _drain(requests)
        await abort(self.context, err)  # records the reason, logs it (never the key)
        raise AssertionError("abort returned")  # pragma: no cover

    async def one(self, msg: Any) -> Any:
        """A unary call's request; a malformed one ends the call."""
        if isinstance(msg, Malformed):
            await abort(self.context, msg.error())
        return msg

    def requests(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """The client's messages, each within the idle timeout and all within the total one;
        a malformed one raises its error where the servicer reads it."""
        self._reader = _Requests(self, requests)
        return self._reader

    def finish(self, failure: BaseException | None) -> None:
        guard, info = self._guard, self.info
        if self._reader is not None:
            self._reader.stop()  # a handler that stopped reading early leaves no timer
        if self._watch is not None:
            self._watch.discard(self)
            self._watch = None
        self._not_serving()
        if self._counted:
            self._counted = False
            guard.active_streams -= 1
            if guard.streams_add is not None:
                guard.streams_add(-1)
        self._release_upload()
        code = info.code
        if code == "OK" and failure is not None and not isinstance(failure, GeneratorExit):
            if isinstance(failure, asyncio.CancelledError):
                code = "CANCELLED"
            elif not isinstance(failure, grpc.aio.AbortError):
                code = "UNKNOWN"
        if logger.isEnabledFor(logging.DEBUG):  # (the clock read and the call: per RPC)
            logger.debug(
                "rpc %s %s in %.3f s (key %s)",
                info.method,
                code,
                time.monotonic() - self._started,
                info.principal.id or "-",
            )
        if guard.metrics is None:
            return
        count = guard._rpc_counts.get((info.method, code))
        if count is None:  # methods x codes: bounded
            count = guard._rpc_counts[info.method, code] = _adder(
                guard.metrics.rpcs.labels(info.method, code)
            )
        count(1)
        if info.reason:
            guard.metrics.rejected.labels(info.reason).inc()


def _adder(metric: Any) -> Callable[[float], None]:
    """What ``inc`` of the (labelled) counter or gauge ``metric`` adds with, without the
    checks ``inc`` makes on every call (the metric observable, the amount not negative: both
    hold here, by construction): 2 of the 3 calls of each of the ~6 counts per call. A
    ``prometheus_client`` without ``_value`` fails here, when the guard is built."""
    add: Callable[[float], None] = metric._value.inc
    return add


class _Requests:
    """A client stream read under the upload timeouts with one timer for the whole call
    (``asyncio.timeout`` per message cost a timer and a context each) and no generator
    frame between the servicer and grpc's reader.

    The timer fires at the earliest moment a timeout could be due; if the read then in
    progress has waited too long, it cancels the reading task and the read raises the
    timeout's error; otherwise it is set again for the read in progress, or left off until
    the next read."""

    __slots__ = (
        "_call",
        "_cancelling",
        "_deadline",
        "_done",
        "_expired",
        "_idle",
        "_incoming",
        "_loop",
        "_task",
        "_timer",
        "_waiting_since",
    )

    def __init__(self, call: _Call, requests: AsyncIterator[Any]) -> None:
        guard = call._guard
        self._call = call
        self._incoming = aiter(requests)
        self._loop = asyncio.get_running_loop()
        self._idle = guard.upload_idle_s if guard.upload_idle_s > 0 else None
        total = guard.upload_total_s
        self._deadline = self._loop.time() + total if total > 0 else None
        self._waiting_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._expired: ServiceError | None = None
        self._done = False

    def __aiter__(self) -> _Requests:
        return self

    def _due(self, since: float) -> float:
        due = since + self._idle if self._idle is not None else math.inf
        return due if self._deadline is None else min(due, self._deadline)

    def _check(self) -> None:
        self._timer = None
        since = self._waiting_since
        if since is None or self._task is None:
            return  # not reading now: the next read sets the timer again
        now = self._loop.time()
        due = self._due(since)
        if now < due:
            self._timer = self._loop.call_at(due, self._check)
            return
        guard = self._call._guard
        if self._deadline is not None and now >= self._deadline:
            self._expired = upload_too_slow(guard.upload_total_s)
        else:
            self._expired = upload_stalled(guard.upload_idle_s)
        self._cancelling = self._task.cancelling()
        self._task.cancel()

    async def __anext__(self) -> Any:
        if self._done:  # ended, or failed: like a finished generator
            raise StopAsyncIteration
        now = self._loop.time()
        self._waiting_since = now
        if self._timer is None and (self._idle is not None or self._deadline is not None):
            self._task = asyncio.current_task()
            if self._task is not None:
                self._timer = self._loop.call_at(self._due(now), self._check)
        try:
            msg = await anext(self._incoming)
        except StopAsyncIteration:
            self.stop()
            self._call._release_upload()  # the upload is over; its job may run on
            raise
        except asyncio.CancelledError:
            self.stop()
            task, expired = self._task, self._expired
            # Our timer's cancel, and nobody else's since: the timeout's error instead.
            if expired is not None and task is not None and task.uncancel() <= self._cancelling:
                raise expired from None
            raise
        except BaseException:
            self.stop()
            raise
        finally:
            self._waiting_since = None
        if isinstance(msg, Malformed):
            self.stop()
            raise msg.error()
        return msg

    def stop(self) -> None:
        """No more reads: the timer goes (at the end, on an error, when the call ends)."""
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


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
