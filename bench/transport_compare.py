"""ReadArtifact (or an upload) of two source trees, each in its own process, alternated:
process CPU per read against bare grpcio in the same process.

    python -m bench.transport_compare OTHER_TREE [--pairs 3] [--rounds 15] [--mib 64] [--upload]

Each run starts one tree's own service (``bench.common.running_service``) and a bare grpcio
server sending the same bytes from memory in the same process, then reads a stored artifact
of ``--mib`` MiB in 1 MiB chunks through the tree's ``AsyncClient.stream_artifact``, through
the generated stub (protobuf's parse), and whole with ``read_artifact``, each alternating with
the bare read, ``--rounds`` times. It prints CPU ms per read (``time.process_time``: every
thread, client and servers) and the median per-round ratio bare / service. The parent runs
this tree and ``OTHER_TREE`` (e.g. ``git archive main | tar -x -C /tmp/main``) alternately,
``--pairs`` times: on a shared machine the ratio within a run is what to compare.

``--upload``: instead, ``ConvertImage`` of a ``--mib`` MiB BMP in 1 MiB chunks (messages in
wire form before the clock) on a service whose ``max_pixels`` refuses it once received (the
upload path without image work, as ``bench/transport.py`` does), against a bare
client-streaming method taking the same chunks; CPU and wall clock per upload.
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

from PIL import Image

MIB = 1024 * 1024
HERE = Path(__file__).resolve()


async def _child(mib: int, rounds: int) -> dict[str, Any]:
    # Imported here: the child's PYTHONPATH picks the tree under test.
    import grpc
    from imagetasks.v1 import artifact_service_pb2 as apb
    from imagetasks.v1 import artifact_service_pb2_grpc

    import aiserver
    from aiserver.client import AsyncClient
    from bench.common import running_service

    data = os.urandom(mib * MIB)
    chunks = [data[i : i + MIB] for i in range(0, len(data), MIB)]

    async def bare_read(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    tmp = Path(tempfile.mkdtemp(prefix="transport-compare-"))
    try:
        async with running_service(tmp / "service", chunk_bytes=MIB, http_enabled=False) as svc:
            ref = await svc.artifacts.put(
                data,
                file_name="a.bmp",
                mime_type="image/bmp",  # the store keeps any bytes under an image type
                width=1,
                height=1,
                seed=None,
                provider="bench",
                job_id="bench",
                owner="",
            )
            limit = svc.settings.max_message_bytes
            options = [
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
            bare = grpc.aio.server(options=[*options, ("grpc.so_reuseport", 0)])
            bare.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        "bench.Bytes", {"Read": grpc.unary_stream_rpc_method_handler(bare_read)}
                    ),
                )
            )
            port = bare.add_insecure_port("127.0.0.1:0")
            await bare.start()
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{svc.grpc_port}", options=options) as sch,
                grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as bch,
            ):
                client = AsyncClient(channel=sch)
                stub = artifact_service_pb2_grpc.ArtifactServiceStub(sch)
                read_bare = bch.unary_stream("/bench.Bytes/Read")

                async def bare_call() -> int:
                    return sum([len(c) async for c in read_bare(b"")])

                async def client_call() -> int:
                    return sum([len(c) async for c in client.stream_artifact(ref.name)])

                async def stub_call() -> int:
                    request = apb.ReadArtifactRequest(name=ref.name)
                    return sum([len(m.data) async for m in stub.ReadArtifact(request)])

                async def whole_call() -> int:
                    return len(await client.read_artifact(ref.name))

                steps: dict[str, Callable[[], Awaitable[int]]] = {
                    "bare": bare_call,
                    "client": client_call,
                    "stub": stub_call,
                    "read_artifact": whole_call,
                }
                cpu: dict[str, list[float]] = {key: [] for key in steps}
                for step in steps.values():  # warm-up, and every path reads every byte
                    if await step() != len(data):
                        raise RuntimeError("a read lost bytes")
                for n in range(rounds):
                    for key in list(steps) if n % 2 == 0 else list(steps)[::-1]:
                        start = time.process_time()
                        await steps[key]()
                        cpu[key].append((time.process_time() - start) * 1000)
            await bare.stop(0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "tree": os.path.dirname(os.path.dirname(os.path.dirname(aiserver.__file__))),
        "load": [round(x, 1) for x in os.getloadavg()],
        "cpu_ms": {k: round(statistics.median(v), 1) for k, v in cpu.items()},
        "ratio": {
            k: round(statistics.median([b / s for b, s in zip(cpu["bare"], v, strict=True)]), 3)
            for k, v in cpu.items()
            if k != "bare"
        },
    }


async def _child_upload(mib: int, rounds: int) -> dict[str, Any]:
    import grpc
    from imagetasks.v1 import common_pb2, tasks_pb2
    from imagetasks.v1 import transform_service_pb2 as tpb

    import aiserver
    from bench.common import encode, running_service

    width = 4096
    height = mib * MIB // (width * 3)
    data = encode(Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)), "BMP")
    chunks = [data[i : i + MIB] for i in range(0, len(data), MIB)]
    params = tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
    messages = [tpb.ConvertImageRequest(params=params).SerializeToString()] + [
        tpb.ConvertImageRequest(
            chunk=common_pb2.FileChunk(field="image", data=c, file_name="big.bmp")
        ).SerializeToString()
        for c in chunks
    ]

    async def bare_write(requests: AsyncIterator[bytes], context: Any) -> bytes:
        return str(sum([len(r) async for r in requests])).encode()

    tmp = Path(tempfile.mkdtemp(prefix="transport-compare-"))
    try:
        async with running_service(
            tmp / "service",
            max_upload_bytes=len(data) * 2,
            chunk_bytes=MIB,
            http_enabled=False,
            max_pixels=width * height // 2,  # refused by the header check once received
        ) as svc:
            limit = svc.settings.max_message_bytes
            options = [
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
            bare = grpc.aio.server(options=[*options, ("grpc.so_reuseport", 0)])
            bare.add_generic_rpc_handlers(
                (
                    grpc.method_handlers_generic_handler(
                        "bench.Bytes",
                        {"Write": grpc.stream_unary_rpc_method_handler(bare_write)},
                    ),
                )
            )
            port = bare.add_insecure_port("127.0.0.1:0")
            await bare.start()
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{svc.grpc_port}", options=options) as sch,
                grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as bch,
            ):
                convert = sch.stream_stream("/imagetasks.v1.TransformService/ConvertImage")
                write_bare = bch.stream_unary("/bench.Bytes/Write")

                async def bare_call() -> int:
                    call = write_bare()
                    for c in chunks:
                        await call.write(c)
                    await call.done_writing()
                    return int(await call)

                async def upload_call() -> int:
                    call = convert()
                    for m in messages:
                        await call.write(m)
                    await call.done_writing()
                    try:
                        async for _ in call:
                            pass
                    except grpc.aio.AioRpcError as err:
                        if "pixels" not in (err.details() or ""):
                            raise
                        return len(data)
                    raise RuntimeError("the upload was expected to be refused once received")

                steps: dict[str, Callable[[], Awaitable[int]]] = {
                    "bare": bare_call,
                    "upload": upload_call,
                }
                cpu: dict[str, list[float]] = {key: [] for key in steps}
                wall: dict[str, list[float]] = {key: [] for key in steps}
                for step in steps.values():
                    if await step() != len(data):
                        raise RuntimeError("an upload lost bytes")
                for n in range(rounds):
                    for key in list(steps) if n % 2 == 0 else list(steps)[::-1]:
                        start, start_wall = time.process_time(), time.perf_counter()
                        await steps[key]()
                        cpu[key].append((time.process_time() - start) * 1000)
                        wall[key].append((time.perf_counter() - start_wall) * 1000)
            await bare.stop(0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "tree": os.path.dirname(os.path.dirname(os.path.dirname(aiserver.__file__))),
        "load": [round(x, 1) for x in os.getloadavg()],
        "cpu_ms": {k: round(statistics.median(v), 1) for k, v in cpu.items()},
        "wall_ms": {k: round(statistics.median(v), 1) for k, v in wall.items()},
        "cpu_ratio": _ratios(cpu["bare"], cpu["upload"]),
        "wall_ratio": _ratios(wall["bare"], wall["upload"]),
    }


def _ratios(bare: list[float], service: list[float]) -> list[float]:
    """Median, min and max of bare / service per round."""
    ratios = [b / s for b, s in zip(bare, service, strict=True)]
    return [round(statistics.median(ratios), 3), round(min(ratios), 3), round(max(ratios), 3)]


def _run(tree: Path, mib: int, rounds: int, upload: bool) -> dict[str, Any]:
    from bench.common import run_in_tree  # the parent's own (a child imports its tree's)

    what = ["--upload"] if upload else []
    return run_in_tree(
        str(HERE), tree, "--child", "--mib", str(mib), "--rounds", str(rounds), *what
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", nargs="?", type=Path, help="the other source tree")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--upload", action="store_true", help="measure the upload instead")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = _child_upload if args.upload else _child
        print(json.dumps(asyncio.run(child(args.mib, args.rounds))))
        return
    if args.other is None:
        parser.error("give the other source tree")
    this = HERE.parents[1]
    for _ in range(args.pairs):
        for tree in (args.other.resolve(), this):
            print(json.dumps(_run(tree, args.mib, args.rounds, args.upload)), flush=True)


if __name__ == "__main__":
    main()
