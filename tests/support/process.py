"""The service as a separate process (`python -m aiserver serve`), for crash and signal tests."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ServerProcess:
    proc: asyncio.subprocess.Process
    grpc_port: int
    http_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


async def start_server(data_dir: Path, env: Mapping[str, str] = {}) -> ServerProcess:
    """Start a server on free ports and wait until it listens."""
    full_env = {
        **os.environ,
        "AISERVER_DATA_DIR": str(data_dir),
        "AISERVER_GRPC_PORT": "0",
        "AISERVER_HTTP_PORT": "0",
        **env,
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiserver", "serve", env=full_env, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    ports: dict[str, int] = {}
    try:
        async with asyncio.timeout(30):
            while "HTTP" not in ports:
                line = (await proc.stderr.readline()).decode()
                assert line, "the server exited before listening"
                if m := re.search(r"(gRPC|HTTP) listening on [\d.]+:(\d+)", line):
                    ports[m.group(1)] = int(m.group(2))
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    # Keep reading its log so the pipe never fills up and blocks the server.
    asyncio.get_running_loop().create_task(_drain(proc.stderr))
    return ServerProcess(proc, ports["gRPC"], ports["HTTP"])


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


@asynccontextmanager
async def server_process(
    data_dir: Path,
    env: Mapping[str, str] = {},
) -> AsyncIterator[ServerProcess]:
    server = await start_server(data_dir, env)
    try:
        yield server
    finally:
        if server.proc.returncode is None:
            server.proc.kill()
            await server.proc.wait()
