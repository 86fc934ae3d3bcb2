"""WorkflowService end to end: a workflows folder, stand-in agents, gRPC (and grpcurl)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from imagetasks.v1 import artifact_service_pb2 as apb
from imagetasks.v1 import (
    artifact_service_pb2_grpc,
    common_pb2,
    job_pb2,
    tasks_pb2,
    workflow_service_pb2_grpc,
)
from imagetasks.v1 import workflow_service_pb2 as wpb
from PIL import Image

from aiserver.providers.comfy.workflows import WorkflowCatalog, default_workflows_dir
from aiserver.server import Service
from tests.client.cli_run import run as run_cli
from tests.support.generation import comfy_service, generate, run_workflow
from tests.support.grpc_helpers import rich_status, violated_fields
from tests.support.images import encode, quadrant_image

PNG = encode(quadrant_image(64, 48), "PNG")
SUCCEEDED = job_pb2.Job.STATE_SUCCEEDED
GRPCURL = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "grpcurl"

# A workflow no built-in task has: the image, inverted (core nodes only).
INVERT_GRAPH = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["2", 0],
            "upscale_method": "bilinear",
            "width": 0,
            "height": 0,
            "crop": "disabled",
        },
    },
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
}
INVERT_BINDING = {
    "title": "Invert",
    "description": "negative of an image, optionally resized",
    "graph": "invert.json",
    "inputs": {"photo": {"node": "1", "input": "image", "kind": "image"}},
    "params": {
        "width": {
            "targets": [{"node": "3", "input": "width"}],
            "type": "integer",
            "minimum": 0,
            "maximum": 4096,
            "default": 0,
        },
        "height": {"node": "3", "input": "height", "type": "integer", "minimum": 0, "default": 0},
        "method": {
            "node": "3",
            "input": "upscale_method",
            "type": "string",
            "choices": ["bilinear", "lanczos"],
        },
    },
    "job": [{"node": "4", "input": "filename_prefix", "format": "aiserver/{workflow}/{job_id}"}],
    "outputs": [{"node": "4", "kind": "images"}],
}


def write_workflow(folder: Path, name: str, graph: Any, binding: Any) -> None:
    (folder / f"{name}.json").write_text(json.dumps(graph, indent=1), encoding="utf-8")
    binding = {**binding, "graph": f"{name}.json"}
    (folder / f"{name}.binding.json").write_text(json.dumps(binding, indent=2), encoding="utf-8")


def stub(service: Service) -> tuple[grpc.aio.Channel, Any]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")
    return channel, workflow_service_pb2_grpc.WorkflowServiceStub(channel)


async def listed(service: Service) -> dict[str, wpb.Workflow]:
    channel, ws = stub(service)
    async with channel:
        answer = await ws.ListWorkflows(wpb.ListWorkflowsRequest())
    return {w.name.removeprefix("workflows/"): w for w in answer.workflows}


async def until_listed(service: Service, name: str, within: float = 10.0) -> wpb.Workflow:
    async with asyncio.timeout(within):
        while True:
            found = (await listed(service)).get(name)
            if found is not None:
                return found
            await asyncio.sleep(0.05)


async def test_builtins_and_examples_are_listed_typed_and_available(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _):
        found = await listed(service)
        assert {"image_to_image", "image_with_mask", "text_to_image", "outpaint"} <= set(found)
        t2i = found["text_to_image"]
        assert t2i.available and list(t2i.agents) == ["gpu-0"] and len(t2i.version) == 16
        params = {p.name: p for p in t2i.parameters}
        assert params["prompt"].required and params["prompt"].type == wpb.PARAMETER_TYPE_STRING
        assert params["steps"].type == wpb.PARAMETER_TYPE_INTEGER
        assert (params["steps"].minimum, params["steps"].maximum) == (1, 150)
        assert params["steps"].default_value.number_value == 20
        assert params["seed"].random
        assert "euler" in [c.string_value for c in params["sampler"].choices]
        assert not t2i.inputs and [o.kind for o in t2i.outputs] == [wpb.WorkflowOutput.KIND_IMAGES]
        i2i = found["image_to_image"]
        assert i2i.task == common_pb2.TASK_IMAGE_TO_IMAGE
        assert [(i.name, i.kind, i.required) for i in i2i.inputs] == [
            ("image", wpb.INPUT_KIND_IMAGE, True)
        ]
        channel, ws = stub(service)
        async with channel:
            got = await ws.GetWorkflow(wpb.GetWorkflowRequest(name="workflows/outpaint"))
            assert got.workflow.version == found["outpaint"].version
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await ws.GetWorkflow(wpb.GetWorkflowRequest(name="workflows/nope"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_text_to_image_and_outpaint_examples_run(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, comfy):
        channel, _ = stub(service)
        async with channel:
            got = await run_workflow(
                channel,
                "text_to_image",
                {"prompt": "a red fox", "width": 100, "height": 64, "steps": 2, "seed": 7},
                {},
            )
            assert got.final.state == SUCCEEDED, got.final.error
            assert got.final.task == common_pb2.TASK_WORKFLOW
            assert got.final.workflow.workflow == "workflows/text_to_image"
            assert got.final.workflow.parameters["prompt"] == "a red fox"
            (output,) = got.of("output")
            assert output.artifact.seed == 7
            with Image.open(io.BytesIO(got.output_bytes())) as im:
                assert im.size == (96, 64)  # the latent rounds down to multiples of 8
            prompt = comfy[0].received.prompts[-1]["prompt"]
            assert prompt["2"]["inputs"]["text"] == "a red fox"
            assert prompt["5"]["inputs"]["steps"] == 2
            assert prompt["7"]["inputs"]["filename_prefix"].startswith("aiserver/text_to_image/")

            got = await run_workflow(
                channel,
                "outpaint",
                {"prompt": "more sea", "right": 32, "steps": 1},
                {"image": PNG},
            )
            assert got.final.state == SUCCEEDED, got.final.error
            with Image.open(io.BytesIO(got.output_bytes())) as im:
                assert im.size == (96, 48)  # 64 + 32 wide


async def test_bad_parameters_get_one_violation_each(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, comfy):
        channel, _ = stub(service)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await run_workflow(
                    channel,
                    "text_to_image",
                    {
                        "colour": "red",
                        "steps": "many",
                        "width": 4,
                        "cfg_scale": 1.5,
                        "sampler": "nope",
                        "height": 64.5,
                    },
                    {},
                )
            err = caught.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            _, details = rich_status(err)
            assert details["ErrorInfo"].reason == "INVALID_PARAMETERS"
            assert sorted(violated_fields(details)) == [
                "parameters.colour",
                "parameters.height",
                "parameters.prompt",
                "parameters.sampler",
                "parameters.steps",
                "parameters.width",
            ]
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await run_workflow(channel, "no_such_flow", {}, {})
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await run_workflow(channel, "outpaint", {"prompt": "x"}, {})
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert violated_fields(rich_status(caught.value)[1]) == ["image"]
        assert not comfy[0].received.prompts


async def test_a_new_workflow_is_callable_without_restart_through_grpcurl(
    tmp_path: Path,
) -> None:
    user = tmp_path / "workflows"
    user.mkdir()
    async with comfy_service(tmp_path, workflows_dir=user, workflows_poll_s=0.1) as (service, _):
        assert "invert" not in await listed(service)
        write_workflow(user, "invert", INVERT_GRAPH, INVERT_BINDING)
        found = await until_listed(service, "invert")
        assert found.available and found.title == "Invert"
        address = f"127.0.0.1:{service.grpc_port}"
        # grpcurl knows nothing but what reflection tells it.
        described = await _run(
            GRPCURL, "-plaintext", address, "describe", "imagetasks.v1.WorkflowService"
        )
        assert "RunWorkflow" in described
        listing = json.loads(
            await _run(
                GRPCURL,
                "-plaintext",
                "-d",
                "{}",
                address,
                "imagetasks.v1.WorkflowService/ListWorkflows",
            )
        )
        assert "workflows/invert" in [w["name"] for w in listing["workflows"]]
        first = {"params": {"workflow": "invert", "parameters": {"width": 20, "height": 10}}}
        chunk = {"chunk": {"field": "photo", "data": base64.b64encode(PNG).decode()}}
        stdin = json.dumps(first) + "\n" + json.dumps(chunk) + "\n"
        out = await _run(
            GRPCURL,
            "-plaintext",
            "-d",
            "@",
            address,
            "imagetasks.v1.WorkflowService/RunWorkflow",
            stdin=stdin,
        )
        events = [json.loads(doc)["event"] for doc in _documents(out)]
        finished = events[-1]["finished"]["job"]
        assert finished["state"] == "STATE_SUCCEEDED", finished
        data = b"".join(
            base64.b64decode(e["output_chunk"]["data"]) for e in events if "output_chunk" in e
        )
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (20, 10)


async def test_broken_bindings_are_listed_with_file_and_line_and_others_work(
    tmp_path: Path,
) -> None:
    user = tmp_path / "workflows"
    user.mkdir()
    write_workflow(user, "invert", INVERT_GRAPH, INVERT_BINDING)
    bad = json.loads(json.dumps(INVERT_BINDING))
    bad["params"]["width"]["type"] = "colour"
    write_workflow(user, "broken", INVERT_GRAPH, bad)
    async with comfy_service(tmp_path, workflows_dir=user, workflows_poll_s=0.1) as (service, _):
        found = await listed(service)
        assert found["invert"].available
        broken = found["broken"]
        assert not broken.available
        text = (user / "broken.binding.json").read_text(encoding="utf-8").splitlines()
        line = next(n for n, t in enumerate(text, 1) if '"colour"' in t)
        assert f"broken.binding.json:{line}: params.width.type" in broken.unavailable_reason
        channel, _ = stub(service)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await run_workflow(channel, "broken", {}, {"photo": PNG})
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert rich_status(caught.value)[1]["ErrorInfo"].reason == "WORKFLOW_BROKEN"
            # A working one broken by an edit is reported; fixed, it is back.
            (user / "invert.binding.json").write_text('{\n  "graph": 3,\n}', encoding="utf-8")
            async with asyncio.timeout(10):
                while (await listed(service))["invert"].available:
                    await asyncio.sleep(0.05)
            reason = (await listed(service))["invert"].unavailable_reason
            assert "invert.binding.json:3" in reason
            write_workflow(user, "invert", INVERT_GRAPH, INVERT_BINDING)
            async with asyncio.timeout(10):
                while not (await listed(service))["invert"].available:
                    await asyncio.sleep(0.05)
            got = await run_workflow(channel, "invert", {}, {"photo": PNG})
            assert got.final.state == SUCCEEDED


async def test_a_workflow_needing_a_node_no_agent_has(tmp_path: Path) -> None:
    user = tmp_path / "workflows"
    user.mkdir()
    graph = json.loads(json.dumps(INVERT_GRAPH))
    graph["2"] = {
        "class_type": "ImageSharpen",
        "inputs": {"image": ["1", 0], "sharpen_radius": 1, "sigma": 1.0, "alpha": 1.0},
    }
    write_workflow(user, "sharpen", graph, INVERT_BINDING)
    async with comfy_service(tmp_path, workflows_dir=user) as (service, comfy):
        found = (await listed(service))["sharpen"]
        assert not found.available and not found.agents
        assert found.unavailable_reason == "gpu-0: missing node types: ImageSharpen"
        channel, _ = stub(service)
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await run_workflow(channel, "sharpen", {}, {"photo": PNG})
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert rich_status(caught.value)[1]["ErrorInfo"].reason == "COMFYUI_NODE_MISSING"
        assert not comfy[0].received.prompts


async def test_jobs_keep_the_version_they_were_accepted_with(tmp_path: Path) -> None:
    # The agent runs one job at a time and none waits in its queue (queue_ahead=0): the first
    # hangs, so the next ones are accepted and wait in the service's queue (their graphs not
    # built yet) while the files change under them.
    user = tmp_path / "workflows"
    user.mkdir()
    write_workflow(user, "invert", INVERT_GRAPH, INVERT_BINDING)
    builtin = default_workflows_dir()
    shutil.copy(builtin / "image_to_image.json", user / "image_to_image.json")
    shutil.copy(builtin / "image_to_image.binding.json", user / "image_to_image.binding.json")
    async with comfy_service(tmp_path, workflows_dir=user, workflows_poll_s=0.1, queue_ahead=0) as (
        service,
        comfy,
    ):
        before = (await listed(service))["invert"].version
        comfy[0].hang_at("2")
        async with channel_for(service) as channel:
            blocker = asyncio.create_task(
                run_workflow(channel, "invert", {"width": 8, "height": 8}, {"photo": PNG})
            )
            await comfy[0].wait_for(lambda: len(comfy[0].received.prompts) == 1)
            queued = asyncio.create_task(
                run_workflow(channel, "invert", {"width": 16, "height": 12}, {"photo": PNG})
            )
            typed = asyncio.create_task(
                generate(
                    channel,
                    "ImageToImage",
                    tasks_pb2.ImageToImageParams(positive_prompt="a boat", steps=1),
                    {"image": PNG},
                )
            )
            manager = service.manager
            assert manager is not None
            async with asyncio.timeout(10):  # both accepted, queued behind the hanging one
                while (
                    sum(n for (_, state), n in manager.stats().items() if state.value == "QUEUED")
                    < 2
                ):
                    await asyncio.sleep(0.02)
            # Changed now: the graph scales with another method and the width parameter is
            # gone; the built-in task's binding samples with another sampler by default.
            graph = json.loads(json.dumps(INVERT_GRAPH))
            graph["3"]["inputs"]["upscale_method"] = "lanczos"
            binding = json.loads(json.dumps(INVERT_BINDING))
            del binding["params"]["width"]
            write_workflow(user, "invert", graph, binding)
            i2i = user / "image_to_image.binding.json"
            i2i.write_text(
                i2i.read_text(encoding="utf-8").replace('"euler_ancestral"', '"heun"'),
                encoding="utf-8",
            )
            async with asyncio.timeout(10):
                while (await listed(service))["invert"].version == before:
                    await asyncio.sleep(0.05)
            comfy[0].release("2")
            got, typed_got = await queued, await typed
            await blocker
        assert got.final.state == SUCCEEDED, got.final.error
        assert got.final.workflow.version == before
        assert typed_got.final.state == SUCCEEDED, typed_got.final.error
        prompts = [p["prompt"] for p in comfy[0].received.prompts]
        invert = [p for p in prompts if p.get("2", {}).get("class_type") == "ImageInvert"]
        assert [p["3"]["inputs"]["upscale_method"] for p in invert] == ["bilinear", "bilinear"]
        (sampled,) = [p for p in prompts if p.get("7", {}).get("class_type") == "KSampler"]
        assert sampled["7"]["inputs"]["sampler_name"] == "euler_ancestral"
        with Image.open(io.BytesIO(got.output_bytes())) as im:
            assert im.size == (16, 12)
        # New jobs get the new version.
        async with channel_for(service) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await run_workflow(channel, "invert", {"width": 16}, {"photo": PNG})
            assert violated_fields(rich_status(caught.value)[1]) == ["parameters.width"]


def channel_for(service: Service) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{service.grpc_port}")


def test_builtin_folder_is_valid_against_the_schema() -> None:
    # Every shipped binding loads (strict: the first bad file raises), one per file.
    folder = default_workflows_dir()
    assert (folder / "binding.schema.json").is_file()
    catalog = WorkflowCatalog.load(folder)
    shipped = {p.name.removesuffix(".binding.json") for p in folder.glob("*.binding.json")}
    assert {w.name for w in catalog.workflows()} == shipped
    assert shutil.which(str(GRPCURL)), "grpcurl ships with the dev dependencies"


async def _run(*argv: Any, stdin: str = "") -> str:
    proc = await asyncio.create_subprocess_exec(
        *map(str, argv),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode == 0, err.decode() + out.decode()
    return out.decode()


def _documents(text: str) -> list[str]:
    """grpcurl prints one pretty JSON document per message."""
    decoder = json.JSONDecoder()
    docs, index = [], 0
    while index < len(text):
        while index < len(text) and text[index].isspace():
            index += 1
        if index >= len(text):
            break
        _, end = decoder.raw_decode(text, index)
        docs.append(text[index:end])
        index = end
    return docs


async def test_rest_lists_runs_and_documents_a_new_workflow_with_curl(tmp_path: Path) -> None:
    user = tmp_path / "workflows"
    user.mkdir()
    async with comfy_service(tmp_path, workflows_dir=user, workflows_poll_s=0.1) as (service, _):
        base = f"http://127.0.0.1:{service.http_port}"
        write_workflow(user, "invert", INVERT_GRAPH, INVERT_BINDING)
        await until_listed(service, "invert")
        listing = json.loads(await _run("curl", "-sS", "--fail-with-body", f"{base}/v1/workflows"))
        names = [w["name"] for w in listing["workflows"]]
        assert "workflows/invert" in names and "workflows/text_to_image" in names
        image = tmp_path / "in.png"
        image.write_bytes(PNG)
        body = json.loads(
            await _run(
                "curl",
                "-sS",
                "--fail-with-body",
                "-F",
                f"photo=@{image}",
                "-F",
                "Width=24",
                "-F",
                "height=12",
                "-F",
                "method=lanczos",
                "-F",
                "Sync=true",
                "-F",
                "RefId=rest-1",
                f"{base}/api/workflows/invert",
            )
        )
        assert body["jobState"] == "Completed" and body["refId"] == "rest-1"
        out = tmp_path / "out.png"
        await _run("curl", "-sS", "--fail-with-body", "-o", str(out), body["outputs"][0]["url"])
        with Image.open(out) as im:
            assert im.size == (24, 12)
        # Wrong values come back as AI Server errors, one per field.
        raw = await _run(
            "curl",
            "-sS",
            "-w",
            "\n%{http_code}",
            "-F",
            f"photo=@{image}",
            "-F",
            "width=wide",
            "-F",
            "method=nearest",
            f"{base}/api/workflows/invert",
        )
        text, code = raw.rsplit("\n", 1)
        assert code == "400"
        fields = sorted(e["fieldName"] for e in json.loads(text)["responseStatus"]["errors"])
        assert fields == ["parameters.method", "parameters.width"]
        # The OpenAPI document has one typed operation per workflow, new ones included.
        doc = json.loads(await _run("curl", "-sS", "--fail-with-body", f"{base}/openapi.json"))
        op = doc["paths"]["/api/workflows/invert"]["post"]
        assert op["operationId"] == "Workflow_Invert"
        form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["properties"]["width"]["type"] == "integer"
        assert form["properties"]["method"]["enum"] == ["bilinear", "lanczos"]
        assert form["properties"]["photo"]["format"] == "binary"
        assert form["required"] == ["photo"]
        t2i = doc["paths"]["/api/workflows/text_to_image"]["post"]
        assert (
            "prompt" in t2i["requestBody"]["content"]["multipart/form-data"]["schema"]["required"]
        )


@pytest.mark.parametrize(
    ("fmt", "mime", "pil"),
    [
        (common_pb2.IMAGE_FORMAT_UNSPECIFIED, "image/png", "PNG"),
        (common_pb2.IMAGE_FORMAT_PNG, "image/png", "PNG"),
        (common_pb2.IMAGE_FORMAT_WEBP, "image/webp", "WEBP"),
        (common_pb2.IMAGE_FORMAT_JPEG, "image/jpeg", "JPEG"),
        (common_pb2.IMAGE_FORMAT_AVIF, "image/avif", "AVIF"),
    ],
)
async def test_output_format_is_applied_once_when_stored(
    tmp_path: Path, fmt: int, mime: str, pil: str
) -> None:
    options = common_pb2.JobOptions(output_format=fmt, quality=70)
    async with comfy_service(tmp_path) as (service, _), channel_for(service) as channel:
        got = await run_workflow(
            channel,
            "outpaint",
            {"prompt": "sea", "right": 16, "steps": 1},
            {"image": PNG},
            options=options,
        )
        assert got.final.state == SUCCEEDED, got.final.error
        (output,) = got.of("output")
        assert output.artifact.mime_type == mime
        assert output.artifact.file_name.endswith("." + output.artifact.name.rsplit(".", 1)[1])
        with Image.open(io.BytesIO(got.output_bytes())) as im:
            assert (im.format, im.size) == (pil, (80, 48))
        # Variants are made from the stored output.
        artifacts = artifact_service_pb2_grpc.ArtifactServiceStub(channel)
        chunks = [
            r
            async for r in artifacts.GetVariant(
                apb.GetVariantRequest(
                    name=output.artifact.name, width=40, format=common_pb2.IMAGE_FORMAT_PNG
                )
            )
        ]
        data = b"".join(r.chunk for r in chunks if r.WhichOneof("payload") == "chunk")
        with Image.open(io.BytesIO(data)) as im:
            assert (im.format, im.width) == ("PNG", 40)


async def test_builtin_task_output_format_over_grpc_and_rest(tmp_path: Path) -> None:
    async with comfy_service(tmp_path) as (service, _), channel_for(service) as channel:
        params = tasks_pb2.ImageToImageParams(
            positive_prompt="a boat",
            steps=1,
            options=common_pb2.JobOptions(output_format=common_pb2.IMAGE_FORMAT_WEBP),
        )
        got = await generate(channel, "ImageToImage", params, {"image": PNG})
        assert got.final.image_to_image.options.output_format == common_pb2.IMAGE_FORMAT_WEBP
        with Image.open(io.BytesIO(got.output_bytes())) as im:
            assert (im.format, im.size) == ("WEBP", (64, 48))
        image = tmp_path / "in.png"
        image.write_bytes(PNG)
        base = f"http://127.0.0.1:{service.http_port}"
        body = json.loads(
            await _run(
                "curl",
                "-sS",
                "--fail-with-body",
                "-F",
                f"image=@{image}",
                "-F",
                "PositivePrompt=a boat",
                "-F",
                "Steps=1",
                "-F",
                "OutputFormat=jpg",
                "-F",
                "Quality=60",
                "-F",
                "Sync=true",
                f"{base}/api/ImageToImage",
            )
        )
        assert body["outputs"][0]["fileName"].endswith(".jpg")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            bad = common_pb2.JobOptions(output_format=common_pb2.IMAGE_FORMAT_WEBP, quality=0)
            await run_workflow(channel, "text_to_image", {"prompt": "x"}, {}, options=bad)
        assert violated_fields(rich_status(caught.value)[1]) == ["params.options.quality"]


async def test_async_ref_id_and_watch_work_as_for_any_job(tmp_path: Path) -> None:
    from imagetasks.v1 import job_service_pb2 as jpb
    from imagetasks.v1 import job_service_pb2_grpc

    options = common_pb2.JobOptions(
        ref_id="wf-1", tag="nightly", mode=common_pb2.RESPONSE_MODE_ASYNC
    )
    async with comfy_service(tmp_path) as (service, _), channel_for(service) as channel:
        got = await run_workflow(
            channel, "text_to_image", {"prompt": "a fox", "steps": 1}, {}, options=options
        )
        assert got.kinds == ["accepted"]
        job = got.events[0].job
        again = await run_workflow(
            channel, "text_to_image", {"prompt": "a fox", "steps": 1}, {}, options=options
        )
        assert again.events[0].job == job and again.of("accepted")[0].existing
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        events = [e async for e in jobs.WatchJob(jpb.WatchJobRequest(name=job))]
        final = events[-1].event.finished.job
        assert final.state == SUCCEEDED and final.tag == "nightly"
        assert final.task == common_pb2.TASK_WORKFLOW
        listed_jobs = await jobs.ListJobs(jpb.ListJobsRequest(task=common_pb2.TASK_WORKFLOW))
        assert [j.name for j in listed_jobs.jobs] == [job]


async def test_cli_and_python_client_list_and_run_a_new_workflow(tmp_path: Path) -> None:
    from aiserver.client import AsyncClient

    user = tmp_path / "workflows"
    user.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "in.png").write_bytes(PNG)
    async with comfy_service(tmp_path, workflows_dir=user, workflows_poll_s=0.1) as (service, _):
        server = f"127.0.0.1:{service.grpc_port}"
        write_workflow(user, "invert", INVERT_GRAPH, INVERT_BINDING)
        await until_listed(service, "invert")
        code, out, err = await run_cli("workflows", cwd=work, server=server)
        assert code == 0, err
        assert "invert - Invert (ready)" in out.splitlines()
        code, out, err = await run_cli("workflows invert", cwd=work, server=server)
        assert code == 0 and "--param width=...  (integer; 0..4096; default 0)" in out, out
        code, out, err = await run_cli(
            "run invert photo=@in.png --param width=20 --param height=10 -o out.png",
            cwd=work,
            server=server,
        )
        assert code == 0, err
        assert out.strip() == str(Path("out.png"))
        with Image.open(work / "out.png") as im:
            assert im.size == (20, 10)
        code, out, err = await run_cli(
            "run invert photo=@in.png --param width=wide --param colour=red",
            cwd=work,
            server=server,
        )
        assert code == 3, err
        assert "parameters.width" in err and "parameters.colour" in err
        code, _, err = await run_cli("run invert photo=@missing.png", cwd=work, server=server)
        assert code == 2 and "missing.png" in err

        async with AsyncClient(server) as client:
            names = [w.name for w in await client.workflows()]
            assert "workflows/invert" in names and "workflows/outpaint" in names
            result = await client.run_workflow(
                "invert", {"width": 12, "height": 8}, {"photo": PNG}, output_format="webp"
            ).run()
            assert result.job.state == SUCCEEDED
            with Image.open(io.BytesIO(result.outputs[0].data or b"")) as im:
                assert (im.format, im.size) == ("WEBP", (12, 8))
