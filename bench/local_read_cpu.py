"""CPU of the shim's local stream calls (``aiserver.api.local_calls``), this tree against
another one, alternating rounds in child processes:

    python -m bench.local_read_cpu --other /tmp/main [--rounds 5] [--calls 30000]

Each call is a trivial handler (two messages, then EOF: three reads) behind a pass-through
interceptor: the cost of the call machinery alone. Prints µs of process CPU per call,
median [min..max] over the rounds, for each tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.common import run_in_tree


class _Pass:
    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        return await continuation(details)


async def _two(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield b"x"
    yield b"x"


async def _child(calls: int) -> float:
    import grpc

    from aiserver.api.local_calls import LocalCalls

    local = LocalCalls(_Pass())
    handler = grpc.unary_stream_rpc_method_handler(
        _two, request_deserializer=bytes, response_serializer=bytes
    )
    local.add("/bench.Local/Two", handler)
    make = local.unary_stream("/bench.Local/Two", bytes, bytes)
    assert make is not None
    start = time.process_time()
    for _ in range(calls):
        call = make(b"")
        while await call.read() is not grpc.aio.EOF:
            pass
    return (time.process_time() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--other", type=Path, help="another source tree (e.g. main's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=30000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps({"us": asyncio.run(_child(args.calls))}))
        return
    here = Path(__file__).resolve().parent.parent
    trees = {"this": here} | ({"other": args.other} if args.other else {})
    got: dict[str, list[float]] = {name: [] for name in trees}
    script = str(here / "bench" / "local_read_cpu.py")
    for _ in range(args.rounds):
        for name, tree in trees.items():
            got[name].append(run_in_tree(script, tree, "--child", "--calls", str(args.calls))["us"])
    for name, values in got.items():
        print(
            f"{name}: {statistics.median(values):.2f} [{min(values):.2f}..{max(values):.2f}] "
            "us of CPU per call (3 reads)",
            file=sys.stdout,
        )


if __name__ == "__main__":
    main()
