"""The job lifecycle: submit, queue, run on a provider, retry, finish - and survive restarts.

:class:`JobManager` is the domain API the servicers call. It owns the in-memory state of
every unfinished job (the FIFO queue, the running attempts) on top of a :class:`JobStore` that
is written before any event about the change goes out, so that after a crash, even a SIGKILL,
:meth:`JobManager.start` finds every queued job and every running one with its checkpoint.

Everything here runs on one event loop; no locks are needed, but a coroutine may be suspended
at every ``await``, so each step re-checks whether the job was cancelled or finished meanwhile.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from aiserver.errors import ErrorKind, ServiceError, invalid_argument
from aiserver.jobs.attempt import (
    ActiveJob,
    AttemptSink,
    cancelled_error,
    input_missing,
    internal_error,
    retryable_failure,
    with_first_cause,
)
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
from aiserver.jobs.ids import new_job_id
from aiserver.jobs.model import (
    Accepted,
    EventKind,
    Finished,
    InputRef,
    Job,
    JobEvent,
    JobState,
    Progress,
    Retrying,
    Stage,
    WebhookDelivery,
)
from aiserver.jobs.outputs import ArtifactWriter
from aiserver.jobs.paging import page_size as checked_page_size
from aiserver.jobs.scheduler import (
    SHUTDOWN,
    JobQueue,
    SchedulerSettings,
    could_serve,
    default_spec,
    pick_provider,
    refusal,
    waiting_reason,
)
from aiserver.jobs.store import JobQuery, JobRecord, JobStore
from aiserver.logs import job_id_var
from aiserver.providers.base import (
    Provider,
    WorkInput,
    WorkItem,
)
from aiserver.spool import InputSpool
from aiserver.tasks import TaskKind, TaskSpec

__all__ = ["SEQUENCE_BLOCK", "JobManager", "TerminalHook"]

logger = logging.getLogger(__name__)

TerminalHook = Callable[[Job], Awaitable[None]]

SEQUENCE_BLOCK = 256
"""Event sequences reserved in the store per write. Progress events are not stored one by one;
after a crash, numbering resumes past the reservation, so no number is ever used twice."""


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
    ) -> None:
        self._store = store
        self._spool = spool
        self._artifacts = artifacts
        self._providers = builtins.list(providers)
        self._by_name = {p.name: p for p in self._providers}
        self._settings = settings
        self._active: dict[str, ActiveJob] = {}
        self._queue = JobQueue()
        self._running: dict[str, int] = {p.name: 0 for p in self._providers}
        self._hooks: builtins.list[TerminalHook] = []
        self._controllers: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()  # finishes, hooks, background writes
        self._deletions: dict[str, asyncio.TimerHandle] = {}  # by job: inputs waiting out grace
        self._hub = EventHub(
            buffer_size=settings.subscriber_buffer,
            progress_interval_s=settings.progress_interval_s,
            retain_s=settings.history_retain_s,
            queue_position=self.queue_position,
        )
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._phase: Literal["new", "running", "stopping", "stopped"] = "new"
        self._quiescing = False
        self._creating: dict[str, int] = {}  # by owner: submissions between check and store

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild the queue from the store, hand RUNNING jobs back, start dispatching."""
        if self._phase != "new":
            raise RuntimeError("JobManager.start() may be called once")
        records = await self._store.unfinished()
        now = time.monotonic()  # downtime does not count against the queue timeout
        for record in records:
            self._active[record.job.id] = ActiveJob(record)
            if record.job.state is JobState.QUEUED:
                self._enqueue(self._active[record.job.id], now)
        for record in records:
            self._hub.open_recovered(
                record.job, last_sequence=record.last_sequence, retries=record.retries
            )
        self._phase = "running"
        for record in records:
            job = record.job
            if job.state is not JobState.RUNNING:
                continue
            active = self._active[job.id]
            provider = self._by_name.get(job.provider)
            if provider is not None and job.resume:
                # Re-attach: the provider continues the same attempt from its checkpoint.
                logger.info("job %s: resuming on %s", job.id, provider.name)
                self._launch(active, provider, new_attempt=False)
            else:
                interrupted = ServiceError(
                    ErrorKind.UNAVAILABLE,
                    "JOB_INTERRUPTED",
                    "the server restarted while the job was running",
                )
                await self._retry_or_fail(active, interrupted, agent="")
        self._publish_positions()
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="job-dispatcher")
        logger.info("job manager started: %d unfinished jobs recovered", len(records))

    async def stop(self, grace_s: float) -> None:
        """Stop taking work; give running jobs ``grace_s`` to finish, then cancel them so that
        they stay RUNNING (or QUEUED) in the store and resume at the next start."""
        if self._phase in ("stopping", "stopped"):
            return
        self._phase = "stopping"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(grace_s, 0.0)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)
        await _wait(self._controllers, deadline - loop.time())
        for active in self._active.values():
            if active.controller is not None and not active.controller.done():
                active.cancel_reason = "shutdown"
                if active.run_task is not None:
                    active.run_task.cancel(SHUTDOWN)
        await _wait(self._controllers, self._settings.cancel_timeout_s)
        for task in builtins.list(self._controllers):  # providers that ignore cancellation
            task.cancel()
        await _wait(self._controllers, 1.0)
        await _wait(self._tasks, max(deadline - loop.time(), 0.1))
        for task in builtins.list(self._tasks):
            task.cancel()
        await _wait(self._tasks, 1.0)
        for handle in self._deletions.values():  # pending spool deletions: kept (a sweep's job)
            handle.cancel()
        self._deletions.clear()
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
    ) -> tuple[Job, bool]:
        """Queue a job; ``(job, True)`` when ``owner`` already has one with this ``ref_id``."""
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
        if limit > 0 and self.active_count(owner) + self._creating.get(owner, 0) >= limit:
            if ref_id:  # a retry of a job it already has is no new work
                found, _ = await self._store.query(
                    JobQuery(owner=owner, ref_id=ref_id), page_size=1, page_token=""
                )
                if found:
                    return self._fresh(found[0]), True
            raise ServiceError(
                ErrorKind.RESOURCE_EXHAUSTED,
                "TOO_MANY_JOBS",
                f"at most {limit} unfinished jobs per API key; wait for some to finish",
                metadata={"limit": str(limit)},
                retry_after_s=self._settings.too_many_jobs_retry_s,
            )
        create = self._create(
            owner=owner,
            task=task,
            spec=spec,
            inputs=inputs,
            ref_id=ref_id,
            tag=tag,
            reply_to=reply_to,
        )
        # Counted until stored: concurrent submissions cannot all slip under the limit.
        self._creating[owner] = self._creating.get(owner, 0) + 1
        try:
            # Shielded: once stored, the job must also be queued, even if the caller goes away.
            return await asyncio.shield(self._spawn(create, log_errors=False))
        finally:
            self._creating[owner] -= 1
            if not self._creating[owner]:
                del self._creating[owner]

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
        """Every event of every job, with its live record, until the remover is called."""
        return self._hub.tap(callback)

    def subscribe(self, job_id: str) -> Subscription:
        """Replay then live events, ending after Finished (check ownership with get first)."""
        return self._hub.subscribe(job_id, self._load_replay)

    async def cancel(self, job_id: str, owner: str | None) -> Job:
        """Cancel a queued or running job; an ended job is returned unchanged."""
        active = self._active.get(job_id)
        if active is None:
            return await self.get(job_id, owner)
        if owner is not None and active.job.owner != owner:
            raise job_not_found(job_id)
        if not active.finishing:
            if self._queue.remove(job_id):
                await asyncio.shield(self._finish(active, JobState.CANCELLED, cancelled_error()))
            else:
                # Running (or between two steps of its controller, which checks the reason).
                active.cancel_reason = "user"
                if active.run_task is not None:
                    active.run_task.cancel()
        try:
            async with asyncio.timeout(self._settings.cancel_timeout_s):
                await active.done.wait()
        except TimeoutError:
            logger.warning("job %s: provider ignores cancellation; marking it cancelled", job_id)
            await asyncio.shield(self._finish(active, JobState.CANCELLED, cancelled_error()))
        return snapshot(active.job)

    def artifacts_in_use(self) -> set[str]:
        """Names of outputs of jobs that have not ended (retention must keep them)."""
        return {a.name for active in self._active.values() for a in active.job.outputs}

    def active_count(self, owner: str | None = None) -> int:
        """Unfinished jobs (of ``owner``; None: of everyone)."""
        if owner is None:
            return len(self._active)
        return sum(1 for a in self._active.values() if a.job.owner == owner)

    def stats(self) -> dict[tuple[TaskKind, JobState], int]:
        """Unfinished jobs by task and state (for metrics)."""
        counts: dict[tuple[TaskKind, JobState], int] = {}
        for active in self._active.values():
            key = (active.job.task, active.job.state)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def queue_depth(self) -> int:
        """Jobs waiting for a provider."""
        return len(self._queue)

    def queue_position(self, job_id: str) -> int:
        """1 for the next job to be dispatched, 0 when not queued."""
        return self._queue.position(job_id)

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

    async def _create(
        self,
        *,
        owner: str,
        task: TaskKind,
        spec: TaskSpec,
        inputs: Sequence[InputRef],
        ref_id: str,
        tag: str,
        reply_to: str,
    ) -> tuple[Job, bool]:
        now = _now()
        job_id = new_job_id(now)
        job = Job(
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
        stored, existing = await self._store.create(JobRecord(job, SEQUENCE_BLOCK))
        if existing:
            return self._fresh(stored.job), True
        active = ActiveJob(stored)
        self._active[job_id] = active
        self._enqueue(active, time.monotonic())
        active.last_position = self._queue.position(job_id)
        self._hub.open_new(job)
        self._hub.emit(job_id, Accepted(task, job.ref_id, active.last_position))
        self._wake.set()
        return snapshot(job), False

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

    # --- scheduling -----------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                self._expire_queued()
                self._dispatch()
            except Exception:
                logger.exception("scheduler pass failed")
            timeout = self._next_pass_in()
            if timeout is None:
                await self._wake.wait()
                continue
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _next_pass_in(self) -> float | None:
        """Nothing queued: sleep until woken. Else recheck providers now and then, and wake
        up for the earliest queue deadline."""
        deadline = self._queue.next_deadline(self._settings.queue_timeout_s)
        if deadline is None:
            return None
        until_deadline = max(deadline - time.monotonic(), 0.0)
        return min(self._settings.recheck_interval_s, until_deadline)

    def _expire_queued(self) -> None:
        timeout = self._settings.queue_timeout_s
        for job_id in self._queue.expired(time.monotonic(), timeout):
            self._queue.remove(job_id)
            error = ServiceError(
                ErrorKind.DEADLINE_EXCEEDED,
                "QUEUE_TIMEOUT",
                f"no provider took the job within {timeout:g} s",
                metadata={"queue_timeout_s": f"{timeout:g}"},
            )
            active = self._active[job_id]
            self._finish(active, JobState.FAILED, with_first_cause(error, active.record.retries))

    def _dispatch(self) -> None:
        if self._phase != "running":
            return
        capacity = self._settings.max_running_per_provider
        dispatched = False
        for job_id in self._queue:
            if all(self._running[p.name] >= capacity for p in self._providers):
                break
            active = self._active[job_id]
            if active.not_before > time.monotonic():
                continue
            provider = pick_provider(
                self._providers, active.job.task, active.job.spec, self._running, capacity
            )
            if provider is None:
                # Fail at once what no provider will ever take (e.g. a model no agent has)
                # rather than at the queue timeout; otherwise wait, others may still fit.
                error = refusal(self._providers, active.job.task, active.job.spec)
                if error is not None:
                    self._finish(active, JobState.FAILED, error)
                else:
                    why = waiting_reason(self._providers, active.job.task, active.job.spec)
                    self._set_waiting(active, why)
                continue
            self._queue.remove(job_id)
            self._launch(active, provider, new_attempt=True)
            dispatched = True
        if dispatched:
            self._publish_positions()

    def _publish_positions(self) -> None:
        for job_id, position in self._queue.positions().items():
            active = self._active[job_id]
            if active.last_position != position:
                active.last_position = position
                waiting = active.job.waiting
                self._emit(active, Progress(Stage.QUEUED, queue_position=position, waiting=waiting))

    def _set_waiting(self, active: ActiveJob, why: str) -> None:
        """Tell watchers (events, GetJob) why a queued job is not taken, when that changes."""
        if active.job.waiting == why:
            return
        active.job.waiting = why
        position = self._queue.position(active.job.id)
        active.last_position = position
        self._emit(active, Progress(Stage.QUEUED, queue_position=position, waiting=why))

    def _launch(self, active: ActiveJob, provider: Provider, *, new_attempt: bool) -> None:
        self._running[provider.name] += 1  # counted now: the next pick must see it
        active.last_position = 0
        active.job.waiting = ""
        task = asyncio.create_task(
            self._drive(active, provider, new_attempt), name=f"job-{active.job.id}"
        )
        active.controller = task
        self._controllers.add(task)
        task.add_done_callback(self._controllers.discard)

    # --- one attempt ----------------------------------------------------------------------

    async def _drive(self, active: ActiveJob, provider: Provider, new_attempt: bool) -> None:
        """Run one attempt (or resume one) and settle the job's fate."""
        job = active.job
        job_id_var.set(job.id)  # this task's (and the provider's) log lines name the job
        try:
            if new_attempt:
                job.attempts += 1
                job.resume = {}
                job.agent = ""
                job.progress = 0.0
            job.state = JobState.RUNNING
            job.provider = provider.name
            job.started = job.started or _now()
            await self._save(active)
            if active.cancel_reason == "shutdown":
                return
            if active.cancel_reason == "user":
                await self._finish(active, JobState.CANCELLED, cancelled_error())
                return
            self._emit(active, Progress(Stage.PENDING, provider=provider.name))
            work = WorkItem(
                job_id=job.id,
                task=job.task,
                spec=job.spec,
                inputs=self._work_inputs(job),
                attempt=job.attempts,
                resume=dict(job.resume),
                exclude=frozenset(r.agent for r in active.record.retries if r.agent),
            )
            sink = AttemptSink(
                active,
                provider=provider.name,
                artifacts=self._artifacts,
                save=self._save,
                emit=self._emit,
                resumed=not new_attempt,
            )
            active.sink = sink
            run = asyncio.create_task(provider.run(work, sink), name=f"run-{job.id}")
            run.add_done_callback(_retrieve)
            active.run_task = run
            done, _ = await asyncio.wait({run}, timeout=self._settings.run_timeout_s)
            timed_out = not done
            if timed_out:
                run.cancel()
                await asyncio.wait({run}, timeout=self._settings.cancel_timeout_s)
            sink.closed = True
            await self._conclude(active, run, timed_out, counted=new_attempt)
        except ServiceError as error:  # e.g. an input vanished from the spool
            await self._finish(active, JobState.FAILED, error)
        except Exception:
            logger.exception("job %s: attempt failed unexpectedly", job.id)
            await self._finish(active, JobState.FAILED, internal_error())
        finally:
            self._running[provider.name] -= 1
            if active.sink is not None:
                active.sink.closed = True  # a provider that outlives its attempt is ignored
            active.run_task = None
            active.sink = None
            self._wake.set()

    async def _conclude(
        self, active: ActiveJob, run: asyncio.Task[None], timed_out: bool, *, counted: bool
    ) -> None:
        job = active.job
        reason = active.cancel_reason
        succeeded = run.done() and not run.cancelled() and run.exception() is None
        if reason == "shutdown" and not succeeded:
            return  # stays RUNNING in the store: resumed or retried at the next start
        if succeeded:
            if job.outputs or job.texts:
                await self._finish(active, JobState.SUCCEEDED, None)
            else:
                # AI Server reports "no outputs" as success; say what happened instead.
                error = ServiceError(
                    ErrorKind.INTERNAL, "NO_OUTPUTS", "the provider finished without outputs"
                )
                await self._finish(active, JobState.FAILED, error)
        elif reason == "user":
            await self._finish(active, JobState.CANCELLED, cancelled_error())
        elif timed_out:
            timeout = self._settings.run_timeout_s
            error = ServiceError(
                ErrorKind.DEADLINE_EXCEEDED,
                "RUN_TIMEOUT",
                f"the job did not finish within {timeout:g} s",
                metadata={"run_timeout_s": f"{timeout:g}"},
            )
            await self._finish(active, JobState.FAILED, error)
        elif run.cancelled():
            logger.error("job %s: provider %s cancelled itself", job.id, job.provider)
            await self._finish(active, JobState.FAILED, internal_error())
        else:
            failure = run.exception()
            if (retryable := retryable_failure(failure)) is not None:
                if retryable.reached_agent:
                    await self._retry_or_fail(active, retryable, agent=retryable.agent or job.agent)
                else:
                    await self._requeue_unreached(active, retryable, counted=counted)
            elif isinstance(failure, ServiceError):
                await self._finish(active, JobState.FAILED, failure)
            else:
                logger.error("job %s: provider %s failed", job.id, job.provider, exc_info=failure)
                await self._finish(active, JobState.FAILED, internal_error())

    async def _retry_or_fail(self, active: ActiveJob, error: ServiceError, *, agent: str) -> None:
        job = active.job
        if job.attempts >= self._settings.max_attempts:
            await self._finish(
                active, JobState.FAILED, with_first_cause(error, active.record.retries)
            )
            return
        retry = Retrying(attempt=job.attempts, reason=error.message, agent=agent)
        active.record.retries.append(retry)
        job.state = JobState.QUEUED
        job.resume = {}  # the checkpoint belonged to the failed run
        job.agent = ""
        job.progress = 0.0
        await self._save(active)
        if active.cancel_reason == "user":
            await self._finish(active, JobState.CANCELLED, cancelled_error())
            return
        self._emit(active, retry)
        if active.cancel_reason == "shutdown":
            return  # stored as QUEUED: runs at the next start
        self._enqueue(active, time.monotonic())
        self._publish_positions()
        self._wake.set()

    async def _requeue_unreached(
        self, active: ActiveJob, error: ServiceError, *, counted: bool
    ) -> None:
        """Back in the queue after an attempt that never reached an agent (e.g. the one online
        went down between the pick and the run): that was no attempt, and the queue deadline
        still counts from when the job was queued."""
        job = active.job
        if counted:
            job.attempts -= 1
        if not job.attempts:
            job.started = None  # it never started anywhere
        job.state = JobState.QUEUED
        job.resume = {}
        job.agent = ""
        job.progress = 0.0
        job.waiting = error.message
        await self._save(active)
        if active.cancel_reason == "user":
            await self._finish(active, JobState.CANCELLED, cancelled_error())
            return
        if active.cancel_reason == "shutdown":
            return
        active.not_before = time.monotonic() + self._settings.recheck_interval_s
        self._enqueue(active, active.queued_at)
        self._publish_positions()
        self._wake.set()

    def _enqueue(self, active: ActiveJob, since: float) -> None:
        active.queued_at = since
        self._queue.push(active.job.id, since)

    def _work_inputs(self, job: Job) -> dict[str, WorkInput]:
        inputs: dict[str, WorkInput] = {}
        for ref in job.inputs:
            path = self._spool.path_for(ref.sha256)
            if not path.is_file():
                raise input_missing(ref)
            inputs[ref.field] = WorkInput(
                ref.field, path, ref.file_name, ref.sha256, ref.mime_type, ref.width, ref.height
            )
        return inputs

    # --- store, events, the end -----------------------------------------------------------

    async def _save(self, active: ActiveJob) -> None:
        """Store the record, reserving sequences for the events that follow the write."""
        active.job.updated = _now()
        active.record.last_sequence = max(
            active.record.last_sequence, self._last_sequence(active) + SEQUENCE_BLOCK
        )
        await self._store.save(active.record)

    def _last_sequence(self, active: ActiveJob) -> int:
        return self._hub.last_sequence(active.job.id, default=active.record.last_sequence)

    def _emit(self, active: ActiveJob, kind: EventKind) -> JobEvent | None:
        job_id = active.job.id
        if active.finishing or not self._hub.is_open(job_id):
            return None  # nothing may follow Finished (or the end of the streams at stop)
        if self._hub.last_sequence(job_id) >= active.record.last_sequence:
            # Past the stored reservation (many progress events): extend it in the background;
            # a crash before that write can at worst reuse numbers no client kept.
            active.record.last_sequence = self._hub.last_sequence(job_id) + SEQUENCE_BLOCK
            self._spawn(self._store.save(active.record))
        return self._hub.emit(job_id, kind)

    def _finish(
        self, active: ActiveJob, state: JobState, error: ServiceError | None
    ) -> asyncio.Task[None]:
        """End the job in its own task, so that a cancelled caller cannot leave it half-done."""
        return self._spawn(self._finish_now(active, state, error))

    async def _finish_now(
        self, active: ActiveJob, state: JobState, error: ServiceError | None
    ) -> None:
        if active.finishing:
            await active.done.wait()
            return
        active.finishing = True
        job = active.job
        job_id_var.set(job.id)
        self._queue.remove(job.id)
        job.state = state
        job.error = error
        job.waiting = ""
        job.ended = job.updated = _now()
        if state is JobState.SUCCEEDED:
            job.progress = 1.0
        active.record.last_sequence = self._last_sequence(active) + 1
        try:
            await self._store.save(active.record)  # first the store ...
        except Exception:
            logger.exception("job %s: could not store its end", job.id)
        final = snapshot(job)
        if self._hub.is_open(job.id):  # (not after stop() closed the streams)
            self._hub.emit(job.id, Finished(final))  # ... then the event ...
        del self._active[job.id]
        active.done.set()
        logger.info("job %s %s (%s)", job.id, state.value, error or "ok")
        self._release_inputs(job)
        self._publish_positions()
        self._wake.set()
        for hook in self._hooks:  # ... then the hooks
            self._spawn(self._run_hook(hook, final))

    async def _run_hook(self, hook: TerminalHook, job: Job) -> None:
        try:
            await hook(job)
        except Exception:
            logger.exception("terminal hook %r failed for job %s", hook, job.id)

    def _release_inputs(self, job: Job) -> None:
        """Delete this job's spool files that no unfinished job needs, after a grace period:
        a request may have just committed the same content and be about to submit it."""
        shas = {ref.sha256 for ref in job.inputs}
        if self._settings.spool_grace_s <= 0:
            self._delete_unneeded(shas)
            return
        key = job.id
        self._deletions[key] = asyncio.get_running_loop().call_later(
            self._settings.spool_grace_s, self._delete_unneeded, shas, key
        )

    def discard_inputs(self, shas: set[str]) -> None:
        """Delete spooled inputs of a request that made no job, unless a job needs them."""
        self._delete_unneeded(shas)

    def _delete_unneeded(self, shas: set[str], key: str = "") -> None:
        self._deletions.pop(key, None)
        needed = {ref.sha256 for a in self._active.values() for ref in a.job.inputs}
        for sha in shas - needed:
            if self._spool.pinned(sha):
                continue  # a request has just uploaded the same bytes and will submit them
            self._spool.delete_local(sha)
            if self._spool.shared:
                self._spawn(self._spool.delete_shared(sha))

    def _spawn(
        self, coro: Coroutine[Any, Any, Any], *, log_errors: bool = True
    ) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure if log_errors else _retrieve)
        return task


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # marks it retrieved: the awaiting side reports it


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.error("background job task failed", exc_info=error)


async def _wait(tasks: set[asyncio.Task[Any]], within_s: float) -> None:
    if tasks and within_s > 0:
        await asyncio.wait(builtins.list(tasks), timeout=within_s)
