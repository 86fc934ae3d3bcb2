"""Fixtures: real ComfyUI stand-ins on 127.0.0.1:0, clients and pools pointed at them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from aiserver.providers.comfy.workflows import WorkflowCatalog
from tests.comfy.helpers import DirectAgent
from tests.support.comfy_standin import ComfyStandIn

StandInFactory = Callable[..., Awaitable[ComfyStandIn]]


@pytest.fixture
async def make_standin(tmp_path: Path) -> AsyncIterator[StandInFactory]:
    started: list[ComfyStandIn] = []

    async def make(**options: Any) -> ComfyStandIn:
        standin = ComfyStandIn(tmp_path / f"agent{len(started)}", **options)
        await standin.start()
        started.append(standin)
        return standin

    yield make
    for standin in started:
        await standin.close()


@pytest.fixture
async def standin(make_standin: StandInFactory) -> ComfyStandIn:
    return await make_standin()


@pytest.fixture(scope="session")
def catalog() -> WorkflowCatalog:
    return WorkflowCatalog.load()


@pytest.fixture
async def client(standin: ComfyStandIn) -> AsyncIterator[DirectAgent]:
    c = DirectAgent("agent-a", standin.url)
    yield c
    await c.aclose()


@pytest.fixture
def inputs_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "inputs"
    folder.mkdir()
    return folder


Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """create_task whose leftovers are cancelled and awaited when the test ends, failed or not.

    Request it last, so that it is torn down before the stand-ins and pools it uses.
    """
    made: list[asyncio.Task[None]] = []

    def start(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        made.append(task)
        return task

    yield start
    for task in made:
        task.cancel()
    async with asyncio.timeout(10):
        await asyncio.gather(*made, return_exceptions=True)
