"""``GET /artifacts/...`` through the service's HTTP shim, two source trees alternated, each in
its own process: process CPU per request against a bare aiohttp route in the same process.

    python -m bench.artifact_http_compare OTHER_TREE [--pairs 3] [--rounds 11] [--mib 64]

Each run starts one tree's own service (``bench.common.running_service``, the shim in
process: ReadArtifact through its local calls) and a bare aiohttp server sending the same
bytes from memory in 1 MiB writes. A minimal HTTP/1.1 client on one kept-alive connection
(the headers parsed, the body read in 1 MiB reads and dropped: little of the client's own
CPU) reads a ``--mib`` MiB artifact, then a 100 kB one 50 times, alternating with the bare
route, ``--rounds`` times. Prints CPU ms per request (``time.process_time``: every thread,
client and servers), medians, and the per-round ratio bare / service.
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
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
SMALL = 100_000
SMALL_CALLS = 50
HERE = Path(__file__).resolve()


class _Http:
    """One HTTP/1.1 connection: GET, read the body, drop it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get(self, path: str) -> int:
        if self._streams is None:
            self._streams = await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = self._streams
        writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        left = length
        while left:
            got = await reader.read(min(left, MIB))
            if not got:
                raise RuntimeError("connection closed mid-body")
            left -= len(got)
        return length

    async def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()


async def _child(mib: int, rounds: int) -> dict[str, Any]:
    from aiohttp import web

    import aiserver
    from bench.common import running_service

    big = os.urandom(mib * MIB)
    small = os.urandom(SMALL)

    async def bare(request: web.Request) -> web.StreamResponse:
        data = big if request.match_info["what"] == "big" else small
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.content_length = len(data)
        await response.prepare(request)
        view = memoryview(data)
        for start in range(0, len(data), MIB):
            await response.write(view[start : start + MIB])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/bare/{what}", bare)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    bare_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    tmp = Path(tempfile.mkdtemp(prefix="artifact-http-compare-"))
    try:
        async with running_service(tmp / "service", chunk_bytes=MIB) as svc:
            refs = {}
            for what, data in (("big", big), ("small", small)):
                refs[what] = await svc.artifacts.put(
                    data,
                    file_name=f"{what}.png",
                    mime_type="image/png",  # the store keeps any bytes under an image type
                    width=1,
                    height=1,
                    seed=None,
                    provider="bench",
                    job_id="bench",
                    owner="",
                )
            shim, plain = _Http(svc.http_port), _Http(bare_port)

            def reader(client: _Http, path: str, calls: int) -> Callable[[], Awaitable[int]]:
                async def read() -> int:
                    return sum([await client.get(path) for _ in range(calls)])

                return read

            steps = {
                "service_big": reader(shim, "/" + refs["big"].name, 1),
                "bare_big": reader(plain, "/bare/big", 1),
                "service_small": reader(shim, "/" + refs["small"].name, SMALL_CALLS),
                "bare_small": reader(plain, "/bare/small", SMALL_CALLS),
            }
            per_call = {"service_big": 1, "bare_big": 1}
            cpu: dict[str, list[float]] = {key: [] for key in steps}
            for step in steps.values():  # warm-up
                await step()
            for n in range(rounds):
                for key in list(steps) if n % 2 == 0 else list(steps)[::-1]:
                    start = time.process_time()
                    await steps[key]()
                    calls = per_call.get(key, SMALL_CALLS)
                    cpu[key].append((time.process_time() - start) * 1000 / calls)
            await shim.close()
            await plain.close()
    finally:
        await runner.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = {
        what: [b / s for b, s in zip(cpu[f"bare_{what}"], cpu[f"service_{what}"], strict=True)]
        for what in ("big", "small")
    }
    return {
        "tree": os.path.dirname(os.path.dirname(os.path.dirname(aiserver.__file__))),
        "load": [round(x, 1) for x in os.getloadavg()],
        "cpu_ms": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "cpu_ms_min": {k: round(min(v), 3) for k, v in cpu.items()},
        "ratio": {k: round(statistics.median(v), 3) for k, v in ratios.items()},
    }


def _run(tree: Path, mib: int, rounds: int) -> dict[str, Any]:
    from bench.common import run_in_tree  # the parent's own (a child imports its tree's)

    return run_in_tree(str(HERE), tree, "--child", "--mib", str(mib), "--rounds", str(rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", nargs="?", type=Path, help="the other source tree")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(args.mib, args.rounds))))
        return
    if args.other is None:
        parser.error("give the other source tree")
    this = HERE.parents[1]
    for _ in range(args.pairs):
        for tree in (args.other.resolve(), this):
            print(json.dumps(_run(tree, args.mib, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
