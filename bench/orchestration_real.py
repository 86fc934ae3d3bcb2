"""The real-ComfyUI rows of :mod:`bench.orchestration` (``--real``): the same 64 px upscale
through the service (gRPC SYNC, gRPC RESULT, the embedded HTTP shim) and with the direct
client, against one ComfyUI named by ``BENCH_COMFY_URL``.

ComfyUI's own time per prompt drifts by tens of ms between rounds, so the paths are
interleaved finely and compared pair by pair (:mod:`bench.paired`):

- @1: cycles of one job per path, the paths in the orders of a Williams square (each path at
  each place and after each other path equally often); a service path's added latency is the
  median over cycles of its job's latency minus the direct client's job of the same cycle,
  with a bootstrap interval. The same difference is also taken outside ComfyUI's own run
  (``execution_start`` -> ``execution_success`` from its ``/history``), which removes what
  ComfyUI's time varies by from job to job.
- @16: cycles of one short segment per path (16 callers), same orders; jobs/s as the median
  over cycles of the path's jobs/s over the direct client's in the same cycle.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import grpc
from imagetasks.v1 import common_pb2

from bench.client_loop import (
    Inputs,
    JobFn,
    _direct_job,
    _http_job,
    _segment,
    _service_job,
    _wait_ready,
)
from bench.comfy_direct import DirectComfy
from bench.common import cpu_seconds, listening_pid, ms, percentile, row, spread
from bench.paired import balanced_orders, median_interval, paired
from bench.service_proc import ServiceProcess, service_env

REAL_SIDE = 64
"""The issue's real-ComfyUI comparison: a 2x upscale of a 64 px image."""
REAL_PATHS = ("grpc", "grpc_result", "http", "direct")
REAL_NAMES = {"grpc": "gRPC", "grpc_result": "gRPC RESULT", "http": "HTTP"}
"""The service's paths in the real rows: gRPC SYNC (every event: accepted, queue and progress
updates, the output, finished), gRPC RESULT (``finished`` alone) and the embedded HTTP shim
(``Sync=true``, which asks the service for RESULT in-process). gRPC RESULT is the like-for-like
comparison with the shim and with the direct client, which waits for the output only."""
PAIRED = (
    "added_p50_1_",
    "added_outside_comfy_1_",
    "added_comfy_run_1_",
    "jobs_per_s_16_ratio_",
)
"""Figures (key prefixes) that are per-cycle paired differences or ratios: summarised as a
median with its bootstrap interval, not as a spread of rounds."""


def real_figures(got: dict[str, list[float]]) -> dict[str, Any]:
    """Each figure's summary: paired ones by :func:`median_interval`, the rest by ``spread``."""
    return {
        key: median_interval(values, 2) if key.startswith(PAIRED) else spread(values, 2)
        for key, values in got.items()
        if values
    }


async def _comfy_runs(
    session: aiohttp.ClientSession, url: str, count: int
) -> list[tuple[str, float | None]]:
    """ComfyUI's last ``count`` prompts, in the order they ran (it runs one at a time): each
    one's id and its own run in ms (``execution_start`` -> ``execution_success``), None when
    it did not succeed."""
    async with session.get(f"{url}/history", params={"max_items": str(count)}) as answer:
        history = await answer.json()
    runs: list[tuple[str, float | None]] = []
    for prompt_id, entry in history.items():
        stamps = {
            name: data.get("timestamp")
            for name, data in (entry.get("status") or {}).get("messages", [])
        }
        start, end = stamps.get("execution_start"), stamps.get("execution_success")
        runs.append((prompt_id, float(end - start) if start and end else None))
    return runs


async def _real_comfy(quick: bool, tmp: Path) -> dict[str, list[float]] | None:
    """The same upscale on a real ComfyUI (``BENCH_COMFY_URL``) through the service over gRPC
    (SYNC, and RESULT: the finished job alone), through its HTTP shim (embedded, ``POST
    /api/ImageUpscale`` with ``Sync=true``) and with the direct client. @1: cycles of one job
    per path in balanced orders; each service job's latency minus the direct job's of its
    cycle (and the same outside ComfyUI's own run, from its ``/history``). @16: cycles of one
    short segment per path, same orders: jobs/s over the direct client's of the cycle, p50,
    the service's CPU per job and ComfyUI's CPU per second of wall time. None when no
    ComfyUI is configured. The agent runs one prompt at a time with one queued ahead (the
    setting that keeps it busy); the direct client's 16 callers queue on ComfyUI itself.
    ComfyUI's CPU is read from ``/proc`` when it listens on this machine (``BENCH_COMFY_PID``
    names it otherwise)."""
    url = os.environ.get("BENCH_COMFY_URL", "").rstrip("/")
    if not url:
        return None
    port = urlsplit(url).port or 80
    comfy_pid = int(os.environ.get("BENCH_COMFY_PID") or 0) or listening_pid(port)
    inputs = Inputs(REAL_SIDE)
    orders = balanced_orders(len(REAL_PATHS))
    cycles = {1: 8 if quick else 96, 16: 4 if quick else 12}
    per_segment = 16 if quick else 32
    got: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        got.setdefault(key, []).append(value)

    agent = {"url": url, "name": "real", "max_concurrent_jobs": 1, "queue_ahead": 1}
    env = service_env(tmp / "service-real", [], http=True, AISERVER_LOCAL_UPSCALE="off")
    env["AISERVER_AGENTS"] = json.dumps([agent])
    async with (
        ServiceProcess(env, tmp / "service-real.log") as service,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        grpc.aio.insecure_channel(service.target) as channel,
    ):
        client = DirectComfy(url)
        await _wait_ready(channel)
        paths: dict[str, JobFn] = {
            "grpc": _service_job(channel),
            "grpc_result": _service_job(channel, common_pb2.RESPONSE_MODE_RESULT),
            "http": _http_job(session, f"http://127.0.0.1:{service.info['http_port']}"),
            "direct": _direct_job([client], REAL_SIDE),
        }
        for _ in range(3):  # models loaded, caches warm, every switch of path seen once
            for p in REAL_PATHS:
                await _segment(paths[p], 1, inputs.take(1))
        await _one_caller(paths, orders, cycles[1], inputs, session, url, add)
        for cycle in range(cycles[16]):
            rate: dict[str, float] = {}
            for p in (REAL_PATHS[i] for i in orders[cycle % len(orders)]):
                cpu_service = cpu_seconds(service.pid)
                cpu_comfy = cpu_seconds(comfy_pid) if comfy_pid else 0.0
                pngs = inputs.take(per_segment)
                start = time.perf_counter()
                result = await _segment(paths[p], 16, pngs)
                wall = time.perf_counter() - start
                done = len(result["latencies"])
                rate[p] = result["jobs_per_s"]
                add(f"{p}_jobs_per_s_16", rate[p])
                add(f"{p}_p50_16", ms(percentile(result["latencies"], 50)))
                if p != "direct":
                    add(
                        f"service_cpu_ms_per_job_{p}_16",
                        ms(cpu_seconds(service.pid) - cpu_service) / done,
                    )
                if comfy_pid:  # cores' worth of CPU ComfyUI used while the segment ran
                    add(f"comfy_busy_{p}_16", (cpu_seconds(comfy_pid) - cpu_comfy) / wall)
                if result["failed"]:
                    add(f"failed_{p}", len(result["failed"]))
            for p in REAL_NAMES:
                got.setdefault(f"jobs_per_s_16_ratio_{p}", []).extend(
                    paired([rate[p]], [rate["direct"]], ratio=True)
                )
        await client.aclose()
    return got


async def _one_caller(
    paths: dict[str, JobFn],
    orders: list[list[int]],
    cycles: int,
    inputs: Inputs,
    session: aiohttp.ClientSession,
    url: str,
    add: Callable[[str, float], None],
) -> None:
    """@1: ``cycles`` cycles of one job per path; per cycle, each service path's latency and
    its time outside ComfyUI's run, minus the direct job's. A cycle whose prompts cannot be
    matched to its jobs in ComfyUI's history (a retried job, another client's prompt) keeps
    its latencies and is left out of the outside-ComfyUI figures (``unmatched_cycles_1``)."""
    latency: dict[str, list[float]] = {p: [] for p in REAL_PATHS}
    outside: dict[str, list[float]] = {p: [] for p in REAL_PATHS}
    inside: dict[str, list[float]] = {p: [] for p in REAL_PATHS}
    unmatched = 0
    for cycle in range(cycles):
        order = [REAL_PATHS[i] for i in orders[cycle % len(orders)]]
        took: dict[str, float] = {}
        direct_id = ""
        for p in order:
            result = await _segment(paths[p], 1, inputs.take(1))
            took[p] = ms(result["latencies"][0])
            if p == "direct":
                direct_id = next(iter(result["done"]))
        runs = await _comfy_runs(session, url, len(order))
        ran: dict[str, float | None] = {}
        if len(runs) == len(order) and runs[order.index("direct")][0] == direct_id:
            ran = {p: run for p, (_, run) in zip(order, runs, strict=True)}
        if not ran or None in ran.values():
            unmatched += 1
            ran = {}
        for p in order:
            latency[p].append(took[p])
            if ran:
                inside[p].append(ran[p] or 0.0)
                outside[p].append(took[p] - inside[p][-1])
    for p in REAL_PATHS:
        add(f"{p}_p50_1", statistics.median(latency[p]))
        if outside[p]:
            add(f"{p}_outside_comfy_p50_1", statistics.median(outside[p]))
            add(f"{p}_comfy_run_p50_1", statistics.median(inside[p]))
    for p in REAL_NAMES:
        for key, per_path in (
            ("added_p50_1_", latency),
            ("added_outside_comfy_1_", outside),
            ("added_comfy_run_1_", inside),
        ):
            for diff in paired(per_path[p], per_path["direct"]):
                add(f"{key}{p}", diff)
    add("unmatched_cycles_1", unmatched)


def real_rows(real: dict[str, Any] | None) -> list[dict[str, Any]]:
    skip = "set BENCH_COMFY_URL to a ComfyUI with RealESRGAN_x2.pth to measure"
    if real is None:
        return [
            row(f"real ComfyUI: added p50 @1, 64 px upscale ({name})", None, "ms", note=skip)
            for name in REAL_NAMES.values()
        ] + [
            row("real ComfyUI: jobs/s @16 / direct client", None, "x", note=skip),
        ]

    def med(key: str) -> float:
        return float(real[key]["median"]) if key in real else float("nan")

    def busy(path: str) -> str:
        return f"{med(f'comfy_busy_{path}_16') * 20:.0f}"

    rows = []
    for p, name in REAL_NAMES.items():
        added = real.get(f"added_p50_1_{p}")
        if added is None:
            continue
        rows.append(
            row(
                f"real ComfyUI: added p50 @1, 64 px upscale ({name})",
                added,
                "ms",
                target=3.0,
                better="lower",
                baseline=f"median of {added['n']} per-cycle differences to the direct client's"
                f" job beside it, [..] its 95% bootstrap interval, IQR {added['iqr'][0]:+.1f}.."
                f"{added['iqr'][1]:+.1f}; p50 direct {med('direct_p50_1'):.1f} ms, service"
                f" {med(f'{p}_p50_1'):.1f}",
            )
        )
        outside = real.get(f"added_outside_comfy_1_{p}")
        if outside is None:
            continue
        run = real[f"added_comfy_run_1_{p}"]
        rows.append(
            row(
                f"real ComfyUI: added @1 outside ComfyUI's own run ({name})",
                outside,
                "ms",
                better="lower",
                baseline=f"the same pairs less each prompt's execution_start -> execution_success"
                f" (its /history): direct {med('direct_outside_comfy_p50_1'):.1f} ms, service"
                f" {med(f'{p}_outside_comfy_p50_1'):.1f}; ComfyUI's run itself"
                f" {run['median']:+.1f} ms [{run['min']:+.1f}..{run['max']:+.1f}] (direct"
                f" {med('direct_comfy_run_p50_1'):.1f}, service {med(f'{p}_comfy_run_p50_1'):.1f})",
            )
        )
    for p, name in REAL_NAMES.items():
        ratio = real.get(f"jobs_per_s_16_ratio_{p}")
        if ratio is None:
            continue
        rows.append(
            row(
                f"real ComfyUI: jobs/s @16 / direct client{'' if p == 'grpc' else f' ({name})'}",
                ratio,
                "x",
                target=1.0,
                baseline=f"median of {ratio['n']} per-cycle ratios of short segments, [..] its"
                f" 95% bootstrap interval; service {med(f'{p}_jobs_per_s_16'):.1f} jobs/s,"
                f" direct {med('direct_jobs_per_s_16'):.1f}; p50 {med(f'{p}_p50_16'):.0f} ms,"
                f" direct {med('direct_p50_16'):.0f}",
                note=f"ComfyUI CPU s per 20 s: service {busy(p)}, direct {busy('direct')}"
                if "comfy_busy_direct_16" in real
                else "",
            )
        )
        rows.append(
            row(
                f"real ComfyUI: service CPU per job @16 ({name})",
                real[f"service_cpu_ms_per_job_{p}_16"],
                "ms",
                better="lower",
            )
        )
    return rows
