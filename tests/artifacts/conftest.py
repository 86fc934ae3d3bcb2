"""Fixtures for the artifact store and variants: a real store on tmp_path, a settable clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiserver.artifacts.store import ArtifactStore
from tests.artifacts.helpers import Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[ArtifactStore]:
    s = ArtifactStore(tmp_path / "store", clock=clock)
    try:
        yield s
    finally:
        await s.close()
