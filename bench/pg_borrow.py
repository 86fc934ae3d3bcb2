"""A coordinator's CPU per PostgreSQL statement: asyncpg's pool against the connection shelf.

    python -m bench.pg_borrow [--rounds 12] [--statements 1000]

One process, one job store on a throwaway schema of the ``test`` database; the same one-row
primary-key ``SELECT`` (what ``JobStore.get`` sends) run ``--statements`` times back to back
through ``Pool.fetchval`` (acquire and release per statement, as the store did) and through
the store's :class:`~aiserver.jobs.store.pg_shelf.ConnectionShelf`, alternating which goes
first each round. Prints µs of this process's CPU per statement, median [min..max] of the
rounds: the client side only (the server does the same work either way).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

from aiserver.jobs.store import JobRecord
from aiserver.jobs.store.postgres import PostgresJobStore
from bench.common import drop_schema
from tests.storage.test_job_store import make_job

URL = "postgresql://postgres@127.0.0.1:5432/test"


async def _main(rounds: int, statements: int) -> None:
    schema = f"b_{uuid.uuid4().hex[:12]}"
    store = await PostgresJobStore.open(URL, schema=schema)
    try:
        job = make_job(1)
        await store.create(JobRecord(job))
        sql = "SELECT state FROM jobs WHERE id = $1"
        shelf = store._pool
        ways = {"pool": shelf.pool.fetchval, "shelf": shelf.fetchval}
        got: dict[str, list[float]] = {name: [] for name in ways}
        for n in range(rounds + 1):
            for name, fetchval in sorted(ways.items(), reverse=n % 2 == 1):
                cpu = time.process_time()
                for _ in range(statements):
                    await fetchval(sql, job.id)
                if n:  # the first round warms both up
                    got[name].append((time.process_time() - cpu) * 1e6 / statements)
        for name, values in got.items():
            print(
                f"{name}: {statistics.median(values):.1f} us of client CPU per statement"
                f" [{min(values):.1f}..{max(values):.1f}]"
            )
    finally:
        await store.close()
        await drop_schema(URL, schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--statements", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(_main(args.rounds, args.statements))


if __name__ == "__main__":
    main()
