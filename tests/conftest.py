"""Shared fixtures: a real service on 127.0.0.1:0 and real channels to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from aiserver.config import load_settings
from aiserver.server import Service
from tests.storage.backends import SHARED_BACKENDS, S3Server


def make_settings(tmp_path: Path, **overrides: Any) -> Any:
    base: dict[str, Any] = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "data_dir": tmp_path / "data",
        # Loading the CPU upscaler's model costs every service start ~0.2 s: the tests that
        # are about it turn it on (tests/api/test_local_upscale.py).
        "local_upscale": "off",
    }
    if SHARED_BACKENDS is not None:
        base.update(SHARED_BACKENDS.overrides())
    base.update(overrides)
    return load_settings(env={}, overrides=base)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3-protocol server (moto) on 127.0.0.1, for the tests that ask for one."""
    server = S3Server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session", autouse=True)
def _shared_backends() -> Iterator[None]:
    """Drops the schemas (and stops the S3 server) of a PostgreSQL + S3 run."""
    yield
    if SHARED_BACKENDS is not None:
        asyncio.run(SHARED_BACKENDS.close())


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module to change the service's settings."""
    return {}


@pytest.fixture
async def service(tmp_path: Path, settings_overrides: dict[str, Any]) -> AsyncIterator[Service]:
    svc = Service(make_settings(tmp_path, **settings_overrides))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop(grace_s=1)


@pytest.fixture
async def channel(service: Service) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}") as ch:
        yield ch
