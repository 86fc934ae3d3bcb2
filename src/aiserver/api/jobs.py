"""JobService: get, list, watch and cancel jobs."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
from imagetasks.v1 import job_service_pb2 as jpb
from imagetasks.v1 import job_service_pb2_grpc

from aiserver.api import calls
from aiserver.api.convert import (
    Link,
    event_to_proto,
    job_to_proto,
    state_from_proto,
    task_from_proto,
)
from aiserver.api.job_changes import JobChanges
from aiserver.api.status import rpc
from aiserver.errors import ErrorKind, ServiceError, invalid_argument
from aiserver.jobs.manager import JobManager
from aiserver.jobs.model import Accepted, Job, JobState, Progress
from aiserver.jobs.paging import page_size as checked_page_size
from aiserver.logs import job_id_var

__all__ = ["JobServicer", "parse_job_name"]

_JOB_NAME = re.compile(r"jobs/([A-Za-z0-9_-]{1,64})")


def parse_job_name(name: str, field: str = "name") -> str:
    m = _JOB_NAME.fullmatch(name)
    if m is None:
        raise invalid_argument(field, "INVALID_NAME", "expected a job name like jobs/{job}")
    job_id_var.set(m.group(1))  # the call's log lines name the job
    return m.group(1)


class JobServicer(job_service_pb2_grpc.JobServiceServicer):
    def __init__(
        self,
        manager: JobManager,
        *,
        link: Link = lambda url: url,
    ) -> None:
        self._manager = manager
        self._link = link

    @rpc
    async def GetJob(self, request: jpb.GetJobRequest, context: Any) -> jpb.GetJobResponse:
        job = await self._manager.get(parse_job_name(request.name), calls.scope())
        positions = await self._manager.positions([job])
        reply = jpb.GetJobResponse()
        job_to_proto(job, positions[job.id], self._link, reply.job)
        return reply

    @rpc
    async def ListJobs(self, request: jpb.ListJobsRequest, context: Any) -> jpb.ListJobsResponse:
        page_size = checked_page_size(request.page_size)  # refused before the admin check
        if request.all_owners and not calls.is_admin():
            raise ServiceError(
                ErrorKind.PERMISSION_DENIED, "ADMIN_ONLY", "all_owners needs an admin key"
            )
        owner = None if request.all_owners else calls.owner()
        jobs, token = await self._manager.list(
            owner=owner,
            states=[state_from_proto(s) for s in request.states],
            task=task_from_proto(request.task),
            tag=request.tag,
            ref_id=request.ref_id,
            page_size=page_size,
            page_token=request.page_token,
        )
        positions = await self._manager.positions(jobs)
        return jpb.ListJobsResponse(
            jobs=[job_to_proto(j, positions[j.id], self._link) for j in jobs],
            next_page_token=token,
        )

    @rpc
    async def WatchJob(
        self, request: jpb.WatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[jpb.WatchJobResponse]:
        job = await self._manager.get(parse_job_name(request.name), calls.scope())
        # Closed when the caller leaves too: a watch through the store holds a listener.
        async with contextlib.aclosing(self._manager.subscribe(job.id)) as events:
            async for event in events:
                reply = jpb.WatchJobResponse()
                position = self._manager.queue_position(job.id)
                event_to_proto(event, position, self._link, reply.event)
                yield reply

    @rpc
    async def WatchJobs(
        self, request: jpb.WatchJobsRequest, context: Any
    ) -> AsyncIterator[jpb.WatchJobsResponse]:
        if request.all_owners and not calls.is_admin():
            raise ServiceError(
                ErrorKind.PERMISSION_DENIED, "ADMIN_ONLY", "all_owners needs an admin key"
            )
        owner = None if request.all_owners else calls.owner()
        task = task_from_proto(request.task)
        tag = request.tag

        def accept(job: Job) -> bool:
            return (
                (owner is None or job.owner == owner)
                and (task is None or job.task == task)
                and (not tag or job.tag == tag)
            )

        changes = JobChanges(accept)
        remove = self._manager.tap(changes.offer)
        try:
            while True:
                event, job = await changes.next()
                position = self._manager.queue_position(job.id)
                if (
                    not position
                    and job.state is JobState.QUEUED
                    and isinstance(event.kind, Accepted | Progress)
                ):
                    position = event.kind.queue_position  # held elsewhere: its holder's word
                reply = jpb.WatchJobsResponse()
                job_to_proto(job, position, self._link, reply.job)
                if isinstance(event.kind, Progress):
                    proto = event_to_proto(event, reply.job.queue_position, self._link)
                    reply.progress.CopyFrom(proto.progress)
                yield reply
        finally:
            remove()
            changes.close()

    @rpc
    async def CancelJob(self, request: jpb.CancelJobRequest, context: Any) -> jpb.CancelJobResponse:
        job = await self._manager.cancel(parse_job_name(request.name), calls.scope())
        return jpb.CancelJobResponse(job=job_to_proto(job, link=self._link))
