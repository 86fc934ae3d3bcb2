"""Where jobs live between requests and across restarts.

:class:`JobStore` is the small interface the manager needs, so a server database can replace
:class:`SqliteJobStore` later. The SQLite store owns one connection that only its dedicated
thread touches: every call is handed to that thread, so the event loop waits on a future and
never on the disk (a commit in WAL mode with ``synchronous=NORMAL`` is ~0.1 ms, but a WAL
checkpoint or a busy lock can take milliseconds to seconds). One thread also means writes reach
the database in the order they were issued, which the manager relies on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import sqlite3
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Self, TypeVar

from aiserver.errors import ErrorKind, ServiceError, invalid_argument
from aiserver.jobs import codec
from aiserver.jobs.model import Job, JobState, Retrying
from aiserver.jobs.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from aiserver.jobs.paging import page_size as _page_size
from aiserver.tasks import TaskKind, spec_from_dict, spec_to_dict

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "JobQuery",
    "JobRecord",
    "JobStore",
    "SqliteJobStore",
]


_T = TypeVar("_T")


@dataclass(slots=True)
class JobRecord:
    """A job as stored, with what its event stream needs beyond :class:`Job`."""

    job: Job
    last_sequence: int = 0
    """No event of the job has a higher sequence (a reservation: it may run ahead)."""
    retries: list[Retrying] = field(default_factory=list)
    """Every retry so far: replayed to late subscribers; failed agents are excluded."""


@dataclass(frozen=True, slots=True)
class JobQuery:
    """Filters of a job listing; empty values match everything."""

    owner: str | None = None
    """``None``: every owner's jobs (admin)."""
    states: frozenset[JobState] = frozenset()
    task: TaskKind | None = None
    tag: str = ""
    ref_id: str = ""

    def digest(self) -> str:
        """Names these filters in page tokens: a token only continues the listing it came from."""
        canonical = json.dumps(
            [
                self.owner,
                sorted(s.value for s in self.states),
                self.task.value if self.task else None,
                self.tag,
                self.ref_id,
            ]
        )
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class JobStore(Protocol):
    """Persistence of job records. Implementations keep the order of calls from one caller."""

    async def create(self, record: JobRecord) -> tuple[JobRecord, bool]:
        """Insert ``record``; if its (owner, ref_id) exists, return that one and ``True``."""
        ...

    async def save(self, record: JobRecord) -> None:
        """Overwrite the stored record with ``record`` (as it is when called)."""
        ...

    async def get(self, job_id: str) -> JobRecord | None: ...

    async def query(
        self, query: JobQuery, *, page_size: int, page_token: str
    ) -> tuple[list[Job], str]:
        """Newest first; returns a page and the token of the next one (``""`` at the end).

        ``page_size`` 0 means the default; beyond :data:`MAX_PAGE_SIZE` (or negative) it is
        refused with INVALID_ARGUMENT, never clamped (:func:`aiserver.jobs.paging.page_size`).
        """
        ...

    async def unfinished(self) -> list[JobRecord]:
        """Every QUEUED or RUNNING job, oldest first (to rebuild the queue at start-up)."""
        ...

    async def forget_outputs(self, sha256s: Collection[str]) -> int:
        """Drop outputs with these hashes from every job (their files were deleted by
        retention); returns how many jobs changed."""
        ...

    async def close(self) -> None: ...


_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        ref_id TEXT NOT NULL,
        task TEXT NOT NULL,
        spec TEXT NOT NULL,              -- JSON, tasks.spec_to_dict
        state TEXT NOT NULL,
        tag TEXT NOT NULL,
        reply_to TEXT NOT NULL,
        provider TEXT NOT NULL,
        agent TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        created_us INTEGER NOT NULL,     -- microseconds since the epoch, UTC
        updated_us INTEGER NOT NULL,
        started_us INTEGER,
        ended_us INTEGER,
        progress REAL NOT NULL,
        inputs TEXT NOT NULL,            -- JSON lists and objects, see codec.py
        outputs TEXT NOT NULL,
        texts TEXT NOT NULL,
        error TEXT,
        resume TEXT NOT NULL,
        retries TEXT NOT NULL,
        last_sequence INTEGER NOT NULL,
        UNIQUE (owner, ref_id)
    ) STRICT;
    CREATE INDEX jobs_by_created ON jobs (created_us, id);
    CREATE INDEX jobs_by_owner ON jobs (owner, created_us, id);
    CREATE INDEX jobs_unfinished ON jobs (created_us, id) WHERE state IN ('QUEUED', 'RUNNING');
    """,
)

_COLUMNS = (
    "id, owner, ref_id, task, spec, state, tag, reply_to, provider, agent, attempts, created_us,"
    " updated_us, started_us, ended_us, progress, inputs, outputs, texts, error, resume, retries,"
    " last_sequence"
)
_MUTABLE = (
    "state",
    "provider",
    "agent",
    "attempts",
    "updated_us",
    "started_us",
    "ended_us",
    "progress",
    "outputs",
    "texts",
    "error",
    "resume",
    "retries",
    "last_sequence",
)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _row_of(record: JobRecord) -> dict[str, Any]:
    # Runs on the caller's thread: the row is a snapshot of the record at call time.
    job = record.job
    return {
        "id": job.id,
        "owner": job.owner,
        "ref_id": job.ref_id,
        "task": job.task.value,
        "spec": _dumps(spec_to_dict(job.spec)),
        "state": job.state.value,
        "tag": job.tag,
        "reply_to": job.reply_to,
        "provider": job.provider,
        "agent": job.agent,
        "attempts": job.attempts,
        "created_us": codec.to_micros(job.created),
        "updated_us": codec.to_micros(job.updated),
        "started_us": codec.to_micros(job.started) if job.started else None,
        "ended_us": codec.to_micros(job.ended) if job.ended else None,
        "progress": job.progress,
        "inputs": _dumps(codec.encode_inputs(job.inputs)),
        "outputs": _dumps(codec.encode_outputs(job.outputs)),
        "texts": _dumps(job.texts),
        "error": _dumps(codec.encode_error(job.error)) if job.error else None,
        "resume": _dumps(job.resume),
        "retries": _dumps(codec.encode_retries(record.retries)),
        "last_sequence": record.last_sequence,
    }


def _record_of(row: sqlite3.Row) -> JobRecord:
    task = TaskKind(row["task"])
    job = Job(
        id=row["id"],
        task=task,
        spec=spec_from_dict(task, json.loads(row["spec"])),
        state=JobState(row["state"]),
        created=codec.from_micros(row["created_us"]),
        updated=codec.from_micros(row["updated_us"]),
        owner=row["owner"],
        ref_id=row["ref_id"],
        tag=row["tag"],
        reply_to=row["reply_to"],
        provider=row["provider"],
        agent=row["agent"],
        attempts=row["attempts"],
        started=codec.from_micros(row["started_us"]) if row["started_us"] is not None else None,
        ended=codec.from_micros(row["ended_us"]) if row["ended_us"] is not None else None,
        progress=row["progress"],
        inputs=codec.decode_inputs(json.loads(row["inputs"])),
        outputs=codec.decode_outputs(json.loads(row["outputs"])),
        texts=list(json.loads(row["texts"])),
        error=codec.decode_error(json.loads(row["error"])) if row["error"] else None,
        resume={str(k): str(v) for k, v in json.loads(row["resume"]).items()},
    )
    return JobRecord(job, row["last_sequence"], codec.decode_retries(json.loads(row["retries"])))


def _encode_token(created_us: int, job_id: str, digest: str) -> str:
    raw = _dumps({"c": created_us, "i": job_id, "f": digest}).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_token(token: str, digest: str) -> tuple[int, str]:
    bad = invalid_argument("page_token", "INVALID_PAGE_TOKEN", "page_token is not valid here")
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if (
        not isinstance(data, dict)
        or data.get("f") != digest  # a token from other filters (or another owner)
        or not isinstance(data.get("c"), int)
        or not isinstance(data.get("i"), str)
    ):
        raise bad
    return data["c"], data["i"]


class SqliteJobStore:
    """:class:`JobStore` on one SQLite file (WAL). Create with :meth:`open`."""

    def __init__(self, executor: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self._executor = executor
        self._conn = conn
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *, busy_timeout_s: float = 5.0) -> Self:
        """Open (and create or migrate) the database at ``path``."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobstore")

        def connect() -> sqlite3.Connection:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
            try:
                conn.row_factory = sqlite3.Row
                conn.execute("PRAGMA journal_mode=WAL")
                # NORMAL in WAL mode: a power cut may lose the last commits, never corrupt.
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
                _migrate(conn)
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = await asyncio.get_running_loop().run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, conn)

    async def _call(self, fn: Callable[[], _T]) -> _T:
        if self._closed:
            raise ServiceError(ErrorKind.UNAVAILABLE, "STORE_CLOSED", "the job store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def create(self, record: JobRecord) -> tuple[JobRecord, bool]:
        row = _row_of(record)

        def insert() -> tuple[JobRecord, bool]:
            conn = self._conn
            with _transaction(conn):
                placeholders = ", ".join(f":{c.strip()}" for c in _COLUMNS.split(","))
                cur = conn.execute(
                    f"INSERT INTO jobs ({_COLUMNS}) VALUES ({placeholders})"
                    " ON CONFLICT (owner, ref_id) DO NOTHING",
                    row,
                )
                if cur.rowcount == 1:
                    return record, False
                found = conn.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE owner = ? AND ref_id = ?",
                    (row["owner"], row["ref_id"]),
                ).fetchone()
            return _record_of(found), True

        return await self._call(insert)

    async def save(self, record: JobRecord) -> None:
        row = _row_of(record)
        sets = ", ".join(f"{c} = :{c}" for c in _MUTABLE)

        def update() -> None:
            cur = self._conn.execute(f"UPDATE jobs SET {sets} WHERE id = :id", row)
            if cur.rowcount != 1:
                raise ServiceError(
                    ErrorKind.NOT_FOUND, "JOB_NOT_FOUND", f"job {row['id']} is not stored"
                )

        await self._call(update)

    async def forget_outputs(self, sha256s: Collection[str]) -> int:
        gone = set(sha256s)
        if not gone:
            return 0

        def rewrite() -> int:
            changed = 0
            conn = self._conn
            with _transaction(conn):
                for sha in gone:
                    # Outputs are JSON; a LIKE on the hash finds the few rows worth decoding.
                    rows = conn.execute(
                        "SELECT id, outputs FROM jobs WHERE outputs LIKE ?", (f"%{sha}%",)
                    ).fetchall()
                    for row in rows:
                        outputs = codec.decode_outputs(json.loads(row["outputs"]))
                        kept = [o for o in outputs if o.sha256 not in gone]
                        if len(kept) != len(outputs):
                            conn.execute(
                                "UPDATE jobs SET outputs = ? WHERE id = ?",
                                (_dumps(codec.encode_outputs(kept)), row["id"]),
                            )
                            changed += 1
            return changed

        return await self._call(rewrite)

    async def get(self, job_id: str) -> JobRecord | None:
        def select() -> JobRecord | None:
            found = self._conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            return _record_of(found) if found is not None else None

        return await self._call(select)

    async def query(
        self, query: JobQuery, *, page_size: int, page_token: str
    ) -> tuple[list[Job], str]:
        digest = query.digest()
        after = _decode_token(page_token, digest) if page_token else None
        size = _page_size(page_size)
        where: list[str] = []
        args: list[Any] = []
        if query.owner is not None:
            where.append("owner = ?")
            args.append(query.owner)
        if query.states:
            states = sorted(s.value for s in query.states)
            where.append(f"state IN ({', '.join('?' * len(states))})")
            args.extend(states)
        if query.task is not None:
            where.append("task = ?")
            args.append(query.task.value)
        if query.tag:
            where.append("tag = ?")
            args.append(query.tag)
        if query.ref_id:
            where.append("ref_id = ?")
            args.append(query.ref_id)
        if after is not None:
            where.append("(created_us, id) < (?, ?)")  # keyset: stable under inserts
            args.extend(after)
        sql = (
            f"SELECT {_COLUMNS} FROM jobs {'WHERE ' + ' AND '.join(where) if where else ''}"
            " ORDER BY created_us DESC, id DESC LIMIT ?"
        )
        args.append(size + 1)

        def select() -> tuple[list[Job], str]:
            rows = self._conn.execute(sql, args).fetchall()
            jobs = [_record_of(r).job for r in rows[:size]]
            if len(rows) <= size:
                return jobs, ""
            last = rows[size - 1]
            return jobs, _encode_token(last["created_us"], last["id"], digest)

        return await self._call(select)

    async def unfinished(self) -> list[JobRecord]:
        def select() -> list[JobRecord]:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN ('QUEUED', 'RUNNING')"
                " ORDER BY created_us, id"
            ).fetchall()
            return [_record_of(r) for r in rows]

        return await self._call(select)

    async def close(self) -> None:
        if self._closed:
            return
        await self._call(self._conn.close)
        self._closed = True
        self._executor.shutdown(wait=False)


class _transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (rollback on error) on an autocommit connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock up front: no upgrade deadlock with another writer.
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to the newest version; ``PRAGMA user_version`` counts applied steps."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(_MIGRATIONS):
        raise RuntimeError(
            f"job database schema version {version} is newer than this server "
            f"({len(_MIGRATIONS)}); refusing to use it"
        )
    for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
        statements = [s for s in _split(script) if s]
        with _transaction(conn):
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")


def _split(script: str) -> Sequence[str]:
    # Migration scripts are ours: statements end with ';' and contain no ';' in literals.
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";")]
