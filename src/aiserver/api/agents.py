"""AgentService: the providers that run jobs, as operators see them."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from google.protobuf import timestamp_pb2
from imagetasks.v1 import agent_service_pb2 as agpb
from imagetasks.v1 import agent_service_pb2_grpc

from aiserver.api.calls import is_admin
from aiserver.api.convert import task_to_proto
from aiserver.api.status import rpc
from aiserver.errors import ErrorKind, ServiceError
from aiserver.jobs.scheduler import default_spec
from aiserver.providers.base import Provider
from aiserver.providers.comfy.pool import AgentSnapshot, AgentState, ComfyPool
from aiserver.providers.fallback import unwrap
from aiserver.tasks import TaskKind

__all__ = ["AgentServicer"]

# The local provider announces no changes of its load: it is looked at again this often.
_REFRESH_S = 2.0

_STATES = {
    AgentState.STARTING: agpb.Agent.STATE_STARTING,
    AgentState.ONLINE: agpb.Agent.STATE_ONLINE,
    AgentState.OFFLINE: agpb.Agent.STATE_OFFLINE,
    AgentState.DISABLED: agpb.Agent.STATE_DISABLED,
}


class AgentServicer(agent_service_pb2_grpc.AgentServiceServicer):
    def __init__(
        self,
        providers: Sequence[Provider],
    ) -> None:
        self._providers = providers

    @rpc
    async def ListAgents(
        self, request: agpb.ListAgentsRequest, context: Any
    ) -> agpb.ListAgentsResponse:
        _check_admin()
        return agpb.ListAgentsResponse(agents=self._agents())

    @rpc
    async def WatchAgents(
        self, request: agpb.WatchAgentsRequest, context: Any
    ) -> AsyncIterator[agpb.WatchAgentsResponse]:
        _check_admin()
        pools = [p for p in map(unwrap, self._providers) if isinstance(p, ComfyPool)]
        last: list[agpb.Agent] | None = None
        while True:
            agents = self._agents()
            if agents != last:
                last = agents
                yield agpb.WatchAgentsResponse(agents=agents)
            await _next_change(pools)

    def _agents(self) -> list[agpb.Agent]:
        agents: list[agpb.Agent] = []
        for provider in map(unwrap, self._providers):
            if isinstance(provider, ComfyPool):
                agents.extend(_comfy_agent(s) for s in provider.snapshot())
            else:
                agents.append(_in_process(provider))
        return agents


def _check_admin() -> None:
    if not is_admin():
        raise ServiceError(ErrorKind.PERMISSION_DENIED, "ADMIN_ONLY", "needs an admin key")


async def _next_change(pools: Sequence[ComfyPool]) -> None:
    """Until a pool changes, or ``_REFRESH_S`` has passed."""
    waits = [asyncio.ensure_future(pool.changed()) for pool in pools]
    try:
        if waits:
            await asyncio.wait(waits, timeout=_REFRESH_S, return_when=asyncio.FIRST_COMPLETED)
        else:
            await asyncio.sleep(_REFRESH_S)
    finally:
        for wait in waits:
            wait.cancel()
        for wait in waits:
            with contextlib.suppress(asyncio.CancelledError):
                await wait


def _comfy_agent(snap: AgentSnapshot) -> agpb.Agent:
    agent = agpb.Agent(
        name=snap.name,
        kind=agpb.Agent.KIND_COMFYUI,
        url=snap.url,
        state=_STATES[snap.state],
        priority=snap.priority,
        max_concurrent_jobs=snap.max_concurrent_jobs,
        running_jobs=snap.running_jobs,
        tasks=[task_to_proto(t) for t in snap.tasks],
        models=[f"{folder}/{name}" for folder, names in snap.models.items() for name in names],
        last_error=snap.last_error
        or "; ".join(f"{t.value}: {why}" for t, why in snap.unavailable.items()),
    )
    if snap.last_seen is not None:
        seen = timestamp_pb2.Timestamp()
        seen.FromDatetime(snap.last_seen)
        agent.last_seen_time.CopyFrom(seen)
    return agent


def _in_process(provider: Provider) -> agpb.Agent:
    tasks = [t for t in TaskKind if provider.supports(t)]
    ready = any(provider.can_run(t, default_spec(t)) for t in tasks)
    return agpb.Agent(
        name=provider.name,
        kind=agpb.Agent.KIND_LOCAL,
        state=agpb.Agent.STATE_ONLINE if ready else agpb.Agent.STATE_OFFLINE,
        running_jobs=provider.load(),
        tasks=[task_to_proto(t) for t in tasks],
    )
