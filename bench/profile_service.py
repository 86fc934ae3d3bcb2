"""Where the service spends its CPU on the ComfyUI job path: py-spy on the service process.

    python -m bench.profile_service LABEL [--jobs 400] [--concurrency 16] [--agents MODULE]
        [--step-delay S] [--comfy-url URL] [--result] [--cpu] [--native] [--raw FILE]

The same setup as :mod:`bench.orchestration` (instant stand-ins in their own process, the
service in its own with persistence on, gRPC ImageUpscale SYNC with references; ``--result``:
RESPONSE_MODE_RESULT, as the HTTP shim asks), but only the
service path, sampled by ``py-spy record`` for the whole measured segment. Writes
``bench/results/profile-LABEL.txt``: the service's CPU milliseconds per job (process CPU time
from ``/proc`` over jobs: robust to other load on the machine, unlike latency), the HTTP
requests the agents received per job, and the profile's top functions by own and by total
samples (idle samples, the event loop waiting in ``select``, left out). ``--step-delay``
paces the stand-ins (seconds per node step: a job's frames then arrive one at a time, as from
a real agent); ``--comfy-url`` profiles against a real ComfyUI instead. ``--cpu`` samples the
service's CPU time instead of py-spy's wall time (:mod:`bench.cpu_sampler`, read its notes)
and adds the garbage collector's share of the segment's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from imagetasks.v1 import common_pb2

from bench.common import RESULTS, cpu_seconds, drop_schema
from bench.orchestration import (
    INPUT_SIDE,
    REAL_SIDE,
    Inputs,
    _segment,
    _service_job,
    _wait_ready,
)
from bench.service_proc import ServiceProcess, service_env
from bench.standin_proc import StandIns

AGENTS = 4
TOP = 25
# Leaf frames of waiting: the loop in select, an idle pool thread on its queue.
_IDLE = ("select (selectors.py", "_run_once", "_worker (concurrent/futures/thread.py:81)")
# Frames every busy sample passes through: no information in a "total" list.
_FRAME = ("<frozen runpy>", "asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py")
_FRAME += ("threading.py", "bench/service_proc.py")


def _py_spy() -> str:
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if found is None:
        raise SystemExit("py-spy is not installed: pip install -e '.[dev]'")
    return found


# Areas of the code, by the innermost service frame of a sample (first match wins): who
# owns the cost, C work run from that frame (grpc, sockets, SQLite) included.
_AREAS = (
    ("aiserver/jobs/store/", "job store (jobs/store)"),
    ("aiserver/jobs/", "jobs (manager, dispatch, events)"),
    ("aiserver/providers/", "ComfyUI provider"),
    ("aiserver/api/", "API edge (api/)"),
    ("aiserver/artifacts/", "artifact store"),
    ("aiserver/blobs/", "artifact store"),
    ("aiserver/spool.py", "upload spool"),
    ("aiserver/", "other service code"),
)


def _area(frames: list[str]) -> str:
    for frame in reversed(frames):
        for marker, area in _AREAS:
            if marker in frame:
                return area
    return "no service frame (grpc and asyncio callbacks, thread pool)"


def _top(
    collapsed: Path, idle: tuple[str, ...] = _IDLE
) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]:
    """Busy samples; the top functions by own and by total samples; samples by area.
    ``idle``: leaf frames left out (none for CPU-time samples: each one is CPU spent)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    busy = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if any(marker in frames[-1] for marker in idle):
            continue  # the loop waiting for I/O
        count = int(count_text)
        busy += count
        own[frames[-1]] += count
        areas[_area(frames)] += count
        for frame in set(frames):
            if not any(marker in frame for marker in _FRAME):
                total[frame] += count
    return busy, own.most_common(TOP), total.most_common(TOP), areas.most_common()


async def _profile(
    label: str,
    jobs: int,
    concurrency: int,
    module: str,
    native: bool,
    raw: Path | None,
    postgres: bool = False,
    comfy_url: str = "",
    step_delay_s: float = 0.0,
    result_only: bool = False,
    cpu_samples: bool = False,
) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    collapsed = tmp / "profile.txt"
    gc_share = ""
    try:
        async with contextlib.AsyncExitStack() as stack:
            agents = None
            if comfy_url:  # a real ComfyUI: one agent, one prompt running and one queued ahead
                env = service_env(tmp / "service", [], AISERVER_LOCAL_UPSCALE="off")
                env["AISERVER_AGENTS"] = json.dumps([{"url": comfy_url, "name": "real"}])
            else:
                agents = await stack.enter_async_context(
                    StandIns(AGENTS, tmp / "comfy", module=module, step_delay_s=step_delay_s)
                )
                env = service_env(tmp / "service", agents.urls)
            if cpu_samples:
                env["BENCH_CPU_SAMPLES"] = str(collapsed)
            if postgres:  # the job store on the scale-out bench's database, a schema of its own
                from bench import scaleout

                await scaleout._ensure_database()
                schema = f"p_{uuid.uuid4().hex[:12]}"
                env |= {
                    "AISERVER_DATABASE_URL": scaleout.BENCH_URL,
                    "AISERVER_DATABASE_SCHEMA": schema,
                }
            async with ServiceProcess(env, tmp / "service.log") as service:
                inputs = Inputs(REAL_SIDE if comfy_url else INPUT_SIDE)
                async with grpc.aio.insecure_channel(service.target) as channel:
                    await _wait_ready(channel)
                    job = _service_job(
                        channel,
                        common_pb2.RESPONSE_MODE_RESULT
                        if result_only
                        else common_pb2.RESPONSE_MODE_SYNC,
                    )
                    await _segment(job, 4, inputs.take(16))  # warm-up
                    if agents is not None:
                        await agents.dump()
                    pngs = inputs.take(jobs)
                    spy = None
                    if cpu_samples:  # bench.cpu_sampler in the service: SIGUSR1 starts it
                        os.kill(service.pid, signal.SIGUSR1)
                    else:
                        spy = await asyncio.create_subprocess_exec(
                            _py_spy(),
                            *("record", "--pid", str(service.pid), "--format", "raw", "--gil"),
                            *("--rate", "200", "--output", str(collapsed)),
                            # py-spy unwinds C frames only while the process is paused.
                            *(("--native",) if native else ("--nonblocking",)),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
                        await asyncio.sleep(1.0)  # py-spy attaches
                    cpu = cpu_seconds(service.pid)
                    started = time.perf_counter()
                    got = await _segment(job, concurrency, pngs)
                    wall = time.perf_counter() - started
                    cpu = cpu_seconds(service.pid) - cpu
                    if spy is None:
                        os.kill(service.pid, signal.SIGUSR2)  # stops it, writes the stacks
                        found = await asyncio.to_thread(_written, Path(f"{collapsed}.gc"))
                        gc_share = _gc_line(json.loads(found), cpu)
                    else:
                        spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
                        async with asyncio.timeout(30):
                            await spy.wait()
                    requests = (await agents.dump())[1] if agents is not None else {}
        if postgres:
            await drop_schema(scaleout.BENCH_URL, schema)
        done = len(got["latencies"])
        if raw is not None:
            shutil.copyfile(collapsed, raw)
        busy, own, total, areas = _top(collapsed, () if cpu_samples else _IDLE)
        per_job = cpu * 1000 / max(done, 1)
        sampled = (
            "CPU-time samples (bench.cpu_sampler: ms of the process's CPU, on the main thread's"
            " stack at each tick; samples in select: other threads' CPU or the poll's)"
            if cpu_samples
            else "py-spy samples while busy (200 Hz, the thread holding the GIL only,"
            " idle loop excluded)"
        )
        where = f"a real ComfyUI at {comfy_url}" if comfy_url else f"{AGENTS} agents ({module})"
        mode = "RESULT" if result_only else "SYNC"
        if step_delay_s and not comfy_url:
            where += f" paced {step_delay_s:g} s per step"
        lines = [
            f"profile {label}: {done} jobs ({len(got['failed'])} failed), {concurrency} callers,"
            f" {where}, gRPC ImageUpscale {mode} + references,"
            f" {'PostgreSQL' if postgres else 'SQLite'}",
            f"service CPU per job: {cpu * 1000 / max(done, 1):.2f} ms"
            f" ({cpu:.2f} s CPU over {wall:.1f} s wall, {done / wall:.1f} jobs/s)",
            "agent requests per job: "
            + ", ".join(f"{route} {n / max(done, 1):.2f}" for route, n in sorted(requests.items())),
            f"{sampled}: {busy}",
            *([gc_share] if gc_share else []),
            "",
            "by area (innermost service frame; % of busy, and ms of CPU per job at that share):",
            *(
                f"  {100 * n / max(busy, 1):5.1f}%  {per_job * n / max(busy, 1):5.2f} ms  {area}"
                for area, n in areas
            ),
            "",
            f"top {TOP} by own samples (% of busy):",
            *(f"  {100 * n / max(busy, 1):5.1f}%  {frame}" for frame, n in own),
            "",
            f"top {TOP} by total samples (% of busy):",
            *(f"  {100 * n / max(busy, 1):5.1f}%  {frame}" for frame, n in total),
        ]
        return "\n".join(lines) + "\n"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _written(path: Path, timeout_s: float = 30.0) -> str:
    """The text of ``path`` once the service has written it (the sampler's stop renames each
    file into place whole, ``.gc`` last: once it exists, the stacks are there too)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service wrote no {path}")
        time.sleep(0.05)
    return path.read_text()


def _gc_line(found: dict[str, Any], cpu_s: float) -> str:
    seconds = float(found["seconds"])
    per_gen = "/".join(str(n) for n in found["collections"])
    share = 100 * seconds / cpu_s if cpu_s else 0.0
    return (
        f"garbage collector: {seconds * 1000:.0f} ms of the main thread's CPU, {share:.1f}% of"
        f" the service's; collections by generation {per_gen}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("label")
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--agents",
        default="bench.standin_proc",
        help="bench.standin_proc (the stand-ins) or bench.fast_agent (lighter)",
    )
    parser.add_argument("--native", action="store_true", help="C frames too (py-spy --native)")
    parser.add_argument(
        "--cpu", action="store_true", help="sample CPU time in the service, not py-spy's wall"
    )
    parser.add_argument("--raw", type=Path, help="keep py-spy's collapsed stacks in this file")
    parser.add_argument("--postgres", action="store_true", help="the job store on PostgreSQL")
    parser.add_argument(
        "--comfy-url", default="", help="a real ComfyUI instead of the stand-ins (64 px inputs)"
    )
    parser.add_argument("--step-delay", type=float, default=0.0, help="stand-in s per step")
    parser.add_argument(
        "--result", action="store_true", help="RESPONSE_MODE_RESULT calls (finished alone)"
    )
    args = parser.parse_args()
    text = asyncio.run(
        _profile(
            args.label,
            args.jobs,
            args.concurrency,
            args.agents,
            args.native,
            args.raw,
            args.postgres,
            comfy_url=args.comfy_url.rstrip("/"),
            step_delay_s=args.step_delay,
            result_only=args.result,
            cpu_samples=args.cpu,
        )
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile-{args.label}.txt").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
