"""Service CPU per job of two source trees, side by side: same agents, segments alternating.

    python -m bench.cpu_compare OTHER_TREE [--rounds 8] [--jobs 200] [--concurrency 16]
        [--agents bench.fast_agent] [--agent-jobs 64] [--step-delay S] [--comfy-url URL]

The orchestration path of :mod:`bench.profile_service` (instant agents in their own process,
SQLite, gRPC ImageUpscale SYNC + references), served by two service processes at once: this
tree's and ``OTHER_TREE``'s (e.g. ``git archive main | tar -x -C /tmp/main``), each in its own
data folder. Rounds alternate which goes first; each segment's CPU is read from ``/proc``.
On a machine shared with other work, one service's figure moves a lot from run to run; two
services measured in alternation see the same load, so their ratio is what to read. Prints
per-round CPU ms per job for both and the median ratio (this tree / other).
``--agent-jobs`` is each agent's ``max_concurrent_jobs`` (``queue_ahead`` 1): e.g. 3 makes the
4 agents take 16 jobs at once, so that 64 callers keep 48 waiting in the service's queue.
``--step-delay`` paces the stand-ins' steps (seconds per node step) so that a job's frames
arrive spread over its run, one wake-up each, as from a real agent; ``--comfy-url`` puts one
real ComfyUI (``RealESRGAN_x2.pth``, 64 px inputs) behind both services instead, with the
defaults ``max_concurrent_jobs=1, queue_ahead=1``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import grpc

from bench import ROOT
from bench.common import cpu_seconds
from bench.orchestration import REAL_SIDE, Inputs, _segment, _service_job, _wait_ready
from bench.service_proc import ServiceProcess
from bench.standin_proc import StandIns

AGENTS = 4


async def _compare(
    other: Path,
    rounds: int,
    jobs: int,
    concurrency: int,
    module: str,
    agent_jobs: int,
    step_delay_s: float = 0.0,
    comfy_url: str = "",
) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="bench-cpu-compare-"))
    trees = {"this": ROOT, "other": other}
    per_job: dict[str, list[float]] = {name: [] for name in trees}
    try:
        async with contextlib.AsyncExitStack() as stack:
            agents = None
            if comfy_url:
                agent_list = json.dumps([{"url": comfy_url, "name": "real"}])
                where = f"a real ComfyUI at {comfy_url}"
            else:
                agents = await stack.enter_async_context(
                    StandIns(AGENTS, tmp / "comfy", module=module, step_delay_s=step_delay_s)
                )
                agent_list = json.dumps(
                    [
                        {"url": url, "name": f"agent{i}", "max_concurrent_jobs": agent_jobs}
                        for i, url in enumerate(agents.urls)
                    ]
                )
                where = f"{AGENTS} agents ({module}, max_concurrent_jobs {agent_jobs}"
                where += f", step delay {step_delay_s:g} s)" if step_delay_s else ")"
            services = {}
            for name, root in trees.items():
                env = {
                    "AISERVER_GRPC_HOST": "127.0.0.1",
                    "AISERVER_GRPC_PORT": "0",
                    "AISERVER_HTTP_ENABLED": "false",
                    "AISERVER_DATA_DIR": str(tmp / f"service-{name}"),
                    "AISERVER_AGENTS": agent_list,
                }
                if comfy_url:
                    env["AISERVER_LOCAL_UPSCALE"] = "off"
                services[name] = await ServiceProcess(env, tmp / f"{name}.log", root).__aenter__()
            try:
                inputs = Inputs(REAL_SIDE) if comfy_url else Inputs()
                channels = {
                    name: grpc.aio.insecure_channel(s.target) for name, s in services.items()
                }
                calls = {}
                for name, channel in channels.items():
                    await _wait_ready(channel)
                    calls[name] = _service_job(channel)
                    await _segment(calls[name], 4, inputs.take(16))  # warm-up
                for r in range(rounds):
                    order = ["this", "other"] if r % 2 == 0 else ["other", "this"]
                    for name in order:
                        pid = services[name].pid
                        before = cpu_seconds(pid)
                        got = await _segment(calls[name], concurrency, inputs.take(jobs))
                        done = len(got["latencies"])
                        per_job[name].append((cpu_seconds(pid) - before) * 1000 / max(done, 1))
                        if agents is not None:
                            await agents.dump()
                            await agents.reset()
                for channel in channels.values():
                    await channel.close()
            finally:
                for service in services.values():
                    await service.__aexit__(None, None, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [a / b for a, b in zip(per_job["this"], per_job["other"], strict=True) if b]
    lines = [
        f"service CPU ms per job, {rounds} rounds x {jobs} jobs, {concurrency} callers,"
        f" {where}; other = {other}",
        "this:  " + " ".join(f"{v:.2f}" for v in per_job["this"]),
        "other: " + " ".join(f"{v:.2f}" for v in per_job["other"]),
        f"median this {statistics.median(per_job['this']):.2f} ms,"
        f" other {statistics.median(per_job['other']):.2f} ms;"
        f" ratio this/other median {statistics.median(ratios):.3f}"
        f" [{min(ratios):.3f}..{max(ratios):.3f}]",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", type=Path, help="the other source tree (its src/ and bench/)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--agents", default="bench.standin_proc")
    parser.add_argument("--agent-jobs", type=int, default=64)
    parser.add_argument("--step-delay", type=float, default=0.0, help="stand-in s per step")
    parser.add_argument("--comfy-url", default="", help="a real ComfyUI instead")
    args = parser.parse_args()
    other = args.other.resolve()
    print(
        asyncio.run(
            _compare(
                other,
                args.rounds,
                args.jobs,
                args.concurrency,
                args.agents,
                args.agent_jobs,
                args.step_delay,
                args.comfy_url.rstrip("/"),
            )
        )
    )


if __name__ == "__main__":
    main()
