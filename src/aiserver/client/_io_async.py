"""What the asyncio client does differently from the blocking one: a ``grpc.aio`` channel,
uploads written by the caller, and file I/O moved off the event loop.

``_async.py`` imports these names; ``tools/gen_sync_client.py`` points the generated
``_sync.py`` at :mod:`aiserver.client._io_sync`, which has the same names.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from imagetasks.v1 import (
    artifact_service_pb2_grpc,
    generation_service_pb2_grpc,
    job_service_pb2_grpc,
    transform_service_pb2_grpc,
    workflow_service_pb2_grpc,
)
from imagetasks.v1.artifact_service_pb2 import ReadArtifactRequest

from aiserver.client._chunks import READ_ARTIFACT, read_chunk
from aiserver.client._uploads import UPLOADS, serialize
from aiserver.client.inputs import CHUNK_SIZE, InputSource, OutputSink

__all__ = [
    "DEFAULT_TIMEOUT",
    "Stubs",
    "open_channel",
    "open_stream",
    "send_requests",
    "sink_commit",
    "sink_write",
    "source_chunks",
    "stubs_on",
]

DEFAULT_TIMEOUT: float | None = None
"""The deadline of a call that names none, on a client made without one: none."""


@dataclass(frozen=True, slots=True)
class Stubs:
    """The contract's services on one channel, as mypy-protobuf's typed stubs."""

    generation: generation_service_pb2_grpc.GenerationServiceAsyncStub
    transform: transform_service_pb2_grpc.TransformServiceAsyncStub
    jobs: job_service_pb2_grpc.JobServiceAsyncStub
    artifacts: artifact_service_pb2_grpc.ArtifactServiceAsyncStub
    workflows: workflow_service_pb2_grpc.WorkflowServiceAsyncStub
    read_artifact: Any
    """ReadArtifact answering :class:`~aiserver.client._chunks.ArtifactChunk` views."""
    uploads: dict[str, Any]
    """Each upload method by name, sending chunk messages in wire form as they are."""


def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
) -> grpc.aio.Channel:
    """A channel to ``target``, with TLS when there are ``credentials``."""
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)


def stubs_on(channel: grpc.aio.Channel) -> Stubs:
    # The generated stubs are typed per channel kind (types-grpcio): an aio channel gives
    # the ``*AsyncStub`` types.
    return Stubs(
        generation_service_pb2_grpc.GenerationServiceStub(channel),
        transform_service_pb2_grpc.TransformServiceStub(channel),
        job_service_pb2_grpc.JobServiceStub(channel),
        artifact_service_pb2_grpc.ArtifactServiceStub(channel),
        workflow_service_pb2_grpc.WorkflowServiceStub(channel),
        channel.unary_stream(
            READ_ARTIFACT,
            request_serializer=ReadArtifactRequest.SerializeToString,
            response_deserializer=read_chunk,
        ),
        {
            name: channel.stream_stream(
                path, request_serializer=serialize, response_deserializer=response.FromString
            )
            for name, (path, response) in UPLOADS.items()
        },
    )


def open_stream(
    method: Any,
    requests: AsyncIterator[Any],
    *,
    metadata: Sequence[tuple[str, str]],
    timeout: float | None,
) -> Any:
    """A client-streaming call; :func:`send_requests` writes ``requests`` into it."""
    return method(metadata=metadata, timeout=timeout)


async def send_requests(call: Any, requests: AsyncIterator[Any]) -> None:
    """Writes every request, then half-closes.

    Stops quietly when the server ends the call early (a rejected upload): its status is
    read from the response side. (Handing grpc.aio a request iterator instead hides that
    status behind a local INTERNAL error.)
    """
    async for message in requests:
        if call.done():
            return
        try:
            await call.write(message)
        except Exception:
            if call.done():
                return
            raise
    if not call.done():
        await call.done_writing()


async def source_chunks(source: InputSource) -> AsyncIterator[bytes | memoryview]:
    """``source``'s chunks, each read in a worker thread."""
    chunks = source.chunks(CHUNK_SIZE)
    while (data := await asyncio.to_thread(next, chunks, None)) is not None:
        yield data


async def sink_write(sink: OutputSink, data: bytes | memoryview) -> None:
    await asyncio.to_thread(sink.write, data)


async def sink_commit(sink: OutputSink) -> None:
    await asyncio.to_thread(sink.commit)
