"""Peak RSS of concurrent uploads, two source trees alternated, a fresh server per round.

    python -m bench.spool_rss OTHER_TREE [--rounds 3] [--uploads 64] [--mib 8] [--env K=V ...]

Each round starts ``python -m aiserver serve`` from one tree (``bench.memory.ServerProcess``),
then sends ``--uploads`` concurrent ``--mib`` MiB ``ConvertImage`` uploads that are read
whole, spooled or held in memory, then refused (``bench.memory``'s burst), twice: the first
burst on a fresh server, the second after it (what memory kept for reuse adds). Prints RSS
before, the peak (``VmHWM``) and the RSS after each burst, in MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import grpc

from bench import ROOT
from bench.memory import MIB, ServerProcess, _burst, _settled_rss


async def _round(tree: Path, uploads: int, mib: int, env: dict[str, str]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-spool-rss-"))
    try:
        server = ServerProcess(
            {
                "AISERVER_DATA_DIR": str(tmp / "data"),
                "AISERVER_MAX_UPLOAD_BYTES": str(mib * MIB * 2),
                **env,
            },
            tmp / "server.log",
            root=tree,
        )
        async with server, grpc.aio.insecure_channel(server.target) as channel:
            pid = server.pid
            await _burst(pid, channel, 2, MIB)  # warm-up: first-call imports
            out: dict[str, Any] = {"tree": str(tree), "load": round(os.getloadavg()[0], 1)}
            for n in (1, 2):
                burst = await _burst(pid, channel, uploads, mib * MIB)
                out[f"burst{n}"] = {
                    "before": round(burst["rss_before_burst_mib"], 1),
                    "peak": round(burst["peak_mib"], 1),
                    "after": round(await _settled_rss(pid) / 1024, 1),
                }
            return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="the other source tree")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uploads", type=int, default=64)
    parser.add_argument("--mib", type=int, default=8)
    parser.add_argument("--env", action="append", default=[], help="AISERVER_...=value")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    for _ in range(args.rounds):
        for tree in (args.other.resolve(), ROOT):
            result = asyncio.run(_round(tree, args.uploads, args.mib, env))
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
