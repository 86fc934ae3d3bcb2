"""Request bytes protobuf cannot parse, on every RPC of every service, through a real channel
with a raw-bytes serializer: INVALID_ARGUMENT ``MALFORMED_MESSAGE`` naming the field when it
can be told, never INTERNAL, and no ERROR in the log."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from imagetasks.v1 import (
    agent_service_pb2,
    artifact_service_pb2,
    generation_service_pb2,
    job_service_pb2,
    transform_service_pb2,
)

from aiserver.server import Service
from tests.support.grpc_helpers import rich_status, violated_fields

FD = descriptor.FieldDescriptor
SERVICES = [
    s
    for module in (
        transform_service_pb2,
        generation_service_pb2,
        job_service_pb2,
        artifact_service_pb2,
        agent_service_pb2,
    )
    for s in module.DESCRIPTOR.services_by_name.values()
] + [
    health_pb2.DESCRIPTOR.services_by_name["Health"],
    reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
]
NOT_UTF8 = b"ok\xff\xfe\xc3("


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _delimited(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bad_strings(desc: descriptor.Descriptor, depth: int = 0) -> Iterator[tuple[str, bytes]]:
    """(field path, message bytes with invalid UTF-8 in that string field), for every string
    field reachable from ``desc`` through singular or repeated message fields."""
    for f in desc.fields:
        if f.type == FD.TYPE_STRING:
            yield f.name, _delimited(f.number, NOT_UTF8)
        elif f.type == FD.TYPE_MESSAGE and depth < 3:
            if f.message_type.GetOptions().map_entry:
                continue
            for path, inner in bad_strings(f.message_type, depth + 1):
                yield f"{f.name}.{path}", _delimited(f.number, inner)


def cases(method: descriptor.MethodDescriptor) -> list[tuple[str, bytes, str | None]]:
    """(label, request bytes, the field the answer must name or None)."""
    found: list[tuple[str, bytes, str | None]] = [
        ("garbage", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", None),
        ("truncated", _varint(1 << 3 | 2) + _varint(40) + b"short", None),
        ("bad wire type", b"\x0f\x00", None),
    ]
    found += [(f"utf-8 {path}", data, path) for path, data in bad_strings(method.input_type)]
    return found


def multicallable(channel: grpc.aio.Channel, method: descriptor.MethodDescriptor) -> Any:
    path = f"/{method.containing_service.full_name}/{method.name}"
    factory = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    return factory(path)  # no serializers: bytes go out as given


async def call_raw(
    channel: grpc.aio.Channel, method: descriptor.MethodDescriptor, data: bytes
) -> Any:
    call = multicallable(channel, method)
    request: Any = iter([data]) if method.client_streaming else data
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        result = call(request, timeout=20)
        if method.server_streaming:
            async for _ in result:
                pass
        else:
            await result
    return caught.value


def test_every_service_has_methods_and_string_fields() -> None:
    methods = [m for s in SERVICES for m in s.methods]
    assert len(methods) >= 15
    assert sum(len(cases(m)) - 3 for m in methods) >= 30  # utf-8 cases exist for many fields


async def test_malformed_messages_are_invalid_argument_on_every_rpc(
    service: Service, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    calls = [
        (m, label, data, field)
        for s in SERVICES
        for m in s.methods
        for label, data, field in cases(m)
    ]
    for start in range(0, len(calls), 16):
        batch = calls[start : start + 16]
        errors = await asyncio.gather(*(call_raw(channel, m, data) for m, _, data, _ in batch))
        for (m, label, _, field), err in zip(batch, errors, strict=True):
            where = f"{m.full_name} {label}"
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (where, err.details())
            _, details = rich_status(err)
            assert details["ErrorInfo"].reason == "MALFORMED_MESSAGE", where
            if field is not None:
                assert violated_fields(details) == [field], where
                assert field in (err.details() or ""), where
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]
    # And the service still serves.
    ok = await multicallable(
        channel, health_pb2.DESCRIPTOR.services_by_name["Health"].methods_by_name["Check"]
    )(b"", timeout=5)
    assert (
        health_pb2.HealthCheckResponse.FromString(ok).status
        == health_pb2.HealthCheckResponse.SERVING
    )


async def test_a_malformed_message_after_good_ones_ends_an_upload(
    service: Service, channel: grpc.aio.Channel
) -> None:
    crop = transform_service_pb2.DESCRIPTOR.services_by_name["TransformService"].methods_by_name[
        "CropImage"
    ]
    params = transform_service_pb2.CropImageRequest()
    params.params.width = params.params.height = 4  # valid (checked on arrival)
    good = params.SerializeToString()
    chunk = _delimited(2, _delimited(3, NOT_UTF8))  # chunk.file_name
    call = multicallable(channel, crop)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call(iter([good, chunk]), timeout=20):
            pass
    err = caught.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, details = rich_status(err)
    assert details["ErrorInfo"].reason == "MALFORMED_MESSAGE"
    field = transform_service_pb2.CropImageRequest.DESCRIPTOR.fields_by_number[2]
    assert violated_fields(details) == [
        f"{field.name}.{field.message_type.fields_by_number[3].name}"
    ]
    assert not list((service.spool.tmp_dir).iterdir())
