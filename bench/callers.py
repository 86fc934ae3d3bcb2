"""The bench's callers in a process of their own, so that their CPU is read apart from the
bench's and the service's (``/proc``, like every other process of a run).

    python -m bench.callers

Reads one JSON command a line on stdin and answers each with one JSON line:

- ``{"service": "127.0.0.1:PORT"}``: gRPC ImageUpscale (SYNC, references) through the service;
- ``{"direct": [URL, ...]}``: :mod:`bench.comfy_direct` against these agents, round-robin;
- ``{"lean": [URL, ...]}``: :mod:`bench.comfy_lean` (the service's own exchange with the
  agents, done as cheaply as measured) against these agents, round-robin;
- ``{"floor": "127.0.0.1:PORT"}``: the bare gRPC server of :mod:`bench.grpc_floor`, one job's
  messages per call;
- ``{"inputs": K}``: makes the next segment's ``K`` inputs (each a different tiny PNG, 0.2 ms
  of CPU apiece: asked for before the parent reads any process's CPU, so not counted);
- ``{"run": PATH, "concurrency": N}`` (``PATH`` one of the above; optional ``"rate"``: jobs/s,
  open loop, see :func:`bench.client_loop._segment`): one job per input from ``N`` callers:
  ``{"latencies": [...], "done": {key: t}, "failed": [...], "jobs_per_s": x, "cpu_s": c}``
  (``t`` and latencies from ``perf_counter``, CLOCK_MONOTONIC: one clock for every process;
  ``c`` this process's CPU over the segment alone, ``time.process_time``);
- ``quit`` (or end of input): stops.

:class:`Callers` is the parent's handle.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import grpc

from bench import ROOT
from bench.client_loop import (
    INPUT_SIDE,
    Inputs,
    JobFailed,
    JobFn,
    _direct_job,
    _segment,
    _service_job,
    _wait_ready,
)
from bench.comfy_direct import DirectComfy
from bench.comfy_lean import LeanComfy
from bench.common import quit_child
from bench.grpc_floor import floor_job


async def main() -> None:
    inputs = Inputs()
    paths: dict[str, JobFn] = {}
    channels: list[grpc.aio.Channel] = []
    clients: list[DirectComfy] = []
    lean: list[LeanComfy] = []
    pngs: list[bytes] = []
    try:
        while True:
            line = (await asyncio.to_thread(sys.stdin.readline)).strip()
            if line in ("", "quit"):
                break
            command = json.loads(line)
            if "service" in command:
                channel = grpc.aio.insecure_channel(command["service"])
                channels.append(channel)
                await _wait_ready(channel)
                paths["service"] = _service_job(channel)
                await _segment(paths["service"], 4, inputs.take(8))  # warm-up
                answer: dict[str, Any] = {"ok": True}
            elif "direct" in command:
                clients = [DirectComfy(url) for url in command["direct"]]
                paths["direct"] = _direct_job(clients)
                await _segment(paths["direct"], 4, inputs.take(8))
                answer = {"ok": True}
            elif "lean" in command:
                lean = [LeanComfy(url) for url in command["lean"]]
                for client in lean:
                    await client.start()
                paths["lean"] = _lean_job(lean)
                await _segment(paths["lean"], 4, inputs.take(8))
                answer = {"ok": True}
            elif "floor" in command:
                channel = grpc.aio.insecure_channel(command["floor"])
                channels.append(channel)
                paths["floor"] = floor_job(channel)
                await _segment(paths["floor"], 4, inputs.take(8))
                answer = {"ok": True}
            elif "inputs" in command:  # made before the parent reads any process's CPU
                pngs = inputs.take(int(command["inputs"]))
                answer = {"ok": True}
            else:
                run = paths[command["run"]]
                cpu = time.process_time()
                answer = await _segment(run, int(command["concurrency"]), pngs, command.get("rate"))
                answer["cpu_s"] = time.process_time() - cpu
                pngs = []
            print(json.dumps(answer), flush=True)
    finally:
        for channel in channels:
            await channel.close()
        for direct_client in clients:
            await direct_client.aclose()
        for lean_client in lean:
            await lean_client.aclose()


def _lean_job(clients: list[LeanComfy]) -> JobFn:
    async def job(index: int, png: bytes) -> tuple[str, float]:
        result = await clients[index % len(clients)].upscale(png, INPUT_SIDE, INPUT_SIDE)
        if not result.outputs:
            raise JobFailed("no output")
        return result.prompt_id, result.done_at

    return job


class Callers:
    """The parent's handle on a :mod:`bench.callers` subprocess."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.pid = 0
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Callers:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "bench.callers"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.log.open("wb"),
            cwd=str(ROOT),
            limit=64 * 1024 * 1024,
        )
        self.pid = self._proc.pid
        return self

    async def __aexit__(self, *exc: object) -> None:
        await quit_child(self._proc, 20)

    async def ask(self, command: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(command).encode() + b"\n")
        await proc.stdin.drain()
        line = await proc.stdout.readline()
        if not line:
            await proc.wait()
            tail = self.log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the callers' process stopped:\n{tail}")
        answer: dict[str, Any] = json.loads(line)
        return answer


if __name__ == "__main__":
    asyncio.run(main())
