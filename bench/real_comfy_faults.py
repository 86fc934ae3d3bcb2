"""Faults of a real ComfyUI under load, and of the service (not run by ``python -m bench``).

    BENCH_COMFY_URL=http://127.0.0.1:8277 BENCH_COMFY_START='/work/comfy/start.sh 8277' \\
    python -m bench.real_comfy_faults [--only a,b,c,d] [--stop-s 120]

The service runs in its own process (:mod:`bench.service_proc`, as ``aiserver serve``, gRPC
and the HTTP shim on fixed free ports so a restarted service is found again) with that one
agent (``max_concurrent_jobs=1, queue_ahead=1``), no embedded upscaler, and the job bounds
shortened so that each fault ends within minutes: ``AISERVER_QUEUE_TIMEOUT_S`` and
``AISERVER_RUN_TIMEOUT_S`` 60 s, ``AISERVER_AGENT_PROBE_INTERVAL_S`` 2 s. The load: 16
callers, a 64 px ImageUpscale each call, four ways in turn: gRPC SYNC, gRPC RESULT, gRPC ASYNC
followed by ``WatchJob`` (re-attached on UNAVAILABLE), and the HTTP shim's ``Sync=true``.
No call has a deadline of its own: the harness bounds each at the two job timeouts plus 60 s
and counts one that outlives it as ``HUNG``. Each fault prints one JSON object:

- ``a``: ComfyUI SIGKILLed after the 8th job of 48 and not restarted: how each call ended
  and when; then 4 ASYNC jobs sent while it is down (their ``waiting_reason`` 3 s later),
  ComfyUI started again then (it takes 30-45 s here, within the queue bound), and how those
  ended.
- ``b``: ComfyUI SIGSTOPped after the 8th job of 48 for ``--stop-s`` (longer than the job
  bounds), then SIGCONT; how each call ended, then 8 more jobs.
- ``c``: ComfyUI SIGKILLed (and started 2 s later) under the load at a moment of one job
  (``--triggers``): ``uploading``, while its input is being uploaded (padded with a 24 MB
  private PNG chunk; ComfyUI SIGSTOPped the moment the job reports ``uploading``, killed 1 s
  later); ``tile``, the moment the upscale reports its tile (the output not yet sent, or on
  its way); ``frame``, the moment the ``SaveImageWebsocket`` node reports (its frame just
  sent).
- ``d``: the service SIGKILLed after the 12th job of 48 and started again 3 s later on the
  same data folder; each caller re-attaches (WatchJob, or its ``ref_id`` sent again) until
  its job ends; the prompts ComfyUI ran (``/history``, cleared first) against the jobs.

After each: the service's TCP connections to the agent, its open fds (``/proc/PID/fd``) and
the callers still waiting (none: each is bounded).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shlex
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
from imagetasks.v1 import job_pb2

from aiserver.client import Accepted, AsyncClient, ClientError, Finished, Progress
from aiserver.client.requests import ImageUpscale
from bench.client_loop import _wait_ready
from bench.common import listening_pid
from bench.orchestration import Inputs
from bench.real_comfy_checks import _connections
from bench.service_proc import ServiceProcess, service_env

STATE = job_pb2.Job.State.Name
TERMINAL = {job_pb2.Job.STATE_SUCCEEDED, job_pb2.Job.STATE_FAILED, job_pb2.Job.STATE_CANCELLED}
QUEUE_S = RUN_S = 60.0
HANG_S = QUEUE_S + RUN_S + 60.0
"""A call that outlives both job bounds by a minute is held: counted ``HUNG``."""
MODES = ("sync", "result", "watch", "http")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def padded_png(png: bytes, pad: int) -> bytes:
    """``png`` with a private ancillary chunk of ``pad`` bytes after its header: decoders skip
    it, so the image stays 64 px while its upload takes long enough to be cut."""
    head = png[: 8 + 25]  # signature, IHDR
    data = b"\0" * pad
    chunk = struct.pack(">I", pad) + b"prVt" + data
    chunk += struct.pack(">I", zlib.crc32(b"prVt" + data) & 0xFFFFFFFF)
    return head + chunk + png[33:]


@dataclass
class Ended:
    mode: str
    outcome: str
    at: float
    job: str = ""


@dataclass
class Ctx:
    client: AsyncClient
    http: aiohttp.ClientSession
    shim: str
    comfy_url: str
    comfy_port: int
    start_cmd: str
    ended: list[Ended] = field(default_factory=list)
    events: dict[str, list[str]] = field(default_factory=dict)


def comfy_pid(ctx: Ctx) -> int:
    pid = listening_pid(ctx.comfy_port)
    if pid is None:
        raise RuntimeError(f"nothing listens on {ctx.comfy_port}")
    return pid


def _gone(pid: int) -> bool:
    """The process is no more, not even a zombie: start.sh's ``kill -0`` takes a zombie for
    a running ComfyUI and starts none (seen once, a zombie left for over a minute)."""
    return not os.path.exists(f"/proc/{pid}")


async def start_comfy(ctx: Ctx, killed: int = 0) -> float:
    """Start ComfyUI again once ``killed`` (its old pid) is gone and nothing listens on its
    port; seconds until it answers. Raises when it is not a new process that answers."""
    waited = time.perf_counter()
    for _ in range(1200 if killed else 0):  # two minutes at most
        if _gone(killed) and listening_pid(ctx.comfy_port) is None:
            break
        await asyncio.sleep(0.1)
    ctx.events.setdefault("comfy_exit_s", []).append(f"{time.perf_counter() - waited:.1f}")
    t0 = time.perf_counter()
    await asyncio.to_thread(subprocess.run, shlex.split(ctx.start_cmd), check=True)
    now = listening_pid(ctx.comfy_port)
    if now is None or now == killed:
        raise RuntimeError(f"ComfyUI was not started again (pid {killed} still there: {now})")
    return round(time.perf_counter() - t0, 1)


async def _watch_until_end(ctx: Ctx, name: str) -> str:
    """WatchJob until the job ends, re-attaching while the service is away."""
    while True:
        try:
            async for event in ctx.client.watch_job(name):
                if isinstance(event, Finished):
                    return _final(event.final)
        except ClientError as exc:
            if exc.code != grpc.StatusCode.UNAVAILABLE:
                return f"{exc.code.name}: {exc.message[:100]}"
            ctx.events.setdefault("watch_reattach", []).append(name)
            await asyncio.sleep(1)


def _final(job: job_pb2.Job) -> str:
    state = STATE(job.state)
    if job.state != job_pb2.Job.STATE_SUCCEEDED:
        state += f": {job.error.message[:100]}"
    return state


async def one_call(ctx: Ctx, mode: str, png: bytes, *, reattach: bool) -> tuple[str, str]:
    """One job by ``mode``: its end (state or error) and its job name when known. With
    ``reattach`` a call cut by an absent service follows its job with WatchJob (or, when it
    never heard its name, sends its ``ref_id`` again)."""
    ref = uuid.uuid4().hex
    name = ""
    try:
        if mode == "http":
            form = aiohttp.FormData()
            form.add_field("image", png, filename="in.png", content_type="image/png")
            form.add_field("Sync", "true")
            form.add_field("RefId", ref)
            async with ctx.http.post(f"{ctx.shim}/api/ImageUpscale", data=form) as answer:
                body = await answer.json(content_type=None)
            name = str(body.get("jobId", "")) if isinstance(body, dict) else ""
            if answer.status != 200:
                status = body.get("responseStatus", body) if isinstance(body, dict) else body
                return f"HTTP {answer.status}: {str(status)[:100]}", name
            return str(body.get("jobState", "?")), name
        if mode == "watch":
            async for event in ctx.client.start(ImageUpscale(png, wait=False, ref_id=ref)):
                if isinstance(event, Accepted):
                    name = event.job
            return await _watch_until_end(ctx, name), name
        request = ImageUpscale(png, ref_id=ref, result_only=mode == "result")
        async for event in ctx.client.start(request):
            if isinstance(event, Accepted) or (not name and event.job):
                name = event.job
            if isinstance(event, Finished):
                return _final(event.final), name
        return "ENDED WITHOUT finished", name
    except (ClientError, aiohttp.ClientError) as exc:
        text = (
            f"{exc.code.name}: {exc.message[:100]}"
            if isinstance(exc, ClientError)
            else f"HTTP {type(exc).__name__}"
        )
        if not reattach:
            return text, name
        ctx.events.setdefault("cut", []).append(f"{mode}: {text}")
        if not name:  # the same ref_id again: the job it made, or a new one
            while True:
                try:
                    async for event in ctx.client.start(ImageUpscale(png, wait=False, ref_id=ref)):
                        if isinstance(event, Accepted):
                            name = event.job
                    break
                except ClientError as again:
                    if again.code != grpc.StatusCode.UNAVAILABLE:
                        return f"{again.code.name}: {again.message[:100]}", name
                    await asyncio.sleep(1)
        return await _watch_until_end(ctx, name), name


async def load(
    ctx: Ctx,
    pngs: list[bytes],
    *,
    after: int = -1,
    fault: Any = None,
    reattach: bool = False,
    callers: int = 16,
) -> dict[str, Any]:
    """``pngs`` through ``callers`` callers; ``fault()`` runs once ``after`` calls ended."""
    ctx.ended = []
    queue = iter(enumerate(pngs))
    t0 = time.perf_counter()
    fault_at: list[float] = []
    fault_task: list[asyncio.Task[Any]] = []
    waiting = 0

    async def caller(i: int) -> None:
        nonlocal waiting
        mode = MODES[i % len(MODES)]
        for _, png in queue:
            waiting += 1
            try:
                async with asyncio.timeout(HANG_S):
                    outcome, name = await one_call(ctx, mode, png, reattach=reattach)
            except TimeoutError:
                outcome, name = "HUNG", ""
            waiting -= 1
            ctx.ended.append(Ended(mode, outcome, time.perf_counter() - t0, name))
            if len(ctx.ended) == after and fault is not None:
                fault_at.append(time.perf_counter() - t0)
                fault_task.append(asyncio.create_task(fault()))

    await asyncio.gather(*(caller(i) for i in range(callers)))
    extra = await fault_task[0] if fault_task else None
    by_mode: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for e in ctx.ended:
        by_mode[e.mode][e.outcome.split(":")[0] if "HTTP" not in e.outcome else e.outcome] += 1
    since = fault_at[0] if fault_at else 0.0
    return {
        "jobs": len(ctx.ended),
        "outcomes": dict(collections.Counter(e.outcome for e in ctx.ended)),
        "by_mode": {m: dict(c) for m, c in by_mode.items()},
        "last_end_after_fault_s": round(max(e.at for e in ctx.ended) - since, 1),
        "callers_waiting_at_end": waiting,
        "fault": extra,
    }


def census(pid: int, port: int, shim: str = "") -> dict[str, int]:
    """The service's TCP connections to the agent, its open fds, and (from the shim's
    ``/metrics``) the streaming calls it still serves."""
    out = {"agent_connections": _connections(pid, port), "fds": len(os.listdir(f"/proc/{pid}/fd"))}
    if shim:
        with urllib.request.urlopen(f"{shim}/metrics", timeout=10) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith("aiserver_active_streams "):
                    out["active_streams"] = int(float(line.split()[1]))
    return out


async def small_batch(ctx: Ctx, n: int) -> dict[str, int]:
    res = await load(ctx, Inputs(64).take(n), callers=min(n, 8))
    return res["outcomes"]  # type: ignore[no-any-return]


# -- the faults -------------------------------------------------------------------------------


async def fault_a(ctx: Ctx, service_pid: int) -> dict[str, Any]:
    killed: dict[str, Any] = {}

    async def kill() -> dict[str, Any]:
        killed["pid"] = comfy_pid(ctx)
        os.kill(killed["pid"], signal.SIGKILL)
        return {"comfy": "SIGKILL, not restarted"}

    during = await load(ctx, Inputs(64).take(48), after=8, fault=kill)
    during["census_while_down"] = census(service_pid, ctx.comfy_port, ctx.shim)
    # Jobs sent while the agent is down: queued, and saying why.
    await asyncio.sleep(10)
    names = []
    for png in Inputs(64).take(4):
        async for event in ctx.client.start(ImageUpscale(png, wait=False)):
            if isinstance(event, Accepted):
                names.append(event.job)
    await asyncio.sleep(3)
    waiting = [
        (STATE(j.state), j.waiting_reason[:80])
        for j in [await ctx.client.get_job(n) for n in names]
    ]
    # Started at once: ComfyUI takes 30-45 s to answer here, within the 60 s queue bound.
    restart_s = await start_comfy(ctx, killed["pid"])
    t0 = time.perf_counter()
    ends = await asyncio.gather(*(_watch_until_end(ctx, n) for n in names))
    after = {
        "queued_while_down": waiting,
        "comfy_start_s": restart_s,
        "their_ends": dict(collections.Counter(ends)),
        "last_end_after_restart_s": round(time.perf_counter() - t0, 1),
        "then_8_more": await small_batch(ctx, 8),
    }
    await asyncio.sleep(3)
    after["census"] = census(service_pid, ctx.comfy_port, ctx.shim)
    return {"during": during, "after_restart": after}


async def fault_b(ctx: Ctx, service_pid: int, stop_s: float) -> dict[str, Any]:
    async def stop() -> dict[str, Any]:
        pid = comfy_pid(ctx)
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(stop_s / 2)
        mid = census(service_pid, ctx.comfy_port, ctx.shim)
        await asyncio.sleep(stop_s / 2)
        os.kill(pid, signal.SIGCONT)
        return {"comfy": f"SIGSTOP {stop_s:g} s, then SIGCONT", "census_while_stopped": mid}

    during = await load(ctx, Inputs(64).take(48), after=8, fault=stop)
    await asyncio.sleep(5)
    during["then_8_more"] = await small_batch(ctx, 8)
    await asyncio.sleep(3)
    during["census"] = census(service_pid, ctx.comfy_port, ctx.shim)
    return during


async def _kill_on(ctx: Ctx, trigger: str, png: bytes, *, stop_first: bool) -> dict[str, Any]:
    """One job whose events trigger a SIGKILL of ComfyUI (SIGSTOP first when ``stop_first``),
    ComfyUI started again 2 s later; the job's end."""
    seen: list[str] = []
    info: dict[str, Any] = {}
    killed = False
    kill_index = 0
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(HANG_S):
            async for event in ctx.client.start(ImageUpscale(png)):
                if isinstance(event, Progress):
                    seen.append(f"{event.stage}:{event.node_type}")
                    hit = TRIGGERS[trigger](str(event.stage).lower(), event.node_type)
                    if hit and not killed:
                        killed = True
                        pid = comfy_pid(ctx)
                        if stop_first:
                            os.kill(pid, signal.SIGSTOP)
                            await asyncio.sleep(1)
                        os.kill(pid, signal.SIGKILL)
                        info["killed_at_s"] = round(time.perf_counter() - t0, 2)
                        info["progress_before_kill"] = seen[-3:]
                        kill_index = len(seen)
                        info["restart"] = asyncio.create_task(_restart_later(ctx, 2, pid))
                if isinstance(event, Finished):
                    info["end"] = _final(event.final)
    except TimeoutError:
        info["end"] = "HUNG"
    except ClientError as exc:
        info["end"] = f"{exc.code.name}: {exc.message[:100]}"
    info["end_after_s"] = round(time.perf_counter() - t0, 1)
    if "restart" in info:
        await info.pop("restart")
    info["killed"] = killed
    info["progress_after_kill"] = seen[kill_index:][:6]
    return info


TRIGGERS: dict[str, Any] = {
    # ComfyUI stopped, then killed, while this job's (padded) input is on its way
    "uploading": lambda stage, node: stage.endswith("uploading"),
    # killed once the upscale reported its tile: before or while the output is sent
    "tile": lambda stage, node: node == "ImageUpscaleWithModel",
    # killed once the sender reported its step (ComfyUI sends the frame just before)
    "frame": lambda stage, node: node == "SaveImageWebsocket",
}


async def _restart_later(ctx: Ctx, delay: float, killed: int) -> None:
    await asyncio.sleep(delay)
    await start_comfy(ctx, killed)


async def fault_c(ctx: Ctx, service_pid: int, triggers: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for trigger in triggers:
        stop_first = trigger == "uploading"
        png = Inputs(64).take(1)[0]
        if stop_first:
            png = padded_png(png, 24 << 20)
        background = asyncio.create_task(load(ctx, Inputs(64).take(32), callers=12))
        await asyncio.sleep(3)
        probe = await _kill_on(ctx, trigger, png, stop_first=stop_first)
        probe["load"] = (await background)["outcomes"]
        await asyncio.sleep(3)
        probe["census"] = census(service_pid, ctx.comfy_port, ctx.shim)
        probe["comfy_gone_after_kill_s"] = ctx.events.pop("comfy_exit_s", [])
        out[trigger] = probe
    return out


async def history(ctx: Ctx) -> dict[str, Any]:
    async with ctx.http.get(f"{ctx.comfy_url}/history") as answer:
        return await answer.json()  # type: ignore[no-any-return]


class Services:
    """The service process, and its SIGKILL and restart on the same folder and ports."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env = env
        self.tmp = tmp
        self.starts = 0
        self.current = ServiceProcess(env, tmp / "service.log")

    async def start(self) -> ServiceProcess:
        self.starts += 1
        self.current = ServiceProcess(self.env, self.tmp / f"service{self.starts}.log")
        await self.current.__aenter__()
        return self.current

    async def kill_and_restart(self, after_s: float) -> dict[str, Any]:
        os.kill(self.current.pid, signal.SIGKILL)
        await self.current.__aexit__(None, None, None)
        await asyncio.sleep(after_s)
        await self.start()
        return {"service": f"SIGKILL, started again {after_s:g} s later"}


def _is_repeat(entry: dict[str, Any]) -> bool:
    """A history entry queued again for its image frames (the service marks its sender)."""
    graph = entry["prompt"][2]
    return any(
        node.get("class_type") == "SaveImageWebsocket" and node["inputs"].get("aiserver_recovers")
        for node in graph.values()
    )


def _cached(entry: dict[str, Any]) -> list[str]:
    """The nodes ComfyUI served from its cache for that prompt."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_cached":
            return list(data.get("nodes", []))
    return []


async def fault_d(ctx: Ctx, services: Services) -> dict[str, Any]:
    async with ctx.http.post(f"{ctx.comfy_url}/history", json={"clear": True}):
        pass
    ctx.events.clear()
    res = await load(
        ctx,
        Inputs(64).take(48),
        after=12,
        fault=lambda: services.kill_and_restart(3),
        reattach=True,
    )
    await asyncio.sleep(5)
    prompts = list((await history(ctx)).values())
    repeats = [e for e in prompts if _is_repeat(e)]
    res["comfy_prompts"] = len(prompts)
    res["of_them_repeats_for_frames"] = len(repeats)
    res["repeats_served_from_cache"] = [_cached(e) for e in repeats]
    res["distinct_job_names"] = len({e.job for e in ctx.ended if e.job})
    res["calls_cut_then_reattached"] = {k: len(v) for k, v in ctx.events.items()}
    res["census"] = census(services.current.pid, ctx.comfy_port, ctx.shim)
    return res


async def main(only: set[str], stop_s: float, triggers: list[str]) -> None:
    url = os.environ["BENCH_COMFY_URL"].rstrip("/")
    start_cmd = os.environ["BENCH_COMFY_START"]
    port = urlsplit(url).port or 80
    tmp = Path(tempfile.mkdtemp(prefix="bench-real-faults-"))
    grpc_port, http_port = _free_port(), _free_port()
    env = service_env(
        tmp / "service",
        [],
        http=True,
        AISERVER_LOCAL_UPSCALE="off",
        AISERVER_QUEUE_TIMEOUT_S=str(QUEUE_S),
        AISERVER_RUN_TIMEOUT_S=str(RUN_S),
        AISERVER_AGENT_PROBE_INTERVAL_S="2",
    )
    env.update(
        AISERVER_AGENTS=json.dumps([{"url": url, "name": "real"}]),
        AISERVER_GRPC_PORT=str(grpc_port),
        AISERVER_HTTP_PORT=str(http_port),
    )
    target = f"127.0.0.1:{grpc_port}"
    async with AsyncClient(target) as client, aiohttp.ClientSession() as http:
        ctx = Ctx(client, http, f"http://127.0.0.1:{http_port}", url, port, start_cmd)
        services = Services(env, tmp)
        service = await services.start()
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                await _wait_ready(channel)
            warm = {
                "jobs": await small_batch(ctx, 4),
                "census": census(service.pid, port, ctx.shim),
            }
            print(json.dumps({"warm": warm}), flush=True)
            if not only or "a" in only:
                print(json.dumps({"a": await fault_a(ctx, service.pid)}), flush=True)
            if not only or "b" in only:
                print(json.dumps({"b": await fault_b(ctx, service.pid, stop_s)}), flush=True)
            if not only or "c" in only:
                print(json.dumps({"c": await fault_c(ctx, service.pid, triggers)}), flush=True)
            if not only or "d" in only:
                print(json.dumps({"d": await fault_d(ctx, services)}), flush=True)
        finally:
            await services.current.__aexit__(None, None, None)
            print(json.dumps({"service_log": str(tmp)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated: a,b,c,d")
    parser.add_argument("--stop-s", type=float, default=120.0)
    parser.add_argument("--triggers", default=",".join(TRIGGERS), help="fault c's moments")
    args = parser.parse_args()
    chosen = [t for t in args.triggers.split(",") if t]
    if unknown := set(chosen) - set(TRIGGERS):
        parser.error(f"unknown triggers: {', '.join(sorted(unknown))}")
    asyncio.run(main({x for x in args.only.split(",") if x}, args.stop_s, chosen))
