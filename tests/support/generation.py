"""Helpers for generative calls: a service wired to ComfyUI stand-ins, event collection."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from imagetasks.v1 import common_pb2, generation_service_pb2_grpc, workflow_service_pb2_grpc
from imagetasks.v1 import generation_service_pb2 as gpb
from imagetasks.v1 import workflow_service_pb2 as wpb

from aiserver.config import AgentSettings
from aiserver.server import Service
from tests.conftest import make_settings
from tests.support.comfy_standin import ComfyStandIn
from tests.support.grpc_helpers import send_all, upload_messages

REQUEST_TYPES = {
    "ImageToImage": gpb.ImageToImageRequest,
    "ImageWithMask": gpb.ImageWithMaskRequest,
    "ImageUpscale": gpb.ImageUpscaleRequest,
    "ImageToText": gpb.ImageToTextRequest,
}


@dataclass
class Collected:
    """Everything a generative call streamed back."""

    events: list[Any] = field(default_factory=list)
    outputs: dict[int, bytearray] = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return [e.WhichOneof("kind") for e in self.events]

    def of(self, kind: str) -> list[Any]:
        return [getattr(e, kind) for e in self.events if e.WhichOneof("kind") == kind]

    @property
    def final(self) -> Any:
        return self.of("finished")[-1].job

    def output_bytes(self, index: int = 0) -> bytes:
        return bytes(self.outputs[index])


async def generate(
    channel: grpc.aio.Channel,
    task: str,
    params: Any,
    files: dict[str, bytes],
    *,
    timeout: float | None = 60,
    metadata: Sequence[tuple[str, str]] = (),
) -> Collected:
    stub = generation_service_pb2_grpc.GenerationServiceStub(channel)
    call = getattr(stub, task)(timeout=timeout, metadata=metadata)
    await send_all(call, upload_messages(REQUEST_TYPES[task], params, files))
    return await collect(call)


async def run_workflow(
    channel: grpc.aio.Channel,
    name: str,
    parameters: dict[str, Any],
    files: dict[str, bytes],
    *,
    options: common_pb2.JobOptions | None = None,
    timeout: float | None = 60,
) -> Collected:
    """WorkflowService.RunWorkflow, collected like :func:`generate`."""
    params = wpb.RunWorkflowParams(workflow=name, options=options)
    params.parameters.update(parameters)
    call = workflow_service_pb2_grpc.WorkflowServiceStub(channel).RunWorkflow(timeout=timeout)
    await send_all(call, upload_messages(wpb.RunWorkflowRequest, params, files))
    return await collect(call)


async def collect(call: Any) -> Collected:
    """Every event of a JobEvent response stream, output bytes reassembled."""
    got = Collected()
    async for resp in call:
        event = resp.event
        if event.WhichOneof("kind") == "output_chunk":
            chunk = event.output_chunk
            buf = got.outputs.setdefault(chunk.index, bytearray())
            assert chunk.offset == len(buf), "chunks arrive in order"
            buf += chunk.data
        got.events.append(event)
    return got


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@asynccontextmanager
async def comfy_service(
    tmp_path: Path,
    agents: int = 1,
    step_delay_s: float = 0.001,
    queue_ahead: int = 1,
    **overrides: Any,
) -> AsyncIterator[tuple[Service, list[ComfyStandIn]]]:
    """A service whose ComfyUI agents are stand-ins on loopback (``queue_ahead`` each: jobs
    sent to wait in the agent's own queue beyond the one it runs)."""
    stand_ins = [
        ComfyStandIn(tmp_path / f"comfy{i}", step_delay_s=step_delay_s) for i in range(agents)
    ]
    for s in stand_ins:
        await s.start()
    settings = make_settings(
        tmp_path,
        agents=tuple(
            AgentSettings(url=s.url, name=f"gpu-{i}", priority=agents - i, queue_ahead=queue_ahead)
            for i, s in enumerate(stand_ins)
        ),
        **overrides,
    )
    service = Service(settings)
    try:
        await service.start()
        yield service, stand_ins
    finally:
        await service.stop(grace_s=1)
        for s in stand_ins:
            await s.close()
