"""What the lease statements cost on PostgreSQL: client CPU and PostgreSQL CPU per cycle.

One cycle is what a coordinator's leases cost in a renewal period at a steady load: 8 agent
slot claims, one renewal of the 8 slots, 8 releases, one renewal of 64 job leases, one ask
for a leader role, and one claim of a free job. Run from two trees (``--tree``) to compare
statement texts (issue 17, helper "faults3": leases timed by the database's clock)::

    .venv/bin/python -m bench.lease_statements --cycles 400 --rounds 5 --tree /tmp/faults3-base

Not in ``make bench`` (about 40 s per tree). PostgreSQL's CPU is its backends' on a database
of this script's own (``bench.scaleout``'s counters), settled before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from aiserver.jobs.model import Job, JobState
from aiserver.jobs.store import JobRecord
from aiserver.jobs.store.postgres import PostgresJobStore
from bench import scaleout
from bench.common import drop_schema, run_in_tree

DATABASE = "bench_leases"


def _job(n: int) -> Job:
    from tests.storage.test_job_store import make_job

    return make_job(n, state=JobState.QUEUED)


async def _cycle(store: PostgresJobStore, held: list[str]) -> None:
    claims = [await store.claim_slot(f"agent-{i}", 1, "A", 30) for i in range(8)]
    got = [c for c in claims if c is not None]
    await store.renew_slots(got, 30)
    for claim in got:
        await store.release_slot(claim)
    await store.renew_all(held, "A", 30)
    await store.lead("retention", "A", 30)
    lease = await store.claim("B", 30)
    if lease is not None:
        await store.release(lease.job_id, "B")


async def _round(cycles: int) -> dict[str, float]:
    schema = f"l_{uuid.uuid4().hex[:12]}"
    store = await PostgresJobStore.open(scaleout.BENCH_URL, schema=schema, pool_size=4)
    try:
        held = []
        for n in range(64):
            job = _job(n)
            await store.create(JobRecord(job), holder="A", lease_s=30)
            held.append(job.id)
        await store.create(JobRecord(_job(100)))  # free: claimed and released every cycle
        for _ in range(20):  # warm-up: rows made, plans cached
            await _cycle(store, held)
        before = await scaleout._settled_counters()
        cpu = time.process_time()
        for _ in range(cycles):
            await _cycle(store, held)
        client = time.process_time() - cpu
        after = await scaleout._settled_counters()
    finally:
        await store.close()
        await drop_schema(scaleout.BENCH_URL, schema)
    return {
        "client_cpu_us_per_cycle": client * 1e6 / cycles,
        "postgres_cpu_us_per_cycle": (after["cpu"] - before["cpu"]) * 1e6 / cycles,
        "postgres_xacts_per_cycle": (after["xacts"] - before["xacts"]) / cycles,
    }


async def _main(cycles: int) -> dict[str, float]:
    scaleout.DATABASE = DATABASE
    scaleout.BENCH_URL = scaleout.BENCH_URL.rsplit("/", 1)[0] + f"/{DATABASE}"
    await scaleout._ensure_database()
    return await _round(cycles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tree", type=Path, help="a second source tree: interleaved A/B")
    parser.add_argument("--one", action="store_true", help="one round of this tree (a child)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(asyncio.run(_main(args.cycles))))
        return
    trees = {"here": Path.cwd()} | ({"tree": args.tree} if args.tree else {})
    got: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    script = str(Path(__file__).resolve())
    for _ in range(args.rounds):
        for name, tree in trees.items():
            one = run_in_tree(script, tree, "--one", "--cycles", str(args.cycles))
            for key, value in one.items():
                got[name].setdefault(key, []).append(value)
    out: dict[str, Any] = {
        name: {k: round(statistics.median(v), 1) for k, v in values.items()}
        | {"rounds": {k: [round(x, 1) for x in v] for k, v in values.items()}}
        for name, values in got.items()
    }
    with open("/proc/loadavg") as fh:
        out["loadavg"] = fh.read().split()[:3]
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
