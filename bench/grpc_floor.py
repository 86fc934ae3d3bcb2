"""The floor of the service's gRPC edge: a bare grpc aio server doing one job's messages per call.

    python -m bench.grpc_floor [--rounds 6] [--calls 2000] [--concurrency 16]

The service's ImageUpscale (SYNC, references) reads 2 request messages (params, the input's
chunk) and the end of the stream, writes 4 response messages (accepted, progress, output,
finished) and the status. A bare server does the same with no work in between: a generic
stream-stream method on bytes (no protobuf), its own process, so its CPU per call read from
``/proc`` is grpc aio's (Cython, C-core, asyncio) alone. The callers are a grpc aio client in
this process, sending the same request bytes the bench's service callers send (a 32 px PNG).
Beside it, the same method writing 1 response message, to split the per-call cost from the
per-message one. Prints per-round server CPU µs per call and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from imagetasks.v1 import common_pb2, tasks_pb2
from imagetasks.v1 import generation_service_pb2 as gpb

from bench import ROOT
from bench.client_loop import Inputs, JobFn
from bench.common import cpu_seconds, quit_child

# Response sizes near the service's (references, not bytes, in the output and finished events).
_RESPONSES = (b"a" * 80, b"p" * 90, b"o" * 400, b"f" * 900)
_METHODS = {"Job4": _RESPONSES, "Job1": _RESPONSES[-1:]}


def _handler(responses: tuple[bytes, ...]) -> Any:
    async def call(requests: AsyncIterator[bytes], _context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:  # params, chunk, then the end of the stream
            pass
        for message in responses:
            yield message

    return grpc.stream_stream_rpc_method_handler(call)


async def _serve() -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handlers = {name: _handler(responses) for name, responses in _METHODS.items()}
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Floor", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"port": port, "pid": os.getpid()}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # until the parent closes our stdin
    await server.stop(0)


def _requests() -> list[bytes]:
    params = tasks_pb2.ImageUpscaleParams(
        options=common_pb2.JobOptions(
            mode=common_pb2.RESPONSE_MODE_SYNC, delivery=common_pb2.OUTPUT_DELIVERY_REFERENCES
        )
    )
    png = Inputs().take(1)[0]
    chunk = common_pb2.FileChunk(field="image", data=png, file_name="input.png")
    return [
        gpb.ImageUpscaleRequest(params=params).SerializeToString(),
        gpb.ImageUpscaleRequest(chunk=chunk).SerializeToString(),
    ]


def floor_job(channel: grpc.aio.Channel, method: str = "Job4") -> JobFn:
    """A :data:`bench.client_loop.JobFn` doing one floor call with the job's PNG in its chunk
    (the same request bytes the service's callers send), for :func:`client_loop._segment`."""
    stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
        f"/bench.Floor/{method}"
    )
    params = _requests()[0]
    keys = itertools.count()

    async def job(_index: int, png: bytes) -> tuple[str, float]:
        chunk = common_pb2.FileChunk(field="image", data=png, file_name="input.png")
        call = stream()
        await call.write(params)
        await call.write(gpb.ImageUpscaleRequest(chunk=chunk).SerializeToString())
        await call.done_writing()
        async for _response in call:
            pass
        return str(next(keys)), time.perf_counter()

    return job


class FloorServer:
    """The bare server in its own process (``--serve``): ``target`` and ``pid`` once entered."""

    def __init__(self) -> None:
        self.target = ""
        self.pid = 0
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> FloorServer:
        self._proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "bench.grpc_floor", "--serve"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
        )
        assert self._proc.stdout is not None
        info = json.loads(await self._proc.stdout.readline())
        self.target, self.pid = f"127.0.0.1:{info['port']}", int(info["pid"])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await quit_child(self._proc, 20)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)


async def _segment(channel: grpc.aio.Channel, method: str, calls: int, concurrency: int) -> None:
    stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
        f"/bench.Floor/{method}"
    )
    requests = _requests()
    left = iter(range(calls))

    async def caller() -> None:
        for _ in left:
            call = stream()
            for message in requests:
                await call.write(message)
            await call.done_writing()
            async for _response in call:
                pass

    await asyncio.gather(*(caller() for _ in range(concurrency)))


async def _run(port: int, pid: int, rounds: int, calls: int, concurrency: int) -> str:
    per_call: dict[str, list[float]] = {name: [] for name in _METHODS}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        for name in _METHODS:  # warm-up
            await _segment(channel, name, 200, concurrency)
        for r in range(rounds):
            order = list(_METHODS) if r % 2 == 0 else list(reversed(_METHODS))
            for name in order:
                before = cpu_seconds(pid)
                await _segment(channel, name, calls, concurrency)
                per_call[name].append((cpu_seconds(pid) - before) / calls * 1e6)
    lines = [
        f"bare grpc aio server CPU µs per call, {rounds} rounds x {calls} calls, "
        f"{concurrency} callers; 2 request messages + end of stream, N responses + status"
    ]
    for name, values in per_call.items():
        shown = " ".join(f"{v:.0f}" for v in values)
        lines.append(f"{name}: median {statistics.median(values):.0f} [{shown}]")
    four, one = (statistics.median(per_call[n]) for n in ("Job4", "Job1"))
    lines.append(f"per extra response message: {(four - one) / 3:.0f} µs")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(_serve())
        return
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_floor", "--serve"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert server.stdout is not None and server.stdin is not None
    try:
        info = json.loads(server.stdout.readline())
        print(
            asyncio.run(_run(info["port"], info["pid"], args.rounds, args.calls, args.concurrency))
        )
    finally:
        server.stdin.close()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
