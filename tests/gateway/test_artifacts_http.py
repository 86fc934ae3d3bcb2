"""/artifacts/{path} and /variants/{spec}/{path}: ETag, 304, Range, download, against the fake."""

from __future__ import annotations

import os

import httpx
from imagetasks.v1 import common_pb2
from PIL import Image

from tests.gateway.fake_backend import FakeBackend, png
from tests.support.images import encode


def _artifact(fake: FakeBackend) -> tuple[str, bytes, str]:
    data = encode(Image.frombytes("RGB", (40, 40), os.urandom(40 * 40 * 3)), "PNG")
    job = fake.state.add_job(task=common_pb2.TASK_IMAGE_UPSCALE, outputs=[data])
    art = job.outputs[0]
    return art.url, data, art.sha256


async def test_artifact_bytes_headers_and_etag(
    fake: FakeBackend, fake_http: httpx.AsyncClient
) -> None:
    url, data, sha = _artifact(fake)
    res = await fake_http.get(url)
    assert res.status_code == 200
    assert res.content == data
    assert res.headers["content-type"] == "image/png"
    assert res.headers["content-length"] == str(len(data))
    assert res.headers["etag"] == f'"{sha}"'
    assert res.headers["accept-ranges"] == "bytes"
    assert res.headers["content-disposition"] == 'inline; filename="out_0.png"'
    assert "immutable" in res.headers["cache-control"]
    assert res.headers["last-modified"] == "Thu, 02 Jan 2025 00:00:00 GMT"
    again = await fake_http.get(url, headers={"If-None-Match": f'W/"x", "{sha}"'})
    assert again.status_code == 304 and again.content == b""
    assert fake.artifacts.reads == [(0, 0)]  # the 304 read nothing


async def test_download_attachment(fake: FakeBackend, fake_http: httpx.AsyncClient) -> None:
    url, _, _ = _artifact(fake)
    res = await fake_http.get(url, params={"download": "true"})
    assert res.headers["content-disposition"] == 'attachment; filename="out_0.png"'


async def test_ranges(fake: FakeBackend, fake_http: httpx.AsyncClient) -> None:
    url, data, sha = _artifact(fake)
    size = len(data)
    res = await fake_http.get(url, headers={"Range": "bytes=10-109"})
    assert res.status_code == 206
    assert res.content == data[10:110]
    assert res.headers["content-range"] == f"bytes 10-109/{size}"
    assert fake.artifacts.reads[-1] == (10, 100)
    res = await fake_http.get(url, headers={"Range": "bytes=-7"})
    assert res.status_code == 206 and res.content == data[-7:]
    res = await fake_http.get(url, headers={"Range": f"bytes={size}-"})
    assert res.status_code == 416
    assert res.headers["content-range"] == f"bytes */{size}"
    assert res.json()["responseStatus"]["errorCode"] == "RANGE_NOT_SATISFIABLE"
    # If-Range with another validator: the whole artifact.
    res = await fake_http.get(url, headers={"Range": "bytes=0-1", "If-Range": '"old"'})
    assert res.status_code == 200 and res.content == data
    res = await fake_http.get(url, headers={"Range": "bytes=0-1", "If-Range": f'"{sha}"'})
    assert res.status_code == 206 and res.content == data[:2]


async def test_head(fake: FakeBackend, fake_http: httpx.AsyncClient) -> None:
    url, data, _ = _artifact(fake)
    res = await fake_http.head(url)
    assert res.status_code == 200
    assert res.headers["content-length"] == str(len(data))
    assert fake.artifacts.reads == []


async def test_missing_artifact(fake_http: httpx.AsyncClient) -> None:
    res = await fake_http.get("/artifacts/2025/01/02/nothing.png")
    assert res.status_code == 404
    assert res.json()["responseStatus"]["errorCode"] == "ARTIFACT_NOT_FOUND"


async def test_variant(fake: FakeBackend, fake_http: httpx.AsyncClient) -> None:
    url, _, _ = _artifact(fake)
    path = url.removeprefix("/artifacts/")
    res = await fake_http.get(f"/variants/width=8/{path}")
    assert res.status_code == 200
    assert res.headers["content-type"] == "image/png"
    assert res.content == png((1, 2, 3), (8, 6))
    etag = res.headers["etag"]
    again = await fake_http.get(f"/variants/width=8/{path}", headers={"If-None-Match": etag})
    assert again.status_code == 304
    bad = await fake_http.get(f"/variants/size=huge/{path}")
    assert bad.status_code == 400
    assert bad.json()["responseStatus"]["errors"][0]["fieldName"] == "spec"


async def test_variant_query_and_conditions(
    fake: FakeBackend, fake_http: httpx.AsyncClient
) -> None:
    """What the variant route reads from the query (download, a signed URL's expiry) and
    the headers it answers to, each way (the route reads the query only when there is one)."""
    url, _, _ = _artifact(fake)
    path = f"/variants/width=8/{url.removeprefix('/artifacts/')}"
    plain = await fake_http.get(path)
    assert plain.status_code == 200
    assert plain.headers["content-disposition"].startswith("inline; filename=")
    assert plain.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert plain.headers["x-request-id"]
    download = await fake_http.get(path, params={"download": "yes"})
    assert download.headers["content-disposition"].startswith("attachment; filename=")
    assert download.content == plain.content
    other = await fake_http.get(path, params={"download": "no", "x": "1"})
    assert other.headers["content-disposition"].startswith("inline; filename=")
    bad = await fake_http.get(path, params={"expires": "soon", "signature": "x"})
    assert bad.status_code == 400
    assert bad.json()["responseStatus"]["errors"][0]["fieldName"] == "expires"
    etag = plain.headers["etag"]
    for header in ("", f'W/"x", {etag}', "*"):
        res = await fake_http.get(path, headers={"If-None-Match": header})
        assert res.status_code == (304 if header else 200), header
    keyed = await fake_http.get(path, headers={"Authorization": "Bearer k"})
    assert keyed.headers["cache-control"] == "private, max-age=31536000, immutable"
    head = await fake_http.head(path)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(plain.content))
    missing = await fake_http.get("/variants/width=8/2025/01/02/nothing.png")
    assert missing.status_code == 404
    assert missing.json()["responseStatus"]["errorCode"] == "ARTIFACT_NOT_FOUND"


async def test_v1_read_artifact_is_ndjson(fake: FakeBackend, fake_http: httpx.AsyncClient) -> None:
    url, data, _ = _artifact(fake)
    res = await fake_http.get(f"/v1{url}:read", params={"readOffset": "3", "readLimit": "60"})
    assert res.status_code == 200
    import base64
    import json

    chunks = [json.loads(line) for line in res.text.splitlines()]
    assert b"".join(base64.b64decode(c["data"]) for c in chunks) == data[3:63]
    assert chunks[0].get("offset") == "3"
