"""Which SQL statements a coordinator sends, counted by statement (bench only).

``BENCH_SQL_CENSUS=FILE`` makes :mod:`bench.service_proc` install this before the service
starts: every asyncpg connection the process opens (job store, artifact index, ``LISTEN``)
gets a query logger, and at exit ``FILE`` holds ``{statement: count}`` (statements shortened
to their first 90 characters, ``BEGIN``/``COMMIT`` included), and the notifications its
``LISTEN`` connection received under ``"NOTIFY received"`` (each cost that connection's backend
a transaction, unless several arrived together). pg_stat_statements would say the same, but it
needs ``shared_preload_libraries`` on a server other work shares.
"""

from __future__ import annotations

import atexit
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["install"]

_SPACES = re.compile(r"\s+")


def install(path: Path) -> None:
    import asyncpg

    counts: Counter[str] = Counter()

    def log(query: Any) -> None:
        counts[_SPACES.sub(" ", str(query.query)).strip()[:90]] += 1

    def watch(conn: Any) -> None:
        conn.add_query_logger(log)

    add_listener = asyncpg.Connection.add_listener

    async def counted_listener(self: Any, channel: str, callback: Any) -> None:
        def heard(*args: Any) -> None:
            counts["NOTIFY received"] += 1
            callback(*args)

        await add_listener(self, channel, heard)

    asyncpg.Connection.add_listener = counted_listener  # type: ignore[method-assign]

    create_pool = asyncpg.create_pool
    connect = asyncpg.connect

    def counted_pool(*args: Any, init: Any = None, **kwargs: Any) -> Any:
        async def first(conn: Any) -> None:
            watch(conn)
            if init is not None:
                await init(conn)

        return create_pool(*args, init=first, **kwargs)

    async def counted_connect(*args: Any, **kwargs: Any) -> Any:
        conn = await connect(*args, **kwargs)
        watch(conn)
        return conn

    asyncpg.create_pool = counted_pool
    asyncpg.connect = counted_connect

    def dump() -> None:
        path.write_text(json.dumps(dict(counts.most_common()), indent=1))

    atexit.register(dump)
