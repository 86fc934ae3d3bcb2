"""Memory of the server process: ``python -m aiserver serve`` in a subprocess (settings from
``AISERVER_*``), resident set read from ``/proc/<pid>/status``.

- Each round starts a fresh server (no heap kept from the round before). Idle: RSS after
  start-up and one small call, settled.
- Uploads: 64 concurrent 8 MiB uploads (``ConvertImage`` to PNG of bytes that are no image:
  the whole upload is read and spooled or held in memory, then IMAGE_UNREADABLE; no image
  work), 1 MiB chunks. (Until 2026-12-07 the params had no ``output_format``: refused on
  arrival, the uploads were drained, never spooled.) Peak RSS is
  the kernel's high-water mark ``VmHWM``, reset (``/proc/<pid>/clear_refs``) just before the
  burst; RSS is also sampled every 10 ms as a cross-check.
- Idle streaming callers: ``N`` ConvertImage uploads that send params and one chunk (64 KiB in
  even rounds, 1 MiB in odd ones), then hold the stream open. RSS after they settle minus RSS
  before, divided by ``N``.
- WatchJob callers: ``N`` watchers spread over 4 jobs that hang on a ComfyUI stand-in (when the
  server can run generative jobs: ``aiserver serve`` has a ComfyUI provider for
  ``AISERVER_AGENTS``), measured the same way.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from imagetasks.v1 import (
    common_pb2,
    generation_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    tasks_pb2,
    transform_service_pb2,
    transform_service_pb2_grpc,
)
from imagetasks.v1 import generation_service_pb2 as gpb

from bench import ROOT
from bench.common import (
    LoadWatch,
    encode,
    free_port,
    memory_kib,
    photo_like,
    reset_peak_rss,
    row,
    spread,
)
from bench.standin_proc import StandIns

NAME = "memory"
MIB = 1024 * 1024
CHUNK = MIB
IDLE_CHUNKS = (64 * 1024, MIB)  # what each idle upload has sent, by round


class ServerProcess:
    """``python -m aiserver serve`` with ``env`` on a free port."""

    def __init__(self, env: dict[str, str], log: Path, root: Path = ROOT) -> None:
        self.port = free_port()
        self.root = root
        """The source tree served (another one: its ``src`` first on the path)."""
        paths = [str(root / "src")] if root != ROOT else []
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AISERVER_")},
            "PYTHONPATH": os.pathsep.join(
                p for p in (*paths, str(root), os.environ.get("PYTHONPATH", "")) if p
            ),
            "AISERVER_GRPC_HOST": "127.0.0.1",
            "AISERVER_GRPC_PORT": str(self.port),
            "AISERVER_HTTP_ENABLED": "false",
            **env,
        }
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> ServerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiserver",
            "serve",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self.log.open("wb"),
            env=self.env,
            cwd=str(self.root),
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            async with asyncio.timeout(60):
                while True:
                    if self.proc.returncode is not None:
                        raise RuntimeError(f"aiserver serve exited; see {self.log}")
                    try:
                        answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                        if answer.status == health_pb2.HealthCheckResponse.SERVING:
                            return self
                    except grpc.aio.AioRpcError:
                        pass
                    await asyncio.sleep(0.1)

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                async with asyncio.timeout(20):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _settled_rss(pid: int, within: float = 3.0) -> int:
    """RSS once it stops moving (two readings 250 ms apart within 1%), in KiB."""
    last = memory_kib(pid)["VmRSS"]
    for _ in range(int(within / 0.25)):
        await asyncio.sleep(0.25)
        now = memory_kib(pid)["VmRSS"]
        if abs(now - last) <= last * 0.01:
            return now
        last = now
    return last


async def _upload_then_fail(stub: Any, messages: list[Any]) -> None:
    call = stub.ConvertImage()
    for m in messages:
        await call.write(m)
    await call.done_writing()
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as err:
        if err.code() != grpc.StatusCode.INVALID_ARGUMENT:
            raise


async def _burst(pid: int, channel: grpc.aio.Channel, count: int, size: int) -> dict[str, float]:
    stub = transform_service_pb2_grpc.TransformServiceStub(channel)
    data = os.urandom(size)
    messages = [
        transform_service_pb2.ConvertImageRequest(
            params=tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
        )
    ] + [
        transform_service_pb2.ConvertImageRequest(
            chunk=common_pb2.FileChunk(field="image", data=data[i : i + CHUNK], file_name="u.bin")
        )
        for i in range(0, size, CHUNK)
    ]
    before = await _settled_rss(pid)
    hwm_reset = reset_peak_rss(pid)
    sampled = before
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal sampled
        while not done.is_set():
            sampled = max(sampled, memory_kib(pid)["VmRSS"])
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(_upload_then_fail(stub, messages) for _ in range(count)))
    done.set()
    await sampler
    peak = memory_kib(pid)["VmHWM"] if hwm_reset else sampled
    return {
        "rss_before_burst_mib": before / 1024,
        "peak_mib": peak / 1024,
        "peak_sampled_mib": sampled / 1024,
        "increase_mib": (peak - before) / 1024,
        "hwm_reset": float(hwm_reset),
    }


async def _idle_uploads(pid: int, channel: grpc.aio.Channel, count: int, chunk: int) -> float:
    """KiB of server RSS per idle upload stream."""
    stub = transform_service_pb2_grpc.TransformServiceStub(channel)
    first = transform_service_pb2.ConvertImageRequest(
        params=tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
    )
    piece = transform_service_pb2.ConvertImageRequest(
        chunk=common_pb2.FileChunk(field="image", data=b"\0" * chunk, file_name="idle.bin")
    )
    before = await _settled_rss(pid)
    calls = [stub.ConvertImage() for _ in range(count)]
    try:
        for call in calls:
            await call.write(first)
            await call.write(piece)
        after = await _settled_rss(pid)
    finally:
        for call in calls:
            call.cancel()
    return (after - before) / count


async def _watchers(pid: int, channel: grpc.aio.Channel, count: int) -> float | None:
    """KiB of server RSS per WatchJob caller on hanging jobs; None if jobs cannot be made."""
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(
        health_pb2.HealthCheckRequest(service="imagetasks.v1.GenerationService")
    )
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        return None
    gen = generation_service_pb2_grpc.GenerationServiceStub(channel)
    png = encode(photo_like(32, 32), "PNG")
    params = tasks_pb2.ImageUpscaleParams(
        options=common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_ASYNC)
    )
    jobs = []
    for _ in range(4):
        call = gen.ImageUpscale()
        await call.write(gpb.ImageUpscaleRequest(params=params))
        await call.write(
            gpb.ImageUpscaleRequest(chunk=common_pb2.FileChunk(field="image", data=png))
        )
        await call.done_writing()
        async for msg in call:
            jobs.append(msg.event.job)
    jobs_stub = job_service_pb2_grpc.JobServiceStub(channel)
    before = await _settled_rss(pid)
    calls = [
        jobs_stub.WatchJob(job_service_pb2.WatchJobRequest(name=jobs[i % len(jobs)]))
        for i in range(count)
    ]
    try:
        for call in calls:  # each has its replay (accepted, progress) before it idles
            await call.read()
        after = await _settled_rss(pid)
    finally:
        for call in calls:
            call.cancel()
        for job in jobs:
            await jobs_stub.CancelJob(job_service_pb2.CancelJobRequest(name=job))
    return (after - before) / count


async def _run(quick: bool) -> dict[str, Any]:
    reps = 2 if quick else 4
    uploads, upload_mib = (16, 8) if quick else (64, 8)
    callers = 50 if quick else 200
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    results: dict[str, list[float]] = {
        "idle_start_mib": [],
        "rss_before_burst_mib": [],
        "peak_mib": [],
        "peak_sampled_mib": [],
        "increase_mib": [],
        "idle_upload_64k_kib_per_caller": [],
        "idle_upload_1m_kib_per_caller": [],
        "watchjob_kib_per_caller": [],
    }
    notes: list[str] = []
    try:
        async with StandIns(1, tmp / "comfy", hang="3") as agents:
            for rep in range(reps):  # a fresh server each round: no heap left by the last
                env = {
                    "AISERVER_DATA_DIR": str(tmp / f"data{rep}"),
                    "AISERVER_MAX_UPLOAD_BYTES": str(upload_mib * MIB * 2),
                    "AISERVER_AGENTS": json.dumps([{"url": agents.urls[0], "name": "hang"}]),
                }
                server = ServerProcess(env, tmp / f"server{rep}.log")
                async with server, grpc.aio.insecure_channel(server.target) as channel:
                    pid = server.pid
                    await _burst(pid, channel, 2, MIB)  # warm-up: first-call imports
                    results["idle_start_mib"].append(await _settled_rss(pid) / 1024)
                    chunk = IDLE_CHUNKS[rep % 2]
                    per = await _idle_uploads(pid, channel, callers, chunk)
                    key = "idle_upload_64k" if chunk < MIB else "idle_upload_1m"
                    results[f"{key}_kib_per_caller"].append(per)
                    watch = await _watchers(pid, channel, callers)
                    if watch is not None:
                        results["watchjob_kib_per_caller"].append(watch)
                    elif rep == 0:
                        notes.append(
                            "WatchJob callers skipped: `aiserver serve` reports"
                            " GenerationService NOT_SERVING (no ComfyUI provider)"
                        )
                    burst = await _burst(pid, channel, uploads, upload_mib * MIB)
                    for key in ("rss_before_burst_mib", "peak_mib", "peak_sampled_mib"):
                        results[key].append(burst[key])
                    results["increase_mib"].append(burst["increase_mib"])
                    if not burst["hwm_reset"] and rep == 0:
                        notes.append("VmHWM could not be reset: peak is the sampled RSS")
                await agents.reset()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {k: spread(v, 1) for k, v in results.items() if v}
    rows = [
        row(
            f"memory: peak RSS, {uploads} x {upload_mib} MiB uploads",
            figures["peak_mib"],
            "MiB",
            better="lower",
            baseline=f"idle {figures['idle_start_mib']['median']:.0f} MiB;"
            f" +{figures['increase_mib']['median']:.0f} MiB over the RSS before the burst"
            f" ({uploads * upload_mib} MiB in flight)",
        ),
        *(
            row(
                f"memory: RSS per idle upload stream, {label} sent",
                figures.get(f"idle_upload_{key}_kib_per_caller"),
                "KiB",
                better="lower",
                baseline=f"{callers} callers",
            )
            for key, label in (("64k", "64 KiB"), ("1m", "1 MiB"))
        ),
        row(
            "memory: RSS per WatchJob caller (hanging jobs)",
            figures.get("watchjob_kib_per_caller"),
            "KiB",
            better="lower",
            baseline=f"{callers} callers on 4 jobs",
            note="" if "watchjob_kib_per_caller" in figures else "skipped, see notes",
        ),
    ]
    return {
        "name": NAME,
        "about": __doc__.strip().split("\n\n")[0],
        "setup": {
            "server": "python -m aiserver serve (subprocess)",
            "uploads": f"{uploads} concurrent x {upload_mib} MiB, {CHUNK // 1024} KiB chunks",
            "idle_callers": callers,
            "rounds": reps,
        },
        "notes": notes,
        "figures": figures,
        "rows": rows,
    }


def run(quick: bool) -> dict[str, Any]:
    watch = LoadWatch()
    result = asyncio.run(_run(quick))
    result["load"] = watch.done()
    return result


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
