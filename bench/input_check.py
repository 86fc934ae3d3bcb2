"""A small job input's check from the bytes the spool kept against the same check reading the
spooled file back (what the API did before ``SpooledFile.content``), in one process.

    python -m bench.input_check [--rounds 7] [--files 100]

Per round and way: ``--files`` different 32 px PNGs spooled (hashed, one chunk, as the API
writes a job input), then each checked by ``JobCalls.inputs``; the process's CPU
(``time.process_time``) over the checks alone, in µs per check. The two ways alternate, and
which goes first turns each round. Prints each round and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from aiserver.api.job_calls import JobCalls, SubmitLimits
from aiserver.api.uploads import Upload
from aiserver.imaging import ImageLimits
from aiserver.spool import InputSpool, SpooledFile, UploadBudget
from aiserver.workers import BlockingPool
from bench.client_loop import Inputs

WAYS = ("kept bytes", "file")


async def _spool(spool: InputSpool, pngs: list[bytes]) -> list[SpooledFile]:
    out = []
    for png in pngs:
        writer = spool.open("image", "in.png", UploadBudget(1 << 30))
        await writer.write(png)
        out.append(await writer.finish())
    return out


async def _run(rounds: int, files: int) -> str:
    inputs = Inputs()
    limits = SubmitLimits(
        max_upload_bytes=1 << 30,
        max_prompt_chars=1000,
        max_batch_size=1,
        chunk_bytes=1 << 20,
        image=ImageLimits(),
    )
    per_check: dict[str, list[float]] = {way: [] for way in WAYS}
    pool = BlockingPool(1)
    lines = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-input-check-") as tmp:
            spool = InputSpool(Path(tmp))
            unused = cast(Any, None)  # only the input checks run: no store
            manager = cast(Any, SimpleNamespace(holds_inputs=False))
            calls = JobCalls(
                manager=manager, artifacts=unused, spool=spool, pool=pool, limits=limits
            )
            for r in range(-1, rounds):  # round -1: warm-up, not counted
                order = WAYS if r % 2 == 0 else WAYS[::-1]
                for way in order:
                    spooled = await _spool(spool, inputs.take(files))
                    if way == "file":
                        for one in spooled:  # read back from the file, as before
                            if one.content is not None:
                                one.path.write_bytes(one.content)
                            one.content, one.written = None, True
                    cpu = time.process_time()
                    for one in spooled:
                        await calls.inputs(Upload(None, {"image": one}))
                    spent = (time.process_time() - cpu) / files * 1e6
                    for one in spooled:
                        one.path.unlink(missing_ok=True)
                    if r >= 0:
                        per_check[way].append(spent)
                        lines.append(f"round {r} {way}: {spent:.0f} µs per check")
    finally:
        pool.close()
    for way, values in per_check.items():
        shown = " ".join(f"{v:.0f}" for v in values)
        lines.append(f"{way}: median {statistics.median(values):.0f} µs [{shown}]")
    ratios = [k / f for k, f in zip(per_check[WAYS[0]], per_check[WAYS[1]], strict=True)]
    lines.append(
        f"kept bytes / file, each round: median {statistics.median(ratios):.3f}"
        f" [{min(ratios):.3f}..{max(ratios):.3f}]"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--files", type=int, default=100)
    args = parser.parse_args()
    print(asyncio.run(_run(args.rounds, args.files)))


if __name__ == "__main__":
    main()
