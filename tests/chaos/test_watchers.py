"""Watchers learn within ~2 s that no agent can take their job, and why: in the event stream
(a QUEUED progress with ``waiting_reason``) and in GetJob."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from imagetasks.v1 import common_pb2, job_pb2, job_service_pb2_grpc, tasks_pb2
from imagetasks.v1 import job_service_pb2 as jpb

from aiserver.jobs.model import JobEvent, Progress, Stage
from aiserver.tasks import TaskKind
from tests.jobs.helpers import Env, ScriptedProvider, env, gated, submit, within
from tests.support.generation import comfy_service, generate
from tests.support.images import encode, quadrant_image

__all__ = ["env"]  # the fixture

NOTICE_S = 2.5
"""~2 s: the scheduler's recheck interval, plus slack for a loaded machine."""


async def next_waiting(events: AsyncIterator[JobEvent], seconds: float) -> Progress:
    async with asyncio.timeout(seconds):
        async for event in events:
            kind = event.kind
            if isinstance(kind, Progress) and kind.stage is Stage.QUEUED and kind.waiting:
                return kind
    raise AssertionError("the stream ended without a waiting progress")


async def test_a_job_no_provider_can_take_says_why_at_once(env: Env) -> None:
    provider = ScriptedProvider(online=False)
    manager = await env.manager(provider, recheck_interval_s=2.0)
    job = await submit(manager, env)
    waiting = await next_waiting(aiter(manager.subscribe(job.id)), NOTICE_S)
    assert waiting.waiting == "p1 is offline" and waiting.queue_position == 1
    assert (await manager.get(job.id, None)).waiting == "p1 is offline"

    provider.online = True  # back: the job runs, and the hint is gone
    events = manager.subscribe(job.id)
    async with asyncio.timeout(NOTICE_S + 2):
        async for event in events:
            if isinstance(event.kind, Progress) and event.kind.stage is Stage.PENDING:
                break
    assert (await manager.get(job.id, None)).waiting == ""


async def test_a_queued_job_hears_within_seconds_that_its_provider_went_down(env: Env) -> None:
    provider = ScriptedProvider(behaviour=gated)
    provider.slots = 1
    manager = await env.manager(provider, recheck_interval_s=2.0)
    first = await submit(manager, env)
    running = await provider.next_run()
    second = await submit(manager, env)
    assert (await manager.get(second.id, None)).waiting == ""  # only its turn: no hint
    events = aiter(manager.subscribe(second.id))
    provider.online = False
    went_down = time.monotonic()
    waiting = await next_waiting(events, NOTICE_S)
    assert time.monotonic() - went_down < NOTICE_S and waiting.waiting == "p1 is offline"
    running.release.set()
    await within(running.done.wait())
    assert (await manager.get(first.id, None)).state.value in ("RUNNING", "SUCCEEDED")


async def test_get_job_and_watch_job_name_the_agents_that_are_down(tmp_path: Path) -> None:
    async with comfy_service(tmp_path, agents=1, agent_probe_interval_s=0.5) as (service, agents):
        await agents[0].kill()
        manager = service.manager
        assert manager is not None
        async with asyncio.timeout(
            10
        ):  # the pool's probe notices (a running job: test_agent_faults.py)
            while manager.can_serve(TaskKind.IMAGE_TO_IMAGE):
                await asyncio.sleep(0.05)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            params = tasks_pb2.ImageToImageParams(
                positive_prompt="a lighthouse",
                steps=2,
                options=common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_ASYNC),
            )
            png = encode(quadrant_image(32, 32), "PNG")
            got = await generate(channel, "ImageToImage", params, {"image": png})
            name = got.events[0].job
            stub = job_service_pb2_grpc.JobServiceStub(channel)
            watch = stub.WatchJob(jpb.WatchJobRequest(name=name), timeout=30)
            reason = ""
            async with asyncio.timeout(NOTICE_S):
                async for reply in watch:
                    event = reply.event
                    if event.WhichOneof("kind") == "progress" and event.progress.waiting_reason:
                        assert event.progress.stage == job_pb2.JobProgress.STAGE_QUEUED
                        reason = event.progress.waiting_reason
                        break
            watch.cancel()
            assert "gpu-0" in reason and "offline" in reason, reason
            job = (await stub.GetJob(jpb.GetJobRequest(name=name))).job
            assert job.state == job_pb2.Job.STATE_QUEUED and job.waiting_reason == reason

            await agents[0].restart()  # back: the job runs and the hint goes
            async with asyncio.timeout(30):
                while job.state != job_pb2.Job.STATE_SUCCEEDED:
                    await asyncio.sleep(0.1)
                    job = (await stub.GetJob(jpb.GetJobRequest(name=name))).job
            assert job.waiting_reason == ""
