"""The job lifecycle: submit, queue, run on a provider, retry, finish - and survive restarts.

:class:`JobManager` is the domain API the servicers call. It owns the in-memory state of
every unfinished job (the FIFO queue, the running attempts) on top of a :class:`JobStore` that
is written before any event about the change goes out, so that after a crash, even a SIGKILL,
:meth:`JobManager.start` finds every queued job and every running one with its checkpoint.

On the embedded store (no ``holder``) this process owns every unfinished job. On a shared
store (``holder`` given: several coordinators on one PostgreSQL, docs/scale-out.md) it owns
only the jobs it holds a lease on (:mod:`.leases`): those it accepted and those it adopted
from a process that died or stopped; every write of a held job is fenced by that lease
(:mod:`.job_writes`), its events are also stored (:mod:`.event_log`) for watchers elsewhere
(:mod:`.store_watch`), and a cancel reaches the holder through the store's announcements
(:mod:`.takeover`, with adoption and stealing).

Everything here runs on one event loop; no locks are needed, but a coroutine may be suspended
at every ``await``, so each step re-checks whether the job was cancelled or finished meanwhile.
"""

from __future__ import annotations

import asyncio
import builtins
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from aiserver.errors import ErrorKind, ServiceError, invalid_argument
from aiserver.jobs.attempt import (
    ActiveJob,
    ActiveJobs,
    cancelled_error,
    input_missing,
)
from aiserver.jobs.dispatch import Dispatcher, Shared
from aiserver.jobs.driver import AttemptDriver
from aiserver.jobs.eager import start_eagerly
from aiserver.jobs.event_codec import encode_event
from aiserver.jobs.event_log import EventLog
from aiserver.jobs.events import (
    EventHub,
    JobTap,
    Subscription,
    job_not_found,
    progress_of,
    replay_events,
    snapshot,
    synthesize_marks,
)
from aiserver.jobs.held_inputs import HeldInputs
from aiserver.jobs.ids import new_job_id
from aiserver.jobs.input_lifetime import InputLifetime
from aiserver.jobs.job_writes import SEQUENCE_BLOCK, JobWrites
from aiserver.jobs.leases import LeaseKeeper
from aiserver.jobs.model import (
    Accepted,
    EventKind,
    Finished,
    InputRef,
    Job,
    JobEvent,
    JobState,
    WebhookDelivery,
)
from aiserver.jobs.outputs import ArtifactWriter
from aiserver.jobs.paging import page_size as checked_page_size
from aiserver.jobs.scheduler import (
    SHUTDOWN,
    SchedulerSettings,
    could_serve,
    default_spec,
)
from aiserver.jobs.store import (
    ActiveLimitReached,
    AnnouncementStream,
    JobQuery,
    JobRecord,
    JobStore,
    LeaseLost,
    NewEvent,
)
from aiserver.jobs.store_feed import StoreFeed
from aiserver.jobs.store_watch import Handover, StoreWatch
from aiserver.jobs.takeover import Takeover
from aiserver.logs import job_id_var
from aiserver.outage import backend_outage
from aiserver.providers.base import (
    Provider,
)
from aiserver.spool import InputSpool
from aiserver.tasks import TaskKind, TaskSpec

__all__ = ["SEQUENCE_BLOCK", "JobManager", "TerminalHook"]

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

TerminalHook = Callable[[Job], Awaitable[None] | None]
"""A plain function runs at once (no task of its own per job); a coroutine function in a task."""
Deliveries = Callable[[Job], Sequence[tuple[str, bytes]]]
"""The webhook deliveries (url, body) stored with a job's final state, in one transaction."""
JobStream = Subscription | StoreWatch | Handover


def _now() -> datetime:
    return datetime.now(UTC)


class JobManager:
    """Submits, schedules, runs, cancels and streams jobs. Call :meth:`start` first."""

    def __init__(
        self,
        store: JobStore,
        spool: InputSpool,
        artifacts: ArtifactWriter,
        providers: Sequence[Provider],
        settings: SchedulerSettings,
        *,
        holder: str | None = None,
        lease_s: float = 30.0,
    ) -> None:
        """``holder``: this process's name in leases on a shared store (None: the embedded
        store, where this process owns every job)."""
        self._store = store
        self._spool = spool
        self._artifacts = artifacts
        self._providers = builtins.list(providers)
        self._by_name = {p.name: p for p in self._providers}
        self._settings = settings
        self._active = ActiveJobs()
        self._hooks: builtins.list[TerminalHook] = []
        self._leases = (
            LeaseKeeper(store, holder, lease_s, self._lease_lost) if holder is not None else None
        )
        self._takeover = (
            Takeover(
                store,
                self._leases,
                self._active,
                self._providers,
                settings,
                _Host(self),
            )
            if self._leases is not None
            else None
        )
        self._log = (
            EventLog(store, progress_interval_s=settings.progress_interval_s, holder=holder)
            if holder is not None
            else None
        )
        self._hub = EventHub(
            buffer_size=settings.subscriber_buffer,
            progress_interval_s=settings.progress_interval_s,
            retain_s=settings.history_retain_s,
            queue_position=self.queue_position,
        )
        self._writes = JobWrites(store, self._hub, self._active, self._leases, self._log)
        takeover = self._takeover
        self._dispatch = Dispatcher(
            self._providers,
            settings,
            self._active,
            launch=self._launch_new,
            finish=self._finish,
            emit=self._emit,
            shared=(
                Shared(takeover.rank, takeover.check_held, takeover.steal)
                if takeover is not None
                else None
            ),
        )
        self._driver = AttemptDriver(
            spool,
            artifacts,
            settings,
            self._dispatch,
            self._by_name,
            save=self._writes.save,
            emit=self._emit,
            finish=self._finish_from_driver,
            forget=self._forget,
            leased=holder is not None,
            lease_firm=self._lease_firm if holder is not None else None,
            ride_out=self._writes.ride_out if holder is not None else None,
            flush_progress=self._flush_progress,
            stored_input=store.input_bytes,
        )
        self._held_inputs = HeldInputs()
        self._tasks: set[asyncio.Task[Any]] = set()  # finishes, hooks, background writes
        self._inputs = InputLifetime(
            spool,
            store,
            needed_here=self._inputs_needed,
            ask_store=holder is not None,
            grace_s=settings.spool_grace_s,
            spawn=self._spawn,
        )
        self._listener: AnnouncementStream | None = None
        self._feed = StoreFeed(store, self._active.__contains__) if holder is not None else None
        self._deliveries: Deliveries = _no_deliveries
        self._delivery_stored: Callable[[], None] = _nothing
        self._shared_tasks: builtins.list[asyncio.Task[None]] = []  # adopt, cancel listener
        self._phase: Literal["new", "running", "stopping", "stopped"] = "new"
        self._quiescing = False
        self._creating: dict[str, int] = {}  # by owner: submissions between check and store

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the queue from the store, hand RUNNING jobs back, start dispatching."""
        if self._phase != "new":
            raise RuntimeError("JobManager.start() may be called once")
        if self._leases is not None and self._takeover is not None:
            self._phase = "running"
            self._listener = await self._store.announcements()
            self._leases.start()
            self._shared_tasks = [
                asyncio.create_task(self._takeover.adopt_loop(), name="job-adoption"),
                asyncio.create_task(
                    self._takeover.hear_cancels(self._listener), name="job-cancels"
                ),
            ]
            self._dispatch.start()
            logger.info("job manager started as %s (shared store)", self._leases.holder)
            return
        records = await self._store.unfinished()
        self._phase = "running"
        await self._recover(records)
        self._dispatch.start()
        logger.info("job manager started: %d unfinished jobs recovered", len(records))

    async def _recover(self, records: Sequence[JobRecord]) -> None:
        """Take these stored unfinished jobs on: queue the queued ones, resume or retry the
        running ones."""
        now = time.monotonic()  # downtime does not count against the queue timeout
        for record in records:
            self._active[record.job.id] = ActiveJob(record)
            if record.job.state is JobState.QUEUED:
                self._dispatch.enqueue(self._active[record.job.id], now)
        for record in records:
            self._hub.open_recovered(
                record.job, last_sequence=record.last_sequence, retries=record.retries
            )
        for record in records:
            job = record.job
            if job.state is not JobState.RUNNING:
                continue
            active = self._active[job.id]
            provider = self._by_name.get(job.provider)
            if provider is not None and job.resume:
                # Re-attach: the provider continues the same attempt from its checkpoint.
                logger.info("job %s: resuming on %s", job.id, provider.name)
                self._driver.launch(active, provider, new_attempt=False)
            else:
                interrupted = ServiceError(
                    ErrorKind.UNAVAILABLE,
                    "JOB_INTERRUPTED",
                    "the server restarted while the job was running",
                )
                await self._driver.retry_or_fail(active, interrupted, agent="")
        self._dispatch.publish_positions()
        self._dispatch.wake()

    async def stop(self, grace_s: float) -> None:
        """Stop taking work; give running jobs ``grace_s`` to finish, then cancel them so that
        they stay RUNNING (or QUEUED) in the store and resume at the next start."""
        if self._phase in ("stopping", "stopped"):
            return
        self._phase = "stopping"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(grace_s, 0.0)
        await self._dispatch.stop()
        for task in self._shared_tasks:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await _wait(self._driver.controllers, deadline - loop.time())
        for active in self._active.values():
            if active.controller is not None and not active.controller.done():
                active.cancel_reason = "shutdown"
                if active.run_task is not None:
                    active.run_task.cancel(SHUTDOWN)
        await _wait(self._driver.controllers, self._settings.cancel_timeout_s)
        for task in builtins.list(self._driver.controllers):  # providers that ignore cancellation
            task.cancel()
        await _wait(self._driver.controllers, 1.0)
        await _wait(self._tasks, max(deadline - loop.time(), 0.1))
        for task in builtins.list(self._tasks):
            task.cancel()
        await _wait(self._tasks, 1.0)
        self._inputs.cancel_pending()
        if self._leases is not None:
            await self._leases.stop()
            if self._log is not None:
                await self._log.drain(timeout_s=2.0)
            await self._leases.release_all()  # the others resume these jobs at once
        if self._listener is not None:
            await self._listener.aclose()
        if self._feed is not None:
            await self._feed.close()
        self._hub.close()
        self._phase = "stopped"

    def quiesce(self) -> None:
        """Refuse new jobs (UNAVAILABLE) from now on, ahead of :meth:`stop`: the server is
        going down, and jobs already accepted must outlive the calls that made them."""
        self._quiescing = True

    @property
    def accepting(self) -> bool:
        """Whether new jobs are taken (false once quiescing or stopping)."""
        return self._phase == "running" and not self._quiescing

    @property
    def holds_inputs(self) -> bool:
        """Whether small inputs go with their job into the store (``InputRef.stored``)."""
        return self._store.holds_inputs

    def use_outbox(self, deliveries: Deliveries, stored: Callable[[], None]) -> None:
        """Store ``deliveries(job)`` with each final state (the durable webhook outbox);
        ``stored`` is called after such a write."""
        self._deliveries = deliveries
        self._delivery_stored = stored

    def add_terminal_hook(self, hook: TerminalHook) -> None:
        """Called with the final job after it is stored and Finished is sent; a failing hook
        is logged and affects nothing else."""
        self._hooks.append(hook)

    # --- the domain API -------------------------------------------------------------------

    async def submit(
        self,
        *,
        owner: str,
        task: TaskKind,
        spec: TaskSpec,
        inputs: Sequence[InputRef],
        ref_id: str,
        tag: str,
        reply_to: str,
        input_bytes: Mapping[str, bytes] | None = None,
    ) -> tuple[Job, bool]:
        """Queue a job; ``(job, True)`` when ``owner`` already has one with this ``ref_id``.
        ``input_bytes``: the bytes of its ``stored`` inputs by SHA-256 (:attr:`holds_inputs`),
        stored with the job in its create."""
        if not self.accepting:
            raise ServiceError(
                ErrorKind.UNAVAILABLE,
                "NOT_SERVING",
                "the server is shutting down; try again shortly",
                retry_after_s=1.0,
            )
        if spec.kind is not task:
            raise invalid_argument("params", "TASK_MISMATCH", f"parameters are not {task.value}")
        given = {i.field for i in inputs}
        for name in task.inputs:
            if name not in given:
                raise invalid_argument(name, "INPUT_REQUIRED", f"{task.value} needs {name!r}")
        for ref in inputs:
            if ref.stored:  # goes with the job itself
                continue
            if not await self._spool.share(ref.sha256):  # before the job is stored
                raise input_missing(ref)
        if not could_serve(self._providers, task):
            if ref_id:
                found, _ = await self._store.query(
                    JobQuery(owner=owner, ref_id=ref_id), page_size=1, page_token=""
                )
                if found:
                    return self._fresh(found[0]), True
            raise ServiceError(
                ErrorKind.FAILED_PRECONDITION,
                "NO_PROVIDER",
                f"no provider is configured to run {task.value}",
                metadata={"task": task.value},
            )
        limit = self._settings.max_active_per_owner
        # On a shared store the count is the database's, inside the create (other processes
        # have jobs of this owner too); here, this process's memory knows them all.
        local_limit = limit > 0 and self._leases is None
        if local_limit and self.active_count(owner) + self._creating.get(owner, 0) >= limit:
            if ref_id:  # a retry of a job it already has is no new work
                found, _ = await self._store.query(
                    JobQuery(owner=owner, ref_id=ref_id), page_size=1, page_token=""
                )
                if found:
                    return self._fresh(found[0]), True
            raise self._too_many_jobs(limit)
        job = self._new_job(
            owner=owner,
            task=task,
            spec=spec,
            inputs=inputs,
            ref_id=ref_id,
            tag=tag,
            reply_to=reply_to,
        )
        create = self._create(job, counted=local_limit, input_bytes=input_bytes)
        if local_limit:
            # Counted until it is in _active (where active_count sees it): concurrent
            # submissions cannot all slip under the limit, nor is one counted twice.
            self._creating[owner] = self._creating.get(owner, 0) + 1
        # Shielded: once stored, the job must also be queued, even if the caller goes away.
        return await asyncio.shield(self._start(create, log_errors=False))

    def _too_many_jobs(self, limit: int) -> ServiceError:
        return ServiceError(
            ErrorKind.RESOURCE_EXHAUSTED,
            "TOO_MANY_JOBS",
            f"at most {limit} unfinished jobs per API key; wait for some to finish",
            metadata={"limit": str(limit)},
            retry_after_s=self._settings.too_many_jobs_retry_s,
        )

    async def record_webhook(self, job_id: str, delivery: WebhookDelivery) -> None:
        """Keep how the job's ReplyTo delivery ended (GetJob shows it)."""
        await self._store.record_webhook(job_id, delivery)

    async def get(self, job_id: str, owner: str | None) -> Job:
        """The job (``owner`` None: any owner's); NOT_FOUND also for another owner's job."""
        active = self._active.get(job_id)
        if active is not None:
            job = snapshot(active.job)
        else:
            record = await self._store.get(job_id)
            if record is None:
                raise job_not_found(job_id)
            job = record.job
        if owner is not None and job.owner != owner:
            raise job_not_found(job_id)
        return job

    async def list(
        self,
        *,
        owner: str | None,
        states: Sequence[JobState],
        task: TaskKind | None,
        tag: str,
        ref_id: str,
        page_size: int,
        page_token: str,
    ) -> tuple[builtins.list[Job], str]:
        """Newest first, ``page_size`` 0 for the default (0..MAX_PAGE_SIZE, else
        INVALID_ARGUMENT); the token continues this listing."""
        page_size = checked_page_size(page_size)
        query = JobQuery(owner, frozenset(states), task, tag, ref_id)
        jobs, token = await self._store.query(query, page_size=page_size, page_token=page_token)
        return [self._fresh(j) for j in jobs], token

    def tap(self, callback: JobTap) -> Callable[[], None]:
        """Every event of every job, with its live record, until the remover is called.

        On a shared store, those of jobs held elsewhere come through the store
        (:mod:`.store_feed`), a moment later."""
        remove_here = self._hub.tap(callback)
        if self._feed is None:
            return remove_here
        remove_elsewhere = self._feed.tap(callback)

        def remove() -> None:
            remove_here()
            remove_elsewhere()

        return remove

    def subscribe(self, job_id: str, kinds: tuple[type[EventKind], ...] | None = None) -> JobStream:
        """Replay then live events, ending after Finished (check ownership with get first).

        ``kinds``: the events the caller will use (Finished always); others may be left
        out, and are when this process runs the job (they never wake the caller).
        A job another process holds (shared store) is watched through the store."""
        if self._leases is None:
            return self._hub.subscribe(job_id, self._load_replay, kinds)
        outage_s = self._settings.watch_outage_s
        if job_id not in self._active:
            return StoreWatch(self._store, job_id, outage_s=outage_s)
        # Should another process take the job over, the stream goes on from the store.
        return Handover(
            self._hub.subscribe(job_id, self._load_replay, kinds),
            lambda last: StoreWatch(self._store, job_id, after=last, outage_s=outage_s),
            lambda: self._phase == "running" and job_id not in self._active,
        )

    async def cancel(self, job_id: str, owner: str | None) -> Job:
        """Cancel a queued or running job; an ended job is returned unchanged."""
        active = self._active.get(job_id)
        if active is None:
            job = await self.get(job_id, owner)
            if self._takeover is None or job.state.terminal:
                return job
            active = await self._takeover.cancel_elsewhere(job_id)
            if active is None:
                return await self.get(job_id, owner)
        if owner is not None and active.job.owner != owner:
            raise job_not_found(job_id)
        if self._leases is not None and not active.finishing:
            # Stored first: should this process fail to store the end (the database away)
            # and drop the job, its taker still reads the request and cancels it. An
            # unreachable database fails this call (UNAVAILABLE) before anything is told.
            await self._store.request_cancel(job_id)
        if not active.finishing:
            await self._cancel_here(active)
        try:
            async with asyncio.timeout(self._settings.cancel_timeout_s):
                await active.done.wait()
        except TimeoutError:
            logger.warning("job %s: provider ignores cancellation; marking it cancelled", job_id)
            await asyncio.shield(self._finish(active, JobState.CANCELLED, cancelled_error()))
        return snapshot(active.job)

    async def _cancel_here(self, active: ActiveJob) -> None:
        if self._dispatch.dequeue(active.job.id):
            await asyncio.shield(self._finish(active, JobState.CANCELLED, cancelled_error()))
        else:
            # Running (or between two steps of its controller, which checks the reason).
            active.cancel_reason = "user"
            if active.run_task is not None:
                active.run_task.cancel()

    def artifacts_in_use(self) -> set[str]:
        """Names of outputs of jobs that have not ended (retention must keep them)."""
        return {a.name for active in self._active.values() for a in active.job.outputs}

    def active_count(self, owner: str | None = None) -> int:
        """Unfinished jobs (of ``owner``; None: of everyone)."""
        if owner is None:
            return len(self._active)
        return self._active.owned_by(owner)

    def stats(self) -> dict[tuple[TaskKind, JobState], int]:
        """Unfinished jobs by task and state (for metrics)."""
        counts: dict[tuple[TaskKind, JobState], int] = {}
        for active in self._active.values():
            key = (active.job.task, active.job.state)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def queue_depth(self) -> int:
        """Jobs waiting for a provider."""
        return len(self._dispatch.queue)

    def queue_position(self, job_id: str) -> int:
        """1 for the next job to be dispatched, 0 when not queued here (on a shared store:
        the place among every coordinator's queued jobs; :meth:`positions` also knows the
        jobs held elsewhere)."""
        return self._dispatch.position(job_id)

    async def positions(self, jobs: Sequence[Job]) -> dict[str, int]:
        """Queue positions of these jobs, those held by other processes included (one store
        statement for all of them)."""
        found = {j.id: self._dispatch.position(j.id) for j in jobs}
        elsewhere = [
            j.id
            for j in jobs
            if self._leases is not None and j.state is JobState.QUEUED and not found[j.id]
        ]
        if elsewhere:
            ranks = await self._store.queue_ranks(job_ids=elsewhere)
            found.update(ranks.positions)
        return found

    def can_serve(self, task: TaskKind) -> bool:
        """Whether some provider can run ``task`` now (for health checks)."""
        spec = default_spec(task)
        for provider in self._providers:
            try:
                if provider.can_run(task, spec):
                    return True
            except Exception:
                logger.exception("provider %s failed to report its state", provider.name)
        return False

    # --- submit and replay ----------------------------------------------------------------

    def _new_job(
        self,
        *,
        owner: str,
        task: TaskKind,
        spec: TaskSpec,
        inputs: Sequence[InputRef],
        ref_id: str,
        tag: str,
        reply_to: str,
    ) -> Job:
        now = _now()
        job_id = new_job_id(now)
        return Job(
            id=job_id,
            task=task,
            spec=spec,
            state=JobState.QUEUED,
            created=now,
            updated=now,
            owner=owner,
            ref_id=ref_id or job_id,  # the server assigns one; ids are unique, so is this
            tag=tag,
            reply_to=reply_to,
            inputs=builtins.list(inputs),
        )

    async def _create(
        self, job: Job, *, counted: bool = False, input_bytes: Mapping[str, bytes] | None = None
    ) -> tuple[Job, bool]:
        try:
            if self._leases is not None:
                return await self._create_shared(job, input_bytes)
            stored, existing = await self._store.create(
                JobRecord(job, SEQUENCE_BLOCK), input_bytes=input_bytes
            )
            if existing:
                return self._fresh(stored.job), True
            active = ActiveJob(stored)
            if input_bytes:
                self._held_inputs.hold(active, input_bytes)
            self._active[job.id] = active
            self._dispatch.enqueue(active, time.monotonic())
            active.last_position = self._dispatch.position(job.id)
            self._hub.open_new(job)
            self._hub.emit(job.id, Accepted(job.task, job.ref_id, active.last_position))
            made = snapshot(job)  # as accepted (QUEUED): the dispatch below may start it
            self._dispatch.submitted()
            return made, False
        finally:
            # In the step that put the job in _active (no await between): never counted
            # twice, never missing from both.
            if counted:
                left = self._creating[job.owner] - 1
                if left:
                    self._creating[job.owner] = left
                else:
                    del self._creating[job.owner]

    async def _create_shared(
        self, job: Job, input_bytes: Mapping[str, bytes] | None
    ) -> tuple[Job, bool]:
        """Create the job leased to this process, with its Accepted event: it is queued here."""
        assert self._leases is not None
        limit = self._settings.max_active_per_owner
        accepted = Accepted(job.task, job.ref_id, self._dispatch.next_position())
        kind, payload = encode_event(accepted)
        # One transaction: the job, its accepted event (sequence 1) and this process's lease.
        asked = time.monotonic()
        try:
            stored, existing = await self._store.create(
                JobRecord(job, SEQUENCE_BLOCK),
                max_active=limit,
                holder=self._leases.holder,
                lease_s=self._leases.lease_s,
                events=[NewEvent(1, kind, payload)],
                input_bytes=input_bytes,
            )
        except ActiveLimitReached:
            raise self._too_many_jobs(limit) from None
        if existing:
            return self._fresh(stored.job), True
        self._leases.hold(job.id, since=asked)
        if self._phase != "running":  # stopping meanwhile: another process will run it
            await self._leases.release(job.id)
            return snapshot(job), False
        active = ActiveJob(stored)
        self._active[job.id] = active
        self._dispatch.enqueue(active, time.monotonic())
        active.last_position = self._dispatch.position(job.id)
        self._hub.open_new(job)
        self._hub.emit(job.id, accepted)  # sequence 1, stored above
        self._dispatch.wake()
        return snapshot(job), False

    # --- shared store: lost leases -------------------------------------------------------

    def _lease_firm(self, job_id: str) -> bool:
        return self._leases is not None and self._leases.firm(job_id)

    def _lease_lost(self, job_id: str) -> None:
        active = self._active.get(job_id)
        if active is not None:
            self._forget(active)

    def _forget(self, active: ActiveJob) -> None:
        """Another process holds this job now: stop driving it, write nothing more."""
        job_id = active.job.id
        if self._active.get(job_id) is not active or active.finishing:
            return
        logger.warning("job %s: no longer held here; dropped", job_id)
        active.finishing = True  # nothing may be written or emitted for it from here on
        active.cancel_reason = "shutdown"
        self._dispatch.dequeue(job_id)
        if active.run_task is not None:
            active.run_task.cancel(SHUTDOWN)
        if self._leases is not None:
            self._leases.drop(job_id)
        if self._log is not None:
            self._log.forget(job_id)
        del self._active[job_id]
        self._held_inputs.release(active)
        self._hub.end_stream(job_id)
        active.done.set()
        self._dispatch.wake()

    def _launch_new(self, active: ActiveJob, provider: Provider) -> None:
        self._driver.launch(active, provider, new_attempt=True)

    def _fresh(self, job: Job) -> Job:
        """The in-memory state of an unfinished job is never older than the stored one."""
        active = self._active.get(job.id)
        return snapshot(active.job) if active is not None else job

    async def _load_replay(self, job_id: str) -> builtins.list[JobEvent] | None:
        record = await self._store.get(job_id)
        if record is None:
            return None
        job = record.job
        marks = synthesize_marks(job, last_sequence=record.last_sequence, retries=record.retries)
        return replay_events(
            job,
            marks=marks,
            retries=record.retries,
            progress=progress_of(job, 0),
            queue_position=0,
        )

    # --- store, events, the end -----------------------------------------------------------

    def _emit(self, active: ActiveJob, kind: EventKind) -> JobEvent | None:
        job_id = active.job.id
        if active.finishing or not self._hub.is_open(job_id):
            return None  # nothing may follow Finished (or the end of the streams at stop)
        if self._hub.last_sequence(job_id) >= active.record.last_sequence:
            # Past the stored reservation (many progress events): extend it in the background;
            # a crash before that write can at worst reuse numbers no client kept.
            active.record.last_sequence = self._hub.last_sequence(job_id) + SEQUENCE_BLOCK
            self._spawn(self._save_reservation(active))
        event = self._hub.emit(job_id, kind)
        if self._log is not None:
            self._log.record(event)
        return event

    def _flush_progress(self, active: ActiveJob) -> None:
        self._hub.flush_progress(active.job.id)

    async def _save_reservation(self, active: ActiveJob) -> None:
        try:
            await self._writes.save(active)
        except LeaseLost:
            self._forget(active)

    def _finish(
        self, active: ActiveJob, state: JobState, error: ServiceError | None
    ) -> asyncio.Task[None]:
        """End the job in its own task, so that a cancelled caller cannot leave it half-done."""
        return self._spawn(self._finish_now(active, state, error))

    def _finish_from_driver(
        self, active: ActiveJob, state: JobState, error: ServiceError | None
    ) -> asyncio.Future[None]:
        """:meth:`_finish` begun in the job's controller step (it awaits the end): a task
        only if the end suspends, and then shielded: a controller cancelled while it awaits
        (stop() cancels those that outlive the grace) would otherwise cancel the end half-way
        (stored but no Finished sent, the job left in the active set, ``done`` never set)."""
        return asyncio.shield(
            self._start(self._finish_now(active, state, error))
        )  # (a done one as is)

    async def _finish_now(
        self, active: ActiveJob, state: JobState, error: ServiceError | None
    ) -> None:
        if active.finishing:
            await active.done.wait()
            return
        active.finishing = True
        job = active.job
        job_id_var.set(job.id)
        self._dispatch.dequeue(job.id)
        job.state = state
        job.error = error
        job.waiting = ""
        job.ended = job.updated = _now()
        if state is JobState.SUCCEEDED:
            job.progress = 1.0
        active.record.last_sequence = self._writes.last_sequence(active) + 1
        deliveries = self._deliveries(job)
        final = snapshot(job)
        ended_in_store = False  # with its Finished event and the lease's release
        try:
            # First the store, with the webhook in the same transaction ...
            ended_in_store = await self._writes.store_end(active, final, deliveries)
            if deliveries:
                self._delivery_stored()
        except LeaseLost:
            active.finishing = False
            self._forget(active)  # the holder now decides how it ends
            return
        except Exception as exc:
            if self._leases is not None and backend_outage(exc) is not None:
                # The database is away: announcing an end it does not know would tell
                # watchers one outcome and leave the job to a taker that may reach another.
                # Drop it instead; its lease lapses and a taker resumes it from its checkpoint.
                logger.warning("job %s: could not store its end (%s); left to a taker", job.id, exc)
                active.finishing = False
                self._forget(active)
                return
            logger.exception("job %s: could not store its end", job.id)
            if self._log is not None:
                # Its lease is released below, and events of a job not held are not stored:
                # a taker resumes the job from its stored row and tells the watchers there.
                self._log.forget(job.id)
        if self._hub.is_open(job.id):  # (not after stop() closed the streams)
            self._hub.emit(job.id, Finished(final))  # ... then the event ...
        del self._active[job.id]
        self._held_inputs.release(active)
        active.done.set()
        logger.info("job %s %s (%s)", job.id, state.value, error or "ok")
        if self._leases is not None:
            if ended_in_store:
                self._leases.drop(job.id)
            else:
                self._spawn(self._leases.release(job.id))
        self._inputs.job_ended(job)
        self._dispatch.publish_positions()
        self._dispatch.wake()
        for hook in self._hooks:  # ... then the hooks
            self._run_hook(hook, final)

    def _run_hook(self, hook: TerminalHook, job: Job) -> None:
        try:
            pending = hook(job)
        except Exception:
            logger.exception("terminal hook %r failed for job %s", hook, job.id)
            return
        if pending is not None:
            self._spawn(self._await_hook(hook, pending, job))

    async def _await_hook(self, hook: TerminalHook, pending: Awaitable[None], job: Job) -> None:
        try:
            await pending
        except Exception:
            logger.exception("terminal hook %r failed for job %s", hook, job.id)

    def discard_inputs(self, shas: set[str]) -> None:
        """Delete spooled inputs of a request that made no job, unless a job needs them."""
        self._inputs.discard(shas)

    def _inputs_needed(self) -> set[str]:
        return {ref.sha256 for a in self._active.values() for ref in a.job.inputs}

    def _start(
        self, coro: Coroutine[Any, Any, _T], *, log_errors: bool = True
    ) -> asyncio.Future[_T]:
        """:meth:`_spawn`, but begun at once and a task only if it suspends (a done future
        otherwise). The embedded store only: a shared store's writes bind timeouts to the
        current task (see :mod:`.eager`)."""
        if self._leases is not None:
            return self._spawn(coro, log_errors=log_errors)

        def spawn(
            rest: Coroutine[Any, Any, _T], context: contextvars.Context
        ) -> asyncio.Future[_T]:
            return self._spawn(rest, log_errors=log_errors, context=context)

        started = start_eagerly(coro, spawn)
        if started.done() and log_errors:
            _log_failure(started)
        return started

    def _spawn(
        self,
        coro: Coroutine[Any, Any, Any],
        *,
        log_errors: bool = True,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, context=context)
        self._tasks.add(task)
        # One done callback, not two: each is a callback of the loop's own (two tasks a job).
        task.add_done_callback(self._ended_logged if log_errors else self._ended_quiet)
        return task

    def _ended_logged(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        _log_failure(task)

    def _ended_quiet(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        _retrieve(task)


class _Host:
    """The manager as the hand-overs see it (:class:`.takeover.TakeoverHost`)."""

    def __init__(self, manager: JobManager) -> None:
        self._manager = manager

    @property
    def running(self) -> bool:
        return self._manager._phase == "running"

    @property
    def accepting(self) -> bool:
        return self._manager.accepting

    def can_start(self, task: TaskKind, spec: TaskSpec) -> bool:
        return self._manager._dispatch.can_start(task, spec)

    async def recover(self, records: Sequence[JobRecord]) -> None:
        await self._manager._recover(records)

    async def cancel_here(self, active: ActiveJob) -> None:
        await self._manager._cancel_here(active)

    def lease_lost(self, job_id: str) -> None:
        self._manager._lease_lost(job_id)

    async def withdraw(self, job: Job) -> None:
        await self._manager._driver.withdraw(job)


def _no_deliveries(job: Job) -> Sequence[tuple[str, bytes]]:
    return ()


def _nothing() -> None:
    return None


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # marks it retrieved: the awaiting side reports it


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.error("background job task failed", exc_info=error)


async def _wait(tasks: set[asyncio.Task[Any]], within_s: float) -> None:
    if tasks and within_s > 0:
        await asyncio.wait(builtins.list(tasks), timeout=within_s)
