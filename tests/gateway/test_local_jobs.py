"""Jobs through the in-process shim: its upload calls run the service's own guard and handlers
in process (``aiserver.api.local_calls``), never the loopback network, and answer exactly as
a shim in front of the network does: the same keys and owners, the same errors, the same
deadline and the same end for a SYNC job whose caller leaves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from imagetasks.v1 import job_pb2, job_service_pb2_grpc
from imagetasks.v1 import job_service_pb2 as jpb

from aiserver.gateway import Gateway, GatewaySettings
from aiserver.server import Service
from tests.security.conftest import PNG, auth, bearer, channel_to, http_base, keyed_service
from tests.support.comfy_standin import ComfyStandIn

UPSCALE = "imagetasks.v1.GenerationService.ImageUpscale"


@pytest.fixture
async def stack(
    tmp_path: Path,
) -> AsyncIterator[tuple[Service, list[ComfyStandIn], Gateway]]:
    """A keyed service (its shim embedded) and a second shim in front of its gRPC port."""
    async with keyed_service(tmp_path) as (service, comfy):
        network = Gateway(
            f"127.0.0.1:{service.grpc_port}",
            port=0,
            settings=GatewaySettings.from_settings(service.settings),
        )
        await network.start()
        try:
            yield service, comfy, network
        finally:
            await network.stop()


def _embedded(service: Service) -> Gateway:
    assert service.gateway is not None and service.gateway.backend is not None
    return service.gateway


async def _job_state(service: Service, who: str) -> int:
    async with channel_to(service) as ch:
        jobs = job_service_pb2_grpc.JobServiceStub(ch)
        listed = await jobs.ListJobs(jpb.ListJobsRequest(), metadata=bearer(who))
        return listed.jobs[0].state if listed.jobs else job_pb2.Job.STATE_UNSPECIFIED


async def _until_state(service: Service, who: str, state: int) -> None:
    async with asyncio.timeout(20):
        while await _job_state(service, who) != state:
            await asyncio.sleep(0.05)


async def _streams_closed(service: Service) -> None:
    guard = _embedded(service).backend.local.interceptor  # type: ignore[union-attr]
    async with asyncio.timeout(5):
        while guard.active_streams or guard.uploads_by_peer:
            await asyncio.sleep(0.01)


async def test_embedded_jobs_run_in_process_with_the_keys_and_owners(
    stack: tuple[Service, list[ComfyStandIn], Gateway],
) -> None:
    service, _, _ = stack
    backend = _embedded(service).backend
    assert backend is not None
    made = backend.callable(backend.method(UPSCALE))
    assert not isinstance(made, grpc.aio.StreamStreamMultiCallable)  # not the channel's
    async with httpx.AsyncClient(base_url=http_base(service), timeout=30) as http:
        res = await http.post(
            "/api/ImageUpscale",
            data={"Sync": "true", "RefId": "local-1"},
            files={"image": ("a.png", PNG, "image/png")},
            headers=auth("alice"),
        )
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["jobState"] == "Completed" and body["refId"] == "local-1"
        url = body["outputs"][0]["url"]
        assert (await http.get(url, headers=auth("alice"))).status_code == 200
        assert (await http.get(url, headers=auth("bob"))).status_code == 404
        status = await http.get(
            "/api/GetArtifactGenerationStatus", params={"refId": "local-1"}, headers=auth("bob")
        )
        assert status.status_code == 404  # another key's job does not exist for bob
        for headers, code in (
            ({}, "API_KEY_MISSING"),
            (auth("alice") | {"Authorization": "x"}, "API_KEY_INVALID"),
        ):
            res = await http.post(
                "/api/ImageUpscale",
                data={"Sync": "true"},
                files={"image": ("a.png", PNG, "image/png")},
                headers=headers,
            )
            assert res.status_code == 401
            assert res.json()["responseStatus"]["errorCode"] == code
    await _streams_closed(service)


_BAD = (
    ("ImageUpscale", {"Sync": "true"}, {"image": ("a.png", b"not a png at all", "image/png")}),
    ("ImageUpscale", {"Sync": "true"}, {"mask": ("a.png", PNG, "image/png")}),
    ("ImageUpscale", {"Sync": "true", "Model": "no-such-model.pth"}, {"image": ("a.png", PNG)}),
    ("ImageToImage", {"Sync": "true", "Steps": "100000"}, {"image": ("a.png", PNG)}),
    ("ImageToImage", {"Sync": "true", "PositivePrompt": "x" * 5000}, {"image": ("a.png", PNG)}),
    ("ImageToImage", {"RefId": "x" * 1000}, {"image": ("a.png", PNG)}),
    ("ImageUpscale", {"ReplyTo": "http://127.0.0.1:9/hook"}, {"image": ("a.png", PNG)}),
)


async def test_errors_are_those_of_the_shim_over_the_network(
    stack: tuple[Service, list[ComfyStandIn], Gateway],
) -> None:
    service, _, network = stack
    answers: dict[str, list[tuple[int, Any]]] = {}
    for label, base in (("embedded", http_base(service)), ("network", network.url)):
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            got = answers.setdefault(label, [])
            for task, data, files in _BAD:
                res = await http.post(f"/api/{task}", data=data, files=files, headers=auth("alice"))
                body = res.json()
                if "jobId" in body:  # a job that failed: a new id on each side
                    assert body.pop("jobId") == body.pop("refId")
                got.append((res.status_code, body))
    assert all(status >= 400 for status, _ in answers["embedded"]), answers["embedded"]
    assert answers["embedded"] == answers["network"]
    await _streams_closed(service)


async def test_a_sync_deadline_ends_the_local_call_and_its_job(
    stack: tuple[Service, list[ComfyStandIn], Gateway],
) -> None:
    service, comfy, _ = stack
    comfy[0].hang_at("7")
    gateway = Gateway(
        f"127.0.0.1:{service.grpc_port}",
        port=0,
        settings=GatewaySettings.from_settings(service.settings, sync_timeout_s=1.0),
        local_calls=_embedded(service).backend.local,  # type: ignore[union-attr]
    )
    await gateway.start()
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            res = await http.post(
                "/api/ImageToImage",
                files={"image": ("a.png", PNG)},
                data={"PositivePrompt": "x", "Sync": "true"},
                headers=auth("alice"),
            )
        assert res.status_code == 504, res.text
        assert res.json()["responseStatus"]["errorCode"] == "DEADLINE_EXCEEDED"
    finally:
        await gateway.stop()
    await _until_state(service, "alice", job_pb2.Job.STATE_CANCELLED)
    await _streams_closed(service)


@pytest.mark.parametrize("shim", ["embedded", "network"])
async def test_a_caller_leaving_a_sync_job_cancels_it(
    stack: tuple[Service, list[ComfyStandIn], Gateway], shim: str
) -> None:
    service, comfy, network = stack
    comfy[0].hang_at("7")
    base = http_base(service) if shim == "embedded" else network.url
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        request = asyncio.create_task(
            http.post(
                "/api/ImageToImage",
                files={"image": ("a.png", PNG)},
                data={"PositivePrompt": "x", "Sync": "true"},
                headers=auth("alice"),
            )
        )
        await _until_state(service, "alice", job_pb2.Job.STATE_RUNNING)
        request.cancel()  # the connection closes with the request unanswered
        with pytest.raises(asyncio.CancelledError):
            await request
    await _until_state(service, "alice", job_pb2.Job.STATE_CANCELLED)
    await _streams_closed(service)


async def test_shutdown_never_cancels_a_sync_job_of_the_embedded_shim(tmp_path: Path) -> None:
    async with keyed_service(tmp_path, shutdown_grace_s=0.5) as (service, comfy):
        comfy[0].hang_at("7")
        async with httpx.AsyncClient(base_url=http_base(service), timeout=30) as http:
            request = asyncio.create_task(
                http.post(
                    "/api/ImageToImage",
                    files={"image": ("a.png", PNG)},
                    data={"PositivePrompt": "x", "Sync": "true"},
                    headers=auth("alice"),
                )
            )
            await _until_state(service, "alice", job_pb2.Job.STATE_RUNNING)
            await service.stop()  # the call is cut; the accepted job is not cancelled
            with contextlib.suppress(httpx.HTTPError):
                await request
        again = Service(service.settings)
        await again.start()
        try:
            comfy[0].release("7")
            await _until_state(again, "alice", job_pb2.Job.STATE_SUCCEEDED)
        finally:
            await again.stop(grace_s=1)


def _big_png() -> bytes:
    """A 32 x 24 PNG of about 5.6 MB: six 0.9 MB text chunks (each within Pillow's limit)."""
    import io
    import os

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for i in range(6):
        info.add_text(f"pad{i}", os.urandom(450_000).hex())
    buffer = io.BytesIO()
    Image.open(io.BytesIO(PNG)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


async def test_uploads_past_the_in_flight_window(tmp_path: Path) -> None:
    big = _big_png()  # past the 4 MiB a local call holds in flight
    assert len(big) > 5 * 1024 * 1024
    # The embedded upscaler serves it (whether a stand-in takes inputs this large is the
    # ComfyUI provider's business, not the shim's).
    async with keyed_service(tmp_path, local_upscale="always") as (service, _):
        network = Gateway(
            f"127.0.0.1:{service.grpc_port}",
            port=0,
            settings=GatewaySettings.from_settings(service.settings),
        )
        await network.start()
        try:
            answers = []
            for base in (http_base(service), network.url):
                async with httpx.AsyncClient(base_url=base, timeout=60) as http:
                    res = await http.post(
                        "/api/ImageUpscale",
                        data={"Sync": "true"},
                        files={"image": ("big.png", big, "image/png")},
                        headers=auth("alice"),
                    )
                    assert res.status_code == 200, res.text
                    assert res.json()["jobState"] == "Completed"
                    # Refused at the first message while the file is still being written:
                    # the writer is released, and the answer is the same on both shims.
                    res = await http.post(
                        "/api/ImageToImage",
                        data={"Steps": "100000", "Sync": "true"},
                        files={"image": ("big.png", big, "image/png")},
                        headers=auth("alice"),
                    )
                    answers.append((res.status_code, res.json()))
            assert answers[0][0] == 400 and answers[0] == answers[1]
        finally:
            await network.stop()
        await _streams_closed(service)
