"""The floor under PostgreSQL's CPU per job: the fewest durable writes a job needs, nothing else.

    python -m bench.pg_floor [--rate 40] [--jobs 600] [--hold-s 0.3] [--updates 1] [--rounds 3]

Per job: one insert (the job accepted) and ``--updates`` updates of its row (its end; more for
the states in between), each written as the job store writes (``GroupCommit``: a write that
finds none of its kind in flight goes alone, the ones arriving meanwhile go together in one
``unnest`` statement, one commit), from connections lent by the store's ``ConnectionShelf``,
on a table of the job row's shape (``fillfactor = 50``: HOT updates). Jobs start at a fixed
``--rate`` (jobs/s, open loop: the service path's rate, from ``bench.scaleout``), each holding
``--hold-s`` between its writes (the service path's time from create to end), so the writes
meet as often as a coordinator's do at that rate. Figures, median of rounds: the backends'
CPU ms per job (``/proc``, as ``bench.scaleout`` counts it), transactions and rows per job,
the rate reached. What a coordinator's job costs PostgreSQL above this is what its other
writes and statements add; what this costs is the disk's flush and the statement's floor.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from aiserver.jobs.store.group_commit import GroupCommit
from aiserver.jobs.store.pg_shelf import ConnectionShelf
from bench import scaleout
from bench.common import drop_schema

DATABASE = "bench_pg_floor"
PAYLOAD = "x" * 1000
"""About a job row's size (its spec and inputs: ~1.25 kB per version)."""

_TABLE = (
    "CREATE TABLE floor_jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, payload TEXT NOT NULL,"
    " updated_us BIGINT NOT NULL) WITH (fillfactor = 50)"
)
_INSERT_ONE = (
    "INSERT INTO floor_jobs (id, state, payload, updated_us) VALUES ($1, 'QUEUED', $2, $3)"
)
_INSERT_GROUP = (
    "INSERT INTO floor_jobs (id, state, payload, updated_us)"
    " SELECT id, 'QUEUED', $2, $3 FROM unnest($1::text[]) AS v(id) ORDER BY id"
)
_UPDATE_ONE = "UPDATE floor_jobs SET state = $2, updated_us = $3 WHERE id = $1"
_UPDATE_GROUP = (
    "WITH v AS (SELECT * FROM unnest($1::text[], $2::text[]) AS v(id, state)),"
    " locked AS MATERIALIZED (SELECT id FROM floor_jobs WHERE id = ANY($1::text[])"
    " ORDER BY id FOR UPDATE)"
    " UPDATE floor_jobs f SET state = v.state, updated_us = $3 FROM v"
    " WHERE f.id = v.id AND f.id IN (SELECT id FROM locked)"
)


def _now_us() -> int:
    return time.time_ns() // 1000


class FloorStore:
    """Inserts and updates of one-row jobs, grouped as the job store groups its writes."""

    def __init__(self, shelf: ConnectionShelf) -> None:
        self._shelf = shelf
        self.inserts: GroupCommit[str, None] = GroupCommit(
            self._insert_one, self._insert_group, lambda job_id: job_id
        )
        self.updates: GroupCommit[tuple[str, str], None] = GroupCommit(
            self._update_one, self._update_group, lambda item: item[0]
        )

    async def _insert_one(self, job_id: str) -> None:
        await self._shelf.execute(_INSERT_ONE, job_id, PAYLOAD, _now_us())

    async def _insert_group(self, group: Sequence[str]) -> list[None]:
        await self._shelf.execute(_INSERT_GROUP, list(group), PAYLOAD, _now_us())
        return [None] * len(group)

    async def _update_one(self, item: tuple[str, str]) -> None:
        await self._shelf.execute(_UPDATE_ONE, item[0], item[1], _now_us())

    async def _update_group(self, group: Sequence[tuple[str, str]]) -> list[None]:
        ids, states = [i for i, _ in group], [s for _, s in group]
        await self._shelf.execute(_UPDATE_GROUP, ids, states, _now_us())
        return [None] * len(group)


async def _job(store: FloorStore, updates: int, hold_s: float) -> None:
    job_id = uuid.uuid4().hex
    await store.inserts.write(job_id)
    for n in range(updates):
        await asyncio.sleep(hold_s / updates)
        await store.updates.write((job_id, "SUCCEEDED" if n == updates - 1 else "RUNNING"))


async def _round(jobs: int, rate: float, hold_s: float, updates: int) -> dict[str, float]:
    schema = f"f_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(scaleout.BENCH_URL)
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        await admin.execute(f"SET search_path = {schema}")
        await admin.execute(_TABLE)
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(
        scaleout.BENCH_URL, min_size=1, max_size=8, server_settings={"search_path": schema}
    )
    store = FloorStore(ConnectionShelf(pool))
    try:

        async def paced(count: int) -> float:
            started = time.perf_counter()
            tasks = []
            for n in range(count):
                delay = started + n / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_job(store, updates, hold_s)))
            await asyncio.gather(*tasks)
            return time.perf_counter() - started

        await paced(max(int(rate), 16))  # warm-up: connections opened, plans cached
        before = await scaleout._settled_counters()
        elapsed = await paced(jobs)
        after = await scaleout._settled_counters()
    finally:
        await store._shelf.close()
        await drop_schema(scaleout.BENCH_URL, schema)
    return {
        "postgres_cpu_ms_per_job": (after["cpu"] - before["cpu"]) * 1000 / jobs,
        "postgres_xacts_per_job": (after["xacts"] - before["xacts"]) / jobs,
        "postgres_rows_written_per_job": (after["written"] - before["written"]) / jobs,
        "jobs_per_s": jobs / elapsed,
        "grouped_writes_per_job": (store.inserts.grouped + store.updates.grouped) / jobs,
    }


async def _main(jobs: int, rate: float, hold_s: float, updates: int, rounds: int) -> dict[str, Any]:
    # scaleout's database helpers, on a database of this script's own: its counters (and
    # backends' CPU) must see no other run.
    scaleout.DATABASE = DATABASE
    scaleout.BENCH_URL = scaleout.BENCH_URL.rsplit("/", 1)[0] + f"/{DATABASE}"
    await scaleout._ensure_database()
    got: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, value in (await _round(jobs, rate, hold_s, updates)).items():
            got.setdefault(name, []).append(value)
    return {name: round(statistics.median(v), 3) for name, v in got.items()} | {
        "rounds": {name: [round(x, 3) for x in v] for name, v in got.items()}
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--rate", type=float, default=40.0, help="jobs started per second")
    parser.add_argument("--hold-s", type=float, default=0.3, help="from a job's insert to its end")
    parser.add_argument("--updates", type=int, default=1, help="updates of its row per job")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(_main(args.jobs, args.rate, args.hold_s, args.updates, args.rounds))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
