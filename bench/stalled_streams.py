"""gRPC clients that stop reading ReadArtifact: what the server holds for them, two trees.

    python -m bench.stalled_streams OTHER_TREE [--streams 32] [--idle 2]

Each tree runs in its own process (``bench.common.run_in_tree``): one service with
``upload_idle_timeout_s=--idle``, an 8 MiB artifact, and ``--streams`` clients, each on its own
channel with a small HTTP/2 window, that read one 1 MiB chunk and then nothing, with no
deadline, twice over (two waves, the first's clients kept). It prints the process RSS (MiB:
server and clients) and the streaming calls in progress before the readers start, and for
each wave while it is stalled (after 1 s) and after 3x the idle time, with how many of its
calls had ended by then and with which status codes. On a tree without the stall watch the
streams, and the memory behind them, stay until the clients go: the second wave adds as much
again.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
HERE = Path(__file__).resolve()


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def _child(streams: int, idle_s: float) -> dict[str, Any]:
    import grpc
    from imagetasks.v1 import artifact_service_pb2, artifact_service_pb2_grpc

    from bench.common import running_service

    tmp = Path(tempfile.mkdtemp(prefix="stalled-streams-"))
    try:
        async with running_service(
            tmp / "service", chunk_bytes=MIB, http_enabled=False, upload_idle_timeout_s=idle_s
        ) as svc:
            ref = await svc.artifacts.put(
                os.urandom(8 * MIB),
                file_name="a.bmp",
                mime_type="image/bmp",
                width=1,
                height=1,
                seed=None,
                provider="bench",
                job_id="bench",
                owner="",
            )
            reg = svc.metrics.registry

            def active() -> float:
                return float(reg.get_sample_value("aiserver_active_streams") or 0.0)

            small = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
            target = f"127.0.0.1:{svc.grpc_port}"
            before = {"rss_mib": _rss_mib(), "streams": active()}
            waves = []
            channels: list[Any] = []
            calls: list[Any] = []
            for _ in range(2):  # the second wave reuses what the first one's end freed
                wave_channels = [
                    grpc.aio.insecure_channel(target, options=small) for _ in range(streams)
                ]
                wave = []
                for ch in wave_channels:
                    stub = artifact_service_pb2_grpc.ArtifactServiceStub(ch)
                    request = artifact_service_pb2.ReadArtifactRequest(name=ref.name)
                    call = stub.ReadArtifact(request)
                    await call.read()
                    wave.append(call)
                await asyncio.sleep(1.0)
                stalled = {"rss_mib": _rss_mib(), "streams": active()}
                await asyncio.sleep(3 * idle_s)
                ended = [c for c in wave if c.done()]
                codes = Counter([(await c.code()).name for c in ended])
                after = {
                    "rss_mib": _rss_mib(),
                    "streams": active(),
                    "client_calls_ended": len(ended),
                    "client_codes": dict(codes),  # what the clients saw
                }
                waves.append({"stalled": stalled, "after_3x_idle": after})
                channels += wave_channels
                calls += wave
            for call in calls:
                call.cancel()
            for ch in channels:
                await ch.close()
            return {"before": before, "waves": waves}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", nargs="?", type=Path, help="the other source tree")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--idle", type=float, default=2.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(args.streams, args.idle))))
        return
    if args.other is None:
        parser.error("give the other source tree")
    from bench.common import run_in_tree

    this = HERE.parents[1]
    for tree in (args.other.resolve(), this):
        extra = ["--streams", str(args.streams), "--idle", str(args.idle), "--child"]
        result = run_in_tree(str(HERE), tree, *extra)
        print(json.dumps({"tree": str(tree), "load": os.getloadavg(), **result}), flush=True)


if __name__ == "__main__":
    main()
