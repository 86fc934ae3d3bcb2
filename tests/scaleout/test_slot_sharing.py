"""Agent slots are shared through PostgreSQL by every ComfyUI pool, also one wrapped by a
routing rule (``local_upscale=always`` keeps upscales off the agents with ``Excluding``)."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import grpc
from imagetasks.v1 import tasks_pb2

from aiserver.config import AgentSettings
from aiserver.server import Service
from tests.conftest import make_settings
from tests.storage.backends import PG_URL
from tests.support.comfy_standin import ComfyStandIn
from tests.support.generation import generate
from tests.support.images import encode, quadrant_image

SUCCEEDED = 3


async def test_a_wrapped_pool_takes_its_agent_slots_from_the_database(tmp_path: Path) -> None:
    schema = f"t_{uuid.uuid4().hex[:16]}"
    comfy = ComfyStandIn(tmp_path / "comfy")
    await comfy.start()
    service = Service(
        make_settings(
            tmp_path,
            database_url=PG_URL,
            database_schema=schema,
            local_upscale="always",
            agents=(AgentSettings(url=comfy.url, name="gpu-0"),),
        )
    )
    try:
        await service.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as channel:
            params = tasks_pb2.ImageToImageParams(positive_prompt="a lighthouse", steps=2)
            got = await generate(
                channel, "ImageToImage", params, {"image": encode(quadrant_image(), "PNG")}
            )
            assert got.final.state == SUCCEEDED
        conn = await asyncpg.connect(PG_URL)
        try:
            agents = await conn.fetch(f"SELECT DISTINCT agent FROM {schema}.agent_slots")
        finally:
            await conn.close()
        assert [r["agent"] for r in agents] == ["gpu-0"]  # the run claimed its slot there
    finally:
        await service.stop(grace_s=1)
        await comfy.close()
        conn = await asyncpg.connect(PG_URL)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()
