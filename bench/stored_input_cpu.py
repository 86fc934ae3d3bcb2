"""CPU per job of a job input's way through the embedded store: a spool file or a row.

    python -m bench.stored_input_cpu [--jobs 500] [--rounds 5] [--sizes 1344,74215,200000]
        [--dir DIR]

Per job, both ways do what the service does for one input of that size, and the job's own
create and final save on a real :class:`SqliteJobStore`:
``file``: the upload finished by the spool's writer and committed (its file created, written,
renamed), the job created (its ``job_inputs`` reference), the input read back for the agent,
the job ended, the file deleted; ``stored``: the upload finished (no file), the job created
with the input's bytes in the same transaction, the job ended (the trigger deletes the row).
Process CPU (``time.process_time``: the store's checkpoint thread too), rounds alternating,
medians. ``--dir``: where the data goes (default: a new folder under the system's temp
folder, as the service benches put theirs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from aiserver.jobs.ids import new_job_id
from aiserver.jobs.model import InputRef, Job, JobState
from aiserver.jobs.store import JobRecord, SqliteJobStore
from aiserver.spool import InputSpool, UploadBudget
from aiserver.tasks import ImageUpscaleSpec, TaskKind


def _job(ref: InputRef) -> Job:
    now = datetime.now(UTC)
    job_id = new_job_id(now)
    return Job(
        id=job_id,
        task=TaskKind.IMAGE_UPSCALE,
        spec=ImageUpscaleSpec(),
        state=JobState.QUEUED,
        created=now,
        updated=now,
        owner="bench",
        ref_id=job_id,
        inputs=[ref],
    )


async def _way(root: Path, stored: bool, size: int, jobs: int) -> float:
    spool = InputSpool(root / "spool")
    store = await SqliteJobStore.open(root / "jobs.db")
    base = os.urandom(size)
    try:
        started = time.process_time()
        for n in range(jobs):
            data = n.to_bytes(8, "big") + base[8:]  # a different input every job
            writer = spool.open("image", "in.png", UploadBudget(1 << 30))
            await writer.write(data)
            spooled = await writer.finish()
            sha = spooled.sha256
            ref = InputRef("image", "in.png", sha, size, "image/png", 8, 8, stored=stored)
            record = JobRecord(_job(ref), 1)
            if stored:
                await store.create(record, input_bytes={sha: data})
            else:
                spool.unpin(spool.commit(spooled))
                await store.create(record)
                spool.path_for(sha).read_bytes()  # the agent's upload reads it back
            record.job.state = JobState.SUCCEEDED
            await store.save(record)
            if not stored:
                spool.delete_local(sha)
        return (time.process_time() - started) * 1e6 / jobs
    finally:
        await store.close()


async def _main(jobs: int, rounds: int, sizes: list[int], where: Path | None) -> str:
    lines = [f"µs of process CPU per job, {rounds} rounds x {jobs} jobs, medians [min..max]"]
    for size in sizes:
        got: dict[str, list[float]] = {"file": [], "stored": []}
        for r in range(rounds):
            order = ["file", "stored"] if r % 2 == 0 else ["stored", "file"]
            for way in order:
                root = Path(tempfile.mkdtemp(prefix="bench-stored-input-", dir=where))
                try:
                    got[way].append(await _way(root, way == "stored", size, jobs))
                finally:
                    shutil.rmtree(root, ignore_errors=True)
        parts = [
            f"{way} {statistics.median(v):.0f} [{min(v):.0f}..{max(v):.0f}]"
            for way, v in got.items()
        ]
        lines.append(f"input {size} bytes: " + ", ".join(parts))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="1344,74215,200000")
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(asyncio.run(_main(args.jobs, args.rounds, sizes, args.dir)))


if __name__ == "__main__":
    main()
