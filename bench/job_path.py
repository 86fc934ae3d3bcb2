"""The job store's share of a job: the job manager in-process on SQLite or PostgreSQL.

    python -m bench.job_path [--jobs 400] [--concurrency 16] [--rounds 3] [--pg-artifacts]
                             [--run-s 0]

No gRPC and no ComfyUI: an instant provider reports progress, a checkpoint and one small
image, so what is measured is the manager's path through the store (create, the running
save, the checkpoint, the output, the end, the events, the lease) plus the artifact store's
local put (``--run-s``: each run reports progress every 0.1 s for that long before its
image, as a sampler does). Figures per backend, median of rounds (backends alternate within
a round): process CPU ms per job (``time.process_time``: this process does all the client
work) and, on PostgreSQL, the backends' CPU and transactions per job (as ``bench.scaleout``
counts them). The manager on PostgreSQL runs with a holder (leases, stored events), as a
coordinator does; ``--pg-artifacts`` puts its artifact index in the job schema too, as a
coordinator has it (the bytes stay in a local folder).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from aiserver.artifacts.index import PostgresArtifactIndex
from aiserver.artifacts.store import ArtifactStore
from aiserver.jobs.manager import JobManager
from aiserver.jobs.model import Finished, InputRef, Stage
from aiserver.jobs.scheduler import SchedulerSettings
from aiserver.jobs.store import JobStore, SqliteJobStore, new_holder_id
from aiserver.jobs.store.postgres import PostgresJobStore
from aiserver.providers.base import GeneratedImage, ProviderProgress, RunSink, WorkItem
from aiserver.spool import InputSpool
from aiserver.tasks import ImageToImageSpec, TaskKind, TaskSpec
from bench import scaleout
from bench.common import drop_schema


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed % 256, (seed // 256) % 256, 7)).save(buf, "PNG")
    return buf.getvalue()


class InstantProvider:
    """Progress, a checkpoint and one image per run, at once; or, with ``run_s``, progress
    every 0.1 s for that long before the image (a sampler's steps)."""

    name = "instant"

    def __init__(self, run_s: float = 0.0) -> None:
        self.run_s = run_s

    def supports(self, task: TaskKind) -> bool:
        return True

    def can_run(self, task: TaskKind, spec: TaskSpec) -> bool:
        return True

    def unavailable_reason(self, task: TaskKind, spec: TaskSpec) -> str:
        return ""

    def load(self) -> int:
        return 0

    def capacity(self) -> int:
        return 1000

    def refusal(self, task: TaskKind, spec: TaskSpec) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def run(self, work: WorkItem, sink: RunSink) -> None:
        await sink.progress(ProviderProgress(Stage.RUNNING, 0.0))
        await sink.checkpoint({"agent": "a", "prompt_id": work.job_id})
        await sink.progress(ProviderProgress(Stage.RUNNING, 0.5, step=1, max_steps=2))
        steps = round(self.run_s / 0.1)
        for step in range(steps):
            await asyncio.sleep(0.1)
            await sink.progress(
                ProviderProgress(Stage.RUNNING, (step + 1) / steps, step=step + 1, max_steps=steps)
            )
        seed = int(hashlib.sha256(work.job_id.encode()).hexdigest()[:6], 16)
        await sink.image(GeneratedImage(_png(seed), "out.png", "image/png", 8, 8, seed=seed))


async def _round(
    kind: str,
    root: Path,
    jobs: int,
    concurrency: int,
    pg_artifacts: bool = False,
    run_s: float = 0.0,
) -> dict[str, float]:
    spool = InputSpool(root / "spool")
    data = _png(1)
    sha = hashlib.sha256(data).hexdigest()
    path = spool.path_for(sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    ref = InputRef("image", "in.png", sha, len(data), "image/png", 8, 8)
    schema = f"j_{uuid.uuid4().hex[:12]}"
    store: JobStore
    holder = None
    if kind == "postgres":
        store = await PostgresJobStore.open(scaleout.BENCH_URL, schema=schema)
        holder = new_holder_id()
    else:
        store = await SqliteJobStore.open(root / "jobs.sqlite3")
    index = None
    if kind == "postgres" and pg_artifacts:
        index = PostgresArtifactIndex(scaleout.BENCH_URL, schema=schema)
    artifacts = ArtifactStore(root / "artifacts", index=index)
    # As the service runs it (per-key limit 100); inputs outlive the run.
    settings = SchedulerSettings(spool_grace_s=3600.0, max_active_per_owner=100)
    manager = JobManager(store, spool, artifacts, [InstantProvider(run_s)], settings, holder=holder)
    await manager.start()
    spec = ImageToImageSpec(positive_prompt="a cat " * 20, seed=1)

    async def caller(todo: Iterator[int]) -> None:
        for _ in todo:
            job, _ = await manager.submit(
                owner="alice",
                task=TaskKind.IMAGE_TO_IMAGE,
                spec=spec,
                inputs=[ref],
                ref_id="",
                tag="",
                reply_to="",
            )
            async for event in manager.subscribe(job.id):
                if isinstance(event.kind, Finished):
                    break

    try:
        warmed = range(2 * concurrency)
        warm = iter(warmed)
        await asyncio.gather(*(caller(warm) for _ in range(concurrency)))
        todo = iter(range(jobs))
        before = await scaleout._settled_counters() if kind == "postgres" else None
        cpu = time.process_time()
        await asyncio.gather(*(caller(todo) for _ in range(concurrency)))
        cpu = time.process_time() - cpu
        after = await scaleout._database_counters() if kind == "postgres" else None
    finally:
        await manager.stop(1.0)
        await store.close()
        await artifacts.close()
    figures = {"cpu_ms_per_job": cpu * 1000 / jobs}
    if before is not None and after is not None:
        await asyncio.sleep(0.5)  # the pool's backends report when idle or gone
        after |= {k: v for k, v in (await scaleout._database_counters()).items() if k != "cpu"}
        figures["postgres_cpu_ms_per_job"] = (after["cpu"] - before["cpu"]) * 1000 / jobs
        figures["postgres_xacts_per_job"] = (after["xacts"] - before["xacts"]) / jobs
        figures["postgres_rows_written_per_job"] = (after["written"] - before["written"]) / jobs
        # Which rows (inserted, updated, HOT-updated, deleted per table), counted from the
        # schema's start (a table's counts reach the statistics late): warm-up included.
        moved = scaleout.per_job(await scaleout._table_writes(schema), {}, jobs + len(warmed))
        figures |= {f"rows {k}": v for k, v in moved.items()}
        await drop_schema(scaleout.BENCH_URL, schema)
    return figures


DATABASE = os.environ.get("BENCH_JOB_PATH_DATABASE", "bench_job_path")
"""Of this script's own (two runs at once on one server need two)."""


async def _main(
    jobs: int, concurrency: int, rounds: int, pg_artifacts: bool, run_s: float = 0.0
) -> dict[str, Any]:
    # scaleout's database helpers, on a database of this script's own: its counters (and
    # backends' CPU) must see no other run.
    scaleout.DATABASE = DATABASE
    scaleout.BENCH_URL = scaleout.BENCH_URL.rsplit("/", 1)[0] + f"/{DATABASE}"
    await scaleout._ensure_database()
    got: dict[str, dict[str, list[float]]] = {}
    for n in range(rounds):
        for kind in ("sqlite", "postgres") if n % 2 == 0 else ("postgres", "sqlite"):
            root = Path(tempfile.mkdtemp(prefix="bench-job-path-"))
            try:
                figures = await _round(kind, root, jobs, concurrency, pg_artifacts, run_s)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            for name, value in figures.items():
                got.setdefault(kind, {}).setdefault(name, []).append(value)
    return {
        kind: {name: round(statistics.median(v), 3) for name, v in figures.items()}
        | {"rounds": {name: [round(x, 3) for x in v] for name, v in figures.items()}}
        for kind, figures in got.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--census", type=Path, help="statements sent, by statement (JSON)")
    parser.add_argument(
        "--pg-artifacts", action="store_true", help="the artifact index in PostgreSQL too"
    )
    parser.add_argument(
        "--run-s", type=float, default=0.0, help="each run's length (progress every 0.1 s)"
    )
    args = parser.parse_args()
    if args.census is not None:
        from bench.sql_census import install

        install(args.census)
    figures = asyncio.run(
        _main(args.jobs, args.concurrency, args.rounds, args.pg_artifacts, args.run_s)
    )
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
