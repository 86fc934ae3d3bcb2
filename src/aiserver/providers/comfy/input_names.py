"""Upload names on an agent that are reused once their job has ended.

ComfyUI has no route that deletes an input, and ``LoadImage`` lists the whole ``input/`` folder
on every prompt that loads an image (its combo of file names): a folder that grows by a file
per job makes every prompt slower and fills the agent's disk. Instead, a run takes a slot for
its inputs and uploads them as ``aiserver-{token}-{slot}-{field}{ext}`` with ``overwrite``;
the slot goes back when the run ends, and the next job overwrites those files. The folder then
holds one file per input of the jobs in flight, per process.

``token`` is random per process: a restarted service never overwrites the inputs of a prompt
its predecessor left queued (it re-attaches to that prompt). The files of a process that has
stopped are left behind, at most its peak of slots.

Reusing names is safe with ComfyUI's cache: ``LoadImage`` keys its cache on the file's hash,
so a new file under the same name is a new input.
"""

from __future__ import annotations

import heapq
import uuid

__all__ = ["InputNames"]


class InputNames:
    """The upload slots of one agent in this process."""

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex[:8]
        self._free: list[int] = []
        self._next = 0
        self.in_use = 0

    def take(self) -> int:
        """The lowest free slot (so the folder stays as small as the peak of jobs in flight)."""
        self.in_use += 1
        if self._free:
            return heapq.heappop(self._free)
        self._next += 1
        return self._next - 1

    def give_back(self, slot: int) -> None:
        self.in_use -= 1
        heapq.heappush(self._free, slot)

    def name(self, slot: int, field: str, suffix: str) -> str:
        return f"aiserver-{self.token}-{slot}-{field}{suffix}"
