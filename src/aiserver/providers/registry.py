"""The providers a configuration asks for."""

from __future__ import annotations

from aiserver.config import Settings
from aiserver.imaging import ImageLimits
from aiserver.providers.base import Provider
from aiserver.workers import BlockingPool

__all__ = ["build_providers"]


def build_providers(settings: Settings, pool: BlockingPool, limits: ImageLimits) -> list[Provider]:
    """ComfyUI agents when configured."""
    providers: list[Provider] = []
    return providers
