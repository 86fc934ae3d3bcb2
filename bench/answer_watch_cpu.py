"""The gateway's CPU per answered request, this tree against another, for answers that need
no gRPC call: what the slow-reader watch (one per request) adds to the cheapest requests.

    python -m bench.answer_watch_cpu OTHER_TREE [--rounds 9] [--requests 2000]

Two ``aiserver gateway`` processes (this tree's and ``OTHER_TREE``'s, e.g. ``git archive main
| tar -x -C /tmp/main``) in front of an address nothing listens on; one keep-alive client
sends ``--requests`` GETs of each case to one, then the other (the order alternating by
round); each segment's CPU is read from ``/proc``. Cases: ``404`` (a small JSON error, the
catch-all route) and ``openapi`` (the 100 kB OpenAPI document, a whole JSON body). Prints ms
of process CPU per request, medians [min..max].
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

import aiohttp

from bench import ROOT
from bench.common import cpu_seconds, free_port

CASES = {"404": "/v1/nothing-here", "openapi": "/openapi.json"}


async def _start(tree: Path) -> tuple[asyncio.subprocess.Process, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aiserver",
        "gateway",
        "--target",
        f"127.0.0.1:{free_port()}",
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(url + "/openapi.json") as res:
                    await res.read()
                    return proc, url
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"the gateway of {tree} did not start")


async def _segment(http: aiohttp.ClientSession, pid: int, url: str, n: int) -> float:
    before = cpu_seconds(pid)
    for _ in range(n):
        async with http.get(url) as res:
            await res.read()
    return (cpu_seconds(pid) - before) / n * 1000


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("other", type=Path)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    trees = {"other": args.other, "this": ROOT}
    procs = {name: await _start(tree) for name, tree in trees.items()}
    figures: dict[tuple[str, str], list[float]] = {}
    try:
        async with aiohttp.ClientSession() as http:
            for r in range(args.rounds):
                order = list(procs) if r % 2 else list(reversed(procs))
                for case, path in CASES.items():
                    for name in order:
                        proc, url = procs[name]
                        cpu = await _segment(http, proc.pid, url + path, args.requests)
                        figures.setdefault((case, name), []).append(cpu)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
            await proc.wait()
    print(f"load {os.getloadavg()[0]:.2f}; ms of gateway CPU per request, median [min..max]")
    for case in CASES:
        cells = []
        for name in trees:
            v = figures[(case, name)]
            cells.append(f"{name} {statistics.median(v):.4f} [{min(v):.4f}..{max(v):.4f}]")
        print(f"{case}: " + " | ".join(cells))


if __name__ == "__main__":
    asyncio.run(main())
