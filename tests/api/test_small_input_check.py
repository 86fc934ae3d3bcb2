"""A small job input is checked from the bytes the spool kept, never read back from disk; it
is written to a file only when the job store does not keep it with its job."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from PIL import Image

from aiserver.api.job_calls import JobCalls, SubmitLimits
from aiserver.api.uploads import Upload
from aiserver.errors import ServiceError
from aiserver.imaging import ImageLimits
from aiserver.spool import KEEP_CONTENT_BYTES, InputSpool, UploadBudget
from aiserver.spool_memory import SpoolMemory
from aiserver.workers import BlockingPool
from tests.support.images import encode, quadrant_image


async def _spooled(spool: InputSpool, *chunks: bytes) -> Any:
    writer = spool.open("image", "in.png", UploadBudget(1 << 30))
    for chunk in chunks:
        await writer.write(chunk)
    return await writer.finish()


async def test_a_small_upload_keeps_its_bytes_and_a_larger_one_does_not(tmp_path: Path) -> None:
    spool = InputSpool(tmp_path)
    png = encode(quadrant_image(32, 32), "PNG")
    small = await _spooled(spool, png)
    assert small.content == png and not small.written and not small.path.exists()
    # The API's chunks are views into the request message: kept as bytes of their own.
    viewed = await _spooled(spool, memoryview(b"--" + png)[2:])  # type: ignore[arg-type]
    assert type(viewed.content) is bytes and viewed.content == png
    two = await _spooled(spool, png[:10], png[10:])  # joined
    assert two.content == png and not two.written
    big = await _spooled(spool, b"x" * (KEEP_CONTENT_BYTES + 1))
    assert big.content is None and big.written
    committed = spool.commit(small)  # the file, written now
    assert committed.content == png and committed.path.read_bytes() == png


async def test_a_spilled_light_upload_keeps_no_bytes(tmp_path: Path) -> None:
    # A light task's input (not hashed) spills to its file when the memory budget is full; no
    # check reads kept bytes for it (api/transform.py), so none are held for its whole call.
    spool = InputSpool(tmp_path, memory=SpoolMemory(0))
    png = encode(quadrant_image(32, 32), "PNG")
    writer = spool.open("image", "in.png", UploadBudget(1 << 30), hashed=False)
    await writer.write(png)
    spilled = await writer.finish()
    assert spilled.held is None and spilled.path.read_bytes() == png  # it did spill
    assert spilled.content is None


def _calls(spool: InputSpool, pool: BlockingPool, *, holds_inputs: bool = False) -> JobCalls:
    limits = SubmitLimits(
        max_upload_bytes=1 << 30,
        max_prompt_chars=1000,
        max_batch_size=1,
        chunk_bytes=1 << 20,
        image=ImageLimits(),
    )
    # Only the input checks run here: the job manager is asked whether its store keeps
    # inputs, the artifact store is not reached.
    manager = cast(Any, SimpleNamespace(holds_inputs=holds_inputs))
    unused = cast(Any, None)
    return JobCalls(manager=manager, artifacts=unused, spool=spool, pool=pool, limits=limits)


async def test_the_check_reads_the_kept_bytes_then_lets_go_of_them(tmp_path: Path) -> None:
    spool = InputSpool(tmp_path)
    pool = BlockingPool(1)
    try:
        png = encode(quadrant_image(40, 24), "PNG")
        spooled = await _spooled(spool, png)
        assert not spooled.path.exists()  # only the kept bytes can be checked
        (ref,) = await _calls(spool, pool).inputs(Upload(None, {"image": spooled}))
        assert (ref.width, ref.height, ref.mime_type) == (40, 24, "image/png")
        assert not ref.stored  # this store keeps no inputs: the spool's file it is
        assert spooled.content == png  # for the commit, which writes it (and lets go)
        (ref,) = await _calls(spool, pool, holds_inputs=True).inputs(
            Upload(None, {"image": spooled})
        )
        assert ref.stored  # kept with its job: no file ever
        noise = Image.frombytes("RGB", (160, 160), os.urandom(160 * 160 * 3))
        larger = encode(noise, "PNG")
        assert 64 * 1024 < len(larger) <= KEEP_CONTENT_BYTES
        spooled = await _spooled(spool, larger)  # checked from its bytes, but a file it gets
        (ref,) = await _calls(spool, pool, holds_inputs=True).inputs(
            Upload(None, {"image": spooled})
        )
        assert not ref.stored and spooled.content == larger

        damaged = await _spooled(spool, png[: len(png) // 2])
        with pytest.raises(ServiceError) as caught:
            await _calls(spool, pool).inputs(Upload(None, {"image": damaged}))
        assert caught.value.kind.name == "INVALID_ARGUMENT"
    finally:
        pool.close()
