"""The ``aiserver`` console script run as a subprocess, as a user would run it."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
from pathlib import Path

import aiserver.cli

__all__ = ["COMMAND", "hooked", "run", "run_raw"]


def hooked() -> bool:
    """Whether ``aiserver.cli`` registers the client commands (``python -m aiserver``)."""
    return "add_client_commands" in Path(aiserver.cli.__file__).read_text()


# Until aiserver.cli calls add_client_commands, the same parser runs through its own module.
COMMAND = [sys.executable, "-m", "aiserver" if hooked() else "aiserver.cli_client"]


async def run_raw(
    line: str, *, cwd: Path, server: str = "", env: dict[str, str] | None = None
) -> tuple[int, bytes, str]:
    """``aiserver <line>`` (split like a shell would), with ``--server`` when given."""
    args = shlex.split(line) + (["--server", server] if server else [])
    base = {k: v for k, v in os.environ.items() if not k.startswith("AISERVER_")}
    proc = await asyncio.create_subprocess_exec(
        *COMMAND,
        *args,
        cwd=cwd,
        env={**base, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out, err.decode()


async def run(
    line: str, *, cwd: Path, server: str = "", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    code, out, err = await run_raw(line, cwd=cwd, server=server, env=env)
    return code, out.decode(), err
