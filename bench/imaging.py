"""Image tasks: CropImage and ConvertImage over gRPC against the same work in-process, and
variants (cold and cached) against thumbor.

- Source: a synthetic 12 MP (4000x3000) photo-like JPEG, quality 90.
- Crop / convert: gRPC calls to the service (upload in 1 MiB chunks, result streamed back)
  against ``aiserver.imaging.crop`` / ``convert`` called directly on the same file, in this
  process: the same Pillow work through the same code, so the ratio is what the call around it
  costs. Crop keeps the centre 2000x1500 (JPEG out); convert to WebP and to PNG (default
  qualities). A crop gets three times the rounds (it is ~50 ms and the call around it a tenth
  of that). Beside them, the floor of any gRPC service doing this work: a bare grpcio method
  that reads the same request messages and answers the service's own reply messages
  (serialized ahead of time), through the same client code, its time added to the in-process
  work of the same round; and the process CPU of each side.
- Variants: the JPEG stored with ``service.artifacts.put``; ``width=256`` (WebP, quality 80)
  through the HTTP route ``/variants/width=256/...`` with the cache (disk and memory) emptied
  before each request, off the clock ("cold"), against thumbor's
  ``/unsafe/256x0/filters:format(webp)/<url>`` (quality 80, no storage, no result storage, the
  JPEG fetched from a local file server). Both use JPEG draft decoding; the service encodes
  WebP with less effort (``fast_encode``: method 2, thumbor Pillow's default 4; same quality
  setting, a few percent more bytes: the row's note gives both sizes). The same render called
  in-process (``aiserver.imaging.resize``, same settings) is the floor. Then cached ("warm")
  requests: HTTP and gRPC ``GetVariant``, p50, each beside its floor: the same bytes answered
  by a bare aiohttp route (through the same httpx client) and a bare grpcio method (also
  sending GetVariant's info message first, as the contract has it: two messages).

The service runs in this process with its default image threads (one per CPU). Timed sides
alternate within every round.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import httpx
from imagetasks.v1 import (
    artifact_service_pb2,
    artifact_service_pb2_grpc,
    common_pb2,
    tasks_pb2,
    transform_service_pb2,
    transform_service_pb2_grpc,
)

from bench.common import (
    LoadWatch,
    encode,
    ms,
    percentile,
    photo_like,
    row,
    running_service,
    spread,
)
from bench.thumbor_env import Thumbor, ensure_thumbor

NAME = "imaging"
CHUNK = 1024 * 1024


def _requests(kind: str, params: Any, data: bytes) -> list[Any]:
    cls = getattr(transform_service_pb2, f"{kind}Request")
    out = [cls(params=params)]
    for i in range(0, len(data), CHUNK):
        out.append(
            cls(
                chunk=common_pb2.FileChunk(
                    field="image", data=data[i : i + CHUNK], file_name="p.jpg"
                )
            )
        )
    return out


async def _grpc_call(method: Any, messages: list[Any], replies: list[Any] | None = None) -> int:
    call = method()
    for m in messages:
        await call.write(m)
    await call.done_writing()
    size = 0
    async for msg in call:
        if replies is not None:
            replies.append(msg)
        if msg.WhichOneof("payload") == "chunk":
            size += len(msg.chunk)
    return size


@contextlib.asynccontextmanager
async def _bare_transform(replies: list[bytes]) -> AsyncIterator[grpc.aio.Channel]:
    """A bare grpcio stream-stream method: reads every request message, then answers
    ``replies`` (the service's own reply messages, serialized ahead of time); no work."""

    async def answer(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            pass
        for r in replies:
            yield r

    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 8 * CHUNK)]
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Transform", {"Call": grpc.stream_stream_rpc_method_handler(answer)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close()
        await server.stop(0)


async def _alternate(
    reps: int,
    sides: dict[str, Callable[[], Awaitable[Any]]],
    untimed: dict[str, Callable[[], Awaitable[None]]] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Time each side ``reps`` times, alternating; ``untimed[side]`` runs before each call
    of that side, off the clock (setting up a cold request). Wall and process CPU seconds."""
    out: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    prepare = untimed or {}
    for name, fn in sides.items():  # warm-up
        if name in prepare:
            await prepare[name]()
        await fn()
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            if name in prepare:
                await prepare[name]()
            cpu_start = time.process_time()
            start = time.perf_counter()
            await sides[name]()
            out[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
    return out, cpu


async def _run(quick: bool) -> dict[str, Any]:
    from aiserver.imaging import convert, crop, parse_format

    reps = 2 if quick else 7
    warm_n = 30 if quick else 300
    width, height = (1600, 1200) if quick else (4000, 3000)
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-imaging-"))
    jpeg = encode(photo_like(width, height, seed=3), "JPEG", quality=90)
    source = tmp / "files" / "photo.jpg"
    source.parent.mkdir(parents=True)
    source.write_bytes(jpeg)
    figures: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    try:
        async with running_service(tmp / "service", max_upload_bytes=256 * 1024 * 1024) as service:
            limits = service.limits
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
            transform = transform_service_pb2_grpc.TransformServiceStub(channel)
            cw, ch = width // 2, height // 2
            x, y = width // 4, height // 4
            crop_params = tasks_pb2.CropImageParams(x=x, y=y, width=cw, height=ch)
            ops: dict[str, tuple[Any, list[Any], Callable[[], Any]]] = {
                "crop": (
                    transform.CropImage,
                    _requests("CropImage", crop_params, jpeg),
                    lambda: crop(source, x=x, y=y, width=cw, height=ch, limits=limits),
                ),
            }
            for fmt, proto in (
                ("webp", common_pb2.IMAGE_FORMAT_WEBP),
                ("png", common_pb2.IMAGE_FORMAT_PNG),
            ):
                target = parse_format(fmt, "format")
                ops[f"convert_{fmt}"] = (
                    transform.ConvertImage,
                    _requests(
                        "ConvertImage", tasks_pb2.ConvertImageParams(output_format=proto), jpeg
                    ),
                    lambda target=target: convert(source, output_format=target, limits=limits),
                )
            for op, (method, messages, local) in ops.items():
                replies: list[Any] = []
                await _grpc_call(method, messages, replies)
                async with _bare_transform([r.SerializeToString() for r in replies]) as bare_ch:
                    bare_method = bare_ch.stream_stream(
                        "/bench.Transform/Call",
                        request_serializer=type(messages[0]).SerializeToString,
                        response_deserializer=type(replies[0]).FromString,
                    )

                    async def over_grpc(
                        method: Any = method, messages: list[Any] = messages
                    ) -> None:
                        await _grpc_call(method, messages)

                    async def in_process(local: Callable[[], Any] = local) -> None:
                        local()

                    async def bare(
                        method: Any = bare_method, messages: list[Any] = messages
                    ) -> None:
                        await _grpc_call(method, messages)

                    # A crop is ~50 ms: many rounds are cheap and its ratio needs them (the
                    # call around it is a tenth of it); a conversion is seconds.
                    t, cpu = await _alternate(
                        reps * 3 if op == "crop" else reps,
                        {"grpc": over_grpc, "in_process": in_process, "bare": bare},
                    )
                ratios = [p / g for g, p in zip(t["grpc"], t["in_process"], strict=True)]
                # The floor: the same work in-process plus a bare grpcio method moving the
                # same messages in and out (no work), timed in the same round.
                floor = [p / (p + b) for p, b in zip(t["in_process"], t["bare"], strict=True)]
                figures[op] = {
                    "grpc_ms": spread([ms(x) for x in t["grpc"]], 1),
                    "in_process_ms": spread([ms(x) for x in t["in_process"]], 1),
                    "bare_transport_ms": spread([ms(x) for x in t["bare"]], 2),
                    "ratio": spread(ratios, 3),
                    "floor_ratio": spread(floor, 3),
                    "cpu_ms": {k: spread([ms(x) for x in v], 1) for k, v in cpu.items()},
                    "cpu_ratio": spread(
                        [p / g for g, p in zip(cpu["grpc"], cpu["in_process"], strict=True)], 3
                    ),
                    "floor_cpu_ratio": spread(
                        [p / (p + b) for p, b in zip(cpu["in_process"], cpu["bare"], strict=True)],
                        3,
                    ),
                }
                f = figures[op]
                rows.append(
                    row(
                        f"imaging: {op} {width * height / 1e6:.0f} MP JPEG, gRPC vs in-process",
                        f["ratio"],
                        "x",
                        target=0.9,
                        baseline=f"gRPC {f['grpc_ms']['median']:.0f} ms,"
                        f" in-process {f['in_process_ms']['median']:.0f} ms",
                        note=f"{len(t['grpc'])} rounds; in process CPU"
                        f" {f['cpu_ratio']['median']:.3f}x; floor (in-process + a bare grpcio"
                        " method moving the same messages,"
                        f" {f['bare_transport_ms']['median']:.1f} ms)"
                        f" {f['floor_ratio']['median']:.3f}x, in CPU"
                        f" {f['floor_cpu_ratio']['median']:.3f}x",
                    )
                )
            await _variants(
                service, channel, jpeg, source, tmp, quick, reps, warm_n, figures, rows, notes
            )
            await channel.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "name": NAME,
        "about": __doc__.strip().split("\n\n")[0],
        "setup": {
            "source": f"{width}x{height} JPEG q90, {len(jpeg)} bytes",
            "rounds": reps,
            "warm_requests": warm_n,
            "baseline_in_process": "aiserver.imaging.crop/convert called directly",
            "ratio": "in-process time / gRPC time, per round",
        },
        "notes": notes,
        "figures": figures,
        "rows": rows,
    }


async def _variants(
    service: Any,
    channel: grpc.aio.Channel,
    jpeg: bytes,
    source: Path,
    tmp: Path,
    quick: bool,
    reps: int,
    warm_n: int,
    figures: dict[str, Any],
    rows: list[dict[str, Any]],
    notes: list[str],
) -> None:
    from PIL import Image

    with Image.open(source) as im:
        width, height = im.size
    ref = await service.artifacts.put(
        jpeg,
        file_name="photo.jpg",
        mime_type="image/jpeg",
        width=width,
        height=height,
        seed=None,
        provider="bench",
        job_id="bench",
        owner="",
    )
    rel = service.artifacts.relative_path(ref.name)
    cache = Path(service.variants.cache_root)
    http_url = f"http://127.0.0.1:{service.http_port}/variants/width=256/{rel}"

    async def empty_cache() -> None:
        await service.variants.flush()  # the last render's cache files are written after it
        shutil.rmtree(cache / ref.sha256[:2], ignore_errors=True)
        service.variants.memory.drop_source(ref.sha256)  # cold: no copy in memory either

    async with httpx.AsyncClient(timeout=120) as client:

        async def get(url: str) -> bytes:
            response = await client.get(url)
            response.raise_for_status()
            return response.content

        async def service_cold() -> None:  # the cache is emptied before, off the clock
            await get(http_url)

        stub = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
        request = artifact_service_pb2.GetVariantRequest(name=ref.name, spec="width=256")

        async def grpc_cold() -> None:
            async for _ in stub.GetVariant(request):
                pass

        from aiserver.imaging import parse_format, resize

        webp = parse_format("webp", "format")

        def render() -> bytes:
            return resize(
                source,
                width=256,
                output_format=webp,
                quality=80,
                limits=service.limits,
                fast_encode=True,  # as the variant cache renders
            ).data

        async def in_process() -> None:  # the same render, called directly in this process
            render()

        # The floor of any HTTP service rendering off its event loop: a bare aiohttp route
        # running the same render in a thread, through the same httpx client.
        floor_pool = ThreadPoolExecutor(1, thread_name_prefix="bench-floor")

        async def floor_render() -> bytes:
            return await asyncio.get_running_loop().run_in_executor(floor_pool, render)

        sides: dict[str, Callable[[], Awaitable[Any]]] = {
            "service": service_cold,
            "grpc": grpc_cold,
            "in_process": in_process,
        }
        thumbor_cm: Thumbor | None = None
        sizes = {"service": len(await get(http_url))}
        if quick:
            notes.append("quick mode: thumbor skipped")
        else:
            exe = ensure_thumbor(notes)
            if exe is None:
                notes.append("thumbor unavailable: cold variants measured without a baseline")
            else:
                thumbor_cm = Thumbor(exe, source.parent, tmp)
        if thumbor_cm is not None:
            await thumbor_cm.__aenter__()
            thumb_url = thumbor_cm.url_for(source.name, "256x0/filters:format(webp)")
            probe = await client.get(thumb_url)
            if probe.status_code != 200 or not probe.content.startswith(b"RIFF"):
                notes.append(f"thumbor answered {probe.status_code}: baseline dropped")
            else:
                sizes["thumbor"] = len(probe.content)

                async def thumbor_cold() -> None:
                    await get(thumb_url)

                sides["thumbor"] = thumbor_cold
        try:
            async with _bare_render_route(floor_render) as floor_url:

                async def floor() -> None:
                    await get(floor_url)

                sides["floor"] = floor
                t, _ = await _alternate(
                    reps, sides, untimed={"service": empty_cache, "grpc": empty_cache}
                )
        finally:
            floor_pool.shutdown()
            if thumbor_cm is not None:
                await thumbor_cm.__aexit__(None, None, None)
        cold: dict[str, Any] = {"service_ms": spread([ms(x) for x in t["service"]], 1)}
        if "thumbor" in t:
            cold["thumbor_ms"] = spread([ms(x) for x in t["thumbor"]], 1)
            cold["speedup"] = spread(
                [b / s for s, b in zip(t["service"], t["thumbor"], strict=True)], 2
            )
        cold["in_process_ms"] = spread([ms(x) for x in t["in_process"]], 1)
        cold["vs_in_process"] = spread(
            [p / s for s, p in zip(t["service"], t["in_process"], strict=True)], 3
        )
        cold["grpc_ms"] = spread([ms(x) for x in t["grpc"]], 1)
        cold["grpc_vs_in_process"] = spread(
            [p / s for s, p in zip(t["grpc"], t["in_process"], strict=True)], 3
        )
        cold["floor_ms"] = spread([ms(x) for x in t["floor"]], 1)
        cold["floor_vs_in_process"] = spread(
            [p / s for s, p in zip(t["floor"], t["in_process"], strict=True)], 3
        )
        cold["bytes"] = sizes
        figures["variant_cold"] = cold
        thumbor_note = (
            f", thumbor {cold['thumbor_ms']['median']:.0f} ms" if "thumbor_ms" in cold else ""
        )
        rows.append(
            row(
                "imaging: cold variant width=256 webp, speed-up vs thumbor",
                cold.get("speedup"),
                "x",
                target=1.2,
                baseline=f"service {cold['service_ms']['median']:.0f} ms" + thumbor_note,
                note=", ".join(f"{k} {v} B" for k, v in sizes.items())
                + ("" if "speedup" in cold else "; thumbor not run"),
            )
        )
        rows.append(
            row(
                "imaging: cold variant width=256 webp, in-process vs HTTP",
                cold["vs_in_process"],
                "x",
                target=round(1 / 1.1, 2),
                baseline=f"service {cold['service_ms']['median']:.1f} ms,"
                f" in-process {cold['in_process_ms']['median']:.1f} ms;"
                f" floor {cold['floor_vs_in_process']['median']:.3f}x"
                f" ({cold['floor_ms']['median']:.1f} ms: a bare aiohttp route rendering in a"
                " thread, same client)",
                note="within 1.1x of the same render called directly",
            )
        )
        rows.append(
            row(
                "imaging: cold variant width=256 webp, in-process vs gRPC GetVariant",
                cold["grpc_vs_in_process"],
                "x",
                baseline=f"gRPC {cold['grpc_ms']['median']:.1f} ms,"
                f" in-process {cold['in_process_ms']['median']:.1f} ms",
            )
        )

        # warm: cached variant, HTTP and gRPC
        await get(http_url)

        async def grpc_variant() -> None:
            async for _ in stub.GetVariant(request):
                pass

        # The floors: the same bytes from a bare aiohttp route (same httpx client) and a bare
        # grpcio unary-stream method (same channel options), in this process.
        body = await get(http_url)
        info = b""
        async for msg in stub.GetVariant(request):
            info = info or msg.SerializeToString()  # the first message: info
        async with _bare_servers(body, info) as (bare_http_url, bare_channel):
            bare_call: Any = bare_channel.unary_stream("/bench.Variant/Get")
            bare_call_2: Any = bare_channel.unary_stream("/bench.Variant/GetAfterInfo")

            async def bare_grpc() -> None:
                async for _ in bare_call(b""):
                    pass

            async def bare_grpc_2() -> None:
                async for _ in bare_call_2(b""):
                    pass

            calls: dict[str, Callable[[], Awaitable[Any]]] = {
                "http": lambda: get(http_url),
                "grpc": grpc_variant,
                "bare_http": lambda: get(bare_http_url),
                "bare_grpc": bare_grpc,
                "bare_grpc_2": bare_grpc_2,
            }
            warm: dict[str, list[float]] = {k: [] for k in calls}
            for _ in range(5):
                for call in calls.values():
                    await call()
            for _ in range(reps):
                for kind, call in calls.items():
                    samples = []
                    for _ in range(warm_n // reps or 1):
                        start = time.perf_counter()
                        await call()
                        samples.append(time.perf_counter() - start)
                    warm[kind].append(ms(percentile(samples, 50)))
        figures["variant_warm_p50_ms"] = {k: spread(v, 3) for k, v in warm.items()}
        warm_p50 = figures["variant_warm_p50_ms"]
        for kind, label in (("grpc", "gRPC GetVariant"), ("http", "HTTP /variants")):
            floor = warm_p50[f"bare_{kind}"]["median"]
            two = warm_p50["bare_grpc_2"]["median"]
            rows.append(
                row(
                    f"imaging: warm variant p50, {label}",
                    figures["variant_warm_p50_ms"][kind],
                    "ms",
                    target=1.0,
                    better="lower",
                    baseline=f"floor {floor:.2f} ms: bare "
                    + ("aiohttp route, same httpx client" if kind == "http" else "grpcio call")
                    + f" answering the same {len(body)} bytes"
                    + (f"; {two:.2f} ms sending the info message first" if kind == "grpc" else ""),
                )
            )
        figures["variant_computations"] = service.variants.computations


@contextlib.asynccontextmanager
async def _bare_render_route(render: Callable[[], Awaitable[bytes]]) -> AsyncIterator[str]:
    """A bare aiohttp route answering ``await render()``, nothing else."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=await render(), content_type="image/webp")

    app = web.Application()
    app.router.add_get("/v", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _bare_servers(body: bytes, info: bytes) -> AsyncIterator[tuple[str, grpc.aio.Channel]]:
    """A bare aiohttp route and a bare grpcio method that answer ``body``, nothing else; and
    a second grpcio method that sends ``info`` first, as GetVariant's contract has it."""
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="image/webp", headers={"ETag": '"x"'})

    app = web.Application()
    app.router.add_get("/v", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def answer(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield body

    async def answer_after_info(request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield info  # GetVariant's contract: an info message, then the bytes
        yield body

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Variant",
                {
                    "Get": grpc.unary_stream_rpc_method_handler(answer),
                    "GetAfterInfo": grpc.unary_stream_rpc_method_handler(answer_after_info),
                },
            ),
        )
    )
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    try:
        yield f"http://127.0.0.1:{port}/v", channel
    finally:
        await channel.close()
        await server.stop(0)
        await runner.cleanup()


def run(quick: bool) -> dict[str, Any]:
    watch = LoadWatch()
    result = asyncio.run(_run(quick))
    result["load"] = watch.done()
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
