"""The upload reader fed as the server feeds it: chunk messages read from the wire
(``api/wire.py``), not protobuf messages. The same bytes, hashes, limits and errors."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from imagetasks.v1 import common_pb2, tasks_pb2, transform_service_pb2

from aiserver.api.malformed import tolerant
from aiserver.api.uploads import read_upload
from aiserver.api.wire import ChunkRequest, chunk_parsing
from aiserver.errors import ServiceError
from aiserver.spool import InputSpool, UploadBudget
from aiserver.spool_memory import SpoolMemory

Convert = transform_service_pb2.ConvertImageRequest
PARAMS = tasks_pb2.ConvertImageParams(output_format=common_pb2.IMAGE_FORMAT_PNG)
MIB = 1 << 20


def _parse() -> Callable[[bytes], Any]:
    parse = chunk_parsing(tolerant(Convert.FromString), Convert.FromString)
    assert parse is not None
    return parse


async def _stream(data: bytes, *, field: str = "image", params: bool = True) -> AsyncIterator[Any]:
    """``data`` as the server's deserializer hands it over: params, then wire chunks."""
    parse = _parse()
    if params:
        yield parse(Convert(params=PARAMS).SerializeToString())
    for start in range(0, len(data), MIB):
        chunk = common_pb2.FileChunk(field=field, data=data[start : start + MIB], file_name="a")
        msg = parse(Convert(chunk=chunk).SerializeToString())
        assert type(msg) is ChunkRequest  # the wire path, not protobuf's
        yield msg


@pytest.mark.parametrize("hashed", [True, False], ids=["hashed, written", "used once, held"])
async def test_wire_chunks_arrive_whole(tmp_path: Path, hashed: bool) -> None:
    spool = InputSpool(tmp_path)
    data = os.urandom(20 * MIB + 5)  # a hashed one passes the writer's queue bound
    upload = await read_upload(
        _stream(data), spool=spool, budget=UploadBudget(1 << 30), inputs=("image",), hashed=hashed
    )
    got = upload.files["image"]
    assert got.size == len(data) and got.file_name == "a"
    if hashed:
        assert got.sha256 == hashlib.sha256(data).hexdigest()
        assert got.path.read_bytes() == data
    else:
        assert got.held is not None and got.held.tobytes() == data
    upload.discard()
    assert spool.memory.used == 0 and list(spool.tmp_dir.iterdir()) == []


async def _refused(
    spool: InputSpool, stream: AsyncIterator[Any], limit: int = 1 << 30
) -> ServiceError:
    with pytest.raises(ServiceError) as err:
        await read_upload(
            stream, spool=spool, budget=UploadBudget(limit), inputs=("image",), hashed=False
        )
    assert spool.memory.used == 0 and list(spool.tmp_dir.iterdir()) == []
    return err.value


async def test_a_wire_chunk_for_an_unknown_input_is_refused(tmp_path: Path) -> None:
    err = await _refused(InputSpool(tmp_path), _stream(b"abc", field="mask"))
    assert err.reason == "UNKNOWN_INPUT"


async def test_a_wire_chunk_before_the_params_is_refused(tmp_path: Path) -> None:
    err = await _refused(InputSpool(tmp_path), _stream(b"abc", params=False))
    assert err.reason == "PARAMS_NOT_FIRST"


async def test_wire_chunks_past_the_limit_are_refused_as_they_arrive(tmp_path: Path) -> None:
    spool = InputSpool(tmp_path, memory=SpoolMemory(64 * MIB))
    held: list[int] = []

    async def watched() -> AsyncIterator[Any]:
        async for msg in _stream(os.urandom(8 * MIB)):
            held.append(spool.memory.used)  # what the reader kept before this message
            yield msg

    err = await _refused(spool, watched(), limit=3 * MIB)
    assert err.reason == "UPLOAD_TOO_LARGE"
    # Never more than the limit, though 8 MiB were sent (the messages kept whole).
    assert 3 * MIB <= max(held) < 3 * MIB + 1024
