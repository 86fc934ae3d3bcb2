"""The warm (cached) variant's cost per call against its floors, A/B between source trees
(issue 15).

    .venv/bin/python -m bench.variant_warm [--calls 200] [--rounds 15] [--pairs 3] [--other TREE]
    .venv/bin/python -m bench.variant_warm --profile grpc|http [--calls 2000]  # cProfile, top

One process per tree and run, the trees alternating (``--other``: e.g. main exported with
``git archive``; its own ``src`` and ``bench`` are imported). In each run the service (in this
process, as ``imaging.py`` has it) holds a 256 px WebP variant of a 1600x1200 JPEG in memory,
and four sides answer it in blocks of ``--calls`` calls, the order rotating by round: gRPC
``GetVariant`` through a generated stub, ``GET /variants/width=256/...`` through httpx, and
their floors, a bare grpcio method sending the info message then the bytes and a bare aiohttp
route through the same httpx client. Per side: process CPU per call (client and server: one
process) and the p50 wall time of each block; medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

SIDES = ("grpc", "bare_grpc", "http", "bare_http")


async def _worker(calls: int, rounds: int, profile: str | None) -> dict[str, Any]:
    import grpc
    import httpx
    from imagetasks.v1 import artifact_service_pb2, artifact_service_pb2_grpc

    from bench.common import encode, photo_like, running_service
    from bench.imaging import _bare_servers

    tmp = Path(tempfile.mkdtemp(prefix="bench-variant-warm-"))
    jpeg = encode(photo_like(1600, 1200, seed=3), "JPEG", quality=90)
    async with running_service(tmp / "service") as service:
        ref = await service.artifacts.put(
            jpeg,
            file_name="photo.jpg",
            mime_type="image/jpeg",
            width=1600,
            height=1200,
            seed=None,
            provider="bench",
            job_id="bench",
            owner="",
        )
        rel = service.artifacts.relative_path(ref.name)
        url = f"http://127.0.0.1:{service.http_port}/variants/width=256/{rel}"
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
        stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
        request = artifact_service_pb2.GetVariantRequest(name=ref.name, spec="width=256")
        async with httpx.AsyncClient(timeout=60) as client:
            body = (await client.get(url)).content
            info = b""
            async for msg in stub.GetVariant(request):
                info = info or msg.SerializeToString()
            async with _bare_servers(body, info) as (bare_url, bare_channel):
                bare_call: Any = bare_channel.unary_stream("/bench.Variant/GetAfterInfo")

                async def over_grpc() -> None:
                    async for _ in stub.GetVariant(request):
                        pass

                async def bare_grpc() -> None:
                    async for _ in bare_call(b""):
                        pass

                async def get(u: str) -> None:
                    (await client.get(u)).raise_for_status()

                sides: dict[str, Callable[[], Awaitable[None]]] = {
                    "grpc": over_grpc,
                    "bare_grpc": bare_grpc,
                    "http": lambda: get(url),
                    "bare_http": lambda: get(bare_url),
                }
                for fn in sides.values():  # warm-up
                    for _ in range(50):
                        await fn()
                if profile is not None:
                    fn = sides[profile]
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(calls):
                        await fn()
                    prof.disable()
                    stats = pstats.Stats(prof, stream=sys.stderr)
                    stats.sort_stats("tottime").print_stats(40)
                    stats.sort_stats("cumulative").print_stats(60)
                    return {}
                cpu: dict[str, list[float]] = {k: [] for k in sides}
                p50: dict[str, list[float]] = {k: [] for k in sides}
                names = list(sides)
                for r in range(rounds):
                    for name in names[r % len(names) :] + names[: r % len(names)]:
                        fn = sides[name]
                        walls = []
                        c0 = time.process_time()
                        for _ in range(calls):
                            t0 = time.perf_counter()
                            await fn()
                            walls.append(time.perf_counter() - t0)
                        cpu[name].append((time.process_time() - c0) / calls * 1e6)
                        p50[name].append(statistics.median(walls) * 1e6)
        await channel.close()
    out: dict[str, Any] = {"load": os.getloadavg()[0]}
    for name in names:
        out[name] = {"cpu_us": statistics.median(cpu[name]), "p50_us": statistics.median(p50[name])}
    for name in ("grpc", "http"):  # per round: the service over its floor, same moment
        floor = f"bare_{name}"
        out[name]["cpu_over_floor"] = statistics.median(
            [a / b for a, b in zip(cpu[name], cpu[floor], strict=True)]
        )
        out[name]["p50_over_floor"] = statistics.median(
            [a / b for a, b in zip(p50[name], p50[floor], strict=True)]
        )
    return out


def _run_tree(tree: Path, calls: int, rounds: int) -> dict[str, Any]:
    from bench.common import run_in_tree  # the parent's own (a child imports its tree's)

    # This file, run against the tree's own aiserver and bench.common.
    return run_in_tree(__file__, tree, "--worker", "--calls", str(calls), "--rounds", str(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--other", type=Path, help="a second source tree, run alternately")
    parser.add_argument("--profile", choices=SIDES, help="cProfile one side (this tree)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or args.profile:
        result = asyncio.run(_worker(args.calls, args.rounds, args.profile))
        print(json.dumps(result))
        return
    trees = {"this": Path(__file__).resolve().parent.parent}
    if args.other is not None:
        trees["other"] = args.other.resolve()
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
    for _ in range(args.pairs):
        for label, tree in trees.items():
            runs[label].append(_run_tree(tree, args.calls, args.rounds))
    for label, results in runs.items():
        loads = ", ".join(f"{r['load']:.1f}" for r in results)
        print(
            f"{label} ({trees[label]}), {len(results)} runs of {args.rounds} x {args.calls}"
            f" calls, load {loads}"
        )
        for side in SIDES:
            cpu = [r[side]["cpu_us"] for r in results]
            p50 = [r[side]["p50_us"] for r in results]
            line = (
                f"  {side:9s} CPU per call {statistics.median(cpu):4.0f} us"
                f" [{min(cpu):.0f}..{max(cpu):.0f}], p50 {statistics.median(p50):4.0f} us"
                f" [{min(p50):.0f}..{max(p50):.0f}]"
            )
            if "cpu_over_floor" in results[0][side]:
                c = [r[side]["cpu_over_floor"] for r in results]
                w = [r[side]["p50_over_floor"] for r in results]
                line += (
                    f"; over its floor: CPU {statistics.median(c):.3f}x"
                    f" [{min(c):.3f}..{max(c):.3f}], p50 {statistics.median(w):.3f}x"
                    f" [{min(w):.3f}..{max(w):.3f}]"
                )
            print(line)


if __name__ == "__main__":
    main()
