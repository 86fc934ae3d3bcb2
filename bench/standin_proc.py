"""ComfyUI stand-ins in their own process, as a remote agent would be, with timestamps.

    python -m bench.standin_proc --count 4 --root DIR [--hang NODE]

Prints one JSON line ``{"urls": [...]}`` when listening, then reads commands on stdin, one a
line, and answers each with one JSON line:

- ``dump``: ``{"success": {prompt_id: [label, t]}, "requests": {"GET /queue": n, ...}}``: the
  ``time.perf_counter()`` at which each ``execution_success`` was handed to the socket since
  the last dump (``label`` is the last part of the prompt's ``SaveImage`` filename prefix: the
  job id of the service's prompts), and the HTTP requests (websocket upgrades included) by
  route.
  ``perf_counter`` is CLOCK_MONOTONIC on Linux, one clock for every process of the machine.
- ``reset``: forgets history, recordings and files (keeps per-job costs flat across rounds).
- ``stats``: ``{"posted": {label: n}, "succeeded": {label: n}, "repeated": {label: n},
  "peak": [n, ...]}`` since the start: prompts accepted and completed per label (a job run
  twice to completion shows 2), prompts the service queued again because their image frames
  never reached it (``aiserver_recovers`` on the sender: counted here, not in the other two),
  and per agent the most prompts it held at once (queued or running).
- ``quit``: stops.

The stand-ins are "instant" (no delay per sampler step or tile) unless ``--step-delay``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.common import quit_child
from tests.support.comfy_standin import ComfyStandIn, QueueItem, Received
from tests.support.prompt_marks import job_label, repeated


class TimedStandIn(ComfyStandIn):
    """A stand-in that notes when it sends ``execution_success``."""

    def __init__(self, root: Path, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.success_at: dict[str, tuple[str, float]] = {}
        self._labels: dict[str, str] = {}
        self.posted: Counter[str] = Counter()
        self.succeeded: Counter[str] = Counter()
        self.repeated: Counter[str] = Counter()
        self._repeats: set[str] = set()
        self.peak = 0

    def _post_prompt(self, request: Any) -> Any:
        response = super()._post_prompt(request)
        if response.status == 200:
            body = json.loads(request.body)
            label = job_label(body["prompt"])
            if repeated(body["prompt"]):
                self.repeated[label] += 1
                self._repeats.add(str(body.get("prompt_id")))
            else:
                self.posted[label] += 1
            held = len(self._pending) + (self._running is not None)
            self.peak = max(self.peak, held)
        return response

    async def _execute(self, item: QueueItem) -> None:
        self._labels[item.prompt_id] = job_label(item.prompt)
        try:
            await super()._execute(item)
        finally:
            self._labels.pop(item.prompt_id, None)

    def _send(self, event: str, data: Any, client_id: str | None, *, guarded: bool) -> None:
        super()._send(event, data, client_id, guarded=guarded)
        if event == "execution_success":
            pid = str(data.get("prompt_id"))
            self.success_at[pid] = (self._labels.get(pid, ""), time.perf_counter())
            if pid not in self._repeats:
                self.succeeded[self._labels.get(pid, "")] += 1

    def bench_reset(self) -> None:
        self.received = Received()
        self._history.clear()
        self.success_at.clear()
        for folder in (self.input_dir, self.output_dir, self.temp_dir):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)


def _route(method: str, path: str) -> str:
    path = path.removeprefix("/api")
    for prefix in ("/history/", "/jobs/", "/object_info/"):
        if path.startswith(prefix):
            path = prefix + "*"
    return f"{method} {path}"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--hang", default="", help="node id at which every job waits forever")
    parser.add_argument("--step-delay", type=float, default=0.0, help="seconds per step")
    args = parser.parse_args()
    stand_ins = [
        TimedStandIn(args.root / f"agent{i}", step_delay_s=args.step_delay)
        for i in range(args.count)
    ]
    for s in stand_ins:
        await s.start()
        if args.hang:
            s.hang_at(args.hang, interruptible=True)
    print(json.dumps({"urls": [s.url for s in stand_ins]}), flush=True)
    try:
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            command = line.strip()
            if command in ("", "quit"):
                break
            if command == "dump":
                success: dict[str, Any] = {}
                requests: Counter[str] = Counter()
                for s in stand_ins:
                    success.update({k: list(v) for k, v in s.success_at.items()})
                    s.success_at.clear()
                    requests.update(_route(method, path) for method, path, _ in s.received.requests)
                    s.received.requests.clear()
                print(json.dumps({"success": success, "requests": requests}), flush=True)
            elif command == "stats":
                posted: Counter[str] = Counter()
                succeeded: Counter[str] = Counter()
                repeated: Counter[str] = Counter()
                for s in stand_ins:
                    posted.update(s.posted)
                    succeeded.update(s.succeeded)
                    repeated.update(s.repeated)
                peak = [s.peak for s in stand_ins]
                stats = {"posted": posted, "succeeded": succeeded, "repeated": repeated}
                print(json.dumps({**stats, "peak": peak}))
                sys.stdout.flush()
            elif command == "reset":
                for s in stand_ins:
                    s.bench_reset()
                print(json.dumps({"ok": True}), flush=True)
            else:
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
    finally:
        for s in stand_ins:
            await s.close()


class StandIns:
    """The parent's handle on a :mod:`bench.standin_proc` subprocess."""

    def __init__(
        self,
        count: int,
        root: Path,
        hang: str = "",
        module: str = "bench.standin_proc",
        step_delay_s: float = 0.0,
        source: Path = ROOT,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.count = count
        self.env = dict(env or {})
        """Set in the stand-ins' environment over this process's (``BENCH_TIMELINE``): for
        them only, not for other children of this process."""
        self.source = source
        """The source tree the stand-ins run from (another's: an A/B of the stand-ins)."""
        self.root = root
        self.hang = hang
        self.module = module
        """``bench.fast_agent`` for the lighter agents (the same commands)."""
        self.step_delay_s = step_delay_s
        self.urls: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> StandIns:
        cmd = [sys.executable, "-m", self.module, "--count", str(self.count)]
        cmd += ["--root", str(self.root)]
        if self.hang:
            cmd += ["--hang", self.hang]
        if self.step_delay_s:
            cmd += ["--step-delay", str(self.step_delay_s)]
        self._proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=str(self.source),
            env={**os.environ, **self.env} if self.env else None,
            limit=64 * 1024 * 1024,
        )
        self.urls = (await self._ask(None))["urls"]
        return self

    async def _ask(self, command: str | None) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        if command is not None:
            proc.stdin.write(command.encode() + b"\n")
            await proc.stdin.drain()
        async with asyncio.timeout(60):
            line = await proc.stdout.readline()
        if not line:
            raise RuntimeError("the stand-in process ended")
        return dict(json.loads(line))

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def dump(self) -> tuple[dict[str, tuple[str, float]], dict[str, int]]:
        """``execution_success`` times by prompt id, and HTTP requests by route, since the
        last dump."""
        answer = await self._ask("dump")
        success = {k: (str(v[0]), float(v[1])) for k, v in answer["success"].items()}
        return success, {str(k): int(v) for k, v in answer["requests"].items()}

    async def stats(self) -> dict[str, Any]:
        """Prompts posted and completed per label, and each agent's peak of held prompts."""
        return await self._ask("stats")

    async def reset(self) -> None:
        await self._ask("reset")

    async def __aexit__(self, *exc: object) -> None:
        await quit_child(self._proc, 10)


if __name__ == "__main__":
    if timeline := os.environ.get("BENCH_TIMELINE"):  # a job's steps, for bench.job_timeline
        from bench.job_timeline import install_standin

        install_standin(Path(timeline))
    asyncio.run(main())
