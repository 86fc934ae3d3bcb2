"""The artifact store's put alone, on each index: CPU per put, client and database.

    python -m bench.artifact_put [--puts 2000] [--concurrency 16] [--rounds 3]

``--puts`` small PNGs, one in four the bytes of an earlier put (a retry, an identical output),
put through :class:`ArtifactStore` by ``--concurrency`` callers on the SQLite index and on the
PostgreSQL index (a fresh schema per round), both with the bytes in a local folder so that
what differs is the index. Figures per index, median of rounds (indexes alternate within a
round): this process's CPU µs per put (``time.process_time``: it does all the client work)
and, on PostgreSQL, the backends' CPU µs and transactions per put, on a database of this
script's own (``bench_artifact_put``: its counters see no other run), as ``bench.scaleout``
counts them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

from aiserver.artifacts.index import ArtifactIndex, PostgresArtifactIndex
from aiserver.artifacts.store import ArtifactStore
from bench import scaleout
from bench.common import drop_schema

DATABASE = "bench_artifact_put"


def _pngs(count: int) -> list[bytes]:
    out: list[bytes] = []
    for n in range(count):
        if n % 4 == 3:
            out.append(out[n // 2])  # bytes stored before
            continue
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (n % 256, (n // 256) % 256, 9)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


async def _round(kind: str, root: Path, pngs: list[bytes], concurrency: int) -> dict[str, float]:
    schema = f"a_{uuid.uuid4().hex[:12]}"
    index: ArtifactIndex | None = None
    if kind == "postgres":
        index = await PostgresArtifactIndex.open(scaleout.BENCH_URL, schema=schema)
    store = ArtifactStore(root, index=index)
    todo = iter(enumerate(pngs))

    async def caller() -> None:
        for n, data in todo:
            await store.put(
                data,
                file_name="out.png",
                mime_type="image/png",
                width=8,
                height=8,
                seed=n,
                provider="bench",
                job_id=f"job-{n}",
                owner="alice",
            )

    try:
        before = await scaleout._settled_counters() if kind == "postgres" else None
        cpu = time.process_time()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        cpu = time.process_time() - cpu
        after = await scaleout._database_counters() if kind == "postgres" else None
    finally:
        await store.close()
    figures = {"cpu_us_per_put": cpu * 1e6 / len(pngs)}
    if before is not None and after is not None:
        await asyncio.sleep(0.5)  # the pool's backends report when idle or gone
        after |= {k: v for k, v in (await scaleout._database_counters()).items() if k != "cpu"}
        figures["postgres_cpu_us_per_put"] = (after["cpu"] - before["cpu"]) * 1e6 / len(pngs)
        figures["postgres_xacts_per_put"] = (after["xacts"] - before["xacts"]) / len(pngs)
        await drop_schema(scaleout.BENCH_URL, schema)
    return figures


async def _main(puts: int, concurrency: int, rounds: int) -> dict[str, Any]:
    scaleout.DATABASE = DATABASE
    scaleout.BENCH_URL = scaleout.BENCH_URL.rsplit("/", 1)[0] + f"/{DATABASE}"
    await scaleout._ensure_database()
    pngs = _pngs(puts)
    got: dict[str, dict[str, list[float]]] = {}
    for n in range(rounds):
        for kind in ("sqlite", "postgres") if n % 2 == 0 else ("postgres", "sqlite"):
            root = Path(tempfile.mkdtemp(prefix="bench-artifact-put-"))
            try:
                figures = await _round(kind, root, pngs, concurrency)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            for name, value in figures.items():
                got.setdefault(kind, {}).setdefault(name, []).append(value)
    return {
        kind: {name: round(statistics.median(v), 1) for name, v in figures.items()}
        | {"rounds": {name: [round(x, 1) for x in v] for name, v in figures.items()}}
        for kind, figures in got.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--puts", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(_main(args.puts, args.concurrency, args.rounds)), indent=1))


if __name__ == "__main__":
    main()
