"""The providers a configuration asks for."""

from __future__ import annotations

from aiserver.config import Settings
from aiserver.imaging import ImageLimits
from aiserver.providers.base import Provider
from aiserver.providers.comfy import AgentConfig, ComfyPool, PoolSettings, WorkflowCatalog
from aiserver.workers import BlockingPool

__all__ = ["build_providers"]


def build_providers(settings: Settings, pool: BlockingPool, limits: ImageLimits) -> list[Provider]:
    """The ComfyUI agent pool, when agents are configured."""
    providers: list[Provider] = []
    if settings.agents:
        catalog = WorkflowCatalog.load(user_dir=settings.workflows_dir)
        agents = [AgentConfig.from_settings(a) for a in settings.agents]
        pool_settings = PoolSettings(probe_interval_s=settings.agent_probe_interval_s)
        providers.append(ComfyPool(agents, catalog, settings=pool_settings))
    return providers
