"""What a NOTIFY costs PostgreSQL: one connection commits one-row inserts, with and without
``pg_notify`` in the statement, while 1 or 3 other connections ``LISTEN`` on the channel;
the backends' CPU per commit from ``/proc`` (median of rounds).

    .venv/bin/python -m bench.notify_cost [--commits 3000] [--rounds 3]

Not run by ``python -m bench`` (bench/README.md, "Notifications only to who asked").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from typing import Any

import asyncpg

from bench.common import cpu_seconds
from bench.scaleout import ADMIN_URL

CHANNEL = "bench_notify_cost"
NOTICE = '["event", "01M98DM0B3704HPJDPH5MV7FP0", 12]'  # an announcement's size


async def _run(listeners: int, notify: bool, commits: int) -> tuple[float, float]:
    """(writer backend µs, all listener backends µs) per commit."""
    heard = 0

    def count(*_: Any) -> None:
        nonlocal heard
        heard += 1

    conns = [await asyncpg.connect(ADMIN_URL) for _ in range(listeners)]
    writer = await asyncpg.connect(ADMIN_URL)
    try:
        for conn in conns:
            await conn.add_listener(CHANNEL, count)
        await writer.execute("CREATE TEMP TABLE t (id int, v text)")
        sent = f"pg_notify('{CHANNEL}', $2)" if notify else "$2"
        sql = f"WITH s AS (INSERT INTO t VALUES ($1, $2) RETURNING id) SELECT {sent} FROM s"
        for i in range(50):  # warm: the statement prepared, the pages there
            await writer.fetchval(sql, i, NOTICE)
        await asyncio.sleep(0.3)
        pids = [writer.get_server_pid(), *(c.get_server_pid() for c in conns)]
        before = [cpu_seconds(p) for p in pids]
        for i in range(commits):
            await writer.fetchval(sql, i, NOTICE)
        await asyncio.sleep(0.5)  # the listeners read what is left
        used = [cpu_seconds(p) - b for p, b in zip(pids, before, strict=True)]
    finally:
        for conn in (writer, *conns):
            await conn.close()
    return used[0] / commits * 1e6, sum(used[1:]) / commits * 1e6


async def _main(commits: int, rounds: int) -> None:
    got: dict[tuple[int, bool], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for listeners in (1, 3):
            for notify in (False, True):
                found = await _run(listeners, notify, commits)
                got.setdefault((listeners, notify), []).append(found)
    for (listeners, notify), runs in got.items():
        writer = statistics.median(r[0] for r in runs)
        heard = statistics.median(r[1] for r in runs)
        print(
            f"{listeners} listening, {'with' if notify else 'without'} pg_notify: writer"
            f" {writer:.0f} µs per commit, the listeners {heard:.0f} µs per commit in all"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--commits", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    asyncio.run(_main(options.commits, options.rounds))
