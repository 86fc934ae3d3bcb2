"""AgentService.WatchAgents: the providers now, then once per change; admin keys only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from imagetasks.v1 import agent_service_pb2 as agpb
from imagetasks.v1 import agent_service_pb2_grpc

from aiserver.server import Service
from tests.conftest import make_settings
from tests.support.comfy_standin import ComfyStandIn

ADMIN = "ops-key-0123456789abcdef"
USER = "alice-key-0123456789abcdef"


@pytest.fixture
async def farm(tmp_path: Path) -> AsyncIterator[tuple[Service, ComfyStandIn]]:
    async with ComfyStandIn(tmp_path / "gpu") as gpu:
        settings = make_settings(
            tmp_path,
            agents=json.dumps([{"name": "gpu-1", "url": gpu.url}]),
            agent_probe_interval_s="0.2",
            api_keys=f"ops:{ADMIN}:admin,alice:{USER}",
            local_upscale="fallback",  # listed as the second provider
        )
        service = Service(settings)
        await service.start()
        try:
            yield service, gpu
        finally:
            await service.stop(grace_s=1)


def states(reply: agpb.WatchAgentsResponse) -> dict[str, int]:
    return {a.name: a.state for a in reply.agents}


async def test_watch_sends_the_agents_then_their_change_when_one_dies(
    farm: tuple[Service, ComfyStandIn],
) -> None:
    service, gpu = farm
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        stub = agent_service_pb2_grpc.AgentServiceStub(ch)
        call = stub.WatchAgents(
            agpb.WatchAgentsRequest(), metadata=[("authorization", f"Bearer {ADMIN}")], timeout=30
        )
        first = await call.read()
        assert states(first)["gpu-1"] == agpb.Agent.STATE_ONLINE
        assert {a.kind for a in first.agents} == {agpb.Agent.KIND_COMFYUI, agpb.Agent.KIND_LOCAL}
        await gpu.kill()
        while True:
            reply = await call.read()
            assert reply is not grpc.aio.EOF
            if states(reply)["gpu-1"] == agpb.Agent.STATE_OFFLINE:
                break
        gpu_1 = next(a for a in reply.agents if a.name == "gpu-1")
        assert gpu_1.last_error
        call.cancel()


async def test_watch_is_for_admin_keys_and_served_by_the_shim_as_sse(
    farm: tuple[Service, ComfyStandIn],
) -> None:
    service, _ = farm
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        stub = agent_service_pb2_grpc.AgentServiceStub(ch)
        call = stub.WatchAgents(
            agpb.WatchAgentsRequest(), metadata=[("authorization", f"Bearer {USER}")]
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call.read()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    url = f"http://127.0.0.1:{service.http_port}/v1/agents:watch"
    sse = {"Accept": "text/event-stream"}
    async with httpx.AsyncClient(timeout=10) as http:
        refused = await http.get(url, headers={**sse, "Authorization": f"Bearer {USER}"})
        assert refused.status_code == 403
        headers = {**sse, "Authorization": f"Bearer {ADMIN}"}
        async with http.stream("GET", url, headers=headers) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    agents = json.loads(line[5:])["agents"]
                    assert {a["name"] for a in agents} >= {"gpu-1"}
                    break


async def test_an_open_watch_does_not_hold_up_the_shims_shutdown(
    farm: tuple[Service, ComfyStandIn],
) -> None:
    service, _ = farm
    url = f"http://127.0.0.1:{service.http_port}/v1/agents:watch"
    headers = {"Accept": "text/event-stream", "Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("GET", url, headers=headers) as resp:
            assert resp.status_code == 200
            assert service.gateway is not None
            loop = asyncio.get_running_loop()
            start = loop.time()
            await service.gateway.stop()  # grace: the default 10 s
            assert loop.time() - start < 5
