"""Orchestration overhead: the same ImageUpscale jobs through the service and through a minimal
direct ComfyUI client, against the same instant ComfyUI stand-ins.

- Stand-ins: ``AGENTS`` of them in one subprocess (a remote agent's CPU is not the service's),
  no delay per step; each runs one prompt at a time, as ComfyUI does.
- Service: its own process (:mod:`bench.service_proc`, settings from ``AISERVER_*`` as for
  ``aiserver serve``, INFO logging to a file), SQLite job store and artifact store on (always:
  persistence is not optional), gRPC ImageUpscale, SYNC, OUTPUT_DELIVERY_REFERENCES; every
  agent with ``max_concurrent_jobs = 64``: the service hands each agent as many jobs as its
  slots, so at 64 callers every job waits on an agent, as the direct client's do in ComfyUI
  (before 2026-12-07 a fixed bound of 16 per provider kept 48 in the service's own queue).
- Baseline: :mod:`bench.comfy_direct`, the same input and graph, round-robin over the agents.
- Callers of both paths run in the bench process; the service's and the stand-ins' CPU time
  is read from ``/proc`` around each segment, the callers' with ``time.process_time`` (CPU ms
  per job: the direct client's is what the service's orchestration replaces). The
  light-agents rows (:func:`_light_agents`) run their callers in a process of their own.
- Load: closed loop, ``N`` callers each running jobs back to back; both paths alternate within
  every round (which goes first alternates too), and the stand-ins are reset between segments.

Figures per concurrency: p50/p99 of job latency for both paths and their difference ("added"),
jobs per second, and the delay from the agent's ``execution_success`` (timestamped in the
stand-in process) to the caller holding the ``finished`` event (``perf_counter`` is
CLOCK_MONOTONIC, one clock for every process of the machine).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from bench.callers import Callers
from bench.client_loop import (
    INPUT_SIDE,
    Inputs,
    JobFailed,
    JobFn,
    _direct_job,
    _segment,
    _service_job,
    _wait_ready,
)
from bench.comfy_direct import DirectComfy
from bench.common import LoadWatch, cpu_seconds, ms, percentile, row, spread
from bench.grpc_floor import FloorServer, floor_job
from bench.orchestration_real import REAL_SIDE, _real_comfy, real_figures, real_rows
from bench.service_proc import ServiceProcess, service_env
from bench.standin_proc import StandIns

NAME = "orchestration"
AGENTS = 4
LEVELS = (1, 16, 64)

__all__ = [  # the client side lives in bench.client_loop; other scripts import it from here
    "INPUT_SIDE",
    "REAL_SIDE",
    "Inputs",
    "JobFailed",
    "JobFn",
    "_direct_job",
    "_segment",
    "_service_job",
    "_wait_ready",
    "run",
]


def _after_success(
    done: dict[str, float], success: dict[str, tuple[str, float]], by_label: bool
) -> list[float]:
    """Seconds from ``execution_success`` to the caller holding the result, per job."""
    sent = {(label if by_label else pid): t for pid, (label, t) in success.items()}
    return [t - sent[key] for key, t in done.items() if key in sent]


FIGURES = (
    "service_p50",
    "service_p99",
    "direct_p50",
    "direct_p99",
    "added_p50",
    "added_p99",
    "service_jobs_per_s",
    "direct_jobs_per_s",
    "final_p50",
    "final_p99",
    "direct_after_success_p50",
    "service_cpu_ms_per_job",
    "standin_cpu_ms_per_job_service",
    "standin_cpu_ms_per_job_direct",
    "caller_cpu_ms_per_job_service",
    "caller_cpu_ms_per_job_direct",
    "floor_p50",
    "durable_write_p50",
)


async def _run(quick: bool) -> dict[str, Any]:
    reps = 2 if quick else 5
    totals = {1: 8, 16: 32, 64: 64} if quick else {1: 60, 16: 192, 64: 384}
    inputs = Inputs()
    failures: dict[str, dict[str, int]] = {"service": {}, "direct": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    per_level: dict[int, dict[str, list[float]]] = {n: {k: [] for k in FIGURES} for n in LEVELS}
    unmatched = 0
    http_per_job: dict[str, dict[str, list[float]]] = {"service": {}, "direct": {}}
    try:
        async with StandIns(AGENTS, tmp / "comfy") as agents:
            env = service_env(tmp / "service", agents.urls)
            async with (
                ServiceProcess(env, tmp / "service.log") as service,
                FloorServer() as floor,
                grpc.aio.insecure_channel(floor.target) as floor_channel,
            ):
                wiring = service.info["provider_wiring"]
                clients = [DirectComfy(url) for url in agents.urls]
                async with grpc.aio.insecure_channel(service.target) as channel:
                    await _wait_ready(channel)
                    paths = {"service": _service_job(channel), "direct": _direct_job(clients)}
                    bare = floor_job(floor_channel)
                    await _segment(bare, 4, inputs.take(8))
                    for fn in paths.values():  # warm-up: connections, caches, first imports
                        await _segment(fn, 4, inputs.take(8))
                    await agents.dump()
                    await agents.reset()
                    for rep in range(reps):
                        for n in LEVELS:
                            order = ["service", "direct"] if rep % 2 == 0 else ["direct", "service"]
                            got: dict[str, dict[str, Any]] = {}
                            for path in order:
                                pngs = inputs.take(totals[n])  # before any CPU is read
                                cpu_service = cpu_seconds(service.pid)
                                cpu_agents = cpu_seconds(agents.pid)
                                cpu_caller = time.process_time()
                                got[path] = await _segment(paths[path], n, pngs)
                                got[path]["caller_cpu"] = time.process_time() - cpu_caller
                                got[path]["service_cpu"] = cpu_seconds(service.pid) - cpu_service
                                got[path]["agents_cpu"] = cpu_seconds(agents.pid) - cpu_agents
                                success, requests = await agents.dump()
                                got[path]["success"] = success
                                for reason in got[path]["failed"]:
                                    bucket = failures[path]
                                    bucket[reason] = bucket.get(reason, 0) + 1
                                for route, count in requests.items():
                                    per_job = count / totals[n]
                                    http_per_job[path].setdefault(route, []).append(per_job)
                                await agents.reset()
                            unmatched += _record(per_level[n], got, totals[n])
                            if n == 1:  # the gRPC hop's floor: a bare round trip, same messages
                                hop = await _segment(bare, 1, inputs.take(totals[n]))
                                per_level[n]["floor_p50"].append(
                                    ms(percentile(hop["latencies"], 50))
                                )
                                # The disk's: the service's outputs written durably again.
                                writes = await asyncio.to_thread(
                                    durable_writes, tmp / "service", totals[n]
                                )
                                if writes:
                                    per_level[n]["durable_write_p50"].append(
                                        ms(percentile(writes, 50))
                                    )
                for c in clients:
                    await c.aclose()
        light = await _light_agents(quick, tmp, failures)
        real = await _real_comfy(quick, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    figures: dict[str, Any] = {
        str(n): {k: spread(v, 2) for k, v in per_level[n].items() if v} for n in LEVELS
    }
    # Requests the agents received per job, all levels together (the median over segments).
    figures["light_agents"] = {k: spread(v, 2) for k, v in light.items() if v}
    if real is not None:
        figures["real_comfyui"] = real_figures(real)
    figures["agent_requests_per_job"] = {
        path: {route: round(statistics.median(v), 2) for route, v in sorted(routes.items())}
        for path, routes in http_per_job.items()
    }
    return {
        "name": NAME,
        "about": __doc__.strip().split("\n\n")[0],
        "setup": {
            "agents": AGENTS,
            "agent_max_concurrent_jobs": 64,
            "task": "ImageUpscale, SYNC, OUTPUT_DELIVERY_REFERENCES",
            "input": f"{INPUT_SIDE}x{INPUT_SIDE} PNG, a different one per job"
            f" ({REAL_SIDE} px on a real ComfyUI)",
            "jobs_per_segment": totals,
            "rounds": reps,
            "provider_wiring": wiring,
            "processes": "callers: bench process; service: bench.service_proc; stand-ins:"
            " bench.standin_proc",
            "finished_events_not_matched_to_a_success": unmatched,
        },
        "failed_jobs": failures,
        "notes": [
            f"{path}: {count} job(s) failed: {reason}"
            for path, reasons in failures.items()
            for reason, count in reasons.items()
        ],
        "figures": figures,
        "rows": _rows(figures),
    }


LIGHT_LEVELS = (16, 64)
LIGHT_PATHS = ("service", "direct", "lean", "floor", "lean_max", "floor_max")
"""The light-agents segments: the service; :mod:`bench.comfy_direct` (the hand-written
script); :mod:`bench.comfy_lean` (the service's own exchange with the agents, nothing else);
the bare grpc aio server of :mod:`bench.grpc_floor` (the service's gRPC messages, nothing
else). Those two are the floor of the service's CPU per job; ``_max``: the same closed loop,
at their own (several times higher) rate, to show how much CPU per job depends on it."""
PACED = ("lean", "floor")
"""Run at the jobs/s the service ran in the same round and level: a process's CPU per job
falls as its rate rises (more work per wake-up and per syscall), so a floor measured at its
own rate is not the service's (the ``_max`` segments beside them)."""


async def _light_agents(
    quick: bool, tmp: Path, failures: dict[str, dict[str, int]]
) -> dict[str, list[float]]:
    """Jobs/s and CPU per job at 16 and 64 callers against :mod:`bench.fast_agent` agents,
    which answer in a fraction of a stand-in's time (the stand-ins top out near 55 jobs/s).

    The callers of both paths run in a process of their own (:mod:`bench.callers`), so that
    what each process spends per job is read from ``/proc`` alike: the service, the agents and
    the callers (the gRPC client for the service, :mod:`bench.comfy_direct` for the direct
    path) share the machine's cores, and the throughput row is only the service's when the
    other two are small.

    The floor, in the same rounds: the least a Python process pays for this job's protocol
    work, i.e. the bare gRPC server's CPU per call (:mod:`bench.grpc_floor`: the same request
    bytes, 4 response messages and the status) plus the lean client's process CPU per job
    (:mod:`bench.comfy_lean`: the same 2 requests and websocket frames the service exchanges
    with the agents). ``service_over_floor_N`` is each round's service CPU per job over that
    round's floor. The service runs first in every round, closed loop; the floor's two
    segments then run open loop at the service's jobs/s of that round (:data:`PACED`), the
    direct client closed loop (its jobs/s is a row). Every job's PNG is made before any CPU
    is read, and the callers' CPU is their own reading around the segment alone."""
    total = {16: 32, 64: 64} if quick else {16: 320, 64: 640}
    reps = 1 if quick else 5
    got: dict[str, list[float]] = {}
    cores = os.cpu_count() or 1
    async with StandIns(AGENTS, tmp / "fast", module="bench.fast_agent") as agents:
        env = {
            "AISERVER_GRPC_HOST": "127.0.0.1",
            "AISERVER_GRPC_PORT": "0",
            "AISERVER_HTTP_ENABLED": "false",
            "AISERVER_DATA_DIR": str(tmp / "service-fast"),
            "AISERVER_AGENTS": json.dumps(
                [
                    {"url": url, "name": f"fast{i}", "max_concurrent_jobs": LIGHT_LEVELS[-1]}
                    for i, url in enumerate(agents.urls)
                ]
            ),
        }
        async with (
            ServiceProcess(env, tmp / "service-fast.log") as service,
            FloorServer() as floor,
            Callers(tmp / "callers-fast.log") as callers,
        ):
            await callers.ask({"service": service.target})  # connects and warms up
            await callers.ask({"direct": agents.urls})
            await callers.ask({"lean": agents.urls})
            await callers.ask({"floor": floor.target})
            await agents.dump()
            await agents.reset()
            for rep in range(reps):
                k = rep % (len(LIGHT_PATHS) - 1)
                others = LIGHT_PATHS[1:]
                order = ("service", *others[k:], *others[:k])  # the service first: its rate
                for n in LIGHT_LEVELS:
                    spent_by: dict[str, dict[str, float]] = {}
                    service_rate = 0.0
                    for path in order:
                        command: dict[str, Any] = {
                            "run": path.removesuffix("_max"),
                            "concurrency": n,
                        }
                        if path in PACED:  # at the service's rate of this round and level
                            command["rate"] = service_rate
                        await callers.ask({"inputs": total[n]})  # the PNGs: not counted
                        pids = {"service": service.pid, "agents": agents.pid, "floor": floor.pid}
                        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                        result = await callers.ask(command)
                        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
                        done = len(result["latencies"])
                        for reason in result["failed"]:
                            bucket = failures.setdefault(f"light {path} @{n}", {})
                            bucket[reason] = bucket.get(reason, 0) + 1
                        spent = {name: ms(after[name] - before[name]) / done for name in after}
                        spent["callers"] = ms(result["cpu_s"]) / done  # the segment alone
                        spent_by[path] = spent
                        if path == "service":
                            service_rate = result["jobs_per_s"]
                        figures = {f"{path}_jobs_per_s_{n}": result["jobs_per_s"]}
                        if path.startswith("floor"):
                            figures[f"{path}_grpc_cpu_ms_per_job_{n}"] = spent["floor"]
                        else:
                            figures[f"agents_cpu_ms_per_job_{path}_{n}"] = spent["agents"]
                            figures[f"callers_cpu_ms_per_job_{path}_{n}"] = spent["callers"]
                        if path == "service":
                            figures[f"service_cpu_ms_per_job_{n}"] = spent["service"]
                        for key, value in figures.items():
                            got.setdefault(key, []).append(value)
                        await agents.dump()
                        await agents.reset()
                    for key, value in _floor_figures(spent_by, n, cores).items():
                        got.setdefault(key, []).append(value)
    return got


def _floor_figures(spent: dict[str, dict[str, float]], n: int, cores: int) -> dict[str, float]:
    """One round's floor (ms of CPU per job), the service over it, and the jobs/s ``cores``
    could run given the CPU per job of every process of the service path (the service, its
    gRPC callers, the agents), with the service as measured and at its floor."""
    floor = spent["floor"]["floor"] + spent["lean"]["callers"]
    service = spent["service"]
    rest = service["callers"] + service["agents"]
    at_max = spent["floor_max"]["floor"] + spent["lean_max"]["callers"]
    return {
        f"floor_max_cpu_ms_per_job_{n}": at_max,
        f"floor_cpu_ms_per_job_{n}": floor,
        f"service_over_floor_{n}": service["service"] / floor,
        f"cpu_bound_jobs_per_s_{n}": cores * 1000 / (service["service"] + rest),
        f"cpu_bound_at_floor_jobs_per_s_{n}": cores * 1000 / (floor + rest),
    }


def _record(f: dict[str, list[float]], got: dict[str, dict[str, Any]], total: int) -> int:
    """Add one round of one level to ``f``; returns the finished events left unmatched."""
    s, d = got["service"], got["direct"]
    f["service_p50"].append(ms(percentile(s["latencies"], 50)))
    f["service_p99"].append(ms(percentile(s["latencies"], 99)))
    f["direct_p50"].append(ms(percentile(d["latencies"], 50)))
    f["direct_p99"].append(ms(percentile(d["latencies"], 99)))
    f["added_p50"].append(f["service_p50"][-1] - f["direct_p50"][-1])
    f["added_p99"].append(f["service_p99"][-1] - f["direct_p99"][-1])
    f["service_jobs_per_s"].append(s["jobs_per_s"])
    f["direct_jobs_per_s"].append(d["jobs_per_s"])
    f["service_cpu_ms_per_job"].append(ms(s["service_cpu"]) / total)
    f["standin_cpu_ms_per_job_service"].append(ms(s["agents_cpu"]) / total)
    f["standin_cpu_ms_per_job_direct"].append(ms(d["agents_cpu"]) / total)
    f["caller_cpu_ms_per_job_service"].append(ms(s["caller_cpu"]) / total)
    f["caller_cpu_ms_per_job_direct"].append(ms(d["caller_cpu"]) / total)
    finals = _after_success(s["done"], s["success"], by_label=True)
    if finals:
        f["final_p50"].append(ms(percentile(finals, 50)))
        f["final_p99"].append(ms(percentile(finals, 99)))
    direct_after = _after_success(d["done"], d["success"], by_label=False)
    if direct_after:
        f["direct_after_success_p50"].append(ms(percentile(direct_after, 50)))
    return len(s["done"]) - len(finals)


def durable_writes(data_dir: Path, count: int) -> list[float]:
    """Seconds each of up to ``count`` of the service's stored outputs (under ``data_dir``)
    takes to be written again the way the artifact store writes new bytes: a temporary file,
    its fsync, the rename, the folder's fsync. The disk's part of a job's put, which must end
    before ``finished`` (a record saying SUCCEEDED must not point at a file a power loss
    emptied) and which the direct client never pays; on a shared disk it swings with the other
    writers (the ext4 journal every fsync commits)."""
    sources = sorted(
        (p for p in (data_dir / "artifacts").rglob("*.png") if p.is_file()),
        key=lambda p: p.stat().st_mtime,
    )[-count:]
    folder = data_dir / "durable-floor"
    folder.mkdir(exist_ok=True)
    took = []
    for i, source in enumerate(sources):
        data = source.read_bytes()
        tmp, final = folder / f"{i}.part", folder / f"{i}.png"
        began = time.perf_counter()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        took.append(time.perf_counter() - began)
    shutil.rmtree(folder, ignore_errors=True)
    return took


def _rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    saturated = f"more jobs than the {AGENTS} agents run at once: both paths queue"
    rows = []
    for n in LEVELS:
        f = figures[str(n)]
        hop = ""
        if n == 1:
            hop = f"; floor (a bare gRPC round trip) {f['floor_p50']['median']:.2f} ms"
            if "durable_write_p50" in f:  # what the direct client never pays
                hop += (
                    f" + the output's durable write (write, fsync, rename, folder fsync)"
                    f" {f['durable_write_p50']['median']:.2f} ms"
                )
        rows.append(
            row(
                f"orchestration: added p50 latency @{n}",
                f["added_p50"],
                "ms",
                target=3.0 if n == 1 else None,
                better="lower",
                baseline=f"direct {f['direct_p50']['median']:.1f} ms,"
                f" service {f['service_p50']['median']:.1f} ms{hop}",
                note=saturated if n > AGENTS else "",
            )
        )
        if n == 1:
            rows.append(
                row(
                    "orchestration: floor of the added p50 @1 (bare gRPC round trip)",
                    f["floor_p50"],
                    "ms",
                    better="lower",
                    baseline="bench.grpc_floor's server: the same request bytes, 4 response"
                    " messages and the status, no work; same rounds as the row above",
                )
            )
            if "durable_write_p50" in f:
                rows.append(
                    row(
                        "orchestration: floor of the added p50 @1 (the output's durable write)",
                        f["durable_write_p50"],
                        "ms",
                        better="lower",
                        baseline="the service's stored outputs written again as the artifact"
                        " store writes new bytes (temporary file, fsync, rename, folder fsync),"
                        " in the service's data folder, same rounds; the direct client pays none",
                    )
                )
        if n > 1:  # the target at load: within 1.25x of the direct client's own p50
            pairs = zip(f["service_p50"]["runs"], f["direct_p50"]["runs"], strict=True)
            rows.append(
                row(
                    f"orchestration: p50 latency @{n} / direct client's",
                    spread([sv / d for sv, d in pairs if d], 3),
                    "x",
                    target=1.25,
                    better="lower",
                )
            )
        rows.append(
            row(
                f"orchestration: added p99 latency @{n}",
                f["added_p99"],
                "ms",
                better="lower",
                baseline=f"direct {f['direct_p99']['median']:.1f} ms,"
                f" service {f['service_p99']['median']:.1f} ms",
            )
        )
    top = figures[str(LEVELS[-1])]
    rows.append(
        row(
            f"orchestration: jobs/s @{LEVELS[-1]}, stand-ins (persistence on)",
            top["service_jobs_per_s"],
            "jobs/s",
            target=300.0,
            baseline=f"direct client {top['direct_jobs_per_s']['median']:.0f} jobs/s against"
            " the same stand-ins",
        )
    )
    rows += real_rows(figures.get("real_comfyui"))
    rows += _light_rows(figures["light_agents"])
    cpu = top["service_cpu_ms_per_job"]
    calls = {
        path: sum(v for route, v in routes.items() if not route.startswith("GET /ws"))
        for path, routes in figures["agent_requests_per_job"].items()
    }
    rows.append(
        row(
            "orchestration: service CPU per job",
            cpu,
            "ms",
            target=3.0,
            better="lower",
            baseline=f"=> at most {1000 / cpu['median']:.0f} jobs/s per busy core; the direct"
            f" client uses {top['caller_cpu_ms_per_job_direct']['median']:.1f} ms/job, the gRPC"
            f" caller {top['caller_cpu_ms_per_job_service']['median']:.1f}, the stand-ins"
            f" {top['standin_cpu_ms_per_job_direct']['median']:.1f}; HTTP requests to agents"
            f" per job: service {calls.get('service', 0):.1f}, direct {calls.get('direct', 0):.1f}",
            note=_floor_note(figures["light_agents"]),
        )
    )
    for n in LEVELS:
        f = figures[str(n)]
        if "final_p50" not in f:
            continue
        after = f.get("direct_after_success_p50", {}).get("median", float("nan"))
        rows.append(
            row(
                f"orchestration: execution_success -> finished p50 @{n}",
                f["final_p50"],
                "ms",
                target=5.0 if n == 1 else None,
                better="lower",
                baseline=f"p99 {f['final_p99']['median']:.1f} ms; the direct client has its"
                f" output {after:.1f} ms after",
            )
        )
    return rows


def _floor_note(light: dict[str, Any]) -> str:
    """The light-agents floor, beside the stand-ins' CPU row (whose agents send more frames)."""
    key = f"floor_cpu_ms_per_job_{LIGHT_LEVELS[-1]}"
    if key not in light:
        return ""
    return f"floor with light agents @{LIGHT_LEVELS[-1]}: {light[key]['median']:.2f} ms (below)"


def _light_rows(light: dict[str, Any]) -> list[dict[str, Any]]:
    """The throughput row at the top level, each level's CPU per job by process, and the
    floors beside them (:func:`_floor_figures`)."""

    def med(key: str) -> float:
        return float(light[key]["median"]) if key in light else float("nan")

    top = LIGHT_LEVELS[-1]
    rows = [
        row(
            f"orchestration: jobs/s @{top}, light agents (persistence on)",
            light[f"service_jobs_per_s_{top}"],
            "jobs/s",
            target=300.0,
            baseline=f"direct client {med(f'direct_jobs_per_s_{top}'):.0f} jobs/s against"
            f" the same {AGENTS} bench.fast_agent agents; the CPU per job of service + callers"
            f" + agents allows {med(f'cpu_bound_jobs_per_s_{top}'):.0f} on {os.cpu_count()}"
            f" cores, {med(f'cpu_bound_at_floor_jobs_per_s_{top}'):.0f} with the service at"
            " its floor",
            note="2 cores shared by the service, the agents and the callers (own process)",
        ),
        row(
            f"orchestration: jobs/s @{top} the CPU per job allows, light agents",
            light.get(f"cpu_bound_jobs_per_s_{top}"),
            "jobs/s",
            baseline=f"{os.cpu_count()} cores / (service + gRPC callers + agents) CPU per job,"
            f" each round; with the service at its floor"
            f" {med(f'cpu_bound_at_floor_jobs_per_s_{top}'):.0f} (the floor measured at the"
            f" service's rate: lean client {med(f'lean_jobs_per_s_{top}'):.0f} jobs/s, bare"
            f" gRPC server {med(f'floor_jobs_per_s_{top}'):.0f})",
        ),
    ]
    for n in LIGHT_LEVELS:
        rows.append(
            row(
                f"orchestration: service CPU per job @{n}, light agents",
                light[f"service_cpu_ms_per_job_{n}"],
                "ms",
                better="lower",
                baseline=f"service {med(f'service_jobs_per_s_{n}'):.0f} jobs/s, direct"
                f" {med(f'direct_jobs_per_s_{n}'):.0f}; the bench's own CPU per job: gRPC"
                f" callers {med(f'callers_cpu_ms_per_job_service_{n}'):.2f} ms, agents"
                f" {med(f'agents_cpu_ms_per_job_service_{n}'):.2f} (serving the lean client"
                f" at the same rate {med(f'agents_cpu_ms_per_job_lean_{n}'):.2f}); direct"
                f" client (closed loop) {med(f'callers_cpu_ms_per_job_direct_{n}'):.2f}, agents"
                f" {med(f'agents_cpu_ms_per_job_direct_{n}'):.2f}",
                note=f"floor {med(f'floor_cpu_ms_per_job_{n}'):.2f} ms:"
                f" x{med(f'service_over_floor_{n}'):.2f}",
            )
        )
        rows.append(
            row(
                f"orchestration: floor CPU per job @{n} at its own rate, light agents",
                light.get(f"floor_max_cpu_ms_per_job_{n}"),
                "ms",
                better="lower",
                baseline=f"closed loop: bare gRPC server"
                f" {med(f'floor_max_grpc_cpu_ms_per_job_{n}'):.2f} ms at"
                f" {med(f'floor_max_jobs_per_s_{n}'):.0f} jobs/s + lean client"
                f" {med(f'callers_cpu_ms_per_job_lean_max_{n}'):.2f} at"
                f" {med(f'lean_max_jobs_per_s_{n}'):.0f} (agents"
                f" {med(f'agents_cpu_ms_per_job_lean_max_{n}'):.2f}); at the service's rate"
                f" {med(f'floor_cpu_ms_per_job_{n}'):.2f}: not the service's floor",
            )
        )
        rows.append(
            row(
                f"orchestration: service CPU per job @{n} / floor, light agents",
                light.get(f"service_over_floor_{n}"),
                "x",
                better="lower",
                baseline=f"floor {med(f'floor_cpu_ms_per_job_{n}'):.2f} ms = bare gRPC server"
                f" {med(f'floor_grpc_cpu_ms_per_job_{n}'):.2f} + lean client"
                f" {med(f'callers_cpu_ms_per_job_lean_{n}'):.2f} (the service's 2 requests and"
                f" frames per job, nothing else), both paced at the service's"
                f" {med(f'service_jobs_per_s_{n}'):.0f} jobs/s (ran"
                f" {med(f'floor_jobs_per_s_{n}'):.0f} and {med(f'lean_jobs_per_s_{n}'):.0f});"
                " each round's ratio",
            )
        )
    return rows


def run(quick: bool) -> dict[str, Any]:
    watch = LoadWatch()
    result = asyncio.run(_run(quick))
    result["load"] = watch.done()
    return result


def run_real(quick: bool) -> dict[str, Any]:
    """Only the real-ComfyUI part (``--real``): the rows a ComfyUI is needed for."""
    watch = LoadWatch()
    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-real-"))
    try:
        real = asyncio.run(_real_comfy(quick, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {"real_comfyui": real_figures(real or {})}
    return {
        "name": f"{NAME}_real",
        "about": _real_comfy.__doc__,
        "figures": figures,
        "rows": real_rows(figures["real_comfyui"] if real is not None else None),
        "load": watch.done(),
    }


def run_light(quick: bool) -> dict[str, Any]:
    """Only the light-agents part (``--light``): jobs/s, CPU per job and the floors."""
    watch = LoadWatch()
    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-light-"))
    failures: dict[str, dict[str, int]] = {}
    try:
        light = asyncio.run(_light_agents(quick, tmp, failures))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {k: spread(v, 2) for k, v in light.items() if v}
    return {
        "name": f"{NAME}_light",
        "about": _light_agents.__doc__,
        "failed_jobs": failures,
        "figures": {"light_agents": figures},
        "rows": _light_rows(figures),
        "load": watch.done(),
    }


if __name__ == "__main__":
    import sys

    quick = "--quick" in sys.argv
    if "--real" in sys.argv:
        print(json.dumps(run_real(quick), indent=2))
    elif "--light" in sys.argv:
        print(json.dumps(run_light(quick), indent=2))
    else:
        print(json.dumps(run(quick), indent=2))
