"""The generative routes end to end: curl -> gateway -> the real service -> a ComfyUI stand-in.

The seed's client code, over HTTP: ``ImageToImage { PositivePrompt, NegativePrompt, Sync =
true }`` with an ``image`` file, then ``response.Outputs[0].Url.DownloadFileTo(...)``; the
Queue variant polled by refId; the job's events as Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from aiserver.gateway import Gateway, GatewaySettings
from tests.gateway.conftest import curl
from tests.support.images import encode, quadrant_image

PNG = encode(quadrant_image(64, 48), "PNG")


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[tuple[Gateway, Any]]:
    """The real service with one stand-in agent (settings.agents), and a gateway before it."""
    from tests.support.generation import comfy_service

    async with comfy_service(tmp_path) as (service, agents):
        assert service.providers, "the stand-in agent must give the service a provider"
        gateway = Gateway(
            f"127.0.0.1:{service.grpc_port}",
            port=0,
            settings=GatewaySettings.from_settings(service.settings, spool_dir=tmp_path),
        )
        await gateway.start()
        try:
            yield gateway, agents[0]
        finally:
            await gateway.stop()


async def test_seed_image_to_image_sync_with_curl_then_download(
    stack: tuple[Gateway, Any], tmp_path: Path
) -> None:
    gateway, comfy = stack
    sunset = tmp_path / "sunset.jpg"
    sunset.write_bytes(encode(quadrant_image(96, 64), "JPEG"))
    res = await curl(
        f"{gateway.url}/api/ImageToImage",
        *("-F", "PositivePrompt=A beautiful sunset over the ocean"),
        *("-F", "NegativePrompt=A pixelated, low-quality image"),
        *("-F", "Steps=3", "-F", "Sync=true"),
        *("-F", f"image=@{sunset};filename=sunset.jpg"),
        tmp_path=tmp_path,
    )
    assert res.status == 200, res.body
    body = json.loads(res.body)
    assert body["jobState"] == "Completed", body
    (output,) = body["outputs"]
    assert output["url"].startswith(f"{gateway.url}/artifacts/")
    assert body["results"][0]["provider"]
    texts = sorted(
        node["inputs"]["text"]
        for node in comfy.received.prompts[-1]["prompt"].values()
        if node["class_type"] == "CLIPTextEncode"
    )
    assert texts == ["A beautiful sunset over the ocean", "A pixelated, low-quality image"]
    # response.Outputs[0].Url.DownloadFileTo("ocean-sunset.webp")
    dl = await curl(output["url"], tmp_path=tmp_path)
    assert dl.status == 200 and dl.content_type.startswith("image/")
    with Image.open(io.BytesIO(dl.body)) as im:
        assert im.size == (96, 64)
    assert 'etag: "' in dl.headers.lower()


async def test_mask_upscale_and_text_sync(stack: tuple[Gateway, Any]) -> None:
    gateway, _ = stack
    mask = encode(Image.new("RGB", (32, 24), (255, 0, 0)), "PNG")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
        res = await http.post(
            "/api/ImageWithMask",
            data={"PositivePrompt": "a red door", "Steps": "2", "Sync": "true"},
            files={"image": ("i.png", PNG, "image/png"), "mask": ("m.png", mask, "image/png")},
        )
        assert res.status_code == 200, res.text
        assert res.json()["jobState"] == "Completed"
        res = await http.post(
            "/api/ImageUpscale", data={"Sync": "true"}, files={"image": ("i.png", PNG, "image/png")}
        )
        assert res.status_code == 200, res.text
        url = res.json()["outputs"][0]["url"]
        with Image.open(io.BytesIO((await http.get(url)).content)) as im:
            assert im.size == (128, 96)
        res = await http.post(
            "/api/ImageToText", data={"Sync": "true"}, files={"image": ("i.png", PNG, "image/png")}
        )
        assert res.status_code == 200, res.text
        assert res.json()["textOutputs"][0]["text"].strip()


async def test_queue_then_poll_by_ref_id(stack: tuple[Gateway, Any]) -> None:
    gateway, _ = stack
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
        res = await http.post(
            "/api/QueueImageToImage",
            data={"PositivePrompt": "a lighthouse", "Steps": "3", "RefId": "order-9", "Tag": "t"},
            files={"image": ("i.png", PNG, "image/png")},
        )
        assert res.status_code == 200, res.text
        queued = res.json()
        assert queued["refId"] == "order-9" and queued["jobState"] == "Queued"
        async with asyncio.timeout(30):
            while True:
                status = await http.get(
                    "/api/GetArtifactGenerationStatus", params={"refId": "order-9"}
                )
                assert status.status_code == 200, status.text
                body = status.json()
                if body["jobState"] in ("Completed", "Failed", "Cancelled"):
                    break
                await asyncio.sleep(0.05)
        assert body["jobState"] == "Completed" and body["jobId"] == queued["jobId"]
        art = await http.get(body["outputs"][0]["url"])
        assert art.status_code == 200
        # The same job through the annotated JSON routes.
        job = (await http.get(f"/v1/jobs/{queued['jobId']}")).json()["job"]
        assert job["state"] == "STATE_SUCCEEDED" and job["tag"] == "t"
        listed = (await http.get("/v1/jobs", params={"refId": "order-9"})).json()["jobs"]
        assert [j["name"] for j in listed] == [f"jobs/{queued['jobId']}"]
        # A variant of its output, with its ETag.
        path = body["outputs"][0]["url"].split("/artifacts/", 1)[1]
        variant = await http.get(f"/variants/width=32/{path}")
        assert variant.status_code == 200, variant.text
        with Image.open(io.BytesIO(variant.content)) as im:
            assert im.size[0] == 32
        again = await http.get(
            f"/variants/width=32/{path}", headers={"If-None-Match": variant.headers["etag"]}
        )
        assert again.status_code == 304


async def test_job_events_as_sse_in_order(stack: tuple[Gateway, Any]) -> None:
    gateway, _ = stack
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
        res = await http.post(
            "/api/QueueImageToImage",
            data={"PositivePrompt": "a lighthouse", "Steps": "3"},
            files={"image": ("i.png", PNG, "image/png")},
        )
        job_id = res.json()["jobId"]
        for path in (f"/api/jobs/{job_id}/events", f"/v1/jobs/{job_id}:watch"):
            async with http.stream("GET", path, headers={"Accept": "text/event-stream"}) as stream:
                assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
                text = "".join([chunk async for chunk in stream.aiter_text()])
            blocks = [b for b in text.split("\n\n") if b and not b.startswith(":")]
            events = [dict(line.split(": ", 1) for line in b.split("\n")) for b in blocks]
            kinds = [e["event"] for e in events]
            assert kinds[0] == "accepted" and kinds[-1] == "finished", kinds
            assert "output" in kinds
            ids = [int(e["id"]) for e in events]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            final = json.loads(events[-1]["data"])
            assert final["finished"]["job"]["state"] == "STATE_SUCCEEDED"


async def test_json_routes_against_the_service(stack: tuple[Gateway, Any]) -> None:
    gateway, _ = stack
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
        res = await http.get("/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV")
        assert res.status_code == 404
        assert res.json()["responseStatus"]["errorCode"] == "JOB_NOT_FOUND"
        res = await http.get("/v1/jobs/not%20a%20job")
        assert res.status_code == 400
        assert res.json()["responseStatus"]["errorCode"] == "INVALID_NAME"
        res = await http.get("/v1/jobs", params={"pageSize": "5000"})
        assert res.status_code == 400
        assert res.json()["responseStatus"]["errors"][0]["fieldName"] == "page_size"
        res = await http.get("/v1/jobs")
        assert res.status_code == 200 and res.json() == {}
        res = await http.get("/api/GetArtifactGenerationStatus", params={"refId": "nope"})
        assert res.status_code == 404


async def test_bad_generation_params_are_400(stack: tuple[Gateway, Any]) -> None:
    gateway, _ = stack
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
        res = await http.post(
            "/api/ImageToImage",
            data={"PositivePrompt": " ", "Denoise": "1.5", "Sync": "true"},
            files={"image": ("i.png", PNG, "image/png")},
        )
        assert res.status_code == 400, res.text
        fields = {e["fieldName"] for e in res.json()["responseStatus"]["errors"]}
        assert fields & {"PositivePrompt", "Denoise"}


async def test_a_workflow_runs_through_the_task_routes_upload(
    stack: tuple[Gateway, Any], tmp_path: Path
) -> None:
    """``/api/workflows/{name}`` is the task routes' upload path with typed parameters: the
    same answer, options, refusals and per-form checks (one implementation)."""
    gateway, comfy = stack
    image = tmp_path / "in.png"
    image.write_bytes(PNG)
    url = f"{gateway.url}/api/workflows/outpaint"
    res = await curl(
        f"{url}?RefId=wf-1",  # query parameters are read, as for the tasks
        *("-F", "prompt=a sea", "-F", "Right=16", "-F", "steps=1", "-F", "Sync=true"),
        *("-F", f"image=@{image};filename=in.png"),
        tmp_path=tmp_path,
    )
    assert res.status == 200, res.body
    body = json.loads(res.body)
    assert body["jobState"] == "Completed" and body["refId"] == "wf-1", body
    assert body["outputs"][0]["url"].startswith(f"{gateway.url}/artifacts/")
    pad = next(
        n
        for n in comfy.received.prompts[-1]["prompt"].values()
        if n["class_type"] == "ImagePadForOutpaint"
    )
    assert pad["inputs"]["right"] == 16  # typed: the form's text became the declared integer
    # Sync given twice, a field after the file, a JSON body: the task routes' answers.
    twice = await curl(
        url,
        *("-F", "prompt=x", "-F", "Sync=true", "-F", "sync=false"),
        *("-F", f"image=@{image}"),
        tmp_path=tmp_path,
    )
    assert twice.status == 400
    assert json.loads(twice.body)["responseStatus"]["errors"][0]["errorCode"] == "DUPLICATE_FIELD"
    late = await curl(
        url, *("-F", "prompt=x", "-F", f"image=@{image}", "-F", "steps=2"), tmp_path=tmp_path
    )
    assert late.status == 400
    assert json.loads(late.body)["responseStatus"]["errorCode"] == "FIELD_AFTER_FILE"
    async with httpx.AsyncClient() as client:
        wrong = await client.post(url, json={"prompt": "x"})
    assert wrong.status_code == 415
    assert wrong.json()["responseStatus"]["message"] == (
        "workflow outpaint takes multipart/form-data, not application/json"
    )


async def test_sync_answers_are_the_final_jobs_json(stack: tuple[Gateway, Any]) -> None:
    """``Sync=true`` runs a RESPONSE_MODE_RESULT call (``finished`` alone) and answers what
    it answered from the SYNC stream: the final job's JSON, which the status route also
    renders (without ``textOutputs``), with the job's error as HTTP status and
    ``responseStatus`` - for a job that succeeds, fails and is cancelled."""
    gateway, comfy = stack
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:

        async def sync(form: dict[str, str]) -> tuple[httpx.Response, dict[str, Any]]:
            res = await http.post(
                "/api/ImageToImage",
                data={"PositivePrompt": "a sea", "Steps": "1", "Sync": "true", **form},
                files={"image": ("i.png", PNG, "image/png")},
            )
            status = await http.get(
                "/api/GetArtifactGenerationStatus", params={"jobId": res.json()["jobId"]}
            )
            assert status.status_code == 200, status.text
            return res, status.json()

        res, status = await sync({"RefId": "ok-1", "BatchSize": "2"})
        assert res.status_code == 200, res.text
        assert res.json() == {**status, "textOutputs": []}
        assert set(status) == {"jobId", "refId", "jobState", "status", "outputs", "results"}
        assert status["jobState"] == "Completed" and len(status["outputs"]) == 2

        res, status = await sync({"Model": "no_such_model.safetensors"})
        assert res.status_code in (400, 412), res.text
        assert res.json() == {**status, "textOutputs": []}
        assert status["jobState"] == "Failed"
        assert "no_such_model.safetensors" in status["responseStatus"]["message"]

        comfy.hang_at("7")  # the KSampler of the ImageToImage workflow
        waiting = asyncio.create_task(sync({"RefId": "cancel-1"}))
        async with asyncio.timeout(20):
            while comfy.running_prompt is None:
                await asyncio.sleep(0.02)
        found = await http.get("/api/GetArtifactGenerationStatus", params={"refId": "cancel-1"})
        cancelled = await http.post(f"/v1/jobs/{found.json()['jobId']}:cancel", json={})
        assert cancelled.status_code == 200, cancelled.text
        res, status = await waiting
        assert res.json() == {**status, "textOutputs": []}
        assert status["jobState"] == "Cancelled"
        assert res.status_code == 499
        assert status["responseStatus"]["errorCode"] == "JOB_CANCELLED"
