"""Transport: moving 64 MiB through the service against a bare grpcio bytes server.

- Read: ``ArtifactService.ReadArtifact`` of a 64 MiB artifact (a 24-bit BMP of noise, put with
  ``service.artifacts.put``), chunks of the service's ``chunk_bytes`` (1 MiB), read with the
  project's client (``AsyncClient.stream_artifact``: each chunk a view of the received
  message), against a bare server-streaming method sending the same bytes in the same chunks
  from memory (raw bytes, no protobuf: the floor of what grpcio can do). Beside them: the
  service read through the generated stub, parsed by protobuf (what any other Python gRPC
  client pays), the bare server sending the same chunks as ``ReadArtifactResponse``
  messages serialized ahead of time, parsed the same way, and the floor for a server whose
  bytes live in a file: the bare server reading each chunk from the artifact's file
  (``os.pread``, the page cache) as it sends it.
- Upload: ``TransformService.ConvertImage`` (to PNG) with the same file in 1 MiB chunks, on a
  service whose ``max_pixels`` is below the file's pixels. The server reads the whole stream
  (held in memory within ``AISERVER_SPOOL_MEMORY_MB``, the received messages kept as they
  are, with glibc's freed memory kept as ``aiserver serve`` sets it:
  ``bench.common.running_service``; else spooled to disk), then the
  header check answers RESOURCE_EXHAUSTED ``IMAGE_TOO_MANY_PIXELS``: the upload path without
  any image work. (Params are checked on arrival, so a missing ``output_format`` would
  measure a drain, not an upload.) Timed from the first message to the status. Against a
  bare client-streaming method that receives the same chunks and answers their byte count;
  beside it the floor for a server that keeps what it receives: the same method copying each
  chunk into one buffer reused from call to call (the least a service holding an upload pays).

Both servers run in this process on loopback, with the same message size limits, and the
client is the same grpc.aio channel code; the two sides alternate within every round. The
client's request messages are built, in wire form, before the clock starts, for both. 21
rounds of ~60 ms: the per-round ratios of a shared machine are heavy-tailed, and the median of
7 moved by +-0.2 from run to run (bench/README, "bytes3"). CPU/wall per side is recorded: the
bare sides run partly beside the main thread (grpc's poller thread), so their wall time gains
from a free second core that the service's extra main-thread work cannot use.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from imagetasks.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    common_pb2,
    tasks_pb2,
    transform_service_pb2,
)
from PIL import Image

from aiserver.client import AsyncClient
from bench.common import LoadWatch, encode, row, running_service, spread

NAME = "transport"
CHUNK = 1024 * 1024
MIB = 1024 * 1024


def bmp_of(size_bytes: int) -> bytes:
    """A 24-bit BMP of noise of about ``size_bytes`` (width 4096, rows to fit)."""
    width = 4096
    height = max(1, size_bytes // (width * 3))
    pixels = os.urandom(width * height * 3)
    return encode(Image.frombytes("RGB", (width, height), pixels), "BMP")


class BareServer:
    """The baseline: a grpcio server that streams bytes out and takes bytes in, nothing else."""

    def __init__(self, data: bytes, chunk: int, max_message: int) -> None:
        self.size = len(data)
        self.chunk = chunk
        self.path: Path | None = None  # a file holding ``data``, for ReadFile
        self.chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]
        # The same chunks as ReadArtifactResponse messages, serialized ahead of time.
        self.messages = [
            artifact_service_pb2.ReadArtifactResponse(data=c, offset=i * chunk).SerializeToString()
            for i, c in enumerate(self.chunks)
        ]
        self.max_message = max_message
        self.held: bytearray | None = None  # WriteHeld's buffer
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def _read(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        for c in self.chunks:
            yield c

    async def _read_messages(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        for m in self.messages:
            yield m

    async def _read_file(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        assert self.path is not None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for offset in range(0, self.size, self.chunk):
                yield os.pread(fd, self.chunk, offset)
        finally:
            os.close(fd)

    async def _write(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        total = 0
        async for c in requests:
            total += len(c)
        return str(total).encode()

    async def _write_held(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        """As ``_write``, keeping the bytes: each chunk copied into one buffer reused from
        call to call (warm memory), as a service that keeps an upload must at least do."""
        if self.held is None:
            self.held = bytearray(self.size + self.chunk)
        view = memoryview(self.held)
        total = 0
        async for c in requests:
            view[total : total + len(c)] = c
            total += len(c)
        return str(total).encode()

    async def start(self) -> None:
        options = [
            ("grpc.max_receive_message_length", self.max_message),
            ("grpc.max_send_message_length", self.max_message),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options)
        handler = grpc.method_handlers_generic_handler(
            "bench.Bytes",
            {
                "Read": grpc.unary_stream_rpc_method_handler(self._read),
                "ReadMessages": grpc.unary_stream_rpc_method_handler(self._read_messages),
                "ReadFile": grpc.unary_stream_rpc_method_handler(self._read_file),
                "Write": grpc.stream_unary_rpc_method_handler(self._write),
                "WriteHeld": grpc.stream_unary_rpc_method_handler(self._write_held),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.server = server

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(0)


async def _service_read(client: AsyncClient, name: str, size: int) -> float:
    start = time.perf_counter()
    got = 0
    async for data in client.stream_artifact(name):
        got += len(data)
    elapsed = time.perf_counter() - start
    if got != size:
        raise RuntimeError(f"ReadArtifact returned {got} bytes, expected {size}")
    return elapsed


async def _service_read_stub(stub: Any, name: str, size: int) -> float:
    """The generated stub: protobuf parses each message, ``.data`` copies the bytes out."""
    start = time.perf_counter()
    got = 0
    async for msg in stub.ReadArtifact(artifact_service_pb2.ReadArtifactRequest(name=name)):
        got += len(msg.data)
    elapsed = time.perf_counter() - start
    if got != size:
        raise RuntimeError(f"ReadArtifact (stub) returned {got} bytes, expected {size}")
    return elapsed


async def _bare_read(channel: grpc.aio.Channel, size: int, method: str = "Read") -> float:
    call = channel.unary_stream(f"/bench.Bytes/{method}")
    start = time.perf_counter()
    got = 0
    async for data in call(b""):
        got += len(data)
    elapsed = time.perf_counter() - start
    if got != size:
        raise RuntimeError(f"bare read returned {got} bytes, expected {size}")
    return elapsed


async def _bare_read_parsed(channel: grpc.aio.Channel, size: int) -> float:
    """The bare server's chunks as protobuf messages, parsed as the service's client does."""
    call = channel.unary_stream(
        "/bench.Bytes/ReadMessages",
        response_deserializer=artifact_service_pb2.ReadArtifactResponse.FromString,
    )
    start = time.perf_counter()
    got = 0
    async for msg in call(b""):
        got += len(msg.data)
    elapsed = time.perf_counter() - start
    if got != size:
        raise RuntimeError(f"bare parsed read returned {got} bytes, expected {size}")
    return elapsed


async def _service_upload(channel: grpc.aio.Channel, messages: list[bytes]) -> float:
    # The messages are in wire form already, as the bare side's are raw bytes: the client's
    # serialization (a upb copy of every MiB) is not the service's cost.
    method = channel.stream_stream(
        "/imagetasks.v1.TransformService/ConvertImage",
        response_deserializer=transform_service_pb2.ConvertImageResponse.FromString,
    )
    start = time.perf_counter()
    call = method()
    for m in messages:
        await call.write(m)
    await call.done_writing()
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or "pixels" not in (
            err.details() or ""
        ):
            raise
    else:
        raise RuntimeError("the upload was expected to end with IMAGE_TOO_MANY_PIXELS")
    return time.perf_counter() - start


async def _bare_upload(
    channel: grpc.aio.Channel, chunks: list[bytes], method_name: str = "Write"
) -> float:
    method = channel.stream_unary(f"/bench.Bytes/{method_name}")
    start = time.perf_counter()
    call = method()
    for c in chunks:
        await call.write(c)
    await call.done_writing()
    answer = await call
    elapsed = time.perf_counter() - start
    if int(answer) != sum(len(c) for c in chunks):
        raise RuntimeError("bare upload lost bytes")
    return elapsed


async def _run(quick: bool) -> dict[str, Any]:
    size = (8 if quick else 64) * MIB
    reps = 3 if quick else 21
    tmp = Path(tempfile.mkdtemp(prefix="bench-transport-"))
    data = bmp_of(size)
    chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    upload_messages = [
        m.SerializeToString()
        for m in [
            transform_service_pb2.ConvertImageRequest(
                params=tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
            )
        ]
        + [
            transform_service_pb2.ConvertImageRequest(
                chunk=common_pb2.FileChunk(field="image", data=c, file_name="big.bmp")
            )
            for c in chunks
        ]
    ]
    times: dict[str, list[float]] = {
        "service_read": [],
        "service_read_stub": [],
        "bare_read": [],
        "bare_read_parsed": [],
        "bare_read_file": [],
        "service_upload": [],
        "bare_upload": [],
        "bare_upload_held": [],
    }
    cpu: dict[str, list[float]] = {key: [] for key in times}  # process CPU, every thread
    try:
        pixels = len(data) // 3
        async with running_service(
            tmp / "service",
            max_upload_bytes=size * 2,
            chunk_bytes=CHUNK,
            http_enabled=False,
            max_pixels=pixels // 2,  # refused by the header check once received
        ) as service:
            ref = await service.artifacts.put(
                data,
                file_name="big.bmp",
                mime_type="image/bmp",
                width=4096,
                height=len(data) // (4096 * 3),
                seed=None,
                provider="bench",
                job_id="bench",
                owner="",
            )
            bare = BareServer(data, CHUNK, service.settings.max_message_bytes)
            bare.path = tmp / "bare.bmp"
            bare.path.write_bytes(data)
            await bare.start()
            options = [("grpc.max_receive_message_length", service.settings.max_message_bytes)]
            async with (
                grpc.aio.insecure_channel(
                    f"127.0.0.1:{service.grpc_port}", options=options
                ) as svc_channel,
                grpc.aio.insecure_channel(f"127.0.0.1:{bare.port}", options=options) as bare_ch,
            ):
                artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(svc_channel)
                client = AsyncClient(channel=svc_channel)
                steps = {
                    "service_read": lambda: _service_read(client, ref.name, len(data)),
                    "service_read_stub": lambda: _service_read_stub(artifacts, ref.name, len(data)),
                    "bare_read": lambda: _bare_read(bare_ch, len(data)),
                    "bare_read_parsed": lambda: _bare_read_parsed(bare_ch, len(data)),
                    "bare_read_file": lambda: _bare_read(bare_ch, len(data), "ReadFile"),
                    "service_upload": lambda: _service_upload(svc_channel, upload_messages),
                    "bare_upload": lambda: _bare_upload(bare_ch, chunks),
                    "bare_upload_held": lambda: _bare_upload(bare_ch, chunks, "WriteHeld"),
                }
                for step in steps.values():  # warm-up
                    await step()
                for rep in range(reps):
                    for kind in ("read", "upload"):
                        pair = [f"service_{kind}", f"bare_{kind}"]
                        if kind == "read":
                            pair += ["service_read_stub", "bare_read_parsed", "bare_read_file"]
                        else:
                            pair += ["bare_upload_held"]
                        for key in pair if rep % 2 == 0 else pair[::-1]:
                            cpu_start = time.process_time()
                            times[key].append(await steps[key]())
                            cpu[key].append(time.process_time() - cpu_start)
            await bare.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mb = len(data) / 1e6
    figures: dict[str, Any] = {k: spread([mb / t for t in v], 1) for k, v in times.items()}
    figures["cpu_ms"] = {k: spread([t * 1000 for t in v], 1) for k, v in cpu.items()}
    for kind in ("read", "upload"):
        ratios = [
            b / s for s, b in zip(times[f"service_{kind}"], times[f"bare_{kind}"], strict=True)
        ]
        figures[f"{kind}_ratio"] = spread(ratios, 3)
        figures[f"{kind}_cpu_ratio"] = spread(
            [b / s for s, b in zip(cpu[f"service_{kind}"], cpu[f"bare_{kind}"], strict=True)], 3
        )
    figures["read_ratio_to_parsed"] = spread(
        [b / s for s, b in zip(times["service_read"], times["bare_read_parsed"], strict=True)], 3
    )
    figures["read_file_ratio"] = spread(
        [b / s for s, b in zip(times["bare_read_file"], times["bare_read"], strict=True)], 3
    )
    figures["upload_held_ratio"] = spread(
        [b / h for h, b in zip(times["bare_upload_held"], times["bare_upload"], strict=True)], 3
    )
    figures["upload_held_cpu_ratio"] = spread(
        [b / h for h, b in zip(cpu["bare_upload_held"], cpu["bare_upload"], strict=True)], 3
    )
    # CPU seconds per wall second: how much of each side ran beside the main thread (grpc's
    # poller thread reads the socket and frames messages without the GIL).
    figures["parallelism"] = {
        k: spread([c / t for c, t in zip(cpu[k], times[k], strict=True)], 2)
        for k in ("service_upload", "bare_upload", "service_read", "bare_read")
    }
    figures["read_stub_ratio"] = spread(
        [b / s for s, b in zip(times["service_read_stub"], times["bare_read"], strict=True)], 3
    )
    rows = [
        row(
            f"transport: ReadArtifact {size // MIB} MiB vs bare grpcio",
            figures["read_ratio"],
            "x",
            target=0.9,
            baseline=f"service {figures['service_read']['median']:.0f} MB/s,"
            f" bare {figures['bare_read']['median']:.0f} MB/s",
            note=f"{reps} rounds; the project's client (chunks as views of the messages); in"
            " process CPU"
            f" {figures['read_cpu_ratio']['median']:.3f}x; through the"
            f" generated stub (protobuf parse): {figures['service_read_stub']['median']:.0f}"
            f" MB/s, {figures['read_stub_ratio']['median']:.3f}x; bare server sending the same"
            " ReadArtifactResponse messages, parsed by protobuf:"
            f" {figures['bare_read_parsed']['median']:.0f} MB/s; floor, bare server reading"
            f" its chunks from a file: {figures['bare_read_file']['median']:.0f} MB/s,"
            f" {figures['read_file_ratio']['median']:.3f}x",
        ),
        row(
            f"transport: upload {size // MIB} MiB vs bare grpcio",
            figures["upload_ratio"],
            "x",
            target=0.8,
            baseline=f"service {figures['service_upload']['median']:.0f} MB/s,"
            f" bare {figures['bare_upload']['median']:.0f} MB/s",
            note="ConvertImage: read + held or spooled, then IMAGE_TOO_MANY_PIXELS (no image"
            f" work); {reps} rounds; in process CPU {figures['upload_cpu_ratio']['median']:.3f}x;"
            " floor, the bare server keeping the bytes (a copy into one warm buffer):"
            f" {figures['bare_upload_held']['median']:.0f} MB/s,"
            f" {figures['upload_held_ratio']['median']:.3f}x (CPU"
            f" {figures['upload_held_cpu_ratio']['median']:.3f}x); CPU/wall service"
            f" {figures['parallelism']['service_upload']['median']:.2f}, bare"
            f" {figures['parallelism']['bare_upload']['median']:.2f}",
        ),
    ]
    return {
        "name": NAME,
        "about": __doc__.strip().split("\n\n")[0],
        "setup": {
            "bytes": len(data),
            "chunk_bytes": CHUNK,
            "rounds": reps,
            "service_process": "the bench process (client and both servers)",
            "units": "MB/s (10^6 bytes); ratio = bare time / service time, per round;"
            " cpu_ms: process CPU per operation (all threads: client and servers)",
        },
        "figures": figures,
        "rows": rows,
    }


def run(quick: bool) -> dict[str, Any]:
    watch = LoadWatch()
    result = asyncio.run(_run(quick))
    result["load"] = watch.done()
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
