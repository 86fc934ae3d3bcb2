"""What the blocking client does differently from the asyncio one: a blocking grpc channel,
uploads pulled by grpc from an iterator, file I/O in the caller's thread, and a default
deadline, so that no call blocks forever (as with grpc's own blocking stubs, a per-call
``timeout`` overrides it).

The same names as :mod:`aiserver.client._io_async`; the generated ``_sync.py`` imports them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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

DEFAULT_TIMEOUT: float | None = 300.0
"""The deadline, in seconds, of a call that names none, on a client made without one."""


@dataclass(frozen=True, slots=True)
class Stubs:
    """The contract's services on one channel, as mypy-protobuf's typed stubs."""

    generation: generation_service_pb2_grpc.GenerationServiceStub
    transform: transform_service_pb2_grpc.TransformServiceStub
    jobs: job_service_pb2_grpc.JobServiceStub
    artifacts: artifact_service_pb2_grpc.ArtifactServiceStub
    workflows: workflow_service_pb2_grpc.WorkflowServiceStub
    read_artifact: Any
    """ReadArtifact answering :class:`~aiserver.client._chunks.ArtifactChunk` views."""
    uploads: dict[str, Any]
    """Each upload method by name, sending chunk messages in wire form as they are."""


def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]]
) -> grpc.Channel:
    """A channel to ``target``, with TLS when there are ``credentials``."""
    if credentials is not None:
        return grpc.secure_channel(target, credentials, options=options)
    return grpc.insecure_channel(target, options=options)


def stubs_on(channel: grpc.Channel) -> Stubs:
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
    requests: Iterator[Any],
    *,
    metadata: Sequence[tuple[str, str]],
    timeout: float | None,
) -> Any:
    """A client-streaming call; grpc's own thread pulls ``requests`` as the call runs, and
    stops when the server ends the call early (its status is then read from the responses)."""
    return method(requests, metadata=metadata, timeout=timeout)


def send_requests(call: Any, requests: Iterator[Any]) -> None:
    """Nothing to do: :func:`open_stream` handed ``requests`` to grpc."""


def source_chunks(source: InputSource) -> Iterator[bytes | memoryview]:
    return source.chunks(CHUNK_SIZE)


def sink_write(sink: OutputSink, data: bytes | memoryview) -> None:
    sink.write(data)


def sink_commit(sink: OutputSink) -> None:
    sink.commit()
