"""Domain errors -> ``google.rpc.Status`` with ErrorInfo, BadRequest and RetryInfo: one place."""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from aiserver.api.calls import current_call
from aiserver.api.validation import check_request
from aiserver.errors import DOMAIN, ErrorKind, ServiceError
from aiserver.logs import request_id_var
from aiserver.outage import backend_outage

__all__ = ["abort", "request_id_of", "rpc", "to_status_proto"]

logger = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])


MAX_MESSAGE_CHARS = 1024
MAX_DETAIL_CHARS = 256
MAX_VIOLATIONS = 32


def _clip(text: str, limit: int) -> str:
    # Messages may quote the request; trailers are capped (16 KiB by default, both ways), and
    # an error that cannot be delivered is worse than a shortened one.
    return text if len(text) <= limit else text[: limit - 3] + "..."


def to_status_proto(err: ServiceError) -> status_pb2.Status:
    """The ``google.rpc.Status`` for a domain error (also stored on failed jobs).

    Texts are clipped (messages to 1024 characters, metadata and violations to 256, at most
    32 violations), so that an error quoting a huge request still fits in the trailers."""
    metadata = {
        _clip(k, MAX_DETAIL_CHARS): _clip(v, MAX_DETAIL_CHARS)
        for k, v in list(err.metadata.items())[:MAX_VIOLATIONS]
    }
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=metadata)
    details = [_pack(info)]
    if err.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=_clip(v.field, MAX_DETAIL_CHARS),
                    description=_clip(v.description, MAX_DETAIL_CHARS),
                )
                for v in err.violations[:MAX_VIOLATIONS]
            ]
        )
        details.append(_pack(bad))
    if err.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(err.retry_after_s * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(
        code=getattr(code_pb2, err.kind.value),
        message=_clip(err.message, MAX_MESSAGE_CHARS),
        details=details,
    )


def _pack(msg: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg)
    return packed


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    """End the call with ``exc`` as a rich status (an unexpected exception: INTERNAL)."""
    outage = None if isinstance(exc, ServiceError) else backend_outage(exc)
    if isinstance(exc, ServiceError):
        err = exc
        logger.info("rpc failed: %s", err)
    elif outage is not None:
        err = outage
        logger.warning("rpc failed: %s (%s: %s)", err, type(exc).__name__, exc)
    else:
        logger.exception("unexpected error", exc_info=exc)
        err = ServiceError(ErrorKind.INTERNAL, "INTERNAL", "internal error; see the server log")
    info = current_call.get()
    if info is not None:
        info.failed(err.kind.value, err.reason)
    await context.abort_with_status(rpc_status.to_status(to_status_proto(err)))


def request_id_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The caller's ``x-request-id`` when it is short and printable (it goes into every log
    line), else a new one."""
    given: object = ""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id":
            given = value  # the last one, as before
    if isinstance(given, str) and 0 < len(given) <= 64 and given.isprintable():
        return given
    return os.urandom(8).hex()  # 16 hex digits, as uuid4().hex[:16] at a seventh of its cost


def _enter(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    info = current_call.get()
    if info is not None:  # the interceptor has done it
        request_id_var.set(info.request_id)
        return
    rid = request_id_of(context)
    request_id_var.set(rid)
    context.set_trailing_metadata((("x-request-id", rid),))


def rpc(method: _F) -> _F:
    """Wrap a servicer method: request id, the request checked against the contract's rules
    (:mod:`aiserver.api.validation`), and every exception turned into a rich status.

    Works for unary handlers (coroutines) and server-streaming ones (async generators); a
    client stream's messages are checked where they are read (``api.uploads``).
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            _enter(context)
            try:
                if isinstance(request, Message):
                    check_request(request)
                async for item in method(self, request, context):
                    yield item
            except (ServiceError, Exception) as exc:
                if _is_control_flow(exc):
                    raise
                await abort(context, exc)

        return cast(_F, stream)

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: Any) -> Any:
        _enter(context)
        try:
            if isinstance(request, Message):
                check_request(request)
            return await cast(Callable[..., Awaitable[Any]], method)(self, request, context)
        except (ServiceError, Exception) as exc:
            if _is_control_flow(exc):
                raise
            await abort(context, exc)

    return cast(_F, unary)


def _is_control_flow(exc: BaseException) -> bool:
    # context.abort() raises AbortError; let it (and cancellation) through untouched.
    return isinstance(exc, grpc.aio.AbortError)
