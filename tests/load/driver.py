"""A bounded loopback load: many concurrent streaming callers against one server.

Each caller repeats a streaming call until the time is up: ConvertImage (a bidirectional
stream: params and the image's bytes in, ``info`` and chunks out) and, with ``upscale_share``,
ImageUpscale through a ComfyUI agent (a job: events and output bytes streamed back). Every
failed call is an error; the result carries counts, latency percentiles and throughput.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from imagetasks.v1 import (
    common_pb2,
    generation_service_pb2,
    generation_service_pb2_grpc,
    tasks_pb2,
    transform_service_pb2,
    transform_service_pb2_grpc,
)

from tests.support.images import encode, quadrant_image

__all__ = ["LoadResult", "run_load"]

PNG = encode(quadrant_image(32, 24), "PNG")


@dataclass
class LoadResult:
    callers: int
    seconds: float
    calls: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def summary(self) -> str:
        rate = self.calls / self.elapsed if self.elapsed else 0.0
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.by_kind.items()))
        return (
            f"{self.callers} callers x {self.seconds:g} s: {self.calls} calls ({kinds}), "
            f"{len(self.errors)} errors, {rate:.0f} calls/s, latency p50 "
            f"{self.percentile(50) * 1000:.0f} ms, p99 {self.percentile(99) * 1000:.0f} ms, "
            f"max {max(self.latencies, default=0) * 1000:.0f} ms, wall {self.elapsed:.1f} s"
        )


async def _convert(stub: transform_service_pb2_grpc.TransformServiceStub, md: Sequence) -> None:
    call = stub.ConvertImage(metadata=md, timeout=60)
    await call.write(
        transform_service_pb2.ConvertImageRequest(
            params=tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_WEBP)
        )
    )
    await call.write(
        transform_service_pb2.ConvertImageRequest(
            chunk=common_pb2.FileChunk(field="image", data=PNG, file_name="load.png")
        )
    )
    await call.done_writing()
    replies = [r async for r in call]
    if not replies or replies[0].WhichOneof("payload") != "info":
        raise AssertionError("no info")


async def _upscale(stub: generation_service_pb2_grpc.GenerationServiceStub, md: Sequence) -> None:
    call = stub.ImageUpscale(metadata=md, timeout=120)
    await call.write(
        generation_service_pb2.ImageUpscaleRequest(params=tasks_pb2.ImageUpscaleParams())
    )
    await call.write(
        generation_service_pb2.ImageUpscaleRequest(
            chunk=common_pb2.FileChunk(field="image", data=PNG)
        )
    )
    await call.done_writing()
    last = None
    async for reply in call:
        last = reply.event
    if last is None or last.WhichOneof("kind") != "finished":
        raise AssertionError("no finished event")
    if last.finished.job.state != 3:  # SUCCEEDED
        raise AssertionError(f"job ended {last.finished.job.state}")


async def run_load(
    target: str,
    *,
    callers: int = 200,
    seconds: float = 3.0,
    channels: int = 4,
    upscale_share: float = 0.0,
    metadata: Sequence[tuple[str, str]] = (),
    seed: int = 1,
) -> LoadResult:
    """``callers`` concurrent callers for ``seconds`` (calls in flight then finish)."""
    result = LoadResult(callers, seconds)
    rng = random.Random(seed)
    chans = [grpc.aio.insecure_channel(target) for _ in range(channels)]
    try:
        deadline = time.monotonic() + seconds

        async def caller(i: int) -> None:
            ch = chans[i % len(chans)]
            transform = transform_service_pb2_grpc.TransformServiceStub(ch)
            generation = generation_service_pb2_grpc.GenerationServiceStub(ch)
            while time.monotonic() < deadline:
                kind = "upscale" if rng.random() < upscale_share else "convert"
                began = time.monotonic()
                try:
                    if kind == "upscale":
                        await _upscale(generation, metadata)
                    else:
                        await _convert(transform, metadata)
                except Exception as exc:
                    detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc
                    result.errors.append(f"{kind}: {type(exc).__name__}: {detail}")
                else:
                    result.latencies.append(time.monotonic() - began)
                    result.by_kind[kind] = result.by_kind.get(kind, 0) + 1
                result.calls += 1

        began = time.monotonic()
        await asyncio.gather(*(caller(i) for i in range(callers)))
        result.elapsed = time.monotonic() - began
    finally:
        for ch in chans:
            await ch.close()
    return result
