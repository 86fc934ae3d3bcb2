"""ImageUpscale on the embedded CPU provider: routing, progress per tile, real 2x output."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import grpc
import pytest
from imagetasks.v1 import agent_service_pb2 as agpb
from imagetasks.v1 import agent_service_pb2_grpc, job_pb2, tasks_pb2
from PIL import Image

from aiserver.server import Service
from tests.conftest import make_settings
from tests.support.generation import comfy_service, generate
from tests.support.grpc_helpers import rich_status
from tests.support.images import encode, quadrant_image

ODD = encode(quadrant_image(67, 45), "PNG")


async def upscale(service: Service) -> object:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        return await generate(ch, "ImageUpscale", tasks_pb2.ImageUpscaleParams(), {"image": ODD})


async def test_embedded_defaults_upscale_on_the_cpu(tmp_path: Path) -> None:
    service = Service(make_settings(tmp_path, local_upscale="fallback", local_upscale_tile=32))
    await service.start()
    try:
        got = await upscale(service)
    finally:
        await service.stop(grace_s=1)
    final = got.final  # type: ignore[attr-defined]
    assert final.state == job_pb2.Job.STATE_SUCCEEDED and final.provider == "local"
    tiles = [p for p in got.of("progress") if p.node == "tile"]  # type: ignore[attr-defined]
    assert tiles and tiles[-1].step == tiles[-1].max_steps > 1
    (output,) = got.of("output")  # type: ignore[attr-defined]
    assert (output.artifact.width, output.artifact.height) == (134, 90)
    assert output.artifact.provider == "local"
    with Image.open(io.BytesIO(got.output_bytes())) as im:  # type: ignore[attr-defined]
        assert im.size == (134, 90)
        # A real model, not a blank: the quadrant colours survive the upscale.
        assert im.convert("RGB").getpixel((10, 10))[0] > 150


async def comfy_agent_state(service: Service) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        reply = await agent_service_pb2_grpc.AgentServiceStub(ch).ListAgents(
            agpb.ListAgentsRequest()
        )
    kinds = {a.kind for a in reply.agents}
    assert kinds == {agpb.Agent.KIND_COMFYUI, agpb.Agent.KIND_LOCAL}
    return next(a.state for a in reply.agents if a.kind == agpb.Agent.KIND_COMFYUI)


async def test_comfyui_first_then_local_when_no_agent_can_serve(tmp_path: Path) -> None:
    fast = {"agent_probe_interval_s": 0.2, "local_upscale": "fallback"}
    async with comfy_service(tmp_path, **fast) as (service, comfy):
        async with asyncio.timeout(20):
            while await comfy_agent_state(service) != agpb.Agent.STATE_ONLINE:
                await asyncio.sleep(0.05)
        first = await upscale(service)
        assert first.final.provider == "comfyui"  # type: ignore[attr-defined]
        await comfy[0].kill()
        async with asyncio.timeout(20):
            while await comfy_agent_state(service) == agpb.Agent.STATE_ONLINE:
                await asyncio.sleep(0.05)
        second = await upscale(service)
        assert second.final.provider == "local"  # type: ignore[attr-defined]


async def test_turned_off_and_no_agents_means_no_provider(tmp_path: Path) -> None:
    service = Service(make_settings(tmp_path, local_upscale="off"))
    await service.start()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await upscale(service)
    finally:
        await service.stop(grace_s=1)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rich_status(caught.value)[1]["ErrorInfo"].reason == "NO_PROVIDER"


async def test_always_mode_keeps_upscales_off_comfyui(tmp_path: Path) -> None:
    async with comfy_service(tmp_path, local_upscale="always") as (service, comfy):
        got = await upscale(service)
        assert got.final.provider == "local"  # type: ignore[attr-defined]
        assert comfy[0].received.prompts == []
