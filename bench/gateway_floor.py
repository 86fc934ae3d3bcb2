"""The separate gateway's floor: what the same SYNC ImageUpscale costs a bare gRPC client and a
bare aiohttp handler, next to ``aiserver gateway``, measured in one run.

    python -m bench.gateway_floor [--jobs 400] [--rounds 3] [--variants a,b,...]

Against one service (its own process, SQLite, 4 instant stand-ins), each variant runs the same
jobs from 16 callers (``--concurrency``) in a process of its own, whose CPU per job is read
from ``/proc``, and their p50 (segments in turn: read the CPU, latency moves with the load):

- gRPC clients (the process makes the calls): ``aio`` (``grpc.aio``, as the gateway and
  ``bench.orchestration`` call it), ``aio-minimal`` / ``aio-no-bdp`` (the same with the
  channel options ``grpc.minimal_stack`` / ``grpc.http2.bdp_probe=0``), ``aio-poll`` (with
  ``GRPC_POLL_STRATEGY=poll``), ``aio-async`` (RESPONSE_MODE_ASYNC: the upload and
  ``accepted`` only, four reads fewer than SYNC's six), ``aio-result`` (RESPONSE_MODE_RESULT:
  ``finished`` alone, what ``aiserver gateway`` asks for ``Sync=true``), ``sync-threads``
  (the sync client, one thread per caller), ``sync-to-thread`` (the sync client called from
  an event loop through ``asyncio.to_thread``, as a gateway would), ``grpclib`` (pure-Python
  HTTP/2 on the event loop; ``BENCH_GRPCLIB_PATH``: a folder it is installed in).
- HTTP servers (this process sends the multipart POSTs, the server process is measured):
  ``http-echo`` (a bare aiohttp handler that reads the body and answers a fixed job JSON: the
  HTTP side alone), ``http-bare-aio`` and ``http-bare-sync`` (a bare handler: the body read
  whole, the image cut out by the boundary, the call made with that client, the job JSON
  built), ``http-bare-result`` (the same bare handler and grpc.aio call with
  RESPONSE_MODE_RESULT, as the gateway's ``Sync=true`` asks, answered at ``finished`` with
  the call held until its status: the gateway's floor), ``gateway`` (``aiserver
  gateway``), ``gateway-other`` (the same from the source tree ``--other``, e.g. ``git
  archive main | tar -x -C /tmp/main``).
- ``...-uvloop``: that variant on uvloop's event loop (``BENCH_UVLOOP_PATH``: a folder it is
  installed in; neither it nor grpclib is a dependency).

Variants run in turn, the order rotating by round; figures are medians of the rounds [min..max].

``--interleave`` (HTTP servers only, e.g. ``--variants http-bare-result,gateway,gateway-other
--other /tmp/main``): the servers run side by side and every segment's jobs take them in
turn (job k the k-th server, the start rotating by round), so that each sees the same load
from the rest of a shared machine; each process's CPU per job over the same segment, and
each variant's CPU over the first one's per round (paired ratios).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from bench import ROOT
from bench.common import cpu_seconds, free_port, ms, percentile, spread
from bench.gateway_path import _Gateway, _http_job
from bench.orchestration import Inputs, _segment, _wait_ready
from bench.service_proc import ServiceProcess, service_env
from bench.standin_proc import StandIns

AGENTS = 4
CONCURRENCY = 16
CLIENTS = (
    "aio",
    "aio-minimal",
    "aio-no-bdp",
    "sync-threads",
    "sync-to-thread",
    "grpclib",
    "aio-uvloop",
    "aio-poll",
    "aio-async",
    "aio-result",
)
SERVERS = (
    "http-echo",
    "http-bare-aio",
    "http-bare-sync",
    "http-bare-result",
    "gateway",
    "http-bare-aio-uvloop",
    "gateway-uvloop",
)
STATUS_WAITS: list[float] = []
"""aio clients: seconds from a stream's last message to its end (the status)."""
_CLIENT_ENV = {"aio-poll": {"GRPC_POLL_STRATEGY": "poll"}}
"""Environment of a variant's process (grpc reads it when it starts)."""
_OTHER: Path | None = None
"""``--other``: the source tree of the ``gateway-other`` variant."""
_OPTIONS: dict[str, list[tuple[str, Any]]] = {
    "aio": [],
    "aio-poll": [],
    "aio-minimal": [("grpc.minimal_stack", 1)],
    "aio-no-bdp": [("grpc.http2.bdp_probe", 0)],
}


# --- the measured processes ------------------------------------------------------------------


def _messages(png: bytes, mode: int = 1) -> list[Any]:
    from imagetasks.v1 import common_pb2, tasks_pb2
    from imagetasks.v1 import generation_service_pb2 as gpb

    options = common_pb2.JobOptions(mode=mode, delivery=common_pb2.OUTPUT_DELIVERY_REFERENCES)
    chunk = common_pb2.FileChunk(field="image", data=png, file_name="input.png")
    return [
        gpb.ImageUpscaleRequest(params=tasks_pb2.ImageUpscaleParams(options=options)),
        gpb.ImageUpscaleRequest(chunk=chunk),
    ]


def _finished_job(responses: Any) -> Any:
    """The finished job (ASYNC: the accepted event)."""
    job = None
    for response in responses:
        kind = response.event.WhichOneof("kind")
        if kind == "finished":
            job = response.event.finished.job
        elif kind == "accepted" and job is None:
            job = response.event
    if job is None:
        raise RuntimeError("no finished event")
    return job


def _aio_caller(
    target: str, options: list[tuple[str, Any]], mode: int = 1, *, to_status: bool = True
) -> Any:
    """``mode``: RESPONSE_MODE_SYNC (1), ASYNC (2: the stream is accepted, then its end) or
    RESULT (3: finished, then the end). Without ``to_status`` (RESULT only) the job is
    returned at ``finished`` and the call is held, unread, until grpc has its status (as
    ``aiserver gateway`` does): one read fewer."""
    import grpc
    from imagetasks.v1 import generation_service_pb2_grpc

    channel = grpc.aio.insecure_channel(target, options=options)
    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    held: set[Any] = set()

    async def call(png: bytes) -> Any:
        first, chunk = _messages(png, mode)
        stream = stub.ImageUpscale(timeout=120)
        await stream.write(first)
        await stream.write(chunk)
        await stream.done_writing()
        if not to_status:
            held.add(stream)
            stream.add_done_callback(held.discard)
            return _finished_job([await stream.read()])
        responses = []
        while (msg := await stream.read()) is not grpc.aio.EOF:
            responses.append(msg)
            finished_at = time.perf_counter()
        STATUS_WAITS.append(time.perf_counter() - finished_at)
        return _finished_job(responses)

    return call


def _sync_caller(target: str) -> Any:
    import grpc
    from imagetasks.v1 import generation_service_pb2_grpc

    stub = generation_service_pb2_grpc.GenerationServiceStub(grpc.insecure_channel(target))

    def call(png: bytes) -> Any:
        return _finished_job(stub.ImageUpscale(iter(_messages(png)), timeout=120))

    return call


def _grpclib_caller(target: str) -> Any:
    """grpclib (pure-Python HTTP/2 on the event loop), when ``BENCH_GRPCLIB_PATH`` names a
    folder it is installed in (it is not a dependency of the project)."""
    sys.path.append(os.environ["BENCH_GRPCLIB_PATH"])
    from grpclib.client import Channel
    from grpclib.const import Cardinality
    from imagetasks.v1 import generation_service_pb2 as gpb

    host, port = target.rsplit(":", 1)
    channel = Channel(host, int(port))
    path = "/imagetasks.v1.GenerationService/ImageUpscale"

    async def call(png: bytes) -> Any:
        first, chunk = _messages(png)
        async with channel.request(
            path,
            Cardinality.STREAM_STREAM,
            gpb.ImageUpscaleRequest,
            gpb.ImageUpscaleResponse,
            timeout=120,
        ) as stream:
            await stream.send_message(first)
            await stream.send_message(chunk, end=True)
            return _finished_job([r async for r in stream])

    return call


def _uvloop(variant: str) -> str:
    """``variant`` without ``-uvloop``; with it, uvloop is installed as the event loop (not a
    dependency: ``BENCH_UVLOOP_PATH`` names the folder it is installed in)."""
    if not variant.endswith("-uvloop"):
        return variant
    sys.path.append(os.environ["BENCH_UVLOOP_PATH"])
    import uvloop

    uvloop.install()
    return variant.removesuffix("-uvloop")


def _run_client(variant: str, target: str, jobs: int) -> dict[str, Any]:
    variant = _uvloop(variant)
    pngs = Inputs().take(jobs + 16)
    warm, pngs = pngs[:16], pngs[16:]
    if variant == "sync-threads":
        call = _sync_caller(target)
        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(call, warm))
            cpu = _own_cpu()
            took = list(pool.map(_timed(call), pngs))
            return {
                "cpu_s": _own_cpu() - cpu,
                "done": len(pngs),
                "p50_ms": ms(percentile(took, 50)),
            }

    async def main() -> dict[str, Any]:
        if variant == "sync-to-thread":
            sync_call = _sync_caller(target)

            async def call(png: bytes) -> Any:
                return await asyncio.to_thread(sync_call, png)

        elif variant == "grpclib":
            call = _grpclib_caller(target)
        elif variant == "aio-async":
            call = _aio_caller(target, [], mode=2)
        elif variant == "aio-result":
            call = _aio_caller(target, [], mode=3)
        else:
            call = _aio_caller(target, _OPTIONS[variant])

        async def job(_index: int, png: bytes) -> tuple[str, float]:
            finished = await call(png)
            return str(id(finished)), time.perf_counter()

        await _segment(job, 4, warm)
        cpu, main = _own_cpu(), _main_thread_cpu()
        got = await _segment(job, CONCURRENCY, pngs)
        return {
            "cpu_s": _own_cpu() - cpu,
            "main_thread_cpu_s": _main_thread_cpu() - main,
            "done": len(got["latencies"]),
            "p50_ms": ms(percentile(got["latencies"], 50)),
            "status_wait_p50_ms": ms(percentile(STATUS_WAITS, 50)) if STATUS_WAITS else None,
        }

    return asyncio.run(main())


def _timed(call: Any) -> Any:
    def timed(png: bytes) -> float:
        start = time.perf_counter()
        call(png)
        return time.perf_counter() - start

    return timed


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
    return usage.ru_utime + usage.ru_stime


def _main_thread_cpu() -> float:
    return time.thread_time()  # called on the event loop's thread


def _serve(variant: str, target: str, port: int) -> None:
    from aiohttp import web

    variant = _uvloop(variant)
    if variant == "gateway":
        from aiserver.gateway.cli import main as gateway

        gateway(["--target", target, "--port", str(port)])
        return

    answer = {"jobId": "x", "refId": "", "jobState": "Completed", "status": "Completed"}
    call: Any = None  # http-bare-aio: made in the loop below
    if variant == "http-bare-sync":
        sync_call = _sync_caller(target)

        async def call(png: bytes) -> Any:
            return await asyncio.to_thread(sync_call, png)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        if variant == "http-echo":
            return web.json_response({**answer, "outputs": [{"fileName": "a", "url": "/a"}]})
        boundary = request.content_type and request.headers["Content-Type"].split("boundary=")[1]
        part = next(p for p in body.split(b"--" + boundary.encode()) if b'name="image"' in p)
        png = part.split(b"\r\n\r\n", 1)[1][:-2]
        job = await call(png)
        outputs = [{"fileName": a.file_name, "url": a.url} for a in job.outputs]
        return web.json_response({**answer, "jobId": job.name, "outputs": outputs})

    async def main() -> None:
        nonlocal call
        if variant == "http-bare-aio":
            call = _aio_caller(target, [])
        elif variant == "http-bare-result":
            call = _aio_caller(target, [], mode=3, to_status=False)
        app = web.Application()
        app.router.add_post("/api/ImageUpscale", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    asyncio.run(main())


# --- the parent ------------------------------------------------------------------------------


async def _client_variant(variant: str, target: str, jobs: int) -> tuple[float, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "bench.gateway_floor", "--client", variant, "--target", target),
        *("--jobs", str(jobs), "--concurrency", str(CONCURRENCY)),
        stdout=asyncio.subprocess.PIPE,
        cwd=str(ROOT),
        env={**_env(), **_CLIENT_ENV.get(variant, {})},
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"client {variant} failed")
    got = json.loads(out.decode().strip().splitlines()[-1])
    done = max(int(got["done"]), 1)
    if "main_thread_cpu_s" in got:
        print(f"  {variant}: loop thread {got['main_thread_cpu_s'] * 1000 / done:.2f} ms/job")
    if got.get("status_wait_p50_ms") is not None:
        print(f"  {variant}: last message -> status p50 {got['status_wait_p50_ms']:.3f} ms")
    return float(got["cpu_s"]) * 1000 / done, float(got["p50_ms"])


async def _server_variant(
    variant: str, target: str, session: aiohttp.ClientSession, pngs: list[bytes], log: Path
) -> tuple[float, float]:
    async with _server(variant, target, log) as (pid, base):
        return await _load(pid, base, session, pngs)


@contextlib.asynccontextmanager
async def _server(variant: str, target: str, log: Path) -> AsyncIterator[tuple[int, str]]:
    """An HTTP server variant in its own process: its pid and base URL."""
    if variant in ("gateway", "gateway-other"):  # as bench.gateway_path starts it
        root = _OTHER if variant == "gateway-other" else None
        async with _Gateway(target, log, root) as gateway:
            yield gateway.pid, gateway.url
        return
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "bench.gateway_floor", "--serve", variant, "--target", target),
        *("--port", str(port)),
        cwd=str(ROOT),
        env=_env(),
    )
    try:
        async with asyncio.timeout(60):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.1)
                    continue
                writer.close()
                break
        yield proc.pid, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        await proc.wait()


def _in_turn(calls: list[Any], latencies: list[list[float]], first: int) -> Any:
    """A job function whose jobs take ``calls`` in turn from ``first``; latencies by call."""
    turn = itertools.count(first)

    async def job(index: int, png: bytes) -> tuple[str, float]:
        which = next(turn) % len(calls)
        start = time.perf_counter()
        key, done_at = await calls[which](index, png)
        latencies[which].append(done_at - start)
        return key, done_at

    return job


async def _interleaved(jobs: int, rounds: int, variants: tuple[str, ...]) -> dict[str, Any]:
    """``--interleave`` (see the module doc)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-floor-"))
    inputs = Inputs()
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    p50s: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    try:
        async with (
            StandIns(AGENTS, tmp / "comfy") as agents,
            ServiceProcess(service_env(tmp / "service", agents.urls), tmp / "service.log") as svc,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
            contextlib.AsyncExitStack() as stack,
        ):
            import grpc

            async with grpc.aio.insecure_channel(svc.target) as channel:
                await _wait_ready(channel)
            servers = [
                await stack.enter_async_context(_server(v, svc.target, tmp / f"{v}.log"))
                for v in variants
            ]
            calls = [_http_job(session, base) for _, base in servers]
            for r in range(-1, rounds):  # round -1: the warm-up
                latencies: list[list[float]] = [[] for _ in variants]
                job = _in_turn(calls, latencies, r)
                before = [cpu_seconds(pid) for pid, _ in servers]
                n = 8 * len(variants) if r < 0 else jobs * len(variants)
                await _segment(job, CONCURRENCY, inputs.take(n))
                after = [cpu_seconds(pid) for pid, _ in servers]
                await agents.reset()
                if r < 0:
                    continue
                per = [
                    (a - b) * 1000 / max(len(lat), 1)
                    for a, b, lat in zip(after, before, latencies, strict=True)
                ]
                for v, value, lat in zip(variants, per, latencies, strict=True):
                    cpu[v].append(value)
                    p50s[v].append(ms(percentile(lat, 50)))
                    ratios[v].append(value / per[0])
                print(
                    f"round {r + 1} "
                    + "  ".join(
                        f"{v} {value:.2f} ms CPU/job p50 {p50s[v][-1]:.1f}"
                        for v, value in zip(variants, per, strict=True)
                    ),
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        v: {"cpu": spread(cpu[v], 2), "p50": spread(p50s[v], 2), "ratio": spread(ratios[v], 3)}
        for v in variants
    }


async def _load(
    pid: int, base: str, session: aiohttp.ClientSession, pngs: list[bytes]
) -> tuple[float, float]:
    """CPU ms per job of ``pid`` and the p50 ms of the jobs."""
    job = _http_job(session, base)
    await _segment(job, 4, pngs[:16])
    cpu = cpu_seconds(pid)
    got = await _segment(job, CONCURRENCY, pngs[16:])
    per_job = (cpu_seconds(pid) - cpu) * 1000 / max(len(got["latencies"]), 1)
    return per_job, ms(percentile(got["latencies"], 50))


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


async def _run(jobs: int, rounds: int, variants: tuple[str, ...]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-gw-floor-"))
    inputs = Inputs()
    per: dict[str, list[float]] = {v: [] for v in variants}
    p50s: dict[str, list[float]] = {v: [] for v in variants}
    try:
        async with StandIns(AGENTS, tmp / "comfy") as agents:
            env = service_env(tmp / "service", agents.urls)
            async with (
                ServiceProcess(env, tmp / "service.log") as service,
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
            ):
                import grpc

                async with grpc.aio.insecure_channel(service.target) as channel:
                    await _wait_ready(channel)
                for r in range(rounds):
                    k = r % len(variants)
                    for variant in variants[k:] + variants[:k]:
                        if variant in CLIENTS:
                            value, p50 = await _client_variant(variant, service.target, jobs)
                        else:
                            pngs = inputs.take(jobs + 16)
                            value, p50 = await _server_variant(
                                variant, service.target, session, pngs, tmp / "gateway.log"
                            )
                        per[variant].append(value)
                        p50s[variant].append(p50)
                        print(
                            f"round {r + 1} {variant:20s} {value:6.2f} ms CPU/job"
                            f"  p50 {p50:6.2f} ms",
                            flush=True,
                        )
                        await agents.reset()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {v: {"cpu": spread(per[v], 2), "p50": spread(p50s[v], 2)} for v in variants}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="callers")

    # By default the variants that need no extra install (grpclib and uvloop come from the
    # folders BENCH_GRPCLIB_PATH / BENCH_UVLOOP_PATH name, when they are set).
    def usable(variant: str) -> bool:
        if variant == "grpclib":
            return bool(os.environ.get("BENCH_GRPCLIB_PATH"))
        return not variant.endswith("uvloop") or bool(os.environ.get("BENCH_UVLOOP_PATH"))

    usable_variants = [v for v in CLIENTS + SERVERS if usable(v)]
    parser.add_argument("--variants", default=",".join(usable_variants))
    parser.add_argument(
        "--other", type=Path, help="variant gateway-other: aiserver gateway from this tree"
    )
    parser.add_argument(
        "--interleave", action="store_true", help="HTTP servers side by side, jobs in turn"
    )
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    CONCURRENCY = args.concurrency
    if args.client:
        print(json.dumps(_run_client(args.client, args.target, args.jobs)))
        raise SystemExit(0)
    if args.serve:
        _serve(args.serve, args.target, args.port)
        raise SystemExit(0)
    _OTHER = args.other
    chosen = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if args.interleave:
        result = asyncio.run(_interleaved(args.jobs, args.rounds, chosen))
    else:
        result = asyncio.run(_run(args.jobs, args.rounds, chosen))
    print()
    for variant, figures in result.items():
        c, p = figures["cpu"], figures["p50"]
        ratio = figures.get("ratio")
        print(
            f"{variant:20s} CPU {c['median']:6.2f} [{c['min']:.2f}..{c['max']:.2f}] ms/job"
            f"   p50 {p['median']:6.2f} [{p['min']:.2f}..{p['max']:.2f}] ms"
            + (
                f"   / {chosen[0]} {ratio['median']:.3f} [{ratio['min']:.3f}..{ratio['max']:.3f}]"
                if ratio
                else ""
            )
        )
