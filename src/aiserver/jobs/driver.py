"""Attempt driving: one run of a job on a provider, and what its end means for the job.

Each attempt runs in a task of its own (the job's *controller*): it marks the job RUNNING,
hands the provider a :class:`~aiserver.providers.base.WorkItem` (inputs fetched from the
shared store if only there) and an :class:`~aiserver.jobs.attempt.AttemptSink`, bounds the run
by ``run_timeout_s``, then settles: success, a retry on another agent (queued again), a
failure, or a cancel. Every write goes through the manager's fenced ``save``; a
``LeaseLost`` (another process holds the job now) makes it forget the job, nothing more.
A cancel that ends a resumed attempt before its run followed the checkpoint withdraws the
remote work the earlier process left (:meth:`AttemptDriver.withdraw`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from aiserver.errors import ErrorKind, ServiceError
from aiserver.jobs.attempt import (
    ActiveJob,
    AttemptSink,
    Emit,
    RideOut,
    Save,
    cancelled_error,
    input_missing,
    internal_error,
    retryable_failure,
    with_first_cause,
)
from aiserver.jobs.dispatch import Dispatcher, Finish
from aiserver.jobs.model import InputRef, Job, JobState, Progress, Retrying, Stage
from aiserver.jobs.outputs import ArtifactWriter
from aiserver.jobs.scheduler import SchedulerSettings
from aiserver.jobs.store import LeaseLost
from aiserver.logs import job_id_var
from aiserver.outage import backend_outage
from aiserver.providers.base import Provider, WorkInput, WorkItem
from aiserver.spool import InputSpool

__all__ = ["AttemptDriver"]

logger = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


class AttemptDriver:
    """Launches and settles attempts; :attr:`controllers` are the tasks running them."""

    def __init__(
        self,
        spool: InputSpool,
        artifacts: ArtifactWriter,
        settings: SchedulerSettings,
        dispatcher: Dispatcher,
        providers: Mapping[str, Provider],
        *,
        save: Save,
        emit: Emit,
        finish: Finish,
        forget: Callable[[ActiveJob], None],
        leased: bool = False,
        lease_firm: Callable[[str], bool] | None = None,
        ride_out: RideOut | None = None,
        flush_progress: Callable[[ActiveJob], None] | None = None,
        stored_input: Callable[[str, str], Awaitable[bytes | None]] | None = None,
    ) -> None:
        """``leased``: jobs are held under leases on a shared store (a taker can resume one
        this process drops); ``lease_firm(job_id)``: whether that lease still has time to
        run (checked after each checkpoint, see :class:`AttemptSink`)."""
        self._spool = spool
        self._stored_input = stored_input
        """A stored input's bytes (job id, SHA-256) from the job store."""
        self._artifacts = artifacts
        self._settings = settings
        self._dispatcher = dispatcher
        self._providers = providers
        self._save = save
        self._emit = emit
        self._finish = finish
        self._forget = forget
        self._leased = leased
        self._lease_firm = lease_firm
        self._ride_out = ride_out
        self._flush_progress = flush_progress
        self.controllers: set[asyncio.Task[None]] = set()

    def launch(self, active: ActiveJob, provider: Provider, *, new_attempt: bool) -> None:
        """Run (``new_attempt``) or resume the job on ``provider`` in a task of its own."""
        self._dispatcher.running[provider.name] += 1  # counted now: the next pick must see it
        active.last_position = 0
        active.job.waiting = ""
        task = asyncio.create_task(
            self._drive(active, provider, new_attempt), name=f"job-{active.job.id}"
        )
        active.controller = task
        self.controllers.add(task)
        task.add_done_callback(self.controllers.discard)

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
                await self._cancel_unstarted(active, new_attempt)
                return
            self._emit(active, Progress(Stage.PENDING, provider=provider.name))
            work = WorkItem(
                job_id=job.id,
                task=job.task,
                spec=job.spec,
                inputs=await self._work_inputs(active),
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
                lease_firm=self._lease_firm,
                ride_out=self._ride_out,
                flush_progress=self._flush_progress,
            )
            active.sink = sink
            # A cancel that came while the inputs were fetched found no run task to cancel.
            if active.cancel_reason == "shutdown":
                return
            if active.cancel_reason == "user":
                await self._cancel_unstarted(active, new_attempt)
                return
            run = asyncio.create_task(provider.run(work, sink), name=f"run-{job.id}")
            active.run_task = run
            timed_out = not await _ended_within(run, self._settings.run_timeout_s)
            if timed_out:
                run.cancel()
                await _ended_within(run, self._settings.cancel_timeout_s)
            sink.closed = True
            await self._conclude(active, run, timed_out, counted=new_attempt)
        except LeaseLost:
            self._forget(active)
        except ServiceError as error:  # e.g. an input vanished from the spool
            await self._finish(active, JobState.FAILED, error)
        except Exception as exc:
            outage = backend_outage(exc)
            if outage is not None and self._leased:
                # The job database or the bucket (an input's fetch) away before the run:
                # as mid-run (see _conclude), dropped with its checkpoint; its lease lapses
                # and a taker (this process too) runs it once the store is back.
                logger.warning("job %s: store unreachable (%s); dropped", job.id, exc)
                self._forget(active)
            elif outage is not None:  # alone on its store: nobody else would run it
                await self._finish(active, JobState.FAILED, outage)
            else:
                logger.exception("job %s: attempt failed unexpectedly", job.id)
                await self._finish(active, JobState.FAILED, internal_error())
        finally:
            self._dispatcher.running[provider.name] -= 1
            if active.sink is not None:
                active.sink.closed = True  # a provider that outlives its attempt is ignored
            active.run_task = None
            active.sink = None
            self._dispatcher.wake()

    async def _cancel_unstarted(self, active: ActiveJob, new_attempt: bool) -> None:
        """Cancelled before the run began: a resumed attempt's remote work (left by the
        process that started it) is still out there."""
        if not new_attempt:
            await self.withdraw(active.job)
        await self._finish(active, JobState.CANCELLED, cancelled_error())

    async def withdraw(self, job: Job) -> None:
        """Ask the job's provider to take off its agent the work its checkpoint names."""
        provider = self._providers.get(job.provider)
        if provider is None or not job.resume:
            return
        try:
            async with asyncio.timeout(self._settings.cancel_timeout_s):
                await provider.withdraw(job.resume)
        except Exception:
            logger.warning("job %s: could not withdraw its remote work", job.id, exc_info=True)

    async def _conclude(
        self, active: ActiveJob, run: asyncio.Task[None], timed_out: bool, *, counted: bool
    ) -> None:
        job = active.job
        reason = active.cancel_reason
        succeeded = run.done() and not run.cancelled() and run.exception() is None
        lost = run.done() and not run.cancelled() and isinstance(run.exception(), LeaseLost)
        if lost:  # a fenced write of the attempt failed: another process holds the job
            self._forget(active)
            return
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
            if not counted:  # resumed: cancelled perhaps before it re-attached to the prompt
                await self.withdraw(job)
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
                    await self.retry_or_fail(active, retryable, agent=retryable.agent or job.agent)
                else:
                    await self._requeue_unreached(active, retryable, counted=counted)
            elif isinstance(failure, ServiceError):
                await self._finish(active, JobState.FAILED, failure)
            elif self._leased and failure is not None and backend_outage(failure) is not None:
                # The job database or blob store went away, not the agent: the prompt may
                # still run there. Drop the job; its lease lapses and a taker (this process
                # too) re-attaches from the checkpoint once the store is back.
                logger.warning("job %s: store unreachable mid-run (%s); dropped", job.id, failure)
                self._forget(active)
            else:
                logger.error("job %s: provider %s failed", job.id, job.provider, exc_info=failure)
                await self._finish(active, JobState.FAILED, internal_error())

    async def retry_or_fail(self, active: ActiveJob, error: ServiceError, *, agent: str) -> None:
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
        self._dispatcher.enqueue(active, time.monotonic())
        self._dispatcher.publish_positions()
        self._dispatcher.wake()

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
        self._dispatcher.enqueue(active, active.queued_at)
        self._dispatcher.publish_positions()
        self._dispatcher.wake()

    async def _work_inputs(self, active: ActiveJob) -> dict[str, WorkInput]:
        job = active.job
        inputs: dict[str, WorkInput] = {}
        for ref in job.inputs:
            if ref.stored:
                inputs[ref.field] = await self._stored_work_input(active, ref)
                continue
            try:  # from the shared store when another process received the upload
                path = await self._spool.local_path(ref.sha256)
            except Exception as exc:
                if backend_outage(exc) is not None:
                    raise  # the bucket away for now: not a missing input
                raise input_missing(ref) from None
            inputs[ref.field] = WorkInput(
                ref.field, path, ref.file_name, ref.sha256, ref.mime_type, ref.width, ref.height
            )
        return inputs

    async def _stored_input_bytes(self, active: ActiveJob, ref: InputRef) -> bytes:
        held = active.input_bytes
        data = held.get(ref.sha256) if held is not None else None
        if data is None and self._stored_input is not None:  # not held: a restart, a budget
            data = await self._stored_input(active.job.id, ref.sha256)
        if data is None:
            raise input_missing(ref)
        return data

    async def _stored_work_input(self, active: ActiveJob, ref: InputRef) -> WorkInput:
        data = await self._stored_input_bytes(active, ref)
        return WorkInput(
            ref.field,
            self._spool.path_for(ref.sha256),  # no file there: ``data`` is the input
            ref.file_name,
            ref.sha256,
            ref.mime_type,
            ref.width,
            ref.height,
            data=data,
        )


async def _ended_within(run: asyncio.Task[Any], timeout_s: float) -> bool:
    """Whether ``run`` ended within ``timeout_s``. Its exception is marked retrieved when it
    ends (the driver reports it), by the same done callback that wakes this wait:
    ``asyncio.wait`` added one of its own, a loop callback more per job."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bool] = loop.create_future()

    def ended(task: asyncio.Task[Any]) -> None:
        if not task.cancelled():
            task.exception()
        if not waiter.done():
            waiter.set_result(True)

    def expired() -> None:
        if not waiter.done():
            waiter.set_result(False)

    run.add_done_callback(ended)
    timer = loop.call_later(timeout_s, expired)
    try:
        return await waiter
    finally:
        timer.cancel()
