"""What a growing ``input/`` folder costs every prompt on a ComfyUI agent.

    python -m bench.agent_inputs [--sizes 10,2000,10000] [--jobs 1000] [--callers 16]

ComfyUI validates a prompt's ``LoadImage`` against its input types, and ``LoadImage``'s input
types are the folder's listing: every entry is listed, checked to be a file, its content type
guessed from its extension (cached per extension), and the names sorted (``nodes.py``
``LoadImage.INPUT_TYPES``, read in ComfyUI's source). This script times those same operations
on a folder of N small files (a temp directory, warm cache), median of repeats, for
N = the jobs left behind: 10 (what the service now leaves: the jobs in flight), 2,000 (an
afternoon of tests, as the issue measured 7.7 ms at 1,944 files on the agent's machine) and
10,000.

Then it runs ``--jobs`` ImageUpscale jobs through the ComfyUI pool, with the service's settings
(outputs over the websocket, reused input names, the default ``max_concurrent_jobs=1,
queue_ahead=1``), ``--callers`` at a time, against the stand-in of ``tests/support`` (which
writes what ComfyUI writes: uploads to ``input/``, ``SaveImage`` to ``output/``,
``PreviewImage`` to ``temp/``), and counts the files left in each folder, and the most in
``input/`` at any time. Writes ``bench/results/agent_inputs.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mimetypes
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from aiserver.providers.base import WorkItem
from aiserver.providers.comfy.pool import AgentConfig, ComfyPool
from aiserver.providers.comfy.settings import PoolSettings
from aiserver.providers.comfy.workflows import WorkflowCatalog
from aiserver.tasks import ImageUpscaleSpec, TaskKind
from bench.common import RESULTS
from tests.comfy.helpers import RecordingSink, png, work_item, write_input
from tests.support.comfy_standin import ComfyStandIn

REPEATS = 30


def listing_cost(folder: Path) -> float:
    """Seconds for one listing the way LoadImage's input types build it."""
    start = time.perf_counter()
    names = [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))]
    kinds: dict[str, str] = {}  # the content type by extension, guessed once (as ComfyUI does)
    images = []
    for name in names:
        extension = name.rsplit(".", 1)[-1]
        if extension not in kinds:
            kinds[extension] = (mimetypes.guess_type(name, strict=False)[0] or "").split("/")[0]
        if kinds[extension] == "image":
            images.append(name)
    sorted(images)
    return time.perf_counter() - start


def measure(sizes: list[int]) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-inputs-") as tmp:
        folder = Path(tmp)
        made = 0
        for size in sorted(sizes):
            while made < size:
                (folder / f"01JOB{made:021d}-image-{made:08x}.png").write_bytes(b"\x89PNG")
                made += 1
            runs = [listing_cost(folder) for _ in range(REPEATS)]
            figures[str(size)] = {
                "median_ms": round(statistics.median(runs) * 1000, 3),
                "min_ms": round(min(runs) * 1000, 3),
            }
    return figures


def _files(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file())


async def files_left(jobs: int, callers: int) -> dict[str, Any]:
    """Run ``jobs`` upscales through the pool; the files each agent folder holds afterwards."""
    settings = PoolSettings(outputs_over_websocket=True, reuse_input_names=True)
    with tempfile.TemporaryDirectory(prefix="bench-agent-files-") as tmp:
        root = Path(tmp)
        sources = root / "sources"
        sources.mkdir()
        works: list[WorkItem] = []
        for k in range(jobs):  # distinct bytes per job, as real jobs have
            folder = sources / str(k)
            folder.mkdir()
            colour = (k % 256, k // 256 % 256, 40)
            image = write_input(folder, "image", png(24 + k % 16, 16, colour))
            works.append(work_item(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec(), {"image": image}))
        async with ComfyStandIn(root / "agent", step_delay_s=0.0) as agent:
            pool = ComfyPool(
                [AgentConfig(agent.url, name="a")], WorkflowCatalog.load(), settings=settings
            )
            await pool.start()
            peak = 0
            todo = iter(works)

            async def caller() -> None:
                nonlocal peak
                for work in todo:
                    await pool.run(work, RecordingSink())
                    peak = max(peak, _files(agent.input_dir))

            started = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(callers)))
            seconds = time.perf_counter() - started
            await pool.close()
            return {
                "jobs": jobs,
                "callers": callers,
                "prompts_queued": len(agent.received.prompts),
                "seconds": round(seconds, 1),
                "input_files_left": _files(agent.input_dir),
                "input_files_peak": peak,
                "output_files_left": _files(agent.output_dir),
                "temp_files_left": _files(agent.temp_dir),
                "listing_ms_with_files_left": round(listing_cost(agent.input_dir) * 1000, 3),
            }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,2000,10000")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--callers", type=int, default=16)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    result = {
        "name": "agent_inputs",
        "about": __doc__.strip().split("\n\n")[0],
        "per_prompt_listing_by_files": measure(sizes),
        "files_left_after_jobs": asyncio.run(files_left(args.jobs, args.callers)),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "agent_inputs.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
