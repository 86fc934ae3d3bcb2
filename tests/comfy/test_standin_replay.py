"""The stand-in against the recordings: replay a recorded request, compare what comes back.

Each replay connects a websocket, posts the recorded ``post_prompt_request`` and collects
messages until ``executing`` with ``node: null``; the message type sequence must equal the
recording's, and key payloads (cached nodes, node order, outputs, errors) must have its shape.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.comfy.conftest import StandInFactory
from tests.comfy.helpers import png
from tests.support.comfy_standin import ComfyStandIn

RECORDINGS = Path(__file__).parents[1] / "support" / "comfy_standin" / "recordings"

# Input files the recorded prompts load, with sizes that give the recorded tile/step counts.
INPUTS = {
    "probe_in.png": (96, 64),
    "probe_in_err.png": (96, 64),
    "probe_in_esrgan.png": (96, 64),
    "probe_big.png": (900, 900),  # 4 upscale tiles, as in ws_trace_interrupt.json
    "sd_in_64.png": (64, 64),
    "sd_in_128.png": (128, 128),
    "sd_mask_64.png": (64, 64),
    "caption_in_96x64.png": (96, 64),
}


def recording(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RECORDINGS / f"{name}.json").read_text(encoding="utf-8"))
    return data


def recorded_types(trace: dict[str, Any]) -> list[str]:
    return [m["type"] for m in trace["ws_messages"] if not m.get("binary")]


async def prepared(make_standin: StandInFactory, **options: Any) -> ComfyStandIn:
    standin = await make_standin(**options)
    for name, (width, height) in INPUTS.items():
        standin.add_input(name, png(width, height, (50, 70, 200)))
    return standin


async def collect(ws: ClientConnection, prompt_id: str) -> list[dict[str, Any]]:
    """Messages until ``executing`` null for ``prompt_id`` (binary frames skipped)."""
    messages = []
    async with asyncio.timeout(10):
        while True:
            raw = await ws.recv()
            if isinstance(raw, bytes):
                continue
            message = json.loads(raw)
            messages.append(message)
            data = message["data"]
            end = message["type"] == "executing" and data.get("node") is None
            if end and data.get("prompt_id") == prompt_id:
                return messages


async def replay(
    standin: ComfyStandIn, name: str, *, feature_flags: bool = False
) -> list[dict[str, Any]]:
    trace = recording(name)
    client_id = trace["client_id"]
    ws_url = standin.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    async with connect(ws_url) as ws, httpx.AsyncClient(base_url=standin.url) as http:
        if feature_flags:
            await ws.send(
                json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
            )
        body = dict(trace["post_prompt_request"])
        body["prompt_id"] = trace["prompt_id"] + "-replay"
        response = await http.post("/prompt", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["prompt_id"] == body["prompt_id"]
        assert set(response.json()) == set(trace["post_prompt_response"])
        return await collect(ws, body["prompt_id"])


def types(messages: list[dict[str, Any]]) -> list[str]:
    return [m["type"] for m in messages]


def of_type(messages: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m["data"] for m in messages if m["type"] == kind]


def executing_order(messages: list[dict[str, Any]]) -> list[str | None]:
    return [d["node"] for d in of_type(messages, "executing")]


def progress_values(messages: list[dict[str, Any]]) -> list[tuple[int, int, str]]:
    return [(d["value"], d["max"], d["node"]) for d in of_type(messages, "progress")]


def assert_same_flow(ours: list[dict[str, Any]], name: str) -> dict[str, Any]:
    trace = recording(name)
    theirs = [m for m in trace["ws_messages"] if not m.get("binary")]
    assert types(ours) == recorded_types(trace)
    assert executing_order(ours) == executing_order(theirs)
    assert progress_values(ours) == progress_values(theirs)
    assert [d["nodes"] for d in of_type(ours, "execution_cached")] == [
        d["nodes"] for d in of_type(theirs, "execution_cached")
    ]
    # progress_state: the same nodes in the same states, message by message.
    assert [
        {k: v["state"] for k, v in d["nodes"].items()} for d in of_type(ours, "progress_state")
    ] == [{k: v["state"] for k, v in d["nodes"].items()} for d in of_type(theirs, "progress_state")]
    for mine, recorded in zip(of_type(ours, "executed"), of_type(theirs, "executed"), strict=True):
        assert mine["node"] == recorded["node"]
        assert set(mine["output"]) == set(recorded["output"])
        for key, items in recorded["output"].items():
            assert len(mine["output"][key]) == len(items)
    return trace


async def test_scale_then_cached_resubmit(make_standin: StandInFactory) -> None:
    standin = await prepared(make_standin)
    first = await replay(standin, "ws_trace_scale")
    assert_same_flow(first, "ws_trace_scale")
    again = await replay(standin, "ws_trace_scale_cached")
    assert_same_flow(again, "ws_trace_scale_cached")
    # A cached resubmit repeats the old output: no new file.
    assert of_type(again, "executed")[0]["output"] == of_type(first, "executed")[0]["output"]


async def test_upscale_model_with_feature_flags(make_standin: StandInFactory) -> None:
    standin = await prepared(make_standin)
    ours = await replay(standin, "ws_trace_upscale_model", feature_flags=True)
    assert_same_flow(ours, "ws_trace_upscale_model")
    assert of_type(ours, "feature_flags")[0]["supports_preview_metadata"] is True


async def test_img2img_cold_then_128_then_inpaint(make_standin: StandInFactory) -> None:
    standin = await prepared(make_standin)
    assert_same_flow(await replay(standin, "ws_trace_img2img"), "ws_trace_img2img")
    assert_same_flow(await replay(standin, "ws_trace_img2img_128"), "ws_trace_img2img_128")
    inpaint = await replay(standin, "ws_trace_inpaint")
    assert_same_flow(inpaint, "ws_trace_inpaint")
    assert executing_order(inpaint) == ["9", "10", "1", "5", "11", "6", "7", "8", None]


async def test_batch_executed_carries_every_image(make_standin: StandInFactory) -> None:
    standin = await prepared(make_standin)
    await replay(standin, "ws_trace_img2img_128")
    batch = await replay(standin, "ws_trace_batch")
    assert_same_flow(batch, "ws_trace_batch")
    images = of_type(batch, "executed")[0]["output"]["images"]
    assert [i["filename"] for i in images] == ["batch_00001_.png", "batch_00002_.png"]
    async with httpx.AsyncClient(base_url=standin.url) as http:
        for image in images:
            assert (await http.get("/view", params=image)).status_code == 200


async def test_image_to_text_caption_depends_on_the_image(make_standin: StandInFactory) -> None:
    standin = await prepared(make_standin)
    ours = await replay(standin, "ws_trace_image_to_text")
    assert_same_flow(ours, "ws_trace_image_to_text")
    (text,) = of_type(ours, "executed")[0]["output"]["text"]
    assert text.startswith("an image of 96x64 pixels, mostly blue; mean colour rgb(50, 70, 200)")


async def test_execution_error_has_the_recorded_shape(make_standin: StandInFactory) -> None:
    standin = await prepared(make_standin)
    ours = await replay(standin, "ws_trace_exec_error")
    trace = assert_same_flow(ours, "ws_trace_exec_error")
    (mine,) = of_type(ours, "execution_error")
    (recorded,) = [m["data"] for m in trace["ws_messages"] if m["type"] == "execution_error"]
    assert set(mine) == set(recorded)
    for key in ("node_id", "node_type", "executed", "exception_message", "exception_type"):
        assert mine[key] == recorded[key]
    assert mine["current_inputs"] == recorded["current_inputs"]
    history = standin.history(mine["prompt_id"])
    assert history is not None
    assert history["status"]["status_str"] == "error"
    assert [m[0] for m in history["status"]["messages"]] == [
        "execution_start",
        "execution_cached",
        "execution_error",
    ]


async def test_interrupt_and_queue_delete_as_recorded(make_standin: StandInFactory) -> None:
    standin = await prepared(make_standin, step_delay_s=0.05)
    trace = recording("ws_trace_interrupt")
    standin.hang_at("1")  # job b is queued while a loads its image, as recorded
    standin.hold_after_step("3", 1)  # and deleted, then a interrupted, during its second tile
    client_id = trace["client_id"]
    ws_url = standin.url.replace("http://", "ws://") + f"/ws?clientId={client_id}"
    queue_a = trace["get_queue_while_running"][1]["queue_running"][0]
    queue_b = trace["get_queue_while_running"][1]["queue_pending"][0]
    async with connect(ws_url) as ws, httpx.AsyncClient(base_url=standin.url) as http:
        a = (await http.post("/prompt", json={"prompt": queue_a[2], "client_id": client_id})).json()
        messages: list[dict[str, Any]] = []

        async def until(pred: Any) -> None:
            async with asyncio.timeout(10):
                while True:
                    raw = await ws.recv()
                    if isinstance(raw, bytes):
                        continue
                    messages.append(json.loads(raw))
                    if pred(messages[-1]):
                        return

        await until(lambda m: m["type"] == "executing" and m["data"].get("node") == "1")
        b = (await http.post("/prompt", json={"prompt": queue_b[2], "client_id": client_id})).json()
        await until(lambda m: m["type"] == "status")  # b queued
        standin.release("1")
        await until(lambda m: m["type"] == "progress")
        queue = (await http.get("/queue")).json()
        assert [item[1] for item in queue["queue_pending"]] == [b["prompt_id"]]
        assert len(queue["queue_running"][0]) == 5  # (number, id, prompt, extra_data, outputs)
        jobs = (await http.get("/api/jobs")).json()["jobs"]
        assert {j["id"]: j["status"] for j in jobs} == {
            a["prompt_id"]: "in_progress",
            b["prompt_id"]: "pending",
        }
        assert (await http.post("/queue", json={"delete": [b["prompt_id"]]})).status_code == 200
        interrupt = await http.post("/interrupt", json={"prompt_id": a["prompt_id"]})
        assert interrupt.status_code == 200
        await until(lambda m: m["type"] == "executing" and m["data"].get("node") is None)
        assert types(messages) == recorded_types(trace)
        (stopped,) = of_type(messages, "execution_interrupted")
        assert (stopped["node_id"], stopped["node_type"]) == ("3", "ImageUpscaleWithModel")
        assert (await http.get(f"/history/{b['prompt_id']}")).json() == {}
        job_a = (await http.get(f"/api/jobs/{a['prompt_id']}")).json()
        assert job_a["status"] == "failed"  # interrupted jobs read "failed" (http_samples.json)
        assert (await http.get("/api/jobs/nope")).status_code == 404


async def test_interrupt_for_another_prompt_is_ignored(make_standin: StandInFactory) -> None:
    standin = await prepared(make_standin)
    standin.hang_at("2")
    async with httpx.AsyncClient(base_url=standin.url) as http:
        body = recording("ws_trace_scale")["post_prompt_request"]
        pid = (await http.post("/prompt", json=body)).json()["prompt_id"]
        await standin.wait_for(lambda: standin.running_prompt == pid)
        await http.post("/interrupt", json={"prompt_id": "someone-else"})
        await asyncio.sleep(0.05)
        assert standin.running_prompt == pid
        await http.post("/interrupt")  # no prompt_id: whatever runs
        await standin.wait_for(lambda: standin.history(pid) is not None)


ERRORS = json.loads((RECORDINGS / "errors.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", sorted(ERRORS))
async def test_prompt_validation_matches_errors_json(
    make_standin: StandInFactory, case: str
) -> None:
    # The recording server had these model lists (see the bodies' input_config).
    standin = await prepared(
        make_standin,
        models={
            "checkpoints": [],
            "upscale_models": ["RealESRGAN_x2.pth", "corrupt_for_probe.pth"],
        },
    )
    recorded = ERRORS[case]
    async with httpx.AsyncClient(base_url=standin.url) as http:
        request = recorded["request"]
        if isinstance(request, str):
            response = await http.post("/prompt", content=request.encode())
        else:
            response = await http.post("/prompt", json=request)
    assert response.status_code == recorded["status"]
    if isinstance(recorded["body"], str):
        assert response.text == recorded["body"]
        return
    body = response.json()
    if response.status_code == 200:
        assert body["node_errors"] == recorded["body"]["node_errors"]
    else:
        assert body == recorded["body"]


async def test_uploads_views_and_clashes(standin: ComfyStandIn) -> None:
    async with httpx.AsyncClient(base_url=standin.url) as http:
        first = await http.post("/upload/image", files={"image": ("a.png", png(8, 8))})
        assert first.json() == {"name": "a.png", "subfolder": "", "type": "input"}
        same = await http.post("/upload/image", files={"image": ("a.png", png(8, 8))})
        assert same.json()["name"] == "a.png"  # identical bytes: reused
        other = await http.post("/upload/image", files={"image": ("a.png", png(9, 9))})
        assert other.json()["name"] == "a (1).png"  # README: a clash is renamed
        forced = await http.post(
            "/upload/image", files={"image": ("a.png", png(9, 9))}, data={"overwrite": "true"}
        )
        assert forced.json()["name"] == "a.png"
        assert (await http.post("/upload/image", data={"type": "input"})).status_code == 400
        mask = await http.post(
            "/upload/mask",
            files={"image": ("m.png", png(9, 9, (0, 0, 0, 0), "RGBA"))},
            data={
                "type": "input",
                "subfolder": "clipspace",
                "original_ref": json.dumps({"filename": "a.png", "subfolder": "", "type": "input"}),
            },
        )
        assert mask.json() == {"name": "m.png", "subfolder": "clipspace", "type": "input"}
        view = await http.get("/view", params={"filename": "a.png", "type": "input"})
        assert view.status_code == 200 and view.headers["content-type"] == "image/png"
        assert (await http.get("/view", params={"filename": "nope.png"})).status_code == 404
        assert (await http.get("/view", params={"filename": "../etc/passwd"})).status_code == 400
        escape = {"filename": "a.png", "subfolder": "../../..", "type": "input"}
        assert (await http.get("/view", params=escape)).status_code == 403
        assert (
            await http.get("/view", params={"filename": "a.png", "type": "x"})
        ).status_code == 400
        info = (await http.get("/api/object_info/UpscaleModelLoader")).json()
        assert info["UpscaleModelLoader"]["input"]["required"]["model_name"][0] == "COMBO"
        assert (await http.get("/object_info/NoSuchNode")).json() == {}
        stats = (await http.get("/system_stats")).json()
        assert stats["system"]["comfyui_version"] == "0.8.0"
        assert (await http.get("/history/unknown")).json() == {}
        crossed = await http.get("/queue", headers={"Origin": "http://evil.example"})
        assert crossed.status_code == 403


async def test_previews_are_binary_frames_when_asked_for(make_standin: StandInFactory) -> None:
    standin = await prepared(make_standin)
    trace = recording("ws_trace_img2img")
    url = standin.url.replace("http://", "ws://") + f"/ws?clientId={trace['client_id']}"
    frames = []
    async with connect(url) as ws, httpx.AsyncClient(base_url=standin.url) as http:
        body = {**trace["post_prompt_request"], "extra_data": {"preview_method": "auto"}}
        await http.post("/prompt", json=body)
        async with asyncio.timeout(5):
            while True:
                raw = await ws.recv()
                if isinstance(raw, bytes):
                    frames.append(raw)
                elif json.loads(raw)["type"] == "execution_success":
                    break
    # [u32 1 = preview][u32 1 = JPEG][JPEG bytes], one per sampler step (README).
    assert len(frames) == 2
    assert all(
        f[:8] == b"\x00\x00\x00\x01\x00\x00\x00\x01" and f[8:10] == b"\xff\xd8" for f in frames
    )


async def test_a_node_it_cannot_emulate_fails_like_a_raising_node(
    make_standin: StandInFactory,
) -> None:
    # ImageBlur is in the catalogue (validation passes) but has no emulation: the
    # prompt must end as a real ComfyUI prompt whose node raised, never hang or pass.
    standin = await make_standin()
    graph = {
        "1": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "sd15_random.safetensors"},
        },
        "2": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
        },
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {
            "class_type": "ImageBlur",
            "inputs": {"image": ["3", 0], "blur_radius": 1, "sigma": 1.0},
        },
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}},
    }
    ws_url = standin.url.replace("http://", "ws://") + "/ws?clientId=unemulated"
    async with connect(ws_url) as ws, httpx.AsyncClient(base_url=standin.url) as http:
        body = {"prompt": graph, "client_id": "unemulated", "prompt_id": "p-unemulated"}
        response = await http.post("/prompt", json=body)
        assert response.status_code == 200, response.text
        messages = await collect(ws, "p-unemulated")
    (error,) = of_type(messages, "execution_error")
    assert (error["node_id"], error["node_type"]) == ("4", "ImageBlur")
    assert error["exception_type"].endswith("NotEmulated")
    assert "execution_success" not in types(messages)
