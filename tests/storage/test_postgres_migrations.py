"""PostgreSQL migrations never wait forever behind another session's lock: a step altering a
table an open transaction holds retries short attempts (each rolled back whole, so the tables
it already altered are not held for long) and gives up after its budget (applying nothing)
with an error saying so, and so does waiting for another process's migration lock."""

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
        assert f"migration to version {LATEST} waited more than 1.8 s" in message
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
            assert f"migration to version {LATEST} waited more than 1.8 s" in str(caught.value)
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
    assert f"migration to version {LATEST} waited more than 3 s" in last, err


async def _at_version_4(schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A database before step 5, which alters ``jobs`` (ACCESS EXCLUSIVE) before it alters
    ``job_events``."""
    with monkeypatch.context() as m:
        m.setattr(migrations, "POSTGRES", migrations.POSTGRES[:4])
        await pg.migrate(PG_URL, schema)
    assert await _version(schema) == 4


async def _has_column(schema: str, table: str, column: str) -> bool:
    conn = await asyncpg.connect(PG_URL)
    try:
        found = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_schema = $1 AND table_name = $2 AND column_name = $3",
            schema, table, column,
        )  # fmt: skip
        return bool(found)
    finally:
        await conn.close()


async def test_a_step_blocked_half_way_applies_nothing(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _at_version_4(schema, monkeypatch)
    other = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        async with other.transaction():
            await other.execute("LOCK TABLE job_events IN ROW EXCLUSIVE MODE")
            with pytest.raises(pg.MigrationLockTimeout, match="migration to version 5"):
                await asyncio.wait_for(pg.migrate(PG_URL, schema, lock_timeout_s=0.2), 20.0)
    finally:
        await other.close()
    # step 5 altered jobs before it met job_events: rolled back whole
    assert await _version(schema) == 4
    assert not await _has_column(schema, "jobs", "unfinished")


async def test_a_reader_of_an_altered_table_waits_one_short_attempt_at_most(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Step 5 holds jobs (ACCESS EXCLUSIVE) while it waits for job_events: a coordinator's
    # statement on jobs queues behind it, for one attempt (timeout_s / 4 here), not the
    # whole wait.
    await _at_version_4(schema, monkeypatch)
    timeout_s = 2.0
    other = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    reader = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        async with other.transaction():
            await other.execute("LOCK TABLE job_events IN ROW EXCLUSIVE MODE")
            migration = asyncio.create_task(pg.migrate(PG_URL, schema, lock_timeout_s=timeout_s))
            waits = []
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline and not migration.done():
                started = time.monotonic()
                await reader.fetchval("SELECT count(*) FROM jobs")
                waits.append(time.monotonic() - started)
                await asyncio.sleep(0.05)
            assert max(waits) < timeout_s / 2, waits  # one attempt is timeout_s / 4 = 0.5 s
            assert len(waits) >= 3 and not migration.done()
        await asyncio.wait_for(migration, 20.0)  # the lock gone: a retry goes through
    finally:
        await other.close()
        await reader.close()
    assert await _version(schema) == LATEST


async def test_a_lock_released_mid_way_lets_a_retry_go_through(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await _at_version_4(schema, monkeypatch)
    other = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        transaction = other.transaction()
        await transaction.start()
        await other.execute("LOCK TABLE job_events IN ROW EXCLUSIVE MODE")
        migration = asyncio.create_task(pg.migrate(PG_URL, schema, lock_timeout_s=0.4))
        await asyncio.sleep(0.8)  # two attempts of 0.1 s have given up by now
        assert not migration.done()
        await transaction.rollback()
        await asyncio.wait_for(migration, 20.0)
    finally:
        await other.close()
    assert await _version(schema) == LATEST
    assert await _has_column(schema, "jobs", "unfinished")


async def test_a_deadlock_with_a_running_coordinator_is_tried_again(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rolling upgrade: a coordinator of the release before holds job_events (an event
    # insert) and then reads jobs, which step 5 has altered while it waits for job_events.
    # PostgreSQL breaks the cycle by failing one side (here the step, whose wait began first
    # and whose deadlock check runs first): the step is rolled back and tried again.
    await _at_version_4(schema, monkeypatch)
    monkeypatch.setattr(pg, "MIGRATION_ATTEMPT_S", 5.0)  # past deadlock_timeout (1 s)
    other = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        async with other.transaction():
            await other.execute("SET LOCAL deadlock_timeout = '30s'")
            await other.execute("LOCK TABLE job_events IN ROW EXCLUSIVE MODE")
            migration = asyncio.create_task(pg.migrate(PG_URL, schema, lock_timeout_s=30.0))
            await asyncio.sleep(0.5)  # step 5 has altered jobs and waits for job_events
            assert not migration.done()
            await asyncio.wait_for(other.fetchval("SELECT count(*) FROM jobs"), 10.0)
        await asyncio.wait_for(migration, 20.0)
    finally:
        await other.close()
    assert await _version(schema) == LATEST


async def test_time_queued_behind_another_migration_is_not_the_steps_budget(
    schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another process migrates for 1.5 s (the advisory lock), longer than this step's whole
    # budget (6 x 0.2 s); then a table lock is still busy for 0.3 s: the step retries.
    await _at_version_4(schema, monkeypatch)
    migrating = await asyncpg.connect(PG_URL)
    writer = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        writing = writer.transaction()
        await writing.start()
        await writer.execute("LOCK TABLE job_events IN ROW EXCLUSIVE MODE")
        other_migration = migrating.transaction()
        await other_migration.start()
        await migrating.execute("SELECT pg_advisory_xact_lock($1)", migrations.MIGRATION_LOCK)
        migration = asyncio.create_task(pg.migrate(PG_URL, schema, lock_timeout_s=0.2))
        await asyncio.sleep(1.5)
        assert not migration.done()
        await other_migration.commit()  # the advisory lock goes with it
        await asyncio.sleep(0.3)  # the step's attempts meet the busy table meanwhile
        assert not migration.done()
        await writing.rollback()
        await asyncio.wait_for(migration, 20.0)
    finally:
        await migrating.close()
        await writer.close()
    assert await _version(schema) == LATEST


async def test_a_lock_on_the_version_table_is_named_as_such(schema: str) -> None:
    await pg.migrate(PG_URL, schema)
    other = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        async with other.transaction():
            await other.execute("LOCK TABLE schema_migrations IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(pg.MigrationLockTimeout) as caught:
                await asyncio.wait_for(pg.migrate(PG_URL, schema, lock_timeout_s=0.2), 20.0)
    finally:
        await other.close()
    message = str(caught.value)
    assert "migration to version" not in message, message
    assert f"schema {schema}: reading the schema version waited" in message, message


async def _lock_version_table(conn: asyncpg.Connection) -> None:
    await conn.execute("LOCK TABLE schema_migrations IN ACCESS EXCLUSIVE MODE")


async def test_the_artifact_index_is_opened_at_server_start(schema: str, tmp_path: Path) -> None:
    # Its migration ran in Service.start: a request after that does not run one (which would
    # wait behind this lock, then fail).
    from aiserver.server import Service
    from tests.conftest import make_settings

    service = Service(
        make_settings(tmp_path, database_url=PG_URL, database_schema=schema, database_timeout_s=0.3)
    )
    await service.start()
    other = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        async with other.transaction():
            await _lock_version_table(other)
            found = await asyncio.wait_for(service.artifacts.index.lookup("a.png", None), 20.0)
            assert found is None
    finally:
        await other.close()
        await service.stop(grace_s=1)


async def test_an_artifact_index_that_cannot_migrate_is_a_start_up_error(schema: str) -> None:
    from aiserver.artifacts.index import PostgresArtifactIndex

    await pg.migrate(PG_URL, schema)
    index = PostgresArtifactIndex(PG_URL, schema=schema, timeout_s=0.2)
    other = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        async with other.transaction():
            await _lock_version_table(other)
            with pytest.raises(StoreUnavailable) as caught:
                await asyncio.wait_for(index.start(), 20.0)
    finally:
        await other.close()
        await index.close()
    message = str(caught.value)
    assert message.startswith("cannot open the artifact index in the job database"), message
    assert "reading the schema version waited more than 1.2 s" in message, message


async def test_a_migration_lock_timeout_met_in_a_call_is_an_outage(schema: str) -> None:
    # (the lazy migration of an index that was not started: UNAVAILABLE, not INTERNAL)
    from aiserver.errors import ErrorKind
    from aiserver.outage import backend_outage

    await pg.migrate(PG_URL, schema)
    other = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        async with other.transaction():
            await _lock_version_table(other)
            with pytest.raises(pg.MigrationLockTimeout) as caught:
                await asyncio.wait_for(pg.migrate(PG_URL, schema, lock_timeout_s=0.1), 20.0)
    finally:
        await other.close()
    error = backend_outage(caught.value)
    assert error is not None and error.kind is ErrorKind.UNAVAILABLE, caught.value
    assert error.reason == "STORE_UNAVAILABLE" and error.retry_after_s
