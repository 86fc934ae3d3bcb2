"""The service in its own process, as ``aiserver serve`` runs it, for figures that need the
server's CPU and memory apart from the caller's.

    AISERVER_...=... python -m bench.service_proc

Settings come from the environment exactly as for ``aiserver serve`` (logging too). The one
difference: when the provider registry builds no ComfyUI pool from ``AISERVER_AGENTS``, one is
added (:func:`bench.common.ensure_comfy_provider`). Prints one JSON line
``{"grpc_port", "http_port", "pid", "provider_wiring"}`` once serving, then stops when stdin
says ``quit`` (or closes). ``BENCH_PROFILE=FILE`` writes a cProfile dump of the server there.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.common import ensure_comfy_provider, quit_child


async def main() -> None:
    from aiserver import heap
    from aiserver.config import load_settings
    from aiserver.logs import configure_logging
    from aiserver.server import Service

    settings = load_settings()
    configure_logging(settings.log_level, json_lines=settings.log_json)
    service = Service(settings)
    wiring = ensure_comfy_provider(service)
    await service.start()
    heap.settle()  # as aiserver serve does after start-up
    print(
        json.dumps(
            {
                "grpc_port": service.grpc_port,
                "http_port": service.http_port,
                "pid": os.getpid(),
                "provider_wiring": wiring,
            }
        ),
        flush=True,
    )
    try:
        while (await asyncio.to_thread(sys.stdin.readline)).strip() not in ("", "quit"):
            pass
    finally:
        await service.stop(grace_s=1)


def service_env(
    data_dir: Path, agent_urls: list[str], *, http: bool = False, **extra: str
) -> dict[str, str]:
    """The environment of a bench service: gRPC on a free loopback port, its data in
    ``data_dir``, the agents at ``agent_urls`` (64 jobs each), the HTTP shim on a free port
    when ``http``; ``extra`` adds ``AISERVER_*`` variables."""
    env = {
        "AISERVER_GRPC_HOST": "127.0.0.1",
        "AISERVER_GRPC_PORT": "0",
        "AISERVER_HTTP_ENABLED": "true" if http else "false",
        "AISERVER_DATA_DIR": str(data_dir),
        "AISERVER_AGENTS": json.dumps(
            [
                {"url": url, "name": f"agent{i}", "max_concurrent_jobs": 64}
                for i, url in enumerate(agent_urls)
            ]
        ),
        **extra,
    }
    if http:
        env["AISERVER_HTTP_PORT"] = "0"
    return env


class ServiceProcess:
    """The parent's handle on a :mod:`bench.service_proc` subprocess, of the source tree
    ``root`` (this one by default; its ``src`` first on the path, e.g. an exported ``main``
    for :mod:`bench.cpu_compare`)."""

    def __init__(self, env: dict[str, str], log: Path, root: Path = ROOT) -> None:
        self.env = env
        self.log = log
        self.root = root
        self.info: dict[str, Any] = {}
        self._proc: asyncio.subprocess.Process | None = None
        self._log_fh: Any = None

    @property
    def pid(self) -> int:
        return int(self.info["pid"])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.info['grpc_port']}"

    async def __aenter__(self) -> ServiceProcess:
        self._log_fh = self.log.open("wb")
        first = (str(self.root / "src"), str(self.root), os.environ.get("PYTHONPATH", ""))
        path = os.pathsep.join(p for p in first if p)
        env = {**os.environ, **self.env, "PYTHONPATH": path}
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.service_proc",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log_fh,
            cwd=str(self.root),
            env=env,
        )
        assert self._proc.stdout is not None
        async with asyncio.timeout(60):
            line = await self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the service of {self.root} did not start; see {self.log}")
        self.info = json.loads(line)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await quit_child(self._proc, 20)
        if self._log_fh is not None:
            self._log_fh.close()


if __name__ == "__main__":
    if census := os.environ.get("BENCH_SQL_CENSUS"):  # statements sent, for bench.scaleout
        from bench.sql_census import install

        install(Path(census))
    if hops := os.environ.get("BENCH_HOP_CENSUS"):  # thread hops, commits, fsyncs per job
        from bench.hop_census import install as install_hops

        install_hops(Path(hops))
    if timeline := os.environ.get("BENCH_TIMELINE"):  # a job's steps, for bench.job_timeline
        from bench.job_timeline import install_service

        install_service(Path(timeline))
    if samples := os.environ.get("BENCH_CPU_SAMPLES"):  # CPU-time stacks, bench.cpu_sampler
        from bench.cpu_sampler import install as install_sampler

        install_sampler(Path(samples))
    if profile := os.environ.get("BENCH_PROFILE"):  # a cProfile dump of the server, for analysis
        import cProfile

        cProfile.run("asyncio.run(main())", profile)
    else:
        asyncio.run(main())
