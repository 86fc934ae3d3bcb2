"""A job server that the recovery test kills with SIGKILL mid-job.

Run as ``python -m tests.jobs.crash_child ROOT``: submits a job that checkpoints and then
hangs, and a second one that waits behind it, prints both ids, then waits to be killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from aiserver.jobs.model import Stage
from aiserver.providers.base import ProviderProgress
from tests.jobs.helpers import Env, Run, ScriptedProvider, submit

CHECKPOINT = {"agent": "gpu-1", "prompt_id": "p-42"}


async def main(root: Path) -> None:
    checkpointed = asyncio.Event()

    async def checkpoint_then_hang(run: Run) -> None:
        await run.sink.progress(ProviderProgress(Stage.RUNNING, 0.25))
        await run.sink.checkpoint(CHECKPOINT)  # stored before this returns
        checkpointed.set()
        await asyncio.Event().wait()

    env = Env(root)
    manager = await env.manager(
        ScriptedProvider(behaviour=checkpoint_then_hang), max_running_per_provider=1
    )
    running = await submit(manager, env, ref_id="running")
    async with asyncio.timeout(10):
        await checkpointed.wait()
    queued = await submit(manager, env, ref_id="queued")
    print(running.id, queued.id, flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
