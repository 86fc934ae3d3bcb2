"""One ComfyUI stand-in as its own process, to be SIGKILLed and restarted, with a prompt log.

    python -m tests.chaos.agent_proc --root DIR --log FILE [--port P] [--step-delay S]

Prints one JSON line ``{"url": ..., "port": ...}`` once listening, then serves until killed.
Every prompt it starts and every ``execution_success`` it sends is appended to ``--log`` as a
JSON line, written straight to the file (``O_APPEND``, no buffer), so the log survives a
SIGKILL and spans every restart of the agent:
``{"agent": ..., "event": "start"|"success", "prompt_id": ..., "job": ..., "t": ...,
"repeats": ...}`` (``job`` is the job id the service puts in the output node's prefix; ``t`` is
wall time; ``repeats``, on a prompt the service queued again because its image frames never
reached it, is the prompt id it repeats, else "").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from tests.support.comfy_standin import ComfyStandIn, QueueItem
from tests.support.prompt_marks import job_label, repeated


class LoggedStandIn(ComfyStandIn):
    """A stand-in that appends what it runs to a log file shared by its incarnations."""

    def __init__(self, root: Path, *, agent: str, log: Path, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.agent = agent
        self._fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._job_of: dict[str, str] = {}
        self._repeats: dict[str, str] = {}

    def _log(self, event: str, prompt_id: str) -> None:
        entry = {
            "agent": self.agent,
            "event": event,
            "prompt_id": prompt_id,
            "job": self._job_of.get(prompt_id, ""),
            "t": time.time(),
            "repeats": self._repeats.get(prompt_id, ""),
        }
        os.write(self._fd, (json.dumps(entry) + "\n").encode())

    async def _execute(self, item: QueueItem) -> None:
        self._job_of[item.prompt_id] = job_label(item.prompt)
        self._repeats[item.prompt_id] = repeated(item.prompt)
        self._log("start", item.prompt_id)
        await super()._execute(item)

    def _send(self, event: str, data: Any, client_id: str | None, *, guarded: bool) -> None:
        super()._send(event, data, client_id, guarded=guarded)
        if event == "execution_success" and isinstance(data, dict):
            self._log("success", str(data.get("prompt_id", "")))


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--name", default="agent")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--step-delay", type=float, default=0.05)
    args = parser.parse_args()
    standin = LoggedStandIn(args.root, agent=args.name, log=args.log, step_delay_s=args.step_delay)
    await standin.start(args.port)
    print(json.dumps({"url": standin.url, "port": standin.port}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await standin.close()


if __name__ == "__main__":
    asyncio.run(main())
