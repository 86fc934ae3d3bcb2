"""AI Server's generative routes, Sync and Queue, and the status routes, against the fake
backend (the real service with a ComfyUI stand-in: test_service_generation.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from imagetasks.v1 import common_pb2

from aiserver.gateway import Gateway
from tests.gateway.conftest import curl
from tests.gateway.fake_backend import FakeBackend, png


@pytest.fixture
def sunset(tmp_path: Path) -> Path:
    path = tmp_path / "sunset.jpg"
    path.write_bytes(png((250, 120, 30), (64, 48)))
    return path


async def test_seed_image_to_image_sync_then_download(
    fake: FakeBackend, fake_gateway: Gateway, sunset: Path, tmp_path: Path
) -> None:
    res = await curl(
        f"{fake_gateway.url}/api/ImageToImage",
        *("-H", "Authorization: Bearer sk-test"),
        *("-F", "PositivePrompt=A beautiful sunset over the ocean"),
        *("-F", "NegativePrompt=A pixelated, low-quality image"),
        *("-F", "Sync=true"),
        *("-F", f"image=@{sunset};filename=sunset.jpg"),
        tmp_path=tmp_path,
    )
    assert res.status == 200, res.body
    assert res.content_type == "application/json; charset=utf-8"
    body = json.loads(res.body)
    assert body["jobState"] == "Completed" and body["jobId"] and body["refId"]
    assert "responseStatus" not in body
    url = body["outputs"][0]["url"]
    assert url.startswith(f"{fake_gateway.url}/artifacts/2025/01/02/")
    assert body["outputs"][0]["fileName"] == "out_0.png"
    assert body["results"][0] == {**body["outputs"][0], "provider": "comfyui:fake"}
    assert body["textOutputs"] == []
    # What the backend got: the params, the file, references-only delivery, a call that
    # streams only the finished job (RESULT: the answer needs nothing else).
    got = fake.state.uploads[-1]
    assert got.params.positive_prompt == "A beautiful sunset over the ocean"
    assert got.params.negative_prompt == "A pixelated, low-quality image"
    assert got.params.options.mode == common_pb2.RESPONSE_MODE_RESULT
    assert got.params.options.delivery == common_pb2.OUTPUT_DELIVERY_REFERENCES
    assert got.files["image"] == png((250, 120, 30), (64, 48))
    assert got.file_names["image"] == "sunset.jpg"
    assert got.metadata["authorization"] == "Bearer sk-test"
    # response.Outputs[0].Url.DownloadFileTo("ocean-sunset.webp")
    dl = await curl(url, tmp_path=tmp_path)
    assert dl.status == 200 and dl.content_type == "image/png"
    assert dl.body == png((200, 10, 10))


async def test_image_with_mask_sends_both_files(
    fake: FakeBackend, fake_http: httpx.AsyncClient
) -> None:
    res = await fake_http.post(
        "/api/ImageWithMask",
        data={"positivePrompt": "p", "MaskChannel": "alpha", "sync": "True", "RefId": "m-1"},
        files={"image": ("i.png", b"IMAGE", "image/png"), "Mask": ("m.png", b"MASK", "image/png")},
    )
    assert res.status_code == 200, res.text
    assert res.json()["refId"] == "m-1"
    got = fake.state.uploads[-1]
    assert got.files == {"image": b"IMAGE", "mask": b"MASK"}
    assert got.params.mask_channel == 4
    assert got.params.options.ref_id == "m-1"


async def test_sync_defaults_to_false_and_queue_never_waits(
    fake: FakeBackend, fake_gateway: Gateway, fake_http: httpx.AsyncClient
) -> None:
    for path, data in (
        ("/api/ImageUpscale", {}),
        ("/api/QueueImageUpscale", {"Sync": "true"}),
        ("/api/ImageUpscale", {"Sync": "false"}),
    ):
        res = await fake_http.post(path, data=data, files={"image": ("a.png", b"x", "image/png")})
        assert res.status_code == 200, res.text
        body = res.json()
        assert set(body) == {"jobId", "refId", "jobState", "status", "statusUrl"}
        assert body["jobState"] == body["status"] == "Queued"
        assert body["statusUrl"] == (
            f"{fake_gateway.url}/api/GetArtifactGenerationStatus?jobId={body['jobId']}"
        )
        assert fake.state.uploads[-1].params.options.mode == common_pb2.RESPONSE_MODE_ASYNC


async def test_queue_then_poll_status_by_ref_id(
    fake: FakeBackend, fake_http: httpx.AsyncClient
) -> None:
    res = await fake_http.post(
        "/api/QueueImageToImage",
        data={"PositivePrompt": "p", "RefId": "my-ref", "Tag": "t"},
        files={"image": ("a.png", b"x", "image/png")},
    )
    queued = res.json()
    assert queued["refId"] == "my-ref"
    status = await fake_http.get("/api/GetArtifactGenerationStatus", params={"refId": "my-ref"})
    assert status.status_code == 200
    body = status.json()
    assert body["jobId"] == queued["jobId"] and body["jobState"] == "Completed"
    assert body["outputs"][0]["url"].startswith(str(fake_http.base_url).rstrip("/") + "/artifacts/")
    by_id = await fake_http.get(queued["statusUrl"])
    assert by_id.json() == body
    by_post = await fake_http.post(
        "/api/getartifactgenerationstatus", json={"JobId": body["jobId"]}
    )
    assert by_post.json() == body


async def test_text_generation_and_its_status(
    fake: FakeBackend, fake_http: httpx.AsyncClient
) -> None:
    res = await fake_http.post(
        "/api/ImageToText", data={"Sync": "true"}, files={"image": ("a.png", b"x", "image/png")}
    )
    assert res.json()["textOutputs"] == [{"text": "a cat on a mat"}]
    queued = await fake_http.post(
        "/api/QueueImageToText", files={"image": ("a.png", b"x", "image/png")}
    )
    url = queued.json()["statusUrl"]
    assert "/api/GetTextGenerationStatus?jobId=" in url
    body = (await fake_http.get(url)).json()
    assert body["textOutputs"] == [{"text": "a cat on a mat"}]
    assert body["results"] == [{"text": "a cat on a mat"}]


async def test_status_errors(fake_http: httpx.AsyncClient) -> None:
    res = await fake_http.get("/api/GetArtifactGenerationStatus")
    assert res.status_code == 400
    assert res.json()["responseStatus"]["errorCode"] == "INVALID_PARAMETERS"
    res = await fake_http.get("/api/GetArtifactGenerationStatus", params={"refId": "none"})
    assert res.status_code == 404
    assert res.json()["responseStatus"]["errorCode"] == "JOB_NOT_FOUND"
    res = await fake_http.get("/api/GetTextGenerationStatus", params={"jobId": "NOPE"})
    assert res.status_code == 404


async def test_failed_sync_job_answers_its_error(fake_http: httpx.AsyncClient) -> None:
    res = await fake_http.post(
        "/api/ImageToImage",
        data={"PositivePrompt": "fail", "Sync": "1"},
        files={"image": ("a.png", b"x", "image/png")},
    )
    assert res.status_code == 503
    body = res.json()
    assert body["jobState"] == "Failed"
    assert body["responseStatus"]["errorCode"] == "AGENT_LOST"
    assert body["responseStatus"]["message"] == "the agent went away"


async def test_missing_image_and_bad_sync(fake_http: httpx.AsyncClient) -> None:
    res = await fake_http.post("/api/ImageToImage", files={"PositivePrompt": (None, "p")})
    assert res.status_code == 400
    assert res.json()["responseStatus"]["errors"][0]["fieldName"] == "image"
    res = await fake_http.post(
        "/api/ImageToImage",
        data={"PositivePrompt": "p", "Sync": "maybe", "Seed": "-"},
        files={"image": ("a.png", b"x", "image/png")},
    )
    assert res.status_code == 400
    assert {e["fieldName"] for e in res.json()["responseStatus"]["errors"]} == {"Sync", "Seed"}


async def test_servicestack_json_reply_path(fake_http: httpx.AsyncClient) -> None:
    res = await fake_http.post(
        "/json/reply/ImageUpscale",
        data={"Sync": "true"},
        files={"image": ("a.png", b"x", "image/png")},
    )
    assert res.status_code == 200
    assert len(res.json()["outputs"]) == 2


async def test_v1_generation_route_streams_events(
    fake: FakeBackend, fake_http: httpx.AsyncClient
) -> None:
    res = await fake_http.post(
        "/v1/images:imageToImage",
        data={"positivePrompt": "p", "options.delivery": "references"},
        files={"image": ("a.png", b"x", "image/png")},
        headers={"Accept": "text/event-stream"},
    )
    assert res.status_code == 200
    kinds = [line[7:] for line in res.text.splitlines() if line.startswith("event: ")]
    assert kinds == ["accepted", "progress", "progress", "output", "output", "finished"]
    assert fake.state.uploads[-1].params.options.mode == common_pb2.RESPONSE_MODE_UNSPECIFIED


@pytest.mark.parametrize("gateway_overrides", [{"public_base_url": "https://img.example.com/"}])
async def test_public_base_url(fake_http: httpx.AsyncClient) -> None:
    res = await fake_http.post(
        "/api/ImageUpscale", data={"Sync": "true"}, files={"image": ("a.png", b"x", "image/png")}
    )
    assert res.json()["outputs"][0]["url"].startswith("https://img.example.com/artifacts/")


async def test_upload_streams_through_before_the_body_ends(
    fake: FakeBackend, fake_http: httpx.AsyncClient
) -> None:
    """The backend has the params and the first chunks while the client is still sending."""
    boundary = "xyzzy"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="Sync"\r\n\r\ntrue\r\n'
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="image"; filename="big.bin"\r\n\r\n'
    ).encode()
    first, second = b"a" * 3_000_000, b"b" * 500_000

    async def body() -> Any:
        yield head + first
        async with asyncio.timeout(10):  # would never end if the gateway buffered the body
            while True:
                live = fake.state.receiving
                if live and sum(live[-1].chunk_sizes) >= 2**20:
                    break
                await asyncio.sleep(0.01)
        yield second + f"\r\n--{boundary}--\r\n".encode()

    res = await fake_http.post(
        "/api/ImageUpscale",
        content=body(),
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    assert res.status_code == 200, res.text
    got = fake.state.uploads[-1]
    assert got.files["image"] == first + second
    assert max(got.chunk_sizes) <= 1024 * 1024 and len(got.chunk_sizes) >= 4


@pytest.mark.parametrize("sync", ["true", "false"])
async def test_the_answer_goes_before_the_stream_ends_which_is_still_read(
    fake: FakeBackend, fake_http: httpx.AsyncClient, sync: str
) -> None:
    """The job's JSON needs nothing after ``finished`` (``accepted`` when queued): it is sent
    before the call's status arrives, the connection's next request is not held up by that
    wait either, and each stream is then read to its end, not cut."""
    fake.state.linger_s = 1.5
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(2):  # one keep-alive connection (httpx's pool), one request after another
        res = await fake_http.post(
            "/api/ImageUpscale",
            data={"Sync": sync},
            files={"image": ("a.png", png((1, 2, 3)), "image/png")},
        )
        assert res.status_code == 200, res.text
        assert res.json()["jobState"] == ("Completed" if sync == "true" else "Queued")
    took = loop.time() - started
    assert took < 1.2, f"the answers waited {took:.2f} s for their streams' ends"
    async with asyncio.timeout(5):
        while len(fake.state.generation_streams) < 2:
            await asyncio.sleep(0.05)
    assert fake.state.generation_streams == ["completed", "completed"]


@pytest.mark.parametrize("sync", ["true", "false"])
async def test_an_answered_stream_ends_with_its_own_status(
    fake: FakeBackend, fake_gateway: Gateway, fake_http: httpx.AsyncClient, sync: str
) -> None:
    """The gateway stops reading after ``finished`` (``accepted``): the call still gets the
    server's OK, not the cancel that a stream left open past the drain's bound would get."""
    fake.state.linger_s = 0.5
    res = await fake_http.post(
        "/api/ImageUpscale",
        data={"Sync": sync},
        files={"image": ("a.png", png((1, 2, 3)), "image/png")},
    )
    assert res.status_code == 200, res.text
    assert fake_gateway.backend is not None
    calls = list(fake_gateway.backend.long_lived)
    assert len(calls) == 1
    async with asyncio.timeout(20):
        assert await calls[0].code() == grpc.StatusCode.OK
    assert fake.state.generation_streams == ["completed"]


async def test_a_stopping_gateway_cancels_the_streams_it_still_reads(
    fake: FakeBackend, fake_gateway: Gateway, fake_http: httpx.AsyncClient
) -> None:
    fake.state.linger_s = 30
    res = await fake_http.post(
        "/api/ImageUpscale",
        data={"Sync": "true"},
        files={"image": ("a.png", png((1, 2, 3)), "image/png")},
    )
    assert res.status_code == 200 and res.json()["jobState"] == "Completed"
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        await fake_gateway.stop()
        while not fake.state.generation_streams:
            await asyncio.sleep(0.05)
    assert fake.state.generation_streams == ["cancelled"]
    assert loop.time() - started < 3  # by the stop, not by the drain's own 5 s limit
