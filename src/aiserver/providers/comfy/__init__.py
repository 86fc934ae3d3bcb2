"""ComfyUI provider: workflows (graph + binding per task), a client per agent, an agent pool."""

from aiserver.providers.comfy.client import ComfyClient, ComfyTimeouts
from aiserver.providers.comfy.pool import (
    AgentConfig,
    AgentSnapshot,
    AgentState,
    ComfyPool,
    PoolSettings,
)
from aiserver.providers.comfy.workflows import Workflow, WorkflowCatalog, WorkflowFormatError

__all__ = [
    "AgentConfig",
    "AgentSnapshot",
    "AgentState",
    "ComfyClient",
    "ComfyPool",
    "ComfyTimeouts",
    "PoolSettings",
    "Workflow",
    "WorkflowCatalog",
    "WorkflowFormatError",
]
