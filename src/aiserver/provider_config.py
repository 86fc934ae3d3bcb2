"""The providers the app's configuration asks for, each handed its own settings.

It sits above :mod:`aiserver.providers` and :mod:`aiserver.config`: providers never read the
app's settings class.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiserver.config import Settings
from aiserver.imaging import ImageLimits
from aiserver.providers.base import Provider
from aiserver.providers.comfy.pool import ComfyPool
from aiserver.providers.comfy.settings import PoolSettings
from aiserver.providers.comfy.workflows import WorkflowCatalog
from aiserver.providers.fallback import Excluding, Fallback, unwrap
from aiserver.providers.local import LocalUpscaleProvider, LocalUpscaleSettings
from aiserver.tasks import TaskKind

__all__ = ["build_providers", "comfy_pools"]

LOCAL_MODES = ("fallback", "always", "off")


def build_providers(
    settings: Settings, limits: ImageLimits, catalog: WorkflowCatalog | None = None
) -> list[Provider]:
    """The ComfyUI agent pool (when agents are configured) and the embedded upscaler.

    ``catalog``: the workflows the pool runs (kept current by a watcher); loaded strictly
    from the settings when not given.
    """
    mode = settings.local_upscale
    if mode not in LOCAL_MODES:
        raise ValueError(f"setting local_upscale: {mode!r} is not one of {', '.join(LOCAL_MODES)}")
    comfy: list[Provider] = []
    if settings.agents:
        if catalog is None:
            catalog = WorkflowCatalog.load(user_dir=settings.workflows_dir)
        pool_settings = PoolSettings(
            probe_interval_s=settings.agent_probe_interval_s,
            probe_timeout_s=settings.agent_probe_timeout_s,
            catalogue_interval_s=settings.agent_catalogue_interval_s,
            outputs_over_websocket=settings.agent_outputs_over_websocket,
            reuse_input_names=settings.agent_reuse_input_names,
        )
        comfy.append(ComfyPool(settings.agents, catalog, settings=pool_settings))
    if mode == "off":
        return comfy
    local = LocalUpscaleProvider(
        LocalUpscaleSettings(
            model=settings.local_upscale_model,
            tile_size=settings.local_upscale_tile,
            max_concurrent_jobs=settings.local_upscale_jobs,
            threads=settings.local_upscale_threads,
        ),
        limits=limits,
    )
    if mode == "always":
        upscale = frozenset({TaskKind.IMAGE_UPSCALE})
        return [*(Excluding(p, upscale) for p in comfy), local]
    return [*comfy, Fallback(local, comfy)]


def comfy_pools(providers: Iterable[Provider]) -> list[ComfyPool]:
    """The ComfyUI pools among ``providers``, also when wrapped (Excluding, Fallback)."""
    return [p for p in map(unwrap, providers) if isinstance(p, ComfyPool)]
