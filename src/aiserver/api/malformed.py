"""Request messages protobuf cannot parse: caught at deserialization, answered as the caller's
mistake (INVALID_ARGUMENT ``MALFORMED_MESSAGE``, naming the field when it can be told).

grpcio deserializes a request before any handler runs; a parse error raised there (protobuf's
``DecodeError``, or ``UnicodeDecodeError`` for a ``string`` field that is not UTF-8 under some
backends) would end the call with INTERNAL and an ERROR traceback. :func:`tolerant` wraps a
deserializer so that it returns a :class:`Malformed` value instead, which the interceptor turns
into the status (:func:`tolerant_handler` does both for a handler the interceptor otherwise
leaves alone). :func:`locate` walks the wire format to say which field is at fault.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor

from aiserver.api.status import abort
from aiserver.errors import ErrorKind, FieldViolation, ServiceError

__all__ = ["Malformed", "locate", "tolerant", "tolerant_handler"]

FD = descriptor.FieldDescriptor
_MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Malformed:
    """A request that could not be parsed: the bytes and the message type expected."""

    data: bytes
    message_type: descriptor.Descriptor | None

    def error(self) -> ServiceError:
        found = locate(self.message_type, self.data) if self.message_type is not None else None
        if found is None:
            return ServiceError(
                ErrorKind.INVALID_ARGUMENT,
                "MALFORMED_MESSAGE",
                "the request message cannot be parsed (truncated, or not protobuf)",
            )
        path, problem = found
        return ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            "MALFORMED_MESSAGE",
            f"the request message cannot be parsed: {path or 'the message'}: {problem}",
            violations=(FieldViolation(path, problem),) if path else (),
            metadata={"field": path} if path else {},
        )


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer``, returning :class:`Malformed` where it would raise."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)  # ``SomeRequest.FromString``
    message_type = getattr(owner, "DESCRIPTOR", None)
    if not isinstance(message_type, descriptor.Descriptor):
        message_type = None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # DecodeError, UnicodeDecodeError, RuntimeWarning-turned-errors
            return Malformed(bytes(data), message_type)

    return parse


class _Truncated(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Truncated
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def locate(desc: descriptor.Descriptor | None, data: bytes) -> tuple[str, str] | None:
    """(field path, what is wrong) of the first defect in ``data`` read as ``desc``, or None
    when the bytes read cleanly (the fault is then not one this walk can tell)."""
    return _walk(desc, data, "", 0)


def _walk(
    desc: descriptor.Descriptor | None, data: bytes, prefix: str, depth: int
) -> tuple[str, str] | None:
    pos = 0
    name = prefix.rstrip(".")
    while pos < len(data):
        try:
            tag, pos = _varint(data, pos)
        except _Truncated:
            return name, "truncated field tag"
        number, wire = tag >> 3, tag & 7
        field = desc.fields_by_number.get(number) if desc is not None else None
        name = prefix + (field.name if field is not None else f"#{number}")
        if number == 0:
            return name, "invalid field number 0"
        try:
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
                if pos > len(data):
                    raise _Truncated
            elif wire == 2:
                length, pos = _varint(data, pos)
                if pos + length > len(data):
                    raise _Truncated
                value = data[pos : pos + length]
                pos += length
                found = _check(field, value, name, depth)
                if found is not None:
                    return found
            else:
                return name, f"unsupported wire type {wire}"
        except _Truncated:
            return name, "truncated"
    return None


def _check(field: FD | None, value: bytes, name: str, depth: int) -> tuple[str, str] | None:
    if field is None:
        return None
    if field.type == FD.TYPE_STRING:
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return name, "not valid UTF-8"
    elif field.type == FD.TYPE_MESSAGE and depth < _MAX_DEPTH:
        return _walk(field.message_type, value, name + ".", depth + 1)
    return None


def tolerant_handler(handler: Any) -> Any:
    """A handler the interceptor does not otherwise wrap (health, reflection), with a
    deserializer that cannot raise and a check that answers a malformed request with
    INVALID_ARGUMENT. A synchronous client-streaming handler is left as it is."""
    if handler.request_streaming:
        return _tolerant_stream_handler(handler)
    options = {
        "request_deserializer": tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }

    async def check(request: Any, context: Any) -> Any:
        if isinstance(request, Malformed):
            await abort(context, request.error())
        return request

    if handler.response_streaming:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            result = inner_us(await check(request, context), context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:
                await result

        return grpc.unary_stream_rpc_method_handler(unary_stream, **options)
    inner_uu = handler.unary_unary

    async def unary_unary(request: Any, context: Any) -> Any:
        return await inner_uu(await check(request, context), context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, **options)


def _tolerant_stream_handler(handler: Any) -> Any:
    inner = handler.stream_stream if handler.response_streaming else handler.stream_unary
    if not (inspect.isasyncgenfunction(inner) or inspect.iscoroutinefunction(inner)):
        return handler  # grpc runs it in a thread, on a synchronous iterator
    options = {
        "request_deserializer": tolerant(handler.request_deserializer),
        "response_serializer": handler.response_serializer,
    }

    async def checked(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for msg in requests:
            if isinstance(msg, Malformed):
                await abort(context, msg.error())
            yield msg

    if handler.response_streaming:

        async def stream_stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            result = inner(checked(requests, context), context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:
                await result

        return grpc.stream_stream_rpc_method_handler(stream_stream, **options)

    async def stream_unary(requests: Any, context: Any) -> Any:
        return await inner(checked(requests, context), context)

    return grpc.stream_unary_rpc_method_handler(stream_unary, **options)
