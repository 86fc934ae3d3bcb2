"""Schema versions of the job database, one list per dialect, applied in order.

Each step runs in one transaction together with its row in ``schema_migrations``; PostgreSQL
also holds an advisory lock, so processes starting at once apply each step exactly once. A
database newer than this code is refused. Never edit a released step: add one.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["MIGRATION_LOCK", "POSTGRES", "SQLITE", "SchemaTooNew", "statements"]

MIGRATION_LOCK = 0x61697372_76720001  # pg_advisory_xact_lock key: "aisrvr" + 1


class SchemaTooNew(Exception):
    """The database was migrated by a newer release; this one refuses to use it."""

    def __init__(self, found: int, known: int) -> None:
        super().__init__(
            f"job database schema version {found} is newer than this server ({known});"
            " refusing to use it (run the release that migrated it, or a newer one)"
        )


SQLITE: tuple[str, ...] = (
    # 1: the jobs table (databases from before the version table have PRAGMA user_version 1)
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
    # 2: scale-out - leases, cancel request, events, input references, slots, leaders, outbox
    """
    ALTER TABLE jobs ADD COLUMN lease_holder TEXT;
    ALTER TABLE jobs ADD COLUMN lease_expires_us INTEGER;
    ALTER TABLE jobs ADD COLUMN cancel_requested_us INTEGER;
    CREATE TABLE job_inputs (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (sha256, job_id)
    ) STRICT;
    INSERT OR IGNORE INTO job_inputs (job_id, sha256)
        SELECT jobs.id, json_extract(i.value, '$.sha256') FROM jobs, json_each(jobs.inputs) i
        WHERE json_extract(i.value, '$.sha256') IS NOT NULL;
    CREATE TABLE job_events (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        sequence INTEGER NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,           -- JSON
        created_us INTEGER NOT NULL,
        PRIMARY KEY (job_id, sequence)
    ) STRICT;
    CREATE TABLE agent_slots (
        agent TEXT NOT NULL,
        slot INTEGER NOT NULL,
        holder TEXT,
        expires_us INTEGER NOT NULL,
        PRIMARY KEY (agent, slot)
    ) STRICT;
    CREATE TABLE leaders (
        role TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_us INTEGER NOT NULL
    ) STRICT;
    CREATE TABLE webhook_outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        url TEXT NOT NULL,
        body BLOB NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        due_us INTEGER,                  -- NULL: given up (kept for inspection)
        lease_holder TEXT,
        lease_expires_us INTEGER,
        last_error TEXT NOT NULL DEFAULT '',
        created_us INTEGER NOT NULL
    ) STRICT;
    CREATE INDEX webhook_outbox_due ON webhook_outbox (due_us) WHERE due_us IS NOT NULL;
    """,
    # 3: how the job's ReplyTo delivery ended (JSON, codec.encode_webhook; NULL: not yet)
    """
    ALTER TABLE jobs ADD COLUMN webhook TEXT;
    """,
    # 4: small inputs kept with their job (InputRef.stored): written in the create's
    # transaction, so the job and its input become durable in one commit, with no spool file
    # (its create, write and rename cost more than the row). They go when the job ends, in
    # the statement that ends it (the trigger), or with the job.
    """
    CREATE TABLE job_input_bytes (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        sha256 TEXT NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (job_id, sha256)
    ) STRICT;
    CREATE TRIGGER job_input_bytes_at_end AFTER UPDATE OF state ON jobs
        WHEN NEW.state NOT IN ('QUEUED', 'RUNNING')
        BEGIN DELETE FROM job_input_bytes WHERE job_id = NEW.id; END;
    """,
)

POSTGRES: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        ref_id TEXT NOT NULL,
        task TEXT NOT NULL,
        spec TEXT NOT NULL,
        state TEXT NOT NULL,
        tag TEXT NOT NULL,
        reply_to TEXT NOT NULL,
        provider TEXT NOT NULL,
        agent TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        created_us BIGINT NOT NULL,
        updated_us BIGINT NOT NULL,
        started_us BIGINT,
        ended_us BIGINT,
        progress DOUBLE PRECISION NOT NULL,
        inputs TEXT NOT NULL,
        outputs TEXT NOT NULL,
        texts TEXT NOT NULL,
        error TEXT,
        resume TEXT NOT NULL,
        retries TEXT NOT NULL,
        last_sequence BIGINT NOT NULL,
        UNIQUE (owner, ref_id)
    );
    CREATE INDEX jobs_by_created ON jobs (created_us, id);
    CREATE INDEX jobs_by_owner ON jobs (owner, created_us, id);
    CREATE INDEX jobs_unfinished ON jobs (created_us, id) WHERE state IN ('QUEUED', 'RUNNING');
    """,
    """
    ALTER TABLE jobs ADD COLUMN lease_holder TEXT;
    ALTER TABLE jobs ADD COLUMN lease_expires_us BIGINT;
    ALTER TABLE jobs ADD COLUMN cancel_requested_us BIGINT;
    CREATE TABLE job_inputs (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        sha256 TEXT NOT NULL,
        PRIMARY KEY (sha256, job_id)
    );
    INSERT INTO job_inputs (job_id, sha256)
        SELECT jobs.id, i ->> 'sha256' FROM jobs, json_array_elements(jobs.inputs::json) i
        WHERE i ->> 'sha256' IS NOT NULL ON CONFLICT DO NOTHING;
    CREATE TABLE job_events (
        job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
        sequence BIGINT NOT NULL,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_us BIGINT NOT NULL,
        PRIMARY KEY (job_id, sequence)
    );
    CREATE TABLE agent_slots (
        agent TEXT NOT NULL,
        slot INTEGER NOT NULL,
        holder TEXT,
        expires_us BIGINT NOT NULL,
        PRIMARY KEY (agent, slot)
    );
    CREATE TABLE leaders (
        role TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_us BIGINT NOT NULL
    );
    CREATE TABLE webhook_outbox (
        id BIGSERIAL PRIMARY KEY,
        job_id TEXT NOT NULL,
        url TEXT NOT NULL,
        body BYTEA NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        due_us BIGINT,
        lease_holder TEXT,
        lease_expires_us BIGINT,
        last_error TEXT NOT NULL DEFAULT '',
        created_us BIGINT NOT NULL
    );
    CREATE INDEX webhook_outbox_due ON webhook_outbox (due_us) WHERE due_us IS NOT NULL;
    """,
    # 3: the artifact index, next to the jobs (SQLite keeps its own file, artifacts.sqlite3)
    """
    CREATE TABLE artifact_blobs (
        path TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL UNIQUE,
        mime_type TEXT NOT NULL,
        size BIGINT NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        last_put DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX artifact_blobs_last_put ON artifact_blobs (last_put);
    CREATE TABLE artifact_refs (
        path TEXT NOT NULL REFERENCES artifact_blobs (path) ON DELETE CASCADE,
        owner TEXT NOT NULL,
        job_id TEXT NOT NULL,
        file_name TEXT NOT NULL,
        seed BIGINT,
        provider TEXT NOT NULL,
        created DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (path, owner, job_id)
    );
    """,
    # 4: how the job's ReplyTo delivery ended (JSON, codec.encode_webhook; NULL: not yet)
    """
    ALTER TABLE jobs ADD COLUMN webhook TEXT;
    """,
    # 5: saves that leave every indexed value alone are HOT updates (no index entry written):
    # the partial indexes test a generated `unfinished`, which QUEUED -> RUNNING and the
    # checkpoint and output saves leave as it is (`state` in a predicate made every save
    # that changed it write all 5 indexes again), and half of each new page stays free for
    # the new versions. The per-owner count of unfinished jobs (the create's quota) reads
    # an index of the owner's unfinished jobs, not all of the owner's jobs. Event and input
    # rows lose their foreign key: its check ran a query locking the job row for every row
    # inserted (a fifth of the backends' CPU per job); they are written by the job's holder,
    # nearly all with the job's own write in the statement that found its row, and jobs
    # are never deleted.
    """
    ALTER TABLE jobs ADD COLUMN unfinished BOOLEAN NOT NULL
        GENERATED ALWAYS AS (state IN ('QUEUED', 'RUNNING')) STORED;
    ALTER TABLE jobs SET (fillfactor = 50);
    DROP INDEX jobs_unfinished;
    CREATE INDEX jobs_unfinished ON jobs (created_us, id) WHERE unfinished;
    CREATE INDEX jobs_unfinished_by_owner ON jobs (owner) WHERE unfinished;
    ALTER TABLE job_events DROP CONSTRAINT job_events_job_id_fkey;
    ALTER TABLE job_inputs DROP CONSTRAINT job_inputs_job_id_fkey;
    """,
    # 6: a job whose events a watcher on another process follows: its writes announce them
    # (NOTIFY costs every listening coordinator's backend a transaction, so the others' are
    # not announced). Set once by the watcher, before it reads the stored events; a write
    # that updates or share-locks the row sees it (docs/scale-out.md, "Events"). No index:
    # saves that leave it alone stay HOT.
    """
    ALTER TABLE jobs ADD COLUMN watched BOOLEAN NOT NULL DEFAULT false;
    """,
)


def statements(script: str) -> Sequence[str]:
    """The statements of one step (ours: ``;`` ends each, never inside a literal; a
    trigger's body, ``BEGIN ... END``, keeps its own ``;``)."""
    lines = [line.split("--", 1)[0] for line in script.splitlines()]
    found: list[str] = []
    body: list[str] = []  # a trigger's pieces until its END
    for piece in (s.strip() for s in "\n".join(lines).split(";")):
        if body:
            body.append(piece)
            if piece.upper() == "END":
                found.append("; ".join(body))
                body = []
        elif piece.upper().startswith("CREATE TRIGGER"):
            body = [piece]
        elif piece:
            found.append(piece)
    if body:
        raise ValueError(f"a trigger without its END: {body[0]!r}")
    return found
