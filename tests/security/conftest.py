"""Shared by the security tests: API keys, keyed services, hostile-input helpers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from imagetasks.v1 import common_pb2, tasks_pb2

from aiserver.server import Service
from tests.support.comfy_standin import ComfyStandIn
from tests.support.generation import comfy_service, generate
from tests.support.images import encode, quadrant_image

KEYS = {
    "alice": "alice-key-0123456789",
    "bob": "bob-key-0123456789abcd",
    "ops": "ops-admin-key-0123456789",
}
API_KEYS = f"alice:{KEYS['alice']},bob:{KEYS['bob']},ops:{KEYS['ops']}:admin"
PNG = encode(quadrant_image(32, 24), "PNG")
ASYNC = common_pb2.JobOptions(mode=common_pb2.RESPONSE_MODE_ASYNC)


def bearer(who: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying ``who``'s key."""
    return (("authorization", f"Bearer {KEYS[who]}"),)


def auth(who: str) -> dict[str, str]:
    """HTTP headers carrying ``who``'s key."""
    return {"Authorization": f"Bearer {KEYS[who]}"}


def channel_to(service: Service) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")


def http_base(service: Service) -> str:
    return f"http://127.0.0.1:{service.http_port}"


@asynccontextmanager
async def keyed_service(
    tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[Service, list[ComfyStandIn]]]:
    """A service with ComfyUI stand-ins and three keys: alice, bob and ops (admin)."""
    async with comfy_service(tmp_path, **{"api_keys": API_KEYS, **overrides}) as pair:
        yield pair


async def upscale(ch: grpc.aio.Channel, who: str | None, **kw: Any) -> Any:
    """One finished ImageUpscale job of ``who`` (None: no key)."""
    params = tasks_pb2.ImageUpscaleParams(**kw)
    metadata = bearer(who) if who else ()
    return await generate(ch, "ImageUpscale", params, {"image": PNG}, metadata=metadata)
