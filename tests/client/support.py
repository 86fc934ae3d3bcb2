"""Servers for the client tests: a Service that runs generative jobs on the ComfyUI
stand-ins, and the HTTP gateway when it is importable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiserver.server import Service
from tests.support.generation import comfy_service

INJECTED_FAILURE = "injected failure"
_KSAMPLER = "7"  # the KSampler node of the ImageToImage workflow


@dataclass
class GenServer:
    """A running Service whose generative tasks run on a ComfyUI stand-in."""

    service: Service
    hang_image_to_image: Callable[[], None]
    """From now on, ImageToImage jobs never finish (until cancelled)."""
    fail_image_to_image: Callable[[], None]
    """From now on, ImageToImage jobs fail: their KSampler raises ``INJECTED_FAILURE``."""

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.service.grpc_port}"


@asynccontextmanager
async def generative_service(tmp_path: Path) -> AsyncIterator[GenServer]:
    async with comfy_service(tmp_path) as (service, stand_ins):
        comfy = stand_ins[0]
        yield GenServer(
            service,
            lambda: comfy.hang_at(_KSAMPLER),
            lambda: comfy.fail_node(_KSAMPLER, "RuntimeError", INJECTED_FAILURE),
        )


@asynccontextmanager
async def gateway_for(service: Service) -> AsyncIterator[int]:
    """The HTTP gateway in front of ``service``; yields its port."""
    from aiserver.gateway import Gateway

    gateway = Gateway(f"127.0.0.1:{service.grpc_port}", port=0)
    port = await gateway.start()
    try:
        yield port
    finally:
        await gateway.stop()
