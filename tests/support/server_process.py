"""``aiserver serve`` as a child process: its ports, its log lines, its memory, its signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["ServerProcess"]

_LISTENING = re.compile(r"(gRPC|HTTP) listening on \S+:(\d+)")
REPO = Path(__file__).resolve().parents[2]


class ServerProcess:
    """Starts ``python -m aiserver serve`` on 127.0.0.1 with free ports and JSON logs.

    ``env`` adds ``AISERVER_*`` settings (the test's own ``AISERVER_*`` are not inherited);
    keep the log level at INFO or below: the bound ports are read from the log.
    Every stderr line is kept in :attr:`lines`; :meth:`logs` parses the JSON ones.
    """

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = env or {}
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.grpc_port = 0
        self.http_port = 0
        self._reader: asyncio.Task[None] | None = None
        self._ports = asyncio.Event()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout_s: float = 60) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AISERVER_")}
        env.update(
            {
                "AISERVER_LOG_JSON": "true",
                "AISERVER_LOCAL_UPSCALE": "off",
                "PYTHONPATH": os.pathsep.join(
                    p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
                ),
            }
        )
        env.update(self.env)
        self.lines.clear()
        self._ports.clear()
        self.grpc_port = self.http_port = 0
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiserver",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "0",
            "--data-dir",
            str(self.data_dir),
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(REPO),
        )
        self._reader = asyncio.create_task(self._read(self.proc))
        http = env.get("AISERVER_HTTP_ENABLED", "true").lower() not in ("0", "false", "no", "off")
        try:
            async with asyncio.timeout(timeout_s):
                while not (self.grpc_port and (self.http_port or not http)):
                    if self.proc.returncode is not None:
                        raise RuntimeError("server exited:\n" + "\n".join(self.lines[-30:]))
                    self._ports.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await self._ports.wait()
        except BaseException:
            await self.kill()
            raise
        return self

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(text)
            m = _LISTENING.search(text)
            if m:
                if m.group(1) == "gRPC":
                    self.grpc_port = int(m.group(2))
                else:
                    self.http_port = int(m.group(2))
                self._ports.set()

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log entries so far (other stderr lines are skipped)."""
        out = []
        for line in self.lines:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    out.append(entry)
        return out

    def rss_kib(self) -> int:
        """Resident set size, from ``/proc``."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60) -> int:
        """Send ``sig`` and wait for the exit code (killed when it takes too long)."""
        proc = self.proc
        assert proc is not None
        if proc.returncode is None:
            proc.send_signal(sig)
        try:
            async with asyncio.timeout(timeout_s):
                code = await proc.wait()
        except TimeoutError:
            await self.kill()
            raise
        if self._reader is not None:
            await self._reader
        return code

    async def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await self._reader

    async def __aenter__(self) -> ServerProcess:
        return await self.start()

    async def close(self) -> None:
        """Stop it gracefully if it runs (killed when that fails or takes over 30 s)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.stop(timeout_s=30)
        await self.kill()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
