"""thumbor (PyPI ``thumbor``), the baseline of cold variants, kept out of the project's venv.

thumbor pins its own Pillow and friends, so it lives in ``bench/.venv-thumbor``, made on first
use with the machine's ``python3 -m venv`` and ``pip install thumbor==THUMBOR_VERSION``, and
runs as a subprocess on loopback: HTTP loader, no storage of originals, no result storage, so
every request fetches, decodes, resizes and encodes. A tiny static file server
(``python -m http.server``) serves the source image to it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import httpx

from bench import ROOT
from bench.common import free_port

THUMBOR_VERSION = "7.8.0"
VENV = ROOT / "bench" / ".venv-thumbor"

CONFIG = """
LOADER = 'thumbor.loaders.http_loader'
STORAGE = 'thumbor.storages.no_storage'
RESULT_STORAGE = None
QUALITY = 80
WEBP_QUALITY = 80
AUTO_WEBP = False
RESPECT_ORIENTATION = True
ALLOW_UNSAFE_URL = True
MAX_AGE = 0
"""


def thumbor_bin() -> Path:
    return VENV / "bin" / "thumbor"


def ensure_thumbor(log: list[str]) -> Path | None:
    """The thumbor executable, installing it first if needed; None (with a note) on failure."""
    exe = thumbor_bin()
    if exe.exists():
        return exe
    python = shutil.which("python3") or sys.executable
    log.append(f"creating {VENV.relative_to(ROOT)} with {python} and thumbor=={THUMBOR_VERSION}")
    try:
        subprocess.run([python, "-m", "venv", str(VENV)], check=True, capture_output=True)
        subprocess.run(
            [str(VENV / "bin" / "pip"), "install", "-q", f"thumbor=={THUMBOR_VERSION}"],
            check=True,
            capture_output=True,
            timeout=900,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.append(f"thumbor could not be installed: {exc}")
        return None
    return exe if exe.exists() else None


async def _wait_http(url: str, within: float = 30.0) -> None:
    async with httpx.AsyncClient(timeout=2) as client:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            try:
                await client.get(url)
                return
            except httpx.TransportError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.1)


class Thumbor:
    """thumbor and a file server for ``folder``, both on loopback."""

    def __init__(self, exe: Path, folder: Path, workdir: Path) -> None:
        self.exe = exe
        self.folder = folder
        self.workdir = workdir
        self.port = free_port()
        self.files_port = free_port()
        self._procs: list[asyncio.subprocess.Process] = []

    def url_for(self, file_name: str, path: str) -> str:
        """The thumbor URL of ``path`` (e.g. ``256x0/filters:format(webp)``) on ``file_name``."""
        source = quote(f"http://127.0.0.1:{self.files_port}/{file_name}", safe="")
        return f"http://127.0.0.1:{self.port}/unsafe/{path}/{source}"

    async def __aenter__(self) -> Thumbor:
        conf = self.workdir / "thumbor.conf"
        conf.write_text(CONFIG)
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        files = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            "--directory",
            str(self.folder),
            str(self.files_port),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self._procs.append(files)
        thumbor = await asyncio.create_subprocess_exec(
            str(self.exe),
            "--ip",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--conf",
            str(conf),
            "--log-level",
            "error",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=(self.workdir / "thumbor.log").open("wb"),
            env=env,
            cwd=str(self.workdir),
        )
        self._procs.append(thumbor)
        await _wait_http(f"http://127.0.0.1:{self.files_port}/")
        await _wait_http(f"http://127.0.0.1:{self.port}/healthcheck")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for proc in self._procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in self._procs:
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()
