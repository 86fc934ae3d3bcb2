"""What global queue positions and work stealing cost the job store on PostgreSQL.

Three holders share ``--queued`` QUEUED jobs (a third each) in a throwaway schema. Measured,
per operation, client CPU (``time.process_time``) and the PostgreSQL backend's CPU (its
``/proc/<pid>/stat``, the server runs on this machine), median of ``--rounds`` rounds:

- ``rank``: one ``queue_ranks(holder)``, the places of every job one holder has queued (what a
  dispatch pass costs, at most every 0.25 s while jobs wait);
- ``count each``: ``queue_position`` of each of those jobs, one COUNT per job (what a
  position per job per event would cost, for comparison);
- ``steal poll``: one ``stealable`` (what an idle coordinator asks every 2 s).

    python -m bench.shared_queue [--queued 300] [--rounds 5] [--url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from aiserver.jobs.ids import new_job_id
from aiserver.jobs.model import Job, JobState
from aiserver.jobs.store import JobRecord
from aiserver.jobs.store.postgres import PostgresJobStore
from aiserver.tasks import ImageToImageSpec, TaskKind
from bench.common import cpu_seconds, drop_schema

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


async def _measure(
    op: Callable[[], Awaitable[object]], pid: int, repeat: int
) -> tuple[float, float]:
    """Client and backend CPU microseconds per call of ``op``."""
    client0, backend0 = time.process_time(), cpu_seconds(pid)
    for _ in range(repeat):
        await op()
    client = (time.process_time() - client0) / repeat * 1e6
    backend = (cpu_seconds(pid) - backend0) / repeat * 1e6
    return client, backend


async def run(url: str, queued: int, rounds: int) -> dict[str, tuple[float, float]]:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    store = await PostgresJobStore.open(url, schema=schema, pool_size=1)
    try:
        start = datetime.now(UTC) - timedelta(hours=1)
        ids: list[str] = []
        for n in range(queued):
            created = start + timedelta(milliseconds=n)
            job_id = new_job_id(created)
            job = Job(
                id=job_id,
                task=TaskKind.IMAGE_TO_IMAGE,
                spec=ImageToImageSpec(positive_prompt=f"job {n}"),
                state=JobState.QUEUED,
                created=created,
                updated=created,
                owner="bench",
                ref_id=job_id,
            )
            await store.create(JobRecord(job))
            await store.claim(f"h{n % 3}", 600, job_id=job_id)
            ids.append(job_id)
        mine = ids[0::3]
        pid = int(await store._pool.fetchval("SELECT pg_backend_pid()"))

        async def rank() -> object:
            return await store.queue_ranks(holder="h0")

        async def count_each() -> object:
            return [await store.queue_position(j) for j in mine]

        async def steal_poll() -> object:
            return await store.stealable("h9", waited_s=2.0, tasks=list(TaskKind), limit=8)

        results: dict[str, list[tuple[float, float]]] = {}
        for _ in range(rounds):
            for name, op, repeat in (
                ("rank", rank, 50),
                ("count each", count_each, 3),
                ("steal poll", steal_poll, 50),
            ):
                results.setdefault(name, []).append(await _measure(op, pid, repeat))
        return {
            name: (
                statistics.median(c for c, _ in found),
                statistics.median(b for _, b in found),
            )
            for name, found in results.items()
        }
    finally:
        await store.close()
        await drop_schema(url, schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queued", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--url", default=DEFAULT_URL)
    args = parser.parse_args()
    found = asyncio.run(run(args.url, args.queued, args.rounds))
    held = len(range(0, args.queued, 3))
    print(f"{args.queued} queued jobs, {held} held by the ranked holder")
    print(f"{'operation':<12} {'client CPU µs':>14} {'PostgreSQL CPU µs':>18}")
    for name, (client, backend) in found.items():
        print(f"{name:<12} {client:>14.0f} {backend:>18.0f}")


if __name__ == "__main__":
    main()
