"""The bench's client side: the jobs callers run, through the service or straight to the
agents, and a segment of them from concurrent callers (used by :mod:`bench.orchestration`,
:mod:`bench.callers` and the scripts that measure the service's CPU).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import grpc
from imagetasks.v1 import common_pb2, generation_service_pb2_grpc, job_pb2, tasks_pb2
from imagetasks.v1 import generation_service_pb2 as gpb

from bench.comfy_direct import DirectComfy
from bench.common import encode, photo_like

INPUT_SIDE = 32  # a tiny input: the jobs are about orchestration, not pixels

JobFn = Callable[[int, bytes], Awaitable[tuple[str, float]]]


class JobFailed(Exception):
    """A job that ended without its output; counted, left out of the latencies."""


class Inputs:
    """A different tiny PNG for every job (as real traffic has), from one base image."""

    def __init__(self, side: int = INPUT_SIDE) -> None:
        self.side = side
        self.base = photo_like(side, side)
        self.counter = itertools.count(1)

    def take(self, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            k = next(self.counter)
            img = self.base.copy()
            img.putpixel((0, 0), (k & 255, (k >> 8) & 255, (k >> 16) & 255))
            out.append(encode(img, "PNG"))
        return out


async def _segment(
    job: JobFn, concurrency: int, inputs: list[bytes], rate: float | None = None
) -> dict[str, Any]:
    """One job per input from ``concurrency`` callers: latencies, completion times by key.

    ``rate`` (jobs/s): job ``i`` starts no sooner than ``i / rate`` s after the segment's
    start (open loop, at most ``concurrency`` in flight), so that a process's CPU per job is
    read at a given rate (it falls as the rate rises: more work per wake-up and per syscall);
    None: closed loop, each caller's jobs back to back."""
    latencies: list[float] = []
    done: dict[str, float] = {}
    failed: list[str] = []
    queue = iter(enumerate(inputs))
    start = 0.0

    async def caller(index: int) -> None:
        for i, png in queue:
            if rate:
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            began = time.perf_counter()
            try:
                key, finished_at = await job(index, png)
            except JobFailed as exc:
                failed.append(str(exc))
                continue
            latencies.append(finished_at - began)
            done[key] = finished_at

    start = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    wall = time.perf_counter() - start
    if not latencies:
        raise RuntimeError(f"every job failed: {failed[:3]}")
    return {
        "latencies": latencies,
        "done": done,
        "failed": failed,
        "jobs_per_s": len(latencies) / wall,
    }


def _service_job(
    channel: grpc.aio.Channel,
    mode: common_pb2.ResponseMode.ValueType = common_pb2.RESPONSE_MODE_SYNC,
) -> JobFn:
    """ImageUpscale over gRPC with references: SYNC (every event) by default; RESPONSE_MODE_RESULT
    streams ``finished`` alone (what the HTTP shim's ``Sync=true`` asks for)."""
    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    params = tasks_pb2.ImageUpscaleParams(
        options=common_pb2.JobOptions(mode=mode, delivery=common_pb2.OUTPUT_DELIVERY_REFERENCES)
    )
    first = gpb.ImageUpscaleRequest(params=params)

    async def job(_index: int, png: bytes) -> tuple[str, float]:
        chunk = common_pb2.FileChunk(field="image", data=png, file_name="input.png")
        call = stub.ImageUpscale(timeout=120)
        finished: Any = None
        finished_at = 0.0
        try:
            await call.write(first)
            await call.write(gpb.ImageUpscaleRequest(chunk=chunk))
            await call.done_writing()
            async for response in call:
                if response.event.WhichOneof("kind") == "finished":
                    finished_at = time.perf_counter()
                    finished = response.event.finished.job
        except grpc.aio.AioRpcError as exc:  # refused or broken: counted, the run goes on
            raise JobFailed(f"{exc.code().name}: {exc.details()}") from None
        if finished is None:
            raise JobFailed("the stream ended without a finished event")
        if finished.state != job_pb2.Job.STATE_SUCCEEDED:
            raise JobFailed(f"{job_pb2.Job.State.Name(finished.state)}: {finished.error.message}")
        return finished.name.rsplit("/", 1)[-1], finished_at

    return job


def _direct_job(clients: list[DirectComfy], side: int = INPUT_SIDE) -> JobFn:
    async def job(index: int, png: bytes) -> tuple[str, float]:
        result = await clients[index % len(clients)].upscale(png, side, side)
        if not result.outputs:
            raise JobFailed("no output")
        return result.prompt_id, result.done_at

    return job


def _http_job(session: aiohttp.ClientSession, base: str) -> JobFn:
    url = f"{base}/api/ImageUpscale"

    async def job(_index: int, png: bytes) -> tuple[str, float]:
        form = aiohttp.FormData()
        form.add_field("Sync", "true")
        form.add_field("image", png, filename="input.png", content_type="image/png")
        async with session.post(url, data=form) as response:
            body = await response.read()
        done_at = time.perf_counter()
        answer = json.loads(body)
        if response.status != 200 or answer.get("jobState") != "Completed":
            raise JobFailed(f"HTTP {response.status}: {answer.get('responseStatus')}")
        if not answer.get("outputs"):
            raise JobFailed("no output")
        return str(answer["jobId"]), done_at

    return job


async def _wait_ready(channel: grpc.aio.Channel) -> None:
    """Until the pool has probed its agents and GenerationService reports SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="imagetasks.v1.GenerationService")
    async with asyncio.timeout(30):
        while True:
            answer = await stub.Check(request)
            if answer.status == health_pb2.HealthCheckResponse.SERVING:
                return
            await asyncio.sleep(0.2)
