"""Jobs/s and CPU per job of two source trees' services, interleaved, callers in their own
processes.

    python -m bench.throughput_compare OTHER_TREE [--rounds 6] [--levels 16,64]
        [--jobs 320] [--agent-jobs 64]

Both services (this tree's and ``OTHER_TREE``'s, e.g. ``git archive main | tar -x -C DIR``)
run against the same 4 :mod:`bench.fast_agent` agents, each agent with ``max_concurrent_jobs``
``--agent-jobs`` (``queue_ahead`` 1), and each has its own :mod:`bench.callers` process. For
every round and level the two services take a segment of ``--jobs`` jobs in turn (the order
alternates by round). Per segment: jobs/s, and CPU per job of the service, its callers and the
agents, read from ``/proc``. Prints each round, then medians with min..max and the median of
the per-round ratios (this / other): on a shared machine only those ratios are steady.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench import ROOT
from bench.callers import Callers
from bench.common import cpu_seconds, ms
from bench.service_proc import ServiceProcess
from bench.standin_proc import StandIns

AGENTS = 4
FIGURES = ("jobs_per_s", "service_ms", "callers_ms", "agents_ms")


async def _compare(other: Path, rounds: int, levels: list[int], jobs: int, agent_jobs: int) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    trees = {"this": ROOT, "other": other}
    got: dict[tuple[str, int, str], list[float]] = {}
    lines = []
    try:
        async with StandIns(AGENTS, tmp / "agents", module="bench.fast_agent") as agents:
            agent_list = json.dumps(
                [
                    {"url": url, "name": f"agent{i}", "max_concurrent_jobs": agent_jobs}
                    for i, url in enumerate(agents.urls)
                ]
            )
            services: dict[str, ServiceProcess] = {}
            callers: dict[str, Callers] = {}
            try:
                for name, root in trees.items():
                    env = {
                        "AISERVER_GRPC_HOST": "127.0.0.1",
                        "AISERVER_GRPC_PORT": "0",
                        "AISERVER_HTTP_ENABLED": "false",
                        "AISERVER_DATA_DIR": str(tmp / f"service-{name}"),
                        "AISERVER_AGENTS": agent_list,
                    }
                    service = ServiceProcess(env, tmp / f"{name}.log", root)
                    services[name] = await service.__aenter__()
                    callers[name] = await Callers(tmp / f"callers-{name}.log").__aenter__()
                    await callers[name].ask({"service": service.target})
                for r in range(rounds):
                    order = ["this", "other"] if r % 2 == 0 else ["other", "this"]
                    for n in levels:
                        for name in order:
                            pid = services[name].pid
                            await callers[name].ask({"inputs": jobs})  # PNGs: not counted
                            before = (cpu_seconds(pid), cpu_seconds(agents.pid))
                            result = await callers[name].ask({"run": "service", "concurrency": n})
                            done = max(len(result["latencies"]), 1)
                            figures = (
                                result["jobs_per_s"],
                                ms(cpu_seconds(pid) - before[0]) / done,
                                ms(result["cpu_s"]) / done,
                                ms(cpu_seconds(agents.pid) - before[1]) / done,
                            )
                            for key, value in zip(FIGURES, figures, strict=True):
                                got.setdefault((name, n, key), []).append(value)
                            lines.append(
                                f"round {r} @{n} {name:5s}: {figures[0]:6.1f} jobs/s, CPU ms"
                                f" per job: service {figures[1]:5.2f}, callers"
                                f" {figures[2]:4.2f}, agents {figures[3]:4.2f}"
                                + _failures(result["failed"])
                            )
                            await agents.dump()
                            await agents.reset()
            finally:
                for caller in callers.values():
                    await caller.__aexit__(None, None, None)
                for service in services.values():
                    await service.__aexit__(None, None, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines.append(
        f"{rounds} rounds x {jobs} jobs, {AGENTS} fast agents (max_concurrent_jobs {agent_jobs});"
        f" other = {other}"
    )
    for n in levels:
        for key in FIGURES:
            this, that = got[("this", n, key)], got[("other", n, key)]
            ratios = [a / b for a, b in zip(this, that, strict=True) if b]
            lines.append(
                f"@{n} {key:10s} this {_spread(this)}  other {_spread(that)}"
                f"  ratio {_spread(ratios, 3)}"
            )
    return "\n".join(lines)


def _failures(reasons: list[str]) -> str:
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return "".join(f"; {n} failed: {reason}" for reason, n in counts.items())


def _spread(values: list[float], digits: int = 2) -> str:
    return (
        f"{statistics.median(values):.{digits}f}"
        f" [{min(values):.{digits}f}..{max(values):.{digits}f}]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", type=Path, help="the other source tree (its src/ and bench/)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--levels", default="16,64")
    parser.add_argument("--jobs", type=int, default=320)
    parser.add_argument("--agent-jobs", type=int, default=64)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    text = asyncio.run(
        _compare(args.other.resolve(), args.rounds, levels, args.jobs, args.agent_jobs)
    )
    print(text)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
