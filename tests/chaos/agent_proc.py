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


class LoggedStandIn(ComfyStandIn):
    """A stand-in that appends what it runs to a log file shared by its incarnations."""

    def __init__(self, root: Path, *, agent: str, log: Path, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.agent = agent
        self._fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._jobs: dict[str, str] = {}
        self._repeats: dict[str, str] = {}

    def _log(self, event: str, prompt_id: str) -> None:
        entry = {
            "agent": self.agent,
            "event": event,
            "prompt_id": prompt_id,
            "job": self._jobs.get(prompt_id, ""),
            "t": time.time(),
            "repeats": self._repeats.get(prompt_id, ""),
        }
        os.write(self._fd, (json.dumps(entry) + "\n").encode())

    async def _execute(self, item: QueueItem) -> None:
        self._jobs[item.prompt_id] = job_label(item.prompt)
        self._repeats[item.prompt_id] = repeated(item.prompt)
        self._log("start", item.prompt_id)
        await super()._execute(item)

    def _send(self, event: str, data: Any, client_id: str | None, *, guarded: bool) -> None:
        super()._send(event, data, client_id, guarded=guarded)
        if event == "execution_success" and isinstance(data, dict):
            self._log("success", str(data.get("prompt_id", "")))


_SAVERS = ("SaveImage", "SaveImageWebsocket")


def repeated(prompt: dict[str, Any]) -> str:
    """The prompt id a repeat recovers (``aiserver_recovers`` on its sender), else ""."""
    for node in prompt.values():
        if isinstance(node, dict) and node.get("class_type") == "SaveImageWebsocket":
            return str(node.get("inputs", {}).get("aiserver_recovers", ""))
    return ""


def job_label(prompt: dict[str, Any]) -> str:
    """The last part of the output node's filename prefix: the service's job id (outputs over
    the websocket keep it on ``SaveImageWebsocket``, which ignores it)."""
    for node in prompt.values():
        if isinstance(node, dict) and node.get("class_type") in _SAVERS:
            prefix = str(node.get("inputs", {}).get("filename_prefix", ""))
            return prefix.rsplit("/", 1)[-1]
    return ""


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
