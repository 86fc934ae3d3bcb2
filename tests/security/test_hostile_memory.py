"""Memory stays bounded: a server process takes every hostile batch, over gRPC and HTTP, a
few times over; its resident memory after a warm-up round and after the rest may differ by
little (decoder buffers, caches and thread pools are warm after the first round)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.security import hostile
from tests.security.conftest import API_KEYS, bearer
from tests.support.comfy_standin import ComfyStandIn
from tests.support.server_process import ServerProcess

ROUNDS = 3
MAX_GROWTH_KIB = 128 * 1024  # generous: the point is "not proportional to what was sent"


async def test_rss_is_bounded_across_hostile_batches(tmp_path: Path) -> None:
    key = bearer("alice")
    async with (
        ComfyStandIn(tmp_path / "comfy") as comfy,
        ServerProcess(
            tmp_path / "data",
            {
                "AISERVER_API_KEYS": API_KEYS,
                "AISERVER_AGENTS": comfy.url,
                "AISERVER_AGENT_PROBE_INTERVAL_S": "1",
            },
        ) as server,
        grpc.aio.insecure_channel(server.target) as ch,
        httpx.AsyncClient(base_url=server.http_url, timeout=60) as http,
    ):
        health = health_pb2_grpc.HealthStub(ch)
        generation = health_pb2.HealthCheckRequest(service="imagetasks.v1.GenerationService")
        async with asyncio.timeout(30):
            while (await health.Check(generation)).status != 1:
                await asyncio.sleep(0.1)
        start = server.rss_kib()
        await hostile.every_batch(ch, http, key)  # warm-up
        warm = server.rss_kib()
        for _ in range(ROUNDS):
            await hostile.every_batch(ch, http, key)
        end = server.rss_kib()
        print(
            f"\nRSS: start {start / 1024:.1f} MiB, after warm-up {warm / 1024:.1f} MiB, "
            f"after {ROUNDS} more rounds {end / 1024:.1f} MiB "
            f"(growth {(end - warm) / 1024:+.1f} MiB)"
        )
        assert end - warm < MAX_GROWTH_KIB, (start, warm, end)
        assert await server.stop() == 0
    errors = [e for e in server.logs() if e["level"] in ("ERROR", "CRITICAL")]
    assert not errors, errors[:3]
