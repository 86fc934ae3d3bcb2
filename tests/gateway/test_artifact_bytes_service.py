"""``GET /artifacts/...`` in front of the real service, through the separate gateway (gRPC over
the network) and the service's own shim (in-process calls): the bytes are the stored ones,
whole and in ranges across the service's chunk edges, with the same headers either way. The
shim reads ReadArtifact's messages in wire form (``client/_chunks.read_chunk``); the service's
own shim calls ReadArtifact in process (``api/local_calls``)."""

from __future__ import annotations

import os
from typing import Any

import grpc
import httpx
import pytest
from imagetasks.v1 import artifact_service_pb2

from aiserver.client._chunks import ArtifactChunk, read_chunk
from aiserver.gateway import Gateway
from aiserver.server import Service
from tests.support.artifacts import put_ref

CHUNK = 64 * 1024
pytestmark = pytest.mark.parametrize("settings_overrides", [{"chunk_bytes": CHUNK}])


async def _check_bytes(http: httpx.AsyncClient, url: str, data: bytes, sha: str) -> None:
    size = len(data)
    res = await http.get(url)
    assert res.status_code == 200 and res.content == data
    assert res.headers["content-length"] == str(size)
    assert res.headers["content-type"] == "image/png"
    assert res.headers["etag"] == f'"{sha}"'
    assert res.headers["accept-ranges"] == "bytes"
    spans = [(0, 0), (CHUNK - 1, CHUNK), (100, 3 * CHUNK + 7), (size - 1, size - 1), (0, size - 1)]
    for start, end in spans:
        res = await http.get(url, headers={"Range": f"bytes={start}-{end}"})
        assert res.status_code == 206
        assert res.content == data[start : end + 1]
        assert res.headers["content-range"] == f"bytes {start}-{end}/{size}"
        assert res.headers["content-length"] == str(end - start + 1)
    res = await http.get(url, headers={"Range": f"bytes=-{CHUNK + 3}"})
    assert res.status_code == 206 and res.content == data[-(CHUNK + 3) :]
    res = await http.get(url, headers={"Range": f"bytes={size}-"})
    assert res.status_code == 416
    assert res.json()["responseStatus"]["errorCode"] == "RANGE_NOT_SATISFIABLE"
    res = await http.get(url, headers={"If-None-Match": f'"{sha}"'})
    assert res.status_code == 304 and res.content == b""
    res = await http.get(url.rsplit("/", 1)[0] + "/" + "0" * 64 + ".png")
    assert res.status_code == 404
    assert res.json()["responseStatus"]["errorCode"] == "ARTIFACT_NOT_FOUND"


async def test_artifact_bytes_through_the_separate_gateway(
    service: Service, gateway: Gateway, http: httpx.AsyncClient
) -> None:
    data = os.urandom(5 * CHUNK + 123)
    ref = await put_ref(service, data)
    await _check_bytes(http, "/" + ref.name, data, ref.sha256)


async def test_artifact_bytes_through_the_services_own_shim(service: Service) -> None:
    data = os.urandom(5 * CHUNK + 123)
    ref = await put_ref(service, data)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}") as http:
        await _check_bytes(http, "/" + ref.name, data, ref.sha256)


@pytest.mark.parametrize("shim", ["gateway", "in-process"])
async def test_the_shim_reads_artifact_chunks_in_wire_form(
    service: Service, gateway: Gateway, shim: str
) -> None:
    own = service.gateway
    assert own is not None
    backend: Any = (gateway if shim == "gateway" else own).backend
    data = os.urandom(2 * CHUNK + 5)
    ref = await put_ref(service, data)
    method = backend.method("imagetasks.v1.ArtifactService.ReadArtifact")
    read = backend.callable(method, read_chunk)
    assert read is backend.callable(method, read_chunk)  # made once
    assert read is not backend.callable(method)  # protobuf's reading stays for the others
    call = read(artifact_service_pb2.ReadArtifactRequest(name=ref.name, read_offset=7))
    # The service's own shim reads artifacts in process (no loopback HTTP/2), the separate
    # gateway over its channel.
    assert isinstance(call, grpc.aio.Call) == (shim == "gateway")
    chunks = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    assert all(isinstance(c, ArtifactChunk) for c in chunks)
    assert b"".join(c.data for c in chunks) == data[7:]
    assert [c.offset for c in chunks] == [7 + i * CHUNK for i in range(len(chunks))]
