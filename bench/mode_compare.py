"""CPU per job of a SYNC and a RESULT call on one service, side by side in one run.

    python -m bench.mode_compare [--rounds 8] [--jobs 300] [--concurrency 16]
        [--delivery references|bytes] [--agents bench.fast_agent]

The orchestration path of :mod:`bench.cpu_compare` (instant agents in their own processes,
SQLite, a gRPC ImageUpscale per job) with one service process; segments alternate between
RESPONSE_MODE_SYNC and RESPONSE_MODE_RESULT calls (the same delivery), the order swapping
each round. Per segment: the service's CPU per job (``/proc``), this process's (the grpc.aio
caller and nothing else: the agents run apart) and the response messages per job. Prints
the rounds and the medians, with the ratio RESULT / SYNC per round (both modes see the same
minute's load, so the ratio is what to read on a shared machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from imagetasks.v1 import common_pb2, generation_service_pb2_grpc, job_pb2, tasks_pb2
from imagetasks.v1 import generation_service_pb2 as gpb

from bench import ROOT
from bench.common import cpu_seconds
from bench.orchestration import Inputs, JobFailed, JobFn, _segment, _wait_ready
from bench.service_proc import ServiceProcess
from bench.standin_proc import StandIns

AGENTS = 4
MODES = {"SYNC": common_pb2.RESPONSE_MODE_SYNC, "RESULT": common_pb2.RESPONSE_MODE_RESULT}
DELIVERIES = {
    "references": common_pb2.OUTPUT_DELIVERY_REFERENCES,
    "bytes": common_pb2.OUTPUT_DELIVERY_BYTES,
}


def _job(channel: grpc.aio.Channel, mode: int, delivery: int, messages: list[int]) -> JobFn:
    """One ImageUpscale call per job, its response messages added to ``messages[0]``."""
    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    options = common_pb2.JobOptions(mode=mode, delivery=delivery)
    first = gpb.ImageUpscaleRequest(params=tasks_pb2.ImageUpscaleParams(options=options))

    async def job(_index: int, png: bytes) -> tuple[str, float]:
        chunk = common_pb2.FileChunk(field="image", data=png, file_name="input.png")
        call = stub.ImageUpscale(timeout=120)
        await call.write(first)
        await call.write(gpb.ImageUpscaleRequest(chunk=chunk))
        await call.done_writing()
        finished: Any = None
        finished_at = 0.0
        async for response in call:
            messages[0] += 1
            if response.event.WhichOneof("kind") == "finished":
                finished_at = time.perf_counter()
                finished = response.event.finished.job
        if finished is None:
            raise JobFailed("the stream ended without a finished event")
        if finished.state != job_pb2.Job.STATE_SUCCEEDED:
            raise JobFailed(f"{job_pb2.Job.State.Name(finished.state)}: {finished.error.message}")
        return finished.name.rsplit("/", 1)[-1], finished_at

    return job


async def _compare(rounds: int, jobs: int, concurrency: int, delivery: str, module: str) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="bench-mode-compare-"))
    figures: dict[str, dict[str, list[float]]] = {
        mode: {"service": [], "caller": [], "messages": []} for mode in MODES
    }
    try:
        async with StandIns(AGENTS, tmp / "comfy", module=module) as agents:
            agent_list = json.dumps(
                [
                    {"url": url, "name": f"agent{i}", "max_concurrent_jobs": 64}
                    for i, url in enumerate(agents.urls)
                ]
            )
            env = {
                "AISERVER_GRPC_HOST": "127.0.0.1",
                "AISERVER_GRPC_PORT": "0",
                "AISERVER_HTTP_ENABLED": "false",
                "AISERVER_DATA_DIR": str(tmp / "service"),
                "AISERVER_AGENTS": agent_list,
            }
            async with ServiceProcess(env, tmp / "service.log", ROOT) as service:
                inputs = Inputs()
                async with grpc.aio.insecure_channel(service.target) as channel:
                    await _wait_ready(channel)
                    counted = {mode: [0] for mode in MODES}
                    calls = {
                        mode: _job(channel, value, DELIVERIES[delivery], counted[mode])
                        for mode, value in MODES.items()
                    }
                    for call in calls.values():
                        await _segment(call, 4, inputs.take(16))  # warm-up
                    for r in range(rounds):
                        order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
                        for mode in order:
                            counted[mode][0] = 0
                            server_before = cpu_seconds(service.pid)
                            caller_before = time.process_time()
                            got = await _segment(calls[mode], concurrency, inputs.take(jobs))
                            done = max(len(got["latencies"]), 1)
                            f = figures[mode]
                            f["service"].append(
                                (cpu_seconds(service.pid) - server_before) * 1000 / done
                            )
                            f["caller"].append((time.process_time() - caller_before) * 1000 / done)
                            f["messages"].append(counted[mode][0] / done)
                            await agents.dump()
                            await agents.reset()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        f"CPU ms per job, {rounds} rounds x {jobs} jobs, {concurrency} callers, {AGENTS} agents"
        f" ({module}), delivery {delivery}; SYNC vs RESULT on one service, alternating"
    ]
    for what in ("service", "caller", "messages"):
        sync, result = figures["SYNC"][what], figures["RESULT"][what]
        ratios = [a / b for a, b in zip(result, sync, strict=True) if b]
        lines += [
            f"{what} SYNC:   " + " ".join(f"{v:.2f}" for v in sync),
            f"{what} RESULT: " + " ".join(f"{v:.2f}" for v in result),
            f"{what}: median SYNC {statistics.median(sync):.2f}"
            f" [{min(sync):.2f}..{max(sync):.2f}], RESULT {statistics.median(result):.2f}"
            f" [{min(result):.2f}..{max(result):.2f}]; RESULT/SYNC median"
            f" {statistics.median(ratios):.3f} [{min(ratios):.3f}..{max(ratios):.3f}]",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--delivery", choices=sorted(DELIVERIES), default="references")
    parser.add_argument("--agents", default="bench.fast_agent")
    args = parser.parse_args()
    print(
        asyncio.run(_compare(args.rounds, args.jobs, args.concurrency, args.delivery, args.agents))
    )


if __name__ == "__main__":
    main()
