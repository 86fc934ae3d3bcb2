"""Fixtures for the local provider's tests (real models: nothing is stubbed)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from aiserver.providers.local import LocalUpscaleProvider, LocalUpscaleSettings


@pytest.fixture
async def make_provider() -> AsyncIterator[Callable[..., LocalUpscaleProvider]]:
    made: list[LocalUpscaleProvider] = []

    def make(**settings: Any) -> LocalUpscaleProvider:
        provider = LocalUpscaleProvider(LocalUpscaleSettings(**settings))
        made.append(provider)
        return provider

    yield make
    for provider in made:
        await provider.close()
