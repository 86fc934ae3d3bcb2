"""Fixtures of the client tests: a generative service and an AsyncClient to the plain one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aiserver.client import AsyncClient
from aiserver.server import Service
from tests.client.support import GenServer, generative_service


@pytest.fixture
async def gen(tmp_path: Path) -> AsyncIterator[GenServer]:
    async with generative_service(tmp_path) as server:
        yield server


@pytest.fixture
async def client(service: Service) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(f"127.0.0.1:{service.grpc_port}", timeout=30) as c:
        yield c


@pytest.fixture
async def gen_client(gen: GenServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(gen.target, timeout=60) as c:
        yield c
