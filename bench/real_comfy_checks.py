"""End-to-end checks of the service against a real ComfyUI (not run by ``python -m bench``).

    BENCH_COMFY_URL=http://127.0.0.1:8199 BENCH_COMFY_DIR=/path/to/ComfyUI \\
    BENCH_COMFY_START='/path/to/start.sh 8199' python -m bench.real_comfy_checks [--jobs 200]

The service runs in its own process (:mod:`bench.service_proc`, settings as for ``aiserver
serve``) with that one agent (``max_concurrent_jobs=1, queue_ahead=1``, the defaults) and no
embedded upscaler; the agent needs ``RealESRGAN_x2.pth`` in ``models/upscale_models``. Checks,
each printed as one JSON object:

- ``upscale``: a 64 px ImageUpscale through the client library: its event kinds, progress
  stages and nodes, the output's size (128 px).
- ``cancel``: a 1024 px upscale (9 tiles: seconds each on a CPU) cancelled once a tile is
  reported; the job's end state, the time from the cancel to ``finished``, and how long
  ComfyUI took to stop (it checks for an interrupt between tiles).
- ``files``: ``--jobs`` upscales from 16 callers; files in ComfyUI's ``input/`` and
  ``output/`` before and after, and how often ComfyUI had a prompt waiting behind the running
  one (``GET /queue`` sampled every 50 ms: queue-ahead at work).
- ``kill``: 64 upscales from 16 callers; after the 10th ends ComfyUI is SIGKILLed and started
  again with ``BENCH_COMFY_START``; every job's end state and how long the last took, then one
  more job, and the service's TCP connections to the agent left open.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
from imagetasks.v1 import job_pb2
from PIL import Image

from aiserver.client import AsyncClient, ClientError, Finished, Progress
from aiserver.client.requests import ImageUpscale
from bench.common import encode, listening_pid, photo_like
from bench.orchestration import Inputs, _wait_ready
from bench.service_proc import ServiceProcess, service_env

STATE = job_pb2.Job.State.Name


def _files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _connections(pid: int, port: int) -> int:
    """TCP connections of ``pid`` to ``port`` on this machine, in any state."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in list(fh)[1:]:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                    count += 1
    return count


async def _upscale(client: AsyncClient) -> dict[str, Any]:
    png = Inputs(64).take(1)[0]
    kinds: collections.Counter[str] = collections.Counter()
    stages: collections.Counter[str] = collections.Counter()
    nodes: list[str] = []
    data = bytearray()
    final: Any = None
    async for event in client.start(ImageUpscale(png)):
        kinds[type(event).__name__] += 1
        if isinstance(event, Progress):
            stages[str(event.stage)] += 1
            if event.node_type and event.node_type not in nodes:
                nodes.append(event.node_type)
        elif type(event).__name__ == "OutputData":
            data.extend(event.data)  # type: ignore[union-attr]
        elif isinstance(event, Finished):
            final = event.final
    size = Image.open(io.BytesIO(bytes(data))).size if data else None
    return {
        "state": STATE(final.state),
        "events": dict(kinds),
        "progress_stages": dict(stages),
        "progress_nodes": nodes,
        "output_size": size,
    }


async def _cancel(client: AsyncClient, http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    png = encode(photo_like(1024, 1024), "PNG")
    stream = client.start(ImageUpscale(png))
    cancelled_at = 0.0
    steps: list[str] = []
    final: Any = None
    async for event in stream:
        if isinstance(event, Progress) and event.node_type == "ImageUpscaleWithModel":
            steps.append(f"{event.step}/{event.max_steps}")
            if event.step >= 1 and not cancelled_at:
                cancelled_at = time.perf_counter()
                await client.cancel_job(stream.job_name)
        elif isinstance(event, Finished):
            final = event.final
    ended = time.perf_counter()
    queue: dict[str, Any] = {}
    while time.perf_counter() - ended < 180:  # the interrupt takes effect at the next tile
        async with http.get(f"{url}/queue") as answer:
            queue = await answer.json()
        if not queue["queue_running"] and not queue["queue_pending"]:
            break
        await asyncio.sleep(0.1)
    idle = time.perf_counter()
    return {
        "state": STATE(final.state) if final is not None else None,
        "tile_steps_seen": steps,
        "cancel_to_finished_ms": round((ended - cancelled_at) * 1000) if cancelled_at else None,
        "comfy_queue_after": {k: len(v) for k, v in queue.items()},
        "comfy_idle_after_cancel_s": round(idle - cancelled_at, 1) if cancelled_at else None,
    }


async def _many(client: AsyncClient, pngs: list[bytes], callers: int) -> list[str]:
    """Each job's end state (or the client error that ended it), 16 at a time."""
    out: list[str] = []
    queue = iter(pngs)

    async def caller() -> None:
        for png in queue:
            try:
                result = await client.start(ImageUpscale(png)).run()
                state = STATE(result.job.state)
                if result.job.state != job_pb2.Job.STATE_SUCCEEDED:
                    state += f": {result.job.error.message[:120]}"
                out.append(state)
            except ClientError as exc:
                out.append(f"{exc.code.name}: {exc.message[:120]}")

    await asyncio.gather(*(caller() for _ in range(callers)))
    return out


async def _files_check(
    client: AsyncClient, http: aiohttp.ClientSession, url: str, comfy_dir: Path, jobs: int
) -> dict[str, Any]:
    before = {d: _files(comfy_dir / d) for d in ("input", "output", "temp")}
    samples: collections.Counter[str] = collections.Counter()
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            async with http.get(f"{url}/queue") as answer:
                q = await answer.json()
            running, pending = len(q["queue_running"]), len(q["queue_pending"])
            samples["running+waiting" if running and pending else f"running {running}"] += 1
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    started = time.perf_counter()
    states = await _many(client, Inputs(64).take(jobs), 16)
    wall = time.perf_counter() - started
    done.set()
    await sampler
    after = {d: _files(comfy_dir / d) for d in ("input", "output", "temp")}
    return {
        "jobs": jobs,
        "states": dict(collections.Counter(states)),
        "jobs_per_s": round(jobs / wall, 2),
        "files_before": before,
        "files_after": after,
        "queue_samples": dict(samples),
    }


async def _kill_check(
    client: AsyncClient, service_pid: int, url: str, start_cmd: str
) -> dict[str, Any]:
    port = urlsplit(url).port or 80
    pid = listening_pid(port)
    if pid is None:
        return {"skipped": f"no process listens on port {port} here"}
    states: list[str] = []
    finished_at: list[float] = []
    killed_at = 0.0
    pngs = iter(Inputs(64).take(64))

    async def caller() -> None:
        nonlocal killed_at
        for png in pngs:
            try:
                result = await client.start(ImageUpscale(png)).run()
                state = STATE(result.job.state)
                if result.job.state != job_pb2.Job.STATE_SUCCEEDED:
                    state += f": {result.job.error.message[:100]}"
            except ClientError as exc:
                state = f"{exc.code.name}: {exc.message[:100]}"
            states.append(state)
            finished_at.append(time.perf_counter())
            if len(states) == 10 and not killed_at:
                killed_at = time.perf_counter()
                os.kill(pid, signal.SIGKILL)
                await asyncio.sleep(2)
                await asyncio.to_thread(subprocess.run, shlex.split(start_cmd), check=True)

    async with asyncio.timeout(900):  # a job held forever fails the check here
        await asyncio.gather(*(caller() for _ in range(16)))
    after = await _upscale(client)
    await asyncio.sleep(2)
    return {
        "jobs": len(states),
        "states": dict(collections.Counter(states)),
        "last_end_after_kill_s": round(max(finished_at) - killed_at, 1),
        "a_job_after": after["state"],
        "service_connections_to_agent": _connections(service_pid, port),
    }


async def main(jobs: int, only: set[str]) -> None:
    url = os.environ["BENCH_COMFY_URL"].rstrip("/")
    comfy_dir = Path(os.environ.get("BENCH_COMFY_DIR", "."))
    start_cmd = os.environ.get("BENCH_COMFY_START", "")
    tmp = Path(tempfile.mkdtemp(prefix="bench-real-checks-"))
    env = service_env(tmp / "service", [], AISERVER_LOCAL_UPSCALE="off")
    env["AISERVER_AGENTS"] = json.dumps([{"url": url, "name": "real"}])
    try:
        async with (
            ServiceProcess(env, tmp / "service.log") as service,
            AsyncClient(service.target, timeout=600) as client,
            aiohttp.ClientSession() as http,
        ):
            async with grpc.aio.insecure_channel(service.target) as channel:
                await _wait_ready(channel)
            checks = {
                "upscale": lambda: _upscale(client),
                "cancel": lambda: _cancel(client, http, url),
                "files": lambda: _files_check(client, http, url, comfy_dir, jobs),
                "kill": lambda: _kill_check(client, service.pid, url, start_cmd),
            }
            for name, check in checks.items():
                if only and name not in only:
                    continue
                if name == "kill" and not start_cmd:
                    print(json.dumps({name: "skipped: set BENCH_COMFY_START"}), flush=True)
                    continue
                print(json.dumps({name: await check()}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--only", default="", help="comma-separated: upscale,cancel,files,kill")
    args = parser.parse_args()
    asyncio.run(main(args.jobs, {x for x in args.only.split(",") if x}))
