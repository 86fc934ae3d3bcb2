"""A minimal direct ComfyUI client: the baseline that the service's orchestration is measured
against. It does what a hand-written script does, and nothing more:

1. open ``/ws?clientId=<new id>`` (ComfyUI sends a prompt's messages only to its client);
2. ``POST /upload/image`` the input;
3. ``POST /prompt`` the graph with that ``client_id`` and a ``prompt_id`` of our own;
4. read the websocket until ``executing`` with ``node: null`` for our prompt (the end marker);
5. ``GET /history/{prompt_id}`` for the outputs, and ``GET /view`` each image's bytes.

No retries, no progress tracking, no persistence. (Step 5's ``/view`` is there because the
service downloads and stores every output too; without it the comparison would charge the
service for a download the baseline never makes.)

Its HTTP and websocket are aiohttp's, as the service's are: with httpx and websockets the
client itself cost 4-7 ms of CPU per job at 16-64 callers (the service 5), so the baseline's
throughput measured the bench's client, not ComfyUI or the agents.
"""

from __future__ import annotations

import copy
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench import ROOT

UPSCALE_GRAPH = ROOT / "workflows" / "image_upscale.json"


@dataclass(slots=True)
class DirectResult:
    prompt_id: str
    outputs: list[bytes]
    done_at: float
    """``perf_counter`` when the outputs were in hand."""
    end_marker_at: float
    """``perf_counter`` when ``executing`` null arrived."""


class DirectComfy:
    """One agent, shared by concurrent callers (one HTTP connection pool). Create it in the
    event loop that uses it."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.ws_url = "ws" + self.url.removeprefix("http") + "/ws"
        self.http = aiohttp.ClientSession(
            self.url,
            connector=aiohttp.TCPConnector(limit=256),
            timeout=aiohttp.ClientTimeout(total=60),
        )
        self.graph = json.loads(UPSCALE_GRAPH.read_text())

    async def aclose(self) -> None:
        await self.http.close()

    def upscale_graph(self, image_name: str, width: int, height: int, label: str) -> Any:
        graph = copy.deepcopy(self.graph)
        graph["1"]["inputs"]["image"] = image_name
        graph["4"]["inputs"]["width"] = width * 2
        graph["4"]["inputs"]["height"] = height * 2
        graph["5"]["inputs"]["filename_prefix"] = f"bench/ImageUpscale/{label}"
        return graph

    async def upscale(self, png: bytes, width: int, height: int) -> DirectResult:
        client_id = uuid.uuid4().hex
        prompt_id = str(uuid.uuid4())
        label = uuid.uuid4().hex
        async with self.http.ws_connect(f"/ws?clientId={client_id}", max_msg_size=0) as ws:
            form = aiohttp.FormData()
            form.add_field("image", png, filename=f"{label}.png", content_type="image/png")
            form.add_field("type", "input")
            async with self.http.post("/upload/image", data=form) as up:
                up.raise_for_status()
                name = (await up.json())["name"]
            body = {
                "prompt": self.upscale_graph(name, width, height, label),
                "client_id": client_id,
                "prompt_id": prompt_id,
            }
            async with self.http.post("/prompt", json=body) as queued:
                queued.raise_for_status()
                await queued.read()
            async for frame in ws:
                if frame.type is aiohttp.WSMsgType.BINARY:
                    continue
                if frame.type is not aiohttp.WSMsgType.TEXT:
                    raise RuntimeError(f"the agent's websocket ended: {frame.type.name}")
                message = json.loads(frame.data)
                data = message.get("data") or {}
                if data.get("prompt_id") != prompt_id:
                    continue
                if message.get("type") == "execution_error":
                    raise RuntimeError(f"prompt failed: {data.get('exception_message')}")
                if message.get("type") == "executing" and data.get("node") is None:
                    break
            end_marker_at = time.perf_counter()
        async with self.http.get(f"/history/{prompt_id}") as answer:
            history = (await answer.json())[prompt_id]
        outputs = []
        for output in history["outputs"].values():
            for image in output.get("images", []):
                params = {k: image[k] for k in ("filename", "subfolder", "type")}
                async with self.http.get("/view", params=params) as view:
                    view.raise_for_status()
                    outputs.append(await view.read())
        return DirectResult(prompt_id, outputs, time.perf_counter(), end_marker_at)
