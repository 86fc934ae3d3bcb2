"""The ComfyUI provider's CPU per job alone, for two source trees side by side.

    python -m bench.provider_cpu OTHER_TREE [--rounds 8] [--jobs 400] [--concurrency 16]
        [--agents bench.fast_agent]

A ``ComfyPool`` of each tree (``OTHER_TREE``: e.g. ``git archive main | tar -x -C /tmp/main``)
runs in a process of its own, with a sink that keeps nothing, on the same 4 agents (another
process; outputs over the websocket and reused input names, as the service sets them), and
runs 64 px upscales: no API, no job store, no artifact store. Rounds alternate
which tree goes first; each segment's process CPU is read in that process
(``time.process_time``). Prints the CPU milliseconds per job of both and their ratio (this
tree / other): on a shared machine the ratio is what to read. Not run by ``python -m bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from bench import ROOT
from bench.common import quit_child
from bench.standin_proc import StandIns

AGENTS = 4


class _NoSink:
    """Keeps nothing: only the provider's own work is measured."""

    async def progress(self, update: Any) -> None:
        return None

    async def image(self, image: Any) -> None:
        return None

    async def text(self, text: Any) -> None:
        return None

    async def checkpoint(self, state: Any) -> None:
        return None


async def _worker(urls: list[str], image: Path, sha256: str) -> None:
    """The pool of the tree on ``sys.path``: ``run JOBS CONCURRENCY`` on stdin answers
    ``{"cpu_s": ..., "jobs": ...}``; ``quit`` ends."""
    from aiserver.providers.base import WorkInput, WorkItem
    from aiserver.providers.comfy.pool import ComfyPool
    from aiserver.providers.comfy.settings import AgentSettings, PoolSettings
    from aiserver.providers.comfy.workflows import WorkflowCatalog
    from aiserver.tasks import ImageUpscaleSpec, TaskKind

    item = WorkInput("image", image, image.name, sha256, "image/png", 64, 64)
    pool = ComfyPool(
        [AgentSettings(url, name=f"agent{i}") for i, url in enumerate(urls)],
        WorkflowCatalog.load(),
        settings=PoolSettings(outputs_over_websocket=True, reuse_input_names=True),
    )
    await pool.start()
    print(json.dumps({"ready": True}), flush=True)
    while True:
        command = (await asyncio.to_thread(sys.stdin.readline)).split()
        if not command or command[0] == "quit":
            break
        jobs, concurrency = int(command[1]), int(command[2])

        async def caller(todo: Iterator[int]) -> None:
            for _ in todo:
                spec = ImageUpscaleSpec()
                work = WorkItem(uuid.uuid4().hex, TaskKind.IMAGE_UPSCALE, spec, {"image": item})
                await pool.run(work, _NoSink())

        before = time.process_time()
        todo = iter(range(jobs))  # shared: each caller takes the next job
        await asyncio.gather(*(caller(todo) for _ in range(concurrency)))
        print(json.dumps({"cpu_s": time.process_time() - before, "jobs": jobs}), flush=True)
    await pool.close()


class _Pool:
    """The parent's handle on one worker process: this module, over the ``aiserver`` of the
    source tree ``root`` (its ``src`` first on the path; the other tree needs no copy of this
    script)."""

    def __init__(self, root: Path, urls: list[str], image: Path) -> None:
        self.root, self.urls, self.image = root, urls, image
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> _Pool:
        path = os.pathsep.join((str(self.root / "src"), str(ROOT)))
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "bench.provider_cpu", "--worker", json.dumps(self.urls), str(self.image)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
            env={**os.environ, "PYTHONPATH": path},
        )
        await self._read()
        return self

    async def run(self, jobs: int, concurrency: int) -> float:
        """CPU milliseconds per job over ``jobs`` upscales."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        proc.stdin.write(f"run {jobs} {concurrency}\n".encode())
        await proc.stdin.drain()
        answer = await self._read()
        return float(answer["cpu_s"]) * 1000 / int(answer["jobs"])

    async def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        async with asyncio.timeout(300):
            line = await self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the pool of {self.root} ended")
        return dict(json.loads(line))

    async def __aexit__(self, *exc: object) -> None:
        await quit_child(self._proc, 20)


async def _compare(other: Path, rounds: int, jobs: int, concurrency: int, module: str) -> str:
    trees = {"this": ROOT, "other": other}
    per_job: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="bench-provider-cpu-") as folder:
        tmp = Path(folder)
        image = tmp / "input.png"
        Image.new("RGB", (64, 64), (40, 160, 90)).save(image)
        async with StandIns(AGENTS, tmp / "comfy", module=module) as agents:
            pools = {name: _Pool(root, agents.urls, image) for name, root in trees.items()}
            for pool in pools.values():
                await pool.__aenter__()
            try:
                for pool in pools.values():
                    await pool.run(50, concurrency)  # warm-up: sockets, caches
                for r in range(rounds):
                    for name in ("this", "other") if r % 2 == 0 else ("other", "this"):
                        per_job[name].append(await pools[name].run(jobs, concurrency))
                        await agents.reset()
            finally:
                for pool in pools.values():
                    await pool.__aexit__(None, None, None)
    ratios = [a / b for a, b in zip(per_job["this"], per_job["other"], strict=True) if b]
    return "\n".join(
        [
            f"ComfyUI provider CPU ms per job, {rounds} rounds x {jobs} upscales,"
            f" {concurrency} callers, {AGENTS} agents ({module}); other = {other}",
            "this:  " + " ".join(f"{v:.3f}" for v in per_job["this"]),
            "other: " + " ".join(f"{v:.3f}" for v in per_job["other"]),
            f"median this {statistics.median(per_job['this']):.3f} ms,"
            f" other {statistics.median(per_job['other']):.3f} ms;"
            f" ratio this/other median {statistics.median(ratios):.3f}"
            f" [{min(ratios):.3f}..{max(ratios):.3f}]",
        ]
    )


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        image = Path(sys.argv[3])
        sha256 = hashlib.sha256(image.read_bytes()).hexdigest()
        asyncio.run(_worker(json.loads(sys.argv[2]), image, sha256))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", type=Path, help="the other source tree (its src/ and bench/)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--agents", default="bench.fast_agent")
    args = parser.parse_args()
    other = args.other.resolve()
    print(asyncio.run(_compare(other, args.rounds, args.jobs, args.concurrency, args.agents)))


if __name__ == "__main__":
    main()
