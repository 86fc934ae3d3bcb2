"""Where jobs live between requests, across restarts and across processes.

:mod:`.protocol` says what a store is; :mod:`.sqlite` (embedded default) and :mod:`.postgres`
(``AISERVER_DATABASE_URL=postgresql://...``) implement it; :func:`open_job_store` picks one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from aiserver.jobs.store.migrations import SchemaTooNew
from aiserver.jobs.store.protocol import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    ActiveLimitReached,
    Announcement,
    AnnouncementStream,
    JobQuery,
    JobRecord,
    JobStore,
    Lease,
    LeaseLost,
    NewEvent,
    OutboxItem,
    QueueRanks,
    SlotClaim,
    StoredEvent,
    new_holder_id,
)
from aiserver.jobs.store.sqlite import SqliteJobStore

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "ActiveLimitReached",
    "Announcement",
    "AnnouncementStream",
    "JobQuery",
    "JobRecord",
    "JobStore",
    "Lease",
    "LeaseLost",
    "NewEvent",
    "OutboxItem",
    "QueueRanks",
    "SlotClaim",
    "SqliteJobStore",
    "StoreUnavailable",
    "StoredEvent",
    "new_holder_id",
    "open_job_store",
    "redacted",
]


class StoreUnavailable(Exception):
    """The job database cannot be opened (unreachable, refused, not migratable); the message
    names it without its password."""


async def open_job_store(
    database_url: str, schema: str, sqlite_path: Path, *, timeout_s: float = 5.0
) -> JobStore:
    """PostgreSQL when ``database_url`` is ``postgresql://...``, else SQLite at ``sqlite_path``.
    ``timeout_s``: PostgreSQL's bound on each statement and connect."""
    if not database_url:
        try:
            return await SqliteJobStore.open(sqlite_path)
        except (OSError, sqlite3.Error, SchemaTooNew) as exc:
            raise StoreUnavailable(f"cannot open the job database {sqlite_path}: {exc}") from exc
    if not database_url.startswith(("postgresql://", "postgres://")):
        raise ValueError("AISERVER_DATABASE_URL must start with postgresql:// (or be unset)")
    # Imported here: the embedded default never loads the driver.
    from aiserver.jobs.store.postgres import OPEN_FAILURES, PostgresJobStore

    try:
        return await PostgresJobStore.open(
            database_url, schema=schema or "public", timeout_s=timeout_s
        )
    except OPEN_FAILURES as exc:
        raise StoreUnavailable(
            f"cannot open the job database {redacted(database_url)}: {exc}"
        ) from exc


def redacted(url: str) -> str:
    """``url`` without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
