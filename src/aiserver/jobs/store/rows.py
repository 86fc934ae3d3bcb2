"""Job records <-> table rows, and page tokens: the same for every backend."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Protocol

from aiserver import fast_json
from aiserver.errors import invalid_argument
from aiserver.jobs import codec
from aiserver.jobs.model import Job, JobState
from aiserver.jobs.store.protocol import JobRecord
from aiserver.tasks import TaskKind, spec_from_dict, spec_to_dict

COLUMNS = (
    "id",
    "owner",
    "ref_id",
    "task",
    "spec",
    "state",
    "tag",
    "reply_to",
    "provider",
    "agent",
    "attempts",
    "created_us",
    "updated_us",
    "started_us",
    "ended_us",
    "progress",
    "inputs",
    "outputs",
    "texts",
    "error",
    "resume",
    "retries",
    "last_sequence",
    "webhook",  # written by record_webhook only: not in MUTABLE
)
MUTABLE = (
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
SELECT_COLUMNS = ", ".join(COLUMNS)
UNFINISHED_SQL = "('QUEUED', 'RUNNING')"
"""``JobState.QUEUED`` and ``RUNNING`` as an SQL list (the partial index uses the same)."""


class Row(Protocol):
    """A fetched row of either driver (``sqlite3.Row``, ``asyncpg.Record``)."""

    def __getitem__(self, key: str, /) -> Any: ...


def dumps(value: Any) -> str:
    """``value`` as compact JSON (see :mod:`aiserver.fast_json`: read back as written)."""
    return fast_json.dumps_text(value)


def loads(text: str | bytes) -> Any:
    """A column's JSON, as the stdlib reads it (rows it wrote may hold ``NaN``)."""
    return fast_json.loads(text)


def row_of(record: JobRecord) -> dict[str, Any]:
    """The row of ``record`` as it is now (call on the caller's side: a snapshot)."""
    job = record.job
    return {
        **mutable_row_of(record),
        "owner": job.owner,
        "ref_id": job.ref_id,
        "task": job.task.value,
        "spec": dumps(spec_to_dict(job.spec)),
        "tag": job.tag,
        "reply_to": job.reply_to,
        "created_us": codec.to_micros(job.created),
        "inputs": dumps(codec.encode_inputs(job.inputs)),
        "webhook": dumps(codec.encode_webhook(job.webhook)) if job.webhook else None,
    }


def mutable_row_of(record: JobRecord) -> dict[str, Any]:
    """``id`` and the :data:`MUTABLE` columns of ``record`` (what a save writes): the spec
    and inputs, encoded once at create, are not encoded again on every save."""
    job = record.job
    return {
        "id": job.id,
        "state": job.state.value,
        "provider": job.provider,
        "agent": job.agent,
        "attempts": job.attempts,
        "updated_us": codec.to_micros(job.updated),
        "started_us": codec.to_micros(job.started) if job.started else None,
        "ended_us": codec.to_micros(job.ended) if job.ended else None,
        "progress": job.progress,
        "outputs": dumps(codec.encode_outputs(job.outputs)) if job.outputs else "[]",
        "texts": dumps(job.texts) if job.texts else "[]",
        "error": dumps(codec.encode_error(job.error)) if job.error else None,
        "resume": dumps(job.resume) if job.resume else "{}",
        "retries": dumps(codec.encode_retries(record.retries)) if record.retries else "[]",
        "last_sequence": record.last_sequence,
    }


def record_of(row: Row) -> JobRecord:
    task = TaskKind(row["task"])
    job = Job(
        id=row["id"],
        task=task,
        spec=spec_from_dict(task, loads(row["spec"])),
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
        inputs=codec.decode_inputs(loads(row["inputs"])),
        outputs=codec.decode_outputs(loads(row["outputs"])),
        texts=list(loads(row["texts"])),
        error=codec.decode_error(loads(row["error"])) if row["error"] else None,
        resume={str(k): str(v) for k, v in loads(row["resume"]).items()},
        webhook=codec.decode_webhook(loads(row["webhook"])) if row["webhook"] else None,
    )
    return JobRecord(job, row["last_sequence"], codec.decode_retries(loads(row["retries"])))


def output_names(outputs_json: str) -> list[str]:
    return [o.name for o in codec.decode_outputs(loads(outputs_json))]


def without_outputs(outputs_json: str, gone: set[str]) -> str | None:
    """The outputs JSON without hashes in ``gone``; ``None`` if nothing was dropped."""
    outputs = codec.decode_outputs(loads(outputs_json))
    kept = [o for o in outputs if o.sha256 not in gone]
    return None if len(kept) == len(outputs) else dumps(codec.encode_outputs(kept))


def encode_token(created_us: int, job_id: str, digest: str) -> str:
    raw = dumps({"c": created_us, "i": job_id, "f": digest}).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_token(token: str, digest: str) -> tuple[int, str]:
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
