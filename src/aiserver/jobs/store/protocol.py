"""What a job store is: the records, the queries and the :class:`JobStore` interface.

Two implementations keep the same semantics: :mod:`.sqlite` (embedded, one process) and
:mod:`.postgres` (several processes on one database). Everything that decides correctness
across processes - leases, the cancel request, ``ref_id`` idempotency, active-job counts,
input references, agent slots, leadership and the webhook outbox - is answered by the store,
never by one process's memory (docs/scale-out.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from aiserver.jobs.model import Job, JobState, Retrying, WebhookDelivery
from aiserver.jobs.paging import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from aiserver.tasks import TaskKind

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
    "StoredEvent",
    "new_holder_id",
]


class ActiveLimitReached(Exception):
    """``create`` refused: the owner already has ``max_active`` unfinished jobs."""


class LeaseLost(Exception):
    """A fenced ``save`` by a process that no longer holds the job's lease: another process
    took the job over, so this one must stop driving it."""


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


@dataclass(frozen=True, slots=True)
class Lease:
    """The right of ``holder`` to run a job until ``expires`` (renew before then)."""

    job_id: str
    holder: str
    expires: datetime
    takeover: bool
    """The job had an earlier holder whose lease expired: re-attach or retry, never rerun
    blindly (the record's ``resume`` checkpoint says where the earlier attempt was)."""


@dataclass(frozen=True, slots=True)
class QueueRanks:
    """Places in the one queue every coordinator shares: QUEUED jobs, oldest first."""

    positions: Mapping[str, int]
    """1-based place of each job asked about that is QUEUED (others are left out)."""
    queued: int
    """QUEUED jobs in all."""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One job event as stored: its sequence, kind and JSON payload (the manager's codec)."""

    job_id: str
    sequence: int
    kind: str
    payload: Mapping[str, Any]
    created: datetime


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to store with a write of its job (``create``, ``save``, ``append_events``)."""

    sequence: int
    kind: str
    payload: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Announcement:
    """Something changed that another process may be waiting for."""

    kind: Literal["event", "cancel", "resync"]
    """``resync``: announcements may have been lost (the listening connection dropped and is
    back): every consumer re-reads everything it follows."""
    job_id: str
    sequence: int = 0
    """For ``event``: the sequence just stored (a watcher reads the table from its own last)."""


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A webhook delivery waiting in the durable outbox."""

    id: int
    job_id: str
    url: str
    body: bytes
    attempts: int
    """Deliveries tried before this claim."""


@dataclass(frozen=True, slots=True)
class SlotClaim:
    """One of an agent's slots, held by one process until ``expires``."""

    agent: str
    slot: int
    holder: str
    expires: datetime


def new_holder_id() -> str:
    """This process's name in leases: host, pid and a random part (never reused, so a restarted
    process does not inherit its former leases)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class AnnouncementStream(Protocol):
    """Announcements as they come; :meth:`aclose` stops listening."""

    def __aiter__(self) -> AnnouncementStream: ...

    async def __anext__(self) -> Announcement: ...

    async def aclose(self) -> None: ...


class JobStore(Protocol):
    """Persistence of job records. Implementations keep the order of calls from one caller.

    ``holder`` arguments name a process (one id per process start); lease lengths are seconds.
    """

    # --- records ----------------------------------------------------------------------------

    async def create(
        self,
        record: JobRecord,
        *,
        max_active: int = 0,
        holder: str | None = None,
        lease_s: float = 0.0,
        events: Sequence[NewEvent] = (),
        input_bytes: Mapping[str, bytes] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Insert ``record``; if its (owner, ref_id) exists, return that one and ``True``.

        The unique constraint decides inside the insert's transaction: two processes racing
        with one ``ref_id`` get one job. With ``max_active`` > 0, raises
        :class:`ActiveLimitReached` when the owner has that many unfinished jobs (counted in
        the same transaction, serialized per owner, so racing processes cannot overshoot).
        A new job is stored with ``events`` (announced) and, with ``holder``, already leased
        to it for ``lease_s``, all in the one transaction; an existing one is left as it is.
        ``input_bytes`` (by SHA-256; only where :attr:`holds_inputs`): the bytes of its
        ``stored`` inputs, in the same transaction; kept until the job ends."""
        ...

    @property
    def holds_inputs(self) -> bool:
        """Whether :meth:`create` keeps small inputs' bytes with their job (no spool file)."""
        ...

    async def input_bytes(self, job_id: str, sha256: str) -> bytes | None:
        """A ``stored`` input of an unfinished job (``None``: not kept)."""
        ...

    async def save(
        self,
        record: JobRecord,
        *,
        holder: str | None = None,
        outbox: Sequence[tuple[str, bytes]] = (),
        events: Sequence[NewEvent] = (),
        release: bool = False,
        prune: str = "",
        announce: bool = True,
    ) -> None:
        """Overwrite the stored record with ``record`` (as it is when called).

        ``holder``: only if that process holds the job's lease (else :class:`LeaseLost`).
        ``outbox``: webhook deliveries (url, body) queued in the same transaction, so a
        final state is never stored without its webhook nor the other way round.
        ``events`` are stored in the same transaction, and announced unless not
        ``announce``; ``release`` gives the lease up with it (the job ended); ``prune`` names
        an event kind whose stored rows other than the latest go with it
        (:meth:`prune_events`)."""
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

    async def record_webhook(self, job_id: str, delivery: WebhookDelivery) -> None:
        """Set the job's webhook outcome, and nothing else (``save`` never writes it: the
        delivery ends after the job, while other writers may still touch the record)."""
        ...

    # --- queue, quotas, references ----------------------------------------------------------

    async def count_active(self, owner: str | None = None) -> int:
        """QUEUED or RUNNING jobs of ``owner`` (``None``: everyone's)."""
        ...

    async def queue_position(self, job_id: str) -> int:
        """1-based place of a QUEUED job among QUEUED jobs, oldest first; 0 if not queued."""
        ...

    async def inputs_in_use(self, sha256s: Collection[str]) -> set[str]:
        """Which of these input hashes an unfinished job still needs."""
        ...

    async def artifacts_in_use(self) -> set[str]:
        """Artifact names listed as outputs by unfinished jobs (retention keeps them)."""
        ...

    # --- one queue across processes: positions, work stealing -------------------------------

    async def queue_ranks(
        self, *, holder: str | None = None, job_ids: Collection[str] = ()
    ) -> QueueRanks:
        """The places of the QUEUED jobs ``holder`` leases and of ``job_ids`` among every
        QUEUED job, in one statement however many (a dispatch pass ranks all its jobs)."""
        ...

    async def stealable(
        self, holder: str, *, waited_s: float, tasks: Collection[TaskKind], limit: int
    ) -> list[tuple[JobRecord, str]]:
        """The oldest QUEUED jobs (with their holder) that another live process leases but
        has not started for ``waited_s`` (since their last write), of these ``tasks``, no
        cancel requested: work an idle ``holder`` may take over with :meth:`steal`."""
        ...

    async def steal(
        self, job_id: str, holder: str, lease_s: float, *, from_holder: str
    ) -> Lease | None:
        """Move a QUEUED job's lease from ``from_holder`` to ``holder``; ``None`` when it
        started, ended, was cancelled or moved meanwhile. A compare-and-set on the row: the
        old holder's next fenced write (its dispatch's ``save``) raises :class:`LeaseLost`,
        so the job still runs once."""
        ...

    async def records(self, job_ids: Collection[str]) -> list[JobRecord]:
        """The stored records of these jobs (unknown ids are left out), in one statement."""
        ...

    async def events_after(self, after: Mapping[str, int]) -> list[StoredEvent]:
        """For each job in ``after``, its stored events with a sequence above the given one,
        in (job, sequence) order: one read for a feed of many jobs' changes."""
        ...

    # --- leases -----------------------------------------------------------------------------

    async def claim(
        self,
        holder: str,
        lease_s: float,
        *,
        tasks: Collection[TaskKind] = (),
        job_id: str | None = None,
    ) -> Lease | None:
        """Lease the oldest unfinished job that nobody holds (or whose lease expired).

        ``tasks`` limits the claim to jobs of these kinds (empty: any); ``job_id`` to that one
        job (to cancel a queued job nobody runs). Concurrent claims from any number of
        processes never return the same job while its lease runs."""
        ...

    async def renew(self, job_id: str, holder: str, lease_s: float) -> Lease | None:
        """Extend ``holder``'s lease; ``None`` if it is not (any more) the holder."""
        ...

    async def renew_all(self, job_ids: Collection[str], holder: str, lease_s: float) -> set[str]:
        """:meth:`renew` of many jobs in one statement; returns those still held."""
        ...

    async def release(self, job_id: str, holder: str) -> bool:
        """Give the lease up (the job ended, or goes back to the queue)."""
        ...

    # --- cancel -----------------------------------------------------------------------------

    async def request_cancel(self, job_id: str) -> bool:
        """Store the cancel request and announce it; ``False`` if the job is finished or
        unknown."""
        ...

    async def cancel_requested(self, job_id: str) -> bool: ...

    # --- events -----------------------------------------------------------------------------

    async def append_event(
        self, job_id: str, sequence: int, kind: str, payload: Mapping[str, Any]
    ) -> None:
        """Store one event (sequences are unique per job) and announce it."""
        ...

    async def append_events(
        self,
        job_id: str,
        events: Sequence[NewEvent],
        *,
        announce: bool = True,
        holder: str | None = None,
    ) -> None:
        """:meth:`append_event` of several events of one job, in one transaction; not
        announced when not ``announce`` (watchers find them at the next announcement).
        ``holder``: stored only while that process holds the job's lease, else dropped (a
        former holder's late progress after a steal: the job's events are its new
        holder's to write)."""
        ...

    async def events(self, job_id: str, after: int = 0) -> list[StoredEvent]:
        """The job's stored events with a sequence above ``after``, in order."""
        ...

    async def prune_events(self, job_id: str, kind: str) -> int:
        """Drop the job's events of ``kind`` except the latest (superseded progress, once the
        job finished); returns how many went."""
        ...

    async def ping(self) -> None:
        """Returns once the store answered (bounded); raises when it cannot be reached.
        Health checks follow it."""
        ...

    async def announcements(
        self, *, watch: str | None = None, every_job: bool = False
    ) -> AnnouncementStream:
        """Everything announced once this returns, by this process or any other, until the
        store or the stream is closed.

        Cancels are always announced; a job's events only to those who asked (a shared store:
        each notification costs every listening process): ``watch`` the job the caller will
        read from the table (its writes committed after this returns announce their events),
        ``every_job`` while this stream is open (other processes see it within a second or
        two). Announcements are hints: a consumer re-reads the table, so a lost or duplicate
        one costs latency, never correctness."""
        ...

    # --- agent slots and leadership ---------------------------------------------------------

    async def claim_slot(
        self, agent: str, capacity: int, holder: str, lease_s: float
    ) -> SlotClaim | None:
        """Take a free slot of ``agent`` (which admits ``capacity`` jobs across every
        process); ``None`` when all are held."""
        ...

    async def renew_slots(
        self, claims: Sequence[SlotClaim], lease_s: float
    ) -> list[SlotClaim | None]:
        """Renew every claim of one holder at once (its renewal timer: one round trip however
        many slots it holds; one statement on PostgreSQL, one UPDATE per claim in one
        transaction on SQLite); per claim the renewed one, or ``None`` when its lease was
        lost (lapsed, whether or not taken since, or released)."""
        ...

    async def release_slot(self, claim: SlotClaim) -> None: ...

    async def lead(self, role: str, holder: str, lease_s: float) -> bool:
        """Become or stay the one runner of ``role`` (retention, outbox) for ``lease_s``."""
        ...

    async def resign(self, role: str, holder: str) -> None:
        """Give up ``role`` if ``holder`` leads it (a clean stop): another process takes
        the lead at its next ask instead of when the lease lapses."""
        ...

    # --- webhook outbox ---------------------------------------------------------------------

    async def outbox_put(self, job_id: str, url: str, body: bytes) -> int:
        """Queue one delivery durably; returns its id."""
        ...

    async def outbox_claim(self, holder: str, lease_s: float, limit: int) -> list[OutboxItem]:
        """Deliveries due now, leased to ``holder`` (another process gets others)."""
        ...

    async def outbox_done(self, item_id: int) -> None:
        """Delivered: drop it from the outbox."""
        ...

    async def outbox_failed(self, item_id: int, error: str, retry_in_s: float | None) -> None:
        """Count a failed try; retry after ``retry_in_s``, or give up (``None``: kept, dead)."""
        ...

    async def close(self) -> None: ...
