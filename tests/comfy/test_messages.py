"""ComfyUI's websocket frames decoded into typed messages: every recorded trace, and the wire."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from aiserver.providers.comfy import messages as msg
from aiserver.providers.comfy.client import ComfyClient
from tests.comfy.conftest import StandInFactory
from tests.comfy.helpers import png

RECORDINGS = Path(__file__).parents[1] / "support" / "comfy_standin" / "recordings"
TRACES = sorted(p.stem for p in RECORDINGS.glob("ws_trace_*.json"))

TYPES: dict[str, type[Any]] = {
    "status": msg.Status,
    "feature_flags": msg.FeatureFlags,
    "execution_start": msg.ExecutionStart,
    "execution_cached": msg.ExecutionCached,
    "executing": msg.Executing,
    "progress": msg.Progress,
    "progress_state": msg.ProgressState,
    "executed": msg.Executed,
    "execution_success": msg.ExecutionSuccess,
    "execution_error": msg.ExecutionError,
    "execution_interrupted": msg.ExecutionInterrupted,
}


def recording(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((RECORDINGS / f"{name}.json").read_text(encoding="utf-8"))
    return data


def recorded_frames(node: Any) -> Iterator[dict[str, Any]]:
    """Every recorded websocket message, wherever the trace keeps it."""
    if isinstance(node, dict):
        if node.get("binary") or ("type" in node and "data" in node and "rx_ms" in node):
            yield node
            return
        for value in node.values():
            yield from recorded_frames(value)
    elif isinstance(node, list):
        for value in node:
            yield from recorded_frames(value)


def rebuilt_binary(frame: dict[str, Any]) -> bytes:
    """The recorded binary frame: its recorded head, the rest padded to its recorded length."""
    head = bytes.fromhex(frame["first_bytes_hex"])
    if frame["event_type"] == 4:
        meta = json.dumps(frame["metadata"]).encode()
        head = head[:4] + len(meta).to_bytes(4, "big") + meta
        assert bytes.fromhex(frame["first_bytes_hex"]) == head[:16]  # as recorded
    return head + b"\0" * (frame["length"] - len(head))


@pytest.mark.parametrize("name", TRACES)
def test_every_recorded_frame_decodes_to_its_type(name: str) -> None:
    frames = list(recorded_frames(recording(name)))
    assert frames, name
    for frame in frames:
        if frame.get("binary"):
            decoded = msg.decode(rebuilt_binary(frame))
            assert isinstance(decoded, msg.Preview), frame
            assert decoded.mime_type == "image/png"
            if frame["event_type"] == 4:
                meta = frame["metadata"]
                assert (decoded.prompt_id, decoded.node) == (meta["prompt_id"], meta["node_id"])
            continue
        decoded = msg.decode(json.dumps({"type": frame["type"], "data": frame["data"]}))
        assert type(decoded) is TYPES[frame["type"]], frame
        assert decoded.prompt_id == str(frame["data"].get("prompt_id") or "")


@pytest.mark.parametrize("name", TRACES)
def test_recorded_history_messages_decode(name: str) -> None:
    history = recording(name).get("history")
    entries = history.values() if isinstance(history, dict) else ()
    for entry in entries:
        for kind, data in entry["status"]["messages"]:
            assert type(msg.decode_event(kind, data)) is TYPES[kind]


def first(name: str, kind: str) -> dict[str, Any]:
    frame = next(f for f in recorded_frames(recording(name)) if f.get("type") == kind)
    data: dict[str, Any] = frame["data"]
    return data


def decoded(kind: str, data: dict[str, Any]) -> msg.Message:
    return msg.decode(json.dumps({"type": kind, "data": data}))


def test_fields_are_read_from_the_recorded_shapes() -> None:
    error = decoded("execution_error", first("ws_trace_exec_error", "execution_error"))
    assert isinstance(error, msg.ExecutionError)
    assert (error.node_id, error.node_type) == ("2", "UpscaleModelLoader")
    assert (error.exception_type, error.exception_message) == (
        "IndexError",
        "pop from empty list\n",
    )
    assert "pop_mark" in error.traceback[-1]
    progress = decoded("progress", first("ws_trace_img2img", "progress"))
    assert progress == msg.Progress(progress.prompt_id, "6", 1, 2)
    status = decoded("status", first("ws_trace_img2img", "status"))
    assert status == msg.Status(0, "probe-fd2757d4cbca")
    executed = decoded("executed", first("ws_trace_batch", "executed"))
    assert isinstance(executed, msg.Executed) and executed.output is not None
    assert len(executed.output["images"]) == 2
    end = [
        m
        for f in recorded_frames(recording("ws_trace_img2img"))
        if f.get("type") == "executing"
        for m in [decoded("executing", f["data"])]
    ][-1]
    assert isinstance(end, msg.Executing) and end.node is None
    states = decoded("progress_state", first("ws_trace_img2img", "progress_state"))
    assert isinstance(states, msg.ProgressState) and states.states == {"2": "running"}


def test_what_it_cannot_read_is_unknown_not_an_error() -> None:
    assert msg.decode("not json") == msg.Unknown("", "not json")
    assert msg.decode("[1, 2]") == msg.Unknown("", [1, 2])
    odd = msg.decode(json.dumps({"type": "crystools.monitor", "data": {"prompt_id": "p"}}))
    assert odd == msg.Unknown("crystools.monitor", {"prompt_id": "p"}, "p")
    assert msg.decode(json.dumps({"type": "progress", "data": None})) == msg.Unknown(
        "progress", None
    )
    text = (3).to_bytes(4, "big") + (0).to_bytes(4, "big") + b"hello"
    assert msg.decode(text) == msg.Unknown("binary:3", text, binary=True)
    assert msg.decode(b"\0\0") == msg.Unknown("binary:0", b"\0\0", binary=True)
    bad_meta = (4).to_bytes(4, "big") + (99).to_bytes(4, "big") + b"{"
    assert isinstance(msg.decode(bad_meta), msg.Unknown)


@pytest.mark.parametrize("flags", [False, True])
async def test_binary_frames_off_the_wire_decode_to_previews(
    make_standin: StandInFactory, flags: bool
) -> None:
    """SaveImageWebsocket against the stand-in: legacy frames (type 1) through the transport's
    own socket; with ``supports_preview_metadata``, type 4 frames naming prompt and node."""
    standin = await make_standin()
    standin.add_input("probe_in_ws.png", png(40, 30))
    name = "metadata" if flags else "legacy"
    trace = recording(f"ws_trace_saveimagewebsocket_{name}")
    body = {**trace["post_prompt_request"], "prompt_id": "p-ws"}
    scale = body["prompt"]["2"]["inputs"]["scale_by"]
    seen: list[msg.Message] = []
    async with httpx.AsyncClient(base_url=standin.url) as http:
        if flags:
            url = standin.url.replace("http://", "ws://") + f"/ws?clientId={body['client_id']}"
            async with connect(url) as ws:
                flag = {"type": "feature_flags", "data": {"supports_preview_metadata": True}}
                await ws.send(json.dumps(flag))
                assert (await http.post("/prompt", json=body)).status_code == 200
                async with asyncio.timeout(10):
                    while not any(isinstance(m, msg.ExecutionSuccess) for m in seen[-1:]):
                        seen.append(msg.decode(await ws.recv()))
        else:
            client = ComfyClient("agent-a", standin.url)
            socket = await client.open_websocket(body["client_id"])
            try:
                assert (await http.post("/prompt", json=body)).status_code == 200
                async with asyncio.timeout(10):
                    while not any(isinstance(m, msg.ExecutionSuccess) for m in seen[-1:]):
                        seen.append(await socket.recv())
            finally:
                await socket.close()
                await client.aclose()
    assert not [m for m in seen if isinstance(m, msg.Unknown)]
    (preview,) = [m for m in seen if isinstance(m, msg.Preview)]
    assert preview.mime_type == "image/png"
    with Image.open(io.BytesIO(preview.image)) as image:
        assert image.size == (round(40 * scale), round(30 * scale))
    if flags:
        assert (preview.prompt_id, preview.node) == ("p-ws", "3")
    assert any(isinstance(m, msg.FeatureFlags) for m in seen) is flags
