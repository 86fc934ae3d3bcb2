"""The agents' CPU per job against the arrival rate: the lean client, unpaced and paced.

    python -m bench.agent_pacing [--rounds 4] [--jobs 300] [--specs 16:0,16:150,1:0,1:8]
        [--strace]

:mod:`bench.comfy_lean` (the service's exchange with the agents, nothing else) against 4
:mod:`bench.fast_agent` agents in their own process, run in this process. A spec is
``CALLERS:PACE_MS``: that many jobs in flight, each caller sleeping a random 0..2 x PACE_MS after
each job (random, so that the callers do not fall into step and arrive in bursts). Pacing
changes nothing on the wire (the same requests, bodies and frames per job); it only spreads
the arrivals, as a slower client does: the service feeding these agents runs ~100 jobs/s on
the bench's 2 loaded cores where the lean client runs 500-700. Specs alternate in order by
round; the agents' CPU per job and this process's (the lean client's) are read from
``/proc``. ``--strace`` counts the agent process's
system calls per job (``strace -f -c``) in the first round, one file per spec in /tmp.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import statistics
import tempfile
import time
from pathlib import Path

from bench.client_loop import INPUT_SIDE, Inputs
from bench.comfy_lean import LeanComfy
from bench.common import cpu_seconds, ms
from bench.standin_proc import StandIns

AGENTS = 4


async def _segment(
    clients: list[LeanComfy], callers: int, pngs: list[bytes], jobs: int, pace_s: float
) -> None:
    indexes = iter(range(jobs))

    async def caller() -> None:
        for i in indexes:
            await clients[i % len(clients)].upscale(pngs[i % len(pngs)], INPUT_SIDE, INPUT_SIDE)
            if pace_s:
                await asyncio.sleep(random.uniform(0, 2 * pace_s))

    await asyncio.gather(*(caller() for _ in range(callers)))


def _syscalls(path: Path, jobs: int) -> str:
    """``strace -c``'s counts of the network and loop calls, per job."""
    counts = {}
    for line in path.read_text().splitlines():
        found = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if found and found.group(2) in ("epoll_wait", "recvfrom", "sendto"):
            counts[found.group(2)] = int(found.group(1)) / jobs
    return " ".join(f"{name} {n:.2f}" for name, n in sorted(counts.items()))


async def _run(rounds: int, jobs: int, specs: list[str], trace: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-agent-pacing-"))
    pngs = Inputs().take(64)
    per_job: dict[str, list[float]] = {spec: [] for spec in specs}
    client_per_job: dict[str, list[float]] = {spec: [] for spec in specs}
    me = os.getpid()
    async with StandIns(AGENTS, tmp / "fast", module="bench.fast_agent") as agents:
        clients = [LeanComfy(url) for url in agents.urls]
        for client in clients:
            await client.start()
        try:
            await _segment(clients, 4, pngs, 16, 0.0)  # warm-up
            for r in range(rounds):
                k = r % len(specs)
                for spec in specs[k:] + specs[:k]:
                    callers, _, pace = spec.partition(":")
                    tracer, out = None, tmp / f"strace-{spec}.txt"
                    if trace and r == 0:
                        command = ["strace", "-f", "-c", "-o", str(out), "-p", str(agents.pid)]
                        tracer = await asyncio.create_subprocess_exec(
                            *command, stderr=asyncio.subprocess.DEVNULL
                        )
                        await asyncio.sleep(1.0)  # attached
                    before, started = cpu_seconds(agents.pid), time.perf_counter()
                    mine = cpu_seconds(me)
                    await _segment(clients, int(callers), pngs, jobs, float(pace or 0) / 1000)
                    spent, took = cpu_seconds(agents.pid) - before, time.perf_counter() - started
                    own = cpu_seconds(me) - mine
                    note = ""
                    if tracer is not None:
                        tracer.send_signal(signal.SIGINT)
                        await tracer.wait()
                        note = f"  (strace on, per job: {_syscalls(out, jobs)})"
                    else:
                        per_job[spec].append(ms(spent) / jobs)
                        client_per_job[spec].append(ms(own) / jobs)
                    print(
                        f"round {r} {spec:>8}: agents {ms(spent) / jobs:.3f} ms/job,"
                        f" lean client {ms(own) / jobs:.3f},"
                        f" {jobs / took:.0f} jobs/s{note}",
                        flush=True,
                    )
                    await agents.dump()
                    await agents.reset()
        finally:
            for client in clients:
                await client.aclose()
    for spec, values in per_job.items():
        if values:
            own_values = client_per_job[spec]
            print(
                f"{spec:>8}: agents {_spread(values)}, lean client {_spread(own_values)}"
                f" ms/job over {len(values)} rounds"
            )


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}..{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--specs", default="16:0,16:150,1:0,1:8", help="CALLERS:PACE_MS,...")
    parser.add_argument("--strace", action="store_true", help="count system calls in round 0")
    args = parser.parse_args()
    asyncio.run(_run(args.rounds, args.jobs, args.specs.split(","), args.strace))


if __name__ == "__main__":
    main()
