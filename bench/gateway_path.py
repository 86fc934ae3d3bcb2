"""The HTTP shim's job path: the same SYNC ImageUpscale as a multipart POST through the shim
and over gRPC, against the same instant ComfyUI stand-ins.

- Stand-ins: ``AGENTS`` in one subprocess (:mod:`bench.standin_proc`), no delay per step.
- Service: its own process (:mod:`bench.service_proc`, SQLite, INFO logging to a file), every
  agent with ``max_concurrent_jobs = 64``.
- Modes: ``embedded`` (the production setup ``make run`` / ``aiserver serve`` starts: the shim
  runs in the service's process and event loop) and ``separate`` (``aiserver gateway
  --target`` in its own process, a gRPC client over loopback).
- HTTP: ``POST /api/ImageUpscale`` with ``Sync=true`` and the image (multipart, fields first,
  as AI Server's clients send), one keep-alive aiohttp session in the bench process; the
  answer is the job's JSON with the output URLs (the shim's SYNC + OUTPUT_DELIVERY_REFERENCES).
  gRPC: the same job, SYNC + references, the ``finished`` event (as in ``orchestration.py``).
- Closed loop at 1 and 16 callers. Latency: one segment per round in which the jobs
  alternate between the paths (job k takes HTTP when k is odd), so that both see the same
  load from the rest of a shared machine; the added p50 is HTTP's p50 minus gRPC's in that
  segment. CPU: then one segment per path (which goes first alternates by round).

Figures: p50 of each path and the added p50; the shim's CPU per job: the service's process
CPU per HTTP job minus per gRPC job (embedded: it can be negative, the in-process calls skip
the gRPC server's HTTP/2 work), plus the gateway process's CPU per job (separate), all from
``/proc``.

Separate mode also measures the gateway's floor in the same rounds, as a third path: a bare
aiohttp handler that cuts the image out of the body and makes the same grpc.aio call
(RESPONSE_MODE_RESULT, answered at ``finished``) in a process of its own
(``bench.gateway_floor``'s ``http-bare-result``): its added p50 and CPU per job, figured as
the gateway's, are printed beside the gateway's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from bench import ROOT
from bench.client_loop import _http_job
from bench.common import LoadWatch, cpu_seconds, free_port, ms, percentile, row, spread
from bench.orchestration import Inputs, JobFailed, JobFn, _segment, _service_job, _wait_ready
from bench.service_proc import ServiceProcess, service_env
from bench.standin_proc import StandIns

NAME = "gateway_path"
AGENTS = 4
LEVELS = (1, 16)
MODES = ("embedded", "separate")


class _Gateway:
    """``aiserver gateway`` in its own process."""

    def __init__(self, target: str, log: Path, root: Path | None = None) -> None:
        self.target = target
        self.log = log
        self.root = root
        """Another source tree to run the gateway from (its ``src`` first on the path)."""
        self.port = free_port()
        self._proc: asyncio.subprocess.Process | None = None
        self._log_fh: Any = None

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> _Gateway:
        self._log_fh = self.log.open("wb")
        first = [str(self.root / "src"), str(self.root)] if self.root else [str(ROOT)]
        path = os.pathsep.join(p for p in (*first, os.environ.get("PYTHONPATH", "")) if p)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "aiserver", "gateway", "--target", self.target, "--port", str(self.port)),
            stdout=self._log_fh,
            stderr=self._log_fh,
            cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": path},
        )
        await self._wait_listening()
        return self

    async def _wait_listening(self) -> None:
        async with asyncio.timeout(60):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.1)
                    continue
                writer.close()
                return

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.returncode is None:
            self._proc.terminate()
            try:
                async with asyncio.timeout(20):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._log_fh is not None:
            self._log_fh.close()


class _Floor(_Gateway):
    """The separate gateway's floor (see the module doc) in its own process."""

    async def __aenter__(self) -> _Floor:
        self._log_fh = self.log.open("wb")
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "bench.gateway_floor", "--serve", "http-bare-result"),
            *("--target", self.target, "--port", str(self.port)),
            stdout=self._log_fh,
            stderr=self._log_fh,
            cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": path},
        )
        await self._wait_listening()
        return self


def _jobs(quick: bool) -> tuple[dict[int, int], dict[int, int]]:
    """Jobs per latency segment and per CPU segment, by number of callers."""
    if quick:
        return {1: 6, 16: 16}, {1: 6, 16: 16}
    return {1: 60, 16: 192}, {1: 40, 16: 128}


FIGURES = (
    "grpc_p50",
    "http_p50",
    "added_p50",
    "grpc_p99",
    "http_p99",
    "service_cpu_ms_per_job_grpc",
    "service_cpu_ms_per_job_http",
    "gateway_cpu_ms_per_job",
    "shim_cpu_ms_per_job",
    "floor_p50",
    "floor_added_p50",
    "floor_cpu_ms_per_job",
)
"""``floor_*``: separate mode only (the bare handler's path, figured as the gateway's)."""


async def _mode(
    mode: str, quick: bool, inputs: Inputs, tmp: Path, agents: StandIns
) -> dict[int, dict[str, list[float]]]:
    reps = 1 if quick else 5
    mixed, totals = _jobs(quick)
    per_level: dict[int, dict[str, list[float]]] = {n: {k: [] for k in FIGURES} for n in LEVELS}
    env = service_env(tmp / f"service-{mode}", agents.urls, http=mode == "embedded")
    async with (
        ServiceProcess(env, tmp / f"service-{mode}.log") as service,
        contextlib.AsyncExitStack() as stack,
    ):
        # The HTTP front processes measured beside the service, by path.
        fronts: dict[str, _Gateway] = {}
        if mode == "separate":
            fronts["http"] = await stack.enter_async_context(
                _Gateway(service.target, tmp / "gateway.log")
            )
            fronts["floor"] = await stack.enter_async_context(
                _Floor(service.target, tmp / "floor.log")
            )
            base = fronts["http"].url
        else:
            base = f"http://127.0.0.1:{service.info['http_port']}"
        connector = aiohttp.TCPConnector(limit=0)
        async with (
            grpc.aio.insecure_channel(service.target) as channel,
            aiohttp.ClientSession(connector=connector) as session,
        ):
            await _wait_ready(channel)
            paths = {"grpc": _service_job(channel), "http": _http_job(session, base)}
            if "floor" in fronts:
                paths["floor"] = _http_job(session, fronts["floor"].url)
            for fn in paths.values():  # warm-up: connections, caches, first imports
                await _segment(fn, 4, inputs.take(4 if quick else 16))
            await agents.reset()
            for rep in range(reps):
                for n in LEVELS:
                    # As many jobs per path as with two paths.
                    jobs = mixed[n] * len(paths) // 2
                    latencies = await _mixed(paths, n, inputs.take(jobs))
                    await agents.dump()
                    await agents.reset()
                    order = list(paths)[rep % len(paths) :] + list(paths)[: rep % len(paths)]
                    got: dict[str, dict[str, Any]] = {}
                    for path in order:
                        front = fronts.get(path)
                        cpu_service = cpu_seconds(service.pid)
                        cpu_front = cpu_seconds(front.pid) if front else 0.0
                        got[path] = await _segment(paths[path], n, inputs.take(totals[n]))
                        done = len(got[path]["latencies"])
                        got[path]["service_cpu"] = ms(cpu_seconds(service.pid) - cpu_service)
                        got[path]["gateway_cpu"] = (
                            ms(cpu_seconds(front.pid) - cpu_front) if front else 0.0
                        )
                        got[path]["done"] = done
                        await agents.dump()
                        await agents.reset()
                    _record(per_level[n], got, latencies)
    return per_level


async def _mixed(
    paths: dict[str, JobFn], concurrency: int, inputs: list[bytes]
) -> dict[str, list[float]]:
    """Latencies by path, the jobs taking the paths in turn (see the module doc)."""
    names = list(paths)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    queue = iter(enumerate(inputs))

    async def caller(index: int) -> None:
        for k, png in queue:
            path = names[k % len(names)]
            start = time.perf_counter()
            try:
                _, done_at = await paths[path](index, png)
            except JobFailed:
                continue
            latencies[path].append(done_at - start)

    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    if not all(latencies.values()):
        raise RuntimeError("every job of a path failed")
    return latencies


def _record(
    figures: dict[str, list[float]],
    got: dict[str, dict[str, Any]],
    latencies: dict[str, list[float]],
) -> None:
    grpc_run, http_run = got["grpc"], got["http"]
    for path, values in latencies.items():
        figures[f"{path}_p50"].append(ms(percentile(values, 50)))
        if f"{path}_p99" in figures:
            figures[f"{path}_p99"].append(ms(percentile(values, 99)))
    figures["added_p50"].append(figures["http_p50"][-1] - figures["grpc_p50"][-1])
    grpc_cpu = grpc_run["service_cpu"] / grpc_run["done"]
    http_service_cpu = http_run["service_cpu"] / http_run["done"]
    gateway_cpu = http_run["gateway_cpu"] / http_run["done"]
    figures["service_cpu_ms_per_job_grpc"].append(grpc_cpu)
    figures["service_cpu_ms_per_job_http"].append(http_service_cpu)
    figures["gateway_cpu_ms_per_job"].append(gateway_cpu)
    figures["shim_cpu_ms_per_job"].append(http_service_cpu + gateway_cpu - grpc_cpu)
    if "floor" in got:
        floor = got["floor"]
        figures["floor_added_p50"].append(figures["floor_p50"][-1] - figures["grpc_p50"][-1])
        figures["floor_cpu_ms_per_job"].append(
            (floor["service_cpu"] + floor["gateway_cpu"]) / floor["done"] - grpc_cpu
        )


async def _run(quick: bool, modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    watch = LoadWatch()
    inputs = Inputs()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-"))
    results: dict[str, dict[int, dict[str, list[float]]]] = {}
    try:
        async with StandIns(AGENTS, tmp / "comfy") as agents:
            for mode in modes:
                results[mode] = await _mode(mode, quick, inputs, tmp, agents)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {
        mode: {str(n): {k: spread(v, 2) for k, v in levels[n].items() if v} for n in LEVELS}
        for mode, levels in results.items()
    }
    return {
        "name": NAME,
        "about": __doc__.strip().split("\n\n")[0],
        "setup": {
            "agents": AGENTS,
            "task": "ImageUpscale SYNC: multipart POST /api/ImageUpscale Sync=true vs gRPC"
            " SYNC + OUTPUT_DELIVERY_REFERENCES",
            "modes": list(modes),
            "rounds": 1 if quick else 5,
            "jobs_per_segment": dict(zip(("latency", "cpu_per_path"), _jobs(quick), strict=True)),
        },
        "load": watch.done(),
        "figures": figures,
        "rows": _rows(figures),
    }


def _rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for mode, levels in figures.items():
        for n in LEVELS:
            f = levels[str(n)]
            floor_p50 = floor_cpu = ""
            if "floor_added_p50" in f:  # separate: the bare handler's, same rounds
                floor_p50 = f"floor (bare handler) {_spread_text(f['floor_added_p50'])} ms; "
                floor_cpu = f"floor (bare handler) {_spread_text(f['floor_cpu_ms_per_job'])} ms; "
            rows.append(
                row(
                    f"HTTP shim ({mode}) added p50 over gRPC @{n}",
                    f.get("added_p50"),
                    "ms",
                    target=1.0,
                    better="lower",
                    baseline=f"{floor_p50}gRPC p50 {f['grpc_p50']['median']:.2f} ms",
                )
            )
            rows.append(
                row(
                    f"HTTP shim ({mode}) CPU per job @{n}",
                    f.get("shim_cpu_ms_per_job"),
                    "ms",
                    target=1.0,
                    better="lower",
                    baseline=f"{floor_cpu}service CPU per gRPC job"
                    f" {f['service_cpu_ms_per_job_grpc']['median']:.2f} ms",
                )
            )
    return rows


def _spread_text(figure: dict[str, float]) -> str:
    return f"{figure['median']:.2f} [{figure['min']:.2f}..{figure['max']:.2f}]"


async def _profile(label: str, jobs: int, concurrency: int, path: str, mode: str) -> str:
    """The service (embedded) or the gateway process (separate) under ``py-spy record
    --gil`` while ``path`` jobs run."""
    from bench.profile_service import _py_spy, _top

    inputs = Inputs()
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-profile-"))
    collapsed = tmp / "profile.txt"
    try:
        async with StandIns(AGENTS, tmp / "comfy") as agents:
            env = service_env(tmp / "service", agents.urls, http=mode == "embedded")
            async with (
                ServiceProcess(env, tmp / "service.log") as service,
                contextlib.AsyncExitStack() as stack,
                grpc.aio.insecure_channel(service.target) as channel,
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
            ):
                await _wait_ready(channel)
                pid, base = service.pid, f"http://127.0.0.1:{service.info['http_port']}"
                if mode == "separate":
                    gateway = await stack.enter_async_context(
                        _Gateway(service.target, tmp / "gateway.log")
                    )
                    pid, base = gateway.pid, gateway.url
                job = _http_job(session, base) if path == "http" else _service_job(channel)
                await _segment(job, 4, inputs.take(16))
                await agents.reset()
                pngs = inputs.take(jobs)
                spy = await asyncio.create_subprocess_exec(
                    _py_spy(),
                    *("record", "--pid", str(pid), "--format", "raw", "--gil"),
                    *("--rate", "200", "--output", str(collapsed), "--nonblocking"),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                )
                await asyncio.sleep(1.0)  # py-spy attaches
                cpu = cpu_seconds(pid)
                got = await _segment(job, concurrency, pngs)
                cpu = cpu_seconds(pid) - cpu
                spy.send_signal(2)  # SIGINT: py-spy writes its file and exits
                async with asyncio.timeout(30):
                    await spy.wait()
        done = len(got["latencies"])
        busy, own, total, _areas = _top(collapsed)
        if keep := os.environ.get("BENCH_KEEP_PROFILE"):  # the raw stacks, for a closer look
            shutil.copy(collapsed, keep)
        lines = [
            f"profile {label}: {done} {path} jobs, {concurrency} callers, {mode} shim",
            f"{'service' if mode == 'embedded' else 'gateway'} process CPU per job:"
            f" {cpu * 1000 / max(done, 1):.2f} ms",
            f"py-spy samples while busy: {busy} (200 Hz, the GIL holder, idle loop excluded)",
            "",
            "top by own samples (% of busy):",
            *(f"  {100 * n / max(busy, 1):5.1f}%  {frame}" for frame, n in own),
            "",
            "top by total samples (% of busy):",
            *(f"  {100 * n / max(busy, 1):5.1f}%  {frame}" for frame, n in total),
        ]
        return "\n".join(lines) + "\n"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(quick: bool) -> dict[str, Any]:
    return asyncio.run(_run(quick))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument(
        "--profile", metavar="LABEL", help="py-spy the embedded service instead of measuring"
    )
    parser.add_argument("--path", default="http", choices=("http", "grpc"), help="--profile's")
    parser.add_argument("--mode", default="embedded", choices=MODES, help="--profile's")
    parser.add_argument("--jobs", type=int, default=400, help="--profile's")
    parser.add_argument("--concurrency", type=int, default=16, help="--profile's")
    args = parser.parse_args()
    if args.profile:
        from bench.common import RESULTS

        text = asyncio.run(
            _profile(args.profile, args.jobs, args.concurrency, args.path, args.mode)
        )
        (RESULTS / f"profile-gateway-{args.profile}.txt").write_text(text)
        print(text)
        raise SystemExit(0)
    chosen = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    result = asyncio.run(_run(args.quick, chosen))
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    for r in result["rows"]:
        v = r["value"]
        print(
            f"{r['metric']:48s} {v['median']:7.2f} [{v['min']:.2f}..{v['max']:.2f}] {r['unit']}"
            f"  {r['status']}  {r['baseline']}"
        )
