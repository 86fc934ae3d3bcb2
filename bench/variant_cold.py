"""The cold variant's cost beyond its render, A/B between source trees (issue 15).

    .venv/bin/python -m bench.variant_cold [--rounds 25] [--pairs 4] [--other TREE]

One process per tree and run, the trees alternating (``--other``: e.g. main exported with
``git archive``; its own ``src`` and ``bench`` are imported). In each run, alternating per
round: a cold ``GET /variants/width=256/...`` (12 MP JPEG -> 256 px WebP; disk and memory
cache emptied off the clock, after the last render's cache writes), the same over gRPC
``GetVariant``, the same ``resize`` called in-process, and the floor: a bare aiohttp route
running that ``resize`` in a thread, through the same httpx client. Per request: process CPU
minus the in-process render's CPU of the same round, and the wall time beyond the render
itself (``resize`` timed where it runs): min, p25, median. Wall clock is noise on a busy
machine; the CPU and the low percentiles are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

SIDES = ("http", "grpc", "floor", "in_process")


async def _worker(rounds: int) -> dict[str, Any]:
    import grpc
    import httpx
    from aiohttp import web
    from imagetasks.v1 import artifact_service_pb2, artifact_service_pb2_grpc

    from aiserver.imaging import parse_format, transforms
    from bench.common import encode, photo_like, running_service

    render_ms: list[float] = []
    resize = transforms.resize

    def timed_resize(*args: Any, **kwargs: Any) -> Any:  # where it runs: thread or loop
        start = time.perf_counter()
        try:
            return resize(*args, **kwargs)
        finally:
            render_ms.append((time.perf_counter() - start) * 1e3)

    transforms.resize = timed_resize  # type: ignore[assignment]
    tmp = Path(tempfile.mkdtemp(prefix="bench-variant-cold-"))
    jpeg = encode(photo_like(4000, 3000, seed=3), "JPEG", quality=90)
    source = tmp / "photo.jpg"
    source.write_bytes(jpeg)
    webp = parse_format("webp", "format")
    pool = ThreadPoolExecutor(1)
    try:
        async with running_service(tmp / "service", max_upload_bytes=256 << 20) as service:

            def render() -> bytes:
                return bytes(
                    transforms.resize(
                        source,
                        width=256,
                        output_format=webp,
                        quality=80,
                        limits=service.limits,
                        fast_encode=True,
                    ).data
                )

            async def floor_handler(request: web.Request) -> web.Response:
                data = await asyncio.get_running_loop().run_in_executor(pool, render)
                return web.Response(body=data, content_type="image/webp")

            app = web.Application()
            app.router.add_get("/v", floor_handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ref = await service.artifacts.put(
                jpeg,
                file_name="photo.jpg",
                mime_type="image/jpeg",
                width=4000,
                height=3000,
                seed=None,
                provider="bench",
                job_id="bench",
                owner="",
            )
            rel = service.artifacts.relative_path(ref.name)
            cache = Path(service.variants.cache_root)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
            stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
            request = artifact_service_pb2.GetVariantRequest(name=ref.name, spec="width=256")

            async def empty() -> None:
                flush = getattr(service.variants, "flush", None)  # absent in older trees
                if flush is not None:
                    await flush()
                else:
                    inflight = service.variants._inflight.values()
                    await asyncio.gather(*inflight, return_exceptions=True)
                shutil.rmtree(cache / ref.sha256[:2], ignore_errors=True)
                service.variants.memory.drop_source(ref.sha256)

            async with httpx.AsyncClient(timeout=120) as client:

                async def get(url: str) -> None:
                    (await client.get(url)).raise_for_status()

                async def over_grpc() -> None:
                    async for _ in stub.GetVariant(request):
                        pass

                async def in_process() -> None:
                    render()

                base = "http://127.0.0.1:"
                sides: dict[str, Callable[[], Awaitable[None]]] = {
                    "http": lambda: get(f"{base}{service.http_port}/variants/width=256/{rel}"),
                    "grpc": over_grpc,
                    "floor": lambda: get(f"{base}{port}/v"),
                    "in_process": in_process,
                }
                cpu: dict[str, list[float]] = {k: [] for k in sides}
                beyond: dict[str, list[float]] = {k: [] for k in sides}
                for fn in sides.values():  # warm-up
                    await empty()
                    await fn()
                names = list(sides)
                for r in range(rounds):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        await empty()
                        render_ms.clear()
                        c0, t0 = time.process_time(), time.perf_counter()
                        await sides[name]()
                        wall = (time.perf_counter() - t0) * 1e3
                        cpu[name].append((time.process_time() - c0) * 1e3)
                        beyond[name].append(wall - render_ms[0])
            await channel.close()
            await runner.cleanup()
    finally:
        pool.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, Any] = {"load": os.getloadavg()[0]}
    for name in names:
        ordered = sorted(beyond[name])
        extra = [c - p for c, p in zip(cpu[name], cpu["in_process"], strict=True)]
        out[name] = {
            "cpu_over_in_process_ms": statistics.median(extra),
            "render_cpu_ms": statistics.median(cpu["in_process"]),
            "beyond_render_ms": {
                "min": ordered[0],
                "p25": ordered[len(ordered) // 4],
                "median": statistics.median(ordered),
            },
        }
    return out


def _run_tree(tree: Path, rounds: int) -> dict[str, Any]:
    from bench.common import run_in_tree  # the parent's own (a child imports its tree's)

    # This file, run against the tree's own aiserver and bench.common.
    return run_in_tree(__file__, tree, "--worker", "--rounds", str(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--other", type=Path, help="a second source tree, run alternately")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(asyncio.run(_worker(args.rounds))))
        return
    trees = {"this": Path(__file__).resolve().parent.parent}
    if args.other is not None:
        trees["other"] = args.other.resolve()
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    for _ in range(args.pairs):
        for label, tree in trees.items():
            runs[label].append(_run_tree(tree, args.rounds))
    for label, results in runs.items():
        loads = ", ".join(f"{r['load']:.1f}" for r in results)
        print(
            f"{label} ({trees[label]}), {len(results)} runs of {args.rounds} rounds, load {loads}"
        )
        for side in SIDES[:-1]:
            extra = [r[side]["cpu_over_in_process_ms"] for r in results]
            beyond = [r[side]["beyond_render_ms"] for r in results]
            print(
                f"  {side:5s} CPU over in-process {statistics.median(extra):.2f} ms"
                f" [{min(extra):.2f}..{max(extra):.2f}];"
                " wall beyond the render: min "
                + "/".join(f"{b['min']:.1f}" for b in beyond)
                + ", p25 "
                + "/".join(f"{b['p25']:.1f}" for b in beyond)
                + ", median "
                + "/".join(f"{b['median']:.1f}" for b in beyond)
                + " ms"
            )
        render = [r["in_process"]["render_cpu_ms"] for r in results]
        print(f"  the render in-process: {statistics.median(render):.1f} ms CPU")


if __name__ == "__main__":
    main()
