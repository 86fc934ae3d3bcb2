"""PostgreSQL migrations never wait forever behind another session's lock: a step altering a
table an open transaction holds gives up after ``lock_timeout_s`` (applying nothing) with an
error saying so, and so does waiting for another process's migration lock."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from aiserver.jobs.store import StoreUnavailable, migrations, open_job_store
from aiserver.jobs.store import postgres as pg
from tests.storage.backends import PG_URL

LATEST = len(migrations.POSTGRES)


@pytest.fixture
async def schema() -> AsyncIterator[str]:
    name = f"t_{uuid.uuid4().hex[:16]}"
    yield name
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    finally:
        await conn.close()


async def _version(schema: str) -> int:
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        return int(await conn.fetchval("SELECT max(version) FROM schema_migrations"))
    finally:
        await conn.close()


async def _write_lock_every_table(conn: asyncpg.Connection, schema: str) -> None:
    """What a writer's open transaction holds on every table of ``schema`` (any step that
    alters or indexes one needs a lock that conflicts with it)."""
    tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)
    await conn.execute(f"LOCK TABLE {', '.join(t[0] for t in tables)} IN ROW EXCLUSIVE MODE")


async def test_a_step_blocked_by_an_open_transaction_gives_up_and_applies_nothing(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database one version behind, as a server of the previous release left it ...
    with monkeypatch.context() as m:
        m.setattr(migrations, "POSTGRES", migrations.POSTGRES[:-1])
        await pg.migrate(PG_URL, schema)
    assert await _version(schema) == LATEST - 1
    # ... which still has a write transaction open on every table.
    other = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        open_transaction = other.transaction()
        await open_transaction.start()
        await _write_lock_every_table(other, schema)
        started = time.monotonic()
        with pytest.raises(pg.MigrationLockTimeout) as caught:
            # (without the bound the step waits for as long as that transaction stays open)
            await asyncio.wait_for(pg.migrate(PG_URL, schema, lock_timeout_s=0.3), 20.0)
        assert time.monotonic() - started < 10.0
        message = str(caught.value)
        assert f"migration to version {LATEST} waited more than 0.3 s" in message
        assert "lock_timeout" in message and "nothing of the step was applied" in message
        assert await _version(schema) == LATEST - 1
        await open_transaction.rollback()
    finally:
        await other.close()
    await pg.migrate(PG_URL, schema, lock_timeout_s=0.3)  # the session gone: it goes through
    assert await _version(schema) == LATEST


async def test_another_sessions_migration_lock_is_waited_for_within_a_bound(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pg, "MIGRATION_WAIT_S", 0.3)
    other = await asyncpg.connect(PG_URL)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", migrations.MIGRATION_LOCK)
        with pytest.raises(pg.MigrationLockTimeout, match="held the migration lock"):
            await asyncio.wait_for(pg.migrate(PG_URL, schema), 20.0)
        await other.execute("SELECT pg_advisory_unlock($1)", migrations.MIGRATION_LOCK)
    finally:
        await other.close()
    await pg.migrate(PG_URL, schema)
    assert await _version(schema) == LATEST


async def test_a_server_starting_behind_a_lock_is_told_why(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `aiserver serve` reports (StoreUnavailable -> "cannot start: ..."), not a traceback.
    with monkeypatch.context() as m:
        m.setattr(migrations, "POSTGRES", migrations.POSTGRES[:-1])
        await pg.migrate(PG_URL, schema)
    other = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        async with other.transaction():
            await _write_lock_every_table(other, schema)
            with pytest.raises(StoreUnavailable, match="cannot open the job database") as caught:
                await asyncio.wait_for(
                    open_job_store(PG_URL, schema, Path("unused.sqlite3"), timeout_s=0.3), 20.0
                )
            assert f"migration to version {LATEST} waited more than 0.3 s" in str(caught.value)
    finally:
        await other.close()


async def test_aiserver_serve_behind_a_lock_exits_with_one_line(
    schema: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from tests.test_startup_errors import serve

    with monkeypatch.context() as m:
        m.setattr(migrations, "POSTGRES", migrations.POSTGRES[:-1])
        await pg.migrate(PG_URL, schema)
    other = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        async with other.transaction():
            await _write_lock_every_table(other, schema)
            rc, err = await serve(
                tmp_path,
                AISERVER_DATABASE_URL=PG_URL,
                AISERVER_DATABASE_SCHEMA=schema,
                AISERVER_DATABASE_TIMEOUT_S="0.5",
            )
    finally:
        await other.close()
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("aiserver: cannot start: cannot open the job database"), err
    assert f"migration to version {LATEST} waited more than 0.5 s" in last, err
