"""Fixtures for the artifact store and variants: a real store on tmp_path, a settable clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from aiserver.artifacts.store import ArtifactStore
from tests.artifacts.helpers import Clock, Coordinators
from tests.storage.backends import ArtifactSchema, shared_artifact_store


@pytest.fixture(scope="session")
def artifact_schema() -> Iterator[ArtifactSchema]:
    schema = ArtifactSchema()
    yield schema
    asyncio.run(schema.drop())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=["local", "postgres+s3"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock
) -> AsyncIterator[ArtifactStore]:
    """The store on each backend: SQLite index + folder, PostgreSQL index + S3 bucket."""
    if request.param == "local":
        s = ArtifactStore(tmp_path / "store", clock=clock)
        try:
            yield s
        finally:
            await s.close()
        return
    shared = await shared_artifact_store(
        tmp_path / "store",
        request.getfixturevalue("s3_server"),
        request.getfixturevalue("artifact_schema"),
        clock,
    )
    try:
        yield shared
    finally:
        await shared.close()


@pytest.fixture
async def local_store(tmp_path: Path, clock: Clock) -> AsyncIterator[ArtifactStore]:
    """The embedded default, for tests of its on-disk layout and path safety."""
    s = ArtifactStore(tmp_path / "store", clock=clock)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=["sqlite+folder", "sqlite+s3", "postgres+folder", "postgres+s3"])
async def coordinators(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Coordinators]:
    """Stores sharing one index and one blob store, on every pair of backends."""
    kind = str(request.param)
    s3 = request.getfixturevalue("s3_server") if kind.endswith("s3") else None
    schema = None
    if kind.startswith("postgres"):
        schema = await request.getfixturevalue("artifact_schema").fresh()
    shared = Coordinators(kind, tmp_path / "store", s3, schema)
    try:
        yield shared
    finally:
        await shared.close()
