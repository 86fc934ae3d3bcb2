"""A run's progress over its graph, node by node: a fraction that never decreases."""

from __future__ import annotations

from collections.abc import Iterable

from aiserver.providers.base import ProviderProgress
from aiserver.providers.comfy.workflows import BuiltPrompt
from aiserver.stages import Stage

__all__ = ["NodeTracker"]


class NodeTracker:
    """Which of the prompt's nodes ran, and the steps of the running one."""

    def __init__(self, built: BuiltPrompt) -> None:
        self.built = built
        self.to_run = built.nodes_to_run
        self.done: set[str] = set()
        self.node = ""
        self.step = 0
        self.max_steps = 0
        self.best = 0.0
        self._last: ProviderProgress | None = None

    def fraction(self) -> float:
        total = max(1, len(self.to_run))
        done = len(self.done & self.to_run)
        current = 0.0
        if self.node and self.node in self.to_run and self.node not in self.done:
            current = self.step / self.max_steps if self.max_steps > 0 else 0.0
        self.best = max(self.best, min(1.0, (done + min(current, 1.0)) / total))
        return self.best

    def start(self, node: str) -> None:
        if self.node and self.node != node:
            self.done.add(self.node)
        if node != self.node:
            self.node, self.step, self.max_steps = node, 0, 0

    def progress(self, node: str, value: int, maximum: int) -> None:
        self.start(node)
        self.step, self.max_steps = value, maximum

    def finished(self, nodes: Iterable[str]) -> None:
        self.done.update(nodes)

    def update(self, stage: Stage = Stage.RUNNING) -> ProviderProgress:
        """The progress now; the same object as last time when nothing changed (most messages
        of a job change nothing: building a frozen dataclass per message showed in profiles)."""
        fraction = self.fraction()
        last = self._last
        if (
            last is not None
            and last.fraction == fraction
            and last.node == self.node
            and last.step == self.step
            and last.max_steps == self.max_steps
            and last.stage is stage
        ):
            return last
        self._last = ProviderProgress(
            stage=stage,
            fraction=fraction,
            node=self.node,
            node_type=self.built.class_type(self.node) if self.node else "",
            step=self.step,
            max_steps=self.max_steps,
        )
        return self._last
