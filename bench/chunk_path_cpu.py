"""The service's own work per chunk on the byte-moving paths, without the network, against
the least the same loop can do; this tree against another, alternating.

    python -m bench.chunk_path_cpu OTHER_TREE [--pairs 3] [--rounds 30]

Each run (a fresh process of one tree: ``bench.common.run_in_tree``) times, on the main
thread (``time.thread_time``), 64 MiB in 1 MiB chunks, sides interleaved round by round:

- ``upload``: ConvertImage request messages (in wire form) through the guard's deserializer
  (``chunk_parsing(tolerant(...))``) and ``read_upload`` into the spool memory, then
  discarded; ``upload_floor``: the same chunks as bytes copied into one warm buffer (what
  the bench's "bare server keeping the bytes" does); ``parse``: the deserializer alone.
- ``read``: a 64 MiB blob read through ``LocalBlobStore.read`` with ReadArtifact's frame
  (each chunk a message in wire form); ``read_floor``: ``os.pread`` of the same file.

The difference between a side and its floor is the service's Python per 64 chunks: what is
left of it, and what a change saves, is below the noise of the end-to-end rows on a shared
machine (bench/README, helper "bytes4").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
HERE = Path(__file__).resolve()


async def _child(rounds: int) -> dict[str, Any]:
    # Imported here: the child's PYTHONPATH picks the tree under test.
    from imagetasks.v1 import common_pb2, tasks_pb2
    from imagetasks.v1 import transform_service_pb2 as tpb

    import aiserver
    from aiserver.api.artifacts import _READ_FRAME
    from aiserver.api.malformed import tolerant
    from aiserver.api.uploads import read_upload
    from aiserver.api.wire import chunk_parsing
    from aiserver.blobs.local import LocalBlobStore
    from aiserver.spool import InputSpool, UploadBudget

    data = os.urandom(64 * MIB - 4096)
    chunks = [data[i : i + MIB] for i in range(0, len(data), MIB)]
    params = tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
    messages = [tpb.ConvertImageRequest(params=params).SerializeToString()] + [
        tpb.ConvertImageRequest(
            chunk=common_pb2.FileChunk(field="image", data=c, file_name="big.bmp")
        ).SerializeToString()
        for c in chunks
    ]
    parse = chunk_parsing(
        tolerant(tpb.ConvertImageRequest.FromString), tpb.ConvertImageRequest.FromString
    )
    assert parse is not None
    tmp = Path(tempfile.mkdtemp(prefix="chunk-path-cpu-"))
    try:
        spool = InputSpool(tmp / "spool")
        blobs = LocalBlobStore(tmp / "blobs")
        await blobs.put("a/blob.bin", data)
        fd = os.open(tmp / "blobs" / "a" / "blob.bin", os.O_RDONLY)
        held = bytearray(len(data))

        async def requests() -> AsyncIterator[Any]:
            for m in messages:
                yield parse(m)

        async def upload() -> None:
            got = await read_upload(
                requests(),
                spool=spool,
                budget=UploadBudget(128 * MIB),
                inputs=("image",),
                hashed=False,
            )
            got.discard()

        async def raw_chunks() -> AsyncIterator[bytes]:
            for c in chunks:
                yield c

        async def upload_floor() -> None:
            view, at = memoryview(held), 0
            async for c in raw_chunks():
                view[at : at + len(c)] = c
                at += len(c)

        async def parse_only() -> None:
            async for _ in requests():
                pass

        async def read() -> None:
            async for _ in blobs.read("a/blob.bin", 0, None, MIB, frame=_READ_FRAME):
                pass

        async def preads() -> AsyncIterator[bytes]:
            for offset in range(0, len(data), MIB):
                yield os.pread(fd, MIB, offset)

        async def read_floor() -> None:
            async for _ in preads():
                pass

        steps: dict[str, Callable[[], Awaitable[None]]] = {
            "upload": upload,
            "upload_floor": upload_floor,
            "parse": parse_only,
            "read": read,
            "read_floor": read_floor,
        }
        ms: dict[str, list[float]] = {key: [] for key in steps}
        for step in steps.values():  # warm-up: blocks kept, page cache filled
            await step()
        for n in range(rounds):
            for key in list(steps) if n % 2 == 0 else list(steps)[::-1]:
                start = time.thread_time()
                await steps[key]()
                ms[key].append((time.thread_time() - start) * 1000)
        os.close(fd)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    median = {k: round(statistics.median(v), 2) for k, v in ms.items()}
    return {
        "tree": os.path.dirname(os.path.dirname(os.path.dirname(aiserver.__file__))),
        "load": round(os.getloadavg()[0], 1),
        "ms_per_64_mib": median,
        "upload_over_floor": round(median["upload"] - median["upload_floor"], 2),
        "read_over_floor": round(median["read"] - median["read_floor"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", nargs="?", type=Path, help="the other source tree")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(_child(args.rounds))))
        return
    if args.other is None:
        parser.error("give the other source tree")
    from bench.common import run_in_tree  # the parent's own (a child imports its tree's)

    this = HERE.parents[1]
    for _ in range(args.pairs):
        for tree in (args.other.resolve(), this):
            result = run_in_tree(str(HERE), tree, "--child", "--rounds", str(args.rounds))
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
