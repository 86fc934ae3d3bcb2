"""Which PostgreSQL driver for the job store: asyncpg or psycopg 3, by CPU per cycle.

One cycle is what a job costs the store at minimum: insert a job row, append one event row,
read the job back (three statements, two of them writes in their own transaction). Both
drivers run the same SQL on one connection, in their own throwaway schema, alternating rounds.

    python -m bench.store_driver [--cycles 500] [--rounds 3] [--url postgresql://...]

Prints client CPU microseconds per cycle (``time.process_time``) and wall microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import psycopg

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"
_DDL = (
    "CREATE TABLE jobs (id TEXT PRIMARY KEY, owner TEXT NOT NULL, spec TEXT NOT NULL,"
    " state TEXT NOT NULL, created_us BIGINT NOT NULL, last_sequence BIGINT NOT NULL)",
    "CREATE TABLE job_events (job_id TEXT NOT NULL, sequence BIGINT NOT NULL,"
    " payload TEXT NOT NULL, PRIMARY KEY (job_id, sequence))",
)
_SPEC = json.dumps({"positive_prompt": "a cat " * 20, "seed": 42})

Cycle = Callable[[int], Awaitable[None]]


async def _asyncpg(url: str, schema: str) -> tuple[Cycle, Callable[[], Awaitable[None]]]:
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})

    async def cycle(n: int) -> None:
        job_id = f"j{n}"
        await conn.execute(
            "INSERT INTO jobs VALUES ($1, $2, $3, $4, $5, $6)", job_id, "alice", _SPEC, "Q", n, 0
        )
        await conn.execute("INSERT INTO job_events VALUES ($1, $2, $3)", job_id, 1, "{}")
        await conn.fetchrow("SELECT * FROM jobs WHERE id = $1", job_id)

    return cycle, conn.close


async def _psycopg(url: str, schema: str) -> tuple[Cycle, Callable[[], Awaitable[None]]]:
    conn = await psycopg.AsyncConnection.connect(
        url, autocommit=True, options=f"-c search_path={schema}"
    )

    async def cycle(n: int) -> None:
        job_id = f"j{n}"
        await conn.execute(
            "INSERT INTO jobs VALUES (%s, %s, %s, %s, %s, %s)",
            (job_id, "alice", _SPEC, "Q", n, 0),
            prepare=True,
        )
        await conn.execute(
            "INSERT INTO job_events VALUES (%s, %s, %s)", (job_id, 1, "{}"), prepare=True
        )
        cur = await conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,), prepare=True)
        await cur.fetchone()

    return cycle, conn.close


async def _measure(url: str, cycles: int, rounds: int) -> dict[str, dict[str, float]]:
    admin = await asyncpg.connect(url)
    drivers = {"asyncpg": _asyncpg, "psycopg": _psycopg}
    cpu: dict[str, list[float]] = {name: [] for name in drivers}
    wall: dict[str, list[float]] = {name: [] for name in drivers}
    try:
        for r in range(rounds):
            for name, make in drivers.items():
                schema = f"bench_{name}_{uuid.uuid4().hex[:8]}"
                await admin.execute(f"CREATE SCHEMA {schema}")
                try:
                    for ddl in _DDL:
                        await admin.execute(f"SET search_path = {schema}; {ddl}")
                    cycle, close = await make(url, schema)
                    for n in range(20):  # warm up: prepared statements, caches
                        await cycle(-n - 1)
                    c0, w0 = time.process_time(), time.perf_counter()
                    for n in range(cycles):
                        await cycle(r * cycles + n)
                    cpu[name].append((time.process_time() - c0) / cycles * 1e6)
                    wall[name].append((time.perf_counter() - w0) / cycles * 1e6)
                    await close()
                finally:
                    await admin.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await admin.close()
    return {
        name: {
            "cpu_us_per_cycle": statistics.median(cpu[name]),
            "wall_us_per_cycle": statistics.median(wall[name]),
        }
        for name in drivers
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_measure(args.url, args.cycles, args.rounds)), indent=2))


if __name__ == "__main__":
    main()
