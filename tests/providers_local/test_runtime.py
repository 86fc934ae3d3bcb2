"""Cancellation, the event loop, concurrency, choice of jobs, errors, settings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from aiserver.errors import ErrorKind, ServiceError
from aiserver.providers.base import Cause, ProviderProgress, ProviderUnavailable
from aiserver.providers.local import LocalUpscaleProvider, LocalUpscaleSettings
from aiserver.tasks import ImageToTextSpec, ImageUpscaleSpec, TaskKind
from tests.providers_local.helpers import RecordingSink, save, textured, work_for

MakeProvider = Callable[..., LocalUpscaleProvider]


async def test_cancel_between_tiles(make_provider: MakeProvider, tmp_path: Path) -> None:
    provider = make_provider(tile_size=32)
    path = save(textured((224, 192)), tmp_path / "big.png")  # 7 x 6 = 42 tiles
    first = asyncio.Event()

    async def on_progress(update: ProviderProgress) -> None:
        first.set()

    sink = RecordingSink(on_progress)
    task = asyncio.create_task(provider.run(work_for(path), sink))
    await asyncio.wait_for(first.wait(), 30)
    assert provider.load() == 1
    task.cancel()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 0.25  # no waiting for the running tile
    assert sink.images == []
    assert len(sink.progress_updates) < 42
    assert provider.load() == 0
    # The slot is free again: the next job runs to the end.
    small = save(textured((9, 7)), tmp_path / "small.png")
    after = RecordingSink()
    await asyncio.wait_for(provider.run(work_for(small), after), 30)
    assert len(after.images) == 1


async def test_event_loop_stays_responsive(make_provider: MakeProvider, tmp_path: Path) -> None:
    # Two big tiles: had ncnn held the GIL while it computes, the loop would stall for a
    # whole tile. (Loading a model does hold it: warm_up does that first, once.)
    provider = make_provider(tile_size=192)
    assert await provider.warm_up()
    path = save(textured((384, 192)), tmp_path / "a.png")
    gaps: list[float] = []
    stop = asyncio.Event()
    tile_ends: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def on_progress(update: ProviderProgress) -> None:
        tile_ends.append(time.monotonic())

    ticking = asyncio.create_task(ticker())
    started = time.monotonic()
    await provider.run(work_for(path), RecordingSink(on_progress))
    stop.set()
    await ticking
    tile_times = [b - a for a, b in zip([started, *tile_ends], tile_ends, strict=False)]
    assert len(tile_times) == 2
    print(f"tiles {tile_times}, max gap {max(gaps):.3f} s, {len(gaps)} ticks")
    assert max(gaps) < min(0.15, min(tile_times) / 2), (max(gaps), tile_times)


async def test_concurrent_jobs_are_bounded(make_provider: MakeProvider, tmp_path: Path) -> None:
    provider = make_provider(tile_size=32, max_concurrent_jobs=1)
    path = save(textured((64, 64)), tmp_path / "a.png")  # 4 tiles each
    order: list[str] = []

    def sink_for(job: str) -> RecordingSink:
        async def note(update: ProviderProgress) -> None:
            order.append(job)

        return RecordingSink(note)

    sinks = {job: sink_for(job) for job in ("a", "b")}
    runs = [provider.run(work_for(path, job_id=job), sink) for job, sink in sinks.items()]
    gathered = asyncio.gather(*runs)
    await asyncio.sleep(0.05)
    assert provider.load() == 2  # both handed over, one waits
    await gathered
    assert order in (["a"] * 4 + ["b"] * 4, ["b"] * 4 + ["a"] * 4)
    assert provider.load() == 0


def test_can_run(make_provider: MakeProvider) -> None:
    provider = make_provider()
    up = TaskKind.IMAGE_UPSCALE
    assert provider.name == "local"
    assert provider.can_run(up, ImageUpscaleSpec())
    assert provider.can_run(up, ImageUpscaleSpec(model="realesr-animevideov3-x2"))
    assert provider.can_run(up, ImageUpscaleSpec(model="realesrgan-x4plus"))
    assert provider.can_run(up, ImageUpscaleSpec(model="local:realesrgan-x4plus"))
    assert not provider.can_run(up, ImageUpscaleSpec(model="RealESRGAN_x2.pth"))  # ComfyUI's
    assert not provider.can_run(TaskKind.IMAGE_TO_TEXT, ImageToTextSpec())
    assert provider.supports(up) and not provider.supports(TaskKind.IMAGE_TO_IMAGE)
    assert provider.load() == 0
    off = make_provider(enabled=False)
    assert not off.can_run(up, ImageUpscaleSpec()) and not off.supports(up)


async def test_warm_up_loads_once(make_provider: MakeProvider) -> None:
    provider = make_provider()
    assert await provider.warm_up()
    assert await provider.warm_up()


async def test_unreadable_input(make_provider: MakeProvider, tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(b"not an image at all")
    work = work_for(save(textured((4, 4)), tmp_path / "ok.png"))
    bad = type(work)(
        job_id="j",
        task=work.task,
        spec=work.spec,
        inputs={
            "image": type(work.inputs["image"])(
                "image", path, "bad.png", "0" * 64, "image/png", 4, 4
            )
        },
    )
    with pytest.raises(ServiceError) as caught:
        await make_provider().run(bad, RecordingSink())
    assert caught.value.kind is ErrorKind.INVALID_ARGUMENT
    assert caught.value.reason == "IMAGE_UNREADABLE"


async def test_input_over_the_local_limit(make_provider: MakeProvider, tmp_path: Path) -> None:
    path = save(textured((20, 20)), tmp_path / "a.png")
    with pytest.raises(ServiceError) as caught:
        await make_provider(max_input_pixels=399).run(work_for(path), RecordingSink())
    assert caught.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    assert caught.value.reason == "IMAGE_TOO_LARGE_TO_UPSCALE"


async def test_unknown_model_is_rejected(make_provider: MakeProvider, tmp_path: Path) -> None:
    path = save(textured((4, 4)), tmp_path / "a.png")
    with pytest.raises(ServiceError) as caught:
        await make_provider().run(work_for(path, model="nope.pth"), RecordingSink())
    assert caught.value.reason == "UNKNOWN_MODEL"


@pytest.mark.parametrize(
    "bad",
    [
        {"model": "nope"},
        {"tile_size": 8},
        {"tile_overlap": -1},
        {"threads": -1},
        {"max_concurrent_jobs": 0},
        {"alpha": "drop"},
        {"png_compress_level": 10},
    ],
)
def test_settings_are_checked(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LocalUpscaleSettings(**bad)  # type: ignore[arg-type]


async def test_two_at_once_share_the_model(make_provider: MakeProvider, tmp_path: Path) -> None:
    """Two jobs on one network in parallel threads give the same bytes as one alone."""
    provider = make_provider(tile_size=32, max_concurrent_jobs=2)
    paths = [save(textured((64, 48), seed=s), tmp_path / f"{s}.png") for s in (1, 2)]
    alone = []
    for path in paths:
        sink = RecordingSink()
        await provider.run(work_for(path), sink)
        alone.append(sink.images[0].data)
    sinks = [RecordingSink(), RecordingSink()]
    await asyncio.gather(*(provider.run(work_for(p), s) for p, s in zip(paths, sinks, strict=True)))
    assert [s.images[0].data for s in sinks] == alone


async def test_a_model_that_fails_to_load(
    make_provider: MakeProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another provider may succeed: ProviderUnavailable, and can_run says no from then on."""
    from aiserver.providers.local import models

    param, weights = tmp_path / "broken.param", tmp_path / "broken.bin"
    param.write_text("not a param file\n")
    weights.write_bytes(b"\0" * 16)
    monkeypatch.setattr(models, "model_files", lambda model: (param, weights))
    provider = make_provider()
    assert provider.can_run(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec())
    path = save(textured((4, 4)), tmp_path / "a.png")
    with pytest.raises(ProviderUnavailable) as caught:
        await provider.run(work_for(path), RecordingSink())
    assert caught.value.cause is Cause.MODEL_LOAD and caught.value.retryable
    assert not caught.value.reached_agent and not caught.value.agent_lost
    assert not provider.can_run(TaskKind.IMAGE_UPSCALE, ImageUpscaleSpec())
    assert not await provider.warm_up()
