"""Real, small providers and an environment of real stores for the job tests.

The providers implement the Provider protocol deterministically; tests steer them with
asyncio.Events. The scheduler is what is under test.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from PIL import Image

from aiserver.artifacts.store import ArtifactStore
from aiserver.errors import ServiceError
from aiserver.jobs.manager import JobManager
from aiserver.jobs.model import Finished, InputRef, Job, JobEvent, Stage
from aiserver.jobs.scheduler import SchedulerSettings, default_spec
from aiserver.jobs.store import JobStore, SqliteJobStore
from aiserver.jobs.store.postgres import PostgresJobStore
from aiserver.providers.base import (
    GeneratedImage,
    GeneratedText,
    ProviderProgress,
    RunSink,
    WorkItem,
)
from aiserver.spool import InputSpool
from aiserver.tasks import ImageToImageSpec, TaskKind, TaskSpec
from tests.storage.backends import PG_URL, SHARED_BACKENDS

T = TypeVar("T")
WAIT_S = 5.0


async def within(awaitable: Awaitable[T], seconds: float = WAIT_S) -> T:
    """Every wait in these tests is bounded."""
    async with asyncio.timeout(seconds):
        return await awaitable


async def collect(events: AsyncIterator[JobEvent], seconds: float = WAIT_S) -> list[JobEvent]:
    async with asyncio.timeout(seconds):
        return [e async for e in events]


async def final_job(events: AsyncIterator[JobEvent], seconds: float = WAIT_S) -> Job:
    """The job in the last event of a stream, which must be Finished."""
    last = (await collect(events, seconds))[-1].kind
    assert isinstance(last, Finished)
    return last.job


def png(seed: int, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed % 256, (seed // 256) % 256, 7)).save(buf, "PNG")
    return buf.getvalue()


@dataclass(eq=False)
class Run:
    """One call of ``ScriptedProvider.run``, visible to the test."""

    work: WorkItem
    sink: RunSink
    release: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    cancel_message: str | None = None


Behaviour = Callable[[Run], Coroutine[Any, Any, None]]


async def produce_image(run: Run) -> None:
    """Progress, then one image (seeded by the job id, so each job's image is distinct)."""
    await run.sink.progress(ProviderProgress(Stage.RUNNING, 0.5, step=1, max_steps=2))
    seed = int(hashlib.sha256(run.work.job_id.encode()).hexdigest()[:6], 16)
    await run.sink.image(GeneratedImage(png(seed), "out.png", "image/png", 8, 8, seed=seed))


async def gated(run: Run) -> None:
    """Waits for the test to release it, then produces an image."""
    await run.release.wait()
    await produce_image(run)


async def produce_text(run: Run) -> None:
    await run.sink.text(GeneratedText("a caption", node="7"))


class ScriptedProvider:
    """A provider whose runs do what ``behaviour`` says; records every run."""

    def __init__(
        self,
        name: str = "p1",
        behaviour: Behaviour = produce_image,
        *,
        tasks: Iterable[TaskKind] = tuple(TaskKind),
        online: bool = True,
    ) -> None:
        self._name = name
        self.behaviour = behaviour
        self.tasks = frozenset(tasks)
        self.online = online
        self.runs: list[Run] = []
        self.started: asyncio.Queue[Run] = asyncio.Queue()
        self.active = 0
        self.slots = 1000
        self.refuse: ServiceError | None = None
        """Set to make the scheduler fail this provider's jobs at once."""
        self.withdrawn: list[dict[str, str]] = []
        """Checkpoints whose remote work the scheduler asked to withdraw."""

    @property
    def name(self) -> str:
        return self._name

    def supports(self, task: TaskKind) -> bool:
        return task in self.tasks

    def can_run(self, task: TaskKind, spec: TaskSpec) -> bool:
        return self.online and task in self.tasks

    def unavailable_reason(self, task: TaskKind, spec: TaskSpec) -> str:
        return "" if self.can_run(task, spec) else f"{self._name} is offline"

    def load(self) -> int:
        return self.active

    def capacity(self) -> int:
        return self.slots

    def refusal(self, task: TaskKind, spec: TaskSpec) -> ServiceError | None:
        return self.refuse if task in self.tasks else None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def withdraw(self, resume: Mapping[str, str]) -> None:
        self.withdrawn.append(dict(resume))

    async def run(self, work: WorkItem, sink: RunSink) -> None:
        run = Run(work, sink)
        self.runs.append(run)
        self.active += 1
        self.started.put_nowait(run)
        try:
            await self.behaviour(run)
        except asyncio.CancelledError as cancel:
            run.cancelled = True
            run.cancel_message = cancel.args[0] if cancel.args else None
            raise
        finally:
            self.active -= 1
            run.done.set()

    async def next_run(self) -> Run:
        return await within(self.started.get())


FAST = {
    "recheck_interval_s": 0.05,
    "progress_max_rate_hz": 0.0,
    "spool_grace_s": 0.0,
    "cancel_timeout_s": 2.0,
}


class Env:
    """Real stores on ``tmp_path``; everything opened here is closed by the fixture."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.db_path = root / "jobs.sqlite3"
        # On PostgreSQL (AISERVER_TEST_BACKENDS=postgres+s3) one schema per root, so a child
        # process given the same root (crash_child) opens the same store.
        self.schema = (
            f"t_{hashlib.sha256(str(root).encode()).hexdigest()[:16]}" if SHARED_BACKENDS else ""
        )
        self.spool = InputSpool(root / "spool")
        self.artifacts = ArtifactStore(root / "artifacts")
        self.stores: list[JobStore] = []
        self.managers: list[JobManager] = []

    async def store(self) -> JobStore:
        store: JobStore
        if self.schema:
            store = await PostgresJobStore.open(PG_URL, schema=self.schema, pool_size=4)
        else:
            store = await SqliteJobStore.open(self.db_path)
        self.stores.append(store)
        return store

    async def manager(
        self, *providers: ScriptedProvider, start: bool = True, **settings: Any
    ) -> JobManager:
        store = await self.store()
        manager = JobManager(
            store,
            self.spool,
            self.artifacts,
            providers,
            SchedulerSettings(**{**FAST, **settings}),
        )
        self.managers.append(manager)
        if start:
            await manager.start()
        return manager

    def input(self, data: bytes = b"", field_name: str = "image") -> InputRef:
        """Spool ``data`` (default: a small PNG) as an input file."""
        data = data or png(1)
        sha = hashlib.sha256(data).hexdigest()
        path = self.spool.path_for(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return InputRef(field_name, "in.png", sha, len(data), "image/png", 8, 8)

    async def close(self) -> None:
        for manager in self.managers:
            await manager.stop(0.1)
        for store in self.stores:
            await store.close()
        await self.artifacts.close()
        if self.schema:
            conn = await asyncpg.connect(PG_URL)
            try:
                await conn.execute(f"DROP SCHEMA IF EXISTS {self.schema} CASCADE")
            finally:
                await conn.close()


def _spec_for(task: TaskKind) -> TaskSpec:
    if task is TaskKind.IMAGE_TO_IMAGE:
        return ImageToImageSpec(positive_prompt="a cat")
    return default_spec(task)


async def submit(
    manager: JobManager,
    env: Env,
    *,
    owner: str = "alice",
    ref_id: str = "",
    tag: str = "",
    task: TaskKind = TaskKind.IMAGE_TO_IMAGE,
    spec: TaskSpec | None = None,
    inputs: list[InputRef] | None = None,
) -> Any:
    job, _ = await within(
        manager.submit(
            owner=owner,
            task=task,
            spec=spec
            or (
                ImageToImageSpec(positive_prompt="a cat")
                if task is TaskKind.IMAGE_TO_IMAGE
                else default_spec(task)
            ),
            inputs=inputs if inputs is not None else [env.input()],
            ref_id=ref_id,
            tag=tag,
            reply_to="",
        )
    )
    return job


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    """An :class:`Env` in the test's folder, closed after it (import it to use it)."""
    environment = Env(tmp_path)
    try:
        yield environment
    finally:
        await environment.close()
