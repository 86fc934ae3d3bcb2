from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.storage.backends import JobStoreBackend


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[JobStoreBackend]:
    found = JobStoreBackend(request.param, tmp_path)
    try:
        yield found
    finally:
        await found.close()
