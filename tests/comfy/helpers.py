"""Inputs, sinks and settings for the ComfyUI provider tests."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from aiserver.providers.base import (
    GeneratedImage,
    GeneratedText,
    ProviderProgress,
    RunSink,
    WorkInput,
    WorkItem,
)
from aiserver.providers.comfy.background import Background
from aiserver.providers.comfy.client import ComfyClient
from aiserver.providers.comfy.run import Run
from aiserver.providers.comfy.settings import ComfyTimeouts
from aiserver.providers.comfy.workflows import Workflow
from aiserver.tasks import TaskKind, TaskSpec

__all__ = [
    "FAST",
    "HOSTILE",
    "DirectAgent",
    "RecordingSink",
    "png",
    "work_item",
    "write_input",
]

#: Short timeouts so failure paths finish in well under a second.
FAST = ComfyTimeouts(
    connect_s=2.0,
    request_s=5.0,
    queue_wait_s=10.0,
    execution_s=20.0,
    idle_s=5.0,
    poll_s=0.5,
    reconnect_s=3.0,
    backoff_initial_s=0.02,
    backoff_max_s=0.2,
    cancel_s=2.0,
)


class DirectAgent:
    """One agent's transport with what the pool would hand its runs (timeouts, background
    tasks), so a test drives :class:`Run` without a pool."""

    def __init__(self, name: str, url: str, *, timeouts: ComfyTimeouts = FAST) -> None:
        self.timeouts = timeouts
        self.transport = ComfyClient(
            name, url, connect_s=timeouts.connect_s, request_s=timeouts.request_s
        )
        self.background = Background()

    async def run(self, work: WorkItem, workflow: Workflow, sink: RunSink) -> None:
        await Run(
            self.transport,
            work,
            workflow,
            sink,
            timeouts=self.timeouts,
            spawn=self.background.spawn,
        ).execute()

    async def aclose(self) -> None:
        await self.background.drain()
        await self.transport.aclose()


#: Prompt text that breaks workflows built by text substitution.
HOSTILE = (
    'quote " apostrophe \' braces {{}} {"a": [1]} backslash \\ \\n literal, '
    'real newline\nand tab\t, emoji 🦊🏳️‍🌈, "}]},{"  closing: "}}], ${x} %s {0} \u2028 end'
)


def png(
    width: int, height: int, colour: tuple[int, ...] = (40, 60, 210), mode: str = "RGB"
) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_input(folder: Path, name: str, data: bytes) -> WorkInput:
    path = folder / f"{name}.png"
    path.write_bytes(data)
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
    return WorkInput(
        field=name,
        path=path,
        file_name=f"{name}.png",
        sha256=hashlib.sha256(data).hexdigest(),
        mime_type="image/png",
        width=width,
        height=height,
    )


def work_item(
    task: TaskKind,
    spec: TaskSpec,
    inputs: Mapping[str, WorkInput],
    *,
    job_id: str = "01JTESTJOB0000000000000000",
    resume: Mapping[str, str] | None = None,
) -> WorkItem:
    return WorkItem(job_id, task, spec, dict(inputs), resume=dict(resume or {}))


@dataclass
class RecordingSink:
    """A RunSink that keeps everything it is told."""

    progress_updates: list[ProviderProgress] = field(default_factory=list)
    images: list[GeneratedImage] = field(default_factory=list)
    texts: list[GeneratedText] = field(default_factory=list)
    checkpoints: list[dict[str, str]] = field(default_factory=list)

    async def progress(self, update: ProviderProgress) -> None:
        self.progress_updates.append(update)

    async def image(self, image: GeneratedImage) -> None:
        self.images.append(image)

    async def text(self, text: GeneratedText) -> None:
        self.texts.append(text)

    async def checkpoint(self, state: Mapping[str, str]) -> None:
        self.checkpoints.append(dict(state))

    def fractions(self) -> list[float]:
        return [u.fraction for u in self.progress_updates]

    def stages(self) -> list[str]:
        stages: list[str] = []
        for update in self.progress_updates:
            if not stages or stages[-1] != update.stage.value:
                stages.append(update.stage.value)
        return stages

    def image_sizes(self) -> list[tuple[int, int]]:
        return [(i.width, i.height) for i in self.images]


def decoded_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def any_value(mapping: Mapping[str, Any]) -> Any:
    return next(iter(mapping.values()))
