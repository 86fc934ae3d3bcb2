"""One job's timeline at one caller: where the service's added latency goes, step by step.

    python -m bench.job_timeline [--jobs 300] [--rounds 2] [--tree DIR] [--out FILE]

The orchestration bench's @1 setup (4 instant stand-ins in their own process, the service in
its own, SQLite, gRPC ImageUpscale SYNC + references, one caller in this process), with every
process stamping ``time.perf_counter()`` (CLOCK_MONOTONIC: one clock for every process of the
machine) at each step of a job: the caller (call opened, each response, ``finished``, the
stream's end), the service (``BENCH_TIMELINE``, installed by :mod:`bench.service_proc`: the
request read, inputs checked, job submitted, run started, upload and prompt sent and
answered, each websocket frame read, output stored, end written, each response yielded) and
the stand-ins (installed by :mod:`bench.standin_proc`: each HTTP request read, each frame
sent). With one caller the jobs do not overlap, so each stamp belongs to the job whose call
window holds it. Printed: per step, the time from the previous step and from the call's
start, p50 and p90 over the jobs; the same for the direct client's window. ``--tree`` runs
another source tree's service (an exported ``main`` with this file and ``service_proc.py``
copied in), segments alternating with this tree's in each round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from bench import ROOT

_STAMPS: list[tuple[float, str]] = []
_clock = time.perf_counter


def stamp(tag: str) -> None:
    _STAMPS.append((_clock(), tag))


def _signals(out: Path) -> None:
    def reset(*_: object) -> None:
        _STAMPS.clear()

    def dump(*_: object) -> None:
        out.write_text(json.dumps(_STAMPS))

    signal.signal(signal.SIGUSR1, reset)
    signal.signal(signal.SIGUSR2, dump)


def _around(owner: Any, name: str, before: str | None, after: str | None) -> None:
    """Stamp ``before`` when the coroutine method ``owner.name`` is entered, ``after`` when it
    returns (not on errors)."""
    real = getattr(owner, name)

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before:
            stamp(before)
        result = await real(*args, **kwargs)
        if after:
            stamp(after)
        return result

    setattr(owner, name, wrapped)


def install_service(out: Path) -> None:
    """Hooks in the service process (before the service is built)."""
    from aiserver.api import generation, job_calls
    from aiserver.artifacts import store
    from aiserver.jobs import attempt, events, job_writes, manager
    from aiserver.jobs.model import Finished
    from aiserver.providers.comfy import agent_socket, client, run

    real_run = generation.GenerationServicer._run

    async def traced_run(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        stamp("s.call")
        async for response in real_run(*args, **kwargs):
            stamp(f"s.yield.{response.event.WhichOneof('kind')}")
            yield response
        stamp("s.call_end")

    generation.GenerationServicer._run = traced_run  # type: ignore[method-assign]
    real_read = getattr(generation, "read_upload")  # noqa: B009 (not exported: mypy)

    async def traced_read(*args: Any, **kwargs: Any) -> Any:
        result = await real_read(*args, **kwargs)
        stamp("s.upload_read")
        return result

    setattr(generation, "read_upload", traced_read)  # noqa: B010
    _around(job_calls.JobCalls, "inputs", None, "s.inputs_checked")
    _around(manager.JobManager, "submit", None, "s.submitted")
    _around(run.Run, "_execute", "s.run_start", None)
    _around(client.ComfyClient, "upload_image", "s.agent_upload", "s.agent_upload_done")
    _around(attempt.AttemptSink, "checkpoint", None, "s.checkpoint_saved")
    _around(client.ComfyClient, "post_prompt", "s.prompt_post", "s.prompt_done")
    _around(run.Run, "_deliver", "s.deliver", None)
    _around(attempt.AttemptSink, "image", None, "s.output_stored")
    _around(manager.JobManager, "_finish_now", "s.finish", None)
    _around(job_writes.JobWrites, "store_end", None, "s.end_written")
    _around(job_writes.JobWrites, "save", "s.save", "s.saved")
    _around(store.ArtifactStore, "put", "s.put", "s.put_done")
    real_recv = agent_socket.AgentSocket.recv

    async def traced_recv(self: Any) -> Any:
        message = await real_recv(self)
        name = type(message).__name__
        if name == "Executing" and getattr(message, "node", "") is None:
            name = "ExecutingNone"
        stamp(f"s.ws.{name}")
        return message

    agent_socket.AgentSocket.recv = traced_recv  # type: ignore[method-assign]
    real_emit = events.EventHub.emit

    def traced_emit(self: Any, job_id: str, kind: Any) -> Any:
        if isinstance(kind, Finished):
            stamp("s.emit_finished")
        return real_emit(self, job_id, kind)

    events.EventHub.emit = traced_emit  # type: ignore[method-assign]
    from aiserver.artifacts import index
    from aiserver.blobs import local

    def _sync_around(owner: Any, name: str, before: str, after: str) -> None:
        real = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            stamp(before)
            result = real(*args, **kwargs)
            stamp(after)
            return result

        setattr(owner, name, wrapped)

    # In the put's worker thread: its register (the thread's first step), then the file.
    _sync_around(index.SqliteArtifactIndex, "_register", "s.register", "s.registered")
    _sync_around(local.LocalBlobStore, "put_now", "s.write", "s.written")
    real_fsync = os.fsync

    def traced_fsync(fd: Any) -> None:  # the put's file and folder (SQLite syncs in C)
        stamp("s.fsync")
        real_fsync(fd)
        stamp("s.fsynced")

    os.fsync = traced_fsync
    _signals(out)


def install_standin(out: Path) -> None:
    """Hooks in the stand-ins' process."""
    from tests.support.comfy_standin.server import ComfyStandIn

    real_handle = ComfyStandIn._handle

    async def traced_handle(self: Any, request: Any) -> Any:
        route = request.path.split("?")[0]
        if route.startswith("/history/"):
            route = "/history/*"
        stamp(f"a.{request.method} {route}")
        response = await real_handle(self, request)
        stamp(f"a.answered {route}")
        return response

    ComfyStandIn._handle = traced_handle  # type: ignore[method-assign]
    real_send = ComfyStandIn._send

    def traced_send(self: Any, event: str, data: Any, *args: Any, **kwargs: Any) -> None:
        if event in ("execution_start", "execution_success") or (
            event == "executing" and data.get("node") is None
        ):
            stamp(f"a.send.{event}{'' if data.get('node', '') else '_none'}")
        real_send(self, event, data, *args, **kwargs)

    ComfyStandIn._send = traced_send  # type: ignore[method-assign]
    real_binary = ComfyStandIn._send_binary

    def traced_binary(self: Any, *args: Any, **kwargs: Any) -> None:
        stamp("a.send.binary")
        real_binary(self, *args, **kwargs)

    ComfyStandIn._send_binary = traced_binary  # type: ignore[method-assign]
    _signals(out)


# ---- the driver ---------------------------------------------------------------------------


def _service_job(channel: Any) -> Callable[[bytes], Any]:
    from imagetasks.v1 import common_pb2, generation_service_pb2_grpc, job_pb2, tasks_pb2
    from imagetasks.v1 import generation_service_pb2 as gpb

    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    params = tasks_pb2.ImageUpscaleParams(
        options=common_pb2.JobOptions(
            mode=common_pb2.RESPONSE_MODE_SYNC, delivery=common_pb2.OUTPUT_DELIVERY_REFERENCES
        )
    )
    first = gpb.ImageUpscaleRequest(params=params)

    async def job(png: bytes) -> None:
        chunk = common_pb2.FileChunk(field="image", data=png, file_name="input.png")
        stamp("c.start")
        call = stub.ImageUpscale(timeout=120)
        await call.write(first)
        await call.write(gpb.ImageUpscaleRequest(chunk=chunk))
        await call.done_writing()
        stamp("c.sent")
        state = None
        async for response in call:
            kind = response.event.WhichOneof("kind")
            stamp(f"c.{kind}")
            if kind == "finished":
                state = response.event.finished.job.state
        stamp("c.end")
        if state != job_pb2.Job.STATE_SUCCEEDED:
            raise RuntimeError(f"job ended {state}")

    return job


def _windows(stamps: list[tuple[float, str]]) -> list[list[tuple[float, str]]]:
    """Each job's stamps, from its ``c.start`` to the next one."""
    stamps.sort()
    jobs: list[list[tuple[float, str]]] = []
    for t, tag in stamps:
        if tag == "c.start":
            jobs.append([])
        if jobs:
            jobs[-1].append((t, tag))
    return jobs


def _table(jobs: list[list[tuple[float, str]]]) -> list[dict[str, Any]]:
    """Per step (first occurrence in a job, by the order of the median offsets): count, p50
    and p90 of the offset from the call's start and of the gap from the previous step."""
    offsets: dict[str, list[float]] = {}
    gaps: dict[str, list[float]] = {}
    for job in jobs:
        start = job[0][0]
        seen: dict[str, int] = {}
        previous = start
        for t, raw in job:
            seen[raw] = seen.get(raw, 0) + 1
            tag = raw if seen[raw] == 1 else f"{raw} #{seen[raw]}"
            offsets.setdefault(tag, []).append((t - start) * 1000)
            gaps.setdefault(tag, []).append((t - previous) * 1000)
            previous = t
    rows: list[dict[str, Any]] = []
    for tag, values in offsets.items():
        rows.append(
            {
                "step": tag,
                "n": len(values),
                "at_p50": _pct(values, 50),
                "at_p90": _pct(values, 90),
                "gap_p50": _pct(gaps[tag], 50),
                "gap_p90": _pct(gaps[tag], 90),
            }
        )
    rows.sort(key=lambda r: r["at_p50"])
    return rows


SPANS = (
    ("c.start", "s.agent_upload", "call to the upload sent to the agent"),
    ("s.agent_upload", "s.ws.ExecutionSuccess", "the agent's part (upload to execution_success)"),
    ("s.ws.ExecutionSuccess", "s.put", "execution_success to the output's put"),
    ("s.put", "s.put_done", "the output's put (register, write, fsyncs)"),
    ("s.put", "s.register", "of which the hop to the put's thread"),
    ("s.register", "s.registered", "of which the register (artifact index)"),
    ("s.write", "s.written", "of which the file (write, fsync, rename, folder fsync)"),
    ("s.written", "s.put_done", "of which the hop back to the loop"),
    ("s.put_done", "c.finished", "put done to the caller's finished"),
    ("s.ws.ExecutionSuccess", "c.finished", "execution_success to the caller's finished"),
    ("c.start", "c.finished", "the job"),
)
"""Per-job spans between two steps (first occurrences), summarised over the jobs."""


def _spans(jobs: list[list[tuple[float, str]]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    synced: list[float] = []
    after_put: list[float] = []
    for job in jobs:
        total, began, put_done = 0.0, None, None
        for t, tag in job:
            if tag == "s.fsync":
                began = t
            elif tag == "s.fsynced" and began is not None:
                total += t - began
                began = None
            elif tag == "s.put_done" and put_done is None:
                put_done = t
        synced.append(total * 1000)
        if put_done is not None:
            after_put.append(
                sum(1 for t, tag in job if tag.startswith("s.yield.") and t > put_done)
            )
    for first, last, about in SPANS:
        values = []
        for job in jobs:
            at: dict[str, float] = {}
            for t, tag in job:
                at.setdefault(tag, t)
            if first in at and last in at:
                values.append((at[last] - at[first]) * 1000)
        if values:
            rows.append(
                {"span": about, "n": len(values), "p50": _pct(values, 50), "p90": _pct(values, 90)}
            )
    if any(synced):
        rows.append(
            {
                "span": "of which in fsync (file + folder)",
                "n": len(synced),
                "p50": _pct(synced, 50),
                "p90": _pct(synced, 90),
            }
        )
    if after_put:
        rows.append(
            {
                "span": "messages yielded to the caller after the put (mean)",
                "n": len(after_put),
                "p50": round(sum(after_put) / len(after_put), 3),
                "p90": max(after_put),
            }
        )
    return rows


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))], 3)


class RealAgent:
    """A real ComfyUI (``--real URL``): its CPU is counted, it stamps nothing, no signals."""

    def __init__(self, url: str) -> None:
        self.urls = [url]
        port = url.rsplit(":", 1)[1].strip("/")
        self.pid = int(Path(f"/work/comfy/comfy-{port}.pid").read_text())

    async def reset(self) -> None:
        return None


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.client_loop import Inputs
    from bench.service_proc import ServiceProcess, service_env
    from bench.standin_proc import StandIns

    tmp = Path(tempfile.mkdtemp(prefix="bench-timeline-"))
    # Each variant: its service's tree and its stand-ins' tree, in processes of its own.
    variants = {"this": (ROOT, ROOT)}
    if args.tree:
        variants["base"] = (Path(args.tree), ROOT)  # absolute (main() resolves it)
    if args.agents_tree:
        variants["base-agents"] = (ROOT, Path(args.agents_tree))
    out: dict[str, Any] = {"rounds": []}
    inputs = Inputs()
    opened: list[Any] = []
    try:
        services: dict[str, Any] = {}
        agents: dict[str, Any] = {}
        files: dict[str, dict[str, Path]] = {}
        for label, (service_root, agents_root) in variants.items():
            files[label] = {"agents": tmp / f"agents-{label}.json"}
            timeline = {"BENCH_TIMELINE": str(files[label]["agents"])}
            if getattr(args, "real", ""):  # callers building a Namespace may omit it
                agents[label] = RealAgent(args.real)
            else:
                agents[label] = StandIns(
                    4, tmp / f"comfy-{label}", source=agents_root, env=timeline
                )
                await agents[label].__aenter__()
                opened.append(agents[label])
            files[label]["service"] = tmp / f"service-{label}.json"
            env = service_env(tmp / f"data-{label}", agents[label].urls)
            env["BENCH_TIMELINE"] = str(files[label]["service"])
            services[label] = ServiceProcess(env, tmp / f"service-{label}.log", service_root)
            await services[label].__aenter__()
            opened.append(services[label])
        from bench.comfy_direct import DirectComfy

        direct = [DirectComfy(url) for url in agents["this"].urls]
        paths = [*variants, "direct"] if args.direct else list(variants)
        for rnd in range(args.rounds):
            order = paths if rnd % 2 == 0 else list(reversed(paths))
            for label in order:
                key = "this" if label == "direct" else label
                result = await _segment(
                    label,
                    services.get(label),
                    direct,
                    agents[key],
                    inputs,
                    args.jobs,
                    files[key],
                )
                result["round"] = rnd
                out["rounds"].append(result)
                _print(result)
        for c in direct:
            await c.aclose()
    finally:
        for handle in reversed(opened):
            await handle.__aexit__(None, None, None)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


async def _segment(
    label: str,
    service: Any,
    direct: list[Any],
    agents: Any,
    inputs: Any,
    jobs: int,
    files: dict[str, Path],
) -> dict[str, Any]:
    import grpc

    from bench.client_loop import INPUT_SIDE, _wait_ready
    from bench.common import cpu_seconds

    async def direct_job(png: bytes) -> None:
        stamp("c.start")
        result = await direct[0].upscale(png, INPUT_SIDE, INPUT_SIDE)
        _STAMPS.append((result.done_at, "c.finished"))

    channel = None
    if service is not None:
        channel = grpc.aio.insecure_channel(service.target)
        await _wait_ready(channel)
        job = _service_job(channel)
    else:
        job = direct_job
    try:
        for png in inputs.take(8):  # warm-up
            await job(png)
        await agents.reset()
        pngs = inputs.take(jobs)
        _STAMPS.clear()
        pids = {"agents": agents.pid}
        if service is not None:
            pids["service"] = service.pid
        stamped = [n for n in pids if n == "service" or not isinstance(agents, RealAgent)]
        for name in stamped:
            os.kill(pids[name], signal.SIGUSR1)
        cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
        for png in pngs:
            await job(png)
        cpu = {name: (cpu_seconds(pid) - cpu[name]) * 1000 / jobs for name, pid in pids.items()}
        stamp("c.start")  # closes the last job's window
        stamps = list(_STAMPS)
        for name in stamped:
            pid = pids[name]
            files[name].unlink(missing_ok=True)
            os.kill(pid, signal.SIGUSR2)
            for _ in range(200):
                await asyncio.sleep(0.05)
                if files[name].exists():
                    break
            await asyncio.sleep(0.1)
            stamps += [(t, tag) for t, tag in json.loads(files[name].read_text())]
    finally:
        if channel is not None:
            await channel.close()
    windows = _windows(stamps)[:-1]
    latencies = [(next(t for t, g in j if g == "c.finished") - j[0][0]) * 1000 for j in windows]
    return {
        "tree": label,
        "jobs": len(windows),
        "latency_p50": _pct(latencies, 50),
        "latency_p90": _pct(latencies, 90),
        "steps": _table(windows),
        "spans": _spans(windows),
        "cpu_ms_per_job": {name: round(v, 3) for name, v in cpu.items()},
        "load": os.getloadavg()[0],
    }


def _print(result: dict[str, Any]) -> None:
    print(
        f"\n{result['tree']} round {result['round']}: {result['jobs']} jobs, finished p50"
        f" {result['latency_p50']:.2f} ms p90 {result['latency_p90']:.2f} (load"
        f" {result['load']:.1f}); CPU ms per job: "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["cpu_ms_per_job"].items())
    )
    print(f"{'step':32} {'n':>4} {'at p50':>8} {'at p90':>8} {'gap p50':>8} {'gap p90':>8}")
    for span in result["spans"]:
        print(f"  {span['span']:52} p50 {span['p50']:7.2f} p90 {span['p90']:7.2f} ms")
    for row in result["steps"]:
        print(
            f"{row['step'][:32]:32} {row['n']:4d} {row['at_p50']:8.2f} {row['at_p90']:8.2f}"
            f" {row['gap_p50']:8.2f} {row['gap_p90']:8.2f}"
        )
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tree", default="", help="another source tree's service, alternating")
    parser.add_argument(
        "--agents-tree", default="", help="another tree's stand-ins (this service), alternating"
    )
    parser.add_argument("--real", default="", help="a real ComfyUI's URL instead of stand-ins")
    parser.add_argument("--direct", action="store_true", help="the direct client's too")
    parser.add_argument("--out", default="", help="write the figures here (JSON)")
    args = parser.parse_args()
    if args.tree:
        args.tree = str(Path(args.tree).resolve())
    if args.agents_tree:
        args.agents_tree = str(Path(args.agents_tree).resolve())
    result = asyncio.run(_run(args))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
