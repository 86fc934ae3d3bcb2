"""JobService.WatchJobs: the caller's jobs as they change, through gRPC and the shim's SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from imagetasks.v1 import common_pb2, job_pb2, job_service_pb2_grpc
from imagetasks.v1 import job_service_pb2 as jpb

from aiserver.server import Service
from tests.conftest import make_settings
from tests.support.comfy_standin import ComfyStandIn
from tests.support.images import encode, quadrant_image

KEYS = {"ops": "ops-key-0123456789abcdef", "alice": "alice-key-0123456789abcdef"}
KEYS["bob"] = "bob-key-0123456789abcdef"


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    async with ComfyStandIn(tmp_path / "gpu", step_delay_s=0.02) as gpu:
        keys = f"ops:{KEYS['ops']}:admin,alice:{KEYS['alice']},bob:{KEYS['bob']}"
        settings = make_settings(tmp_path, agents=gpu.url, api_keys=keys)
        svc = Service(settings)
        await svc.start()
        try:
            yield svc
        finally:
            await svc.stop(grace_s=1)


async def queue(service: Service, who: str, task: str, **fields: str) -> str:
    files = {"image": ("photo.png", encode(quadrant_image(64, 48), "png"), "image/png")}
    async with httpx.AsyncClient(timeout=30) as http:
        resp = await http.post(
            f"http://127.0.0.1:{service.http_port}/api/{task}",
            data=fields,
            files=files,
            headers={"Authorization": f"Bearer {KEYS[who]}"},
        )
    assert resp.status_code == 200, resp.text
    return "jobs/" + resp.json()["jobId"]


def watch(ch: grpc.aio.Channel, who: str, **request: object) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
    stub = job_service_pb2_grpc.JobServiceStub(ch)
    return stub.WatchJobs(
        jpb.WatchJobsRequest(**request),  # type: ignore[arg-type]
        metadata=[("authorization", f"Bearer {KEYS[who]}")],
        timeout=30,
    )


async def until_finished(call: grpc.aio.UnaryStreamCall, name: str) -> list[jpb.WatchJobsResponse]:  # type: ignore[type-arg]
    seen = []
    while True:
        reply = await call.read()
        assert reply is not grpc.aio.EOF
        seen.append(reply)
        if reply.job.name == name and reply.job.state == job_pb2.Job.STATE_SUCCEEDED:
            return seen


async def test_each_caller_sees_its_own_jobs_change_and_an_admin_sees_all(
    service: Service,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        alice = watch(ch, "alice")
        admin = watch(ch, "ops", all_owners=True)
        captions = watch(ch, "ops", all_owners=True, task=common_pb2.TASK_IMAGE_TO_TEXT)
        await asyncio.sleep(0.2)  # the watches are registered before the jobs exist
        bobs = await queue(service, "bob", "ImageUpscale")
        mine = await queue(service, "alice", "ImageToImage", PositivePrompt="a boat", Tag="t1")

        seen = await until_finished(alice, mine)
        assert {r.job.name for r in seen} == {mine}  # never bob's
        states = [r.job.state for r in seen]
        assert states[0] == job_pb2.Job.STATE_QUEUED
        assert job_pb2.Job.STATE_RUNNING in states
        progress = [r.progress for r in seen if r.HasField("progress")]
        assert any(p.node_type == "KSampler" and p.max_steps for p in progress)
        assert seen[-1].job.tag == "t1" and seen[-1].job.owner == "alice"

        everything = await until_finished(admin, mine)
        assert {r.job.name for r in everything} >= {bobs, mine}

        with pytest.raises(TimeoutError):  # no ImageToText job: nothing for that filter
            async with asyncio.timeout(0.5):
                await captions.read()
        for call in (alice, admin, captions):
            call.cancel()


async def test_all_owners_needs_an_admin_and_the_shim_streams_sse(service: Service) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await watch(ch, "alice", all_owners=True).read()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED

    url = f"http://127.0.0.1:{service.http_port}/v1/jobs:watch"
    headers = {"Accept": "text/event-stream", "Authorization": f"Bearer {KEYS['alice']}"}

    async def queue_soon() -> str:
        await asyncio.sleep(0.3)  # the shim answers with its first change: make one
        return await queue(service, "alice", "ImageUpscale")

    job = asyncio.create_task(queue_soon())
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("GET", url, headers=headers) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    change = json.loads(line[5:])
                    assert change["job"]["name"] == await job
                    assert change["job"]["owner"] == "alice"
                    break
