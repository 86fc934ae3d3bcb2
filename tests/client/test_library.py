"""The Python client library against a real Service."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from imagetasks.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc
from PIL import Image

from aiserver.client import (
    CHUNK_SIZE,
    Accepted,
    AsyncClient,
    Client,
    ClientError,
    Finished,
    OutputData,
    OutputReady,
    Progress,
    Stage,
    TextOutput,
    requests,
)
from tests.client.support import INJECTED_FAILURE, GenServer
from tests.support.images import encode, quadrant_image

PNG = encode(quadrant_image(64, 48), "PNG")
MASK = encode(Image.new("RGB", (64, 48), (255, 0, 0)), "PNG")


def size_of(data: bytes | None) -> tuple[int, int]:
    assert data is not None
    with Image.open(io.BytesIO(data)) as im:
        return im.size


async def wait_for_state(client: AsyncClient, name: str, state: int, limit_s: float = 20) -> None:
    job = None
    for _ in range(int(limit_s / 0.05)):
        job = await client.get_job(name)
        if job.state == state:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} never reached state {state}: {job}")


# ---- light calls ----------------------------------------------------------------------------


async def test_convert_from_bytes_path_and_file_object(client: AsyncClient, tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(PNG)
    from_bytes = await client.convert(PNG, format="webp")
    from_path = await client.convert(path, format="webp")
    with path.open("rb") as f:
        from_file = await client.convert(f, format="IMAGE_FORMAT_WEBP", quality=50)
    for result in (from_bytes, from_path, from_file):
        assert result.info.format == "webp" and result.info.mime_type == "image/webp"
        assert (result.info.width, result.info.height) == (64, 48)
        assert result.data is not None and len(result.data) == result.info.size_bytes
        assert size_of(result.data) == (64, 48)
    assert from_path.info.file_name.startswith("photo")  # the path's name was sent


async def test_crop_streams_into_out_and_large_inputs_go_in_chunks(
    client: AsyncClient, tmp_path: Path
) -> None:
    # Noise does not compress: a PNG of several MiB, so the upload takes several chunks.
    big = Image.frombytes("RGB", (1200, 1000), os.urandom(1200 * 1000 * 3))
    source = tmp_path / "big.png"
    big.save(source, "PNG")
    assert source.stat().st_size > 2 * CHUNK_SIZE
    out = tmp_path / "out" / "crop.jpg"
    result = await client.crop(source, x=100, y=50, width=300, height=200, format="jpg", out=out)
    assert result.data is None
    assert (result.info.width, result.info.height, result.info.format) == (300, 200, "jpg")
    assert out.stat().st_size == result.info.size_bytes
    assert not out.with_name("crop.jpg.part").exists()
    with Image.open(out) as im:
        assert im.size == (300, 200) and im.format == "JPEG"


async def test_errors_carry_code_reason_and_fields(client: AsyncClient, tmp_path: Path) -> None:
    out = tmp_path / "never.png"
    with pytest.raises(ClientError) as caught:
        await client.crop(PNG, x=0, y=0, width=1000, height=10, out=out)
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.code_name == "INVALID_ARGUMENT"
    assert err.reason == "CROP_OUT_OF_BOUNDS" and err.domain
    assert [v.field for v in err.field_violations] == ["params.width"]
    line = str(err)
    assert "\n" not in line
    assert line.startswith("INVALID_ARGUMENT: ") and "[CROP_OUT_OF_BOUNDS]" in line
    assert "(params.width: " in line
    assert err.to_dict()["field_violations"][0]["field"] == "params.width"
    assert not out.exists() and not (tmp_path / "never.png.part").exists()

    with pytest.raises(ClientError) as caught:
        await client.convert(b"", format="png")
    assert caught.value.code_name == "INVALID_ARGUMENT"
    assert caught.value.reason == "EMPTY_IMAGE"


@pytest.mark.parametrize("settings_overrides", [{"max_upload_bytes": 100_000}])
async def test_a_rejected_upload_shows_the_servers_status(
    client: AsyncClient, tmp_path: Path
) -> None:
    # The server ends the call while the client still has megabytes to send: the client
    # must report the server's status, not a local error.
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * CHUNK_SIZE))
    with pytest.raises(ClientError) as caught:
        await client.convert(big, format="png")
    assert caught.value.code_name == "RESOURCE_EXHAUSTED"
    assert caught.value.reason == "UPLOAD_TOO_LARGE"


async def test_local_problems_fail_before_any_call(client: AsyncClient, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        await client.convert(tmp_path / "missing.png", format="png")
    with pytest.raises(ValueError, match="unknown image format"):
        await client.convert(PNG, format="heic")
    with pytest.raises(TypeError):
        await client.convert(12345, format="png")  # type: ignore[arg-type]


async def test_unreachable_server_is_unavailable(tmp_path: Path) -> None:
    async with AsyncClient("127.0.0.1:1", timeout=5) as c:
        with pytest.raises(ClientError) as caught:
            await c.get_job("jobs/x")
    assert caught.value.code_name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


async def test_unknown_job_is_not_found(client: AsyncClient) -> None:
    with pytest.raises(ClientError) as caught:
        await client.get_job("01NOSUCHJOB")
    assert caught.value.code_name == "NOT_FOUND"


def test_client_error_from_a_status_with_retry_info() -> None:
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="agents\nbusy")
    for detail in (
        error_details_pb2.ErrorInfo(reason="NO_CAPACITY", domain="d", metadata={"a": "1"}),
        error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=2, nanos=500_000_000)
        ),
    ):
        packed = any_pb2.Any()
        packed.Pack(detail)
        status.details.append(packed)
    err = ClientError.from_status(status)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert (err.reason, err.metadata, err.retry_delay) == ("NO_CAPACITY", {"a": "1"}, 2.5)
    assert str(err) == "UNAVAILABLE: agents busy [NO_CAPACITY] retry in 2.5s"


# ---- generative calls -----------------------------------------------------------------------


async def test_upscale_events_in_order_and_bytes(gen_client: AsyncClient) -> None:
    events = [event async for event in gen_client.upscale(PNG)]
    assert isinstance(events[0], Accepted) and events[0].task == "ImageUpscale"
    assert isinstance(events[-1], Finished) and events[-1].state == "SUCCEEDED"
    assert events[-1].error is None
    progress = [e for e in events if isinstance(e, Progress)]
    assert progress and all(isinstance(p.stage, Stage) for p in progress)
    (ready,) = [e for e in events if isinstance(e, OutputReady)]
    data = b"".join(e.data for e in events if isinstance(e, OutputData))
    assert [e.last for e in events if isinstance(e, OutputData)][-1]
    assert len(data) == ready.artifact.size_bytes
    assert size_of(data) == (128, 96)


async def test_result_only_streams_the_outputs_and_the_final_job(
    gen_client: AsyncClient,
) -> None:
    stream = gen_client.upscale(PNG, result_only=True)
    events = [event async for event in stream]
    assert [type(e) for e in events if not isinstance(e, OutputData)] == [OutputReady, Finished]
    assert stream.job_name == events[-1].final.name  # known from the first event
    data = b"".join(e.data for e in events if isinstance(e, OutputData))
    assert size_of(data) == (128, 96)
    result = await gen_client.image_to_text(PNG, result_only=True, ref_id="cap-1").run()
    assert result.succeeded and result.texts and result.texts[0].strip()
    assert result.job.ref_id == "cap-1" and not result.existing
    refs = await gen_client.upscale(PNG, result_only=True, references_only=True).run()
    (output,) = refs.outputs
    assert output.data is None and output.artifact.name == refs.job.outputs[0].name
    with pytest.raises(ValueError, match="result_only"):
        gen_client.upscale(PNG, wait=False, result_only=True)


async def test_run_collects_outputs_texts_and_the_final_job(gen_client: AsyncClient) -> None:
    result = await gen_client.image_to_image(
        PNG, prompt="a lighthouse at dawn", steps=2, batch_size=2, seed=7, tag="t1"
    ).run()
    assert result.succeeded and result.state == "SUCCEEDED" and result.error is None
    assert [o.index for o in result.outputs] == [0, 1]
    assert all(o.data and len(o.data) == o.artifact.size_bytes for o in result.outputs)
    assert result.job.tag == "t1" and result.job.image_to_image.positive_prompt
    assert result.raise_for_state() is result

    caption = await gen_client.image_to_text(PNG).run()
    assert caption.texts and caption.texts[0].strip()
    assert not caption.outputs

    masked = await gen_client.image_with_mask(PNG, MASK, prompt="a red door", steps=2).run()
    assert masked.succeeded
    assert [i.field for i in masked.job.inputs] == ["image", "mask"]


async def test_references_only_then_read_and_save_and_variant(
    gen_client: AsyncClient, tmp_path: Path
) -> None:
    result = await gen_client.upscale(PNG, references_only=True).run()
    (output,) = result.outputs
    assert output.data is None
    data = await gen_client.read_artifact(output.artifact.name)
    assert len(data) == output.artifact.size_bytes
    assert await gen_client.read_artifact(output.artifact.url, offset=4, limit=6) == data[4:10]
    assert (await gen_client.get_artifact(output.artifact.name)).sha256 == output.artifact.sha256
    saved = tmp_path / "saved.png"
    assert await gen_client.save_artifact(output.artifact.name, saved) == len(data)
    assert saved.read_bytes() == data

    variant = await gen_client.variant(output.artifact.name, spec="width=32")
    assert variant.info.image.width == 32 and variant.info.spec
    assert variant.data is not None and size_of(variant.data)[0] == 32
    out = tmp_path / "v.jpg"
    await gen_client.variant(output.artifact.name, width=40, format="jpg", out=out)
    with Image.open(out) as im:
        assert im.format == "JPEG" and im.width == 40


async def test_no_wait_then_watch_list_and_get(gen_client: AsyncClient) -> None:
    result = await gen_client.upscale(PNG, wait=False, tag="later", ref_id="order-9").run()
    assert result.job_name.startswith("jobs/")
    events = [e async for e in gen_client.watch_job(result.job_name)]
    assert isinstance(events[0], Accepted) and isinstance(events[-1], Finished)
    assert not any(isinstance(e, OutputData) for e in events)
    job = await gen_client.get_job(result.job_name.removeprefix("jobs/"))
    assert job.state == job_pb2.Job.STATE_SUCCEEDED
    page = await gen_client.list_jobs(tag="later", states=["succeeded"], task="ImageUpscale")
    assert [j.name for j in page.jobs] == [result.job_name]
    assert [j.name async for j in gen_client.iter_jobs(ref_id="order-9", page_size=1)] == [
        result.job_name
    ]
    again = await gen_client.upscale(PNG, ref_id="order-9").run()
    assert again.existing and again.job_name == result.job_name


async def test_failed_job_is_a_result_with_an_error(
    gen: GenServer, gen_client: AsyncClient
) -> None:
    gen.fail_image_to_image()
    result = await gen_client.image_to_image(PNG, prompt="x", timeout=20).run()
    assert result.state == "FAILED" and not result.succeeded
    assert result.error is not None and INJECTED_FAILURE in result.error.message
    with pytest.raises(ClientError):
        result.raise_for_state()


async def test_invalid_parameters_raise_with_field_violations(gen_client: AsyncClient) -> None:
    with pytest.raises(ClientError) as caught:
        await gen_client.image_to_image(PNG, prompt="x", denoise=1.5).run()
    assert caught.value.code_name == "INVALID_ARGUMENT"
    assert "params.denoise" in [v.field for v in caught.value.field_violations]


async def test_cancel_job_and_leaving_a_stream_cancels_the_call(
    gen: GenServer, gen_client: AsyncClient
) -> None:
    gen.hang_image_to_image()
    name = (await gen_client.image_to_image(PNG, prompt="x", wait=False).run()).job_name
    await wait_for_state(gen_client, name, job_pb2.Job.STATE_RUNNING)
    cancelled = await gen_client.cancel_job(name)
    assert cancelled.state == job_pb2.Job.STATE_CANCELLED

    # A waited-for job whose stream is left early is cancelled with the call.
    stream = gen_client.image_to_image(PNG, prompt="y")
    async for event in stream:
        if isinstance(event, Accepted):
            break
    assert stream.job_name
    await wait_for_state(gen_client, stream.job_name, job_pb2.Job.STATE_CANCELLED)
    with pytest.raises(RuntimeError, match="once"):
        async for _ in stream:
            pass


# ---- the blocking client and the API key --------------------------------------------------


async def test_blocking_client(gen: GenServer, tmp_path: Path) -> None:
    def use() -> dict[str, Any]:
        with Client(gen.target, timeout=60) as c:
            kinds = [type(e).__name__ for e in c.upscale(PNG)]
            result = c.image_to_text(PNG).run()
            converted = c.convert(PNG, format="png", out=tmp_path / "c.png")
            jobs = c.list_jobs().jobs
            watched = [type(e).__name__ for e in c.watch_job(jobs[0].name)]
            first = next(iter(c.image_to_image(PNG, prompt="x")))  # left early: cancelled
            with pytest.raises(ClientError):
                c.get_job("nope")
            return {
                "kinds": kinds,
                "texts": result.texts,
                "converted": converted.info.width,
                "watched": watched,
                "first": first,
            }

    got = await asyncio.to_thread(use)
    assert got["kinds"][0] == "Accepted" and got["kinds"][-1] == "Finished"
    assert "OutputData" in got["kinds"] and got["texts"] and got["converted"] == 64
    assert got["watched"][-1] == "Finished"
    assert isinstance(got["first"], Accepted)


class _EchoJobs(job_service_pb2_grpc.JobServiceServicer):
    async def GetJob(self, request: Any, context: Any) -> Any:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        return job_service_pb2.GetJobResponse(job=job_pb2.Job(name=request.name, owner=auth))


async def test_api_key_is_sent_as_a_bearer_token() -> None:
    server = grpc.aio.server()
    job_service_pb2_grpc.add_JobServiceServicer_to_server(_EchoJobs(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncClient(f"127.0.0.1:{port}", api_key="s3cret") as c:
            job = await c.get_job("abc")
        assert (job.name, job.owner) == ("jobs/abc", "Bearer s3cret")
        async with AsyncClient(f"127.0.0.1:{port}") as c:
            assert (await c.get_job("abc")).owner == ""
    finally:
        await server.stop(0)


async def test_text_output_events(gen_client: AsyncClient) -> None:
    events = [e async for e in gen_client.image_to_text(PNG, prompt="caption")]
    (text,) = [e for e in events if isinstance(e, TextOutput)]
    assert text.text.strip() and text.index == 0


def test_result_only_cannot_go_with_wait_false_on_any_request() -> None:
    for make in (
        lambda: requests.ImageUpscale(PNG, result_only=True, wait=False),
        lambda: requests.ImageWithMask(PNG, PNG, prompt="x", result_only=True, wait=False),
    ):
        with pytest.raises(ValueError, match="result_only"):
            make()
