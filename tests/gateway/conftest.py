"""Gateways on 127.0.0.1:0: one in front of the real Service, one in front of a fake backend."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from aiserver.gateway import Gateway, GatewaySettings
from aiserver.server import Service
from tests.gateway.fake_backend import FakeBackend

CURL = "/usr/bin/curl"


@pytest.fixture
def gateway_overrides() -> dict[str, Any]:
    """Override in a test module (or parametrize) to change the gateway's settings."""
    return {}


@pytest.fixture
async def gateway(
    service: Service, gateway_overrides: dict[str, Any], tmp_path: Path
) -> AsyncIterator[Gateway]:
    """The gateway in front of the real service (``tests/conftest.py``'s ``service``)."""
    settings = GatewaySettings.from_settings(
        service.settings, **{"spool_dir": tmp_path, **gateway_overrides}
    )
    gw = Gateway(f"127.0.0.1:{service.grpc_port}", host="127.0.0.1", port=0, settings=settings)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        yield client


@pytest.fixture
async def fake() -> AsyncIterator[FakeBackend]:
    backend = FakeBackend()
    await backend.start()
    try:
        yield backend
    finally:
        await backend.stop()


@pytest.fixture
async def fake_gateway(
    fake: FakeBackend, gateway_overrides: dict[str, Any]
) -> AsyncIterator[Gateway]:
    settings = GatewaySettings(**{"keepalive_s": 5.0, **gateway_overrides})
    gw = Gateway(f"127.0.0.1:{fake.port}", host="127.0.0.1", port=0, settings=settings)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop()


@pytest.fixture
async def fake_http(fake_gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake_gateway.url, timeout=30) as client:
        yield client


@dataclass
class CurlResult:
    status: int
    content_type: str
    body: bytes
    headers: str


async def curl(url: str, *args: str, tmp_path: Path) -> CurlResult:
    """Run the real curl binary; returns status, Content-Type, body and raw headers."""
    body_file = tmp_path / "curl-body"
    header_file = tmp_path / "curl-headers"
    proc = await asyncio.create_subprocess_exec(
        CURL,
        "-sS",
        "-o",
        str(body_file),
        "-D",
        str(header_file),
        "-w",
        "%{http_code} %{content_type}",
        *args,
        url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    code, _, ctype = out.decode().partition(" ")
    return CurlResult(int(code), ctype, body_file.read_bytes(), header_file.read_text())
