"""CPU of the upload writer for uploads used once, this tree against another, alternating.

    python -m bench.spool_writer_cpu OTHER_TREE [--rounds 9] [--uploads 200] [--only NAME]

Each round runs every case once in a fresh process of either tree (``PYTHONPATH=<tree>/src``),
the trees alternating; a case is ``--uploads`` uploads written through ``InputSpool.open(...,
hashed=False)`` as 64 KiB chunks, finished, read whole (the held reader, or the file), and
discarded. Process CPU per upload (``time.process_time``: every thread); medians [min..max].
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CASES = {
    # name: (budget MiB, share MiB or None, upload bytes)
    "no room (budget 0), 200 KiB": (0, None, 200 * 1024),
    "held, 1.2 MB": (256, None, 1_200_000),
    "spilled past its share, 8 MiB": (64, 2, 8 << 20),
}

_CHILD = r"""
import asyncio, json, os, sys, tempfile, time
from pathlib import Path
from aiserver.spool import InputSpool, UploadBudget
from aiserver.spool_memory import SpoolMemory

budget_mib, share_mib, size, uploads = json.loads(sys.argv[1])

async def main() -> float:
    root = Path(tempfile.mkdtemp(prefix="spoolcpu-"))
    share = None if share_mib is None else share_mib << 20
    spool = InputSpool(root, memory=SpoolMemory(budget_mib << 20, share))
    data = os.urandom(size)
    chunks = [data[i : i + 65536] for i in range(0, size, 65536)]
    async def one() -> None:
        w = spool.open("image", "a.bmp", UploadBudget(1 << 30), hashed=False)
        for c in chunks:
            await w.write(c)
        done = await w.finish()
        if done.held is not None:
            with done.held.open() as fh:
                assert len(fh.read()) == size
            done.held.release()
        else:
            with open(done.path, "rb") as fh:
                assert len(fh.read()) == size
            done.path.unlink()
        w.discard()
    for _ in range(5):
        await one()
    start = time.process_time()
    for _ in range(uploads):
        await one()
    return (time.process_time() - start) / uploads

print(json.dumps(asyncio.run(main())))
"""


def _run(tree: Path, case: tuple[int, int | None, int], uploads: int) -> float:
    env = os.environ | {"PYTHONPATH": str(tree / "src")}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([*case, uploads])],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(json.loads(out)) * 1000


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("other", type=Path)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--uploads", type=int, default=200)
    p.add_argument("--only", default="", help="the cases whose name contains this")
    args = p.parse_args()
    cases = {k: v for k, v in CASES.items() if args.only in k}
    here = Path(__file__).resolve().parent.parent
    trees = {"other": args.other.resolve(), "this": here}
    got: dict[str, dict[str, list[float]]] = {c: {t: [] for t in trees} for c in cases}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name, case in cases.items():
            for t in order:
                got[name][t].append(_run(trees[t], case, args.uploads))
    print(f"load average {os.getloadavg()}")
    for name, per_tree in got.items():
        parts = []
        for t, v in per_tree.items():
            parts.append(f"{t} {statistics.median(v):.3f} [{min(v):.3f}..{max(v):.3f}]")
        print(f"{name}: ms CPU per upload: " + ", ".join(parts))


if __name__ == "__main__":
    main()
